"""A torch Dataset of per-timestep samples with action chunks, and action/proprio statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from vlaopt.data.episodes import EpisodeFormatError, read_episode, read_index

Split = Literal["train", "val", "all"]


def split_episodes(entries: list[dict[str, Any]], val_fraction: float, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Split index entries into train and val by episode, per task, deterministically from `seed`.

    Each task gives round(n * val_fraction) of its n episodes to val, at least one when val_fraction > 0,
    but always keeps one for train.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    tasks = list(dict.fromkeys(entry["task"] for entry in entries))
    val_files: set[str] = set()
    for task in tasks:
        files = [entry["file"] for entry in entries if entry["task"] == task]
        n_val = min(max(round(len(files) * val_fraction), int(val_fraction > 0)), len(files) - 1)
        val_files.update(files[i] for i in rng.permutation(len(files))[:n_val])
    return {
        "train": [entry for entry in entries if entry["file"] not in val_files],
        "val": [entry for entry in entries if entry["file"] in val_files],
        "all": list(entries),
    }


class EpisodeDataset(Dataset):
    """Per-timestep samples from the episodes of a collection folder (or a LeRobot v3 dataset folder, one
    with meta/info.json: vlaopt.data.lerobot), for one split.

    Sample i, at step t of its episode, is a dict of tensors and strings:
      images         uint8 (n_cams, H, W, 3)  observed at t
      proprio        float32 (P,)             observed at t
      actions        float32 (chunk, 4)       the actions of steps t .. t+chunk-1; past the episode's last
                                              step the chunk repeats its last action (the arm holds still
                                              at the goal), so every sample has a full chunk
      action_is_pad  bool (chunk,)            True where the chunk repeats the last action
      instruction, task  str
      reasoning      str                      the step's reasoning target, when every episode has them
    The split's episodes are loaded into memory at construction (T * n_cams * H * W * 3 bytes of images
    each), so indexing is cheap in DataLoader workers.
    """

    def __init__(
        self, root: str | Path, split: Split = "train", chunk: int = 8, val_fraction: float = 0.1, seed: int = 0
    ) -> None:
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        self.root = Path(root)
        self.chunk = chunk
        lerobot = None
        if (self.root / "meta" / "info.json").is_file():  # a LeRobot v3 dataset (pyarrow and PyAV only then)
            from vlaopt.data.lerobot import LeRobotDataset

            lerobot = LeRobotDataset.open(self.root)
            index = {"settings": {k: v for k, v in lerobot.info.items() if k != "features"},
                     "episodes": lerobot.entries()}
        else:
            index = read_index(self.root)
        self.settings: dict[str, Any] = index["settings"]
        self.entries = split_episodes(index["episodes"], val_fraction, seed)[split]
        if not self.entries:
            raise ValueError(
                f"split {split!r} of {self.root} is empty ({len(index['episodes'])} episodes in all, "
                f"val_fraction={val_fraction})"
            )
        if lerobot is None:
            episodes = [read_episode(self.root / entry["file"]) for entry in self.entries]
        else:
            episodes = list(lerobot.read([entry["episode_index"] for entry in self.entries]))
        first = episodes[0]
        for entry, episode in zip(self.entries, episodes, strict=True):
            if (episode.cameras, episode.images.shape[2:], episode.proprio.shape[1:]) != (
                first.cameras,
                first.images.shape[2:],
                first.proprio.shape[1:],
            ):
                raise EpisodeFormatError(
                    f"episode {self.root / entry['file']} has cameras {episode.cameras}, images "
                    f"{episode.images.shape[2:]} and proprio {episode.proprio.shape[1:]}, unlike the first "
                    f"episode: {first.cameras}, {first.images.shape[2:]}, {first.proprio.shape[1:]}"
                )
        self.cameras = first.cameras
        self.instructions = [episode.instruction for episode in episodes]
        self.tasks = [episode.task for episode in episodes]
        self.images = np.concatenate([episode.images for episode in episodes])
        self.proprio = np.concatenate([episode.proprio for episode in episodes])
        self.actions = np.concatenate([episode.actions for episode in episodes])
        have = [episode.reasoning is not None for episode in episodes]
        self.reasoning: list[str] | None = None
        if all(have):
            self.reasoning = [text for episode in episodes for text in episode.reasoning]
        lengths = np.array([episode.length for episode in episodes])
        self._episode_of = np.repeat(np.arange(len(episodes)), lengths)
        self._episode_end = np.repeat(np.cumsum(lengths), lengths)  # exclusive end of each sample's episode

    def __len__(self) -> int:
        return len(self.actions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample index {i} out of range for a dataset of {len(self)} samples")
        episode, end = self._episode_of[i], self._episode_end[i]
        steps = i + np.arange(self.chunk)
        return {
            "images": torch.from_numpy(self.images[i].copy()),
            "proprio": torch.from_numpy(self.proprio[i].copy()),
            "actions": torch.from_numpy(self.actions[np.minimum(steps, end - 1)]),
            "action_is_pad": torch.from_numpy(steps >= end),
            "instruction": self.instructions[episode],
            "task": self.tasks[episode],
            **({} if self.reasoning is None else {"reasoning": self.reasoning[i]}),
        }


def compute_stats(dataset: EpisodeDataset) -> dict[str, dict[str, list[float]]]:
    """Per-dimension q01, q99, mean, std, min and max of the actions ("action") and proprio of every step in
    `dataset` (as OpenVLA); compute them on the train split so validation data stays unseen."""
    return {"action": _stats(dataset.actions), "proprio": _stats(dataset.proprio)}


def _stats(values: np.ndarray) -> dict[str, list[float]]:
    values = values.astype(np.float64)
    return {
        "q01": np.quantile(values, 0.01, axis=0).tolist(),
        "q99": np.quantile(values, 0.99, axis=0).tolist(),
        "mean": values.mean(axis=0).tolist(),
        "std": values.std(axis=0).tolist(),
        "min": values.min(axis=0).tolist(),
        "max": values.max(axis=0).tolist(),
    }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack per-timestep samples (images, instruction, proprio, actions, reasoning) into a batch."""
    batch = {
        "images": torch.stack([torch.as_tensor(s["images"]) for s in samples]),
        "instructions": [s["instruction"] for s in samples],
        "actions": torch.stack([torch.as_tensor(s["actions"], dtype=torch.float32) for s in samples]),
    }
    if "reasoning" in samples[0]:
        batch["reasoning"] = [s["reasoning"] for s in samples]
    if samples[0].get("proprio") is not None:
        batch["proprio"] = torch.stack([torch.as_tensor(s["proprio"], dtype=torch.float32) for s in samples])
    return batch
