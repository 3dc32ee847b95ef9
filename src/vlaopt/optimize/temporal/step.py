"""The `temporal_reuse` recipe step: `- temporal_reuse: {mode: approximate, threshold: 0.996}`.

It changes no weights: it installs the model's session factory, so `model.session()` (which
`vla-opt eval` and `bench --success` step through) reuses unchanged visual tokens and their decoder
keys/values between control steps (reuse.py). Stateless `predict_action` is unchanged. The step is
checked against the model when applied (token pruning after the first reusing layer, merging pruners
and compiled models are refused by name) and replayed by `vlaopt.load`.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import TYPE_CHECKING, Any

from vlaopt.optimize.recipe import STEPS, RecipeStep, make_config
from vlaopt.optimize.temporal.reuse import ReuseSession, TemporalReuseConfig, check_model

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA


@STEPS.register("temporal_reuse")
class TemporalReuseStep(RecipeStep):
    """Install temporal reuse (reuse.py) as the model's sessions."""

    @classmethod
    def config_classes(cls) -> dict[type, str | None]:
        return {TemporalReuseConfig: None}

    def apply(self, model: VLA, params: dict[str, Any]) -> dict[str, Any]:
        cfg = make_config(TemporalReuseConfig, params, "temporal_reuse")
        if model.session_factory is not None:
            raise ValueError("the model already has a temporal_reuse step; a recipe holds at most one")
        check_model(model, cfg)
        model.session_factory = partial(ReuseSession, cfg=cfg)
        return dataclasses.asdict(cfg)

    def rebuild(self, model: VLA, resolved: dict[str, Any]) -> None:
        self.apply(model, resolved)
