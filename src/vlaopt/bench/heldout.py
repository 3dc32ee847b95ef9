"""Held-out demonstration samples for the quality columns of the benchmark: from a collection
folder's validation split, or from a `heldout.npz` stored beside a model (`vla-opt train` writes one
from the validation split it held out, so a trained model carries demonstrations it never saw)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vlaopt.bench.harness import Demonstrations
from vlaopt.utils.io import atomic_write

HELDOUT_FILE = "heldout.npz"
HELDOUT_SAMPLES = 64  # what `vla-opt train` stores beside a model (the bench's default eval_samples)


def from_collection(root: str | Path, n: int, chunk: int, seed: int = 0, val_fraction: float = 0.1) -> Demonstrations:
    """`n` samples spread evenly over the validation episodes of a collection folder (the split
    `vla-opt train` makes with the same `seed` and `val_fraction`)."""
    from vlaopt.data.dataset import EpisodeDataset

    data = EpisodeDataset(root, "val", chunk=chunk, val_fraction=val_fraction, seed=seed)
    picks = np.linspace(0, len(data) - 1, num=min(n, len(data))).round().astype(int)
    samples = [data[int(i)] for i in picks]
    return Demonstrations(
        images=torch.stack([s["images"] for s in samples]),
        instructions=[s["instruction"] for s in samples],
        proprio=torch.stack([s["proprio"] for s in samples]),
        actions=torch.stack([s["actions"] for s in samples]),
    )


def for_model(model_dir: str | Path, data: str | Path | None, chunk: int,
              n: int = HELDOUT_SAMPLES) -> Demonstrations | None:
    """Up to `n` held-out demonstrations for the model in `model_dir`: from the validation split of the
    collection `data` when given, else the model's own `heldout.npz`, else None."""
    if data is not None:
        return from_collection(data, n, chunk)
    path = Path(model_dir) / HELDOUT_FILE
    return load_npz(path).spread(n) if path.is_file() else None


def save_npz(obs: Demonstrations, path: str | Path) -> None:
    """Store held-out samples (e.g. beside a shipped model), atomically."""
    arrays = {"images": obs.images.numpy(), "instructions": np.array(obs.instructions), "actions": obs.actions.numpy()}
    if obs.proprio is not None:
        arrays["proprio"] = obs.proprio.numpy()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)


def load_npz(path: str | Path) -> Demonstrations:
    """Read held-out samples written by `save_npz`."""
    with np.load(path) as f:
        return Demonstrations(
            images=torch.from_numpy(f["images"]),
            instructions=[str(s) for s in f["instructions"]],
            proprio=torch.from_numpy(f["proprio"]) if "proprio" in f else None,
            actions=torch.from_numpy(f["actions"]),
        )
