"""The `weight_pruning` recipe step: `- weight_pruning: {method: wanda, sparsity: 0.5}` or
`{method: sparsegpt, pattern: "2:4", calibration: {samples: 64}}`; `targets` / `ignore` choose the
linear layers by name pattern (default: the LM's decoder layers). Weights are zeroed in place, so
`rebuild` has nothing to re-create."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from torch import nn

from vlaopt.optimize.calibration import CalibratedStep
from vlaopt.optimize.recipe import STEPS, make_config, split_method
from vlaopt.optimize.weights.base import WEIGHT_PRUNERS
from vlaopt.optimize.weights.prune import prune_model
from vlaopt.optimize.weights.targets import select_modules

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA


@STEPS.register("weight_pruning")
class WeightPruningStep(CalibratedStep):
    """Zero the least important weights of the targeted linear layers."""

    @classmethod
    def config_classes(cls) -> dict[type, str | None]:
        return {WEIGHT_PRUNERS.get(name).config_cls: name for name in WEIGHT_PRUNERS.names()}

    def apply(self, model: VLA, params: dict[str, Any]) -> dict[str, Any]:
        name, params = split_method(params, WEIGHT_PRUNERS, "weight_pruning")
        cls = WEIGHT_PRUNERS.get(name)
        where = f"weight_pruning ({name})"
        cfg = make_config(cls.config_cls, params, where)
        targets = select_modules(model, cfg.targets, cfg.ignore, nn.Linear, where)
        fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "calibration"}  # recorded resolved below
        resolved: dict[str, Any] = {"method": name, **fields}
        states = self.calibrated_states(model, cfg.calibration, cls.stats_cls is not None, where, resolved)
        prune_model(model, cls(cfg), targets, states)
        return resolved

    def rebuild(self, model: VLA, resolved: dict[str, Any]) -> None:
        split_method(resolved, WEIGHT_PRUNERS, "weight_pruning")  # only checks the method: zeroed weights load as saved
