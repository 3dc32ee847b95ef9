"""Reasoning accuracy: whether the text an expert policy decodes before acting is its target, the
scripted policy's phase and scene (vlaopt.sim.reasoning), matched exactly (Alpamayo-R1 grades its
chains of causation; ours have one right answer per step)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from vlaopt.model.expert_policy import ExpertRollout, rollout

if TYPE_CHECKING:
    from vlaopt.model.processor import Observation
    from vlaopt.model.vla import VLA


def reasons(model: VLA) -> bool:
    """Whether `model` decodes reasoning before acting."""
    return getattr(model.config.head, "reasoning_tokens", 0) > 0


def reasoning_texts(model: VLA, ids: torch.Tensor) -> list[str]:
    """The decoded reasoning of each row of generated ids (B, n): the text before STOP, stripped."""
    out = []
    for row in ids.tolist():
        text = row[: row.index(model.stop_id)] if model.stop_id in row else row
        out.append(model.tokenizer.decode(text, skip_special_tokens=True).strip())
    return out


def emitted_tokens(model: VLA, ids: torch.Tensor) -> int:
    """Tokens decoded in all rows of generated ids (B, n): each row up to its STOP, STOP included."""
    return sum(row.index(model.stop_id) + 1 if model.stop_id in row else len(row) for row in ids.tolist())


def exact_match(predicted: Sequence[str], targets: Sequence[str]) -> float:
    """The fraction of predicted texts equal to their targets (after stripping spaces at the ends)."""
    if len(predicted) != len(targets) or not targets:
        raise ValueError(f"{len(predicted)} predicted reasoning texts for {len(targets)} targets; expected as many, "
                         f"at least one")
    return sum(p.strip() == t.strip() for p, t in zip(predicted, targets, strict=True)) / len(targets)


def predict_with_reasoning(model: VLA, obs: Observation, batch: int = 16,
                           seed: int = 0) -> tuple[torch.Tensor, list[str], list[ExpertRollout]]:
    """Unnormalized actions (B, chunk, action_dim) and decoded reasoning texts of an expert policy on
    observations, `batch` at a time, each batch's rollout kept (its cache, for its memory)."""
    outs = [rollout(model, *part, seed=seed) for part in obs.batches(batch)]
    actions = torch.cat([model.unnormalize(out.actions) for out in outs])
    return actions, [t for out in outs for t in reasoning_texts(model, out.reasoning)], outs
