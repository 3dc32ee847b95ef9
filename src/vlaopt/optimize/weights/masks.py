"""Pruning masks. A mask is a boolean tensor of a weight's shape, True where the weight is pruned
(set to zero). Unstructured masks prune the lowest scores of a whole matrix or of each row; N:M
masks keep the N highest scores in every group of M consecutive inputs of a row (2:4 is NVIDIA's
semi-structured sparsity)."""

from __future__ import annotations

import torch


def parse_pattern(pattern: str) -> tuple[int, int]:
    """`"N:M"` (keep N of every M) as `(N, M)`, with 0 < N < M."""
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 < n < m:
            return n, m
    raise ValueError(f"sparsity pattern {pattern!r} is not valid; expected 'N:M' with 0 < N < M, e.g. '2:4'")


def lowest(scores: torch.Tensor, count: int, per_row: bool) -> torch.Tensor:
    """Mask of the `count` lowest scores of the whole matrix, or of each row when `per_row`."""
    flat = scores.reshape(scores.shape[0], -1) if per_row else scores.reshape(1, -1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if count > 0:
        mask.scatter_(1, flat.topk(count, dim=1, largest=False).indices, True)
    return mask.reshape(scores.shape)


def n_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask pruning the m - n lowest scores in every group of m consecutive columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"an N:M pattern with M={m} needs a column count divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, groups.topk(m - n, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)


def zeros_per_group(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Number of zeros in every group of m consecutive columns of each row, shape (rows, cols / m)."""
    return (weight.reshape(weight.shape[0], -1, m) == 0).sum(-1)
