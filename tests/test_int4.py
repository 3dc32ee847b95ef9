"""Int4 weight-only quantization (`quantize: {method: int4}`): torchao's tinygemm rule, the kernel's
product, save/load, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import observations
from torch import nn

from vlaopt import VLA, VLAConfig, apply, load
from vlaopt.optimize.quant.int4 import Int4Linear, int4_qparams, unpack_nibbles


def _model() -> VLA:
    return VLA(VLAConfig.tiny(lm="llama", head="l1", cameras=2, proprio_dim=3)).eval()


def _torchao_tinygemm(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Re-typed from torchao (quantization/utils.py `groupwise_affine_quantize_tensor` with its default
    bfloat16 qparams, over quant_primitives.py `_choose_qparams_affine_tinygemm` and
    `_quantize_affine_tinygemm_no_dtype_cast`: asymmetric, quant_min 0, quant_max 15, eps 1e-6): the
    codes, scales and zeros of each (1, group_size) block."""
    quant_min, quant_max = 0, 15
    blocks = w.view(w.shape[0], -1, group_size)
    min_val, max_val = torch.amin(blocks, dim=-1), torch.amax(blocks, dim=-1)
    scale = torch.clamp((max_val - min_val) / float(quant_max - quant_min), min=1e-6)
    mid_point = (quant_max + quant_min + 1) / 2
    zero_point = min_val + scale * mid_point
    scale, zero_point = scale.to(torch.bfloat16), zero_point.to(torch.bfloat16)
    low = (zero_point - scale * mid_point)[..., None]
    quant = torch.clamp(torch.round((blocks - low) / scale[..., None]), quant_min, quant_max)
    return quant.view(w.shape).to(torch.int32), scale, zero_point


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_codes_scales_and_zeros_follow_torchao_tinygemm_rule(group_size):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(group_size)) * 0.05
    w[3, :group_size] = 0.25  # a constant group: scale at its floor
    codes, scale, zero = int4_qparams(w, group_size)
    ref_codes, ref_scale, ref_zero = _torchao_tinygemm(w, group_size)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)
    linear = nn.Linear(256, 48, bias=False)
    linear.weight.data = w
    module = Int4Linear.from_linear(linear, group_size)
    assert torch.equal(unpack_nibbles(module.weight), codes)  # packing is lossless
    # torchao's tinygemm dequantization: (code - mid_point) * scale + zero
    ref_scale, ref_zero = ref_scale.float()[..., None], ref_zero.float()[..., None]
    ref = ((ref_codes.view(48, -1, group_size) - 8).float() * ref_scale + ref_zero).view(48, 256)
    assert torch.equal(module.dequantized(), ref)
    # at most half a step off, plus what rounding the scale and zero to bfloat16 moves the grid
    assert (module.dequantized() - w).abs().max() <= scale.float().max() * (0.5 + 8 / 128) + 1e-3


@pytest.mark.parametrize("bias", [False, True])
def test_the_int4_product_is_the_bfloat16_product_of_the_dequantized_weight(bias):
    """The kernel's output equals activations rounded to bfloat16 times the weight the codes stand
    for, up to bfloat16 output rounding and accumulation order; and it is far from a product with
    the codes misread."""
    gen = torch.Generator().manual_seed(1)
    linear = nn.Linear(128, 64, bias=bias)
    module = Int4Linear.from_linear(linear, 32)
    x = torch.randn(2, 5, 128, generator=gen)
    y = module(x)
    codes = unpack_nibbles(module.weight).float().view(64, -1, 32)
    scale, zero = module.scale.float(), module.zero.float()
    w = ((codes - 8) * scale[..., None] + zero[..., None]).view(64, 128)
    ref = F.linear(x.bfloat16().float(), w, linear.bias)
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert (y - ref).abs().max() < 0.02 * ref.abs().max()
    swapped = ((codes.flip(-1) - 8) * scale[..., None] + zero[..., None]).view(64, 128)
    assert (F.linear(x, swapped, linear.bias) - ref).abs().max() > 0.1 * ref.abs().max()


def test_int4_acts_as_its_dequantized_weights_and_saves_and_reloads_identically(tmp_path):
    """The int4 policy's actions are those of the float policy holding the weights the codes stand
    for, up to bfloat16 activations: measured 0.004 mean / 0.013 max in normalized units, against
    0.075 mean for what 4-bit rounding itself moves on this random-weight model; the bounds keep
    that gap with margin. The saved codes, scales and zeros rebuild the same modules and actions."""
    model = _model()
    obs = observations(model.config)
    fp32 = model.predict_action(*obs)
    dequantized = copy.deepcopy(model)
    apply(model, [{"quantize": {"method": "int4", "group_size": 32}}])
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert len(quantized) == 2 * 7  # 2 layers x 7 linears
    for name, module in quantized.items():
        dequantized.get_submodule(name).weight.data = module.dequantized()
    int4 = model.predict_action(*obs)
    kernel_err = (int4 - dequantized.predict_action(*obs)).abs()
    assert kernel_err.mean() < 0.01 and kernel_err.max() < 0.03, (kernel_err.mean().item(), kernel_err.max().item())
    assert (int4 - fp32).abs().mean() > 4 * kernel_err.mean()  # the check above can see a rounding error
    model.save_pretrained(tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert torch.equal(loaded.predict_action(*obs), int4)
    assert str(loaded) == str(model)
    assert model.config.recipe[-1]["quantize"]["group_size"] == 32


def test_int4_refusals_name_the_value():
    with pytest.raises(ValueError, match=r"quantize \(int4\) group_size=48 must be one of 32, 64, 128, 256"):
        apply(_model(), [{"quantize": {"method": "int4", "group_size": 48}}])
    model = _model()
    with pytest.raises(ValueError, match=r"quantize \(int4\): lm.causal_lm.model.layers.0.self_attn.q_proj has "
                                         r"in_features=64, which group_size=128 does not divide"):
        apply(model, [{"quantize": {"method": "int4", "group_size": 128}}])
    assert not any(isinstance(m, Int4Linear) for m in model.modules())  # nothing replaced before the refusal
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['activations'\]"):
        apply(_model(), [{"quantize": {"method": "int4", "activations": "token"}}])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's int4 kernel needs a GPU")
def test_int4_on_cuda_gives_the_cpu_product():
    linear = nn.Linear(576, 1536)
    module = Int4Linear.from_linear(linear, 64)
    x = torch.randn(7, 576)
    cpu = module(x)
    gpu = module.cuda()(x.cuda()).cpu()
    assert (gpu - cpu).abs().max() < 0.02 * cpu.abs().max()
