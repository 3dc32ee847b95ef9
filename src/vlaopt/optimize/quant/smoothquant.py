"""SmoothQuant (Xiao et al., 2023): move the activation outliers that per-token int8 rounds badly into
the weights, which per-channel int8 rounds well. For a linear's input channel j, with s_j =
max|X_j|^alpha / max|W_:,j|^(1 - alpha), the input is divided by s_j and the weight's column j
multiplied by it: the product is unchanged in float. The division is folded into the RMSNorm weight
that feeds the linears (input_layernorm -> q/k/v, post_attention_layernorm -> gate/up), which all share
one s (max |W| over their stacked columns), as the authors do for Llama-like layers; o_proj and
down_proj, fed by no norm, are left alone, as in their code. Step `smoothquant: {alpha, calibration}`,
to be followed by `quantize: {method: int8}`.

The activation maxima come from our calibration walk: layer by layer, already smoothed layers before
it. Smoothing preserves the function, so this equals the authors' one pass over the original model
up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlaopt.optimize.calibration import CalibratedStep, walk_layers
from vlaopt.optimize.recipe import STEPS, make_config
from vlaopt.optimize.weights.base import Stats
from vlaopt.optimize.weights.prune import collect_stats

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA

SCALED_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
"""Norms whose output is `weight * normalized(x)`, so dividing `weight` divides the output."""
GROUPS = (("input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj")),
          ("post_attention_layernorm", "mlp", ("gate_proj", "up_proj")))
"""(norm, module, the linears that norm feeds) in a Llama-like decoder layer."""


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha) over the stacked `weights` (out, in), each
    factor floored at 1e-5 as the authors do."""
    weight_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    return (act_max.to(weight_max).pow(alpha) / weight_max.pow(1 - alpha)).clamp(min=1e-5)


class ColumnMax(Stats):
    """max |x_j| of each input feature over all tokens."""

    def __init__(self, features: int) -> None:
        super().__init__(features)
        self.max = torch.zeros(features)

    def add(self, x: torch.Tensor) -> None:
        self.max = torch.maximum(self.max, x.detach().abs().amax(0).float().cpu())
        self.tokens += x.shape[0]


def _groups(layer: nn.Module, i: int) -> list[tuple[nn.Module, list[nn.Linear]]]:
    """The (norm, linears) pairs of decoder layer `i` that can be smoothed (an MLP-only layer has one)."""
    out = []
    for norm_name, parent, names in GROUPS:
        if not hasattr(layer, norm_name):
            continue
        norm = getattr(layer, norm_name)
        linears = [getattr(getattr(layer, parent), n) for n in names]
        if type(norm).__name__ not in SCALED_NORMS:
            raise ValueError(f"smoothquant folds scales into {', '.join(SCALED_NORMS)}; decoder layer {i}'s "
                             f"{norm_name} is {type(norm).__name__}")
        odd = [(n, m) for n, m in zip(names, linears, strict=True) if type(m) is not nn.Linear]
        if odd:
            raise ValueError(f"smoothquant needs float nn.Linear layers, but decoder layer {i}'s "
                             f"{', '.join(n for n, _ in odd)} is {type(odd[0][1]).__name__}; smooth before quantize")
        out.append((norm, linears))
    return out


@dataclass
class SmoothQuantConfig:
    """Migration strength `alpha` in [0, 1] (0: nothing moves; the authors use 0.5, and 0.8-0.9 on
    Llama-family LMs) and the calibration data."""

    alpha: float = 0.5
    calibration: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"smoothquant alpha={self.alpha!r} must be a number in [0, 1]")


@STEPS.register("smoothquant")
class SmoothQuantStep(CalibratedStep):
    """Fold per-channel smoothing scales into the LM's norms and the linears they feed (in place)."""

    @classmethod
    def config_classes(cls) -> dict[type, str | None]:
        return {SmoothQuantConfig: None}

    def apply(self, model: VLA, params: dict[str, Any]) -> dict[str, Any]:
        cfg = make_config(SmoothQuantConfig, params, "smoothquant")
        groups = {i: _groups(layer, i) for i, layer in enumerate(model.lm.decoder.layers)}
        resolved: dict[str, Any] = {"alpha": cfg.alpha}
        states = self.calibrated_states(model, cfg.calibration, True, "smoothquant", resolved)
        for i, layer, inputs in walk_layers(model.lm, states):
            firsts = {str(k): linears[0] for k, (_, linears) in enumerate(groups[i])}
            stats = collect_stats(inputs, layer, firsts, ColumnMax)
            with torch.no_grad():
                for k, (norm, linears) in enumerate(groups[i]):
                    s = smoothing_scales(stats[str(k)].max, [m.weight.float() for m in linears], cfg.alpha)
                    norm.weight.div_(s.to(norm.weight))
                    for m in linears:
                        m.weight.mul_(s.to(m.weight)[None, :])
        return resolved

    def rebuild(self, model: VLA, resolved: dict[str, Any]) -> None:
        """Nothing to re-create: the smoothed weights load as saved."""
