"""Repeated stage timing of `predict_action`: warm-up, then per-stage medians and spreads."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from vlaopt.bench.timer import StageTimer


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


def time_once(model: Any, images: Any, instructions: list[str], proprio: Any = None) -> dict[str, float]:
    """Seconds per stage of one `model.predict_action`, plus the end-to-end `total`."""
    timer = StageTimer(model.device)
    if timer.cuda:
        torch.cuda.synchronize(model.device)
    t0 = time.perf_counter()
    model.predict_action(images, instructions, proprio, timer=timer)
    if timer.cuda:
        torch.cuda.synchronize(model.device)
    total = time.perf_counter() - t0
    return {**timer.result(), "total": total}


def summarize(samples: list[dict[str, float]]) -> dict[str, StageStats]:
    """Median and spread per stage over repeated `time_once` results."""
    names = list(dict.fromkeys(name for sample in samples for name in sample))
    return {name: _summary([s[name] for s in samples if name in s]) for name in names}


def time_stages(
    model: Any, images: Any, instructions: list[str], proprio: Any = None, repeats: int = 20, warmup: int = 3
) -> dict[str, StageStats]:
    """Per-stage and end-to-end (`total`) timing of `model.predict_action` on fixed inputs."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    for _ in range(warmup):
        model.predict_action(images, instructions, proprio)
    return summarize([time_once(model, images, instructions, proprio) for _ in range(repeats)])
