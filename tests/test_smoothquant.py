"""SmoothQuant (`smoothquant`): the authors' smoothing re-typed over a plain transformers model gives
our weights, the smoothed model computes what it did, and bad settings are refused by name."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import observations

from vlaopt import VLA, VLAConfig, apply, load
from vlaopt.optimize.quant.smoothquant import smoothing_scales


def _model(lm: str) -> VLA:
    model = VLA(VLAConfig.tiny(lm=lm, cameras=1, proprio_dim=3)).eval()
    with torch.no_grad():  # outlier channels, as real LMs have, so that smoothing has something to move
        for layer in model.lm.decoder.layers:
            layer.input_layernorm.weight[3] = 30.0
            layer.post_attention_layernorm.weight[5] = 20.0
    return model


def _ids(batches: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 400, (2, 20), generator=g) for _ in range(batches)]


def _smoothquant_reference(hf: torch.nn.Module, ids: list[torch.Tensor], alpha: float) -> None:
    """The authors' procedure, re-typed: the max |x| of every linear's input channels over one pass of
    the original model on the calibration tokens, then, for each decoder layer, s = max|X|^alpha /
    max|W|^(1 - alpha) over q/k/v (the input of q_proj) and over gate/up (the input of gate_proj),
    both floored at 1e-5, divided out of the norm's weight and multiplied into the linears' columns."""
    act: dict[str, torch.Tensor] = {}

    def record(module, args, output, name):
        x = args[0].reshape(-1, args[0].shape[-1]).abs().amax(0).float()
        act[name] = torch.maximum(act[name], x) if name in act else x

    hooks = [m.register_forward_hook(functools.partial(record, name=n))
             for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for batch in ids:
            hf(batch)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            for norm, fcs, first in ((layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                              layer.self_attn.v_proj], "self_attn.q_proj"),
                                     (layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj],
                                      "mlp.gate_proj")):
                weight_max = torch.cat([fc.weight.abs().max(dim=0, keepdim=True)[0] for fc in fcs]).max(0)[0]
                scales = (act[f"model.layers.{i}.{first}"].pow(alpha) / weight_max.clamp(min=1e-5).pow(1 - alpha))
                scales = scales.clamp(min=1e-5)
                norm.weight.div_(scales)
                for fc in fcs:
                    fc.weight.mul_(scales.view(1, -1))


@pytest.mark.parametrize("lm", ["llama", "qwen3"])
def test_smoothing_equals_the_authors_procedure_and_keeps_the_function(lm):
    model = _model(lm)
    ids = _ids()
    reference = copy.deepcopy(model.lm.causal_lm)
    original = {n: p.detach().clone() for n, p in reference.named_parameters()}
    with torch.no_grad():
        before = model.lm.text_logits(torch.cat(ids))
    apply(model, [{"smoothquant": {"alpha": 0.7, "calibration": {"samples": 4}}}], calibration=ids)
    _smoothquant_reference(reference, ids, 0.7)
    ours = dict(model.lm.causal_lm.named_parameters())
    changed = 0
    for name, p in reference.named_parameters():
        torch.testing.assert_close(ours[name], p, atol=1e-6, rtol=1e-5, msg=name)
        changed += not torch.equal(p, original[name])
    assert changed == 2 * 7  # in each of the 2 layers: 2 norms and the 5 linears they feed
    with torch.no_grad():
        torch.testing.assert_close(model.lm.text_logits(torch.cat(ids)), before, atol=1e-4, rtol=1e-4)


def test_smoothing_then_int8_is_closer_to_float_than_int8_alone_on_outlier_channels():
    model = _model("llama")
    ids = _ids()
    with torch.no_grad():
        exact = model.lm.text_logits(torch.cat(ids))
    errors = {}
    smooth = {"smoothquant": {"alpha": 0.5, "calibration": {"samples": 4}}}
    for name, recipe in {"int8": [], "smoothquant + int8": [smooth]}.items():
        q = apply(copy.deepcopy(model), [*recipe, {"quantize": {"method": "int8"}}], calibration=ids)
        with torch.no_grad():
            errors[name] = (q.lm.text_logits(torch.cat(ids)) - exact).abs().mean().item()
    assert errors["smoothquant + int8"] < 0.7 * errors["int8"], errors


def test_scales_follow_the_formula_at_the_ends_of_alpha():
    act, w = torch.tensor([4.0, 0.5, 0.0]), torch.tensor([[2.0, -8.0, 1.0], [-1.0, 2.0, 0.0]])
    torch.testing.assert_close(smoothing_scales(act, [w], 1.0), torch.tensor([4.0, 0.5, 1e-5]))
    torch.testing.assert_close(smoothing_scales(act, [w], 0.0), torch.tensor([0.5, 0.125, 1.0]))


def test_a_smoothed_and_quantized_model_reloads_to_the_same_actions(tmp_path):
    model = _model("qwen2")
    recipe = [{"smoothquant": {"alpha": 0.5, "calibration": {"source": "random", "samples": 4}}},
              {"quantize": {"method": "int8"}}]
    apply(model, recipe)
    assert model.config.recipe[0]["smoothquant"]["calibration"]["source"] == "random"
    obs = observations(model.config, 2)
    with torch.no_grad():
        actions = model.predict_action(*obs)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(load(tmp_path).predict_action(*obs), actions)


@pytest.mark.parametrize(("params", "message"), [
    ({"alpha": 1.5}, r"^smoothquant alpha=1.5 must be a number in \[0, 1\]$"),
    ({"alpha": True}, r"^smoothquant alpha=True must be a number in \[0, 1\]$"),
    ({"beta": 1}, r"^smoothquant: unknown parameter\(s\) \['beta'\]"),
    ({}, r"^smoothquant needs calibration data"),
])
def test_bad_smoothquant_settings_are_refused_by_name(params, message):
    with pytest.raises(ValueError, match=message):
        apply(_model("llama"), [{"smoothquant": params}])


def test_smoothquant_after_int8_is_refused():
    model = apply(_model("llama"), [{"quantize": {"method": "int8"}}])
    with pytest.raises(ValueError, match=r"^smoothquant needs float nn.Linear layers, but decoder layer 0's q_proj, "
                                         r"k_proj, v_proj is Int8Linear; smooth before quantize$"):
        apply(model, [{"smoothquant": {"calibration": {"source": "random", "samples": 2}}}])
