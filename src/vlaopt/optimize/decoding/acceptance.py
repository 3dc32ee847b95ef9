"""The verification rules of speculative decoding, as pure functions of drafted tokens and the
target's (and draft's) distributions (Leviathan et al. 2023; Chen et al. 2023).

Greedy: a drafted token is kept while it equals the target's argmax at its position, so the output
is the target's own greedy text. Sampled: drafted token x (drawn from q) is kept with probability
min(1, p(x) / q(x)); at the first rejection the replacement is drawn from max(0, p - q), normalized.
The emitted tokens are then distributed exactly as sampling from p (tests/test_speculative.py).
"""

from __future__ import annotations

import torch


def greedy_accept(drafts: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Accepted drafts per sample (B,): the length of the prefix of `drafts` (B, k) equal to the
    target's greedy tokens `target` (B, k) at the same positions."""
    return (drafts == target).long().cumprod(1).sum(1)


def sample_accept(drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted (B,), replacement (B,)) for drafts (B, k) drawn from q (B, k, V), the target's
    distributions p (B, k, V) at the same positions. `replacement` is the token drawn from the
    residual max(0, p - q) at the first rejected position, -1 where every draft was accepted (the
    next token is then drawn from the target's distribution after the last draft)."""
    b, k = drafts.shape
    pick = drafts[..., None]
    ratio = p.gather(-1, pick)[..., 0] / q.gather(-1, pick)[..., 0].clamp(min=1e-20)
    u = torch.rand((b, k), generator=generator, device="cpu").to(p.device)
    accepted = (u < ratio.clamp(max=1)).long().cumprod(1).sum(1)
    at = accepted.clamp(max=k - 1)
    rows = torch.arange(b, device=p.device)
    residual = (p[rows, at] - q[rows, at]).clamp(min=0)
    empty = residual.sum(-1, keepdim=True) <= 0  # p == q there: any draw from p is exact
    residual = torch.where(empty, p[rows, at], residual)
    drawn = torch.multinomial((residual / residual.sum(-1, keepdim=True)).cpu(), 1, generator=generator)[:, 0]
    return accepted, torch.where(accepted < k, drawn.to(p.device), torch.full_like(drawn.to(p.device), -1))
