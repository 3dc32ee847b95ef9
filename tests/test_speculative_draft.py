"""The `model` draft of speculative decoding (drafts/model.py) and its distillation (distill.py):
greedy speculative decoding with it gives plain greedy decoding's reasoning and actions (untrained
and distilled), its layer reads the VLM cache (checked against a forward written out here), training
it teacher-forced in rounds matches how decoding runs it, distillation lowers the held-out KL and
raises the acceptance, and the step's refusals and save / load round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_greedy, reasoner, reasoner_obs

import vlaopt
from vlaopt.model import expert_policy
from vlaopt.model.decode import feed, last_token_logits
from vlaopt.model.expert_policy import fill_prefix
from vlaopt.model.vla import VLA
from vlaopt.optimize.calibration import random_observations
from vlaopt.optimize.decoding import distill
from vlaopt.optimize.decoding.drafts.model import ModelDraft, build_draft, load_draft, save_draft


def _speculative(model: VLA, path, k: int = 3) -> VLA:
    return vlaopt.apply(model, [{"speculative": {"draft": "model", "k": k, "path": str(path)}}])


@pytest.mark.parametrize("trained", [False, True])
def test_greedy_decoding_with_the_model_draft_gives_plain_greedy_tokens_and_actions(tmp_path, trained):
    plain = reasoner(stop_at=5)
    fast = reasoner(stop_at=5)
    net = (distill.distill_draft(fast, random_observations(fast.config, 16, 8), steps=20, progress=False)
           if trained else build_draft(fast, seed=1))
    _speculative(fast, save_draft(net, tmp_path / "draft"))
    fast.stop_id = plain.stop_id
    a = assert_same_greedy(plain, fast)
    assert a.reasoning[0, 6:].eq(plain.pad_id).all()  # the first sample stopped early
    stats = fast.text_decoder.stats
    assert isinstance(fast.text_decoder.draft, ModelDraft)
    assert stats["emitted"] == int((a.reasoning != plain.pad_id).sum())
    assert stats["drafted"] > stats["accepted"]  # rejections happened and were rolled back


def _rope(x: torch.Tensor, position: torch.Tensor, theta: float) -> torch.Tensor:
    """x (B, H, 1, hd) rotated by RoPE at `position` (B,), half-split convention."""
    hd = x.shape[-1]
    angle = position.double()[:, None] / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)[None]
    cos, sin = torch.cat([angle, angle], -1).cos().float(), torch.cat([angle, angle], -1).sin().float()
    rotated = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1)
    return x * cos[:, None, None] + rotated * sin[:, None, None]


def test_the_draft_layer_reads_the_vlm_cache_of_its_read_layer():
    """The draft's logits for the first drafted token = its layer run by hand: the query of the fed
    token attends to the valid cached keys/values of the last VLM layer and to its own key/value."""
    model = reasoner()
    net = build_draft(model, seed=1)
    lm, layer = model.lm, net.body.layers[0]
    attn = layer.self_attn
    heads, kv_heads, hd = 4, 2, 16
    with torch.no_grad():
        cache, final = fill_prefix(model, model.lm_input(*reasoner_obs(model.config)))
        first = last_token_logits(lm, final).argmax(-1)
        _, q = ModelDraft.of(net).propose(lm, cache, [[]] * 3, first, torch.ones(3, dtype=torch.bool), 1,
                                          lambda x: x, None)
        assert net.read == 2 and sorted(cache.keys) == [0, 1, 2]
        pos, b = cache.next_position, first.shape[0]
        h = lm.embed(first)[:, None]
        x = layer.input_layernorm(h)
        query = _rope(attn.q_proj(x).view(b, 1, heads, hd).transpose(1, 2), pos, 10000.0)
        key = _rope(attn.k_proj(x).view(b, 1, kv_heads, hd).transpose(1, 2), pos, 10000.0)
        value = attn.v_proj(x).view(b, 1, kv_heads, hd).transpose(1, 2)

        def logits(keys, values, seen):
            k = torch.cat([keys, key], 2).repeat_interleave(heads // kv_heads, 1)
            v = torch.cat([values, value], 2).repeat_interleave(heads // kv_heads, 1)
            seen = torch.cat([seen, seen.new_ones(b, 1)], 1)
            weights = ((query @ k.transpose(-1, -2)) / math.sqrt(hd)).masked_fill(~seen[:, None, None], -math.inf)
            out = (weights.softmax(-1) @ v).transpose(1, 2).reshape(b, 1, heads * hd)
            y = h + attn.o_proj(out)
            y = y + layer.mlp(layer.post_attention_layernorm(y))
            return lm.lm_head(net.body.norm(y))[:, 0]

        ref = logits(cache.keys[2], cache.values[2], cache.valid[2])
        torch.testing.assert_close(q[:, 0].log(), ref.log_softmax(-1), atol=1e-5, rtol=1e-5)
        other = logits(cache.keys[0], cache.values[0], cache.valid[0])  # another layer's cache: other logits
        assert (other.log_softmax(-1) - ref.log_softmax(-1)).abs().max() > 0.1


def test_training_runs_the_draft_as_decoding_does():
    """Teacher-forced in rounds of 3 (round_mask), the draft's logits at each token of the round that
    starts at reasoning token 3 equal those of its proposals over a cache holding tokens 0..2 (it is
    fed the teacher's tokens: the teacher's text is the draft's own greedy text here)."""
    model = reasoner(std=0.1)
    net = build_draft(model, seed=1)
    obs = reasoner_obs(model.config)
    teacher = distill.teacher_batches(model, [obs], net.read)[0]
    with torch.no_grad():
        trained = distill.draft_scores(model, net, teacher, 3, 0)
        cache, _ = fill_prefix(model, model.lm_input(*obs))
        feed(model.lm, cache, teacher.ids[:, :3], teacher.valid[:, :3])
        ids = teacher.ids[:, 3:6]  # force the proposals to the teacher's tokens
        forced = iter([ids[:, 1], ids[:, 2], ids[:, 2]])
        steps = []

        def scores(x):
            steps.append(x)
            return F.one_hot(next(forced), x.shape[-1]).float() * 1e4

        ModelDraft.of(net).propose(model.lm, cache, [[]] * 3, ids[:, 0], torch.ones(3, dtype=torch.bool), 3, scores,
                                   None)
    for i in range(3):
        torch.testing.assert_close(steps[i], trained[:, 3 + i], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(distill.draft_scores(model, net, teacher, 4, 0)[:, 3], trained[:, 3], atol=1e-3)


def test_distill_loss_is_the_forward_kl_of_the_processed_distributions():
    p = torch.tensor([[[2.0, 1.0, -math.inf, 0.0]]])
    q = torch.tensor([[[0.0, 1.0, -math.inf, 3.0]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    ps, qs = p.softmax(-1), q.softmax(-1)
    want = sum(float(ps[0, 0, i] * (ps[0, 0, i].log() - qs[0, 0, i].log())) for i in (0, 1, 3))
    assert distill.distill_loss(p, q, mask).item() == pytest.approx(want, rel=1e-5)
    assert distill.distill_loss(p, p, mask).item() == pytest.approx(0.0, abs=1e-7)
    assert distill.distill_loss(p, q, ~mask).item() == 0.0


def test_distillation_lowers_the_heldout_kl_and_raises_the_acceptance():
    model = reasoner(std=0.1)  # text a function of the context a small draft can learn
    train = random_observations(model.config, 128, 16, seed=0)
    held = random_observations(model.config, 32, 16, seed=1)
    before = build_draft(model, seed=0)
    heldout = distill.teacher_batches(model, held, before.read)
    kl0, acc0 = distill.draft_kl(model, before, heldout), distill.acceptance(model, before, held, 4)["acceptance"]
    teachers = distill.teacher_batches(model, train, before.read)
    after = distill.distill_draft(model, train, steps=300, lr=3e-3, progress=False, teachers=teachers)
    kl1, acc1 = distill.draft_kl(model, after, heldout), distill.acceptance(model, after, held, 4)["acceptance"]
    assert kl1 < 0.5 * kl0, (kl0, kl1)
    assert acc1 > acc0 + 0.1, (acc0, acc1)
    assert len(after.history) == 300 and np.mean(after.history[-20:]) < 0.5 * after.history[0]
    again = distill.distill_draft(model, train, steps=300, lr=3e-3, progress=False, teachers=teachers)
    assert again.history == after.history  # deterministic from the seed


def test_draft_save_load_round_trip_and_the_step_reloads(tmp_path):
    model = reasoner()
    net = build_draft(model, seed=1)
    with torch.no_grad():
        net.body.norm.weight.mul_(1.5)
    net.history = [3.0, 2.0]
    path = save_draft(net, tmp_path / "draft", {"steps": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draft"]  # nothing left beside it
    saved = json.loads((path / "config.json").read_text())
    assert saved["read"] == 2 and saved["distill"] == {"loss": [3.0, 2.0], "steps": 2}
    loaded = load_draft(path, model.lm)
    for (name, a), (_, b) in zip(net.body.state_dict().items(), loaded.body.state_dict().items()):
        assert torch.equal(a, b), name
    save_draft(loaded, path)  # replacing a draft folder is fine
    fast = _speculative(model, path)
    obs = reasoner_obs(model.config)
    want = expert_policy.rollout(fast, *obs)
    fast.save_pretrained(tmp_path / "vla")
    again = vlaopt.load(tmp_path / "vla")
    assert again.config.recipe == fast.config.recipe
    assert isinstance(again.text_decoder.draft, ModelDraft)
    got = expert_policy.rollout(again, *obs)
    assert torch.equal(got.reasoning, want.reasoning)
    torch.testing.assert_close(got.actions, want.actions, atol=1e-6, rtol=1e-6)


def test_model_draft_refusals(tmp_path):
    model = reasoner()
    with pytest.raises(ValueError, match=r"^speculative path=None with draft='model': a path \(a draft folder\) is "
                                         r"needed for, and only for, draft model$"):
        vlaopt.apply(model, [{"speculative": {"draft": "model"}}])
    with pytest.raises(ValueError, match=r"^speculative path='x' with draft='self': a path"):
        vlaopt.apply(model, [{"speculative": {"draft": "self", "path": "x"}}])
    missing = tmp_path / "none"
    with pytest.raises(ValueError, match=rf"^speculative path='{missing}': no such draft folder; write one with "
                                         r"scripts/distill_draft.py$"):
        _speculative(model, missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"is not a draft folder \(it lacks config.json\)"):
        _speculative(model, tmp_path / "empty")
    model.save_pretrained(tmp_path / "vla")  # a VLA folder has config.json and model.safetensors
    with pytest.raises(ValueError, match=r"vla' is not a draft folder \(its config.json is not a vlaopt-draft config\)$"):
        _speculative(model, tmp_path / "vla")
    with pytest.raises(FileExistsError, match=r"vla exists and is not a draft folder; refusing to replace it$"):
        save_draft(build_draft(model), tmp_path / "vla")
    with pytest.raises(ValueError, match=r"^draft read_layer=3: the LM has 3 attention layers; expected -3 to 2$"):
        build_draft(model, read_layer=3)
    with pytest.raises(ValueError, match=r"^draft layers=0 must be a positive integer$"):
        build_draft(model, layers=0)
    gemma = save_draft(build_draft(reasoner(lm="gemma")), tmp_path / "gemma")
    with pytest.raises(ValueError, match=r"the draft was built for another LM: model_type='gemma' \(the LM has 'llama'\)"):
        _speculative(model, gemma)
    assert model.text_decoder is None  # nothing installed by the refused steps


def test_the_distill_script_writes_a_draft_the_step_loads(tmp_path):
    import importlib.util
    from pathlib import Path

    from vlaopt.data.episodes import Episode, write_episode, write_index

    model = reasoner(std=0.1)
    model.save_pretrained(tmp_path / "vla")
    rng = np.random.default_rng(0)
    entries = []
    for i, instruction in enumerate(["open the drawer", "push the button"]):
        steps = 12
        episode = Episode(rng.integers(0, 256, (steps, 2, 32, 32, 3), dtype=np.uint8),
                          rng.normal(size=(steps, 3)).astype(np.float32), np.zeros((steps, 4), np.float32),
                          f"task-{i}", instruction, ("a", "b"), i, True, steps - 1)
        write_episode(tmp_path / "data" / f"ep{i}.npz", episode)
        entries.append({"file": f"ep{i}.npz"})
    write_index(tmp_path / "data", {}, entries, attempts={}, metaworld_version="x")
    script = Path(__file__).parent.parent / "scripts" / "distill_draft.py"
    spec = importlib.util.spec_from_file_location("distill_draft_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        assert module.main(["--model", str(tmp_path / "vla"), "--data", str(tmp_path / "data"), "--out",
                            str(tmp_path / "draft"), "--steps", "20", "--samples", "16", "--heldout", "8",
                            "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "draft.json").read_text())
    assert len(record["loss"]) == 20 and record["heldout_after"]["kl"] < record["heldout_before"]["kl"]
    fast = _speculative(vlaopt.load(tmp_path / "vla"), tmp_path / "draft")
    assert fast.text_decoder.draft.net.history == record["loss"]
