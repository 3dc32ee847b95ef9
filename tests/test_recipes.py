"""Recipes are validated before they change the model, stack on optimized models, and bad recipe
files are named with their line."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import observations

from vlaopt import VLA, VLAConfig, apply, load, load_recipe

METHODS = ["pooling", "fastv", "divprune", "random", "lightvla"]


def _model() -> VLA:
    return VLA(VLAConfig.tiny(cameras=2, proprio_dim=3)).eval()


def _step(method: str, layer: int) -> dict:
    params = {"method": method, "layer": layer}
    if method not in ("lightvla",):
        params["keep"] = 0.5
    return {"token_pruning": params}


@pytest.mark.parametrize(("first", "second"), list(itertools.product(METHODS, METHODS)))
def test_a_recipe_apply_accepts_runs(first, second):
    """Every pair of token-pruning steps at every pair of layers: `apply` either refuses it, naming
    the reason and leaving the model as it was, or the optimized model predicts."""
    obs = observations(VLAConfig.tiny(cameras=2, proprio_dim=3), batch=2)
    for a, b in itertools.product((0, 1), repeat=2):
        if (first == "fastv" and a == 0) or (second == "fastv" and b == 0):
            continue  # fastv reads the layer before it: refused by its own config
        model = _model()
        try:
            apply(model, [_step(first, a), _step(second, b)])
        except ValueError as error:
            assert "token_pruning" in str(error)
            assert len(model.lm.hooks) <= 1 and len(model.config.recipe) <= 1
            continue
        assert model.predict_action(*obs).shape == (2, model.config.chunk, model.config.action_dim), (first, a, second, b)


def test_two_pooling_steps_are_refused_with_the_reason():
    model = _model()
    with pytest.raises(ValueError, match=r"token_pruning pooling before decoder layer 0 needs each camera's full patch "
                                         r"grid, but the pooling step before layer 0 changes the visual segment first"):
        apply(model, [_step("pooling", 0), _step("pooling", 0)])


def test_pruning_before_pooling_is_refused_even_at_an_earlier_layer():
    model = apply(_model(), [_step("pooling", 1)])
    with pytest.raises(ValueError, match=r"pooling before decoder layer 1 needs .* but the random step before layer 0"):
        apply(model, [_step("random", 0)])
    assert len(model.lm.hooks) == 1


def test_fastv_after_another_pruner_at_its_layer_is_refused():
    with pytest.raises(ValueError, match=r"fastv before decoder layer 1 ranks the visual tokens the layer before it saw, "
                                         r"but the random step at the same layer changes them first"):
        apply(_model(), [_step("random", 1), _step("fastv", 1)])


def test_a_valid_recipe_stacks_on_a_saved_optimized_model(tmp_path):
    base = _model()
    base.save_pretrained(tmp_path / "base")
    pooled = apply(load(tmp_path / "base"), [_step("pooling", 0)])
    pooled.save_pretrained(tmp_path / "pooled")
    stacked = apply(load(tmp_path / "pooled"), [_step("fastv", 1), {"quantize": {"method": "int8"}}])
    at_once = apply(load(tmp_path / "base"),
                    [_step("pooling", 0), _step("fastv", 1), {"quantize": {"method": "int8"}}])
    obs = observations(base.config, batch=3)
    assert stacked.config.recipe == at_once.config.recipe
    assert torch.equal(stacked.predict_action(*obs), at_once.predict_action(*obs))


def test_a_malformed_recipe_file_is_named_with_its_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- token_pruning: {method: pooling, keep: 0.5}\n- quantize: {method: int8\n")
    with pytest.raises(ValueError, match=rf"recipe file {path} is not valid YAML at line 3, column 1: "):
        load_recipe(path)
    with pytest.raises(FileNotFoundError, match=rf"recipe file {tmp_path / 'none.yaml'} does not exist"):
        load_recipe(tmp_path / "none.yaml")


def test_a_malformed_config_file_is_named_with_its_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"cameras": 2,')
    with pytest.raises(ValueError, match=rf"config file {path} is not valid JSON \(truncated or damaged\?\) at line 1"):
        VLAConfig.load(path)
    path.write_text("")
    with pytest.raises(ValueError, match=rf"config file {path} is empty"):
        VLAConfig.load(path)


def test_recorded_steps_carry_a_format_version_and_old_records_still_load(tmp_path):
    model = apply(_model(), [_step("pooling", 0), {"quantize": {"method": "int8"}}])
    assert [next(iter(e.values()))["version"] for e in model.config.recipe] == [1, 1]
    obs = observations(model.config, batch=2)
    expected = model.predict_action(*obs)
    for entry in model.config.recipe:  # as saved before steps carried a version
        next(iter(entry.values())).pop("version")
    model.save_pretrained(tmp_path / "old")
    assert torch.equal(load(tmp_path / "old").predict_action(*obs), expected)
    next(iter(model.config.recipe[0].values()))["version"] = 2
    model.save_pretrained(tmp_path / "new")
    with pytest.raises(ValueError, match=r"recorded recipe step token_pruning has format version 2; this vla-opt reads "
                                         r"versions 1..1"):
        load(tmp_path / "new")


def test_only_vlaopt_load_replays_a_recipe(tmp_path):
    model = apply(_model(), [_step("pooling", 0)])
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"m holds an optimized model \(recipe: token_pruning\); load it with vlaopt.load"):
        VLA.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"VLA\(config\) builds an unoptimized model, but config.recipe lists 1 "
                                         r"step\(s\) \(token_pruning\)"):
        VLA(model.config)
    assert len(load(tmp_path / "m").lm.hooks) == 1


def test_flow_steps_validates_the_new_head_config():
    model = VLA(VLAConfig.tiny(head="diffusion", cameras=2, proprio_dim=3)).eval()  # train_timesteps 20
    with pytest.raises(ValueError, match="flow_steps n=30 exceeds the diffusion head's train_timesteps=20"):
        apply(model, [{"flow_steps": {"n": 30}}])
    apply(model, [{"flow_steps": {"n": 3}}])
    assert model.head.cfg is model.config.head and model.config.head.steps == 3


def test_typed_step_configs_apply_as_their_yaml_does():
    """`apply(model, [FastVConfig(...), Int8Config()])` (torchao style) records and predicts exactly
    what the same steps written as YAML entries do; every method has a config class of its own."""
    from vlaopt.optimize import STEPS
    from vlaopt.optimize.layers.attention_drop import AttentionDropConfig
    from vlaopt.optimize.quant.step import Int8Config
    from vlaopt.optimize.recipe import step_entry
    from vlaopt.optimize.tokens.fastv import FastVConfig
    from vlaopt.optimize.weights.wanda import WandaConfig

    calibration = [observations(VLAConfig.tiny(cameras=2, proprio_dim=3), batch=4, seed=s) for s in range(2)]
    typed = [FastVConfig(layer=1, keep=0.5), AttentionDropConfig(n=1, calibration={"samples": 8}),
             WandaConfig(pattern="2:4", calibration={"samples": 8}), Int8Config()]
    written = [{"token_pruning": {"method": "fastv", "layer": 1, "keep": 0.5}},
               {"layer_pruning": {"method": "attention_drop", "n": 1, "calibration": {"samples": 8}}},
               {"weight_pruning": {"method": "wanda", "pattern": "2:4", "calibration": {"samples": 8}}},
               {"quantize": {"method": "int8"}}]
    cfg = VLAConfig.tiny(cameras=2, proprio_dim=3)
    cfg.lm.hf_config["num_hidden_layers"] = 4  # room for an attention drop besides the layer FastV reads
    a = apply(VLA(cfg).eval(), typed, calibration=calibration)
    b = apply(VLA(cfg).eval(), written, calibration=calibration)
    obs = observations(a.config, batch=2)
    assert a.config.recipe == b.config.recipe
    assert torch.equal(a.predict_action(*obs), b.predict_action(*obs))
    configs = [c for kind in STEPS.names() for c in STEPS.get(kind).config_classes()]
    assert len(configs) == len(set(configs)) == 5 + 3 + 3 + 2 + 1 + 1 + 1 + 1 + 1 + 3  # pruners, layers, weights,
    # quantize (int8, int4), smoothquant, flow steps, compile, temporal reuse, speculative, kv (streaming, h2o, quant)
    for cls in configs:  # each default config names its own step and method
        entry = step_entry(cls()) if cls.__name__ != "FastVConfig" else step_entry(cls(layer=1))
        (kind, params), = entry.items()
        assert cls in STEPS.get(kind).config_classes()
    with pytest.raises(ValueError, match=r"Observation is not the config of a recipe step; expected one of "):
        from vlaopt.model.processor import Observation

        apply(_model(), [Observation(None, [])])
