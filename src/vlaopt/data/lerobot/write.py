"""`write_lerobot`: our `Episode`s as a LeRobot v3 dataset (parquet frames, mp4 videos, meta tables, stats)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vlaopt.data.episodes import Episode
from vlaopt.data.lerobot.format import (
    ACTION,
    CODEBASE_VERSION,
    DATA_PATH,
    EPISODES_PATH,
    EXTRA,
    IMAGES,
    INDEX_FEATURES,
    INFO_PATH,
    QUANTILES,
    STATE,
    STATS_PATH,
    TASKS_PATH,
    VIDEO_PATH,
    LeRobotSettings,
    is_lerobot_dataset,
)
from vlaopt.data.video import VideoWriter
from vlaopt.utils.io import atomic_write, atomic_write_text, remove_atomic_leftovers


def _features(first: Episode, settings: LeRobotSettings) -> dict[str, dict[str, Any]]:
    height, width = first.images.shape[2:4]
    proprio_dim = first.proprio.shape[1]
    image = {"dtype": "video" if settings.use_videos else "image", "shape": [height, width, 3],
             "names": ["height", "width", "channels"]}
    if settings.use_videos:
        image["info"] = settings.codec.info(height, width, settings.fps)
    return {
        STATE: {"dtype": "float32", "shape": [proprio_dim],
                "names": ["hand_x", "hand_y", "hand_z", "gripper_opening"] if proprio_dim == 4 else None},
        ACTION: {"dtype": "float32", "shape": [4], "names": ["dx", "dy", "dz", "gripper"]},
        **{IMAGES + camera: dict(image) for camera in first.cameras},
        **{name: {"dtype": dtype, "shape": [1], "names": None} for name, dtype in INDEX_FEATURES.items()},
    }


def _stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Per-dimension statistics of (N, d) or (N,) values, as LeRobot keeps them (exact quantiles)."""
    values = values.reshape(len(values), -1).astype(np.float64)
    stats = {"min": values.min(0), "max": values.max(0), "mean": values.mean(0), "std": values.std(0),
             "count": np.array([len(values)])}
    return stats | {name: np.quantile(values, q, axis=0) for name, q in QUANTILES.items()}


def _image_stats(histogram: np.ndarray, frames: int) -> dict[str, np.ndarray]:
    """Per-channel statistics in [0, 1], shape (3, 1, 1), from (3, 256) pixel-value counts."""
    levels = np.arange(256) / 255
    pixels = histogram.sum(1)
    mean = histogram @ levels / pixels
    cdf = np.cumsum(histogram, 1)
    stats = {"min": levels[(cdf > 0).argmax(1)], "max": levels[255 - (histogram[:, ::-1] > 0).argmax(1)],
             "mean": mean, "std": np.sqrt(np.maximum(histogram @ levels**2 / pixels - mean**2, 0))}
    stats |= {name: levels[(cdf >= q * pixels[:, None]).argmax(1)] for name, q in QUANTILES.items()}
    return {k: v.reshape(3, 1, 1) for k, v in stats.items()} | {"count": np.array([frames])}


def _histogram(images: np.ndarray) -> np.ndarray:
    return np.stack([np.bincount(images[..., c].ravel(), minlength=256) for c in range(3)])


