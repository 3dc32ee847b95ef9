"""Visual-token pruners: hooks run before a decoder layer that drop or merge visual tokens.

A pruner scores the visual segment of the token state and keeps a subset; kept tokens keep their
original position ids, and the Layout and validity mask follow. Samples may keep different numbers
of tokens: the visual segment is then padded to the largest count and the padding marked invalid,
so a batch gives each sample's solo result.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from vlaopt.model.hooks import LayerHook
from vlaopt.model.layout import TokenState
from vlaopt.utils.registry import Registry

PRUNERS: Registry[type[TokenPruner]] = Registry("token pruning method")


@dataclass
class PrunerConfig:
    """Where to prune (before decoder layer `layer`; 0 = on the LM input) and what fraction to keep."""

    layer: int = 0
    keep: float = 0.25

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer={self.layer!r} must be a non-negative integer")
        if not 0 < float(self.keep) <= 1:
            raise ValueError(f"keep={self.keep!r} must be in (0, 1]")


def keep_count(n: int, keep: float) -> int:
    """Number of tokens kept of `n` at ratio `keep` (at least one)."""
    return max(1, min(n, round(n * keep)))


def replace_visual(
    state: TokenState, hidden: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor
) -> TokenState:
    """A new state whose visual segment is (hidden, position_ids, valid) of shape (B, K, ...)."""
    span = state.layout.span("visual")
    before, after = slice(0, span.start), slice(span.stop, None)

    def splice(full: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
        return torch.cat([full[:, before], vis, full[:, after]], dim=1)

    return replace(state, hidden=splice(state.hidden, hidden), position_ids=splice(state.position_ids, position_ids),
                   valid=splice(state.valid, valid), layout=state.layout.with_visual(hidden.shape[1]))


def keep_visual(state: TokenState, keep: torch.Tensor, at_most: int | None = None) -> TokenState:
    """Keep the visual tokens where `keep` (B, Nv) is True, in their original order.

    `at_most` is a bound on the tokens any sample keeps that the pruner knows in advance (its top-k):
    the segment then has that fixed length, with padding wherever a sample keeps fewer (possible only
    after an earlier pruner padded), so no count is read back from the tensors and torch.compile
    traces one graph. Without it (LightVLA's votes) the length is the largest count in the batch."""
    span = state.layout.span("visual")
    order, valid = to_front(keep & state.valid[:, span], at_most)
    hidden = state.hidden[:, span].gather(1, order[..., None].expand(-1, -1, state.hidden.shape[-1]))
    positions = state.position_ids[:, span].gather(1, order)
    return replace_visual(state, hidden, positions, valid)


def to_front(mask: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, K) of each row's True entries of `mask` (B, N), in their order, and which of the K
    are real (the rest pad a row with fewer); K is `length`, else the largest count in the batch."""
    counts = mask.sum(1)
    k = int(counts.max().item()) if length is None else length
    # a stable sort brings the True entries to the front without reordering them
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :k]
    return order, torch.arange(k, device=mask.device)[None] < counts[:, None]


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k highest scores per row (B, N)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter(1, scores.topk(k, dim=1).indices, True)


class TokenPruner(LayerHook):
    """Base of all pruners: a layer-loop hook (model/hooks.py) with a config and a name in `PRUNERS`."""

    config_cls: ClassVar[type[PrunerConfig]] = PrunerConfig
    # True for a pruner that works on the whole patch grid of every camera (pooling): no earlier
    # hook may have changed the visual segment it sees
    needs_full_grid: ClassVar[bool] = False

    def __init__(self, cfg: PrunerConfig, model: nn.Module) -> None:
        super().__init__(cfg.layer)
        self.cfg = cfg
