"""The episode format: one compressed `.npz` file per episode plus an `index.json` per collection.

An episode file holds (T = number of steps; docs/data.md has the full description):

    images        uint8   (T, n_cams, H, W, 3)  camera images observed before each action
    proprio       float32 (T, P)                hand xyz and gripper opening before each action
    actions       float32 (T, 4)                the action taken at each step, in [-1, 1]
    task, instruction                str        MetaWorld task name and its instruction
    cameras                          str (n_cams,) camera names, in image order
    seed                             int64      the env seed that fixed the initial state
    success                          bool       whether the task succeeded during the episode
    success_step                     int64      index of the first step whose action succeeded, -1 if none
    reasoning     str     (T,)                  optional: what the scripted policy does at each step and
                                                why (vlaopt.sim.reasoning), the expert policy's reasoning target

Files are plain NumPy archives (no pickle). Every write goes to a temporary file in the same folder
and is renamed into place, so an interrupted write never leaves a truncated file under a real name.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlaopt.utils.io import atomic_write, atomic_write_text

INDEX_NAME = "index.json"
FORMAT_NAME = "vlaopt-episodes"
FORMAT_VERSION = 1


class EpisodeFormatError(ValueError):
    """An episode or index file that cannot be read: corrupt, truncated, or not in this format."""


@dataclass
class Episode:
    """One demonstration; arrays are validated on construction."""

    images: np.ndarray
    proprio: np.ndarray
    actions: np.ndarray
    task: str
    instruction: str
    cameras: tuple[str, ...]
    seed: int
    success: bool
    success_step: int
    reasoning: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        steps = len(self.actions)
        if self.reasoning is not None and len(self.reasoning) != steps:
            raise ValueError(f"reasoning must have one text per step ({steps}), got {len(self.reasoning)}")
        expected = {
            "images": (self.images, np.uint8, 5),
            "proprio": (self.proprio, np.float32, 2),
            "actions": (self.actions, np.float32, 2),
        }
        for name, (array, dtype, ndim) in expected.items():
            if array.dtype != dtype or array.ndim != ndim or len(array) != steps:
                raise ValueError(
                    f"{name} must be {dtype.__name__} with {ndim} dims and {steps} steps, "
                    f"got {array.dtype} of shape {array.shape}"
                )
        if steps == 0:
            raise ValueError("an episode needs at least one step, got 0")
        if self.actions.shape[1] != 4:
            raise ValueError(f"actions must have 4 columns (dx, dy, dz, gripper), got shape {self.actions.shape}")
        if self.images.shape[1] != len(self.cameras) or self.images.shape[4] != 3:
            raise ValueError(
                f"images must be (T, {len(self.cameras)} cameras {list(self.cameras)}, H, W, 3), "
                f"got shape {self.images.shape}"
            )
        if not -1 <= self.success_step < steps or (self.success_step >= 0) != self.success:
            raise ValueError(f"success_step {self.success_step} does not fit success={self.success} and {steps} steps")

    @property
    def length(self) -> int:
        return len(self.actions)


def write_episode(path: str | Path, episode: Episode) -> Path:
    """Write `episode` to `path` (a `.npz` file) atomically."""

    def write(tmp: Path) -> None:
        optional = {} if episode.reasoning is None else {"reasoning": np.array(episode.reasoning, dtype=np.str_)}
        with open(tmp, "wb") as f:  # a file object, so NumPy does not append ".npz" to the temp name
            np.savez_compressed(
                f,
                **optional,
                images=episode.images,
                proprio=episode.proprio,
                actions=episode.actions,
                task=np.str_(episode.task),
                instruction=np.str_(episode.instruction),
                cameras=np.array(episode.cameras, dtype=np.str_),
                seed=np.int64(episode.seed),
                success=np.bool_(episode.success),
                success_step=np.int64(episode.success_step),
            )

    return atomic_write(path, write)


def read_episode(path: str | Path) -> Episode:
    """Read an episode file; a corrupt, truncated or malformed file raises EpisodeFormatError naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            return Episode(
                images=f["images"],
                proprio=f["proprio"],
                actions=f["actions"],
                task=str(f["task"]),
                instruction=str(f["instruction"]),
                cameras=tuple(str(name) for name in f["cameras"]),
                seed=int(f["seed"]),
                success=bool(f["success"]),
                success_step=int(f["success_step"]),
                reasoning=tuple(str(text) for text in f["reasoning"]) if "reasoning" in f else None,
            )
    except FileNotFoundError:
        raise
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, zlib.error) as error:
        raise EpisodeFormatError(
            f"episode file {path} is corrupt, truncated or not a vlaopt episode ({type(error).__name__}: {error})"
        ) from error


def write_index(
    root: str | Path,
    settings: dict[str, Any],
    episodes: list[dict[str, Any]],
    *,
    attempts: dict[str, int],
    metaworld_version: str,
) -> Path:
    """Write `root/index.json` atomically: format tag, collection settings, provenance, one entry per episode."""
    index = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "metaworld_version": metaworld_version,
        "settings": settings,
        "attempts": attempts,
        "episodes": episodes,
    }
    return atomic_write_text(Path(root) / INDEX_NAME, json.dumps(index, indent=1) + "\n")


def read_index(root: str | Path) -> dict[str, Any]:
    """Read and check `root/index.json`; a missing, corrupt or foreign index raises EpisodeFormatError."""
    path = Path(root) / INDEX_NAME
    if not path.is_file():
        raise EpisodeFormatError(f"no episode index at {path}; expected a folder written by vlaopt collect")
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EpisodeFormatError(f"episode index {path} is corrupt or truncated ({error})") from error
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME or not isinstance(index.get("episodes"), list):
        raise EpisodeFormatError(f"{path} is not a {FORMAT_NAME} index (format tag or episode list missing)")
    if index.get("format_version") != FORMAT_VERSION:
        raise EpisodeFormatError(
            f"{path} has format_version {index.get('format_version')}, this vlaopt reads version {FORMAT_VERSION}"
        )
    return index
