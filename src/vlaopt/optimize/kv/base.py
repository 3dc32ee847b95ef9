"""What the KV-cache compressors share: their protocol and the eviction of cache slots.

A compressor is installed as `model.kv_compressor`; the expert policy (model/expert_policy.py) calls
`prepare` on the cache before the prefix fills it, then `compressor(cache, last=...)` after the
prefix (so reasoning decodes over the compressed cache) and again after the reasoning (`last=True`:
nothing but the expert, or the autoregressive trajectory, reads it after that).

Eviction (`evict`) keeps a fixed number of slots per sample and layer, gathered, so the memory is
really freed: min(S_l, budget) slots, the kept tokens in their cache order, then (for a sample with
fewer valid tokens than the budget) invalid padding slots. Kept tokens keep their keys (RoPE already
applied at their original positions), their positions and validity; `next_position` is unchanged, so
decoding continues where it would have.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from vlaopt.model.kv_cache import KVCache


class KVCompressor(ABC):
    """One KV-cache compression method (see the module docstring); `name` is its recipe step."""

    name: ClassVar[str] = "kv"

    def prepare(self, cache: KVCache | None) -> KVCache:
        """The cache the prefix will fill (`cache`, or a new one), set up for this compressor."""
        return KVCache() if cache is None else cache

    @abstractmethod
    def __call__(self, cache: KVCache, last: bool) -> None:
        """Compress `cache` in place; `last`: no more compression follows for this prediction."""


def ranks(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slot of `valid` (B, S): its rank among the sample's valid slots (0 = oldest) and its rank
    from the end (0 = most recent), in cache order; and the number of valid slots (B,). The cache
    appends in position order, so cache order among valid slots is position order."""
    count = valid.long().sum(1)
    first = valid.long().cumsum(1) - 1
    return first, count[:, None] - 1 - first, count


def evict(cache: KVCache, layer_idx: int, keep: torch.Tensor, budget: int) -> torch.Tensor | None:
    """Keep the slots `keep` (B, S) (valid ones, at most `budget` per sample) of one layer and drop the
    rest physically: every sample keeps min(S, budget) slots, its kept ones first in cache order, then
    invalid padding slots. Returns the kept slots' indices (B, min(S, budget)) into the old slots, for
    per-slot state kept beside the cache (H2O's scores); None, changing nothing, when the layer holds
    no more than `budget` slots."""
    valid = cache.valid[layer_idx]
    slots = valid.shape[1]
    if slots <= budget:
        return None
    keep = keep & valid
    most = int(keep.long().sum(1).max())
    if most > budget:
        raise RuntimeError(f"{budget} slots are kept per sample, but a sample selected {most}")
    order = torch.arange(slots, device=valid.device)
    index = torch.where(keep, order, order + slots).argsort(1)[:, :budget]  # kept slots in order, then the rest
    gather = index[:, None, :, None]
    for store in (cache.keys, cache.values):
        held = store[layer_idx]
        store[layer_idx] = held.gather(2, gather.expand(-1, held.shape[1], -1, held.shape[3]))
    cache.valid[layer_idx] = keep.gather(1, index)
    cache.positions[layer_idx] = cache.positions[layer_idx].gather(1, index)
    return index
