"""Depth pruning (`layer_pruning`): shortgpt, attention_drop, gate_norm; calibration through our layer loop."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import observations
from transformers import AutoModelForCausalLM, DynamicCache

from vlaopt import VLA, VLAConfig, apply, load
from vlaopt.optimize.calibration import encode_observations, walk_layers
from vlaopt.optimize.layers.export import to_hf
from vlaopt.optimize.layers.gate_norm import coupling_norms
from vlaopt.optimize.layers.remove import MLPOnlyLayer, drop_attention, has_attention, remove_blocks

RANDOM = {"source": "random", "samples": 4}


def _model(lm: str = "qwen2", layers: int = 4) -> VLA:
    cfg = VLAConfig.tiny(lm=lm, cameras=2, proprio_dim=3)
    cfg.lm.hf_config["num_hidden_layers"] = layers
    return VLA(cfg).eval()


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _attention_structure(model: VLA) -> tuple[int, list[int], list[str] | None]:
    live = model.lm.causal_lm.config
    idx = [layer.self_attn.layer_idx for layer in model.lm.decoder.layers if has_attention(layer)]
    return live.num_hidden_layers, idx, getattr(live, "layer_types", None)


@pytest.mark.parametrize(
    ("method", "lm"),
    [("shortgpt", "qwen2"), ("attention_drop", "qwen2"), ("gate_norm", "qwen3"), ("gate_norm", "llama")],
)
def test_removed_units_are_gone_and_the_model_reloads_identically(tmp_path, method, lm):
    model = _model(lm)
    images, instructions, proprio = observations(model.config)
    before_params = _params(model)
    step = {"method": method, "n": 2}
    if method != "gate_norm":
        step["calibration"] = RANDOM
    apply(model, [{"layer_pruning": step}])
    resolved = model.config.recipe[0]["layer_pruning"]
    removed = resolved["removed"]
    assert len(removed) == 2 and len(resolved["scores"]) == 4

    layers = model.lm.decoder.layers
    if method == "shortgpt":
        assert len(layers) == 2
        removed_params = 2 * _params(_model(lm).lm.decoder.layers[0])
    else:
        assert len(layers) == 4
        assert [isinstance(layer, MLPOnlyLayer) for layer in layers] == [i in removed for i in range(4)]
        fresh = _model(lm).lm.decoder.layers[0]
        removed_params = 2 * (_params(fresh.self_attn) + _params(fresh.input_layernorm))
    assert _params(model) == before_params - removed_params
    # no cache slot for a removed attention module: two remain, numbered 0 and 1
    assert _attention_structure(model)[:2] == (2, [0, 1])
    assert len(DynamicCache(config=model.lm.causal_lm.config).layers) == 2
    assert model.config.lm.hf_config["num_hidden_layers"] == 4  # the LM as built, for rebuild

    actions = model.predict_action(images, instructions, proprio)
    assert torch.isfinite(actions).all()
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["recipe"][0]["layer_pruning"]["removed"] == removed
    loaded = load(tmp_path / "m")
    assert torch.equal(loaded.predict_action(images, instructions, proprio), actions)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert _attention_structure(loaded) == _attention_structure(model)
    assert loaded.config.to_dict() == model.config.to_dict()


def test_gate_norm_ranks_without_data_or_any_forward_pass(monkeypatch):
    model = _model("qwen2")

    def forbidden(*args, **kwargs):
        raise AssertionError("gate_norm ran a forward pass")

    for module in model.modules():
        monkeypatch.setattr(module, "forward", forbidden)
    monkeypatch.setattr(model, "encode", forbidden)
    apply(model, [{"layer_pruning": {"method": "gate_norm", "n": 1}}])
    assert sum(isinstance(layer, MLPOnlyLayer) for layer in model.lm.decoder.layers) == 1


def test_gate_norm_is_the_query_key_coupling_norm_under_grouped_query_attention():
    attention = _model("llama").lm.decoder.layers[0].self_attn
    heads, kv, hd = 4, 2, 16  # VLAConfig.tiny: two query heads share each key head
    wq = attention.q_proj.weight.detach().double().reshape(heads, hd, -1)
    wk = attention.k_proj.weight.detach().double().reshape(kv, hd, -1)
    expected = torch.stack([torch.linalg.matrix_norm(wq[h].T @ wk[h // 2]) for h in range(heads)])
    torch.testing.assert_close(coupling_norms(attention), expected)


@pytest.mark.parametrize("lm", ["llama", "qwen3"])
def test_gate_norm_scores_move_only_when_the_attention_does(lm):
    """Rescalings that leave the attention unchanged leave the score unchanged: W_q * c with W_k / c
    everywhere, and, under Qwen3's per-head QK-norm, W_q * c alone (which cancels in the norm)."""
    model = _model(lm)
    attention = model.lm.decoder.layers[1].self_attn
    ids = torch.randint(3, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, logits = coupling_norms(attention), model.lm.text_logits(ids)
        attention.q_proj.weight.mul_(5.0)
        if lm == "llama":
            attention.k_proj.weight.div_(5.0)
        torch.testing.assert_close(model.lm.text_logits(ids), logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(coupling_norms(attention), before)
        attention.v_proj.weight.mul_(2.0)  # the output moves, the query-key score does not
        assert not torch.allclose(model.lm.text_logits(ids), logits, atol=1e-3)
        torch.testing.assert_close(coupling_norms(attention), before)


def test_walk_layers_feeds_each_layer_what_the_layer_loop_feeds_it():
    model = _model("qwen2")
    apply(model, [{"token_pruning": {"method": "fastv", "layer": 2, "keep": 0.5}}])
    images, instructions, proprio = observations(model.config)
    state = encode_observations(model, [(images, instructions, proprio)])[0]
    expected = model.lm(encode_observations(model, [(images, instructions, proprio)])[0])
    *_, (last, _, inputs) = walk_layers(model.lm, [state])  # exhausting the walk runs the last layer too
    final = model.lm.decoder.norm(inputs[0].state.hidden)
    assert last == 3 and inputs[0].state.hidden.shape[1] < state.layout.length  # the hook ran
    torch.testing.assert_close(final, expected.hidden, atol=1e-6, rtol=0)


def test_shortgpt_removes_the_blocks_of_lowest_block_influence():
    model = _model("qwen2")
    states = encode_observations(model, [observations(model.config, batch=4, seed=s) for s in range(2)])
    influence = {}
    for i, layer, inputs in walk_layers(model.lm, states):
        cos = [
            torch.nn.functional.cosine_similarity(x.state.hidden, x.run(layer), dim=-1)[x.state.valid] for x in inputs
        ]
        influence[i] = 1 - torch.cat(cos).mean().item()
    given = [observations(model.config, batch=4, seed=s) for s in range(2)]
    apply(model, [{"layer_pruning": {"method": "shortgpt", "n": 1, "calibration": {"samples": 8}}}], calibration=given)
    resolved = model.config.recipe[0]["layer_pruning"]
    assert resolved["calibration"]["source"] == "given"
    assert resolved["scores"] == pytest.approx([influence[i] for i in range(4)], abs=1e-6)
    assert resolved["removed"] == [min(influence, key=influence.get)]


@pytest.mark.parametrize(("removed", "hook_layer"), [([0], 1), ([1], 1), ([2], 2), ([3], 2), ([0, 1], 0)])
def test_block_removal_keeps_token_pruning_at_its_place_in_the_stream(removed, hook_layer):
    model = _model("qwen2")
    apply(model, [{"token_pruning": {"method": "pooling", "layer": 2, "keep": 0.25}}])
    remove_blocks(model, removed)  # the hook ran before old layer 2: it now runs before the first kept layer >= 2
    assert model.lm.hooks[0].layer == hook_layer
    assert torch.isfinite(model.predict_action(*observations(model.config))).all()


def test_block_removal_that_strands_a_token_pruning_hook_is_refused():
    model = _model("qwen2")
    apply(model, [{"token_pruning": {"method": "pooling", "layer": 2, "keep": 0.25}}])
    with pytest.raises(ValueError, match="leaves no layer after it"):
        remove_blocks(model, [2, 3])


def test_the_attention_fastv_reads_is_never_dropped():
    model = _model("qwen2")
    apply(model, [{"token_pruning": {"method": "fastv", "layer": 2, "keep": 0.5}}])  # reads layer 1's attention
    resolved = apply(model, [{"layer_pruning": {"method": "gate_norm", "n": 2}}]).config.recipe[-1]["layer_pruning"]
    assert resolved["scores"][1] is None and 1 not in resolved["removed"]  # not a candidate
    assert torch.isfinite(model.predict_action(*observations(model.config))).all()
    model = _model("qwen2")
    apply(model, [{"token_pruning": {"method": "fastv", "layer": 2, "keep": 0.5}}])
    with pytest.raises(ValueError, match="decoder layer 1 keeps its attention: the fastv hook after it ranks tokens"):
        drop_attention(model, [1])
    drop_attention(model, [0])
    with pytest.raises(ValueError, match=r"removing blocks \[1\] leaves decoder layer 0, whose attention was dropped, "
                                         "right before the fastv hook"):
        remove_blocks(model, [1])
    with pytest.raises(ValueError, match=r"removing blocks \[0, 1\] leaves no layer right before the fastv hook"):
        remove_blocks(model, [0, 1])
    assert model.lm.hooks[0].layer == 2 and len(model.lm.decoder.layers) == 4  # nothing changed
    with pytest.raises(ValueError, match="token_pruning fastv at layer=1 ranks tokens by the attention of decoder "
                                         "layer 0, which was dropped"):
        apply(model, [{"token_pruning": {"method": "fastv", "layer": 1}}])
    remove_blocks(model, [3])
    assert torch.isfinite(model.predict_action(*observations(model.config))).all()


def test_depth_pruning_errors_name_the_problem():
    model = _model("qwen2")
    with pytest.raises(ValueError, match="needs calibration data"):
        apply(model, [{"layer_pruning": {"method": "shortgpt", "n": 1}}])
    with pytest.raises(ValueError, match="n=4 must be below the 4 removable units"):
        apply(model, [{"layer_pruning": {"method": "gate_norm", "n": 4}}])
    with pytest.raises(KeyError, match="unknown layer pruning method 'shortgtp'"):
        apply(model, [{"layer_pruning": {"method": "shortgtp", "n": 1}}])
    with pytest.raises(ValueError, match="uses no data"):
        apply(model, [{"layer_pruning": {"method": "gate_norm", "n": 1, "calibration": RANDOM}}])
    with pytest.raises(ValueError, match="asks for 8 samples but only 3 were given"):
        apply(
            model,
            [{"layer_pruning": {"method": "attention_drop", "n": 1, "calibration": {"samples": 8}}}],
            calibration=[observations(model.config)],
        )
    assert model.config.recipe == []


@pytest.mark.parametrize("lm", ["llama", "qwen2", "qwen3"])
def test_a_layer_removed_lm_round_trips_through_plain_transformers(lm, tmp_path):
    """Blocks removed, one attention dropped and 2:4 weights: the exported directory loads strictly in
    transformers, whose own forward gives our layer loop's logits."""
    cfg = VLAConfig.tiny(lm=lm, cameras=2, proprio_dim=3)
    cfg.lm.hf_config["num_hidden_layers"] = 4
    model = apply(VLA(cfg).eval(), [
        {"layer_pruning": {"method": "shortgpt", "n": 1, "calibration": RANDOM}},
        {"layer_pruning": {"method": "attention_drop", "n": 1, "calibration": RANDOM}},
        {"weight_pruning": {"method": "wanda", "pattern": "2:4", "calibration": RANDOM}},
    ])
    assert len(model.lm.decoder.layers) == 3 and sum(map(has_attention, model.lm.decoder.layers)) == 2
    to_hf(model.lm).save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert loaded.config.num_hidden_layers == 3
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.lm.text_logits(ids), atol=1e-5, rtol=1e-5)


def test_an_int8_lm_is_refused_by_the_transformers_export():
    model = apply(VLA(VLAConfig.tiny()).eval(), [{"quantize": {"method": "int8"}}])
    with pytest.raises(ValueError, match=r"^decoder layer 0 holds weights a plain transformers layer has not"):
        to_hf(model.lm)
