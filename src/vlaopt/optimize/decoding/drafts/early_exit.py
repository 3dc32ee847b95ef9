"""The `self` draft (LayerSkip-style self-speculation): the LM's first `layers` decoder layers, its
final norm and its LM head. It runs on a fork of the cache (those layers' keys/values, shared), so
the prefix is not recomputed and the verifier's cache is left as it is."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vlaopt.model.decode import feed, pick
from vlaopt.model.kv_cache import KVCache
from vlaopt.model.language import LanguageModel, attention_of
from vlaopt.optimize.decoding.drafts.base import DRAFTS, Scores

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA


@DRAFTS.register("self")
class EarlyExitDraft:
    def __init__(self, model: VLA, cfg: Any) -> None:
        lm, layers = model.lm, cfg.layers
        if not 0 < layers < len(lm.decoder.layers):
            raise ValueError(f"speculative layers={layers}: the draft needs 1 to {len(lm.decoder.layers) - 1} of the "
                             f"LM's {len(lm.decoder.layers)} decoder layers")
        self.layers = layers
        attn = (attention_of(layer) for layer in lm.decoder.layers[:layers])
        self.attention = [a.layer_idx for a in attn if a is not None]

    def propose(self, lm: LanguageModel, cache: KVCache, history: list[list[int]], first: torch.Tensor,
                valid: torch.Tensor, k: int, scores: Scores,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Drafts (B, k) after `first` (B,) and their distributions q (B, k, V)."""
        fork, ids, drafts, probs = cache.fork(self.attention), first, [], []
        for _ in range(k):
            processed = scores(feed(lm, fork, ids[:, None], valid[:, None], depth=self.layers)[:, 0].float())
            ids = pick(processed, generator)
            drafts.append(ids)
            probs.append(processed.softmax(-1))
        return torch.stack(drafts, 1), torch.stack(probs, 1)
