"""Distilling the `model` draft (drafts/model.py) from the policy's LM, as DistillSpec (Zhou et al.
2023) does: the draft is trained to match the target's next-token distribution on the target's own
generations.

For each observation batch the teacher (the VLA itself) fills its prefix cache, generates its
reasoning as it would when acting (greedy, or sampled with its temperature / top-p), then is fed that
reasoning teacher-forced, which leaves in the cache the keys/values of every reasoning token and
gives its final hidden states after each one (`teacher_batches`, computed once). Each training step
then runs the draft teacher-forced over one batch's reasoning in rounds of `block` tokens from a
random offset, exactly as speculative decoding runs it (the VLM keys before the round's first token,
the draft's own tokens of the round causally), and minimizes the forward KL(target || draft) of the
processed next-token distributions (`distill_loss`) with AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from vlaopt.model.decode import ONE_TOKEN, generate_text, last_token_logits, text_processors
from vlaopt.model.expert_policy import fill_prefix, forbidden_text_ids
from vlaopt.model.kv_cache import KVCache
from vlaopt.model.language import LanguageModel, LayerLoop
from vlaopt.model.layout import TokenState
from vlaopt.model.processor import Observation
from vlaopt.optimize.decoding.drafts.model import DraftKV, DraftNet, ModelDraft, build_draft
from vlaopt.optimize.decoding.speculative import SpeculativeDecoder, scores_all

if TYPE_CHECKING:
    from transformers import LogitsProcessorList

    from vlaopt.model.vla import VLA


def distill_loss(target: torch.Tensor, draft: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean forward KL(p || q) over the positions where `mask` (B, T) is True, p and q the softmax of
    the target's and the draft's processed scores (B, T, V); tokens the target's scores rule out (-inf,
    p = 0) add nothing."""
    logp, logq = target.float().log_softmax(-1), draft.float().log_softmax(-1)
    p = logp.exp()
    seen = p > 0
    kl = (p * (logp.masked_fill(~seen, 0) - logq.masked_fill(~seen, 0))).sum(-1)
    weight = mask.to(kl.dtype)
    return (kl * weight).sum() / weight.sum().clamp(min=1)


@dataclass
class TeacherBatch:
    """One observation batch's teacher reasoning, teacher-forced: what training and evaluation reuse."""

    ids: torch.Tensor  # (B, T) reasoning ids, the pad id after a sample's STOP
    valid: torch.Tensor  # (B, T) the tokens emitted (up to and including STOP)
    positions: torch.Tensor  # (B, T) their original positions
    keys: torch.Tensor  # (B, KV, S, hd) the VLM's cached keys at the draft's read layer: prefix, then reasoning
    values: torch.Tensor
    key_valid: torch.Tensor  # (B, S)
    key_positions: torch.Tensor  # (B, S)
    hidden: torch.Tensor  # (B, T, D) the LM's final normed states after each reasoning token
    targets: torch.Tensor  # (B, T) where the target's next-token distribution is a training target


