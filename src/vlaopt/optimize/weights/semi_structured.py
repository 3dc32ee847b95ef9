"""2:4 sparsity as speed, on CUDA only: `to_semi_structured(model)` swaps the 2:4-pruned weights of
the targeted linear layers for `torch.sparse.to_sparse_semi_structured` tensors, whose matmuls run on
the sparse tensor cores (fp16 / bf16, Ampere or newer). It is a runtime transform of a loaded model,
not a recipe step: the swapped weights do not save. On CPU nothing turns zeroed weights into speed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlaopt.optimize.weights.masks import zeros_per_group
from vlaopt.optimize.weights.targets import DEFAULT_TARGETS, select_modules


def to_semi_structured(
    model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS, ignore: Sequence[str] = ()
) -> list[str]:
    """Convert the 2:4-sparse targeted linear weights of a CUDA fp16/bf16 model; returns their names."""
    names = []
    for name, linear in select_modules(model, targets, ignore, nn.Linear, "to_semi_structured").items():
        w = linear.weight.detach()
        if w.device.type != "cuda" or w.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"{name} is {w.dtype} on {w.device}; semi-structured sparsity needs float16 or bfloat16 on CUDA"
            )
        if w.shape[1] % 4 or (zeros_per_group(w, 4) < 2).any():
            raise ValueError(
                f"{name} is not 2:4 sparse (every group of 4 inputs needs 2 zeros); prune with pattern '2:4' first"
            )
        linear.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(w), requires_grad=False)
        names.append(name)
    return names