def _vectors(values: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _next_file(chunk: int, file: int, chunks_size: int) -> tuple[int, int]:
    return (chunk + 1, 0) if file == chunks_size - 1 else (chunk, file + 1)


def _write_rolling(path: Callable[[int, int], Path], count: int, chunks_size: int,
                   fill: Callable[[Path, int], int]) -> list[tuple[int, int]]:
    """Write items 0..count-1 into a run of files, each atomically: `fill(tmp, first)` writes items from
    `first` on into one file until it is full and returns the next item. The (chunk, file) of each item."""
    where: list[tuple[int, int]] = []
    chunk = file = 0
    while len(where) < count:
        target, first = path(chunk, file), len(where)
        stop = first

        def write(tmp: Path) -> None:
            nonlocal stop
            stop = fill(tmp, first)  # noqa: B023 (atomic_write calls it at once)

        remove_atomic_leftovers(target.parent, target.name)
        atomic_write(target, write)
        where += [(chunk, file)] * (stop - first)
        chunk, file = _next_file(chunk, file, chunks_size)
    return where


def write_lerobot(out: str | Path, episodes: Sequence[Episode], settings: LeRobotSettings | None = None) -> Path:
    """Write `episodes` as a LeRobot v3 dataset into `out` (other files there are left alone; a folder that
    already holds meta/info.json is refused); returns the path of meta/info.json, written last.

    `episodes` is read once per camera with videos (once without), so a lazy sequence keeps memory small."""
    settings = settings or LeRobotSettings()
    out = Path(out)
    if is_lerobot_dataset(out):
        raise FileExistsError(f"{out} already holds a LeRobot dataset ({INFO_PATH}); write into a new folder")
    if not len(episodes):
        raise ValueError("a LeRobot dataset needs at least one episode, got none")
    first = episodes[0]
    features = _features(first, settings)
    tasks = list(dict.fromkeys(episode.instruction for episode in episodes))
    rows: list[dict[str, Any]] = [{} for _ in range(len(episodes))]
    if settings.use_videos:
        for c, camera in enumerate(first.cameras):
            _write_video(out, IMAGES + camera, c, episodes, rows, settings)
    totals = _write_data(out, episodes, features, tasks, rows, settings)
    _write_parquet(out / TASKS_PATH, _tasks_table(tasks))
    _write_parquet(out / EPISODES_PATH.format(chunk_index=0, file_index=0), pa.Table.from_pylist(rows))
    atomic_write_text(out / STATS_PATH, json.dumps(_stats_json(totals), indent=1) + "\n")
    info = {
        "codebase_version": CODEBASE_VERSION, "robot_type": settings.robot_type, "total_episodes": len(episodes),
        "total_frames": sum(row["length"] for row in rows), "total_tasks": len(tasks),
        "chunks_size": settings.chunks_size, "data_files_size_in_mb": settings.data_files_size_in_mb,
        "video_files_size_in_mb": settings.video_files_size_in_mb, "fps": settings.fps,
        "splits": {"train": f"0:{len(episodes)}"}, "data_path": DATA_PATH,
        "video_path": VIDEO_PATH if settings.use_videos else None, "features": features,
    }
    return atomic_write_text(out / INFO_PATH, json.dumps(info, indent=4) + "\n")


def _write_parquet(path: Path, table: pa.Table) -> None:
    remove_atomic_leftovers(path.parent, path.name)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _tasks_table(tasks: list[str]) -> pa.Table:
    """task_index and task, with the pandas metadata that makes `task` the index (LeRobot reads it so)."""
    pandas = {"index_columns": ["task"], "column_indexes": [], "pandas_version": "2.2.3",
              "creator": {"library": "pyarrow", "version": pa.__version__},
              "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                           "numpy_type": "int64", "metadata": None},
                          {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object",
                           "metadata": None}]}
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())})
    return table.replace_schema_metadata({"pandas": json.dumps(pandas)})


def _write_video(out: Path, key: str, camera: int, episodes: Sequence[Episode], rows: list[dict[str, Any]],
                 settings: LeRobotSettings) -> None:
    height, width = episodes[0].images.shape[2:4]

    def fill(tmp: Path, first: int) -> int:
        with VideoWriter(tmp, settings.fps, height, width, settings.codec) as video:
            i = first
            while i < len(episodes) and (i == first or tmp.stat().st_size < settings.video_files_size_in_mb << 20):
                start = video.frames
                video.write(episodes[i].images[:, camera])
                rows[i][f"videos/{key}/from_timestamp"] = start / settings.fps
                rows[i][f"videos/{key}/to_timestamp"] = video.frames / settings.fps
                i += 1
        return i

    where = _write_rolling(lambda c, f: out / VIDEO_PATH.format(video_key=key, chunk_index=c, file_index=f),
                           len(episodes), settings.chunks_size, fill)
    for row, (chunk, file) in zip(rows, where, strict=True):
        row[f"videos/{key}/chunk_index"], row[f"videos/{key}/file_index"] = chunk, file


