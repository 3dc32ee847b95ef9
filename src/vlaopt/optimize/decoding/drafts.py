"""Draft proposers for speculative decoding; each proposes `k` tokens continuing the emitted text.

- `self` (LayerSkip-style self-speculation): the LM's first `layers` decoder layers, its final norm
  and its LM head; it runs on a fork of the cache (those layers' keys/values, shared), so the
  prefix is not recomputed and the verifier's cache is left as it is.
- `ngram` (prompt lookup decoding): the tokens that followed the most recent earlier occurrence of
  the last n emitted tokens (n from `ngram` down to 1) in the text emitted so far; no network runs.
  Its distribution is the one-hot of its proposal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vlaopt.model.decode import feed, pick
from vlaopt.model.kv_cache import KVCache
from vlaopt.model.language import LanguageModel, attention_of
from vlaopt.utils.registry import Registry

Scores = Callable[[torch.Tensor], torch.Tensor]  # logits (B, V) -> processed scores (B, V)
DRAFTS: Registry[type] = Registry("draft")


@DRAFTS.register("self")
class EarlyExitDraft:
    def __init__(self, lm: LanguageModel, layers: int, ngram: int) -> None:
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


@DRAFTS.register("ngram")
class NGramDraft:
    def __init__(self, lm: LanguageModel, layers: int, ngram: int) -> None:
        if ngram < 1:
            raise ValueError(f"speculative ngram={ngram} must be at least 1")
        self.ngram = ngram
        self.vocab = lm.vocab_size

    def lookup(self, text: list[int], k: int) -> list[int]:
        """The k tokens after the most recent earlier match of the longest suffix of `text` (up to
        `ngram` tokens); the last token repeated when nothing matches."""
        for n in range(min(self.ngram, len(text) - 1), 0, -1):
            tail = text[-n:]
            for start in range(len(text) - n - 1, -1, -1):
                if text[start:start + n] == tail:
                    follow = text[start + n:start + n + k]
                    return follow + [follow[-1]] * (k - len(follow))
        return [text[-1]] * k

    def propose(self, lm: LanguageModel, cache: KVCache, history: list[list[int]], first: torch.Tensor,
                valid: torch.Tensor, k: int, scores: Scores,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        drafts = torch.tensor([self.lookup(h + [int(f)], k) for h, f in zip(history, first.tolist())],
                              dtype=torch.long, device=first.device)
        return drafts, F.one_hot(drafts, self.vocab).float()
