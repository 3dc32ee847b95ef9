"""The action expert over the VLM's KV cache: cache reuse, batching, reasoning, training, flow_steps."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import observations
from transformers import LogitsProcessor, LogitsProcessorList

from vlaopt import VLA, VLAConfig, apply, load
from vlaopt.config import head_config
from vlaopt.model.decode import generate_text, last_token_logits
from vlaopt.model.expert_policy import fill_prefix, forbidden_text_ids, rollout
from vlaopt.model.heads.expert import integrate
from vlaopt.utils.timer import StageTimer


def _model(lm: str = "llama", recipe: list | None = None, **head: object) -> VLA:
    cfg = VLAConfig.tiny(lm=lm, head="expert", cameras=2, proprio_dim=3)
    cfg.head = dataclasses.replace(cfg.head, **head)
    model = VLA(cfg).eval()
    if recipe:
        apply(model, recipe)
    return model


def _noise(model: VLA, batch: int) -> torch.Tensor:
    cfg = model.config
    return torch.randn((batch, cfg.chunk, cfg.action_dim), generator=torch.Generator().manual_seed(1))


def _encoded(model: VLA, batch: int = 3):
    return model.lm_input(*observations(model.config, batch))


FASTV = [{"token_pruning": {"method": "fastv", "layer": 1, "keep": 0.25}}]


@pytest.mark.parametrize(
    ("lm", "head", "recipe"),
    [
        ("llama", {}, None),
        ("qwen3", {"integrator": "midpoint"}, None),
        ("qwen2", {"kv_layers": "later"}, None),
        ("llama", {}, FASTV),
    ],
)
@torch.inference_mode()
def test_cached_prefix_equals_recomputing_it_at_every_step_and_never_grows(lm, head, recipe):
    model = _model(lm, recipe, **head)
    state, noise, expert = _encoded(model), _noise(model, 3), model.head
    cache, _ = fill_prefix(model, state)
    lengths = {i: cache.length(i) for i in cache.layers}
    keys = {i: cache.keys[i].clone() for i in cache.layers}
    cached = expert.sample(cache, noise)
    assert {i: cache.length(i) for i in cache.layers} == lengths
    assert all(torch.equal(cache.keys[i], keys[i]) for i in cache.layers)
    passes = []

    def recomputed_velocity(x, t):
        fresh, _ = fill_prefix(model, state)  # the whole prefix again, for this one step
        passes.append(1)
        return expert.velocity(expert.context(fresh), x, t)

    recomputed = integrate(recomputed_velocity, noise, expert.cfg.steps, expert.cfg.integrator)
    assert len(passes) == expert.cfg.steps * (2 if expert.cfg.integrator == "midpoint" else 1)
    torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=0)
    if recipe:  # fastv before layer 1: the later layer caches only the kept visual tokens
        assert cache.length(1) < cache.length(0)


@pytest.mark.parametrize(
    ("lm", "head", "recipe"),
    [
        ("llama", {}, None),
        ("qwen2", {"reasoning_tokens": 6}, None),
        ("qwen3", {"trajectory": "autoregressive"}, None),
        ("llama", {"reasoning_tokens": 4}, FASTV),
        ("qwen3", {}, [{"token_pruning": {"method": "lightvla"}}]),
    ],
)
def test_batch_equals_each_sample_alone(lm, head, recipe):
    model = _model(lm, recipe, **head)
    images, instructions, proprio = observations(model.config)
    noise = _noise(model, 3)
    batch = model.predict_action(images, instructions, proprio, noise=noise)
    assert batch.shape == (3, model.config.chunk, model.config.action_dim) and torch.isfinite(batch).all()
    for i in range(3):
        alone = model.predict_action(images[i : i + 1], instructions[i : i + 1], proprio[i : i + 1], noise=noise[i : i + 1])
        torch.testing.assert_close(alone, batch[i : i + 1], atol=1e-5, rtol=0)


def test_later_kv_layers_read_only_the_later_half():
    model = _model("llama", kv_layers="later")  # tiny LM: 2 layers -> the expert has 1, paired with layer 1
    assert model.head.layer_map == [1] and len(model.head.expert.layers) == 1
    with torch.inference_mode():
        cache, _ = fill_prefix(model, _encoded(model))
        noise = _noise(model, 3)
        before = model.head.sample(cache, noise)
        cache.keys[0].normal_()
        cache.values[0].normal_()
        assert torch.equal(model.head.sample(cache, noise), before)
        cache.keys[1].normal_()
        assert not torch.allclose(model.head.sample(cache, noise), before)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_reasoning_never_emits_a_forbidden_token(temperature):
    model = _model("qwen3", reasoning_tokens=12, temperature=temperature, top_p=0.9)
    bins = model.config.head.bins
    with torch.no_grad():  # make the action bins (and pad) the LM's favourite tokens
        model.lm.causal_lm.get_output_embeddings().weight[-bins:] *= 40
    forbidden = forbidden_text_ids(model)
    images, instructions, proprio = observations(model.config)
    with torch.inference_mode():
        _, final = fill_prefix(model, _encoded(model))
        favourite = last_token_logits(model.lm, final).argmax(-1)
    assert set(favourite.tolist()) <= set(forbidden)  # without the processor they would be emitted
    for seed in range(3):
        out = rollout(model, images, instructions, proprio, seed=seed)
        assert 0 < out.reasoning.shape[1] <= 12
        emitted = out.reasoning[out.reasoning != model.pad_id] if model.pad_id != model.stop_id else out.reasoning
        assert not set(emitted.tolist()) & set(forbidden)


class _StopAt(LogitsProcessor):
    """Forces sample 0 to emit `stop` as its token number `at` (0-based)."""

    def __init__(self, stop: int, at: int) -> None:
        self.stop, self.at = stop, at

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] == self.at:
            scores[0] = float("-inf")
            scores[0, self.stop] = 0.0
        return scores


@torch.inference_mode()
def test_reasoning_stops_at_the_stop_token_and_pads_after_it():
    model = _model("llama")
    cache, final = fill_prefix(model, _encoded(model))
    start, before = cache.next_position.clone(), cache.length(0)
    processors = LogitsProcessorList([_StopAt(model.stop_id, 2)])
    ids, _ = generate_text(model.lm, cache, last_token_logits(model.lm, final), 5, processors, model.stop_id, 0, None)
    assert ids.shape == (3, 5) and ids[0, 2] == model.stop_id and (ids[0, 3:] == 0).all()
    assert (cache.next_position - start).tolist()[0] == 3  # the stop token is fed, nothing after it
    assert cache.valid[0][0, before:].tolist() == [True] * 3 + [False] * 2


def test_training_lowers_the_flow_matching_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = _model("qwen2").train()
    images, instructions, proprio = observations(model.config, batch=4)
    actions = torch.rand((4, model.config.chunk, model.config.action_dim)) * 2 - 1

    def loss() -> torch.Tensor:
        return model.compute_loss(images, instructions, actions, proprio, generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        first = loss().item()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(40):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        last = loss().item()
    assert last < 0.5 * first, (first, last)
    assert model.head.expert.layers[0].self_attn.q_proj.weight.grad is not None


def test_stages_prefix_reasoning_flow_are_timed_separately():
    model = _model("llama", reasoning_tokens=3)
    images, instructions, proprio = observations(model.config)
    timer = StageTimer()
    model.predict_action(images, instructions, proprio, timer=timer)
    stages = timer.result()
    assert {"prefix", "reasoning", "flow"} <= set(stages) and not {"lm", "head"} & set(stages)
    model.head.cfg.trajectory = "autoregressive"
    timer = StageTimer()
    model.predict_action(images, instructions, proprio, timer=timer)
    assert "trajectory" in timer.result() and "flow" not in timer.result()


def test_flow_steps_step_changes_the_steps_and_reloads_identical(tmp_path):
    model = _model("qwen3")
    images, instructions, proprio = observations(model.config)
    before = model.predict_action(images, instructions, proprio, seed=3)
    apply(model, [{"flow_steps": {"n": 2}}])
    assert model.head.cfg.steps == 2 and model.config.recipe == [{"flow_steps": {"n": 2, "version": 1}}]
    fewer = model.predict_action(images, instructions, proprio, seed=3)
    assert not torch.allclose(fewer, before)
    model.save_pretrained(tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert loaded.head.cfg.steps == 2
    assert torch.equal(loaded.predict_action(images, instructions, proprio, seed=3), fewer)


def test_flow_steps_errors_name_the_head_and_value():
    l1 = VLA(VLAConfig.tiny(head="l1"))
    with pytest.raises(ValueError, match="head is 'l1'"):
        apply(l1, [{"flow_steps": {"n": 4}}])
    diffusion = VLA(VLAConfig.tiny(head="diffusion"))  # train_timesteps=20
    with pytest.raises(ValueError, match="n=50 exceeds"):
        apply(diffusion, [{"flow_steps": {"n": 50}}])
    apply(diffusion, [{"flow_steps": {"n": 2}}])
    assert diffusion.head.cfg.steps == 2
    with pytest.raises(ValueError, match="n=0"):
        apply(_model(), [{"flow_steps": {"n": 0}}])


def test_expert_options_are_validated_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match=r"unknown flow head parameter\(s\) \['reasoning_tokens'\]; expected a subset "
                                         r"of \['hidden_dim', 'num_blocks', 'steps'\]"):
        head_config("flow", reasoning_tokens=5)
    with pytest.raises(ValueError, match="integrator='rk4'"):
        head_config("expert", integrator="rk4")
    cfg = VLAConfig.tiny(head="expert")
    cfg.head = dataclasses.replace(cfg.head, kv_layers="later", reasoning_tokens=7, temperature=0.5)
    cfg.save(tmp_path / "c.yaml")
    assert VLAConfig.load(tmp_path / "c.yaml") == cfg