def _write_data(out: Path, episodes: Sequence[Episode], features: dict[str, dict[str, Any]], tasks: list[str],
                rows: list[dict[str, Any]], settings: LeRobotSettings) -> dict[str, list[np.ndarray]]:
    """The frames' parquet files and each episode's row (frame range, stats, vlaopt fields); the values
    (and image histograms) the dataset's stats are computed from."""
    first, schema = episodes[0], _schema(features)
    shape = (first.cameras, first.images.shape[2:], first.proprio.shape[1:])
    totals: dict[str, list[np.ndarray]] = {name: [] for name in features}
    frames = [0]

    def fill(tmp: Path, start: int) -> int:
        size, i = 0, start
        with pq.ParquetWriter(tmp, schema) as writer:
            while i < len(episodes) and (i == start or size < settings.data_files_size_in_mb << 20):
                episode = episodes[i]
                if (episode.cameras, episode.images.shape[2:], episode.proprio.shape[1:]) != shape:
                    raise ValueError(f"episode {i} has cameras {episode.cameras}, images {episode.images.shape[2:]} "
                                     f"and proprio {episode.proprio.shape[1:]}, unlike episode 0: {shape}")
                columns = _frame_columns(episode, i, frames[0], tasks.index(episode.instruction), settings)
                table = pa.table({name: columns[name] for name in schema.names}, schema=schema)
                writer.write_table(table)
                size += table.nbytes
                rows[i] = _episode_row(episode, i, frames[0], columns, totals) | rows[i]
                frames[0] += episode.length
                i += 1
        return i

    where = _write_rolling(lambda c, f: out / DATA_PATH.format(chunk_index=c, file_index=f), len(episodes),
                           settings.chunks_size, fill)
    for row, (chunk, file) in zip(rows, where, strict=True):
        row["data/chunk_index"], row["data/file_index"] = chunk, file
        row["meta/episodes/chunk_index"] = row["meta/episodes/file_index"] = 0
    return totals


def _schema(features: dict[str, dict[str, Any]]) -> pa.Schema:
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    types = {"video": None, "image": image}
    return pa.schema([(name, types[ft["dtype"]] if ft["dtype"] in types else
                       pa.from_numpy_dtype(np.dtype(ft["dtype"])) if ft["shape"] == [1] else
                       pa.list_(pa.from_numpy_dtype(np.dtype(ft["dtype"])), ft["shape"][0]))
                      for name, ft in features.items() if ft["dtype"] != "video"])


def _frame_columns(episode: Episode, index: int, start: int, task_index: int,
                   settings: LeRobotSettings) -> dict[str, Any]:
    steps = episode.length
    columns: dict[str, Any] = {
        STATE: _vectors(episode.proprio), ACTION: _vectors(episode.actions),
        "timestamp": pa.array((np.arange(steps) / settings.fps).astype(np.float32)),
        "frame_index": pa.array(np.arange(steps, dtype=np.int64)),
        "episode_index": pa.array(np.full(steps, index, dtype=np.int64)),
        "index": pa.array(np.arange(start, start + steps, dtype=np.int64)),
        "task_index": pa.array(np.full(steps, task_index, dtype=np.int64)),
    }
    for c, camera in enumerate(episode.cameras if not settings.use_videos else ()):
        columns[IMAGES + camera] = pa.StructArray.from_arrays(
            [pa.array([_png(image) for image in episode.images[:, c]], pa.binary()), pa.nulls(steps, pa.string())],
            names=["bytes", "path"])
    return columns


def _episode_row(episode: Episode, index: int, start: int, columns: dict[str, Any],
                 totals: dict[str, list[np.ndarray]]) -> dict[str, Any]:
    """The episodes-table row of one episode; adds its values to `totals` for the dataset's stats."""
    row: dict[str, Any] = {"episode_index": index, "tasks": [episode.instruction], "length": episode.length,
                           "dataset_from_index": start, "dataset_to_index": start + episode.length}
    for name, parts in totals.items():
        if name.startswith(IMAGES):
            values = _histogram(episode.images[:, episode.cameras.index(name.removeprefix(IMAGES))])
            stats = _image_stats(values, episode.length)
        else:
            values = episode.proprio if name == STATE else episode.actions if name == ACTION else \
                columns[name].to_numpy()
            stats = _stats(values)
        parts.append(values)
        row |= {f"stats/{name}/{stat}": value.tolist() for stat, value in stats.items()}
    return row | {f"{EXTRA}task": episode.task, f"{EXTRA}seed": episode.seed, f"{EXTRA}success": episode.success,
                  f"{EXTRA}success_step": episode.success_step,
                  **({} if episode.reasoning is None else {f"{EXTRA}reasoning": list(episode.reasoning)})}


def _stats_json(totals: dict[str, list[np.ndarray]]) -> dict[str, dict[str, Any]]:
    out, frames = {}, sum(len(part) for part in totals["frame_index"])
    for name, parts in totals.items():
        if name.startswith(IMAGES):
            stats = _image_stats(np.sum(parts, axis=0), frames)
        else:
            stats = _stats(np.concatenate(parts))
        out[name] = {stat: value.tolist() for stat, value in stats.items()}
    return out
