"""DivPrune: keep a maximally diverse subset of visual tokens, chosen greedily for the max-min
cosine distance (each new token is the one farthest from everything already kept), starting, as the
authors do, from the token whose nearest neighbour is farthest (`first: mean`, the largest mean
distance, was vla-opt's earlier choice: 34-108 of 512 kept tokens differed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vlaopt.model.layout import TokenState
from vlaopt.optimize.tokens.base import PRUNERS, PrunerConfig, TokenPruner, keep_count, keep_visual
from vlaopt.utils.checks import check_choice

FIRST_PICKS = ("nearest", "mean")


def max_min_select(features: torch.Tensor, valid: torch.Tensor, k: int, first: str = "nearest") -> torch.Tensor:
    """Boolean (B, N) mask of k greedy max-min-distance picks among valid rows of features (B, N, D).

    The first pick is, with `first="nearest"` (the DivPrune authors' rule), the token whose nearest
    other valid token is farthest, or with `"mean"` (vla-opt's earlier rule, kept as an option) the
    token with the largest mean distance to the valid tokens. Cosine distance is 1 - similarity, so
    the farthest token from the kept set is the one whose largest similarity to it is smallest, and
    each greedy step needs only the similarities to the token just kept. For few picks (k <= N / 8)
    with the mean rule, those come from one matrix-vector product per step (k N D multiply-adds);
    otherwise one N x N similarity product up front (the nearest rule needs it for its first pick).
    The k sequential steps are scalar-sized work, so they run on the host in numpy (a torch dispatch
    per op, or a kernel launch on a GPU, would cost more than the op)."""
    check_choice("divprune first", first, FIRST_PICKS)
    x = F.normalize(features.detach().float(), dim=-1)  # a discrete choice: no gradient
    n = valid.shape[1]
    lazy = first == "mean" and k <= n // 8
    sim = None if lazy else x @ x.transpose(1, 2)
    if first == "nearest":  # largest similarity to another valid token: the nearest neighbour
        others = valid[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=valid.device)
        nearest = sim.masked_fill(~others, -torch.inf).amax(-1)
        first_pick = nearest.masked_fill(~valid, torch.inf).argmin(-1)
    else:
        total = (x * valid[..., None]).sum(1, keepdim=True)  # (B, 1, D)
        mean_sim = (x * total).sum(-1) / valid.sum(-1, keepdim=True).clamp(min=1)
        first_pick = mean_sim.masked_fill(~valid, np.inf).argmin(-1)  # largest mean distance
    x_np, valid_np, first_np = x.cpu().numpy(), valid.cpu().numpy(), first_pick.cpu().numpy()
    rows = np.arange(valid_np.shape[0])
    chosen = np.zeros(valid_np.shape, dtype=bool)
    sim_np = None if sim is None else sim.cpu().numpy()

    def keep(picks: np.ndarray) -> np.ndarray:  # mark picks kept; their similarities to all (B, N)
        chosen[rows, picks] = True
        if sim_np is not None:
            return sim_np[rows, picks]
        return np.matmul(x_np, x_np[rows, picks][..., None])[..., 0]

    # largest similarity of every token to the kept set; kept and padding tokens are pinned at +inf
    # (maximum keeps them there), so each greedy step is argmin, one product, maximum, one write
    max_sim = np.where(valid_np, keep(first_np), np.inf)
    max_sim[rows, first_np] = np.inf
    for _ in range(k - 1):
        nxt = max_sim.argmin(-1)
        np.maximum(max_sim, keep(nxt), out=max_sim)
        max_sim[rows, nxt] = np.inf
    return torch.from_numpy(chosen).to(valid.device) & valid


@dataclass
class DivPruneConfig(PrunerConfig):
    """`token_pruning` with method divprune; `first` chooses the first pick (see `max_min_select`)."""

    first: str = "nearest"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("divprune first", self.first, FIRST_PICKS)


@PRUNERS.register("divprune")
class DivPrune(TokenPruner):
    name = "divprune"
    config_cls = DivPruneConfig

    def forward(self, state: TokenState) -> TokenState:
        span = state.layout.span("visual")
        k = keep_count(state.layout.visual, self.cfg.keep)
        return keep_visual(state, max_min_select(state.hidden[:, span], state.valid[:, span], k, self.cfg.first), k)
