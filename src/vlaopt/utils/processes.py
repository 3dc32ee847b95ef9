"""Worker processes that end with their parent, and process pools whose shutdown cannot hang.

A `ProcessPoolExecutor` worker whose parent is killed (SIGKILL, the OOM killer, a closed terminal)
keeps running as an orphan: it waits forever for work, or finishes a rollout nobody will read. Call
`die_with_parent` first thing in each worker (as, or from, the pool's initializer) to prevent that.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager

PR_SET_PDEATHSIG = 1
"""prctl option (linux/prctl.h): the signal this process gets when its parent dies."""


def die_with_parent(poll_s: float = 0.5) -> None:
    """Make this process exit as soon as its parent process dies, however the parent died.

    On Linux the kernel sends SIGKILL on the parent's death (`prctl(PR_SET_PDEATHSIG)`); elsewhere a
    daemon thread polls `os.getppid()` every `poll_s` seconds. A parent that died before this call
    (while the worker was still starting) is caught by comparing the parent pid with the one
    multiprocessing recorded at the start. Linux ties the signal to the parent *thread* that started
    the worker, so start pools from a thread that outlives them (as the main thread does).
    """
    parent = _expected_parent()
    armed = _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # the parent is already gone: no signal will come
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent, poll_s), name="die-with-parent", daemon=True).start()


def _expected_parent() -> int:
    """The pid of the process that started this one, as multiprocessing recorded it (else getppid)."""
    process = multiprocessing.parent_process()
    return process.pid if process is not None and process.pid is not None else os.getppid()


def _set_parent_death_signal(signum: int) -> bool:
    """Ask Linux to send `signum` to this process when its parent dies; False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, poll_s: float) -> None:
    """Exit the process once its parent is no longer `parent` (orphans are re-parented)."""
    while os.getppid() == parent:
        time.sleep(poll_s)
    os._exit(1)


@contextmanager
def worker_pool(pool: Executor, timeout_s: float = 10.0) -> Iterator[Executor]:
    """Use `pool` in a `with` block that cannot hang on exit.

    A plain `with ProcessPoolExecutor(...)` can wait forever: when a worker dies while another is
    being spawned (spawned pools start workers on demand), CPython's broken-pool handling terminates
    only the workers it has registered, and the new one blocks on the task queue while shutdown
    waits for it (seen here in a test that kills a worker). So on exit the pool is shut down without
    waiting, pending work is cancelled, and the worker processes started while it ran get
    `timeout_s` to finish before they are killed."""
    before = set(multiprocessing.active_children())
    try:
        yield pool
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout_s
        for process in set(multiprocessing.active_children()) - before:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
