"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", 2023):
keep the first `sinks` tokens (the attention sinks) and the most recent `window` tokens of every
layer, evict the rest.

The authors' `StartRecentKVCache` (mit-han-lab/streaming-llm, streaming_llm/kv_cache.py) keeps slots
[0, start_size) and [seq_len - recent_size, seq_len) of every layer once seq_len exceeds
start_size + recent_size, and nothing happens below it. We apply the same rule per sample to its
*valid* slots (padding, pruned and stopped slots are never kept over a valid token), so a batch keeps
what each sample alone keeps (tests/test_kv_compression.py re-types their rule and compares).

Deviations, on purpose:

- Positions. The authors cache keys before RoPE and re-rotate them at their in-cache positions
  (pos_shift/modify_llama.py), so the window always looks contiguous to the model. Our cache holds
  keys with RoPE applied at each token's original position (the whole cache and the expert rely on
  that), so kept tokens keep their original positions and decoding continues at `next_position`;
  the distances a query sees are the true ones, with a gap where tokens were evicted.
- When. The authors evict before each new prompt (`evict_for_space`) or after every decoded token;
  we compress at two points of a prediction, after the prefix and after the reasoning, so while
  reasoning the cache holds up to sinks + window + the reasoning tokens decoded so far.
"""

from __future__ import annotations

import torch

from vlaopt.model.kv_cache import KVCache
from vlaopt.optimize.kv.base import KVCompressor, evict, ranks


def streaming_keep(valid: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Slots (B, S) StreamingLLM keeps: each sample's first `sinks` and last `window` valid slots (all
    of them when it has no more than sinks + window)."""
    first, last, _ = ranks(valid)
    return valid & ((first < sinks) | (last < window))


class StreamingCompressor(KVCompressor):
    """StreamingLLM's attention sinks + recent window (see the module docstring)."""

    name = "kv_streaming"

    def __init__(self, sinks: int, window: int) -> None:
        self.sinks, self.window = sinks, window

    def __call__(self, cache: KVCache, last: bool) -> None:
        for i in cache.layers:
            evict(cache, i, streaming_keep(cache.valid[i], self.sinks, self.window), self.sinks + self.window)
