"""Behaviour cloning with the head's loss: AdamW, warm-up + cosine schedule, gradient clipping,
validation action error, checkpoints and exact resume, through `accelerate` (so the same code runs on
one CPU, one GPU, or several).

A run folder `out` holds:
  the model files (`VLA.save_pretrained`), refreshed after every checkpoint, and train_config.json;
  checkpoints/step-NNNNNN/  the newest complete checkpoint: the model plus the trainer state
                            (trainer_state.json: step, log, settings, schedule, RNG states;
                            trainer_state.safetensors: optimizer moments and RNG tensors; no pickle).
A checkpoint is assembled under a hidden name and renamed into place when complete (a directory
rename is atomic); older ones are removed only after it is in place. So a kill at any moment, even
inside a save, leaves the newest complete checkpoint resumable, and a resumed run computes exactly
what an uninterrupted one does (same batches, same random numbers, same weights).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Sampler

from vlaopt.data.dataset import collate
from vlaopt.model.checkpoint import CheckpointError, read_manifest, verify_manifest
from vlaopt.model.vla import CONFIG_FILE, VLA, WEIGHTS_FILE
from vlaopt.train.schedules import lr_factor
from vlaopt.utils.checks import check_positive
from vlaopt.utils.io import atomic_write_text, fsync_path, remove_atomic_leftovers, sha256_file

CHECKPOINTS_DIR = "checkpoints"
STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"
STATE_FORMAT = "vlaopt-trainer-state/1"
TRAIN_CONFIG_FILE = "train_config.json"
LEGACY_STATE_FILE = "trainer_state.pt"
"""The pickled trainer state of older versions: never loaded (unpickling a file can run code)."""
_STEP_DIR = re.compile(r"step-(\d+)")
_LEFTOVER = re.compile(r"\.step-\d+\..+\.(tmp|del)")  # a checkpoint being assembled or removed when killed


@dataclass
class TrainConfig:
    """Optimization settings of one training run.

    Resuming with a larger `steps` extends a run (every other setting must match the saved run's);
    the cosine decay then stretches to the new total, so the learning rate of a finished run rises
    again from its floor to the longer schedule's value at that step.
    """

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
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps={self.warmup_steps!r} must be a non-negative integer")


class StepBatches(Sampler[list[int]]):
    """The sample indices of steps `start` .. `stop` - 1 of a run, as a function of (seed, step) alone.

    Step k takes batch k mod n of epoch k // n (n = size // batch_size full batches; the rest of an
    epoch is dropped), each epoch a permutation drawn from its own generator seeded with (seed, epoch).
    With no sampler state, a run resumed at any step sees exactly the batches of an uninterrupted run.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start: int, stop: int) -> None:
        if size < batch_size:
            raise ValueError(f"the training set has {size} samples, fewer than one batch of {batch_size}")
        self.size, self.batch_size, self.seed, self.start, self.stop = size, batch_size, seed, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):  # noqa: ANN204 (an iterator of index lists)
        per_epoch = self.size // self.batch_size
        epoch, order = -1, np.arange(0)
        for step in range(self.start, self.stop):
            e, b = divmod(step, per_epoch)
            if e != epoch:
                epoch, order = e, np.random.default_rng([self.seed & (2**64 - 1), e]).permutation(self.size)
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- the trainer state: JSON + safetensors ----------------------------------------------------------------
def _capture_state(opt: torch.optim.Optimizer, sched: Any, step: int, log: dict[str, Any],
                   cfg: TrainConfig) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Everything a resume needs beyond the model, split into JSON and tensors: step, log, settings,
    learning-rate schedule, AdamW moments, and the Python / NumPy / torch random states."""
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    optimizer = opt.state_dict()
    moments: dict[str, dict[str, Any]] = {}
    for pid, entry in optimizer["state"].items():
        moments[str(pid)] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{name}"] = value.detach().cpu().contiguous()
                value = {"tensor": f"optimizer.{pid}.{name}"}
            moments[str(pid)][name] = value
    meta = {
        "format": STATE_FORMAT, "step": step, "train_config": asdict(cfg), "log": log,
        "scheduler": sched.state_dict(),
        "optimizer": {"state": moments, "param_groups": optimizer["param_groups"]},
        "rng": {"python": [version, list(internal), gauss_next], "numpy": [kind, int(pos), int(has_gauss), float(gauss)]},
    }
    return meta, tensors


def _write_state(folder: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """trainer_state.safetensors, then trainer_state.json with that file's sha256."""
    save_file(tensors, str(folder / STATE_TENSORS))
    atomic_write_text(folder / STATE_JSON, json.dumps({**meta, "tensors_sha256": sha256_file(folder / STATE_TENSORS)}))


def _read_state_json(ckpt: Path) -> dict[str, Any]:
    """The JSON half of a checkpoint's trainer state, checked for its format and fields."""
    path = ckpt / STATE_JSON
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} lacks {STATE_JSON}; it was not written by this trainer")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"trainer state {path} cannot be read as JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"trainer state {path} is not a {STATE_FORMAT} file")
    missing = [k for k in ("step", "train_config", "log", "scheduler", "optimizer", "rng", "tensors_sha256") if k not in meta]
    if missing:
        raise CheckpointError(f"trainer state {path} lacks {', '.join(missing)}")
    return meta


