"""Int8 quantization (`quantize`), and composite recipes with token and depth pruning."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import observations
from safetensors.torch import load_file

from vlaopt import VLA, VLAConfig, apply, load
from vlaopt.model.checkpoint import weight_size
from vlaopt.optimize import rebuild
from vlaopt.optimize.quant import Int8Linear
from vlaopt.optimize.quant.int8 import REDUCE_RANGE, has_vnni


def _model(lm: str = "llama", head: str = "l1") -> VLA:
    return VLA(VLAConfig.tiny(lm=lm, head=head, cameras=2, proprio_dim=3)).eval()


@pytest.mark.parametrize("lm", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("head", ["l1", "flow"])
@pytest.mark.parametrize("weight_only", [False, True])
def test_int8_actions_stay_close_to_fp32(lm, head, weight_only):
    """Tolerance, in normalized action units (actions span [-1, 1]): mean |error| < 0.03 and max
    |error| < 0.1. Per-channel int8 weights round each weight by at most half a step (max|w| / 254)
    and dynamic per-token activations by range / 510, about 1% of a hidden state's RMS; through the
    LM and a continuous head this measured 0.004-0.02 mean and up to 0.07 max on these tiny models.
    The bounds hold that with ~50% margin. Discrete (a bin argmax) and diffusion (DDIM clipping)
    heads turn such small changes into occasional whole-bin jumps, so they are not held to it."""
    model = _model(lm, head)
    images, instructions, proprio = observations(model.config)
    noise = torch.randn(3, model.config.chunk, model.config.action_dim, generator=torch.Generator().manual_seed(0))
    fp32 = model.predict_action(images, instructions, proprio, noise=noise)
    apply(model, [{"quantize": {"method": "int8", "weight_only": weight_only}}])
    int8 = model.predict_action(images, instructions, proprio, noise=noise)
    err = (int8 - fp32).abs()
    step = 2 if REDUCE_RANGE and not weight_only else 1  # 7-bit activations: twice the rounding step
    assert err.mean() < 0.03 * step and err.max() < 0.1 * step, (err.mean().item(), err.max().item())


def _quantized_per_tensor(x: torch.Tensor) -> torch.Tensor:
    """`x` (float32) rounded as torch's dynamic kernel rounds its input: one asymmetric scale and zero
    point for the tensor, 8 bits or 7, and round(x * (1 / scale) + zero) in float32, which at a tie
    can differ by a step from rounding x / scale in float64."""
    qmax = 127 if REDUCE_RANGE else 255
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = torch.tensor((hi - lo) / qmax, dtype=torch.float32)
    zero = min(max(round(-lo / scale.item()), 0), qmax)
    return (torch.clamp(torch.round(x * (1 / scale) + zero), 0, qmax) - zero).double() * scale.double()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
def test_the_dynamic_int8_product_is_the_exact_product_of_the_quantized_operands(bias, per_token):
    """The kernel's output equals (dequantized activations) x (dequantized weights) computed in
    float64: activations quantized per tensor as torch does (asymmetric, 8 or 7 bits), or, per token,
    each row divided by its max |x| first and its output multiplied back. No int16 saturation on CPUs
    without VNNI (where it was off by 13.6 in 73 with 8 bits)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=bias)
    layer = Int8Linear.from_linear(linear, weight_only=False, per_token=per_token)
    x = torch.randn(7, 128) * 2 + 0.3
    x[3] *= 40  # an outlier token, which per tensor sets everyone's rounding step
    rows = x.abs().amax(1, keepdim=True) if per_token else torch.ones(7, 1)
    expected = (_quantized_per_tensor(x / rows) @ layer.dequantized().double().T) * rows.double()
    if bias:
        expected = expected + linear.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-4, rtol=1e-5)


