"""Stage timing of one inference: wall-clock perf counters on CPU, CUDA events on GPU.

`predict_action(..., timer=StageTimer())` records the time of each named stage; with no timer the
model uses `vlaopt.utils.timer.NULL_TIMER`, which costs nothing. `StageTimer` implements the
`vlaopt.utils.timer.Timer` protocol.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
