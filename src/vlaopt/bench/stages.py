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


def time_stages(
    model: Any, images: Any, instructions: list[str], proprio: Any = None, repeats: int = 20, warmup: int = 3
) -> dict[str, StageStats]:
    """Per-stage and end-to-end (`total`) timing of `model.predict_action` on fixed inputs."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    for _ in range(warmup):
        model.predict_action(images, instructions, proprio)
    samples: dict[str, list[float]] = {}
    for _ in range(repeats):
        timer = StageTimer(model.device)
        if timer.cuda:
            torch.cuda.synchronize(model.device)
        t0 = time.perf_counter()
        model.predict_action(images, instructions, proprio, timer=timer)
        if timer.cuda:
            torch.cuda.synchronize(model.device)
        total = time.perf_counter() - t0
        for name, sec in timer.result().items():
            samples.setdefault(name, []).append(sec)
        samples.setdefault("total", []).append(total)
    return {name: _summary(values) for name, values in samples.items()}
