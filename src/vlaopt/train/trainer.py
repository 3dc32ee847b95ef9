"""Behaviour cloning with the head's loss: AdamW, warm-up + cosine schedule, gradient clipping,
validation action error, checkpoints and resume, through `accelerate` (so the same code runs on one
CPU, one GPU, or several)."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset

from vlaopt.model.vla import VLA
from vlaopt.train.schedules import lightvla_noise, lr_factor
from vlaopt.utils.checks import check_positive
from vlaopt.utils.io import atomic_write, atomic_write_text

STATE_FILE = "trainer_state.pt"


@dataclass
class TrainConfig:
    """Optimization settings of one training run."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    val_every: int = 500
    save_every: int = 500
    val_batches: int = 8
    seed: int = 0
    num_workers: int = 0

    def __post_init__(self) -> None:
        check_positive(self, "train.", "steps", "batch_size", "val_every", "save_every", "val_batches")
        if self.lr <= 0:
            raise ValueError(f"train.lr={self.lr!r} must be positive")


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack per-timestep samples (images, instruction, proprio, actions) into a batch."""
    batch = {
        "images": torch.stack([torch.as_tensor(s["images"]) for s in samples]),
        "instructions": [s["instruction"] for s in samples],
        "actions": torch.stack([torch.as_tensor(s["actions"], dtype=torch.float32) for s in samples]),
    }
    if samples[0].get("proprio") is not None:
        batch["proprio"] = torch.stack([torch.as_tensor(s["proprio"], dtype=torch.float32) for s in samples])
    return batch


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _differences(saved: Any, now: Any, path: str) -> list[str]:
    """Dotted paths where two JSON-like values differ, with both values."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k in sorted(set(saved) | set(now)) for d in _differences(saved.get(k), now.get(k), f"{path}.{k}")]
    return [] if saved == now else [f"{path}: saved {saved!r} vs now {now!r}"]


def _check_resume(out: Path, model: VLA, cfg: TrainConfig) -> None:
    """Refuse to resume a run whose saved model or training config differs from this one."""
    saved_model = json.loads((out / "config.json").read_text())
    saved_train = json.loads((out / "train_config.json").read_text())
    saved_train["steps"] = cfg.steps  # extending a run is what resuming is for
    now_model = json.loads(json.dumps(model.config.to_dict()))
    diffs = _differences(saved_model, now_model, "model") + _differences(saved_train, asdict(cfg), "train")
    if diffs:
        raise ValueError(f"cannot resume from {out}: the configuration differs ({'; '.join(diffs)}); "
                         "use a new --out or the original settings")


@torch.no_grad()
def action_error(model: VLA, loader: DataLoader, batches: int) -> float:
    """Mean absolute error of predicted (unnormalized) action chunks on up to `batches` batches."""
    errors = []
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        pred = model.predict_action(batch["images"], batch["instructions"], batch.get("proprio"))
        errors.append((pred - batch["actions"].to(pred.device)).abs().mean().item())
    return float(np.mean(errors)) if errors else float("nan")


def train(model: VLA, train_set: Dataset, val_set: Dataset | None, out: str | Path, cfg: TrainConfig,
          stats: dict[str, Any], resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train `model` in place and save it (with `stats`) to `out`; returns the training log."""
    from accelerate import Accelerator

    out = Path(out)
    _seed_everything(cfg.seed)
    model.set_stats(stats)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
    start, log = 0, {"loss": [], "val_action_error": []}
    if resume and (out / STATE_FILE).is_file():
        _check_resume(out, model, cfg)
        resumed = VLA.from_pretrained(out)
        model.load_state_dict(resumed.state_dict())
        state = torch.load(out / STATE_FILE, weights_only=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, log = state["step"], state["log"]
        torch.set_rng_state(state["rng"])
    gen = torch.Generator().manual_seed(cfg.seed + start)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True, generator=gen,
                        collate_fn=collate, num_workers=cfg.num_workers)
    if len(loader) == 0:
        raise ValueError(f"the training set has {len(train_set)} samples, fewer than one batch of {cfg.batch_size}")
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, collate_fn=collate) if val_set is not None else None
    model, opt, loader = accelerator.prepare(model, opt, loader)
    core = accelerator.unwrap_model(model)
    pruners = [h for h in core.lm.hooks if hasattr(h, "set_noise_scale")]

    def save(step: int) -> None:
        core.save_pretrained(out)
        atomic_write_text(out / "train_config.json", json.dumps(asdict(cfg), indent=2))
        state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "log": log,
                 "rng": torch.get_rng_state()}
        atomic_write(out / STATE_FILE, lambda tmp: torch.save(state, tmp))

    columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total} {task.fields[info]}"),
               TimeRemainingColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=cfg.steps, completed=start, info="")
        step, batches = start, iter(loader)
        while step < cfg.steps:
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                continue
            for p in pruners:
                p.set_noise_scale(lightvla_noise(step, cfg.steps))
            model.train()
            loss = core.compute_loss(batch["images"], batch["instructions"], batch["actions"], batch.get("proprio"))
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            log["loss"].append((step, loss.item()))
            info = f"loss {loss.item():.4f}"
            if val_loader is not None and (step % cfg.val_every == 0 or step == cfg.steps):
                core.eval()
                err = action_error(core, val_loader, cfg.val_batches)
                log["val_action_error"].append((step, err))
                info += f" val L1 {err:.4f}"
            bar.update(task, completed=step, info=info)
            if step % cfg.save_every == 0 or step == cfg.steps:
                save(step)
    core.eval()
    return log
