"""Closed-loop evaluation: N episodes per task in parallel worker processes, success per task and
overall with Wilson 95% intervals, optional GIFs of the rollouts, and a JSON report.

Workers are spawned (each gets a clean OpenGL context), load the model once and run torch on one
thread, so `workers` processes use `workers` cores; they die with the process that started them.

An evaluation keeps what it did: an episode that raises, or whose worker process dies, is reported
as failed with its error while the other episodes still run, and the JSON report is rewritten after
every finished job, so a run killed midway leaves its finished episodes on disk.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vlaopt.eval.rollout import (
    EpisodeResult,
    RolloutConfig,
    env_cameras,
    eval_seed,
    executed_actions,
    mean_stats,
    run_episode,
)
from vlaopt.model.vla import VLA
from vlaopt.optimize import load
from vlaopt.sim.env import CONTROL_HZ, DEFAULT_MAX_STEPS, SimEnv
from vlaopt.sim.tasks import instruction
from vlaopt.utils.io import atomic_write_text
from vlaopt.utils.processes import die_with_parent, worker_pool

EPISODES_PER_JOB = 5
"""Episodes a worker runs with one env: amortizes the ~0.5 s env and renderer start."""

Job = tuple[str, list[int]]
"""A task and the indices of the episodes of it that one worker runs with one env."""


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
    lead: int | None = None
    control_hz: float = CONTROL_HZ
    blend: float = 0.0

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise ValueError(f"episodes={self.episodes} must be at least 1 per task")
        if self.workers < 0:
            raise ValueError(f"workers={self.workers} must be >= 0 (0 runs in this process)")
        self.rollout()  # validates execute, max_steps and the latency model

    def rollout(self, record: bool = False) -> RolloutConfig:
        """How each episode runs."""
        return RolloutConfig(self.execute, self.max_steps, record, self.lead, self.control_hz, self.blend)


@dataclass
class Rate:
    """A success count over the episodes that ran, with its rate and Wilson 95% interval, and the
    number of episodes that failed to run (not counted in the rate)."""

    successes: int
    episodes: int
    failed: int = 0
    success_rate: float = field(init=False)
    ci95: tuple[float, float] = field(init=False)

    def __post_init__(self) -> None:
        self.success_rate = self.successes / self.episodes if self.episodes else 0.0
        self.ci95 = wilson_interval(self.successes, self.episodes)


@dataclass
class EpisodeFailure:
    """An episode that could not be run: the exception it raised, or the death of its worker process."""

    task: str
    episode: int
    seed: int
    error: str


@dataclass
class EvalResult:
    """Per-task and overall success, with the settings and every episode's seed, outcome, length,
    predictions, modeled stall, stage times and reuse statistics (or error); `latency` averages the
    last four over the episodes that ran; `failures` lists the episodes that failed to run,
    `complete` is False while it runs."""

    settings: dict[str, Any]
    tasks: dict[str, Rate]
    overall: Rate
    episodes: list[dict[str, Any]]
    failures: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = True
    latency: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write_json(self, path: str | Path) -> Path:
        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")


def _error_text(error: BaseException) -> str:
    """How a failure shows in the report: the exception's type and message."""
    return f"{type(error).__name__}: {error}"


# ---- worker side ------------------------------------------------------------------------------------
_MODEL: VLA | None = None


def _init_worker(model_dir: str) -> None:
    """Tie the worker's life to its parent's, then load the model once, on one torch thread, and warm it up."""
    global _MODEL
    die_with_parent()
    torch.set_num_threads(1)
    _MODEL = load(model_dir)
    _warm_up(_MODEL)


def _warm_up(model: VLA) -> None:
    """One prediction on blank inputs, so that one-time costs (lazy initialization, first-call
    allocations) do not count as the first episode's latency."""
    size, cfg = model.config.vision.image_size, model.config
    images = np.zeros((1, cfg.cameras, size, size, 3), dtype=np.uint8)
    proprio = np.zeros((1, cfg.proprio_dim), dtype=np.float32) if cfg.proprio_dim else None
    model.predict_action(images, ["warm up"], proprio)


