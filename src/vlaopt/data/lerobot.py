"""LeRobot v3 datasets (codebase_version "v3.0"), written from our `Episode`s and read back into them.

Layout, relative to the dataset root (c, f: chunk and file index, 3 digits each; docs/data.md):
  meta/info.json        fps, counts, storage settings, path templates, features (dtype, shape, names)
  meta/stats.json       per feature over every frame: min, max, mean, std, count, q01 q10 q50 q90 q99
  meta/tasks.parquet    task_index and task (the instruction), task as the pandas index, as LeRobot reads it
  meta/episodes/chunk-c/file-f.parquet  one row per episode: frame range, file indices, video times, stats/*
  data/chunk-c/file-f.parquet           one row per frame (images as PNG structs when not in videos)
  videos/<key>/chunk-c/file-f.mp4       one camera's frames of consecutive episodes (video.py)
Fields LeRobot has no place for (MetaWorld task name, seed, success, success_step) are extra `vlaopt/*`
columns of the episodes table, so a round trip gives back equal episodes (images exactly when stored as
PNG). Every file is written atomically and meta/info.json last: a folder without it is an unfinished write.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(f"LeRobot datasets need pyarrow and Pillow: pip install 'vla-opt[lerobot]' ({error})") from error

from vlaopt.data.collect import collect
from vlaopt.data.episodes import Episode, EpisodeFormatError, read_episode, read_index
from vlaopt.data.video import VideoCodec, VideoReader, VideoWriter
from vlaopt.sim.env import CONTROL_HZ
from vlaopt.utils.files import read_json
from vlaopt.utils.io import atomic_leftover_of, atomic_write, atomic_write_text, remove_atomic_leftovers

CODEBASE_VERSION = "v3.0"
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
_CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
EPISODES_PATH = "meta/episodes/" + _CHUNK_FILE + ".parquet"
DATA_PATH = "data/" + _CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + _CHUNK_FILE + ".mp4"
STATE, ACTION, IMAGES, EXTRA = "observation.state", "action", "observation.images.", "vlaopt/"
INDEX_FEATURES = {"timestamp": "float32", "frame_index": "int64", "episode_index": "int64", "index": "int64",
                  "task_index": "int64"}
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
STAGING_NAME = ".vlaopt-collection"
"""The npz collection `collect_lerobot` rolls out into, inside the dataset folder; its index.json stays."""
_OWN_FILE = re.compile(r"meta/(info\.json|stats\.json|tasks\.parquet|episodes/chunk-\d{3}/file-\d{3}\.parquet)"
                       r"|data/chunk-\d{3}/file-\d{3}\.parquet|videos/[^/]+/chunk-\d{3}/file-\d{3}\.mp4")


class LeRobotFormatError(EpisodeFormatError):
    """A LeRobot dataset that is not v3, is damaged, or has features our VLA cannot use."""


@dataclass(frozen=True)
class LeRobotSettings:
    """How `write_lerobot` stores a dataset; sizes as LeRobot's defaults (a file rolls over past them)."""

    use_videos: bool = True
    fps: int = int(CONTROL_HZ)
    codec: VideoCodec = field(default_factory=VideoCodec)
    chunks_size: int = 1000
    data_files_size_in_mb: int = 100
    video_files_size_in_mb: int = 200
    robot_type: str = "sawyer"


def is_lerobot_dataset(root: str | Path) -> bool:
    """Whether `root` holds a (finished) LeRobot dataset: it has meta/info.json."""
    return (Path(root) / INFO_PATH).is_file()


# ---- writing ----------------------------------------------------------------------------------------
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
                  f"{EXTRA}success_step": episode.success_step}


def _stats_json(totals: dict[str, list[np.ndarray]]) -> dict[str, dict[str, Any]]:
    out, frames = {}, sum(len(part) for part in totals["frame_index"])
    for name, parts in totals.items():
        if name.startswith(IMAGES):
            stats = _image_stats(np.sum(parts, axis=0), frames)
        else:
            stats = _stats(np.concatenate(parts))
        out[name] = {stat: value.tolist() for stat, value in stats.items()}
    return out


