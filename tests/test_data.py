"""Expert collection, the episode format and the action-chunk dataset (needs MetaWorld and EGL)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from vlaopt.cli import main
from vlaopt.data import collect as collect_module
from vlaopt.data import episodes as episodes_module
from vlaopt.data.collect import (
    LOCK_NAME,
    POST_SUCCESS_STEPS,
    PROGRESS_NAME,
    CollectionInUseError,
    collect,
    episode_seed,
    record_episode,
)
from vlaopt.data.dataset import EpisodeDataset, compute_stats
from vlaopt.data.episodes import INDEX_NAME, EpisodeFormatError, read_episode, read_index, write_episode, write_index
from vlaopt.sim.env import SimEnv
from vlaopt.sim.scripted import ScriptedPolicy

TASK = "reach-v3"
SIZE = 32
MAX_STEPS = 80


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny reach-v3 episodes, collected by two spawned workers."""
    out = tmp_path_factory.mktemp("episodes")
    index_path = collect([TASK], 2, out, workers=2, image_size=SIZE, max_steps=MAX_STEPS, seed=0, progress=False)
    assert index_path == out / INDEX_NAME
    return out


def test_collect_keeps_successful_episodes(root: Path) -> None:
    index = read_index(root)
    assert index["settings"]["tasks"] == [TASK] and index["settings"]["image_size"] == SIZE
    assert len(index["episodes"]) == 2 and index["attempts"][TASK] >= 2
    assert sorted(p.name for p in root.iterdir()) == sorted([INDEX_NAME] + [e["file"] for e in index["episodes"]])
    for entry in index["episodes"]:
        episode = read_episode(root / entry["file"])
        assert entry["seed"] == episode.seed == episode_seed(0, TASK, entry["attempt"])
        assert episode.success and entry["success"]
        assert episode.length == entry["length"] == min(episode.success_step + 1 + POST_SUCCESS_STEPS, MAX_STEPS)
        assert episode.images.shape == (episode.length, 2, SIZE, SIZE, 3) and episode.images.dtype == np.uint8
        assert episode.proprio.shape == (episode.length, 4) and episode.actions.shape == (episode.length, 4)
        assert np.all(np.abs(episode.actions) <= 1)
        assert episode.instruction == entry["instruction"] == "move the gripper to the goal"
        assert episode.images.std() > 10  # real pictures, not blank frames


def test_collection_replays_exactly(root: Path) -> None:
    """An episode written by a worker equals a rollout of its seed in this process."""
    entry = read_index(root)["episodes"][0]
    stored = read_episode(root / entry["file"])
    with SimEnv(TASK, stored.seed, stored.cameras, SIZE, MAX_STEPS) as env:
        replay = record_episode(env, ScriptedPolicy(TASK), stored.seed, POST_SUCCESS_STEPS)
    for name in ("images", "proprio", "actions"):
        np.testing.assert_array_equal(getattr(replay, name), getattr(stored, name), err_msg=name)
    assert replay.reasoning == stored.reasoning and len(stored.reasoning) == stored.length
    done = stored.reasoning[stored.success_step + 1:]
    assert set(done) == {"at the goal; hold still"} and stored.reasoning[0] == "goal far; move to the goal"


def test_dataset_chunks_pad_with_the_last_action(root: Path) -> None:
    data = EpisodeDataset(root, split="all", chunk=8)
    episodes = [read_episode(root / entry["file"]) for entry in data.entries]
    assert len(data) == sum(e.length for e in episodes)
    i = 0
    for episode in episodes:
        for t in range(episode.length):
            sample = data[i]
            steps = np.arange(t, t + 8)
            np.testing.assert_array_equal(
                sample["actions"].numpy(), episode.actions[np.minimum(steps, episode.length - 1)]
            )
            np.testing.assert_array_equal(sample["action_is_pad"].numpy(), steps >= episode.length)
            np.testing.assert_array_equal(sample["images"].numpy(), episode.images[t])
            np.testing.assert_array_equal(sample["proprio"].numpy(), episode.proprio[t])
            assert sample["instruction"] == episode.instruction and sample["task"] == TASK
            assert sample["reasoning"] == episode.reasoning[t]
            i += 1
    last = data[len(data) - 1]
    assert last["action_is_pad"].sum() == 7 and torch.equal(last["actions"][0], last["actions"][-1])
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert batch["images"].shape == (4, 2, SIZE, SIZE, 3) and batch["images"].dtype == torch.uint8
    assert batch["actions"].shape == (4, 8, 4) and batch["actions"].dtype == torch.float32
    assert batch["instruction"] == [episodes[0].instruction] * 4
    with pytest.raises(IndexError, match="out of range"):
        data[len(data)]


