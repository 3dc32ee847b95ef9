"""Stage timing: the protocol the model records its stages with, a timer that records nothing, and
`StageTimer`, which records wall-clock seconds per stage (perf counters on CPU, CUDA events on GPU).

The model only needs `timer.stage(name)` as a context manager: `predict_action(..., timer=StageTimer())`
records each named stage, and with no timer the model uses `NULL_TIMER`, which costs nothing. Keeping
them here lets `model/`, `eval/` and `bench/` time stages without importing one another.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch


class Timer(Protocol):
    """Anything with `stage(name)`, a context manager around the work of one named stage."""

    def stage(self, name: str) -> AbstractContextManager[None]: ...


class _NullTimer:
    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield


NULL_TIMER: Timer = _NullTimer()
"""The default timer: costs one context manager per stage and records nothing."""


class StageTimer:
    """Accumulates seconds per stage name, in first-seen order, synchronizing around CUDA work."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
            return
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def result(self) -> dict[str, float]:
        """Seconds per stage (resolving pending CUDA events)."""
        if self._events:
            torch.cuda.synchronize(self.device)
            for name, start, end in self._events:
                self.seconds[name] = self.seconds.get(name, 0.0) + start.elapsed_time(end) / 1000.0
            self._events.clear()
        return dict(self.seconds)
