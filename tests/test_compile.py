"""The compile step: compiled == eager for every head, pruner and int8; no recompiles for repeated
shapes (counted); recorded, saved, loaded and re-compiled to the same actions; prompts tokenized once.

The matrix runs on torch.compile's `aot_eager` backend (dynamo's graph capture and AOT autograd's
functionalized graph, without code generation: seconds, not a minute per graph on CPU); one test
compiles with inductor, the backend users get by default."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import observations

import vlaopt.model.processor as processor_module
from vlaopt import VLA, VLAConfig, apply, load
from vlaopt.optimize.compile.step import CompileConfig, CompiledNetwork

HEADS = ["l1", "discrete", "diffusion", "flow", "expert"]
PRUNERS = {
    "fastv": {"method": "fastv", "layer": 1, "keep": 0.5},
    "pooling": {"method": "pooling", "keep": 0.25},
    "divprune": {"method": "divprune", "keep": 0.5},
    "random": {"method": "random", "keep": 0.5},
    "lightvla": {"method": "lightvla"},
    "lightvla-fixed": {"method": "lightvla", "keep": 0.25},
}
AOT = {"compile": {"backend": "aot_eager"}}


def _model(head: str = "l1", recipe: list | None = None) -> VLA:
    model = VLA(VLAConfig.tiny(head=head, cameras=2, proprio_dim=3)).eval()
    return apply(model, recipe) if recipe else model


def _compiled_twin(model: VLA, compile_step: dict) -> VLA:
    return apply(copy.deepcopy(model), [compile_step])


def _assert_same_actions(eager: VLA, compiled: VLA, batch: int, atol: float) -> None:
    obs = observations(eager.config, batch)
    torch.testing.assert_close(compiled.predict_action(*obs, seed=3), eager.predict_action(*obs, seed=3),
                               atol=atol, rtol=0)


@pytest.mark.parametrize("head", HEADS)
def test_compiled_equals_eager_for_every_head_and_does_not_recompile(head):
    eager = _model(head)
    compiled = _compiled_twin(eager, AOT)
    _assert_same_actions(eager, compiled, batch=2, atol=1e-5)
    graphs = compiled.runner.compiles
    assert graphs >= 1
    _assert_same_actions(eager, compiled, batch=2, atol=1e-5)  # other images, same shapes
    _assert_same_actions(eager, compiled, batch=2, atol=1e-5)
    assert compiled.runner.compiles == graphs and compiled.runner.recompiled_calls == 0
    assert compiled.runner.calls == 3


@pytest.mark.parametrize("method", sorted(PRUNERS))
def test_compiled_equals_eager_for_every_pruner(method):
    eager = _model("l1", [{"token_pruning": PRUNERS[method]}])
    compiled = _compiled_twin(eager, AOT)
    _assert_same_actions(eager, compiled, batch=3, atol=1e-5)
    # top-k pruners keep a count known in advance: one graph; LightVLA's votes decide the count
    assert (compiled.runner.compiles == 1) == (method != "lightvla")


@pytest.mark.parametrize("quantize", [{"method": "int8"}, {"method": "int4", "group_size": 32}])
def test_compiled_equals_eager_with_quantized_weights(quantize):
    """Dynamic int8 and int4 run (their packed weights are opaque to dynamo: the graph breaks at each
    quantized linear)."""
    eager = _model("l1", [{"quantize": quantize}])
    compiled = _compiled_twin(eager, AOT)
    _assert_same_actions(eager, compiled, batch=2, atol=1e-5)
    assert compiled.runner.compiles > 1


def test_a_new_shape_is_a_counted_recompile():
    compiled = _model("l1", [AOT])
    cfg = compiled.config
    compiled.predict_action(*observations(cfg, 2))
    first = compiled.runner.compiles
    compiled.predict_action(*observations(cfg, 1))  # another batch size: static shapes compile anew
    assert compiled.runner.compiles > first
    assert compiled.runner.stats()["recompiled_calls"] == 1


def test_prompts_padded_to_a_multiple_share_a_graph_and_keep_the_actions():
    """Instructions of different lengths within one multiple of 64 tokens replay one graph; padding is
    masked, so actions equal the eager model's (which pads nothing); without padding, each recompiles."""
    eager = _model("l1")
    images, _, proprio = observations(eager.config, 1)
    bucketed = _compiled_twin(eager, {"compile": {"backend": "aot_eager", "prompt_multiple": 64}})
    exact = _compiled_twin(eager, {"compile": {"backend": "aot_eager", "prompt_multiple": 1}})
    lengths = set()
    for text in ["open it", "close the drawer", "push the button"]:
        ids, _ = bucketed.processor.prompt_ids([text])
        lengths.add(ids.shape[1])
        for compiled in (bucketed, exact):
            torch.testing.assert_close(compiled.predict_action(images, [text], proprio),
                                       eager.predict_action(images, [text], proprio), atol=1e-5, rtol=0)
    assert lengths == {64}
    assert bucketed.runner.compiles == 1 and bucketed.runner.recompiled_calls == 0
    assert exact.runner.recompiled_calls == 2


