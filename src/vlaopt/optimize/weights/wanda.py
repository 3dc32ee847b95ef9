"""Wanda (Sun et al., 2024): score each weight by |W_ij| * ||X_j||_2, the size of the weight times the
norm of its input feature over the calibration tokens, and zero the lowest scores of each output row
(or of every group of M inputs, N:M). The kept weights are not updated."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlaopt.optimize.weights.base import WEIGHT_PRUNERS, ColumnNorms, WeightPruner, WeightPruningConfig


@dataclass
class WandaConfig(WeightPruningConfig):
    """`weight_pruning` with method wanda."""


@WEIGHT_PRUNERS.register("wanda")
class WandaPruner(WeightPruner):
    config_cls = WandaConfig
    stats_cls = ColumnNorms

    def prune(self, weight: torch.Tensor, stats: ColumnNorms) -> torch.Tensor:
        scores = weight.abs() * stats.norms().to(weight.device)[None, :]
        return weight.masked_fill(self.cfg.mask(scores, per_row=True), 0.0)
