"""DivPrune: keep a maximally diverse subset of visual tokens, chosen greedily for the max-min
cosine distance (each new token is the one farthest from everything already kept)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vlaopt.model.layout import TokenState
from vlaopt.optimize.tokens.base import PRUNERS, TokenPruner, keep_count, keep_visual


def max_min_select(features: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean (B, N) mask of k greedy max-min-distance picks among valid rows of features (B, N, D).

    The first pick is the token with the largest mean distance to the valid tokens. Cosine distance
    is 1 - similarity, so the farthest token from the kept set is the one whose largest similarity
    to it is smallest: the loop works on the similarity matrix (one product on the model's device)
    and the first pick needs only each token's product with the sum of the valid tokens. The greedy
    loop is k sequential steps of a few scalar-sized ops, so it runs on the host in numpy (per step
    ~1 us instead of a ~3-10 us torch dispatch, or a kernel launch on a GPU)."""
    x = F.normalize(features.detach().float(), dim=-1)  # a discrete choice: no gradient
    sim = x @ x.transpose(1, 2)  # (B, N, N)
    total = (x * valid[..., None]).sum(1, keepdim=True)  # (B, 1, D)
    mean_sim = (x * total).sum(-1) / valid.sum(-1, keepdim=True).clamp(min=1)
    first = mean_sim.masked_fill(~valid, np.inf).argmin(-1)  # largest mean distance
    sim_np, valid_np, first_np = sim.cpu().numpy(), valid.cpu().numpy(), first.cpu().numpy()
    rows = np.arange(valid_np.shape[0])
    chosen = np.zeros(valid_np.shape, dtype=bool)
    chosen[rows, first_np] = True
    # largest similarity of every token to the kept set; kept and padding tokens are pinned at +inf
    # (maximum keeps them there), so each greedy step is argmin, one row read, maximum, one write
    max_sim = np.where(valid_np, sim_np[rows, first_np], np.inf)
    max_sim[rows, first_np] = np.inf
    for _ in range(k - 1):
        nxt = max_sim.argmin(-1)
        chosen[rows, nxt] = True
        np.maximum(max_sim, sim_np[rows, nxt], out=max_sim)
        max_sim[rows, nxt] = np.inf
    return torch.from_numpy(chosen).to(valid.device) & valid


@PRUNERS.register("divprune")
class DivPrune(TokenPruner):
    def forward(self, state: TokenState) -> TokenState:
        span = state.layout.span("visual")
        k = keep_count(state.layout.visual, self.cfg.keep)
        return keep_visual(state, max_min_select(state.hidden[:, span], state.valid[:, span], k))
