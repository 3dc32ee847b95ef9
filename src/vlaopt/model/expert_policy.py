"""The `expert` policy (model/policy.py): the path of a VLA whose head is the action expert
(heads/expert.py).

    prefix   [BOS][visual][proprio][prompt] -> our layer loop (pruning hooks apply) -> KVCache, once
    reasoning (optional, Alpamayo-R1) up to `head.reasoning_tokens` text tokens decoded into the cache,
              a logits processor forbidding the action-bin (trajectory) tokens, until STOP
    flow     `head.steps` expert passes over the cache, which none of them grows
    or, with `head.trajectory: autoregressive`, chunk x action_dim action tokens decoded one by one

The prefix has no action slots and no STOP: it ends where the answer begins ("Out:"), so reasoning
continues the prompt, and the expert's chunk tokens take the positions after the last cached token.
Stages are timed as `prefix`, `reasoning`, `flow` (or `trajectory`). A KV-cache compressor
(`model.kv_compressor`, optimize/kv/) compresses the cache at the end of `prefix` (so reasoning
decodes over it) and again at the end of `reasoning`, timed within those stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlaopt.model.decode import (
    decode_action_bins,
    feed,
    generate_text,
    last_token_logits,
    next_positions,
    text_processors,
)
from vlaopt.model.heads.discrete import bin_centers
from vlaopt.model.hooks import LayerHook
from vlaopt.model.kv_cache import KVCache
from vlaopt.model.layout import TokenState
from vlaopt.model.policy import POLICIES, Policy, initial_noise
from vlaopt.utils.timer import NULL_TIMER, Timer

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA


@dataclass
class ExpertRollout:
    """One prediction of the expert path: normalized actions, the reasoning ids and the cache."""

    actions: torch.Tensor  # (B, chunk, action_dim), normalized to [-1, 1]
    reasoning: torch.Tensor  # (B, n) generated ids, the pad id after a sample's STOP; n = 0 without reasoning
    cache: KVCache


def fill_prefix(model: VLA, state: TokenState, timer: Timer = NULL_TIMER, cache: KVCache | None = None,
                hooks: Sequence[LayerHook] | None = None) -> tuple[KVCache, TokenState]:
    """Run the LM once over the prefix; the cache of every attention layer (`cache`, or a new one) and
    the final state."""
    cache = KVCache() if cache is None else cache
    final = model.lm(state, timer, cache=cache, hooks=hooks)
    cache.next_position = next_positions(state)
    return cache, final


def forbidden_text_ids(model: VLA) -> list[int]:
    """Ids reasoning may not emit: the action bins (the trajectory tokens) and the pad id (fill after
    STOP), unless the pad id is the STOP id itself."""
    vocab, bins = model.lm.vocab_size, model.head.cfg.bins
    ids = list(range(vocab - bins, vocab))
    return ids if model.pad_id == model.stop_id else [model.pad_id, *ids]


def act(
    model: VLA, state: TokenState, noise: torch.Tensor | None = None, seed: int = 0, timer: Timer = NULL_TIMER,
    cache: KVCache | None = None, hooks: Sequence[LayerHook] | None = None,
) -> ExpertRollout:
    """Prefix -> optional reasoning -> flow steps (or autoregressive action tokens) for an encoded
    batch. Noise (B, chunk, action_dim) is drawn with `seed` unless given; sampled reasoning draws
    from the same generator, after the noise. `cache` and `hooks` as `Policy.act`."""
    head, cfg = model.head, model.head.cfg
    batch = state.hidden.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = initial_noise(model, batch, noise, seed, gen).to(state.hidden.dtype)
    compressor = model.kv_compressor  # optimize/kv/: compresses the cache after the prefix and the reasoning
    with timer.stage("prefix"):
        if compressor is not None:
            cache = compressor.prepare(cache)
        cache, final = fill_prefix(model, state, timer, cache, hooks)
        need_logits = cfg.reasoning_tokens > 0 or cfg.trajectory == "autoregressive"
        logits = last_token_logits(model.lm, final) if need_logits else None
        if compressor is not None:
            compressor(cache, last=not cfg.reasoning_tokens)
    reasoning = torch.empty((batch, 0), dtype=torch.long, device=model.device)
    if cfg.reasoning_tokens:
        with timer.stage("reasoning"):
            processors = text_processors(forbidden_text_ids(model), cfg.temperature, cfg.top_p, model.device)
            sampler = gen if cfg.temperature > 0 else None
            generate = model.text_decoder or generate_text
            reasoning, logits = generate(
                model.lm, cache, logits, cfg.reasoning_tokens, processors, model.stop_id, model.pad_id, sampler
            )
            if compressor is not None:
                compressor(cache, last=True)
    if cfg.trajectory == "autoregressive":
        with timer.stage("trajectory"):
            index = decode_action_bins(model.lm, cache, logits, head.chunk * head.action_dim, cfg.bins)
            actions = bin_centers(cfg.bins, index.device)[index].reshape(batch, head.chunk, head.action_dim)
    else:
        with timer.stage("flow"):
            actions = head.sample(cache, noise, state.proprio)
    return ExpertRollout(actions, reasoning, cache)


def rollout(
    model: VLA,
    images: Any,
    instructions: Sequence[str] | str,
    proprio: Any = None,
    *,
    noise: torch.Tensor | None = None,
    seed: int = 0,
    timer: Timer = NULL_TIMER,
) -> ExpertRollout:
    """`act` on raw observations, checked as `VLA.predict_action` checks them; for inspecting the
    reasoning ids (`model.tokenizer.batch_decode`) and the cache besides the normalized actions."""
    if not isinstance(model.policy, ExpertPolicy):
        raise ValueError(f"rollout needs a VLA with head.kind='expert', got {model.config.head.kind!r}")
    with torch.inference_mode():
        return act(model, model.encode(model.preprocess(images, instructions, proprio), timer), noise, seed, timer)


@POLICIES.register("expert")
class ExpertPolicy(Policy):
    """The action expert over the VLM's KV cache (stages `prefix`, `reasoning`, `flow` / `trajectory`)."""

    def suffix(self, model: VLA) -> tuple[int, int]:
        return 0, 0  # the prefix ends where the answer begins: reasoning continues the prompt

    def act(self, model: VLA, state: TokenState, noise: torch.Tensor | None, seed: int,
            timer: Timer = NULL_TIMER, cache: KVCache | None = None,
            hooks: Sequence[LayerHook] | None = None) -> torch.Tensor:
        return act(model, state, noise, seed, timer, cache, hooks).actions

    def loss(self, model: VLA, state: TokenState, actions: torch.Tensor, generator: torch.Generator | None,
             reasoning: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The expert's flow-matching loss, the prefix cache built with gradients. With reasoning
        targets, Alpamayo-R1's supervised loss: their cross-entropy, teacher-forced into the cache
        after the prefix, plus the flow loss of an expert that reads them there, as when acting."""
        cache, final = fill_prefix(model, state)
        if reasoning is None:
            return model.head.loss(cache, actions, generator, state.proprio)
        ids, valid = reasoning
        after = feed(model.lm, cache, ids, valid)  # logits after each target token
        logits = torch.cat([last_token_logits(model.lm, final)[:, None], after[:, :-1]], dim=1)
        text = F.cross_entropy(logits[valid].float(), ids[valid])
        return model.head.loss(cache, actions, generator, state.proprio) + text