# ---- reading ----------------------------------------------------------------------------------------
@dataclass
class LeRobotDataset:
    """The metadata of a LeRobot v3 dataset folder, checked for what our VLA needs: a float32 `action` of
    4 dimensions, a float32 1-D `observation.state`, and RGB `observation.images.*` (video or image)."""

    root: Path
    info: dict[str, Any]
    cameras: tuple[str, ...]
    episodes: list[dict[str, Any]]

    @classmethod
    def open(cls, root: str | Path) -> LeRobotDataset:
        root = Path(root)
        info = read_json(root / INFO_PATH, "LeRobot dataset info")
        where = f"LeRobot dataset {root}"
        if not isinstance(info, dict) or not isinstance(info.get("features"), dict):
            raise LeRobotFormatError(f"{where}: {INFO_PATH} has no 'features' table")
        version = info.get("codebase_version")
        if not isinstance(version, str) or not version.startswith("v3."):
            raise LeRobotFormatError(f"{where} has codebase_version {version!r}; vlaopt reads LeRobot v3.x datasets "
                                     "(convert older ones with lerobot's convert_dataset_v21_to_v30)")
        features = info["features"]
        for name, ndim in ((ACTION, 1), (STATE, 1)):
            if name not in features:
                raise LeRobotFormatError(f"{where} has no {name!r} feature; vlaopt needs {ACTION!r} and {STATE!r}")
            dtype, shape = features[name].get("dtype"), list(features[name].get("shape", []))
            if dtype != "float32" or len(shape) != ndim or (name == ACTION and shape != [4]):
                wanted = "[4] (dx, dy, dz, gripper)" if name == ACTION else "[n]"
                raise LeRobotFormatError(f"{where}: feature {name!r} is {dtype} of shape {shape}; "
                                         f"vlaopt needs float32 of shape {wanted}")
        cameras = tuple(name.removeprefix(IMAGES) for name in features if name.startswith(IMAGES))
        if not cameras:
            raise LeRobotFormatError(f"{where} has no {IMAGES}<camera> feature; vlaopt needs camera images")
        for camera in cameras:
            feature = features[IMAGES + camera]
            if feature.get("dtype") not in ("video", "image") or 3 not in list(feature.get("shape", []))[::2]:
                raise LeRobotFormatError(f"{where}: feature {IMAGES + camera!r} is {feature.get('dtype')} of shape "
                                         f"{feature.get('shape')}; vlaopt needs RGB 'video' or 'image' features")
        files = sorted((root / "meta" / "episodes").glob("*/*.parquet"))
        if not files:
            raise LeRobotFormatError(f"{where} has no episode table meta/episodes/*/*.parquet")
        table = pa.concat_tables([pq.read_table(f, columns=[c for c in pq.read_schema(f).names
                                                             if not c.startswith("stats/")]) for f in files])
        episodes = sorted(table.to_pylist(), key=lambda row: row["episode_index"])
        return cls(root, info, cameras, episodes)

    @property
    def fps(self) -> int:
        return int(self.info["fps"])

    def entries(self) -> list[dict[str, Any]]:
        """One index-style entry per episode (`file` names it), in episode order, as EpisodeDataset splits them."""
        return [{"file": f"episode-{row['episode_index']:06d}", "episode_index": row["episode_index"],
                 "task": row.get(f"{EXTRA}task") or _instruction(self.root, row), "instruction": _instruction(self.root, row),
                 "length": row["length"]} for row in self.episodes]

    def read(self, indices: Sequence[int] | None = None) -> Iterator[Episode]:
        """The episodes (all, or those of `indices`, in that order), decoded from the parquet and mp4 files."""
        rows = {row["episode_index"]: row for row in self.episodes}
        data: dict[Path, dict[str, np.ndarray]] = {}
        videos: dict[Path, VideoReader] = {}
        try:
            for index in rows if indices is None else indices:
                if index not in rows:
                    raise LeRobotFormatError(f"LeRobot dataset {self.root} has no episode {index}")
                yield self._episode(rows[index], data, videos)
        finally:
            for video in videos.values():
                video.close()

    def _episode(self, row: dict[str, Any], data: dict[Path, dict[str, np.ndarray]],
                 videos: dict[Path, VideoReader]) -> Episode:
        index, length = row["episode_index"], row["length"]
        path = self.root / self.info["data_path"].format(chunk_index=row["data/chunk_index"],
                                                         file_index=row["data/file_index"])
        if path not in data:
            data.clear()  # episodes come file after file: keep one file's columns
            data[path] = self._columns(path)
        columns = data[path]
        (rows,) = np.nonzero(columns["episode_index"] == index)
        rows = rows[np.argsort(columns["frame_index"][rows])]
        if not np.array_equal(columns["frame_index"][rows], np.arange(length)):
            raise LeRobotFormatError(f"{path} does not hold frames 0..{length - 1} of episode {index}")
        images = []
        for camera in self.cameras:
            key = IMAGES + camera
            if self.info["features"][key]["dtype"] == "image":
                images.append(np.stack([_unpng(columns[key][i], path, key) for i in rows]))
                continue
            video = self.root / self.info["video_path"].format(video_key=key, chunk_index=row[f"videos/{key}/chunk_index"],
                                                               file_index=row[f"videos/{key}/file_index"])
            start = round(row[f"videos/{key}/from_timestamp"] * self.fps)
            images.append(videos.setdefault(video, VideoReader(video, self.fps)).read(start, start + length))
        success = row.get(f"{EXTRA}success", True)
        return Episode(images=np.stack(images, axis=1), proprio=columns[STATE][rows], actions=columns[ACTION][rows],
                       task=row.get(f"{EXTRA}task") or _instruction(self.root, row),
                       instruction=_instruction(self.root, row), cameras=self.cameras,
                       seed=row.get(f"{EXTRA}seed", -1), success=success,
                       success_step=row.get(f"{EXTRA}success_step", length - 1 if success else -1))

    def _columns(self, path: Path) -> dict[str, Any]:
        keys = [IMAGES + c for c in self.cameras if self.info["features"][IMAGES + c]["dtype"] == "image"]
        try:
            table = pq.read_table(path, columns=[STATE, ACTION, "episode_index", "frame_index", *keys])
        except (OSError, pa.ArrowInvalid, KeyError) as error:
            raise LeRobotFormatError(f"data file {path} is missing, damaged or lacks a column ({error})") from error
        columns: dict[str, Any] = {name: table.column(name).to_numpy() for name in ("episode_index", "frame_index")}
        for name in (STATE, ACTION):
            values = table.column(name).combine_chunks()
            columns[name] = values.flatten().to_numpy().astype(np.float32).reshape(len(values), -1)
        for key in keys:
            columns[key] = table.column(key).combine_chunks().field("bytes").to_pylist()
        return columns


def _instruction(root: Path, row: dict[str, Any]) -> str:
    if len(row["tasks"]) != 1:
        raise LeRobotFormatError(f"LeRobot dataset {root}: episode {row['episode_index']} has tasks {row['tasks']}; "
                                 "a vlaopt episode has exactly one instruction")
    return row["tasks"][0]


def _unpng(data: bytes | None, path: Path, key: str) -> np.ndarray:
    if data is None:
        raise LeRobotFormatError(f"{path}: an image of {key!r} has no embedded bytes (external image files are "
                                 "not supported)")
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def read_lerobot(root: str | Path, indices: Sequence[int] | None = None) -> Iterator[Episode]:
    """The episodes of the LeRobot v3 dataset in `root` (all, or those of `indices`), as `Episode`s."""
    return LeRobotDataset.open(root).read(indices)


# ---- from and to our collections --------------------------------------------------------------------
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
