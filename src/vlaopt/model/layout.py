"""The Layout: the one object that knows where each segment of the VLA sequence lies.

Sequence: [BOS][visual][proprio][prompt][action slots][STOP] (SmolVLA: the proprio after the prompt).
Segments are contiguous ranges shared by the whole batch; per-sample padding (prompts of different
lengths, or visual tokens kept in different numbers by a pruner) is carried by the `valid` mask of a
`TokenState`, not by the Layout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch

SEGMENTS = ("bos", "visual", "proprio", "prompt", "action", "stop")
AFTER_PROMPT = ("bos", "visual", "prompt", "proprio", "action", "stop")


@dataclass(frozen=True)
class Layout:
    """Segment lengths of a (batched) sequence; `span(name)` gives the slice of a segment."""

    visual: int
    proprio: int
    prompt: int
    action: int
    bos: int = 1
    stop: int = 1
    proprio_after_prompt: bool = False  # SmolVLA's order: [visual][prompt][proprio]
    proprio_block: bool = False  # full attention: the proprio (and what follows) is hidden from what precedes it

    @property
    def order(self) -> tuple[str, ...]:
        return AFTER_PROMPT if self.proprio_after_prompt else SEGMENTS

    def span(self, name: str) -> slice:
        if name not in SEGMENTS:
            raise KeyError(f"unknown segment {name!r}; expected one of {', '.join(SEGMENTS)}")
        start = 0
        for seg in self.order:
            length = getattr(self, seg)
            if seg == name:
                return slice(start, start + length)
            start += length
        raise AssertionError("unreachable")

    @property
    def length(self) -> int:
        return sum(getattr(self, seg) for seg in SEGMENTS)

    def with_visual(self, n: int) -> Layout:
        """The same layout with `n` visual tokens (after pruning)."""
        return replace(self, visual=n)


def _allowed(layout: Layout, bidirectional_actions: bool, keys: torch.Tensor, queries: torch.Tensor,
             full: bool = False) -> torch.Tensor:
    """(Q, S) bool: query row may attend key column (causal, plus all-to-all among action slots; `full`:
    every key)."""
    if full:
        if not layout.proprio_block:
            return torch.ones(len(queries), len(keys), dtype=torch.bool, device=keys.device)
        start = layout.span("proprio").start  # big_vision's blocks: a later block sees the earlier ones
        return ~((keys[None, :] >= start) & (queries[:, None] < start))
    allowed = keys[None, :] <= queries[:, None]
    if bidirectional_actions:
        act = layout.span("action")
        in_action = lambda idx: (idx >= act.start) & (idx < act.stop)  # noqa: E731
        allowed = allowed | (in_action(queries)[:, None] & in_action(keys)[None, :])
    return allowed


@lru_cache(maxsize=64)
def _cached_allowed(layout: Layout, bidirectional_actions: bool, full: bool, device: torch.device) -> torch.Tensor:
    """`_allowed` for every row of one layout, kept for the next call with that layout (a closed loop
    repeats a few layouts; building the mask was ~0.4 ms of medium's predict_action)."""
    keys = torch.arange(layout.length, device=device)
    return _allowed(layout, bidirectional_actions, keys, keys, full)


@dataclass
class TokenState:
    """What flows between decoder layers: hidden states, their original position ids, validity."""

    hidden: torch.Tensor  # (B, S, D)
    position_ids: torch.Tensor  # (B, S) long; original positions, kept through pruning
    valid: torch.Tensor  # (B, S) bool; False for padding
    layout: Layout
    bidirectional_actions: bool = True
    full_attention: bool = False  # no causal mask at all (VLAConfig.full_attention)
    proprio: torch.Tensor | None = None  # (B, P) normalized, for a head that takes it outside the sequence (pi0)

    def attention_mask(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean (B, 1, S, S) mask, True where a query may attend a key: causal over valid keys,
        plus all-to-all among action slots when `bidirectional_actions` (every valid key when
        `full_attention`). `rows` (query indices)
        builds only those rows: (B, 1, len(rows), S)."""
        if rows is None and not torch.compiler.is_compiling():  # a compiled graph builds it in place
            allowed = _cached_allowed(self.layout, self.bidirectional_actions, self.full_attention, self.hidden.device)
        else:
            keys = torch.arange(self.hidden.shape[1], device=self.hidden.device)
            allowed = _allowed(self.layout, self.bidirectional_actions, keys, keys if rows is None else rows,
                               self.full_attention)
        return (allowed[None] & self.valid[:, None, :])[:, None]
