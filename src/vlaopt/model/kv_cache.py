"""The VLM's key/value cache: filled once by our layer loop, grown by text decoding, read by the expert.

Keys and values are kept per attention module (`layer_idx`, the numbering transformers uses) as
(B, kv_heads, S_l, head_dim) with RoPE already applied at each token's original position, beside a
key-validity mask (B, S_l) and the keys' original positions (B, S_l). S_l may differ between layers:
a token-pruning hook between layers leaves the later layers fewer keys, and padding (prompts of
different lengths, tokens kept in different numbers, samples that stopped decoding) is marked
invalid rather than removed. A new token sees a cached key when the key is valid and its position is
not after the token's own: keys cached by decoding all precede the new token, and keys a session
placed in the cache before the pass (temporal reuse: the previous step's keys of static visual
tokens) are seen causally, whatever their order in the cache.

The cache speaks transformers' cache protocol: its attention modules call
`cache.update(key_states, value_states, layer_idx, kwargs=...)` (5.24; extra positional and keyword
arguments are accepted and ignored), so they fill it themselves; tests/test_language.py checks it
against transformers' own DynamicCache on every LM family we support. `ExpertKV` is a read-only view that
hands the expert the prefix keys of its paired VLM layer and stores nothing, so flow steps never
grow the cache.

An entry of `keys` / `values` may be held compressed (`Compressed`: KIVI's quantized codes,
optimize/kv/kivi.py): reading `cache.keys[i]` then returns it dequantized, appending goes through the
entry, and `nbytes` counts what is really held.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch


class Compressed(Protocol):
    """One layer's keys or values (B, kv_heads, S, head_dim) held compressed; appending returns a new
    entry (the old one is left as it is, so a fork may share it)."""

    shape: torch.Size

    def dense(self) -> torch.Tensor: ...

    def append(self, x: torch.Tensor, valid: torch.Tensor) -> Compressed:
        """This entry followed by `x` (B, kv_heads, T, head_dim); `valid` (B, S + T) of all its slots."""
        ...

    def nbytes(self) -> int: ...


class _Layers(dict):
    """layer_idx -> keys or values; a `Compressed` entry reads dense (`dict.__getitem__`: as held)."""

    def __getitem__(self, layer_idx: int) -> torch.Tensor:
        entry = super().__getitem__(layer_idx)
        return entry if isinstance(entry, torch.Tensor) else entry.dense()


def _held(entry: torch.Tensor | Compressed) -> int:
    return entry.numel() * entry.element_size() if isinstance(entry, torch.Tensor) else entry.nbytes()


class KVCache:
    """Per-layer keys, values and key validity of the VLM sequence, plus each sample's next position."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = _Layers()
        self.values: dict[int, torch.Tensor] = _Layers()
        self.valid: dict[int, torch.Tensor] = {}
        self.positions: dict[int, torch.Tensor] = {}
        self.next_position: torch.Tensor | None = None  # (B,) original position of the next token
        self._incoming: tuple[torch.Tensor, torch.Tensor] | None = None
        self.observer: Callable[..., None] | None = None
        """Called by the layer loop as `observer(layer_idx, query, key, mask, scaling, query_valid)` while an
        attention layer runs over this cache (H2O's attention scores: optimize/kv/h2o.py)."""

    def expect(self, valid: torch.Tensor, positions: torch.Tensor) -> None:
        """Validity and original positions (B, S) of the tokens the following `update` calls append
        (set by the layer loop)."""
        self._incoming = (valid, positions)

    def put(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
            positions: torch.Tensor) -> None:
        """Place keys/values (B, kv_heads, S, head_dim) of tokens that will not run through attention
        layer `layer_idx` in this pass (their validity and positions (B, S)) before it runs."""
        self.keys[layer_idx], self.values[layer_idx] = keys, values
        self.valid[layer_idx], self.positions[layer_idx] = valid, positions

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_: object, **__: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' cache protocol: append one layer's new keys/values and return all of them."""
        shape = (key_states.shape[0], key_states.shape[2])
        got = None if self._incoming is None else tuple(self._incoming[0].shape)
        if got != shape:
            raise RuntimeError(f"KVCache.update at layer {layer_idx}: validity of shape {shape} expected, got {got}")
        valid, positions = self._incoming
        if layer_idx in self.keys:
            self.valid[layer_idx] = torch.cat([self.valid[layer_idx], valid], dim=1)
            self.positions[layer_idx] = torch.cat([self.positions[layer_idx], positions], dim=1)
            seen = []
            for store, new in ((self.keys, key_states), (self.values, value_states)):
                old = dict.__getitem__(store, layer_idx)
                if isinstance(old, torch.Tensor):
                    store[layer_idx] = torch.cat([old, new], dim=2)
                    seen.append(store[layer_idx])
                else:  # attention reads the new tokens as they are; the entry may then quantize them (KIVI)
                    seen.append(torch.cat([old.dense(), new], dim=2))
                    store[layer_idx] = old.append(new, self.valid[layer_idx])
            return seen[0], seen[1]
        self.put(layer_idx, key_states, value_states, valid, positions)
        return self.keys[layer_idx], self.values[layer_idx]

    def with_past(self, layer_idx: int, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The boolean mask (B, 1, T, S_past + T) of new tokens at `positions` (B, T) whose own mask is
        `mask` (B, 1, T, T): every valid cached key of attention layer `layer_idx` at a position not
        after the token's first (none before the first update)."""
        if layer_idx not in self.valid:
            return mask
        past = self.valid[layer_idx][:, None, :] & (self.positions[layer_idx][:, None, :] <= positions[:, :, None])
        return torch.cat([past[:, None], mask], dim=-1)

    @property
    def layers(self) -> list[int]:
        return sorted(self.keys)

    def fork(self, layers: list[int]) -> KVCache:
        """A cache holding this one's entries for `layers` (shared tensors: appending to the fork
        leaves this cache as it is), for a draft that runs only those layers."""
        out = KVCache()
        for store in ("keys", "values", "valid", "positions"):  # as held (a compressed entry stays compressed)
            getattr(out, store).update({i: dict.__getitem__(getattr(self, store), i) for i in layers if i in self.keys})
        out.next_position = self.next_position
        return out

    def keep_last(self, kept: torch.Tensor, count: int) -> None:
        """Of the last `count` slots of every layer, keep the first `kept` (B,) valid per sample and mask
        the rest out (drafted tokens that verification rejected; the caller sets `next_position`)."""
        keep = torch.arange(count, device=kept.device)[None] < kept[:, None]
        for i in self.keys:
            self.valid[i] = torch.cat([self.valid[i][:, :-count], self.valid[i][:, -count:] & keep], dim=1)

    def length(self, layer_idx: int) -> int:
        """Number of cached key slots (valid or not) at one layer."""
        return dict.__getitem__(self.keys, layer_idx).shape[2]

    def nbytes(self) -> int:
        """Bytes held by the keys and values of every layer (codes, scales and zero points of compressed
        entries; validity and positions not counted)."""
        return sum(_held(dict.__getitem__(store, i)) for store in (self.keys, self.values) for i in store)


