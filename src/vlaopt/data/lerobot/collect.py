"""From and to our collections: `convert_collection` (an npz collection folder) and `collect_lerobot`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlaopt.data.collect import collect
from vlaopt.data.episodes import Episode, read_episode, read_index
from vlaopt.data.lerobot.format import _OWN_FILE, INFO_PATH, STAGING_NAME, LeRobotSettings, is_lerobot_dataset
from vlaopt.data.lerobot.write import write_lerobot
from vlaopt.utils.io import atomic_leftover_of


class _EpisodeFiles(Sequence[Episode]):
    """The episodes of a collection folder, read from disk each time one is asked for."""

    def __init__(self, root: Path) -> None:
        self.files = [root / entry["file"] for entry in read_index(root)["episodes"]]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Episode:  # type: ignore[override]  # no slices
        return read_episode(self.files[i])


def convert_collection(root: str | Path, out: str | Path, settings: LeRobotSettings | None = None) -> Path:
    """Write the episodes of the collection folder `root` (index.json) as a LeRobot v3 dataset into `out`."""
    return write_lerobot(out, _EpisodeFiles(Path(root)), settings)


def collect_lerobot(tasks: list[str], episodes_per_task: int, out_dir: str | Path, *, resume: bool = False,
                    settings: LeRobotSettings | None = None, **collect_options: Any) -> Path:
    """`collect` into `out_dir`/.vlaopt-collection, then write those episodes as a LeRobot v3 dataset into
    `out_dir` and delete their npz files (the collection's index.json stays: its settings, attempts and
    MetaWorld version). `resume=True` continues a collection or a conversion that was killed."""
    out = Path(out_dir)
    staging = out / STAGING_NAME
    if out.is_dir() and any(out.iterdir()) and not staging.is_dir():
        raise FileExistsError(f"{out} is not empty and holds no {STAGING_NAME} of vla-opt collect; "
                              "collect into a new or empty folder")
    collect(tasks, episodes_per_task, staging, resume=resume, **collect_options)
    if not is_lerobot_dataset(out):
        _remove_partial_dataset(out)
        convert_collection(staging, out, settings)
    for entry in read_index(staging)["episodes"]:
        (staging / entry["file"]).unlink(missing_ok=True)
    return out / INFO_PATH


def _remove_partial_dataset(out: Path) -> None:
    """Delete the files of a conversion that was killed, and their temporary files (only names we write)."""
    for folder in ("meta", "data", "videos"):
        for path in sorted((out / folder).rglob("*"), reverse=True):
            name = (path.parent / (atomic_leftover_of(path.name) or path.name)).relative_to(out).as_posix()
            if path.is_file() and _OWN_FILE.fullmatch(name):
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
