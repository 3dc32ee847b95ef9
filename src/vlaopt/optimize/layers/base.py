"""Depth pruning methods: each scores the removable units of the LM (whole decoder blocks or attention
sublayers), and the `layer_pruning` step removes the n units of lowest score.

A method is registered by name in `LAYER_METHODS`. Scores are importances: higher means the unit
changes the residual stream more and is kept longer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from vlaopt.model.hooks import observed_attention
from vlaopt.model.layout import TokenState
from vlaopt.optimize.layers.remove import drop_attention, has_attention, remove_blocks
from vlaopt.utils.registry import Registry

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA

LAYER_METHODS: Registry[type[LayerMethod]] = Registry("layer pruning method")


@dataclass
class LayerPruningConfig:
    """How many units (blocks or attention sublayers, by method) to remove, and the calibration."""

    n: int = 1
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"layer_pruning n={self.n!r} must be a positive integer")


class LayerMethod(ABC):
    """Base of depth-pruning methods: what they remove, whether they need calibration data, and how
    they score."""

    needs_data: ClassVar[bool]
    config_cls: ClassVar[type[LayerPruningConfig]]  # each method its own, so a config names its method

    @abstractmethod
    def candidates(self, model: VLA) -> list[int]:
        """Indices of the decoder layers whose unit can be removed."""

    @abstractmethod
    def scores(self, model: VLA, states: list[TokenState] | None) -> dict[int, float]:
        """Importance of each candidate (by decoder-layer index); `states` are calibration inputs."""

    @abstractmethod
    def remove(self, model: VLA, indices: list[int]) -> None:
        """Remove the units at `indices` (current decoder-layer numbering)."""


class BlockMethod(LayerMethod):
    """Methods that remove whole decoder blocks."""

    def candidates(self, model: VLA) -> list[int]:
        return list(range(len(model.lm.decoder.layers)))

    def remove(self, model: VLA, indices: list[int]) -> None:
        remove_blocks(model, indices)


class AttentionMethod(LayerMethod):
    """Methods that drop attention sublayers and keep their MLPs."""

    def candidates(self, model: VLA) -> list[int]:
        in_use = observed_attention(model.lm.hooks)
        return [i for i, layer in enumerate(model.lm.decoder.layers) if has_attention(layer) and i not in in_use]

    def remove(self, model: VLA, indices: list[int]) -> None:
        drop_attention(model, indices)


class CosineMeter:
    """Running mean of the cosine similarity between two hidden states over valid tokens."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def add(self, before: torch.Tensor, after: torch.Tensor, valid: torch.Tensor) -> None:
        cos = F.cosine_similarity(before[valid].double(), after[valid].double(), dim=-1)
        self.total += float(cos.sum())
        self.count += cos.numel()

    @property
    def mean(self) -> float:
        return self.total / self.count
