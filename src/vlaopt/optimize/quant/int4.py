"""Int4 weight-only linear layers: each output row's weights in groups of `group_size` input columns,
asymmetric 4-bit codes 0..15 with a float scale and a float zero per group, the layout of the
"tinygemm" kernels torch ships (`aten._weight_int4pack_mm` on CUDA, `_weight_int4pack_mm_for_cpu`
on CPU), which torchao's int4 weight-only configuration also runs.

The quantization rule is torchao's for that kernel (`groupwise_affine_quantize_tensor` in bfloat16:
zero point in the float domain, zero not necessarily representable): per group, scale =
(max - min) / 15 (at least 1e-6) and zero = min + 8 * scale, both rounded to bfloat16, which the
kernels read; a weight's code is round((w - low) / scale) clamped to 0..15 with low = zero - 8 *
scale (in bfloat16), and it stands for (code - 8) * scale + zero. The kernels take activations in
bfloat16 too, so the product is computed in bfloat16 and the output cast back to the input's
dtype. They read every weight once per call at a quarter of float32's bytes, which pays where the
product is memory-bound (a few tokens: decoding); for long prompts the bfloat16 kernel is slower
than float32 BLAS on the CPUs measured (docs/compression.md).

Codes are stored packed two per byte (column 2j in the high nibble, 2j + 1 in the low one, the
order CUDA's packing op takes), scales and zeros as bfloat16 values in the model's float dtype
(5 bits per weight at groups of 64 in float32), so the saved tensors are the same on every device;
the kernel's own packed form is a cache, rebuilt per device and when a tensor changes.
"""

from __future__ import annotations

import torch
from torch import nn

from vlaopt.optimize.weights.targets import replace_module, replace_with_empty

GROUP_SIZES = (32, 64, 128, 256)
"""The group sizes the tinygemm kernels accept."""


def int4_qparams(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (N, K) int32 in 0..15, and bfloat16 scales and zeros (N, K / group_size), of a float
    weight (N, K)."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    minimum, maximum = groups.amin(-1), groups.amax(-1)
    scale = ((maximum - minimum) / 15).clamp(min=1e-6)
    scale, zero = scale.to(torch.bfloat16), (minimum + scale * 8).to(torch.bfloat16)
    low = zero - scale * 8  # in bfloat16, as torchao's rule computes it
    codes = torch.clamp(torch.round((groups - low[..., None]) / scale[..., None]), 0, 15)
    return codes.reshape(n, k).to(torch.int32), scale, zero


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 as (N, K / 2) uint8: even columns in the high nibble."""
    return (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The (N, K) int32 codes of `pack_nibbles`' output."""
    data = packed.to(torch.int32)
    return torch.stack([data >> 4, data & 0x0F], dim=-1).reshape(packed.shape[0], -1)


def _inner_k_tiles(in_features: int) -> int:
    """The largest tile count CUDA's packing accepts for this reduction length (it needs K % (16 t) == 0)."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


class Int4Linear(nn.Module):
    """A linear layer with packed int4 weights (`weight`, uint8 (out, in / 2)) and per-group `scale`
    and `zero` (out, in / group_size)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, groups))  # bfloat16 values, held as the model's
        self.register_buffer("zero", torch.zeros(out_features, groups))  # float dtype (a model cast keeps them)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._packed: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # (key, weight, scales and zeros)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        """Quantize a float linear layer by the rule in the module docstring."""
        with torch.inference_mode(False), torch.no_grad():
            w = linear.weight.detach()
            module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size).to(w.device)
            codes, scale, zero = int4_qparams(w, group_size)
            module.weight.copy_(pack_nibbles(codes))
            module.scale.copy_(scale)
            module.zero.copy_(zero)
            if linear.bias is not None:
                module.bias.data = linear.bias.detach().clone()
        return module

    def dequantized(self) -> torch.Tensor:
        """The float32 weight the codes stand for."""
        codes = unpack_nibbles(self.weight).float().reshape(self.out_features, -1, self.group_size)
        scale, zero = self.scale.float()[..., None], self.zero.float()[..., None]
        return ((codes - 8) * scale + zero).reshape(self.out_features, -1)

    def _kernel_operands(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, *((t._version, t.data_ptr()) for t in (self.weight, self.scale, self.zero)))
        if self._packed is None or self._packed[0] != key:
            if device.type == "cpu":
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(self.weight), 1)
            elif device.type == "cuda":
                packed = torch.ops.aten._convert_weight_to_int4pack(self.weight, _inner_k_tiles(self.in_features))
            else:
                raise RuntimeError(f"int4 weights run on CPU or CUDA, but the input is on {device}")
            # (groups, N, 2): each group's scale and zero side by side, as the kernels read them
            scales_zeros = torch.stack([self.scale, self.zero], dim=-1).transpose(0, 1).contiguous()
            self._packed = (key, packed, scales_zeros.to(torch.bfloat16))
        return self._packed[1], self._packed[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _int4_product(self, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")


@torch.compiler.disable
def _int4_product(module: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    """The tinygemm product, run eagerly under torch.compile (the packed operands are a cache keyed by
    tensor addresses, as int8's prepacked weight: optimize/quant/int8.py)."""
    packed, scales_zeros = module._kernel_operands(x.device)
    flat = x.reshape(-1, module.in_features).to(torch.bfloat16).contiguous()
    if x.device.type == "cpu":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, module.group_size, scales_zeros)
    else:
        y = torch.ops.aten._weight_int4pack_mm(flat, packed, module.group_size, scales_zeros)
    y = y.to(x.dtype).reshape(*x.shape[:-1], module.out_features)
    return y if module.bias is None else y + module.bias


def check_int4_shape(name: str, linear: nn.Linear, group_size: int) -> None:
    """Refuse a layer whose shape the kernels cannot take, naming it."""
    if linear.in_features % group_size:
        raise ValueError(f"quantize (int4): {name} has in_features={linear.in_features}, which group_size="
                         f"{group_size} does not divide; choose a group size that does, or ignore the layer")
    if linear.out_features % 16:
        raise ValueError(f"quantize (int4): {name} has out_features={linear.out_features}; the int4 kernels need "
                         "a multiple of 16, so ignore the layer")


def quantize_int4(model: nn.Module, names: list[str], group_size: int) -> None:
    """Replace the `nn.Linear` modules called `names` by `Int4Linear` quantizations of them (every shape
    is checked before any layer is replaced)."""
    for name in names:
        check_int4_shape(name, model.get_submodule(name), group_size)
    for name in names:
        replace_module(model, name, Int4Linear.from_linear(model.get_submodule(name), group_size))


def empty_int4(model: nn.Module, names: list[str], group_size: int) -> None:
    """Put empty `Int4Linear` modules in place of the `nn.Linear` modules called `names` (for loading)."""
    replace_with_empty(model, names, lambda linear: Int4Linear(linear.in_features, linear.out_features,
                                                               linear.bias is not None, group_size))
