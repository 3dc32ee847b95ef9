"""Collect successful scripted-expert demonstrations of MetaWorld tasks, in parallel worker processes.

Attempt k at a task starts from the initial state of `episode_seed(seed, task, k)`. For each task the
attempts 0, 1, 2, ... are rolled out until `episodes_per_task` of them succeeded; failed attempts are
dropped. Attempts are deterministic and always run as a gap-free prefix, so the same settings give the
same episodes whatever the number of workers or the order in which they finish.

A collection keeps what it did: it holds a lock on its folder for the whole run (a second collection
into the same folder fails at once), records the finished attempts in `progress.json` as jobs finish,
and `resume=True` continues a killed collection where it stopped, to the same index.json.
"""

from __future__ import annotations

import fcntl
import json
import math
import multiprocessing
import os
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vlaopt.data.episodes import (
    INDEX_NAME,
    Episode,
    EpisodeFormatError,
    read_episode,
    read_index,
    write_episode,
    write_index,
)
from vlaopt.sim.env import DEFAULT_CAMERAS, DEFAULT_IMAGE_SIZE, DEFAULT_MAX_STEPS, SimEnv
from vlaopt.sim.reasoning import has_reasoning, reasoning_text
from vlaopt.sim.scripted import ScriptedPolicy
from vlaopt.sim.tasks import instruction
from vlaopt.utils.io import atomic_leftover_of, atomic_write_text
from vlaopt.utils.processes import die_with_parent, worker_pool
from vlaopt.utils.seeds import derive_seed

POST_SUCCESS_STEPS = 5
"""Steps recorded after the first success: the policy also sees how the motion settles at the goal."""
ATTEMPTS_PER_JOB = 4
"""Attempts a worker rolls out with one env: amortizes the ~0.5 s env and renderer start."""
PROGRESS_NAME = "progress.json"
"""Journal of an unfinished collection: its settings and every finished attempt; removed when index.json is written."""
PROGRESS_FORMAT = "vlaopt-collect-progress"
LOCK_NAME = ".collect.lock"
"""Held (flock) by the running collection of a folder; holds its pid; removed when the collection ends."""
_EPISODE_FILE = re.compile(r"(?P<task>.+)_(?P<attempt>\d{4,})\.npz")


class CollectionInUseError(OSError):
    """The collection folder is locked by another collection that is still running."""


class ScriptedPolicyGaveUpError(ValueError):
    """A task's scripted policy failed too often to give the requested number of episodes (a setting,
    usually max_steps, is too tight: the CLI prints it as a user error)."""


