"""Repeated stage timing: one timed call (`time_call`, `time_once` for `predict_action`), calls
interleaved round by round (`time_interleaved`), per-stage medians and spreads (`summarize`) and
ratios taken within each round (`paired_ratio`). Every timing in vla-opt, the `vla-opt bench`
harness and the scripts in `benchmarks/`, goes through here."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.progress import track

from vlaopt.utils.timer import StageTimer

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA

CPU = ":cpu"
"""Suffix of a stage's name for the calling thread's CPU seconds in it (`time_call(..., thread_cpu=True)`)."""


@dataclass
class StageStats:
    """Median and interquartile range of one stage, in milliseconds."""

    median_ms: float
    p25_ms: float
    p75_ms: float


def _summary(values: list[float]) -> StageStats:
    ms = sorted(v * 1000 for v in values)
    if len(ms) == 1:
        return StageStats(ms[0], ms[0], ms[0])
    q = statistics.quantiles(ms, n=4, method="inclusive")
    return StageStats(statistics.median(ms), q[0], q[2])


class ThreadCPUStageTimer(StageTimer):
    """A `StageTimer` that also records each stage's CPU time of the calling thread, as `<stage>:cpu`.
    With one torch thread all the work runs in that thread, so on a shared machine CPU time counts
    the work alone, while wall time also counts the waits for a core that other jobs cause."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        self.cpu_seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.thread_time()
        with super().stage(name):
            yield
        self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.thread_time() - t0

    def result(self) -> dict[str, float]:
        """Wall seconds per stage, then the thread's CPU seconds per stage under `<stage>:cpu`."""
        return {**super().result(), **{name + CPU: sec for name, sec in self.cpu_seconds.items()}}


def time_call(fn: Callable[[StageTimer], Any], device: torch.device | str = "cpu",
              thread_cpu: bool = False) -> dict[str, float]:
    """Seconds per stage of one `fn(timer)` (the stages `fn` records on the timer it is handed), plus
    the end-to-end `total`; with `thread_cpu`, also the calling thread's CPU seconds of each stage
    and of the whole call under `<stage>:cpu` and `total:cpu`."""
    timer = ThreadCPUStageTimer(device) if thread_cpu else StageTimer(device)
    if timer.cuda:
        torch.cuda.synchronize(timer.device)
    t0, cpu0 = time.perf_counter(), time.thread_time()
    fn(timer)
    if timer.cuda:
        torch.cuda.synchronize(timer.device)
    total, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
    return {**timer.result(), "total": total, **({"total" + CPU: cpu} if thread_cpu else {})}


def time_once(model: VLA, images: Any, instructions: list[str], proprio: Any = None) -> dict[str, float]:
    """Seconds per stage of one `model.predict_action`, plus the end-to-end `total`."""
    return time_call(lambda timer: model.predict_action(images, instructions, proprio, timer=timer), model.device)


def time_interleaved(
    calls: dict[str, Callable[[StageTimer], Any]], repeats: int, warmup: int = 0, device: torch.device | str = "cpu",
    *, thread_cpu: bool = False, rotate: bool = False, progress: bool = True, description: str = "timing rounds",
    failures: dict[str, Exception] | None = None,
) -> dict[str, list[dict[str, float]]]:
    """Per name, `repeats` `time_call` samples of `calls[name]`, from rounds that call each once, after
    `warmup` rounds whose samples are dropped: machine drift hits every call alike, and a ratio taken
    within a round (`paired_ratio`) cancels it. `rotate` starts each round one call later, so no call
    always runs first or right after the same other one. Progress goes to stderr. With a `failures`
    dict, a call that raises is recorded there and left out of the later rounds (else it raises)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    names = list(calls)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    rounds = range(warmup + repeats)
    for rnd in track(rounds, description=description, console=Console(stderr=True)) if progress else rounds:
        start = rnd % len(names) if rotate else 0
        for name in names[start:] + names[:start]:
            if failures is not None and name in failures:
                continue
            try:
                sample = time_call(calls[name], device, thread_cpu)
            except Exception as error:
                if failures is None:
                    raise
                failures[name] = error
                continue
            if rnd >= warmup:
                samples[name].append(sample)
    return samples


def paired_ratio(num: list[dict[str, float]], den: list[dict[str, float]], stage: str = "total",
                 den_stage: str | None = None) -> float:
    """The median over rounds of `num[i][stage] / den[i][den_stage or stage]` for samples of the same
    rounds (a stage missing from a numerator sample counts 0 s): each ratio compares calls made moments
    apart, so drifts of a shared machine between rounds cancel."""
    return statistics.median(a.get(stage, 0.0) / b[den_stage or stage] for a, b in zip(num, den, strict=True))


def summarize(samples: list[dict[str, float]]) -> dict[str, StageStats]:
    """Median and spread per stage over repeated `time_call` / `time_once` samples."""
    names = list(dict.fromkeys(name for sample in samples for name in sample))
    return {name: _summary([s[name] for s in samples if name in s]) for name in names}


def time_stages(
    model: VLA, images: Any, instructions: list[str], proprio: Any = None, repeats: int = 20, warmup: int = 3
) -> dict[str, StageStats]:
    """Per-stage and end-to-end (`total`) timing of `model.predict_action` on fixed inputs."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    for _ in range(warmup):
        model.predict_action(images, instructions, proprio)
    return summarize([time_once(model, images, instructions, proprio) for _ in range(repeats)])