def _read_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A checkpoint's trainer state (JSON and tensors); any fault raises one CheckpointError naming the file.
    Nothing here unpickles: a crafted file cannot run code."""
    meta = _read_state_json(ckpt)
    path = ckpt / STATE_TENSORS
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} lacks {STATE_TENSORS}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"trainer state {path} cannot be read as safetensors: {exc}") from exc
    digest = sha256_file(path)
    if digest != meta["tensors_sha256"]:
        raise CheckpointError(f"trainer state {path} has sha256 {digest} but {STATE_JSON} records "
                              f"{meta['tensors_sha256']}: the file changed after it was saved")
    return meta, tensors


def _restore_state(opt: torch.optim.Optimizer, sched: Any, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                   ckpt: Path) -> None:
    """Load optimizer, schedule and random states saved by `_capture_state`."""
    try:
        state = {int(pid): {name: tensors[v["tensor"]] if isinstance(v, dict) else v for name, v in entry.items()}
                 for pid, entry in meta["optimizer"]["state"].items()}
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["optimizer"]["param_groups"]]
        opt.load_state_dict({"state": state, "param_groups": groups})
        sched.load_state_dict(meta["scheduler"])
        version, internal, gauss_next = meta["rng"]["python"]
        random.setstate((version, tuple(internal), gauss_next))
        kind, pos, has_gauss, gauss = meta["rng"]["numpy"]
        np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(tensors["rng.torch"])
        cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
        if cuda and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"trainer state in {ckpt} does not fit this run's optimizer or is damaged: {exc!r}") from exc


# ---- checkpoint folders -------------------------------------------------------------------------------
def checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of the run in `out`, as (step, folder), oldest first."""
    root = Path(out) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def resume_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint in `out`, or None for a folder with nothing to resume (missing,
    empty, or holding no model). A folder that holds a model but no usable training state raises
    CheckpointError, since training it from step 0 would overwrite that model."""
    out = Path(out)
    found = checkpoints(out)
    if found:
        return found[-1][1]
    if (out / LEGACY_STATE_FILE).is_file():
        raise CheckpointError(
            f"cannot resume {out}: its training state {out / LEGACY_STATE_FILE} is a pickle written by an older "
            "vla-opt, which this version does not load (unpickling a file can run code); fine-tune its model into a "
            "new folder (--init with a new --out), or start over with --no-resume (overwrites the model there)")
    present = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if (out / name).is_file()]
    if present:
        raise CheckpointError(
            f"cannot resume {out}: it holds a model ({', '.join(present)}) but no training state "
            f"({CHECKPOINTS_DIR}/step-*/ is missing); train into a new --out, or pass --no-resume "
            "(resume=False) to start over and overwrite that model")
    return None


def saved_train_config(out: str | Path) -> dict[str, Any] | None:
    """The settings of the run a resume of `out` would continue (None for a fresh folder); raises as
    `resume_checkpoint` does."""
    ckpt = resume_checkpoint(out)
    return None if ckpt is None else _read_state_json(ckpt)["train_config"]


def _discard(folder: Path) -> None:
    """Remove a checkpoint folder: first renamed to a hidden name (atomic), so a kill during the
    removal never leaves a partial folder under a checkpoint's name."""
    hidden = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.del")
    folder.rename(hidden)
    shutil.rmtree(hidden)


def _remove_leftovers(root: Path) -> None:
    """Remove checkpoints that killed saves were assembling or removing (hidden names in checkpoints/)."""
    for leftover in root.iterdir():
        if _LEFTOVER.fullmatch(leftover.name) and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def discard_run_state(out: str | Path) -> None:
    """Forget the training state of the run in `out` (its checkpoints and an older version's
    trainer_state.pt), for a run that starts over; nothing else in `out` is touched."""
    out = Path(out)
    for _, folder in checkpoints(out):
        _discard(folder)
    (out / LEGACY_STATE_FILE).unlink(missing_ok=True)


