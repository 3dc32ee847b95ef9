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

Modules: format.py (paths, names, settings, errors), write.py (`write_lerobot`), read.py (`LeRobotDataset`,
`read_lerobot`), collect.py (`convert_collection`, `collect_lerobot`).
"""

from __future__ import annotations

try:  # write.py and read.py need these: say so once, before they are imported
    import pyarrow as pa  # noqa: F401
    import pyarrow.parquet as pq  # noqa: F401
    from PIL import Image  # noqa: F401
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(f"LeRobot datasets need pyarrow and Pillow: pip install 'vla-opt[lerobot]' ({error})") from error

from vlaopt.data.lerobot.collect import collect_lerobot, convert_collection
from vlaopt.data.lerobot.format import LeRobotFormatError, LeRobotSettings, is_lerobot_dataset
from vlaopt.data.lerobot.read import LeRobotDataset, read_lerobot
from vlaopt.data.lerobot.write import write_lerobot

__all__ = ["LeRobotDataset", "LeRobotFormatError", "LeRobotSettings", "collect_lerobot", "convert_collection",
           "is_lerobot_dataset", "read_lerobot", "write_lerobot"]
