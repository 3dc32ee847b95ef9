"""The LeRobot v3 layout shared by the writer and the reader: paths, feature names, settings, errors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from vlaopt.data.episodes import EpisodeFormatError
from vlaopt.data.video import VideoCodec
from vlaopt.sim.env import CONTROL_HZ

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