def _save_checkpoint(out: Path, model: VLA, cfg: TrainConfig, meta: dict[str, Any],
                     tensors: dict[str, torch.Tensor]) -> Path:
    """Write checkpoint step-NNNNNN as one unit (see the module docstring), remove the others, then
    refresh the model files and train_config.json at the top of `out`."""
    root = out / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    final = root / f"step-{meta['step']:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        model.save_pretrained(tmp)
        _write_state(tmp, meta, tensors)
        fsync_path(tmp)
        if final.exists():  # only after a restart reached a step it had saved before
            _discard(final)
        tmp.rename(final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, older in checkpoints(out):
        if older != final:
            _discard(older)
    _refresh_model(out, model, cfg)
    return final


def _refresh_model(out: Path, model: VLA, cfg: TrainConfig) -> None:
    """The model files and train_config.json at the top of `out` (what `from_pretrained(out)` loads)."""
    model.save_pretrained(out)
    remove_atomic_leftovers(out, TRAIN_CONFIG_FILE)
    atomic_write_text(out / TRAIN_CONFIG_FILE, json.dumps(asdict(cfg), indent=2))


def _model_matches(out: Path, ckpt: Path) -> bool:
    """Whether the model files at the top of `out` are intact and are those of checkpoint `ckpt` (a
    kill during their refresh leaves them stale or mixed)."""
    try:
        verify_manifest(out)
        saved = read_manifest(ckpt)
        return saved is not None and read_manifest(out) == saved
    except CheckpointError:
        return False


# ---- resume ------------------------------------------------------------------------------------------
def _differences(saved: Any, now: Any, path: str) -> list[str]:
    """Dotted paths where two JSON-like values differ, with both values."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k in sorted(set(saved) | set(now)) for d in _differences(saved.get(k), now.get(k), f"{path}.{k}")]
    return [] if saved == now else [f"{path}: saved {saved!r} vs now {now!r}"]


def _check_resume(out: Path, ckpt: Path, model: VLA, cfg: TrainConfig, saved_train: dict[str, Any]) -> None:
    """Refuse to resume a run whose saved model or training config differs from this one (only
    `steps` may change: extending a run is what resuming is for)."""
    saved_model = json.loads((ckpt / CONFIG_FILE).read_text())
    saved_train = {**saved_train, "steps": cfg.steps}
    now_model = json.loads(json.dumps(model.config.to_dict()))
    diffs = _differences(saved_model, now_model, "model") + _differences(saved_train, asdict(cfg), "train")
    if diffs:
        raise ValueError(f"cannot resume from {out}: the configuration differs ({'; '.join(diffs)}); "
                         "use a new --out or the original settings")


def _resume(out: Path, ckpt: Path, model: VLA, cfg: TrainConfig, opt: torch.optim.Optimizer,
            sched: Any) -> tuple[int, dict[str, Any]]:
    """Load checkpoint `ckpt` into the model, optimizer, schedule and random generators; returns
    (step, log). The top-level model files are rewritten if a kill left them stale."""
    meta, tensors = _read_state(ckpt)
    _check_resume(out, ckpt, model, cfg, meta["train_config"])
    start = meta["step"]
    if start > cfg.steps:
        raise ValueError(f"cannot resume {out} with steps={cfg.steps}: its checkpoint is at step {start} already; "
                         f"pass more steps than {start} to extend the run")
    model.load_state(ckpt)  # the same structure: _check_resume compared the configs, recipe included
    _restore_state(opt, sched, meta, tensors, ckpt)
    if not _model_matches(out, ckpt):
        _refresh_model(out, model, cfg)
    return start, {key: [tuple(entry) for entry in entries] for key, entries in meta["log"].items()}


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
    """Train `model` in place, checkpointing into `out` (see the module docstring); returns the log
    {"loss": [(step, loss)], "val_action_error": [(step, error)]}, of the whole run when resumed.

    With `resume`, a run continues from the newest complete checkpoint in `out` exactly as if never
    stopped; a folder holding a model but no training state raises rather than being overwritten.
    Without it, the run starts over: the old checkpoints go and the model files are overwritten.
    """
    from accelerate import Accelerator

    out = Path(out)
    reasons = getattr(model.config.head, "reasoning_tokens", 0) > 0
    if reasons and "reasoning" not in train_set[0]:
        raise ValueError(f"head.reasoning_tokens={model.config.head.reasoning_tokens} trains the model to reason, but "
                         f"the training episodes carry no reasoning targets (vla-opt collect records them for the "
                         f"tasks of vlaopt.sim.reasoning)")
    ckpt = resume_checkpoint(out) if resume else None
    _seed_everything(cfg.seed)
    model.set_stats(stats)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
    start, log = 0, {"loss": [], "val_action_error": []}
    if ckpt is not None:
        start, log = _resume(out, ckpt, model, cfg, opt, sched)
    # own generators for the loaders' worker seeds, so that creating their iterators draws nothing
    # from the global torch RNG (which the loss and the pruners use)
    loader = DataLoader(train_set, batch_sampler=StepBatches(len(train_set), cfg.batch_size, cfg.seed, start, cfg.steps),
                        collate_fn=collate, num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = None
    if val_set is not None:
        val_loader = DataLoader(val_set, batch_size=cfg.batch_size, collate_fn=collate,
                                generator=torch.Generator().manual_seed(cfg.seed))
    if not resume:  # once the settings have proved usable
        discard_run_state(out)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    core = accelerator.unwrap_model(model)

    columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total} {task.fields[info]}"),
               TimeRemainingColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=cfg.steps, completed=start, info="")
        step = start
        for batch in loader:
            for hook in core.lm.hooks:  # hooks with a training schedule (LightVLA's score noise) follow it
                hook.training_step(step, cfg.steps)
            model.train()
            loss = core.compute_loss(batch["images"], batch["instructions"], batch["actions"], batch.get("proprio"),
                                     reasoning=batch.get("reasoning") if reasons else None)
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
                _save_checkpoint(out, core, cfg, *_capture_state(opt, sched, step, log, cfg))
    core.eval()
    return log
