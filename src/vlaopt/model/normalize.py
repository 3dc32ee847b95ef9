"""Per-dimension normalization of actions and proprio: to [-1, 1] with q01/q99 bounds (`bounds`, as
OpenVLA), or by mean and standard deviation (`mean_std`, as pi0).

Dimensions whose bounds coincide (constant in the data) pass through unchanged, as do those an
optional `mask` marks False (OpenVLA's statistics leave the gripper unnormalized that way).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class Normalizer(nn.Module):
    """Statistics `KEYS` (float32 buffers of length `dim`, initialized to `INIT`) and a boolean `mask`;
    subclasses define `normalize` and `unnormalize`."""

    KEYS: ClassVar[tuple[str, ...]] = ()
    INIT: ClassVar[tuple[float, ...]] = ()

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        for key, value in zip(self.KEYS, self.INIT):
            self.register_buffer(key, torch.full((dim,), value))
        self.register_buffer("mask", torch.ones(dim, dtype=torch.bool), persistent=False)

    def set_stats(self, stats: dict[str, Any], name: str) -> None:
        """Load the `KEYS` (lists of length `dim`) and an optional `mask` (booleans: False leaves that
        dimension unnormalized) from a stats dict."""
        mask = torch.as_tensor(stats.get("mask", [True] * self.dim))
        if mask.shape != (self.dim,) or mask.dtype != torch.bool:
            raise ValueError(f"{name} statistics mask is {stats.get('mask')!r}, expected {self.dim} booleans")
        for key in self.KEYS:
            if key not in stats:
                raise ValueError(f"{name} statistics lack {key!r}; got keys {sorted(stats)}")
            value = torch.as_tensor(stats[key], dtype=torch.float32)
            if value.shape != (self.dim,):
                raise ValueError(f"{name} statistics {key} has shape {tuple(value.shape)}, expected ({self.dim},)")
            getattr(self, key).copy_(value)
        self.mask.copy_(mask)

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        """Follow the model across devices but keep the statistics in float32 when the model is cast to
        half precision (bf16 would round q01/q99 to 3 significant digits)."""
        for key in (*self.KEYS, "mask"):
            kept = self._buffers[key]
            self._buffers[key] = kept.to(fn(kept).device)
        return self

    def stats(self) -> dict[str, list]:
        out = {key: getattr(self, key).tolist() for key in self.KEYS}
        if not self.mask.all():
            out["mask"] = self.mask.tolist()
        return out


class BoundsNormalizer(Normalizer):
    """Maps x to 2 (x - q01) / (q99 - q01) - 1, clipped to [-1, 1]; `unnormalize` inverts it."""

    KEYS, INIT = ("q01", "q99"), (-1.0, 1.0)

    def _span(self) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.q99 - self.q01
        active = (span > 1e-8) & self.mask
        return torch.where(active, span, torch.ones_like(span)), active

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 in, float32 out (callers cast to the model's dtype)."""
        span, active = self._span()
        y = (2 * (x - self.q01) / span - 1).clamp(-1, 1)
        return torch.where(active, y, x)

    def unnormalize(self, y: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """Clipped to [-1, 1] first unless `clip` is False (OpenVLA-OFT's heads are not clipped)."""
        span, active = self._span()
        x = ((y.clamp(-1, 1) if clip else y) + 1) / 2 * span + self.q01
        return torch.where(active, x, y)


class MeanStdNormalizer(Normalizer):
    """Maps x to (x - mean) / (std + 1e-6) and back, unclipped (pi0: openpi's z-score; LeRobot's
    MEAN_STD uses eps 1e-8, a relative difference below 1e-5 for std above 0.1)."""

    KEYS, INIT = ("mean", "std"), (0.0, 1.0)
    EPS = 1e-6

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, (x - self.mean) / (self.std + self.EPS), x)

    def unnormalize(self, y: torch.Tensor, clip: bool = False) -> torch.Tensor:
        """`clip` first clips to [-1, 1] (not pi0's behaviour; it exists for the shared interface)."""
        y = y.clamp(-1, 1) if clip else y
        return torch.where(self.mask, y * (self.std + self.EPS) + self.mean, y)


NORMALIZERS = {"bounds": BoundsNormalizer, "mean_std": MeanStdNormalizer}
"""VLAConfig.normalization -> the normalizer of actions and proprio."""
