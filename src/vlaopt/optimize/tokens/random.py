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

    def __init__(self, cfg: RandomConfig, model) -> None:
        super().__init__(cfg, model)
        # drawn here for the visual segment as the vision encoder makes it (a generator cannot be made
        # inside a compiled graph); another length (after an earlier pruner) is drawn at its first call
        self._scores = {model.config.num_visual_tokens: self._draw(model.config.num_visual_tokens)}

    def _draw(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=torch.Generator().manual_seed(self.cfg.seed))

    def forward(self, state: TokenState) -> TokenState:
        n = state.layout.visual
        if n not in self._scores:
            self._scores[n] = self._draw(n)
        scores = self._scores[n].to(state.hidden.device)
        k = keep_count(n, self.cfg.keep)
        return keep_visual(state, top_k_mask(scores[None].expand(state.hidden.shape[0], -1), k), k)
