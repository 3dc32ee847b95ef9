"""LeRobot v3 datasets: written from episodes and read back, checked against the v3 layout (re-typed here
from LeRobot's datasets code), trained on from the command line, and refused with one clear error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pytest.importorskip("av")
import pyarrow.parquet as pq

from vlaopt.cli import main
from vlaopt.config import VLAConfig
from vlaopt.data.dataset import EpisodeDataset
from vlaopt.data.episodes import Episode, write_episode, write_index
from vlaopt.data.lerobot import LeRobotFormatError, LeRobotSettings, convert_collection, read_lerobot, write_lerobot

SIZE, CAMERAS = 16, ("corner4", "topview")
VIDEO_MEAN_ERROR = 6.0
"""Video tolerance: mean |decoded - original| per pixel value, in 0..255 levels (AV1 crf 30, yuv420p)."""


def _episode(i: int, steps: int) -> Episode:
    """Smooth random images (a moving gradient plus mild noise: what a lossy codec is meant for)."""
    rng = np.random.default_rng(i)
    ramp = np.linspace(0, 180, SIZE)
    t = np.arange(steps)[:, None, None, None, None]
    cam = np.arange(len(CAMERAS))[None, :, None, None, None]
    base = ramp[None, None, :, None, None] + ramp[None, None, None, :, None] / 4 + 6 * t + 20 * cam
    images = (base + np.array([0, 30, 60]) + rng.integers(0, 4, (steps, len(CAMERAS), SIZE, SIZE, 3))).clip(0, 255)
    task = ("reach-v3", "push-v3")[i % 2]
    return Episode(images=images.astype(np.uint8), proprio=rng.standard_normal((steps, 4)).astype(np.float32),
                   actions=rng.uniform(-1, 1, (steps, 4)).astype(np.float32), task=task, instruction=f"do {task}",
                   cameras=CAMERAS, seed=1000 + i, success=True, success_step=steps - 3,
                   reasoning=tuple(f"step {t}; go on" for t in range(steps)))


EPISODES = [_episode(i, 5 + i) for i in range(4)]


def _assert_same(a: Episode, b: Episode, exact: bool) -> None:
    assert (a.task, a.instruction, a.cameras, a.seed, a.success, a.success_step, a.reasoning) == \
        (b.task, b.instruction, b.cameras, b.seed, b.success, b.success_step, b.reasoning)
    assert np.array_equal(a.proprio, b.proprio) and np.array_equal(a.actions, b.actions)
    assert b.images.dtype == np.uint8 and b.images.shape == a.images.shape
    error = np.abs(a.images.astype(int) - b.images)
    assert error.max() == 0 if exact else error.mean() < VIDEO_MEAN_ERROR


@pytest.mark.parametrize("use_videos", [False, True])
def test_round_trip(tmp_path: Path, use_videos: bool) -> None:
    write_lerobot(tmp_path, EPISODES, LeRobotSettings(use_videos=use_videos))
    back = list(read_lerobot(tmp_path))
    assert len(back) == len(EPISODES)
    for a, b in zip(EPISODES, back, strict=True):
        _assert_same(a, b, exact=not use_videos)
    assert [e.seed for e in read_lerobot(tmp_path, [2, 0])] == [1002, 1000]


# The v3 layout, re-typed from lerobot/datasets (utils.py, dataset_metadata.py, compute_stats.py).
V3_INFO_KEYS = {"codebase_version", "robot_type", "total_episodes", "total_frames", "total_tasks", "chunks_size",
                "data_files_size_in_mb", "video_files_size_in_mb", "fps", "splits", "data_path", "video_path",
                "features"}
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V3_STATS = {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}
V3_INDEX_FEATURES = {"timestamp": "float32", "frame_index": "int64", "episode_index": "int64", "index": "int64",
                     "task_index": "int64"}


@pytest.mark.parametrize("use_videos", [False, True])
def test_layout_follows_the_v3_spec(tmp_path: Path, use_videos: bool) -> None:
    write_lerobot(tmp_path, EPISODES, LeRobotSettings(use_videos=use_videos))
    keys = [f"observation.images.{c}" for c in CAMERAS]
    files = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    expected = {"meta/info.json", "meta/stats.json", "meta/tasks.parquet", "meta/episodes/chunk-000/file-000.parquet",
                "data/chunk-000/file-000.parquet"}
    if use_videos:
        expected |= {V3_VIDEO_PATH.format(video_key=k, chunk_index=0, file_index=0) for k in keys}
    assert files == expected

    info = json.loads((tmp_path / "meta/info.json").read_text())
    frames = sum(e.length for e in EPISODES)
    assert set(info) == V3_INFO_KEYS
    assert (info["codebase_version"], info["fps"], info["total_episodes"], info["total_frames"], info["total_tasks"],
            info["chunks_size"]) == ("v3.0", 80, 4, frames, 2, 1000)
    assert info["data_path"] == V3_DATA_PATH and info["video_path"] == (V3_VIDEO_PATH if use_videos else None)
    features = info["features"]
    assert list(features) == ["observation.state", "action", *keys, *V3_INDEX_FEATURES]
    assert features["action"] == {"dtype": "float32", "shape": [4], "names": ["dx", "dy", "dz", "gripper"]}
    assert features["observation.state"]["dtype"] == "float32" and features["observation.state"]["shape"] == [4]
    for key in keys:
        assert features[key]["dtype"] == ("video" if use_videos else "image")
        assert features[key]["shape"] == [SIZE, SIZE, 3] and features[key]["names"] == ["height", "width", "channels"]
        if use_videos:
            assert {"video.codec": "av1", "video.pix_fmt": "yuv420p", "video.fps": 80}.items() <= \
                features[key]["info"].items()
    for name, dtype in V3_INDEX_FEATURES.items():
        assert features[name] == {"dtype": dtype, "shape": [1], "names": None}

    data = pq.read_table(tmp_path / "data/chunk-000/file-000.parquet")
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    types = {"observation.state": pa.list_(pa.float32(), 4), "action": pa.list_(pa.float32(), 4),
             **({} if use_videos else dict.fromkeys(keys, image)),
             **{name: pa.float32() if dtype == "float32" else pa.int64() for name, dtype in V3_INDEX_FEATURES.items()}}
    assert data.schema.names == list(types)
    for name, kind in types.items():
        assert data.schema.field(name).type.equals(kind, check_metadata=False) or \
            (pa.types.is_fixed_size_list(data.schema.field(name).type) and data.schema.field(name).type.list_size == 4)
    assert data.column("index").to_pylist() == list(range(frames))

    episodes = pq.read_table(tmp_path / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    start = 0
    for i, (row, episode) in enumerate(zip(episodes, EPISODES, strict=True)):
        assert (row["episode_index"], row["tasks"], row["length"]) == (i, [episode.instruction], episode.length)
        assert (row["dataset_from_index"], row["dataset_to_index"]) == (start, start + episode.length)
        assert (row["data/chunk_index"], row["data/file_index"], row["meta/episodes/chunk_index"],
                row["meta/episodes/file_index"]) == (0, 0, 0, 0)
        for key in keys if use_videos else ():
            assert (row[f"videos/{key}/chunk_index"], row[f"videos/{key}/file_index"]) == (0, 0)
            assert row[f"videos/{key}/from_timestamp"] == pytest.approx(start / 80)
            assert row[f"videos/{key}/to_timestamp"] == pytest.approx((start + episode.length) / 80)
        assert {k.split("/")[-1] for k in row if k.startswith("stats/action/")} == V3_STATS
        assert (row["vlaopt/task"], row["vlaopt/seed"]) == (episode.task, episode.seed)
        start += episode.length
    assert start == frames

    tasks = pq.read_table(tmp_path / "meta/tasks.parquet")
    assert tasks.to_pylist() == [{"task_index": 0, "task": "do reach-v3"}, {"task_index": 1, "task": "do push-v3"}]
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]

    stats = json.loads((tmp_path / "meta/stats.json").read_text())
    assert set(stats) == set(features)
    for name, feature_stats in stats.items():
        assert set(feature_stats) == V3_STATS and feature_stats["count"] == [frames]
    actions = np.concatenate([e.actions for e in EPISODES])
    np.testing.assert_allclose(stats["action"]["mean"], actions.astype(np.float64).mean(0), rtol=1e-9)
    assert np.array(stats[keys[0]]["mean"]).shape == (3, 1, 1)
    np.testing.assert_allclose(np.array(stats[keys[0]]["max"]).ravel(),
                               np.concatenate([e.images[:, 0] for e in EPISODES]).max((0, 1, 2)) / 255)


def _collection(root: Path) -> Path:
    entries = []
    for i, episode in enumerate(EPISODES):
        write_episode(root / f"{episode.task}_{i:04d}.npz", episode)
        entries.append({"file": f"{episode.task}_{i:04d}.npz", "task": episode.task, "instruction": episode.instruction,
                        "seed": episode.seed, "attempt": i, "length": episode.length, "success": True,
                        "success_step": episode.success_step})
    write_index(root, {"image_size": SIZE}, entries, attempts={"reach-v3": 2, "push-v3": 2}, metaworld_version="x")
    return root


def test_training_data_is_the_same_from_both_formats(tmp_path: Path) -> None:
    collection = _collection(tmp_path / "episodes")
    convert_collection(collection, tmp_path / "lerobot", LeRobotSettings(use_videos=False))
    for split in ("train", "val"):
        ours = EpisodeDataset(collection, split, chunk=4, val_fraction=0.5, seed=3)
        theirs = EpisodeDataset(tmp_path / "lerobot", split, chunk=4, val_fraction=0.5, seed=3)
        assert [e["task"] for e in ours.entries] == [e["task"] for e in theirs.entries] and len(ours) == len(theirs)
        for i in range(len(ours)):
            a, b = ours[i], theirs[i]
            assert a.keys() == b.keys()
            for key, value in a.items():
                assert torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key]
    cfg = VLAConfig.tiny(cameras=2, proprio_dim=4, action_dim=4, image_size=SIZE)
    cfg.save(tmp_path / "cfg.yaml")
    assert main(["train", "--data", str(tmp_path / "lerobot"), "--config", str(tmp_path / "cfg.yaml"), "--out",
                 str(tmp_path / "m"), "--steps", "1", "--batch-size", "4", "--val-every", "1",
                 "--val-fraction", "0.5"]) == 0


def _edit_info(root: Path, edit) -> None:
    path = root / "meta/info.json"
    info = json.loads(path.read_text())
    edit(info)
    path.write_text(json.dumps(info))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda info: info.update(codebase_version="v2.1"),
     ("has codebase_version 'v2.1'; vlaopt reads LeRobot v3.x datasets (convert older ones with lerobot's "
     "convert_dataset_v21_to_v30)")),
    (lambda info: info["features"].pop("action"),
     "has no 'action' feature; vlaopt needs 'action' and 'observation.state'"),
    (lambda info: info["features"]["action"].update(dtype="float64"),
     "feature 'action' is float64 of shape [4]; vlaopt needs float32 of shape [4] (dx, dy, dz, gripper)"),
    (lambda info: info["features"]["action"].update(shape=[7]),
     "feature 'action' is float32 of shape [7]; vlaopt needs float32 of shape [4] (dx, dy, dz, gripper)"),
    (lambda info: [info["features"].pop(f"observation.images.{c}") for c in CAMERAS],
     "has no observation.images.<camera> feature; vlaopt needs camera images"),
])
def test_unusable_datasets_are_refused_naming_the_value(tmp_path: Path, capsys, edit, message: str) -> None:
    write_lerobot(tmp_path / "d", EPISODES[:2], LeRobotSettings(use_videos=False))
    _edit_info(tmp_path / "d", edit)
    VLAConfig.tiny(cameras=2, proprio_dim=4, action_dim=4, image_size=SIZE).save(tmp_path / "cfg.yaml")
    with pytest.raises(LeRobotFormatError, match=re.escape(f"LeRobot dataset {tmp_path / 'd'}")) as error:
        EpisodeDataset(tmp_path / "d", "all")
    assert message in str(error.value)
    assert main(["train", "--data", str(tmp_path / "d"), "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "m")]) == 2
    assert message in capsys.readouterr().err


def test_writing_refuses_what_it_cannot_store(tmp_path: Path) -> None:
    write_lerobot(tmp_path, EPISODES[:1], LeRobotSettings(use_videos=False))
    with pytest.raises(FileExistsError, match=re.escape(f"{tmp_path} already holds a LeRobot dataset (meta/info.json)")):
        write_lerobot(tmp_path, EPISODES[:1])
    odd = Episode(EPISODES[0].images[:, :, :15, :15], EPISODES[0].proprio, EPISODES[0].actions, "reach-v3", "x",
                  CAMERAS, 0, False, -1)
    with pytest.raises(ValueError, match=re.escape("yuv420p video needs an even image height and width, got 15x15")):
        write_lerobot(tmp_path / "odd", [odd])
    assert not (tmp_path / "odd" / "meta").exists()


def test_collect_writes_a_lerobot_dataset(tmp_path: Path) -> None:
    pytest.importorskip("metaworld")
    out = tmp_path / "d"
    args = ["collect", "--tasks", "reach-v3", "--episodes-per-task", "2", "--out", str(out), "--workers", "0",
            "--image-size", "16", "--max-steps", "60", "--format", "lerobot"]
    assert main(args) == 0
    assert sorted(p.name for p in (out / ".vlaopt-collection").iterdir()) == ["index.json"]  # npz files removed
    episodes = list(read_lerobot(out))
    assert len(episodes) == 2 and episodes[0].task == "reach-v3" and episodes[0].images.shape[1:] == (2, 16, 16, 3)
    info = (out / "meta/info.json").read_bytes()
    assert main([*args, "--resume"]) == 0 and (out / "meta/info.json").read_bytes() == info  # finished: nothing to do
    assert main(args) == 2  # not empty without --resume
