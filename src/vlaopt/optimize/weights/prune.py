"""Running a weight pruner over the targeted linear layers of a VLA.

Data-free methods prune every target directly. Methods that need input statistics prune one decoder
layer at a time, sequentially: the layer's inputs come from the calibration walk through the already
pruned layers before it, statistics are gathered with forward hooks on its targeted linears (valid
tokens only), the linears are pruned, and the walk goes on with the pruned layer's outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlaopt.model.layout import TokenState
from vlaopt.optimize.calibration import walk_layers
from vlaopt.optimize.weights.base import Stats, WeightPruner

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA


def prune_linear(linear: nn.Linear, pruner: WeightPruner, stats: Stats | None) -> None:
    """Replace the weight of `linear` by its pruned version, in place."""
    with torch.no_grad():
        linear.weight.copy_(pruner.prune(linear.weight.detach().float(), stats).to(linear.weight.dtype))


def _by_layer(model: VLA, targets: dict[str, nn.Linear]) -> dict[int, dict[str, nn.Linear]]:
    owner = {id(m): i for i, layer in enumerate(model.lm.decoder.layers) for m in layer.modules()}
    out: dict[int, dict[str, nn.Linear]] = {}
    for name, linear in targets.items():
        if id(linear) not in owner:
            raise ValueError(
                f"{name} is not inside a decoder layer of the LM; methods that use calibration data prune "
                "only decoder-layer linears (narrow the targets, or use magnitude)"
            )
        out.setdefault(owner[id(linear)], {})[name] = linear
    return out


def collect_stats(
    layer_inputs: list[Any], layer: nn.Module, linears: dict[str, nn.Linear], kind: type[Stats]
) -> dict[str, Stats]:
    """Statistics of the inputs of `linears` while `layer` runs on `layer_inputs` (valid tokens only)."""
    stats = {name: kind(linear.in_features) for name, linear in linears.items()}
    valid: list[torch.Tensor] = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            stats[name].add(args[0][valid[0]])

        return record

    handles = [linear.register_forward_hook(hook(name)) for name, linear in linears.items()]
    try:
        for inp in layer_inputs:
            valid[:] = [inp.state.valid]
            inp.run(layer)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def prune_model(
    model: VLA, pruner: WeightPruner, targets: dict[str, nn.Linear], states: list[TokenState] | None
) -> None:
    """Prune the linear layers `targets` (name -> module) of `model` with `pruner`."""
    if pruner.stats_cls is None:
        for linear in targets.values():
            prune_linear(linear, pruner, None)
        return
    groups = _by_layer(model, targets)
    for i, layer, inputs in walk_layers(model.lm, states):
        if i not in groups:
            continue
        stats = collect_stats(inputs, layer, groups[i], pruner.stats_cls)
        for name, linear in groups[i].items():
            prune_linear(linear, pruner, stats[name])
