"""The `quantize` recipe step, one method per config:

- `- quantize: {method: int8}`: dynamic int8 on CPU; activation scales per token, or
  `activations: tensor` for one per tensor; `weight_only: true` keeps activations in float (any
  device);
- `- quantize: {method: int4, group_size: 64}`: int4 weights in groups, weight-only, through torch's
  tinygemm kernels on CPU and CUDA (optimize/quant/int4.py).

Each config replaces its target layers (`replace`) and, for `rebuild`, puts empty modules of the
same kind in their place (`empty`), so the saved codes and scales load into them. An int8 record
without `activations` was written before per-token scales existed, with one scale per tensor, and
rebuilds so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from vlaopt.optimize.quant.int4 import GROUP_SIZES, empty_int4, quantize_int4
from vlaopt.optimize.quant.int8 import empty_int8, quantize_int8
from vlaopt.optimize.recipe import STEPS, RecipeStep, make_config, split_method
from vlaopt.optimize.weights.targets import DEFAULT_TARGETS, select_modules
from vlaopt.utils.registry import Registry

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA

QUANT_METHODS: Registry[type[Int8Config | Int4Config]] = Registry("quantization method")


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

    def replace(self, model: nn.Module, names: list[str]) -> None:
        quantize_int8(model, names, self.weight_only, self.activations == "token")

    def empty(self, model: nn.Module, names: list[str]) -> None:
        empty_int8(model, names, self.weight_only, self.activations == "token")


@QUANT_METHODS.register("int4")
@dataclass
class Int4Config:
    """Which linear layers get int4 weights, and how many input columns share a scale and a zero."""

    group_size: int = 64
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    ignore: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES:
            raise ValueError(f"quantize (int4) group_size={self.group_size!r} must be one of "
                             f"{', '.join(map(str, GROUP_SIZES))}")

    def replace(self, model: nn.Module, names: list[str]) -> None:
        quantize_int4(model, names, self.group_size)

    def empty(self, model: nn.Module, names: list[str]) -> None:
        empty_int4(model, names, self.group_size)


def _config(params: dict[str, Any], recorded: bool = False) -> tuple[str, Int8Config | Int4Config]:
    method, params = split_method(params, QUANT_METHODS, "quantize")
    if recorded and method == "int8":
        params = {"activations": "tensor", **params}  # older records: per tensor (module doc)
    return method, make_config(QUANT_METHODS.get(method), params, f"quantize ({method})")


@STEPS.register("quantize")
class QuantizeStep(RecipeStep):
    """Replace the targeted linear layers of the model by quantized ones."""

    @classmethod
    def config_classes(cls) -> dict[type, str | None]:
        return {QUANT_METHODS.get(name): name for name in QUANT_METHODS.names()}

    def apply(self, model: VLA, params: dict[str, Any]) -> dict[str, Any]:
        method, cfg = _config(params)
        cfg.replace(model, list(select_modules(model, cfg.targets, cfg.ignore, nn.Linear, f"quantize ({method})")))
        return {"method": method, **dataclasses.asdict(cfg)}

    def rebuild(self, model: VLA, resolved: dict[str, Any]) -> None:
        method, cfg = _config(resolved, recorded=True)
        cfg.empty(model, list(select_modules(model, cfg.targets, cfg.ignore, nn.Linear, f"quantize ({method})")))
