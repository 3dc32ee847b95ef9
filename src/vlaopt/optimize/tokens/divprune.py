"""DivPrune: keep a maximally diverse subset of visual tokens, chosen greedily for the max-min
cosine distance (each new token is the one farthest from everything already kept)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlaopt.model.layout import TokenState
from vlaopt.optimize.tokens.base import PRUNERS, TokenPruner, keep_count, keep_visual


def max_min_select(features: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean (B, N) mask of k greedy max-min-distance picks among valid rows of features (B, N, D).

    The first pick is the token with the largest mean distance to the others."""
    x = F.normalize(features.detach().float(), dim=-1)  # a discrete choice: no gradient
    dist = 1 - x @ x.transpose(1, 2)  # (B, N, N) cosine distance
    dist = dist.masked_fill(~valid[:, None, :], 0.0)
    b, n = valid.shape
    neg = torch.finfo(dist.dtype).min
    first = (dist.sum(-1) / valid.sum(-1, keepdim=True).clamp(min=1)).masked_fill(~valid, neg).argmax(-1)
    rows = torch.arange(b, device=features.device)
    picks = [first]
    # distance of every token to the kept set; kept and padding tokens are pinned at -inf-like `neg`
    # (minimum keeps them there), so each greedy step is argmax, one row read, minimum, one write
    min_dist = dist[rows, first].masked_fill(~valid, neg)
    min_dist[rows, first] = neg
    for _ in range(k - 1):
        nxt = min_dist.argmax(-1)
        picks.append(nxt)
        torch.minimum(min_dist, dist[rows, nxt], out=min_dist)
        min_dist[rows, nxt] = neg
    chosen = torch.zeros(b, n, dtype=torch.bool, device=features.device)
    chosen[rows[:, None], torch.stack(picks, 1)] = True
    return chosen & valid


@PRUNERS.register("divprune")
class DivPrune(TokenPruner):
    def forward(self, state: TokenState) -> TokenState:
        span = state.layout.span("visual")
        k = keep_count(state.layout.visual, self.cfg.keep)
        return keep_visual(state, max_min_select(state.hidden[:, span], state.valid[:, span], k))
