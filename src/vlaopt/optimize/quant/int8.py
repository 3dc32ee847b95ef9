"""Int8 linear layers: symmetric per-output-channel int8 weights, kept as plain tensors (so they save
as safetensors), computed two ways.

- dynamic (default, CPU): activations are quantized on the fly and the product runs in int8 through
  torch's x86 quantized engine (`torch.ops.quantized.linear_dynamic`, fbgemm / oneDNN). Of the CPU
  int8 paths measured here it was the fastest (docs/compression.md). The kernel quantizes its input
  per tensor (one scale and zero point); with `per_token` (the default) each token's row is first
  divided by its max |x| and the output rows multiplied back, which gives every token its own scale
  through the same kernel. On SmolLM2-135M per tensor cost +96% perplexity, per token +2.5%: one
  token's outlier features no longer set every token's rounding step. The prepacked weight is a
  cache, rebuilt when the weight or scale tensors change (their version counters), e.g. after
  loading a checkpoint; the bias is added after the product. On x86 CPUs without VNNI the kernel
  adds pairs of u8 x s8 products in int16, which saturates for 8-bit activations (measured: an output off by 13.6
  in 73 on an AVX2 EPYC); there activations use 7 bits (`REDUCE_RANGE`, torch's own default for
  x86), which keeps the product exact.
- weight-only (`weight_only=True`, any device): the weight is stored in int8 and dequantized to the
  activations' dtype for each product; it saves weight memory, not time.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlaopt.optimize.weights.targets import replace_module, replace_with_empty


def has_vnni(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has VNNI int8 dot products (int32 accumulation, no int16 saturation)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return bool(flags & {"avx512_vnni", "avx_vnni", "avx512vnni", "avxvnni"})


REDUCE_RANGE = not has_vnni()
"""7-bit activations for the dynamic kernel where 8 bits would saturate (see the module docstring)."""


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (`weight`, int8 (out, in)) and per-row scales (`scale`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_only: bool,
                 per_token: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_only, self.per_token = weight_only, per_token
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._packed: tuple[tuple[tuple[int, int], ...], torch.ScriptObject] | None = None  # (key, packed)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_only: bool, per_token: bool = True) -> Int8Linear:
        """Quantize a float linear layer (round to nearest, scale = row max |w| / 127)."""
        with torch.inference_mode(False), torch.no_grad():  # normal tensors, whose version counter `_prepacked` reads
            w = linear.weight.detach().float()
            module = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_only,
                         per_token).to(w.device)
            scale = w.abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny) / 127
            module.weight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
            module.scale.copy_(scale)
            if linear.bias is not None:
                module.bias.data = linear.bias.detach().clone()
        return module

    def dequantized(self) -> torch.Tensor:
        """The float32 weight the int8 weight stands for."""
        return self.weight.float() * self.scale[:, None]

    def _prepacked(self) -> torch.ScriptObject:
        key = tuple((t._version, t.data_ptr()) for t in (self.weight, self.scale))
        if self._packed is None or self._packed[0] != key:
            zero = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():  # torch marks its quantized tensors deprecated (pytorch#184982)
                warnings.simplefilter("ignore")
                qweight = torch._make_per_channel_quantized_tensor(self.weight, self.scale.double(), zero, 0)
                self._packed = (key, torch.ops.quantized.linear_prepack(qweight, None))
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_only:
            w = self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None]
            return F.linear(x, w, self.bias)
        if x.device.type != "cpu":
            raise RuntimeError(
                f"dynamic int8 runs on CPU only, but the input is on {x.device}; quantize with weight_only: true for GPUs"
            )
        return _dynamic_product(self, x)

    def extra_repr(self) -> str:
        mode = "weight_only" if self.weight_only else "dynamic, per token" if self.per_token else "dynamic, per tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {mode}"


@torch.compiler.disable
def _dynamic_product(module: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """The dynamic int8 product, run eagerly under torch.compile: the prepacked weight is an opaque
    object keyed by its tensors' addresses, which dynamo would guard per layer (and, sharing one code
    object across layers, stop compiling after 8); the graph breaks here instead, once per int8 linear."""
    dtype, x = x.dtype, x.float()
    if module.per_token:
        rows = x.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        y = torch.ops.quantized.linear_dynamic(x / rows, module._prepacked(), REDUCE_RANGE) * rows
    else:
        y = torch.ops.quantized.linear_dynamic(x, module._prepacked(), REDUCE_RANGE)
    return (y if module.bias is None else y + module.bias).to(dtype)


def float_weight(module: nn.Module) -> torch.Tensor:
    """The float weight of a linear layer, dequantized if it is a quantized one (it has `dequantized`:
    `Int8Linear`, `Int4Linear`)."""
    dequantized = getattr(module, "dequantized", None)
    return module.weight if dequantized is None else dequantized()


def quantize_int8(model: nn.Module, names: list[str], weight_only: bool, per_token: bool) -> None:
    """Replace the `nn.Linear` modules called `names` by `Int8Linear` quantizations of them."""
    for name in names:
        replace_module(model, name, Int8Linear.from_linear(model.get_submodule(name), weight_only, per_token))


def empty_int8(model: nn.Module, names: list[str], weight_only: bool, per_token: bool) -> None:
    """Put empty `Int8Linear` modules in place of the `nn.Linear` modules called `names` (for loading)."""
    replace_with_empty(model, names, lambda linear: Int8Linear(linear.in_features, linear.out_features,
                                                               linear.bias is not None, weight_only, per_token))
