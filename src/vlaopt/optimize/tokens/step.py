"""The `token_pruning` recipe step: `- token_pruning: {method: fastv, layer: 2, keep: 0.25}`."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from vlaopt.optimize.layers.remove import has_attention
from vlaopt.optimize.recipe import STEPS, RecipeStep, make_config, split_method
from vlaopt.optimize.tokens.base import PRUNERS, TokenPruner

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA


def check_hook_order(hooks: list[TokenPruner]) -> None:
    """Refuse hooks that would make every forward pass fail, in the order the layer loop runs them
    (by layer, then as added): a pruner that needs each camera's full patch grid (pooling) after any
    other pruner, and a pruner that ranks by the previous layer's attention (FastV) after another
    pruner at its own layer (the scores it observed no longer match the visual segment)."""
    order = sorted(range(len(hooks)), key=lambda k: (hooks[k].layer, k))
    for position, k in enumerate(order):
        hook = hooks[k]
        earlier = [hooks[j] for j in order[:position]]
        if hook.needs_full_grid and earlier:
            raise ValueError(
                f"token_pruning {hook.name} before decoder layer {hook.layer} needs each camera's full patch grid, "
                f"but the {earlier[0].name} step before layer {earlier[0].layer} changes the visual segment first; "
                f"{hook.name} must be the first token-pruning step")
        same_layer = [e for e in earlier if e.layer == hook.layer]
        if hook.observed_layers() and same_layer:
            raise ValueError(
                f"token_pruning {hook.name} before decoder layer {hook.layer} ranks the visual tokens the layer before "
                f"it saw, but the {same_layer[0].name} step at the same layer changes them first; move one of them "
                "to another layer")


@STEPS.register("token_pruning")
class TokenPruningStep(RecipeStep):
    """Attach a visual-token pruner to the LM layer loop (no weights change)."""

    @classmethod
    def config_classes(cls) -> dict[type, str | None]:
        return {PRUNERS.get(name).config_cls: name for name in PRUNERS.names()}

    def apply(self, model: VLA, params: dict[str, Any]) -> dict[str, Any]:
        method, params = split_method(params, PRUNERS, "token_pruning")
        cls = PRUNERS.get(method)
        cfg = make_config(cls.config_cls, params, f"token_pruning ({method})")
        layers = model.lm.decoder.layers
        if cfg.layer >= len(layers):
            raise ValueError(f"token_pruning layer={cfg.layer} is out of range; the LM has {len(layers)} decoder layers")
        pruner = cls(cfg, model).train(model.training)
        for i in pruner.observed_layers():
            if not has_attention(layers[i]):
                raise ValueError(f"token_pruning {method} at layer={cfg.layer} ranks tokens by the attention of decoder "
                                 f"layer {i}, which was dropped")
        check_hook_order([*model.lm.hooks, pruner])
        model.lm.hooks.append(pruner)
        return {"method": method, **dataclasses.asdict(cfg)}

    def rebuild(self, model: VLA, resolved: dict[str, Any]) -> None:
        self.apply(model, resolved)
