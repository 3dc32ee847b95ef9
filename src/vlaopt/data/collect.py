"""Collect successful scripted-expert demonstrations of MetaWorld tasks, in parallel worker processes.

Attempt k at a task starts from the initial state of `episode_seed(seed, task, k)`. For each task the
attempts 0, 1, 2, ... are rolled out until `episodes_per_task` of them succeeded; failed attempts are
dropped. Attempts are deterministic and always run as a gap-free prefix, so the same settings give the
same episodes whatever the number of workers or the order in which they finish.
"""

from __future__ import annotations

import math
import multiprocessing
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vlaopt.data.episodes import Episode, write_episode, write_index
from vlaopt.sim.env import DEFAULT_CAMERAS, DEFAULT_IMAGE_SIZE, DEFAULT_MAX_STEPS, SimEnv
from vlaopt.sim.expert import ScriptedExpert
from vlaopt.sim.tasks import instruction
from vlaopt.utils.seeds import derive_seed

POST_SUCCESS_STEPS = 5
"""Steps recorded after the first success: the policy also sees how the motion settles at the goal."""
ATTEMPTS_PER_JOB = 4
"""Attempts a worker rolls out with one env: amortizes the ~0.5 s env and renderer start."""


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


def episode_seed(seed: int, task: str, attempt: int) -> int:
    """The env seed of attempt `attempt` at `task` in a collection seeded with `seed`; stable everywhere."""
    return derive_seed(seed, task, attempt)


def record_episode(env: SimEnv, expert: ScriptedExpert, seed: int, post_success_steps: int) -> Episode:
    """Roll out the expert from the initial state of `seed` until `post_success_steps` steps after the
    first success, or until the env's max_steps."""
    obs = env.reset(seed=seed)
    images, proprio, actions = [], [], []
    success_step = -1
    while env.steps < env.max_steps and (success_step < 0 or env.steps <= success_step + post_success_steps):
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
    )


def _run_attempts(
    settings: CollectSettings, task: str, attempts: list[int], out_dir: Path
) -> list[dict[str, Any] | None]:
    """Worker: roll out `attempts` of `task` with one env, write the successes; an index entry or None each."""
    expert = ScriptedExpert(task)
    results: list[dict[str, Any] | None] = []
    first_seed = episode_seed(settings.seed, task, attempts[0])
    with SimEnv(task, first_seed, settings.cameras, settings.image_size, settings.max_steps) as env:
        for attempt in attempts:
            seed = episode_seed(settings.seed, task, attempt)
            episode = record_episode(env, expert, seed, settings.post_success_steps)
            if not episode.success:
                results.append(None)
                continue
            file = f"{task}_{attempt:04d}.npz"
            write_episode(out_dir / file, episode)
            results.append(
                {
                    "file": file,
                    "task": task,
                    "instruction": episode.instruction,
                    "seed": seed,
                    "attempt": attempt,
                    "length": episode.length,
                    "success": True,
                    "success_step": episode.success_step,
                }
            )
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
    """Spawned (not forked) workers: each starts its own clean OpenGL context."""
    if workers == 0:
        return _InlineExecutor()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


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
) -> Path:
    """Collect `episodes_per_task` successful expert episodes of each task into the empty or new folder
    `out_dir`; returns the path of the index.json, written last.

    `workers` spawned processes roll out episodes in parallel; 0 runs them in this process instead.
    """
    settings = CollectSettings(tuple(tasks), episodes_per_task, image_size, tuple(cameras), max_steps, seed)
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 runs in this process), got {workers}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; collect into a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)

    entries: dict[str, dict[int, dict[str, Any]]] = {task: {} for task in settings.tasks}
    next_attempt = dict.fromkeys(settings.tasks, 0)
    unfinished = dict.fromkeys(settings.tasks, 0)  # attempts queued or running
    queue: deque[tuple[str, list[int]]] = deque()
    running: dict[Future, tuple[str, list[int]]] = {}

    def plan(task: str) -> None:
        """Queue just enough new attempts of `task` to reach its target if all of them succeed."""
        deficit = settings.episodes_per_task - len(entries[task]) - unfinished[task]
        while deficit > 0:
            if next_attempt[task] >= settings.max_attempts:
                if unfinished[task] == 0:
                    raise RuntimeError(
                        f"the scripted expert succeeded on only {len(entries[task])} of {next_attempt[task]} "
                        f"attempts at {task!r} within max_steps={settings.max_steps}; raise max_steps"
                    )
                return
            size = min(
                ATTEMPTS_PER_JOB, math.ceil(deficit / max(workers, 1)), settings.max_attempts - next_attempt[task]
            )
            queue.append((task, list(range(next_attempt[task], next_attempt[task] + size))))
            next_attempt[task] += size
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
    failed = 0
    with _make_executor(workers) as pool, Progress(*columns, disable=not progress) as bar:
        bar_id = bar.add_task("collect", total=len(settings.tasks) * episodes_per_task, failed=0)
        try:
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
                    entries[task].update((a, r) for a, r in zip(attempts, results, strict=True) if r is not None)
                    succeeded = sum(r is not None for r in results)
                    failed += len(results) - succeeded
                    bar.update(bar_id, advance=succeeded, failed=failed)
                    plan(task)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise

    episodes = [entries[task][attempt] for task in settings.tasks for attempt in sorted(entries[task])]
    return write_index(out, asdict(settings), episodes, attempts=next_attempt, metaworld_version=version("metaworld"))