def test_per_token_scales_keep_the_small_tokens_beside_an_outlier():
    """With one token 40x larger than the rest, per-token scales leave the other tokens' products at
    least 10x closer to float than one scale for the whole input does."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96)
    x = torch.randn(7, 128)
    x[3] *= 40
    exact = linear(x).detach()
    errors = {}
    for per_token in (False, True):
        layer = Int8Linear.from_linear(linear, weight_only=False, per_token=per_token)
        errors[per_token] = (layer(x) - exact)[[0, 1, 2, 4, 5, 6]].abs().mean().item()
    assert errors[True] * 10 < errors[False], errors


def test_vnni_is_read_from_the_cpu_flags():
    assert has_vnni("flags : fpu sse avx2 avx512f avx512_vnni") and has_vnni("flags : avx2 avx_vnni")
    assert not has_vnni("flags : fpu sse avx2 fma")


def test_int8_modules_hold_int8_weights_and_reload_bit_identically(tmp_path):
    model = _model("qwen2")
    images, instructions, proprio = observations(model.config)
    linears = [n for n, m in model.lm.decoder.layers.named_modules() if isinstance(m, torch.nn.Linear)]
    layer_weights = sum(m.weight.numel() for n, m in model.lm.decoder.layers.named_modules() if n in linears)
    elements, size = weight_size(model)
    apply(model, [{"quantize": {"method": "int8"}}])
    # int8 weights are buffers: still counted as weights, at one byte instead of four (plus row scales)
    after_elements, after_size = weight_size(model)
    assert after_elements - elements == sum(m.weight.shape[0] for n, m in model.lm.decoder.layers.named_modules()
                                            if isinstance(m, Int8Linear))
    assert size - after_size == 3 * layer_weights - 4 * (after_elements - elements)
    quantized = {n: m for n, m in model.lm.decoder.layers.named_modules() if isinstance(m, Int8Linear)}
    assert sorted(quantized) == sorted(linears) and len(linears) == 2 * 7
    assert not any(isinstance(m, torch.nn.Linear) for m in model.lm.decoder.layers.modules())
    actions = model.predict_action(images, instructions, proprio)
    model.save_pretrained(tmp_path / "m")
    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert stored["lm.causal_lm.model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
    loaded = load(tmp_path / "m")
    for name, module in loaded.lm.decoder.layers.named_modules():
        if name in quantized:
            assert isinstance(module, Int8Linear) and torch.equal(module.weight, quantized[name].weight)
    assert torch.equal(loaded.predict_action(images, instructions, proprio), actions)
    assert torch.equal(copy.deepcopy(loaded).predict_action(images, instructions, proprio), actions)


def test_an_int8_record_written_before_per_token_scales_rebuilds_per_tensor():
    """A recorded quantize step without `activations` (written before it existed, when every int8
    model had one scale per tensor) rebuilds per tensor; a current record rebuilds as it says."""
    recorded = apply(_model(), [{"quantize": {"method": "int8"}}]).config.recipe
    for activations, per_token in (("token", True), (None, False)):
        entry = copy.deepcopy(recorded)
        if activations is None:
            del entry[0]["quantize"]["activations"]
        fresh = _model()
        rebuild(fresh, entry)
        flags = {m.per_token for m in fresh.modules() if isinstance(m, Int8Linear)}
        assert flags == {per_token}, activations


def test_weight_only_int8_is_the_dequantized_linear():
    linear = torch.nn.Linear(64, 32)
    q = Int8Linear.from_linear(linear, weight_only=True)
    x = torch.randn(5, 64)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.dequantized(), linear.bias), atol=1e-6, rtol=0)
    step = linear.weight.abs().amax(1, keepdim=True) / 127
    assert ((q.dequantized() - linear.weight).abs() <= step / 2 + 1e-7).all()


def test_dynamic_int8_refuses_gpu_inputs_by_name():
    q = Int8Linear.from_linear(torch.nn.Linear(8, 4), weight_only=False)
    with pytest.raises(RuntimeError, match="dynamic int8 runs on CPU only.*weight_only: true"):
        q(torch.randn(2, 8, device="meta"))


@pytest.mark.parametrize(
    "recipe",
    [
        [
            {"token_pruning": {"method": "fastv", "layer": 1, "keep": 0.5}},
            {"layer_pruning": {"method": "shortgpt", "n": 1, "calibration": {"source": "random", "samples": 4}}},
            {
                "weight_pruning": {
                    "method": "wanda",
                    "pattern": "2:4",
                    "calibration": {"source": "random", "samples": 4},
                }
            },
            {"quantize": {"method": "int8"}},
        ],
        [
            {"quantize": {"method": "int8"}},
            {"layer_pruning": {"method": "gate_norm", "n": 2}},
            {"token_pruning": {"method": "pooling", "layer": 0, "keep": 0.25}},
            {"layer_pruning": {"method": "attention_drop", "n": 1, "calibration": {"source": "random", "samples": 4}}},
        ],
    ],
    ids=["tokens-depth-sparsity-int8", "int8-gatenorm-tokens-attentiondrop"],
)
def test_composite_recipes_run_in_any_order_and_reload_identically(tmp_path, recipe):
    cfg = VLAConfig.tiny(lm="qwen2", cameras=2, proprio_dim=3)
    cfg.lm.hf_config["num_hidden_layers"] = 4
    model = VLA(cfg).eval()
    images, instructions, proprio = observations(cfg)
    apply(model, recipe)
    actions = model.predict_action(images, instructions, proprio)
    assert torch.isfinite(actions).all()
    model.save_pretrained(tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert torch.equal(loaded.predict_action(images, instructions, proprio), actions)
    assert loaded.config.to_dict() == model.config.to_dict()
    assert str(loaded) == str(model)  # the same modules, in the same places


def test_weight_pruning_after_quantize_is_refused_by_name():
    model = _model()
    apply(model, [{"quantize": {"method": "int8"}}])
    with pytest.raises(ValueError, match="matches no Linear module"):
        apply(model, [{"weight_pruning": {"method": "magnitude"}}])
    with pytest.raises(KeyError, match="unknown quantization method 'int2'; expected one of int4, int8"):
        apply(model, [{"quantize": {"method": "int2"}}])
