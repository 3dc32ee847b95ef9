"""The stage-timer protocol the model records its stages with, and a timer that records nothing.

The model only needs `timer.stage(name)` as a context manager; `vlaopt.bench.timer.StageTimer`
implements it with perf counters or CUDA events. Keeping the protocol here lets `model/` time its
stages without importing `bench/`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol


class Timer(Protocol):
    """Anything with `stage(name)`, a context manager around the work of one named stage."""

    def stage(self, name: str) -> AbstractContextManager[None]: ...


class _NullTimer:
    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield


NULL_TIMER: Timer = _NullTimer()
"""The default timer: costs one context manager per stage and records nothing."""
