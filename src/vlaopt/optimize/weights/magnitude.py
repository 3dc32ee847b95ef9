"""Magnitude pruning: zero the weights of smallest |w|, over the whole matrix (unstructured) or in
every group of M inputs (N:M). No data."""

from __future__ import annotations

import torch

from vlaopt.optimize.weights.base import WEIGHT_PRUNERS, Stats, WeightPruner


@WEIGHT_PRUNERS.register("magnitude")
class MagnitudePruner(WeightPruner):
    def prune(self, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        return weight.masked_fill(self.cfg.mask(weight.abs(), per_row=False), 0.0)
