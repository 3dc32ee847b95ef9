"""The `token_pruning` recipe step: `- token_pruning: {method: fastv, layer: 2, keep: 0.25}`."""

from __future__ import annotations

import dataclasses
from typing import Any

from vlaopt.optimize.layers.remove import has_attention
from vlaopt.optimize.recipe import STEPS, RecipeStep, make_config
from vlaopt.optimize.tokens.base import PRUNERS


@STEPS.register("token_pruning")
class TokenPruningStep(RecipeStep):
    """Attach a visual-token pruner to the LM layer loop (no weights change)."""

    def apply(self, model: Any, params: dict[str, Any]) -> dict[str, Any]:
        params = dict(params)
        if "method" not in params:
            raise ValueError(f"token_pruning needs a method; expected one of {', '.join(PRUNERS.names())}")
        method = params.pop("method")
        cls = PRUNERS.get(method)
        cfg = make_config(cls.config_cls, params, f"token_pruning ({method})")
        layers = len(model.lm.decoder.layers)
        if cfg.layer >= layers:
            raise ValueError(f"token_pruning layer={cfg.layer} is out of range; the LM has {layers} decoder layers")
        if cls.reads_attention and not has_attention(model.lm.decoder.layers[cfg.layer - 1]):
            raise ValueError(f"token_pruning {method} at layer={cfg.layer} ranks tokens by the attention of decoder "
                             f"layer {cfg.layer - 1}, which was dropped")
        model.lm.hooks.append(cls(cfg, model).train(model.training))
        return {"method": method, **dataclasses.asdict(cfg)}

    def rebuild(self, model: Any, resolved: dict[str, Any]) -> None:
        self.apply(model, resolved)
