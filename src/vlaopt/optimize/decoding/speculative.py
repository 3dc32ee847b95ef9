"""Speculative decoding of reasoning text: each round the draft proposes k tokens after the next one,
the LM verifies all of them in one pass (`model.decode.feed`), and the accepted prefix is kept
(acceptance.py). Rejected tokens' cache slots are masked out rather than removed, so a batch keeps
one cache; every emitted token, the stop token included, ends up in the cache as in plain decoding.

`SpeculativeDecoder` has `generate_text`'s signature and returns the same tokens under greedy
decoding (tested against it); with sampling, the same distribution. `stats` counts, across calls,
rounds, passes (the samples each round verified), drafted, accepted and emitted tokens (acceptance
rate = accepted / drafted; tokens per LM pass of a sample = emitted / passes).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessorList

from vlaopt.model.decode import feed, pick
from vlaopt.model.kv_cache import KVCache
from vlaopt.model.language import LanguageModel
from vlaopt.optimize.decoding.acceptance import greedy_accept, sample_accept


class SpeculativeDecoder:
    def __init__(self, draft: Any, k: int) -> None:
        self.draft, self.k = draft, k
        self.stats = {"rounds": 0, "passes": 0, "drafted": 0, "accepted": 0, "emitted": 0}

    def __call__(self, lm: LanguageModel, cache: KVCache, logits: torch.Tensor, max_tokens: int,
                 processors: LogitsProcessorList, stop_id: int, pad_id: int,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, device = logits.shape[0], logits.device
        history: list[list[int]] = [[] for _ in range(batch)]
        active = torch.full((batch,), max_tokens > 0, dtype=torch.bool, device=device)
        none = torch.full((batch,), -1, dtype=torch.long, device=device)
        forced = none  # a residual draw of the last round, emitted first in this one (-1: none)

        def scores(x: torch.Tensor) -> torch.Tensor:
            return processors(x.new_zeros((x.shape[0], 0), dtype=torch.long), x)

        while bool(active.any()):
            left = max_tokens - min(len(h) for h, a in zip(history, active.tolist()) if a)
            first = torch.where(forced >= 0, forced, pick(scores(logits.float()), generator))
            first = torch.where(active, first, torch.full_like(first, pad_id))
            k = min(self.k, left - 1)
            if k > 0:
                drafts, q = self.draft.propose(lm, cache, history, first, active, k, scores, generator)
            else:
                drafts, q = first.new_zeros(batch, 0), None
            seq = torch.cat([first[:, None], drafts], 1)
            stopped = torch.cat([torch.zeros_like(first[:, None], dtype=torch.bool), seq[:, :-1] == stop_id], 1)
            valid = active[:, None] & ~stopped.long().cumsum(1).bool()
            verified = feed(lm, cache, seq, valid).float()  # (B, 1 + k, V): logits after each fed token
            accepted, forced = torch.zeros_like(first), none
            if k > 0 and generator is None:
                accepted = greedy_accept(drafts, scores_all(scores, verified[:, :k]).argmax(-1))
            elif k > 0:
                accepted, forced = sample_accept(drafts, q, scores_all(scores, verified[:, :k]).softmax(-1), generator)
            # emit the first token and the accepted drafts, up to a stop token and the budget
            n = torch.minimum(1 + accepted, valid.long().sum(1))
            for b in range(batch):
                if not active[b]:
                    continue
                take = seq[b, : int(n[b])].tolist()[: max_tokens - len(history[b])]
                history[b].extend(take)
                n[b] = len(take)
            cache.keep_last(n, seq.shape[1])
            cache.next_position = cache.next_position - valid.long().sum(1) + n
            rows = torch.arange(batch, device=device)
            logits = torch.where(active[:, None], verified[rows, (n - 1).clamp(min=0)], logits)
            done = torch.tensor([bool(h) and h[-1] == stop_id or len(h) >= max_tokens for h in history], device=device)
            forced = torch.where(n == 1 + accepted, forced, none)  # cut short: no residual
            active = active & ~done
            self.stats["rounds"] += 1
            self.stats["passes"] += int(valid[:, 0].sum())
            self.stats["drafted"] += k * int(valid[:, 0].sum())
            self.stats["accepted"] += int(torch.minimum(accepted, (n - 1).clamp(min=0))[valid[:, 0]].sum())
            self.stats["emitted"] += int(n.sum())
        width = max(len(h) for h in history)
        out = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
        for b, h in enumerate(history):
            out[b, : len(h)] = torch.tensor(h, dtype=torch.long)
        return out, logits


def scores_all(scores: Any, logits: torch.Tensor) -> torch.Tensor:
    """The processed scores of every position of logits (B, T, V)."""
    b, t, v = logits.shape
    return scores(logits.reshape(b * t, v)).reshape(b, t, v)
