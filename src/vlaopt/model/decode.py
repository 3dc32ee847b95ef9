"""Token-by-token decoding with the VLM over a `KVCache`: reasoning text before acting (Alpamayo-R1's
chain of causation) and discretised action tokens (the autoregressive-trajectory comparison).

Each step feeds one token per sample through the layer loop (no pruning hooks: they act on the
prefix) at the sample's next original position; its keys/values are appended to the cache, and a
sample that has stopped appends an invalid (masked) slot, so a batch gives each sample's solo result.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

from vlaopt.model.kv_cache import KVCache
from vlaopt.model.language import LanguageModel, LayerLoop
from vlaopt.model.layout import Layout, TokenState

ONE_TOKEN = Layout(visual=0, proprio=0, prompt=1, action=0, bos=0, stop=0)
"""The layout of one decoded token: it continues the text after the cached prefix."""


def next_positions(state: TokenState) -> torch.Tensor:
    """(B,) original position following each sample's last valid token."""
    return state.position_ids.masked_fill(~state.valid, -1).max(dim=1).values + 1


def last_token_logits(lm: LanguageModel, final: TokenState) -> torch.Tensor:
    """LM logits (B, V) at each sample's last valid token of a final (normed) token state."""
    last = final.valid.long().cumsum(1).argmax(1)  # first index reaching the count = last valid index
    return lm.lm_head(final.hidden[torch.arange(final.hidden.shape[0], device=last.device), last])


def decode_step(lm: LanguageModel, cache: KVCache, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Feed one token per sample (`ids` (B,), `valid` (B,) False for samples that have stopped) and
    return the next-token logits (B, V); the cache grows by one slot per layer."""
    return feed(lm, cache, ids[:, None], valid[:, None])[:, 0]


def feed(lm: LanguageModel, cache: KVCache, ids: torch.Tensor, valid: torch.Tensor,
         depth: int | None = None) -> torch.Tensor:
    """Feed T tokens per sample at once (`ids` (B, T), causal among themselves, at the positions after
    each sample's last; `valid` (B, T)) and return the logits after each (B, T, V): speculative
    decoding verifies T drafted tokens in one pass. The cache grows by T slots per layer. `depth`
    stops after that many decoder layers (an early-exit draft reading the shared LM head)."""
    positions = cache.next_position[:, None] + valid.long().cumsum(1) - 1
    tokens = TokenState(lm.embed(ids), positions.clamp(min=0), valid, replace(ONE_TOKEN, prompt=ids.shape[1]))
    loop = LayerLoop(lm, tokens, cache, hooks=())
    for layer in loop:
        if layer.index == depth:
            break
    cache.next_position = cache.next_position + valid.long().sum(1)
    return lm.lm_head(lm.decoder.norm(loop.state.hidden))


def text_processors(forbidden: list[int], temperature: float, top_p: float, device: torch.device) -> LogitsProcessorList:
    """transformers logits processors for reasoning text: `forbidden` ids (action / trajectory tokens)
    get -inf, then temperature and nucleus filtering when sampling (`temperature` > 0)."""
    processors = LogitsProcessorList([SuppressTokensLogitsProcessor(forbidden, device=str(device))])
    if temperature > 0:
        processors.append(TemperatureLogitsWarper(temperature))
        if top_p < 1:
            processors.append(TopPLogitsWarper(top_p))
    return processors


def pick(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens (B,) from processed scores (B, V): the argmax, or with `generator` a draw from their
    softmax (on the CPU, so that every device draws the same)."""
    if generator is None:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(-1).cpu(), 1, generator=generator)[:, 0].to(scores.device)


def generate_text(
    lm: LanguageModel,
    cache: KVCache,
    logits: torch.Tensor,
    max_tokens: int,
    processors: LogitsProcessorList,
    stop_id: int,
    pad_id: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate up to `max_tokens` tokens per sample (greedy, or sampled with `generator` when given)
    from the next-token `logits` (B, V); each sample stops after emitting `stop_id`. Every emitted
    token, the stop token included, is fed so the cache holds it. Returns the ids (B, n), `pad_id`
    after a sample's stop, and the next-token logits (B, V) after each sample's last fed token."""
    batch = logits.shape[0]
    active = torch.ones(batch, dtype=torch.bool, device=logits.device)
    out = torch.empty((batch, 0), dtype=torch.long, device=logits.device)
    for _ in range(max_tokens):
        ids = pick(processors(out, logits.float()), generator)
        ids = torch.where(active, ids, torch.full_like(ids, pad_id))
        out = torch.cat([out, ids[:, None]], dim=1)
        logits = torch.where(active[:, None], decode_step(lm, cache, ids, active), logits)
        active = active & (ids != stop_id)
        if not bool(active.any()):
            break
    return out, logits


def decode_action_bins(lm: LanguageModel, cache: KVCache, logits: torch.Tensor, count: int, bins: int) -> torch.Tensor:
    """Greedily decode `count` action tokens one by one, each restricted to the last `bins` vocabulary
    ids (the action bins, as the discrete head reads them); returns bin indices (B, count)."""
    vocab = logits.shape[-1]
    valid = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    out = []
    for k in range(count):
        index = logits[:, -bins:].argmax(-1)
        out.append(index)
        if k + 1 < count:  # the last token conditions nothing
            logits = decode_step(lm, cache, vocab - bins + index, valid)
    return torch.stack(out, dim=1)
