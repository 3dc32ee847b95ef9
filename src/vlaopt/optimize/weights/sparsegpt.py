"""SparseGPT (Frantar & Alistarh, 2023): prune each linear layer to minimize ||W X - W' X||^2 on the
calibration inputs. Columns are visited left to right in blocks; in each block the mask takes the
weights of lowest w^2 / [H^-1]_jj^2 (per block, or per group of M for N:M), and the error of every
pruned weight is spread over the not yet visited weights of its row through the inverse Hessian
H = X^T X (damped by `damp` times its mean diagonal), as in the optimal brain surgeon update.

Tested equal to a re-typed copy of the authors' `fasterprune` (IST-DASLab/sparsegpt) on the same
inputs (tests/test_weights.py), with one deliberate difference: their unstructured threshold keeps
the weights strictly above the sorted score at index int(sparsity * numel), which prunes one weight
more than asked in each block; we prune exactly the asked fraction (an effect of one weight in
rows x block_size weights: one in 73,728 for a 576-row layer at block size 128)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlaopt.optimize.weights.base import WEIGHT_PRUNERS, Hessian, WeightPruner, WeightPruningConfig
from vlaopt.optimize.weights.masks import lowest, n_m


@dataclass
class SparseGPTConfig(WeightPruningConfig):
    block_size: int = 128
    damp: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"sparsegpt block_size={self.block_size!r} must be a positive integer")
        if self.nm is not None and self.block_size % self.nm[1]:
            raise ValueError(
                f"sparsegpt block_size={self.block_size} must be a multiple of M={self.nm[1]} of {self.pattern}"
            )
        if not self.damp > 0:
            raise ValueError(f"sparsegpt damp={self.damp!r} must be positive")


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the inverse of the damped Hessian."""
    h = hessian + damp * hessian.diagonal().mean() * torch.eye(len(hessian), dtype=hessian.dtype, device=hessian.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


@WEIGHT_PRUNERS.register("sparsegpt")
class SparseGPTPruner(WeightPruner):
    config_cls = SparseGPTConfig
    stats_cls = Hessian

    def prune(self, weight: torch.Tensor, stats: Hessian) -> torch.Tensor:
        cfg = self.cfg
        w = weight.clone()
        h = stats.matrix().to(w.device).clone()
        dead = h.diagonal() == 0  # inputs that were always zero: their weights cannot matter
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        hinv = inverse_hessian_factor(h, cfg.damp)
        cols = w.shape[1]
        for start in range(0, cols, cfg.block_size):
            stop = min(start + cfg.block_size, cols)
            block, hinv_block = w[:, start:stop].clone(), hinv[start:stop, start:stop]
            d = hinv_block.diagonal()
            errors = torch.zeros_like(block)
            if cfg.nm is None:
                mask = lowest(block.square() / d.square(), round(cfg.sparsity * block.numel()), per_row=False)
            else:
                n, m = cfg.nm
                mask = torch.zeros_like(block, dtype=torch.bool)
            for i in range(stop - start):
                if cfg.nm is not None and i % m == 0:
                    mask[:, i : i + m] = n_m(block[:, i : i + m].square() / d[i : i + m].square(), n, m)
                col = block[:, i]
                kept = col.masked_fill(mask[:, i], 0.0)
                err = (col - kept) / d[i]
                block[:, i:] -= err[:, None] * hinv_block[i, i:][None, :]
                block[:, i] = kept
                errors[:, i] = err
            w[:, start:stop] = block
            w[:, stop:] -= errors @ hinv[start:stop, stop:]
        return w
