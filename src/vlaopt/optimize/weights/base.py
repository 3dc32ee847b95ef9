"""Weight pruning: a method scores the weights of each targeted linear layer (with activation
statistics from calibration data where it needs them) and zeroes the lowest, unstructured at a
sparsity s or in an N:M pattern. Masks live in the weights themselves, so a pruned model saves and
loads like any other. Zeroed weights save no time on dense kernels: only 2:4 on CUDA, through
`weights.semi_structured`, turns sparsity into speed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vlaopt.optimize.weights.masks import lowest, n_m, parse_pattern
from vlaopt.optimize.weights.targets import DEFAULT_TARGETS
from vlaopt.utils.registry import Registry

WEIGHT_PRUNERS: Registry[type[WeightPruner]] = Registry("weight pruning method")


@dataclass
class WeightPruningConfig:
    """Unstructured `sparsity` (fraction zeroed; 0.5 when neither is given) or an N:M `pattern` such as
    "2:4" (keep N of every M inputs), over the linear layers chosen by `targets` / `ignore`."""

    sparsity: float | None = None
    pattern: str | None = None
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    ignore: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None  # for the data-driven methods (Wanda, SparseGPT)

    def __post_init__(self) -> None:
        if self.pattern is not None:
            if self.sparsity is not None:
                raise ValueError(
                    f"weight_pruning got sparsity={self.sparsity!r} and pattern={self.pattern!r}; give one of them"
                )
            parse_pattern(self.pattern)
            return
        if self.sparsity is None:
            self.sparsity = 0.5
        if not isinstance(self.sparsity, (int, float)) or not 0 < self.sparsity < 1:
            raise ValueError(f"weight_pruning sparsity={self.sparsity!r} must be a fraction in (0, 1)")

    @property
    def nm(self) -> tuple[int, int] | None:
        return None if self.pattern is None else parse_pattern(self.pattern)

    def mask(self, scores: torch.Tensor, per_row: bool) -> torch.Tensor:
        """Mask (True = prune) of the lowest `scores` under this config's sparsity or pattern."""
        if self.nm is not None:
            return n_m(scores, *self.nm)
        return lowest(scores, round(self.sparsity * (scores.shape[1] if per_row else scores.numel())), per_row)


class Stats(ABC):
    """Statistics of a linear layer's inputs over the valid calibration tokens."""

    def __init__(self, features: int) -> None:
        self.features = features
        self.tokens = 0

    @abstractmethod
    def add(self, x: torch.Tensor) -> None:
        """Accumulate inputs `x` of shape (tokens, features)."""


class ColumnNorms(Stats):
    """Squared L2 norm of each input feature over all tokens (Wanda's ||X_j||_2^2)."""

    def __init__(self, features: int) -> None:
        super().__init__(features)
        self.sq = torch.zeros(features, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        self.sq += x.double().square().sum(0).cpu()
        self.tokens += x.shape[0]

    def norms(self) -> torch.Tensor:
        return self.sq.sqrt().float()


class Hessian(Stats):
    """The layer-wise Hessian of the squared reconstruction error, H = X^T X / tokens."""

    def __init__(self, features: int) -> None:
        super().__init__(features)
        self.sum: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        part = x.T @ x
        self.sum = part if self.sum is None else self.sum + part
        self.tokens += x.shape[0]

    def matrix(self) -> torch.Tensor:
        if self.sum is None:
            raise ValueError("no calibration tokens reached this layer")
        return self.sum / self.tokens


class WeightPruner(ABC):
    """Base of weight-pruning methods: a config class and the input statistics they need."""

    config_cls: ClassVar[type[WeightPruningConfig]] = WeightPruningConfig
    stats_cls: ClassVar[type[Stats] | None] = None

    def __init__(self, cfg: WeightPruningConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def prune(self, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        """The pruned version of a float32 weight (out, in); `stats` are its inputs' statistics."""