def test_inductor_compiles_the_whole_network_in_one_graph():
    eager = _model("l1", [{"token_pruning": PRUNERS["pooling"]}])
    compiled = _compiled_twin(eager, {"compile": {}})  # defaults: inductor, static shapes
    _assert_same_actions(eager, compiled, batch=2, atol=1e-4)
    assert compiled.runner.compiles == 1 and compiled.runner.first_call_s > 0
    _assert_same_actions(eager, compiled, batch=2, atol=1e-4)
    assert compiled.runner.compiles == 1


def test_a_compiled_model_saves_loads_and_recompiles_to_the_same_actions(tmp_path):
    model = _model("flow", [{"token_pruning": PRUNERS["random"]}, AOT])
    obs = observations(model.config, 2)
    before = model.predict_action(*obs, seed=1)
    model.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    assert isinstance(loaded.runner, CompiledNetwork) and loaded.runner.calls == 0
    assert loaded.config.recipe[-1] == {"compile": {**dataclasses.asdict(CompileConfig(backend="aot_eager")),
                                                    "version": 1}}
    torch.testing.assert_close(loaded.predict_action(*obs, seed=1), before, atol=0, rtol=0)
    assert loaded.runner.compiles >= 1


def test_a_copy_of_a_compiled_model_compiles_its_own_graph():
    model = _model("l1", [AOT])
    obs = observations(model.config, 1)
    model.predict_action(*obs)
    twin = copy.deepcopy(model)
    assert twin.runner.model is twin and twin.runner.calls == 0
    torch.testing.assert_close(twin.predict_action(*obs), model.predict_action(*obs), atol=0, rtol=0)


def test_steps_after_compile_and_bad_options_are_refused():
    model = _model("l1", [AOT])
    with pytest.raises(ValueError, match=r"^recipe step quantize comes after compile, which must be the last step"):
        apply(model, [{"quantize": {"method": "int8"}}])
    assert len(model.config.recipe) == 1
    with pytest.raises(ValueError, match=r"^compile backend='nope' is not a torch.compile backend; expected one of .*inductor"):
        CompileConfig(backend="nope")
    with pytest.raises(ValueError, match=r"^compile mode='fast'; expected one of default, reduce-overhead"):
        CompileConfig(mode="fast")
    with pytest.raises(ValueError, match=r"^compile mode='max-autotune' is an inductor mode, but backend='eager'"):
        CompileConfig(backend="eager", mode="max-autotune")
    with pytest.raises(ValueError, match=r"^compile prompt_multiple=0 must be a positive integer \(1: no padding\)"):
        CompileConfig(prompt_multiple=0)
    with pytest.raises(ValueError, match=r"^compile: unknown parameter\(s\) \['graphs'\]"):
        apply(_model(), [{"compile": {"graphs": 1}}])


def test_prompts_are_tokenized_once_per_instruction(monkeypatch):
    model = _model()
    processor = model.processor
    calls = []
    tokenize = processor.tokenizer.__call__

    class Counting:
        def __call__(self, text, **kwargs):
            calls.append(text)
            return tokenize(text, **kwargs)

    fresh_ids, fresh_valid = processor.prompt_ids(["open the drawer", "push it"])
    monkeypatch.setattr(processor, "tokenizer", Counting())
    processor._prompt_cache.clear()
    for _ in range(3):
        ids, valid = processor.prompt_ids(["open the drawer", "push it", "open the drawer"])
    assert len(calls) == 2
    assert torch.equal(ids[:2], fresh_ids) and torch.equal(valid[:2], fresh_valid)
    monkeypatch.setattr(processor_module, "PROMPT_CACHE_SIZE", 2)
    processor.prompt_ids(["a third one"])
    assert list(processor._prompt_cache) == ["open the drawer", "a third one"]  # least recently used dropped
