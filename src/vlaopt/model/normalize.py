"""Per-dimension normalization of actions and proprio to [-1, 1] with q01/q99 bounds (as OpenVLA).

Dimensions whose bounds coincide (constant in the data) pass through unchanged, as do those an
optional `mask` marks False (OpenVLA's statistics leave the gripper unnormalized that way).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class BoundsNormalizer(nn.Module):
    """Maps x to 2 (x - q01) / (q99 - q01) - 1, clipped to [-1, 1]; `unnormalize` inverts it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("q01", -torch.ones(dim))
        self.register_buffer("q99", torch.ones(dim))
        self.register_buffer("mask", torch.ones(dim, dtype=torch.bool), persistent=False)

    def set_stats(self, stats: dict[str, Any], name: str) -> None:
        """Load bounds from a stats dict with keys q01 and q99 (lists of length `dim`) and an optional
        `mask` (booleans: False leaves that dimension unnormalized)."""
        mask = torch.as_tensor(stats.get("mask", [True] * self.dim))
        if mask.shape != (self.dim,) or mask.dtype != torch.bool:
            raise ValueError(f"{name} statistics mask is {stats.get('mask')!r}, expected {self.dim} booleans")
        self.mask.copy_(mask)
        for key in ("q01", "q99"):
            if key not in stats:
                raise ValueError(f"{name} statistics lack {key!r}; got keys {sorted(stats)}")
            value = torch.as_tensor(stats[key], dtype=torch.float32)
            if value.shape != (self.dim,):
                raise ValueError(f"{name} statistics {key} has shape {tuple(value.shape)}, expected ({self.dim},)")
            getattr(self, key).copy_(value)

    def _apply(self, fn: Any, recurse: bool = True) -> BoundsNormalizer:
        """Follow the model across devices but keep the bounds in float32 when the model is cast to
        half precision (bf16 would round q01/q99 to 3 significant digits)."""
        for key in ("q01", "q99", "mask"):
            kept = self._buffers[key]
            self._buffers[key] = kept.to(fn(kept).device)
        return self

    def stats(self) -> dict[str, list]:
        out = {"q01": self.q01.tolist(), "q99": self.q99.tolist()}
        if not self.mask.all():
            out["mask"] = self.mask.tolist()
        return out

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
