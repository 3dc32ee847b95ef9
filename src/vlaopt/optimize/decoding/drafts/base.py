"""The draft registry. A draft is built as `DRAFTS.get(name)(model, cfg)` (the VLA and its
`SpeculativeConfig`) and proposes `k` tokens continuing the emitted text with `propose(lm, cache,
history, first, valid, k, scores, generator) -> (drafts (B, k), q (B, k, V))`, q being the
distributions it drew them from (one-hot for a deterministic proposal)."""

from collections.abc import Callable

import torch

from vlaopt.utils.registry import Registry

Scores = Callable[[torch.Tensor], torch.Tensor]  # logits (B, V) -> processed scores (B, V)
DRAFTS: Registry[type] = Registry("draft")