def test_split_is_by_episode_and_deterministic(root: Path) -> None:
    train = EpisodeDataset(root, split="train", val_fraction=0.5, seed=1)
    val = EpisodeDataset(root, split="val", val_fraction=0.5, seed=1)
    files = {e["file"] for e in read_index(root)["episodes"]}
    assert len(train.entries) == len(val.entries) == 1
    assert {e["file"] for e in train.entries} | {e["file"] for e in val.entries} == files
    assert EpisodeDataset(root, split="val", val_fraction=0.5, seed=1).entries == val.entries
    seeds = {EpisodeDataset(root, split="val", val_fraction=0.5, seed=s).entries[0]["file"] for s in range(8)}
    assert seeds == files  # the seed picks which episode is held out
    with pytest.raises(ValueError, match="split 'val' of .* is empty"):
        EpisodeDataset(root, split="val", val_fraction=0.0)
    with pytest.raises(ValueError, match="split must be 'train', 'val' or 'all', got 'test'"):
        EpisodeDataset(root, split="test")  # type: ignore[arg-type]


def test_compute_stats_over_training_steps(root: Path) -> None:
    train = EpisodeDataset(root, split="train", val_fraction=0.5, seed=0)
    episode = read_episode(root / train.entries[0]["file"])
    stats = compute_stats(train)
    json.dumps(stats)  # plain floats, ready to store with a model
    for name, raw in (("action", episode.actions), ("proprio", episode.proprio)):
        s = {key: np.array(value) for key, value in stats[name].items()}
        assert set(s) == {"q01", "q99", "mean", "std", "min", "max"} and all(v.shape == (4,) for v in s.values())
        np.testing.assert_allclose(s["mean"], raw.mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s["std"], raw.std(axis=0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(s["q99"], np.quantile(raw.astype(np.float64), 0.99, axis=0))
        assert np.all(s["min"] <= s["q01"]) and np.all(s["q01"] <= s["q99"]) and np.all(s["q99"] <= s["max"])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_episode_names_the_file(root: Path, tmp_path: Path, damage: str) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    victim = copy / read_index(copy)["episodes"][1]["file"]
    data = victim.read_bytes()
    victim.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not an episode" * 100, "empty": b""}[damage])
    with pytest.raises(EpisodeFormatError, match=f"episode file {victim} is corrupt, truncated"):
        read_episode(victim)
    with pytest.raises(EpisodeFormatError, match=str(victim)):
        EpisodeDataset(copy, split="all")


def test_corrupt_index_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(EpisodeFormatError, match=f"no episode index at {tmp_path / INDEX_NAME}"):
        read_index(tmp_path)
    (tmp_path / INDEX_NAME).write_text('{"format": "vlaopt-episodes", "episo')
    with pytest.raises(EpisodeFormatError, match=f"episode index {tmp_path / INDEX_NAME} is corrupt"):
        EpisodeDataset(tmp_path)


def test_writes_are_atomic(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies halfway leaves the previous file intact and no temporary file behind."""
    write_index(tmp_path, {"seed": 0}, [], attempts={}, metaworld_version="x")
    before = (tmp_path / INDEX_NAME).read_text()
    episode = read_episode(root / read_index(root)["episodes"][0]["file"])
    write_episode(tmp_path / "ep.npz", episode)
    episode_bytes = (tmp_path / "ep.npz").read_bytes()

    def crash_text(self: Path, text: str) -> None:
        with open(self, "w") as f:
            f.write(text[:10])
        raise OSError("disk full")

    def crash_npz(file, **arrays: np.ndarray) -> None:
        file.write(b"PK\x03\x04partial")
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", crash_text)
    monkeypatch.setattr(episodes_module.np, "savez_compressed", crash_npz)
    with pytest.raises(OSError, match="disk full"):
        write_index(tmp_path, {"seed": 1}, [], attempts={}, metaworld_version="x")
    with pytest.raises(OSError, match="disk full"):
        write_episode(tmp_path / "ep.npz", episode)
    monkeypatch.undo()
    assert (tmp_path / INDEX_NAME).read_text() == before
    assert (tmp_path / "ep.npz").read_bytes() == episode_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep.npz", INDEX_NAME]


def test_collect_rejects_bad_requests(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task 'reach-v4'"):
        collect(["reach-v4"], 1, tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old.npz").write_bytes(b"")
    with pytest.raises(FileExistsError, match="is not empty"):
        collect([TASK], 1, tmp_path / "b", progress=False)


def test_collect_gives_up_when_the_expert_keeps_failing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"succeeded on only 0 of 6 attempts at 'reach-v3' within max_steps=2"):
        collect([TASK], 1, tmp_path, workers=0, image_size=8, cameras=("topview",), max_steps=2, progress=False)
    assert not (tmp_path / INDEX_NAME).exists() and not list(tmp_path.iterdir())


# ---- a collection keeps what it did: fault tests with real subprocesses ----------------------------
COLLECT = f"from vlaopt.data.collect import collect; import sys; collect([{TASK!r}], int(sys.argv[2]), sys.argv[1], " \
          f"workers=int(sys.argv[3]), image_size={SIZE}, max_steps={MAX_STEPS}, seed=0, progress=False)"
KILLED_COLLECT = f"""
import os, signal, sys
from vlaopt.data import collect as c
from vlaopt.utils.io import atomic_write

def die(*_, **__):
    os.kill(os.getpid(), signal.SIGKILL)

writes, real_write = [], c.write_episode

def write_episode(path, episode):  # the second episode dies halfway through its file
    writes.append(path)
    if len(writes) == 2:
        atomic_write(path, lambda tmp: (tmp.write_bytes(b"PK\\x03\\x04 half an episode"), die()))
    return real_write(path, episode)

if sys.argv[2] == "mid-episode":
    c.write_episode = write_episode
else:
    c.write_index = die
c.collect([{TASK!r}], 2, sys.argv[1], workers=0, image_size={SIZE}, max_steps={MAX_STEPS}, seed=0, progress=False)
"""


def _python(code: str, *args: str) -> subprocess.Popen:
    """Start `python -c code args...` (its stderr kept for the failure message)."""
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen, timeout: float) -> None:
    """Poll `condition` until it holds; fail if `process` exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the subprocess exited with {process.returncode}: {process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s")
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Whether process `pid` is running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _pool_workers(parent: int) -> list[int]:
    """The multiprocessing-spawned children of `parent` (not its resource tracker), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def test_second_collection_into_the_same_folder_fails_fast(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "data"
    first = _python(COLLECT, str(out), "50", "0")
    try:
        lock = out / LOCK_NAME
        _wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid), first, 60)
        start = time.monotonic()
        message = rf"{re.escape(str(out))} is in use by another collection \(pid {first.pid}, lock {re.escape(str(lock))}\)"
        for resume in (False, True):
            with pytest.raises(CollectionInUseError, match=message):
                collect([TASK], 50, out, workers=0, image_size=SIZE, max_steps=MAX_STEPS, progress=False, resume=resume)
        assert main(["collect", "--tasks", TASK, "--episodes-per-task", "50", "--out", str(out), "--workers", "0",
                     "--image-size", str(SIZE), "--max-steps", str(MAX_STEPS)]) == 2
        assert f"is in use by another collection (pid {first.pid}" in capsys.readouterr().err
        assert time.monotonic() - start < 5 and first.poll() is None  # refused at once; the first one runs on
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("kill", ["mid-episode", "before-index"])
def test_killed_collection_resumes_to_the_same_index(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kill: str
) -> None:
    """SIGKILL halfway through the second episode file, or just before the index: --resume keeps the
    finished attempts, drops the half-written file and gives the index of an uninterrupted run."""
    out = tmp_path / "data"
    killed = _python(KILLED_COLLECT, str(out), kill)
    assert killed.wait(timeout=150) == -signal.SIGKILL, killed.stderr.read().decode()[-2000:]
    assert (out / PROGRESS_NAME).is_file() and not (out / INDEX_NAME).exists()
    assert any(p.name.endswith(".tmp") for p in out.iterdir()) == (kill == "mid-episode")
    settings = {"workers": 0, "image_size": SIZE, "max_steps": MAX_STEPS, "seed": 0, "progress": False}
    with pytest.raises(FileExistsError, match=rf"{re.escape(str(out))} is not empty; it holds an unfinished .*--resume"):
        collect([TASK], 2, out, **settings)
    with pytest.raises(ValueError, match=r"collected with max_steps=80, this run asks for max_steps=81"):
        collect([TASK], 2, out, **{**settings, "max_steps": 81}, resume=True)
    rerun: list[int] = []
    real = collect_module._run_attempts

    def run_attempts(settings: collect_module.CollectSettings, task: str, attempts: list[int], out_dir: Path) -> list:
        rerun.extend(attempts)
        return real(settings, task, attempts, out_dir)

    monkeypatch.setattr(collect_module, "_run_attempts", run_attempts)
    index = collect([TASK], 2, out, **settings, resume=True)
    second = read_index(root)["episodes"][1]["attempt"]
    assert rerun == ([second] if kill == "mid-episode" else [])  # only the attempt that died is rolled out again
    assert index.read_text() == (root / INDEX_NAME).read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in root.iterdir())  # no journal, lock, .tmp
    for entry in read_index(out)["episodes"]:
        assert (out / entry["file"]).read_bytes() == (root / entry["file"]).read_bytes()
    assert collect([TASK], 2, out, **settings, resume=True) == index  # complete: nothing left to do
    assert rerun == ([second] if kill == "mid-episode" else [])


def test_workers_die_with_a_killed_collection(tmp_path: Path) -> None:
    out = tmp_path / "data"
    parent = _python(COLLECT, str(out), "40", "2")
    workers: list[int] = []
    try:
        def working() -> bool:
            workers[:] = _pool_workers(parent.pid)
            return len(workers) == 2 and any(out.glob("*.npz"))

        _wait_for(working, parent, 120)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if _alive(pid)], "pool workers outlived their killed parent"
    finally:
        parent.kill()
        parent.wait()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
