"""Reasoning targets (sim/reasoning.py) follow MetaWorld's scripted policies branch by branch; the
joint loss (reasoning cross-entropy + flow) is what token-by-token decoding sees; training on the
targets teaches them; open-loop evaluation grades them by exact match."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_collection

from vlaopt.config import VLAConfig
from vlaopt.data.dataset import EpisodeDataset, compute_stats
from vlaopt.eval.open_loop import open_loop_error
from vlaopt.eval.reasoning import exact_match
from vlaopt.model import expert_policy
from vlaopt.model.decode import decode_step, last_token_logits
from vlaopt.model.vla import VLA
from vlaopt.sim.env import SimEnv
from vlaopt.sim.reasoning import DONE, EXPLAINERS, reasoning_text
from vlaopt.sim.scripted import ScriptedPolicy
from vlaopt.sim.tasks import TASK_SETS
from vlaopt.train.trainer import TrainConfig, train


def test_every_mt10_task_has_reasoning():
    assert set(TASK_SETS["mt10"]) <= set(EXPLAINERS.names()) == set(DONE)


@pytest.mark.parametrize("task", TASK_SETS["mt10"])
def test_phase_reproduces_the_scripted_action(task):
    """On every step of two scripted rollouts, the branch named here moves the hand exactly as
    MetaWorld's policy does (same target, same gain), and more than one branch is visited."""
    explain, expert, texts = EXPLAINERS.get(task), ScriptedPolicy(task), set()
    with SimEnv(task, 0, ("corner4",), 16, max_steps=150) as env:
        for seed in (0, 1):
            env.reset(seed=seed)
            for _ in range(env.max_steps):
                state = env.state.copy()  # door-open's policy shifts its parsed view of the state in place
                phase = explain(state)
                action = expert.act(env)
                expected = np.clip(phase.gain * (phase.target - state[:3]), -1, 1)
                np.testing.assert_allclose(action[:3], expected, atol=1e-6, err_msg=f"{task} {phase.text!r}")
                texts.add(phase.text)
                if env.step(action)[1]:
                    break
    assert len(texts) >= 2, texts


def test_done_text_after_success_and_unknown_task():
    state = np.zeros(39)
    assert reasoning_text("drawer-open-v3", state, done=True) == "drawer open; done"
    with pytest.raises(KeyError, match="unknown reasoning task 'reach-v2'"):
        reasoning_text("reach-v2", state, done=False)


# ---- the joint loss, training on reasoning targets, reasoning accuracy ---------------------------------------------

def _reasoner(tokens: int = 24):
    cfg = VLAConfig.tiny(head="expert", cameras=2, proprio_dim=4)
    cfg.head = replace(cfg.head, reasoning_tokens=tokens)
    return VLA(cfg)


def _batch(cfg, n: int = 3):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, cfg.cameras, cfg.vision.image_size, cfg.vision.image_size, 3), dtype=np.uint8)
    return images, ["open the drawer", "push it", "press"][:n], torch.from_numpy(rng.normal(size=(n, 4)).astype(np.float32))


def test_joint_loss_is_the_flow_loss_plus_the_text_cross_entropy_of_token_by_token_decoding():
    """Reasoning teacher-forced in one pass gives the logits of feeding it token by token, and the
    expert reads the cache holding it: loss = CE(those logits) + the flow loss over that cache."""
    model = _reasoner()
    images, instructions, proprio = _batch(model.config)
    texts = ["above it; lower", "done", "at the handle; pull it"]
    actions = torch.rand(3, model.config.chunk, model.config.action_dim) * 2 - 1
    loss = model.compute_loss(images, instructions, actions, proprio, torch.Generator().manual_seed(5), texts)

    ids, valid = model.reasoning_targets(texts)
    assert ids[1].tolist()[: int(valid[1].sum())] == model.tokenizer(" done", add_special_tokens=False)["input_ids"] + [
        model.stop_id]
    state = model.encode(model.preprocess(images, instructions, proprio))
    cache, final = expert_policy.fill_prefix(model, state)
    logits = [last_token_logits(model.lm, final)]
    for i in range(ids.shape[1] - 1):
        logits.append(decode_step(model.lm, cache, ids[:, i], valid[:, i]))
    decode_step(model.lm, cache, ids[:, -1], valid[:, -1])
    logits = torch.stack(logits, 1)
    text = F.cross_entropy(logits[valid], ids[valid])
    flow = model.head.loss(cache, model.action_norm.normalize(actions), torch.Generator().manual_seed(5), state.proprio)
    torch.testing.assert_close(loss, text + flow, atol=1e-5, rtol=1e-5)


def test_reasoning_target_refusals():
    with pytest.raises(ValueError, match=r"^the reasoning target 'x{30}' takes 32 tokens with STOP, more than "
                                         r"head.reasoning_tokens=24$"):
        _reasoner().reasoning_targets(["x" * 30])
    with pytest.raises(ValueError, match=r"^reasoning targets train a head that reasons; head.kind='l1' with "
                                         r"reasoning_tokens=0 decodes none$"):
        VLA(VLAConfig.tiny()).reasoning_targets(["a"])



def _tiny_reasoner_config():
    cfg = VLAConfig.tiny(head="expert", cameras=2, proprio_dim=4, action_dim=4)
    cfg.head = replace(cfg.head, reasoning_tokens=24)
    return cfg


def test_training_learns_the_reasoning_and_open_loop_grades_it(tmp_path):
    data = write_collection(tmp_path / "data", steps=10, reasoning=True)
    model = VLA(_tiny_reasoner_config())
    train_set = EpisodeDataset(data, "all", chunk=model.config.chunk)
    before = open_loop_error(model, data, split="all", val_fraction=0.25)
    assert before.reasoning == 0.0
    train(model, train_set, None, tmp_path / "run", TrainConfig(steps=120, batch_size=20, lr=3e-3, warmup_steps=5,
                                                                 save_every=120), compute_stats(train_set), progress=False)
    after = open_loop_error(model, data, split="all", val_fraction=0.25)
    assert after.reasoning == 1.0 and after.reasoning_per_task == {"reach-v3": 1.0}


def test_training_a_reasoner_needs_reasoning_targets(tmp_path):
    data = write_collection(tmp_path / "data", steps=10)
    train_set = EpisodeDataset(data, "all", chunk=8)
    with pytest.raises(ValueError, match=r"^head.reasoning_tokens=24 trains the model to reason, but the training "
                                         r"episodes carry no reasoning targets"):
        train(VLA(_tiny_reasoner_config()), train_set, None, tmp_path / "run", TrainConfig(steps=2, batch_size=4),
              compute_stats(train_set), progress=False)
    with pytest.raises(ValueError, match=r"the model reasons, but the episodes in .* carry no reasoning targets"):
        open_loop_error(VLA(_tiny_reasoner_config()), data, split="all")


def test_exact_match():
    assert exact_match(["a; b", " c "], ["a; b", "c"]) == 1.0
    assert exact_match(["a; b", "c"], ["a; c", "c"]) == 0.5
    with pytest.raises(ValueError, match=r"^1 predicted reasoning texts for 2 targets"):
        exact_match(["a"], ["a", "b"])