def _run_job(cfg: EvalConfig, cameras: tuple[str, ...], task: str, episodes: list[int],
             model: VLA | None = None) -> list[EpisodeResult | EpisodeFailure]:
    """Run `episodes` of `task` with one env; writes a GIF for the first `gif_episodes` of them. An
    episode that raises becomes an EpisodeFailure and the next one still runs."""
    model = model or _MODEL
    size = model.config.vision.image_size
    results: list[EpisodeResult | EpisodeFailure] = []
    with SimEnv(task, eval_seed(cfg.seed, task, episodes[0]), cameras, size, cfg.max_steps) as env:
        for episode in episodes:
            seed = eval_seed(cfg.seed, task, episode)
            try:
                results.append(_run_one(cfg, model, env, episode, seed))
            except Exception as error:
                results.append(EpisodeFailure(task, episode, seed, _error_text(error)))
    return results


def _run_one(cfg: EvalConfig, model: VLA, env: SimEnv, episode: int, seed: int) -> EpisodeResult:
    """One episode, and its GIF when it is among the first `gif_episodes`."""
    record = cfg.gif_dir is not None and episode < cfg.gif_episodes
    result = run_episode(model, env, episode, seed, cfg.rollout(record))
    if result.frames is not None:
        _write_gif(Path(cfg.gif_dir) / f"{env.task}_{episode:03d}_{'success' if result.success else 'fail'}.gif",
                   result.frames)
        result.frames = None
    return result


def _write_gif(path: Path, frames: Any) -> None:
    import imageio.v3 as iio

    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, frames, duration=50, loop=0)  # 20 frames/s, looping


# ---- driver -----------------------------------------------------------------------------------------
Finish = Callable[[Any, Any, "str | None"], None]
"""`finish(job, result, error)`: called once per job, with its result, or with None and the error text."""


def _run_in_pools(jobs: Sequence[Any], workers: int, make_pool: Callable[[], Executor],
                  submit: Callable[[Executor, Any], Future], finish: Finish) -> None:
    """Run `jobs`, at most `workers` at a time, in pools made by `make_pool`; report each via `finish`.

    A worker process that dies breaks its pool, and every job running in it fails with
    BrokenProcessPool. Those jobs rerun one at a time in a fresh pool, so only a job that kills a
    worker on its own is reported failed, and all the other jobs still run.
    """
    queue: deque[Any] = deque(jobs)
    suspects: deque[Any] = deque()  # were running when a worker died; each reruns alone
    while queue or suspects:
        with worker_pool(make_pool()) as pool:
            running: dict[Future, tuple[Any, bool]] = {}  # future -> (job, runs alone)
            broken = False
            while True:
                while not broken and (picked := _next_job(queue, suspects, len(running), workers)):
                    job, alone = picked
                    try:
                        running[submit(pool, job)] = (job, alone)
                    except BrokenProcessPool:
                        (suspects if alone else queue).appendleft(job)
                        broken = True
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    job, alone = running.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool as error:
                        broken = True
                        if alone:
                            finish(job, None, f"a worker process died while running these episodes ({error})")
                        else:
                            suspects.append(job)
                    except Exception as error:
                        finish(job, None, _error_text(error))
                    else:
                        finish(job, result, None)


def _next_job(queue: deque[Any], suspects: deque[Any], busy: int, workers: int) -> tuple[Any, bool] | None:
    """The job to start now and whether it runs alone: a suspect only in an idle pool (and nothing
    else until the suspects are cleared), else a queued job while fewer than `workers` run."""
    if suspects:
        return (suspects.popleft(), True) if busy == 0 else None
    if queue and busy < workers:
        return queue.popleft(), False
    return None


def _summarize(tasks: list[str], cfg: EvalConfig, model: VLA, cameras: tuple[str, ...],
               outcomes: list[EpisodeResult | EpisodeFailure], complete: bool) -> EvalResult:
    """The report of the episodes finished so far; rates count only the episodes that ran."""
    def order(o: EpisodeResult | EpisodeFailure) -> tuple[int, int]:
        return tasks.index(o.task), o.episode

    ran = sorted((o for o in outcomes if isinstance(o, EpisodeResult)), key=order)
    failed = sorted((o for o in outcomes if isinstance(o, EpisodeFailure)), key=order)
    per_task = {t: Rate(sum(r.success for r in ran if r.task == t), sum(r.task == t for r in ran),
                        sum(f.task == t for f in failed)) for t in tasks}
    settings = {**asdict(cfg), "tasks": tasks, "cameras": list(cameras),
                "execute": cfg.execute or model.config.chunk, "chunk": model.config.chunk,
                "image_size": model.config.vision.image_size}
    episodes = sorted(ran + failed, key=order)
    return EvalResult(
        settings=settings,
        tasks=per_task,
        overall=Rate(sum(r.success for r in ran), len(ran), len(failed)),
        episodes=[asdict(o) if isinstance(o, EpisodeFailure) else
                  {k: v for k, v in asdict(o).items() if k != "frames"} for o in episodes],
        failures=[asdict(f) for f in failed],
        complete=complete,
        latency=_latency(ran),
    )


