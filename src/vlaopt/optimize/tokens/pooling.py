"""Pooling baseline: average-pool each camera's patch grid with a kh x kw window, merging every
window into one token (keep ~ 1 / (kh kw)). A pooled token takes the rounded mean position id of
the patches it merges, so RoPE still sees it where its patches were."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlaopt.model.layout import TokenState
from vlaopt.optimize.tokens.base import PRUNERS, PrunerConfig, TokenPruner, replace_visual


def pool_kernel(keep: float) -> tuple[int, int]:
    """Window (kh, kw) with kh * kw = round(1 / keep), as square as possible."""
    n = max(1, round(1 / keep))
    kh = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return kh, n // kh


@dataclass
class PoolingConfig(PrunerConfig):
    keep: float = 0.25


@PRUNERS.register("pooling")
class PoolingPruner(TokenPruner):
    name = "pooling"
    config_cls = PoolingConfig
    needs_full_grid = True
    merges_tokens = True

    def __init__(self, cfg: PoolingConfig, model) -> None:
        super().__init__(cfg, model)
        self.cameras = model.config.cameras
        self.grid = model.config.vision.image_size // model.config.token_patch
        self.kernel = pool_kernel(cfg.keep)

    def forward(self, state: TokenState) -> TokenState:
        n = state.layout.visual
        if n != self.cameras * self.grid**2:
            raise ValueError(
                f"pooling needs the full patch grid ({self.cameras} x {self.grid}x{self.grid} tokens) "
                f"but the visual segment has {n} tokens; put pooling before other token pruning"
            )
        span = state.layout.span("visual")
        b, d = state.hidden.shape[0], state.hidden.shape[-1]
        grid = state.hidden[:, span].reshape(b * self.cameras, self.grid, self.grid, d).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(grid, self.kernel, ceil_mode=True, count_include_pad=False)
        hidden = pooled.permute(0, 2, 3, 1).reshape(b, -1, d)
        pos = state.position_ids[:, span].reshape(b * self.cameras, 1, self.grid, self.grid).to(state.hidden.dtype)
        pos = F.avg_pool2d(pos, self.kernel, ceil_mode=True, count_include_pad=False).round().long().reshape(b, -1)
        valid = torch.ones(pos.shape, dtype=torch.bool, device=pos.device)
        return replace_visual(state, hidden, pos, valid)
