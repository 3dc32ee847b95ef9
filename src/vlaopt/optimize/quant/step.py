"""The `quantize` recipe step: `- quantize: {method: int8}` (dynamic int8, CPU; activation scales per
token, or `activations: tensor` for one per tensor) or `- quantize: {method: int8, weight_only: true}`
(int8 weights, any device).

`rebuild` puts empty `Int8Linear` modules where the step put quantized ones, so the saved int8
weights and scales load into them. A record without `activations` was written before per-token
scales existed, with one scale per tensor, and rebuilds so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from vlaopt.optimize.quant.int8 import empty_int8, quantize_int8
from vlaopt.optimize.recipe import STEPS, RecipeStep, make_config, split_method
from vlaopt.optimize.weights.targets import DEFAULT_TARGETS, select_modules
from vlaopt.utils.registry import Registry

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA

QUANT_METHODS: Registry[type[Int8Config]] = Registry("quantization method")


@QUANT_METHODS.register("int8")
@dataclass
class Int8Config:
    """Which linear layers to quantize (name patterns), whether activations stay in float, and, where
    they do not, whether each token gets its own activation scale (`token`) or the whole input one
    (`tensor`)."""

    weight_only: bool = False
    activations: str = "token"
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    ignore: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.weight_only, bool):
            raise TypeError(f"quantize weight_only={self.weight_only!r} must be true or false")
        if self.activations not in ("token", "tensor"):
            raise ValueError(f"quantize activations={self.activations!r} must be token or tensor")


def _config(params: dict[str, Any]) -> tuple[str, Int8Config]:
    method, params = split_method(params, QUANT_METHODS, "quantize")
    return method, make_config(QUANT_METHODS.get(method), params, f"quantize ({method})")


@STEPS.register("quantize")
class QuantizeStep(RecipeStep):
    """Replace the targeted linear layers of the model by int8 ones."""

    @classmethod
    def config_classes(cls) -> dict[type, str | None]:
        return {QUANT_METHODS.get(name): name for name in QUANT_METHODS.names()}

    def apply(self, model: VLA, params: dict[str, Any]) -> dict[str, Any]:
        method, cfg = _config(params)
        names = list(select_modules(model, cfg.targets, cfg.ignore, nn.Linear, f"quantize ({method})"))
        quantize_int8(model, names, cfg.weight_only, cfg.activations == "token")
        return {"method": method, **dataclasses.asdict(cfg)}

    def rebuild(self, model: VLA, resolved: dict[str, Any]) -> None:
        method, cfg = _config({"activations": "tensor", **resolved})  # older records: per tensor (module doc)
        names = list(select_modules(model, cfg.targets, cfg.ignore, nn.Linear, f"quantize ({method})"))
        empty_int8(model, names, cfg.weight_only, cfg.activations == "token")
