"""Magnitude pruning: zero the weights of smallest |w|, over the whole matrix (unstructured) or in
every group of M inputs (N:M). No data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlaopt.optimize.weights.base import WEIGHT_PRUNERS, Stats, WeightPruner, WeightPruningConfig


@dataclass
class MagnitudeConfig(WeightPruningConfig):
    """`weight_pruning` with method magnitude."""


@WEIGHT_PRUNERS.register("magnitude")
class MagnitudePruner(WeightPruner):
    config_cls = MagnitudeConfig
    def prune(self, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        return weight.masked_fill(self.cfg.mask(weight.abs(), per_row=False), 0.0)
