"""KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", 2024): keys
quantized per channel, values per token, asymmetric (min/max with a zero point), the most recent
tokens kept in full precision.

The cache holds each layer's keys and values really quantized (`KiviKeys`, `KiviValues`: integer
codes, a scale and a zero point per group, and the full-precision residual), so `KVCache.nbytes`
drops by what is saved; reading `cache.keys[i]` dequantizes (when attention or the expert reads
them). Codes are uint8; at 4 and 2 bits they are packed, 2 and 4 codes per byte along head_dim.

Faithful to the authors' code (jy-yuan/KIVI, quant/new_pack.py and models/llama_kivi.py):

- the quantizer: scale = (max - min) / (2^bits - 1), code = round(clamp((x - min) / scale, 0,
  2^bits - 1)), x' = code * scale + min; keys in groups of `group` tokens per channel, values in
  groups of `group` channels per token (the same `group` for both, as their `group_size`);
- after the prefix (their prefill): keys quantize the first floor(T / residual) * residual tokens
  (a multiple of `residual`, itself a multiple of `group`) and keep the rest full; values quantize
  all but the last `residual`;
- while decoding: new tokens join the full-precision part; keys quantize it whole each time it holds
  `residual` tokens, values quantize their oldest tokens beyond `residual`. We run this rule in
  `append`, for every decoded token, as they do. (Appending T > 1 tokens at once, as speculative
  verification does, quantizes floor(L / residual) * residual keys and L - residual values of the L
  full-precision tokens: the same groups as one at a time.)

Deviations, on purpose: a group's min/max of the keys is taken over its valid slots only (padding,
pruned or stopped slots do not widen a sample's scales, so a batch quantizes each sample's tokens
as its own values would); a group whose values are all equal (scale 0) gets codes 0 and
dequantizes to its minimum exactly (their division by 0 would give NaN); the prefix itself attends in
full precision and the quantized cache is what reasoning and the expert read, as in their prefill.
On the CPU dequantizing on every read costs time: the memory is saved, the speed needs their fused
kernels (quant/gemv_cuda.cu), which we do not build.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlaopt.model.kv_cache import KVCache
from vlaopt.optimize.kv.base import KVCompressor


@dataclass(frozen=True)
class KiviSpec:
    """`bits` per code (8, 4 or 2), `group` size, `residual` full-precision tokens."""

    bits: int
    group: int
    residual: int


def quantize(x: torch.Tensor, dim: int, bits: int, valid: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization of `x` over dimension `dim` (one group): codes (uint8, the shape
    of x) and the scale and zero point (min) of each group (x's shape with `dim` of size 1). `valid`
    (broadcastable to x) excludes entries from the min/max; a group with none gets min = max = 0."""
    top = 2 ** bits - 1
    if valid is None:
        low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    else:
        low = x.masked_fill(~valid, float("inf")).amin(dim, keepdim=True)
        high = x.masked_fill(~valid, float("-inf")).amax(dim, keepdim=True)
        empty = torch.isinf(low)
        low, high = low.masked_fill(empty, 0.0), high.masked_fill(empty, 0.0)
    scale = (high - low) / top
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = ((x - low) / safe).clamp(0, top).round().to(torch.uint8)
    return codes, scale, low


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x' = code * scale + zero (broadcasting each group's scale and zero point)."""
    return codes.to(scale.dtype) * scale + zero


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of `bits` bits (..., D) packed 8 / bits per byte along the last dimension."""
    per = 8 // bits
    if per == 1:
        return codes
    shifts = torch.arange(per, device=codes.device, dtype=torch.uint8) * bits
    return (codes.view(*codes.shape[:-1], -1, per) << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack`: (..., D * bits / 8) bytes -> (..., D) codes."""
    per = 8 // bits
    if per == 1:
        return packed
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
    return ((packed[..., None] >> shifts) & (2 ** bits - 1)).view(*packed.shape[:-1], -1)


def quantize_keys(x: torch.Tensor, spec: KiviSpec, valid: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys (B, KV, T, D), T a multiple of `group`: per channel over groups of `group` tokens. Returns
    packed codes (B, KV, T, D * bits / 8), scale and zero (B, KV, T / group, D); `valid` (B, T)."""
    b, h, t, d = x.shape
    grouped = x.view(b, h, t // spec.group, spec.group, d)
    mask = None if valid is None else valid.view(b, 1, t // spec.group, spec.group, 1)
    codes, scale, zero = quantize(grouped, 3, spec.bits, mask)
    return pack(codes.view(b, h, t, d), spec.bits), scale.squeeze(3), zero.squeeze(3)


def dequantize_keys(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: KiviSpec) -> torch.Tensor:
    codes = unpack(codes, spec.bits)
    b, h, t, d = codes.shape
    grouped = codes.view(b, h, t // spec.group, spec.group, d)
    return dequantize(grouped, scale[:, :, :, None], zero[:, :, :, None]).view(b, h, t, d)


def quantize_values(x: torch.Tensor, spec: KiviSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values (B, KV, T, D), D a multiple of `group`: per token over groups of `group` channels. Returns
    packed codes (B, KV, T, D * bits / 8), scale and zero (B, KV, T, D / group)."""
    b, h, t, d = x.shape
    codes, scale, zero = quantize(x.view(b, h, t, d // spec.group, spec.group), 4, spec.bits)
    return pack(codes.view(b, h, t, d), spec.bits), scale.squeeze(4), zero.squeeze(4)


def dequantize_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: KiviSpec) -> torch.Tensor:
    codes = unpack(codes, spec.bits)
    b, h, t, d = codes.shape
    return dequantize(codes.view(b, h, t, d // spec.group, spec.group), scale[..., None], zero[..., None]).view(
        b, h, t, d)


class _KiviEntry:
    """One layer's keys or values as KIVI holds them: the quantized part (codes, scale, zero, all
    along dim 2) followed by the full-precision residual `full` (B, KV, R', D). Immutable: `append`
    returns a new entry."""

    def __init__(self, spec: KiviSpec, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 full: torch.Tensor) -> None:
        self.spec, self.codes, self.scale, self.zero, self.full = spec, codes, scale, zero, full
        self.shape = torch.Size((*full.shape[:2], codes.shape[2] + full.shape[2], full.shape[3]))

    @classmethod
    def of(cls, spec: KiviSpec, x: torch.Tensor, valid: torch.Tensor) -> _KiviEntry:
        """KIVI's prefill of dense `x` (B, KV, T, D) whose slots have validity `valid` (B, T)."""
        b, h, _, d = x.shape
        codes = x.new_zeros((b, h, 0, d * spec.bits // 8), dtype=torch.uint8)
        stat = x.new_zeros(cls._stat_shape(b, h, d, spec))
        return cls(spec, codes, stat, stat, x[:, :, :0]).append(x, valid)

    @staticmethod
    def _stat_shape(b: int, h: int, d: int, spec: KiviSpec) -> tuple[int, ...]:
        raise NotImplementedError

    def _due(self, full: int) -> int:
        """How many of `full` full-precision tokens, the oldest, are quantized now."""
        raise NotImplementedError

    def _quantize(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def append(self, x: torch.Tensor, valid: torch.Tensor) -> _KiviEntry:
        """This entry followed by `x` (B, KV, T, D); `valid` (B, S + T) of all its slots."""
        full = torch.cat([self.full, x], dim=2)
        due = self._due(full.shape[2])
        if not due:
            return type(self)(self.spec, self.codes, self.scale, self.zero, full)
        start = self.codes.shape[2]
        codes, scale, zero = self._quantize(full[:, :, :due], valid[:, start:start + due])
        return type(self)(self.spec, torch.cat([self.codes, codes], 2), torch.cat([self.scale, scale], 2),
                          torch.cat([self.zero, zero], 2), full[:, :, due:])

    def dense(self) -> torch.Tensor:
        """All slots (B, KV, S, D), the quantized ones dequantized."""
        if self.codes.shape[2] == 0:
            return self.full
        return torch.cat([self._dequantize(), self.full], dim=2)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero, self.full))


class KiviKeys(_KiviEntry):
    """Keys: per channel over groups of `group` tokens; quantized `residual` tokens at a time."""

    @staticmethod
    def _stat_shape(b: int, h: int, d: int, spec: KiviSpec) -> tuple[int, ...]:
        return (b, h, 0, d)

    def _due(self, full: int) -> int:
        return full // self.spec.residual * self.spec.residual

    def _quantize(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return quantize_keys(x, self.spec, valid)

    def _dequantize(self) -> torch.Tensor:
        return dequantize_keys(self.codes, self.scale, self.zero, self.spec)


class KiviValues(_KiviEntry):
    """Values: per token over groups of `group` channels; all but the last `residual` quantized."""

    @staticmethod
    def _stat_shape(b: int, h: int, d: int, spec: KiviSpec) -> tuple[int, ...]:
        return (b, h, 0, d // spec.group)

    def _due(self, full: int) -> int:
        return max(full - self.spec.residual, 0)

    def _quantize(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return quantize_values(x, self.spec)

    def _dequantize(self) -> torch.Tensor:
        return dequantize_values(self.codes, self.scale, self.zero, self.spec)


class KiviCompressor(KVCompressor):
    """KIVI: the first call replaces each layer's dense keys and values by quantized entries, which
    then run KIVI's decoding rule themselves as tokens are appended; later calls find them so."""

    name = "kv_quant"

    def __init__(self, spec: KiviSpec) -> None:
        self.spec = spec

    def __call__(self, cache: KVCache, last: bool) -> None:
        for i in cache.layers:
            for store, kind in ((cache.keys, KiviKeys), (cache.values, KiviValues)):
                held = dict.__getitem__(store, i)  # as held: a quantized entry would read dequantized
                if isinstance(held, torch.Tensor):
                    store[i] = kind.of(self.spec, held, cache.valid[i])
