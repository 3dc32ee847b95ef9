"""Choosing modules by name pattern: `targets` and `ignore` are shell-style patterns (`fnmatch`, where
`*` also crosses dots) over module names such as `lm.causal_lm.model.layers.3.mlp.down_proj`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

DEFAULT_TARGETS = ("lm.causal_lm.model.layers.*",)  # the decoder layers' linears; not embeddings or lm_head


def select_modules(
    model: nn.Module, targets: Sequence[str], ignore: Sequence[str], kind: type[nn.Module], where: str
) -> dict[str, nn.Module]:
    """Modules of type `kind` whose name matches a target and no ignore pattern; a target that
    matches no such module is an error naming it."""
    named = {name: m for name, m in model.named_modules() if isinstance(m, kind)}
    for pattern in targets:
        if not any(fnmatchcase(name, pattern) for name in named):
            examples = ", ".join(list(named)[:3]) or "none"
            raise ValueError(
                f"{where}: target {pattern!r} matches no {kind.__name__} module (e.g. {examples}); "
                "a module already quantized or removed is no longer a target"
            )
    return {
        name: m
        for name, m in named.items()
        if any(fnmatchcase(name, p) for p in targets) and not any(fnmatchcase(name, p) for p in ignore)
    }


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` in place of the submodule called `name`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def replace_with_empty(model: nn.Module, names: list[str], build: Callable[[nn.Linear], nn.Module]) -> None:
    """Replace the `nn.Linear` modules called `names` by `build(linear)`: empty modules of their shape
    (a quantized kind), made outside inference mode with a zero bias where the linear has one and
    moved to its device, to be filled by loading saved weights."""
    for name in names:
        linear = model.get_submodule(name)
        with torch.inference_mode(False):
            module = build(linear)
            if linear.bias is not None:
                module.bias.data = torch.zeros(linear.out_features, dtype=linear.bias.dtype)
        replace_module(model, name, module.to(linear.weight.device))
