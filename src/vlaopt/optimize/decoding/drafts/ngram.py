"""The `ngram` draft (prompt lookup decoding): the tokens that followed the most recent earlier
occurrence of the last n emitted tokens (n from `ngram` down to 1) in the text emitted so far; no
network runs. Its distribution is the one-hot of its proposal."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlaopt.model.kv_cache import KVCache
from vlaopt.model.language import LanguageModel
from vlaopt.optimize.decoding.drafts.base import DRAFTS, Scores

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA


@DRAFTS.register("ngram")
class NGramDraft:
    def __init__(self, model: VLA, cfg: Any) -> None:
        self.ngram = cfg.ngram
        self.vocab = model.lm.vocab_size

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