def _feed_hidden(lm: LanguageModel, cache: KVCache, ids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
    """`model.decode.feed` stopping before the LM head: the final normed states (B, T, D) and positions."""
    positions = cache.next_position[:, None] + valid.long().cumsum(1) - 1
    tokens = TokenState(lm.embed(ids), positions.clamp(min=0), valid, replace(ONE_TOKEN, prompt=ids.shape[1]))
    state = LayerLoop(lm, tokens, cache, hooks=()).run()
    cache.next_position = cache.next_position + valid.long().sum(1)
    return lm.decoder.norm(state.hidden), positions.clamp(min=0)


def _processors(model: VLA, sampling: bool) -> LogitsProcessorList:
    """The model's reasoning processors (its temperature and top-p; without nucleus filtering when
    `sampling` is False, for the draft's trained distribution, which must not rule out what p allows)."""
    cfg = model.head.cfg
    return text_processors(forbidden_text_ids(model), cfg.temperature, cfg.top_p if sampling else 1.0, model.device)


def teacher_batches(model: VLA, observations: Iterable[Any], read: int, seed: int = 0) -> list[TeacherBatch]:
    """The teacher's reasoning on each observation batch (`Observation`s or `(images, instructions,
    proprio)` tuples) as the policy generates it (sampled ones drawn from `seed` + the batch index),
    teacher-forced: see `TeacherBatch`. `read` is the VLM attention layer the draft reads."""
    cfg, lm = model.head.cfg, model.lm
    processors = _processors(model, True)
    out = []
    with torch.no_grad():
        for i, value in enumerate(observations):
            state = model.lm_input(*Observation.of(value, f"distillation observation {i}"))
            cache, final = fill_prefix(model, state)
            logits = last_token_logits(lm, final)
            gen = torch.Generator().manual_seed(seed + i) if cfg.temperature > 0 else None
            ids, _ = generate_text(lm, cache.fork(cache.layers), logits, cfg.reasoning_tokens, processors,
                                   model.stop_id, model.pad_id, gen)
            stopped = F.pad((ids == model.stop_id).long().cumsum(1)[:, :-1], (1, 0)) > 0
            valid = ~stopped
            hidden, positions = _feed_hidden(lm, cache, ids, valid)
            out.append(TeacherBatch(ids, valid, positions, cache.keys[read], cache.values[read], cache.valid[read],
                                    cache.positions[read], hidden, valid & (ids != model.stop_id)))
    return out


def _head(lm: LanguageModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on `hidden`, its weights held fixed (no gradient reaches the shared head)."""
    head = lm.causal_lm.get_output_embeddings()
    if isinstance(head, nn.Linear):
        return F.linear(hidden, head.weight.detach(), None if head.bias is None else head.bias.detach())
    return lm.lm_head(hidden)


def round_mask(batch: TeacherBatch, block: int, offset: int) -> torch.Tensor:
    """The draft's boolean mask (B, 1, T, S + T) teacher-forced over the reasoning in rounds of `block`
    tokens starting at `offset` (and a shorter first round): a token of a round sees the valid VLM
    keys before the round's first token and the round's tokens up to itself, as in decoding."""
    t = batch.ids.shape[1]
    u = torch.arange(t, device=batch.ids.device)
    rnd = torch.div(u - offset, block, rounding_mode="floor")
    start = (rnd * block + offset).clamp(min=0)
    past = batch.key_valid[:, None, :] & (batch.key_positions[:, None, :] < batch.positions[:, start][:, :, None])
    own = (rnd[:, None] == rnd[None, :]) & (u[None, :] <= u[:, None])
    return torch.cat([past, own.expand(past.shape[0], -1, -1)], -1)[:, None]


def draft_scores(model: VLA, net: DraftNet, batch: TeacherBatch, block: int, offset: int) -> torch.Tensor:
    """The draft's logits (B, T, V) after each teacher reasoning token, run in rounds (`round_mask`)."""
    with torch.no_grad():
        x = model.lm.embed(batch.ids)
    hidden = net.hidden(x, batch.positions, round_mask(batch, block, offset), DraftKV(batch.keys, batch.values))
    return _head(model.lm, hidden)


def batch_loss(model: VLA, net: DraftNet, batch: TeacherBatch, block: int, offset: int) -> torch.Tensor:
    """`distill_loss` of the draft on one teacher batch (rounds of `block` from `offset`)."""
    with torch.no_grad():
        target = scores_all(_scorer(_processors(model, True)), _head(model.lm, batch.hidden).float())
    draft = scores_all(_scorer(_processors(model, False)), draft_scores(model, net, batch, block, offset).float())
    return distill_loss(target, draft, batch.targets)


def _scorer(processors: LogitsProcessorList) -> Any:
    return lambda x: processors(x.new_zeros((x.shape[0], 0), dtype=torch.long), x)


def draft_kl(model: VLA, net: DraftNet, batches: Sequence[TeacherBatch], block: int = 4) -> float:
    """Mean `distill_loss` over teacher batches (rounds of `block` from the first reasoning token),
    weighted by their target positions: the held-out KL."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            n = int(batch.targets.sum())
            total += float(batch_loss(model, net, batch, block, 0)) * n
            count += n
    return total / max(count, 1)


def acceptance(model: VLA, net: DraftNet, observations: Iterable[Any], k: int = 4) -> dict[str, float]:
    """Greedy speculative decoding of each observation batch's reasoning with `net` as the draft, `k`
    drafts per round: the acceptance rate (accepted / drafted) and the counts behind it."""
    decoder = SpeculativeDecoder(ModelDraft.of(net), k)
    processors = text_processors(forbidden_text_ids(model), 0.0, 1.0, model.device)
    with torch.no_grad():
        for i, value in enumerate(observations):
            cache, final = fill_prefix(model, model.lm_input(*Observation.of(value, f"observation {i}")))
            decoder(model.lm, cache, last_token_logits(model.lm, final), model.head.cfg.reasoning_tokens, processors,
                    model.stop_id, model.pad_id, None)
    s = decoder.stats
    return {"acceptance": s["accepted"] / max(s["drafted"], 1), "drafted": s["drafted"], "accepted": s["accepted"],
            "emitted": s["emitted"]}


def distill_draft(
    model: VLA, observations: Iterable[Any], *, draft: DraftNet | None = None, read_layer: int = -1,
    layers: int = 1, mlp: int = 0, steps: int = 300, lr: float = 1e-3, weight_decay: float = 0.0,
    block: int = 4, seed: int = 0, progress: bool = True, teachers: list[TeacherBatch] | None = None,
) -> DraftNet:
    """Distill a draft for `model`'s reasoning (see the module doc) on `observations` (batches as
    `vlaopt.optimize.calibration` gives them) for `steps` AdamW steps (cosine-decayed `lr`, gradient
    norm clipped to 1), deterministically from `seed`. Starts from `draft`, or a new one built with
    `read_layer`, `layers` and `mlp` (`build_draft`); `teachers` reuses precomputed teacher batches.
    Returns the draft in eval mode, its loss per step in `draft.history`."""
    if getattr(model.config.head, "reasoning_tokens", 0) == 0:
        raise ValueError(f"distill_draft needs a VLA that reasons (an expert head with reasoning_tokens > 0); "
                         f"head.kind={model.config.head.kind!r}")
    for name, value in (("steps", steps), ("block", block)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"distill_draft {name}={value!r} must be a positive integer")
    net = build_draft(model, read_layer, layers, mlp, seed) if draft is None else draft
    net.matches(model.lm)
    teachers = teacher_batches(model, observations, net.read, seed) if teachers is None else teachers
    if not teachers:
        raise ValueError("distill_draft needs at least one observation batch")
    params = list(net.requires_grad_(True).parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.45 * (1 + np.cos(np.pi * s / steps)))
    rng = np.random.default_rng(seed)
    order: list[int] = []
    history: list[float] = []
    columns = [TextColumn("[bold]distill"), BarColumn(), TextColumn("{task.completed}/{task.total} {task.fields[info]}"),
               TimeRemainingColumn()]
    net.train()
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("distill", total=steps, info="")
        for _ in range(steps):
            if not order:
                order = rng.permutation(len(teachers)).tolist()
            loss = batch_loss(model, net, teachers[order.pop()], block, int(rng.integers(block)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            schedule.step()
            history.append(float(loss.detach()))
            bar.update(task, advance=1, info=f"KL {history[-1]:.4f}")
    net.history = history
    return net.eval().requires_grad_(False)