def _latency(ran: list[EpisodeResult]) -> dict[str, Any]:
    """Means over episodes of predictions, modeled stall, per-prediction stage times and reuse statistics."""
    if not ran:
        return {}
    return {**mean_stats([{"predictions": r.predictions, "stall_s": r.stall_s} for r in ran]),
            "stage_ms": mean_stats([r.stage_ms for r in ran]), "reuse": mean_stats([r.reuse for r in ran])}


def evaluate(model: VLA | str | Path, tasks: Sequence[str], cfg: EvalConfig, progress: bool = True,
             json_path: str | Path | None = None) -> EvalResult:
    """Closed-loop success of `model` (a VLA, or a saved model directory / "default") on each task.

    With `cfg.workers` > 0 the episodes run in that many spawned processes; a VLA given as an object
    is saved to a temporary directory for them. Episodes that fail to run are in `failures`, not in
    the rates. With `json_path` the report is written there at the start and rewritten after every
    finished job (`"complete": false` until the end).
    """
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ValueError("tasks is empty; expected at least one MetaWorld task")
    for task in tasks:
        instruction(task)  # raises on an unknown task, listing the known ones
    loaded = model if isinstance(model, VLA) else load(model)
    cameras = env_cameras(loaded.config, cfg.cameras)
    executed_actions(loaded.config.chunk, cfg.rollout())
    jobs: list[Job] = [(task, list(range(start, min(start + EPISODES_PER_JOB, cfg.episodes))))
                       for start in range(0, cfg.episodes, EPISODES_PER_JOB) for task in tasks]
    columns = (TextColumn("[bold]evaluating"), BarColumn(), MofNCompleteColumn(),
               TextColumn("episodes, {task.fields[successes]} successes, {task.fields[failed]} failed"),
               TimeElapsedColumn(), TimeRemainingColumn())
    outcomes: list[EpisodeResult | EpisodeFailure] = []

    def report(complete: bool) -> EvalResult:
        result = _summarize(tasks, cfg, loaded, cameras, outcomes, complete)
        if json_path is not None:
            result.write_json(json_path)
        return result

    report(complete=False)
    with Progress(*columns, disable=not progress) as bar, tempfile.TemporaryDirectory() as tmp:
        bar_id = bar.add_task("eval", total=len(tasks) * cfg.episodes, successes=0, failed=0)

        def finish(job: Job, done: list[EpisodeResult | EpisodeFailure] | None, error: str | None) -> None:
            task, episodes = job
            outcomes.extend(done if done is not None else
                            [EpisodeFailure(task, e, eval_seed(cfg.seed, task, e), error or "") for e in episodes])
            bar.update(bar_id, completed=len(outcomes), successes=sum(getattr(o, "success", False) for o in outcomes),
                       failed=sum(isinstance(o, EpisodeFailure) for o in outcomes))
            report(complete=False)

        if cfg.workers == 0:
            _warm_up(loaded)
            for job in jobs:
                try:
                    done = _run_job(cfg, cameras, *job, loaded)
                except Exception as error:
                    finish(job, None, _error_text(error))
                else:
                    finish(job, done, None)
        else:
            model_dir = str(model) if not isinstance(model, VLA) else str(loaded.save_pretrained(Path(tmp) / "model"))
            context = multiprocessing.get_context("spawn")
            _run_in_pools(
                jobs, cfg.workers,
                make_pool=lambda: ProcessPoolExecutor(cfg.workers, mp_context=context, initializer=_init_worker,
                                                      initargs=(model_dir,)),
                submit=lambda pool, job: pool.submit(_run_job, cfg, cameras, *job),
                finish=finish,
            )
    return report(complete=True)
