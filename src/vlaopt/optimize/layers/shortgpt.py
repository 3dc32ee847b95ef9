"""ShortGPT (Men et al., 2024): Block Influence BI = 1 - cos(block input, block output), averaged over
the valid tokens of the calibration set; the blocks that change their input least go first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vlaopt.model.layout import TokenState
from vlaopt.optimize.calibration import walk_layers
from vlaopt.optimize.layers.base import LAYER_METHODS, BlockMethod, CosineMeter, LayerPruningConfig

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA


@dataclass
class ShortGPTConfig(LayerPruningConfig):
    """`layer_pruning` with method shortgpt."""


@LAYER_METHODS.register("shortgpt")
class ShortGPT(BlockMethod):
    needs_data = True
    config_cls = ShortGPTConfig

    def scores(self, model: VLA, states: list[TokenState] | None) -> dict[int, float]:
        out = {}
        for i, layer, inputs in walk_layers(model.lm, states):
            meter = CosineMeter()
            for inp in inputs:
                meter.add(inp.state.hidden, inp.run(layer), inp.state.valid)
            out[i] = 1.0 - meter.mean
        return out
