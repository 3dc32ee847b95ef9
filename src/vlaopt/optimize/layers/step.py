"""The `layer_pruning` recipe step: `- layer_pruning: {method: shortgpt, n: 2, calibration: {samples: 64}}`.

The resolved step records the decoder-layer indices it removed (`removed`, in the numbering the
model had when the step ran) and the score of every layer (`scores`, None where a layer was not a
candidate), so `rebuild` re-creates the same structure on a fresh model without data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vlaopt.optimize.calibration import CalibratedStep
from vlaopt.optimize.layers.base import LAYER_METHODS
from vlaopt.optimize.recipe import STEPS, make_config, split_method

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA


def _method(params: dict[str, Any]) -> tuple[str, Any, dict[str, Any]]:
    name, rest = split_method(params, LAYER_METHODS, "layer_pruning")
    return name, LAYER_METHODS.get(name)(), rest


@STEPS.register("layer_pruning")
class LayerPruningStep(CalibratedStep):
    """Remove the n least important decoder blocks or attention sublayers of the LM."""

    @classmethod
    def config_classes(cls) -> dict[type, str | None]:
        return {LAYER_METHODS.get(name).config_cls: name for name in LAYER_METHODS.names()}

    def apply(self, model: VLA, params: dict[str, Any]) -> dict[str, Any]:
        name, method, params = _method(params)
        where = f"layer_pruning ({name})"
        cfg = make_config(method.config_cls, params, where)
        candidates = method.candidates(model)
        if cfg.n >= len(candidates):
            raise ValueError(
                f"{where}: n={cfg.n} must be below the {len(candidates)} removable units; keep at least one"
            )
        resolved: dict[str, Any] = {"method": name, "n": cfg.n}
        states = self.calibrated_states(model, cfg.calibration or None, method.needs_data, where, resolved)
        scores = method.scores(model, states)
        removed = sorted(sorted(scores, key=lambda i: (scores[i], i))[: cfg.n])
        layers = len(model.lm.decoder.layers)
        resolved["scores"] = [scores.get(i) for i in range(layers)]
        resolved["removed"] = removed
        method.remove(model, removed)
        return resolved

    def rebuild(self, model: VLA, resolved: dict[str, Any]) -> None:
        name, method, params = _method(resolved)
        removed = params.get("removed")
        if not isinstance(removed, list) or len(removed) != params.get("n"):
            raise ValueError(
                f"recorded layer_pruning ({name}) has removed={removed!r}; expected a list of n={params.get('n')!r} "
                "layer indices"
            )
        method.remove(model, removed)