class ExpertKV:
    """What the expert's attention modules see as their cache: expert layer j reads the prefix of
    VLM layer `layer_map[j]` followed by the expert tokens' own keys/values; nothing is stored."""

    def __init__(self, cache: KVCache, layer_map: list[int]) -> None:
        missing = [i for i in layer_map if i not in cache.keys]
        if missing:
            raise ValueError(f"the expert reads the KV of VLM attention layers {missing}, but the cache holds {cache.layers}")
        self.cache = cache
        self.layer_map = layer_map

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_: object, **__: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        src = self.layer_map[layer_idx]
        keys = torch.cat([self.cache.keys[src], key_states], dim=2)
        return keys, torch.cat([self.cache.values[src], value_states], dim=2)

    def prefix_mask(self, layer_idx: int, tokens: int) -> torch.Tensor:
        """Boolean (B, 1, T, S) mask of the valid prefix keys, for a layer that reads only the prefix."""
        return self.cache.valid[self.layer_map[layer_idx]][:, None, None, :].expand(-1, 1, tokens, -1)

    def mask(self, layer_idx: int, tokens: int, own: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean (B, 1, T, S + T) mask of expert layer `layer_idx`: every valid prefix key, and among
        the `tokens` expert tokens `own` (T, T), all of them (bidirectional) when None."""
        prefix = self.cache.valid[self.layer_map[layer_idx]]
        rows = prefix[:, None, None, :].expand(-1, 1, tokens, -1)
        if own is None:
            own = prefix.new_ones(tokens, tokens)
        return torch.cat([rows, own[None, None].expand(prefix.shape[0], 1, -1, -1)], dim=-1)
