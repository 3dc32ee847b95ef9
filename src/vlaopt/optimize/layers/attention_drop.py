"""Attention drop ("What Matters in Transformers? Not All Attention is Needed", He et al., 2024): the
importance of an attention sublayer is 1 - cos(x, x + attn(norm(x))) over the valid calibration
tokens; the most redundant sublayers are dropped and their MLPs kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vlaopt.model.layout import TokenState
from vlaopt.optimize.calibration import walk_layers
from vlaopt.optimize.layers.base import LAYER_METHODS, AttentionMethod, CosineMeter, LayerPruningConfig
from vlaopt.optimize.layers.remove import has_attention

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA


@dataclass
class AttentionDropConfig(LayerPruningConfig):
    """`layer_pruning` with method attention_drop."""


@LAYER_METHODS.register("attention_drop")
class AttentionDrop(AttentionMethod):
    needs_data = True
    config_cls = AttentionDropConfig

    def scores(self, model: VLA, states: list[TokenState] | None) -> dict[int, float]:
        out = {}
        for i, layer, inputs in walk_layers(model.lm, states):
            if not has_attention(layer):
                continue
            meter = CosineMeter()
            for inp in inputs:
                x = inp.state.hidden
                attended, _ = layer.self_attn(
                    layer.input_layernorm(x),
                    position_embeddings=inp.rotary,
                    attention_mask=inp.mask,
                    position_ids=inp.state.position_ids,
                )
                meter.add(x, x + attended, inp.state.valid)
            out[i] = 1.0 - meter.mean
        return out
