"""`LeRobotDataset` and `read_lerobot`: a LeRobot v3 dataset folder, checked and read back as `Episode`s."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vlaopt.data.episodes import Episode
from vlaopt.data.lerobot.format import ACTION, EXTRA, IMAGES, INFO_PATH, STATE, LeRobotFormatError
from vlaopt.data.video import VideoReader
from vlaopt.utils.files import read_json


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
                       success_step=row.get(f"{EXTRA}success_step", length - 1 if success else -1),
                       reasoning=tuple(row[f"{EXTRA}reasoning"]) if row.get(f"{EXTRA}reasoning") else None)

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
