"""Held-out demonstration samples for the quality columns of the benchmark: from a collection
folder's validation split, or from a `heldout.npz` stored beside a model (`vla-opt train` writes one
from the validation split it held out, so a trained model carries demonstrations it never saw)."""

from __future__ import annotations

from collections.abc import Iterator
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
        reasoning=[s["reasoning"] for s in samples] if "reasoning" in samples[0] else None,
    )


def for_model(model_dir: str | Path, data: str | Path | None, chunk: int,
              n: int = HELDOUT_SAMPLES) -> Demonstrations | None:
    """Up to `n` held-out demonstrations for the model in `model_dir`: from the validation split of the
    collection `data` when given, else the model's own `heldout.npz`, else None."""
    if data is not None:
        return from_collection(data, n, chunk)
    path = Path(model_dir) / HELDOUT_FILE
    return load_npz(path).spread(n) if path.is_file() else None


class CalibrationBatches:
    """`for_model`'s demonstrations as calibration batches of `size`, read on first iteration, so a
    recipe without a data-driven step never reads them (`vla-opt optimize`); `of` gives None when the
    model has none (a data-driven step then names the ways to give it data)."""

    def __init__(self, model_dir: str | Path, data: str | Path | None, chunk: int, size: int = 8) -> None:
        self.model_dir, self.data, self.chunk, self.size = model_dir, data, chunk, size
        self._batches: list[Demonstrations] | None = None

    @classmethod
    def of(cls, model_dir: str | Path, data: str | Path | None, chunk: int) -> CalibrationBatches | None:
        return cls(model_dir, data, chunk) if data is not None or (Path(model_dir) / HELDOUT_FILE).is_file() else None

    def __iter__(self) -> Iterator[Demonstrations]:
        if self._batches is None:
            demos = for_model(self.model_dir, self.data, self.chunk)
            self._batches = [] if demos is None else demos.batches(self.size)
        return iter(self._batches)


def save_npz(obs: Demonstrations, path: str | Path) -> None:
    """Store held-out samples (e.g. beside a shipped model), atomically."""
    arrays = {"images": obs.images.numpy(), "instructions": np.array(obs.instructions), "actions": obs.actions.numpy()}
    if obs.proprio is not None:
        arrays["proprio"] = obs.proprio.numpy()
    if obs.reasoning is not None:
        arrays["reasoning"] = np.array(obs.reasoning, dtype=np.str_)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)


def load_npz(path: str | Path) -> Demonstrations:
    """Read held-out samples written by `save_npz`; a damaged or foreign file raises one error naming it."""
    try:
        with np.load(path) as f:
            return Demonstrations(
                images=torch.from_numpy(f["images"]),
                instructions=[str(s) for s in f["instructions"]],
                proprio=torch.from_numpy(f["proprio"]) if "proprio" in f else None,
                actions=torch.from_numpy(f["actions"]),
                reasoning=[str(s) for s in f["reasoning"]] if "reasoning" in f else None,
            )
    except (OSError, ValueError, KeyError, AttributeError) as error:
        raise ValueError(f"held-out demonstrations {path} cannot be read (damaged, or not written by "
                         f"vla-opt train?): {error}") from None
