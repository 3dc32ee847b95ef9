"""Open-loop action error: how far a model's predicted chunks are from the demonstrated ones on
held-out episodes (no simulator; every step of the split, including chunks padded at episode ends);
for a policy that reasons, also its reasoning accuracy there (eval/reasoning.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from vlaopt.data.dataset import EpisodeDataset, Split, collate
from vlaopt.eval.reasoning import exact_match, predict_with_reasoning, reasons
from vlaopt.model.processor import Observation
from vlaopt.model.vla import VLA


@dataclass
class OpenLoopResult:
    """Mean absolute error of unnormalized actions: overall, per task and per action dimension."""

    l1: float
    per_task: dict[str, float]
    per_dim: list[float]
    samples: int
    reasoning: float | None = None  # exact-match reasoning accuracy, for a policy that reasons
    reasoning_per_task: dict[str, float] | None = None


@torch.inference_mode()
def open_loop_error(model: VLA, data: str | Path, split: Split = "val", val_fraction: float = 0.1, seed: int = 0,
                    batch_size: int = 64) -> OpenLoopResult:
    """Mean L1 error of `model`'s action chunks against the demonstrations of `split` of the collection
    folder `data` (split as the trainer splits it: same `val_fraction` and `seed`)."""
    dataset = EpisodeDataset(data, split, chunk=model.config.chunk, val_fraction=val_fraction, seed=seed)
    cfg = model.config
    found = (len(dataset.cameras), dataset.images.shape[2], dataset.proprio.shape[1])
    wanted = (cfg.cameras, cfg.vision.image_size, cfg.proprio_dim)
    if found[:2] != wanted[:2] or cfg.proprio_dim not in (0, found[2]):
        raise ValueError(f"{data} holds {found[0]} camera(s) of {found[1]} px and proprio of {found[2]}, but the model "
                         f"takes {wanted[0]} camera(s) of {wanted[1]} px and proprio of {wanted[2]}")
    graded = reasons(model)
    if graded and dataset.reasoning is None:
        raise ValueError(f"the model reasons, but the episodes in {data} carry no reasoning targets to grade it on")
    errors, tasks, right = [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=lambda s: {**collate(s), "tasks": [x["task"] for x in s]})
    for batch in loader:
        obs = Observation(batch["images"], batch["instructions"], batch["proprio"] if cfg.proprio_dim else None)
        if graded:
            pred, texts, _ = predict_with_reasoning(model, obs, batch=batch_size)
            right.extend(float(exact_match([p], [t])) for p, t in zip(texts, batch["reasoning"], strict=True))
        else:
            pred = model.predict_action(*obs)
        errors.append((pred.cpu() - batch["actions"]).abs().mean(dim=1))  # (B, action_dim)
        tasks.extend(batch["tasks"])
    per_sample = torch.cat(errors).numpy()
    step_tasks, right = np.array(tasks), np.array(right)
    names = list(dict.fromkeys(dataset.tasks))
    return OpenLoopResult(
        l1=float(per_sample.mean()),
        per_task={t: float(per_sample[step_tasks == t].mean()) for t in names},
        per_dim=per_sample.mean(axis=0).tolist(),
        samples=len(per_sample),
        reasoning=float(right.mean()) if graded else None,
        reasoning_per_task={t: float(right[step_tasks == t].mean()) for t in names} if graded else None,
    )
