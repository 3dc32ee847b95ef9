"""Removing decoder blocks or their attention sublayers from the VLA's language model.

After a removal the live HF config (`model.lm.causal_lm.config`) describes what is left:
`num_hidden_layers` counts the remaining attention modules, `layer_types` (where the family has it)
lists theirs, and their `layer_idx` run 0..n-1, so a transformers cache built from that config keeps
one slot per remaining attention module and none for a removed one. Only our layer loop runs such an
LM (transformers' own forward would run the first `num_hidden_layers` layers, each with attention):
`layers.export.to_hf` makes the plain transformers model of it. `model.config.lm.hf_config` is
left as built: it is what `rebuild` starts from. Token-pruning hooks keep their place in the
residual stream: a hook before a removed block moves to the next remaining one. A decoder layer
whose attention a hook observes (FastV's layer before it, `LayerHook.observed_layers`) keeps it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from vlaopt.model.language import LanguageModel
    from vlaopt.model.vla import VLA


class MLPOnlyLayer(nn.Module):
    """A decoder layer whose attention sublayer was dropped: `h + mlp(post_attention_layernorm(h))`.

    It keeps the original submodules under their original names, so checkpoints of the kept weights
    line up, and it accepts (and ignores) the attention arguments of the layer loop."""

    def __init__(self, post_attention_layernorm: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp = mlp

    def forward(self, hidden_states: torch.Tensor, **_: Any) -> torch.Tensor:
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def has_attention(layer: nn.Module) -> bool:
    """Whether a decoder layer still has its attention sublayer."""
    return not isinstance(layer, MLPOnlyLayer)


def _check_indices(indices: Sequence[int], count: int, what: str) -> list[int]:
    out = sorted(indices)
    for i in out:
        if not isinstance(i, int) or not 0 <= i < count:
            raise ValueError(f"{what} index {i!r} is out of range; the LM has {count} decoder layers (0..{count - 1})")
    if len(set(out)) != len(out):
        raise ValueError(f"{what} indices {list(indices)} contain duplicates")
    return out


def renumber_attention(lm: LanguageModel) -> None:
    """Make the live HF config and the attention modules' `layer_idx` describe the remaining attention
    modules only (see the module docstring). Each `layer_idx` must index the config's `layer_types`
    as they were before this call."""
    config = lm.causal_lm.config
    attentions = [layer.self_attn for layer in lm.decoder.layers if has_attention(layer)]
    types = getattr(config, "layer_types", None)
    if types is not None:
        config.layer_types = [types[a.layer_idx] for a in attentions]
    for i, attention in enumerate(attentions):
        attention.layer_idx = i
    config.num_hidden_layers = len(attentions)


def remove_blocks(model: VLA, indices: Sequence[int]) -> None:
    """Remove whole decoder blocks `indices` (current numbering); at least one block must remain."""
    lm = model.lm
    layers = lm.decoder.layers
    removed = _check_indices(indices, len(layers), "removed block")
    kept = [i for i in range(len(layers)) if i not in removed]
    if not kept:
        raise ValueError(f"removing blocks {removed} would leave the LM with no decoder layer; keep at least one")
    moved = [sum(1 for i in kept if i < hook.layer) for hook in lm.hooks]
    for hook, new in zip(lm.hooks, moved, strict=True):
        if new == len(kept):
            raise ValueError(
                f"a token-pruning hook runs before decoder layer {hook.layer}, but removing blocks {removed} leaves "
                "no layer after it; remove fewer blocks or prune tokens earlier"
            )
        if hook.observed_layers() and (new == 0 or not has_attention(layers[kept[new - 1]])):
            before = "no layer" if new == 0 else f"decoder layer {kept[new - 1]}, whose attention was dropped,"
            raise ValueError(
                f"removing blocks {removed} leaves {before} right before the {hook.name} hook; it ranks tokens by "
                "the attention of that layer"
            )
    for hook, new in zip(lm.hooks, moved, strict=True):
        hook.layer = new
    lm.decoder.layers = nn.ModuleList(layers[i] for i in kept)
    renumber_attention(lm)


def drop_attention(model: VLA, indices: Sequence[int]) -> None:
    """Replace decoder layers `indices` by their MLP part (`MLPOnlyLayer`); each must still have
    attention, and none may be a layer whose attention a hook observes (the layer before FastV's)."""
    lm = model.lm
    layers = lm.decoder.layers
    indices = _check_indices(indices, len(layers), "dropped attention")
    for i in indices:
        if not has_attention(layers[i]):
            raise ValueError(f"decoder layer {i} has no attention sublayer left to drop")
        observers = [hook.name for hook in lm.hooks if i in hook.observed_layers()]
        if observers:
            raise ValueError(f"decoder layer {i} keeps its attention: the {observers[0]} hook after it ranks tokens "
                             "with it")
    for i in indices:
        layers[i] = MLPOnlyLayer(layers[i].post_attention_layernorm, layers[i].mlp)
    renumber_attention(lm)