@dataclass(frozen=True)
class CollectSettings:
    """Everything that determines a collection; stored in its index.json."""

    tasks: tuple[str, ...]
    episodes_per_task: int
    image_size: int = DEFAULT_IMAGE_SIZE
    cameras: tuple[str, ...] = DEFAULT_CAMERAS
    max_steps: int = DEFAULT_MAX_STEPS
    seed: int = 0
    post_success_steps: int = POST_SUCCESS_STEPS

    def __post_init__(self) -> None:
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be a non-empty list without repeats, got {list(self.tasks)}")
        for task in self.tasks:
            instruction(task)  # raises on an unknown task
        for name in ("episodes_per_task", "image_size", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.cameras:
            raise ValueError("cameras is empty; expected at least one camera name")
        if self.seed < 0 or self.post_success_steps < 0:
            raise ValueError(f"seed and post_success_steps must be >= 0, got {self.seed}, {self.post_success_steps}")

    @property
    def max_attempts(self) -> int:
        """Attempts per task after which collection gives up on a task whose expert keeps failing."""
        return 2 * self.episodes_per_task + 4

    def to_json(self) -> dict[str, Any]:
        """The settings as stored in index.json and progress.json (tuples as lists)."""
        return json.loads(json.dumps(asdict(self)))


Finished = dict[str, dict[int, "dict[str, Any] | None"]]
"""Per task, every finished attempt: its index entry when it succeeded, None when it failed."""


def episode_seed(seed: int, task: str, attempt: int) -> int:
    """The env seed of attempt `attempt` at `task` in a collection seeded with `seed`; stable everywhere."""
    return derive_seed(seed, task, attempt)


def episode_file(task: str, attempt: int) -> str:
    """The file name of the episode of a successful attempt."""
    return f"{task}_{attempt:04d}.npz"


def record_episode(env: SimEnv, expert: ScriptedPolicy, seed: int, post_success_steps: int) -> Episode:
    """Roll out the expert from the initial state of `seed` until `post_success_steps` steps after the
    first success, or until the env's max_steps. Tasks with reasoning targets (vlaopt.sim.reasoning)
    get each step's text, read from the state before the expert acts on it."""
    obs = env.reset(seed=seed)
    images, proprio, actions, reasoning = [], [], [], []
    success_step = -1
    while env.steps < env.max_steps and (success_step < 0 or env.steps <= success_step + post_success_steps):
        if has_reasoning(env.task):
            reasoning.append(reasoning_text(env.task, env.state.copy(), done=success_step >= 0))
        action = expert.act(env)
        images.append(obs["images"])
        proprio.append(obs["proprio"])
        actions.append(action)
        obs, success, _ = env.step(action)
        if success and success_step < 0:
            success_step = env.steps - 1
    return Episode(
        images=np.stack(images),
        proprio=np.stack(proprio),
        actions=np.stack(actions),
        task=env.task,
        instruction=env.instruction,
        cameras=env.cameras,
        seed=seed,
        success=success_step >= 0,
        success_step=success_step,
        reasoning=tuple(reasoning) if reasoning else None,
    )


def _entry(task: str, attempt: int, episode: Episode) -> dict[str, Any]:
    """The index.json entry of the successful `attempt` at `task`."""
    return {
        "file": episode_file(task, attempt),
        "task": task,
        "instruction": episode.instruction,
        "seed": episode.seed,
        "attempt": attempt,
        "length": episode.length,
        "success": True,
        "success_step": episode.success_step,
    }


def _run_attempts(
    settings: CollectSettings, task: str, attempts: list[int], out_dir: Path
) -> list[dict[str, Any] | None]:
    """Worker: roll out `attempts` of `task` with one env, write the successes; an index entry or None each."""
    expert = ScriptedPolicy(task)
    results: list[dict[str, Any] | None] = []
    first_seed = episode_seed(settings.seed, task, attempts[0])
    with SimEnv(task, first_seed, settings.cameras, settings.image_size, settings.max_steps) as env:
        for attempt in attempts:
            seed = episode_seed(settings.seed, task, attempt)
            episode = record_episode(env, expert, seed, settings.post_success_steps)
            if not episode.success:
                results.append(None)
                continue
            write_episode(out_dir / episode_file(task, attempt), episode)
            results.append(_entry(task, attempt, episode))
    return results


class _InlineExecutor(Executor):
    """Runs each job when it is submitted, in the calling process (workers=0)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as error:
            future.set_exception(error)
        return future


def _make_executor(workers: int) -> Executor:
    """Spawned (not forked) workers: each starts its own clean OpenGL context, and dies with this process."""
    if workers == 0:
        return _InlineExecutor()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent)


# ---- the folder: lock, journal, resume ----------------------------------------------------------------
@contextmanager
def _folder_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on `out` (the file `out/.collect.lock`, which records the
    pid) while the block runs; the system drops it when this process dies, even by SIGKILL."""
    path = out / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CollectionInUseError(
                f"{out} is in use by another collection (pid {holder}, lock {path}); "
                "wait for it to finish or collect into another folder"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # else the previous holder removed the file between our open and our lock: retry
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _check_settings(stored: dict[str, Any], settings: CollectSettings, metaworld: str, source: Path) -> None:
    """Raise, naming the first differing setting, unless `source` was collected with the same settings."""
    wanted = {**settings.to_json(), "metaworld_version": metaworld}
    for key, value in wanted.items():
        if stored.get(key) != value:
            raise ValueError(
                f"cannot resume {source.parent}: it was collected with {key}={stored.get(key)!r}, "
                f"this run asks for {key}={value!r}; rerun with the same settings or collect into a new folder"
            )


def _prepare(out: Path, settings: CollectSettings, resume: bool) -> Finished | None:
    """The attempts already finished in the locked folder `out` (none for a new or empty one), or None
    when `resume` finds the collection complete; refuses a folder that holds anything else."""
    names = {p.name for p in out.iterdir()} - {LOCK_NAME}
    if not names:
        return {task: {} for task in settings.tasks}
    unfinished = PROGRESS_NAME in names and INDEX_NAME not in names
    if not resume:
        hint = (f" it holds an unfinished collection ({PROGRESS_NAME}): continue it with --resume "
                "(collect(..., resume=True)), or" if unfinished else "")
        raise FileExistsError(f"{out} is not empty;{hint} collect into a new or empty folder")
    metaworld = version("metaworld")
    if INDEX_NAME in names:  # finished; a journal left by a kill right after the index is stale
        index = read_index(out)
        _check_settings({**index["settings"], "metaworld_version": index.get("metaworld_version")}, settings,
                        metaworld, out / INDEX_NAME)
        (out / PROGRESS_NAME).unlink(missing_ok=True)
        return None
    if not unfinished:
        raise FileExistsError(f"{out} is not empty and holds no {PROGRESS_NAME}, so there is no collection to "
                              "resume; collect into a new or empty folder")
    return _load_progress(out, settings, metaworld)


def _load_progress(out: Path, settings: CollectSettings, metaworld: str) -> Finished:
    """The finished attempts of the interrupted collection in `out`: the failures its journal
    recorded, and its intact episode files (recorded or not: a kill can come between a file and its
    record). Removes the half-written files of the killed run."""
    path = out / PROGRESS_NAME
    try:
        journal = json.loads(path.read_text())
        if journal.get("format") != PROGRESS_FORMAT:
            raise KeyError("format")
        stored = {**journal["settings"], "metaworld_version": journal["metaworld_version"]}
        recorded = journal["finished"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError) as error:
        raise EpisodeFormatError(f"collection journal {path} is corrupt ({type(error).__name__}: {error})") from error
    _check_settings(stored, settings, metaworld, path)
    _remove_partial_files(out, settings)
    finished: Finished = {task: {} for task in settings.tasks}
    for task in settings.tasks:
        finished[task].update((int(a), None) for a, entry in recorded.get(task, {}).items() if entry is None)
    for file in sorted(out.glob("*.npz")):  # a recorded success whose file is gone or damaged is rolled out again
        found = _episode_attempt(file.name, settings)
        if found is not None and (entry := _verified_entry(out, settings, *found)) is not None:
            finished[found[0]][found[1]] = entry
    return finished


def _episode_attempt(name: str, settings: CollectSettings) -> tuple[str, int] | None:
    """(task, attempt) when `name` is the episode file name of an attempt of this collection."""
    match = _EPISODE_FILE.fullmatch(name)
    if match is None or match["task"] not in settings.tasks:
        return None
    task, attempt = match["task"], int(match["attempt"])
    return (task, attempt) if episode_file(task, attempt) == name and attempt < settings.max_attempts else None


def _verified_entry(out: Path, settings: CollectSettings, task: str, attempt: int) -> dict[str, Any] | None:
    """The index entry of the episode file of `attempt`, or None when it is missing, unreadable or
    not that attempt's episode."""
    try:
        episode = read_episode(out / episode_file(task, attempt))
    except (FileNotFoundError, EpisodeFormatError):
        return None
    if episode.task != task or episode.seed != episode_seed(settings.seed, task, attempt) or not episode.success:
        return None
    return _entry(task, attempt, episode)


def _remove_partial_files(out: Path, settings: CollectSettings) -> None:
    """Delete the temporary files a killed collection left half-written (only names it writes)."""
    for file in out.iterdir():
        name = atomic_leftover_of(file.name)
        if name is not None and (name in (INDEX_NAME, PROGRESS_NAME) or _episode_attempt(name, settings)):
            file.unlink(missing_ok=True)


def _write_progress(out: Path, settings: CollectSettings, finished: Finished) -> None:
    """Rewrite the journal atomically: settings, MetaWorld version and every finished attempt."""
    journal = {
        "format": PROGRESS_FORMAT,
        "metaworld_version": version("metaworld"),
        "settings": settings.to_json(),
        "finished": {task: {str(a): finished[task][a] for a in sorted(finished[task])} for task in settings.tasks},
    }
    atomic_write_text(out / PROGRESS_NAME, json.dumps(journal, indent=1) + "\n")


# ---- the run ------------------------------------------------------------------------------------------
def _collect_missing(settings: CollectSettings, out: Path, workers: int, finished: Finished, progress: bool) -> None:
    """Roll out attempts not yet finished, lowest first, until every task has its episodes; records
    each finished job in `finished` and in the journal."""
    todo = {task: deque(a for a in range(settings.max_attempts) if a not in finished[task]) for task in settings.tasks}
    unfinished = dict.fromkeys(settings.tasks, 0)  # attempts queued or running
    queue: deque[tuple[str, list[int]]] = deque()
    running: dict[Future, tuple[str, list[int]]] = {}

    def successes(task: str) -> int:
        return sum(entry is not None for entry in finished[task].values())

    def plan(task: str) -> None:
        """Queue just enough new attempts of `task` to reach its target if all of them succeed."""
        deficit = settings.episodes_per_task - successes(task) - unfinished[task]
        while deficit > 0:
            if not todo[task]:
                if unfinished[task] == 0:
                    raise ScriptedPolicyGaveUpError(
                        f"the scripted expert succeeded on only {successes(task)} of {settings.max_attempts} "
                        f"attempts at {task!r} within max_steps={settings.max_steps}; raise max_steps"
                    )
                return
            size = min(ATTEMPTS_PER_JOB, math.ceil(deficit / max(workers, 1)), len(todo[task]))
            queue.append((task, [todo[task].popleft() for _ in range(size)]))
            unfinished[task] += size
            deficit -= size

    columns = (
        TextColumn("[bold]collecting"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("episodes, {task.fields[failed]} failed attempts"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )

    def failed() -> int:
        return sum(entry is None for task in settings.tasks for entry in finished[task].values())

    with worker_pool(_make_executor(workers)) as pool, Progress(*columns, disable=not progress) as bar:
        bar_id = bar.add_task("collect", total=len(settings.tasks) * settings.episodes_per_task,
                              completed=sum(map(successes, settings.tasks)), failed=failed())
        for task in settings.tasks:
            plan(task)
        while queue or running:
            while queue and len(running) < max(workers, 1):
                task, attempts = queue.popleft()
                running[pool.submit(_run_attempts, settings, task, attempts, out)] = (task, attempts)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                task, attempts = running.pop(future)
                results = future.result()
                unfinished[task] -= len(attempts)
                finished[task].update(zip(attempts, results, strict=True))
                _write_progress(out, settings, finished)
                bar.update(bar_id, completed=sum(map(successes, settings.tasks)), failed=failed())
                plan(task)


def collect(
    tasks: list[str],
    episodes_per_task: int,
    out_dir: str | Path,
    *,
    workers: int = 2,
    image_size: int = DEFAULT_IMAGE_SIZE,
    cameras: tuple[str, ...] = DEFAULT_CAMERAS,
    max_steps: int = DEFAULT_MAX_STEPS,
    seed: int = 0,
    progress: bool = True,
    resume: bool = False,
) -> Path:
    """Collect `episodes_per_task` successful expert episodes of each task into the empty or new folder
    `out_dir`; returns the path of the index.json, written last.

    `workers` spawned processes roll out episodes in parallel; 0 runs them in this process instead.
    `resume=True` continues an interrupted collection of the same settings in `out_dir` (any number
    of workers) without redoing its finished attempts, and gives the index an uninterrupted run gives.
    """
    settings = CollectSettings(tuple(tasks), episodes_per_task, image_size, tuple(cameras), max_steps, seed)
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 runs in this process), got {workers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _folder_lock(out):
        finished = _prepare(out, settings, resume)
        if finished is None:
            return out / INDEX_NAME
        _write_progress(out, settings, finished)
        try:
            _collect_missing(settings, out, workers, finished, progress)
        except ScriptedPolicyGaveUpError:
            (out / PROGRESS_NAME).unlink()  # the same settings would give up again: nothing to resume
            raise
        # The kept attempts end where the uninterrupted run ends: at the success that completes each task.
        attempts = {task: max(finished[task]) + 1 for task in settings.tasks}
        episodes = [entry for task in settings.tasks for _, entry in sorted(finished[task].items()) if entry is not None]
        index = write_index(out, asdict(settings), episodes, attempts=attempts, metaworld_version=version("metaworld"))
        (out / PROGRESS_NAME).unlink()
    return index
