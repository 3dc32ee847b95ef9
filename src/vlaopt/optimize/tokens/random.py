"""Random baseline: keep a fixed random subset of visual token positions (same for every frame
and sample, drawn once from `seed`), the usual lower bound for learned and scored pruning."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlaopt.model.layout import TokenState
from vlaopt.optimize.tokens.base import PRUNERS, PrunerConfig, TokenPruner, keep_count, keep_visual, top_k_mask


@dataclass
class RandomConfig(PrunerConfig):
    seed: int = 0


@PRUNERS.register("random")
class RandomPruner(TokenPruner):
    name = "random"
    config_cls = RandomConfig

    def forward(self, state: TokenState) -> TokenState:
        n = state.layout.visual
        scores = torch.rand(n, generator=torch.Generator().manual_seed(self.cfg.seed)).to(state.hidden.device)
        mask = top_k_mask(scores[None].expand(state.hidden.shape[0], -1), keep_count(n, self.cfg.keep))
        return keep_visual(state, mask)
