"""H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", 2023): keep the `recent` most recent tokens and the `heavy` tokens with the largest
accumulated attention scores, evict the rest.

The authors' `H2OKVCache_LayerWise` (FMInference/H2O, h2o_hf/utils_real_drop/modify_llama.py) sums
every query's attention probabilities over the cached keys into a score per key (added to the score
it already had; new keys start from their first query), and once the cache holds more than
heavy + recent keys keeps the last `recent` and, among the others, the top-`heavy` scores; the kept
keys keep their scores. We do the same per sample on its valid slots, with the probabilities of
the valid queries only (a padding query's attention is not counted). The scores come from the layer
loop: the cache's `observer` receives each attention layer's post-RoPE queries, all its keys and its
mask while the layer runs (model/language.py), and `attention_probs` computes the softmax rows SDPA
computes (tests/test_kv_compression.py checks them against transformers' eager attention weights).

Deviations, on purpose:

- Per layer, not per head. The authors score and select per attention head (each head keeps its
  own tokens). Our cache keeps one validity and one original position per slot and layer (B, S),
  which the causal check of decoding (`with_past`), the expert's masks (`ExpertKV`, (B, 1, T, S)),
  speculative decoding's `keep_last` and the SmolVLA cross layers all read; per-head selection would
  make slot j a different token in every head and every one of those (B, H, T, S). So a key's score
  is the sum over all query heads (the GQA group of every KV head alike), and one set of tokens is
  kept per layer. With one KV head and one query head this is exactly the authors' rule (tested).
- When. The authors evict after every attention call (the prompt's scores are accumulated, then the
  cache cut to heavy + recent, then one eviction per decoded token); we compress after the prefix and
  after the reasoning, so while reasoning the cache grows by the tokens decoded so far. Under
  speculative decoding the verification queries of drafts that are then rejected are counted too.
- Positions: kept tokens keep their original RoPE positions (as for StreamingLLM, streaming.py).
"""

from __future__ import annotations

import torch

from vlaopt.model.kv_cache import KVCache
from vlaopt.optimize.kv.base import KVCompressor, evict, ranks


def attention_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                    scaling: float | None) -> torch.Tensor:
    """Attention probabilities (B, heads, T, S) in float32 of post-RoPE `query` (B, heads, T, hd) over
    `key` (B, kv_heads, S, hd) (each KV head serving heads / kv_heads query heads), with a boolean
    `mask` (B, 1, T, S) (True: may attend) and `scaling` (default 1 / sqrt(hd)); a fully masked row
    gets zeros."""
    groups = query.shape[1] // key.shape[1]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = torch.matmul(query.float(), key.float().repeat_interleave(groups, 1).transpose(2, 3)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits.softmax(-1).nan_to_num(0.0)


def accumulate(scores: torch.Tensor | None, probs: torch.Tensor, query_valid: torch.Tensor) -> torch.Tensor:
    """H2O's running score per key slot (B, S): the old `scores` (B, S_old), zero for the S - S_old keys
    appended since, plus the attention `probs` (B, heads, T, S) summed over heads and the valid
    queries (`query_valid` (B, T))."""
    new = (probs * query_valid[:, None, :, None].to(probs.dtype)).sum((1, 2))
    if scores is not None:
        new[:, : scores.shape[1]] += scores
    return new


def h2o_keep(valid: torch.Tensor, scores: torch.Tensor, heavy: int, recent: int) -> torch.Tensor:
    """Slots (B, S) H2O keeps of each sample's valid slots: the last `recent`, and the `heavy` of the
    others with the largest `scores` (B, S) (all of them when there are no more than heavy + recent)."""
    _, last, _ = ranks(valid)
    keep_recent = valid & (last < recent)
    candidates = valid & ~keep_recent
    top = scores.masked_fill(~candidates, float("-inf")).topk(min(heavy, scores.shape[1]), dim=1).indices
    picked = torch.zeros_like(valid).scatter(1, top, True) & candidates
    return keep_recent | picked


class H2OScores:
    """The cache's attention observer: accumulated scores per attention layer (`scores[layer_idx]`, (B, S_l))."""

    def __init__(self) -> None:
        self.scores: dict[int, torch.Tensor] = {}

    def __call__(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                 scaling: float | None, query_valid: torch.Tensor) -> None:
        probs = attention_probs(query, key, mask, scaling)
        self.scores[layer_idx] = accumulate(self.scores.get(layer_idx), probs, query_valid)


class H2OCompressor(KVCompressor):
    """H2O's heavy hitters + recent tokens (see the module docstring)."""

    name = "kv_h2o"

    def __init__(self, heavy: int, recent: int) -> None:
        self.heavy, self.recent = heavy, recent

    def prepare(self, cache: KVCache | None) -> KVCache:
        cache = super().prepare(cache)
        cache.observer = H2OScores()
        return cache

    def __call__(self, cache: KVCache, last: bool) -> None:
        observer = cache.observer
        if not isinstance(observer, H2OScores):
            raise TypeError("kv_h2o compresses a cache it prepared (its attention scores); this one has none")
        for i in cache.layers:
            scores = observer.scores.get(i)
            if scores is None or scores.shape != cache.valid[i].shape:
                raise RuntimeError(f"kv_h2o: attention layer {i} holds {cache.length(i)} keys but scores for "
                                   f"{None if scores is None else scores.shape[1]}")
            index = evict(cache, i, h2o_keep(cache.valid[i], scores, self.heavy, self.recent), self.heavy + self.recent)
            if index is not None:
                observer.scores[i] = scores.gather(1, index)
        if last:
            cache.observer = None  # nothing is evicted after this: stop scoring (the trajectory decodes on)
