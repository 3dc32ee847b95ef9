"""Closed-loop evaluation: N episodes per task in parallel worker processes, success per task and
overall with Wilson 95% intervals, optional GIFs of the rollouts, and a JSON report.

Workers are spawned (each gets a clean OpenGL context), load the model once and run torch on one
thread, so `workers` processes use `workers` cores.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import tempfile
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from vlaopt.eval.rollout import (
    EpisodeResult,
    RolloutConfig,
    env_cameras,
    eval_seed,
    run_episode,
)
from vlaopt.model.vla import VLA
from vlaopt.sim.env import DEFAULT_MAX_STEPS, SimEnv
from vlaopt.sim.tasks import instruction
from vlaopt.utils.io import atomic_write_text

EPISODES_PER_JOB = 5
"""Episodes a worker runs with one env: amortizes the ~0.5 s env and renderer start."""


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a success rate (95% for the default z); (0, 1) when there are no trials."""
    if not 0 <= successes <= trials:
        raise ValueError(f"successes={successes} must lie in [0, trials={trials}]")
    if trials == 0:
        return 0.0, 1.0
    p, n = successes / trials, trials
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, center - half)  # exact at the ends, free of rounding
    high = 1.0 if successes == trials else min(1.0, center + half)
    return low, high


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one closed-loop evaluation; the same settings give the same initial states."""

    episodes: int = 20
    execute: int | None = None
    max_steps: int = DEFAULT_MAX_STEPS
    seed: int = 0
    workers: int = 2
    cameras: tuple[str, ...] | None = None
    gif_dir: str | None = None
    gif_episodes: int = 1

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise ValueError(f"episodes={self.episodes} must be at least 1 per task")
        if self.workers < 0:
            raise ValueError(f"workers={self.workers} must be >= 0 (0 runs in this process)")
        RolloutConfig(self.execute, self.max_steps)  # validates execute and max_steps


@dataclass
class Rate:
    """A success count with its rate and Wilson 95% interval."""

    successes: int
    episodes: int
    success_rate: float = field(init=False)
    ci95: tuple[float, float] = field(init=False)

    def __post_init__(self) -> None:
        self.success_rate = self.successes / self.episodes if self.episodes else 0.0
        self.ci95 = wilson_interval(self.successes, self.episodes)


@dataclass
class EvalResult:
    """Per-task and overall success, with the settings and every episode's seed, outcome and length."""

    settings: dict[str, Any]
    tasks: dict[str, Rate]
    overall: Rate
    episodes: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write_json(self, path: str | Path) -> Path:
        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")


# ---- worker side ------------------------------------------------------------------------------------
_MODEL: VLA | None = None


def _init_worker(model_dir: str) -> None:
    """Load the model once per worker process, on one torch thread."""
    global _MODEL
    torch.set_num_threads(1)
    _MODEL = VLA.from_pretrained(model_dir)


def _run_job(cfg: EvalConfig, cameras: tuple[str, ...], task: str, episodes: list[int],
             model: VLA | None = None) -> list[EpisodeResult]:
    """Run `episodes` of `task` with one env; writes a GIF for the first `gif_episodes` of them."""
    model = model or _MODEL
    size = model.config.vision.image_size
    results = []
    with SimEnv(task, eval_seed(cfg.seed, task, episodes[0]), cameras, size, cfg.max_steps) as env:
        for episode in episodes:
            record = cfg.gif_dir is not None and episode < cfg.gif_episodes
            rollout = RolloutConfig(cfg.execute, cfg.max_steps, record)
            result = run_episode(model, env, episode, eval_seed(cfg.seed, task, episode), rollout)
            if result.frames is not None:
                _write_gif(Path(cfg.gif_dir) / f"{task}_{episode:03d}_{'success' if result.success else 'fail'}.gif",
                           result.frames)
                result.frames = None
            results.append(result)
    return results


def _write_gif(path: Path, frames: Any) -> None:
    import imageio.v3 as iio

    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, frames, duration=50, loop=0)  # 20 frames/s, looping


# ---- driver -----------------------------------------------------------------------------------------
def evaluate(model: VLA | str | Path, tasks: Sequence[str], cfg: EvalConfig, progress: bool = True) -> EvalResult:
    """Closed-loop success of `model` (a VLA, or a saved model directory / "default") on each task.

    With `cfg.workers` > 0 the episodes run in that many spawned processes; a VLA given as an object
    is saved to a temporary directory for them.
    """
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ValueError("tasks is empty; expected at least one MetaWorld task")
    for task in tasks:
        instruction(task)  # raises on an unknown task, listing the known ones
    loaded = model if isinstance(model, VLA) else VLA.from_pretrained(model)
    cameras = env_cameras(loaded.config, cfg.cameras)
    if cfg.execute is not None and cfg.execute > loaded.config.chunk:
        raise ValueError(f"execute={cfg.execute} exceeds the model's chunk of {loaded.config.chunk} actions")
    jobs = [(task, list(range(start, min(start + EPISODES_PER_JOB, cfg.episodes))))
            for start in range(0, cfg.episodes, EPISODES_PER_JOB) for task in tasks]
    columns = (TextColumn("[bold]evaluating"), BarColumn(), MofNCompleteColumn(),
               TextColumn("episodes, {task.fields[successes]} successes"), TimeElapsedColumn(), TimeRemainingColumn())
    results: list[EpisodeResult] = []
    with Progress(*columns, disable=not progress) as bar, tempfile.TemporaryDirectory() as tmp:
        bar_id = bar.add_task("eval", total=len(tasks) * cfg.episodes, successes=0)

        def record(done: list[EpisodeResult]) -> None:
            results.extend(done)
            bar.update(bar_id, advance=len(done), successes=sum(r.success for r in results))

        if cfg.workers == 0:
            for task, episodes in jobs:
                record(_run_job(cfg, cameras, task, episodes, loaded))
        else:
            model_dir = str(model) if not isinstance(model, VLA) else str(loaded.save_pretrained(Path(tmp) / "model"))
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(cfg.workers, mp_context=context, initializer=_init_worker,
                                     initargs=(model_dir,)) as pool:
                pending: set[Future] = {pool.submit(_run_job, cfg, cameras, task, eps) for task, eps in jobs}
                try:
                    while pending:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            record(future.result())
                except BaseException:
                    pool.shutdown(cancel_futures=True)
                    raise
    results.sort(key=lambda r: (tasks.index(r.task), r.episode))
    per_task = {t: Rate(sum(r.success for r in results if r.task == t), cfg.episodes) for t in tasks}
    settings = {**asdict(cfg), "tasks": tasks, "cameras": list(cameras),
                "execute": cfg.execute or loaded.config.chunk, "chunk": loaded.config.chunk,
                "image_size": loaded.config.vision.image_size}
    return EvalResult(
        settings=settings,
        tasks=per_task,
        overall=Rate(sum(r.success for r in results), len(results)),
        episodes=[{"task": r.task, "episode": r.episode, "seed": r.seed, "success": r.success, "steps": r.steps}
                  for r in results],
    )
