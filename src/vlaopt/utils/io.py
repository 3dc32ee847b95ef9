"""Atomic writes: every file goes to a temporary name in the same folder, is flushed to disk, then is
renamed into place, so an interrupted write (a kill, a crash, a power cut) never leaves a truncated
file where a good one was."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to disk, so a rename that follows is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` and rename the result to `path`; the temporary file is removed on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # see _LEFTOVER
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        fsync_path(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


_LEFTOVER = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]+\.tmp")
"""The name `atomic_write` gives its temporary file for `name`: `.{name}.{random}.tmp` (mkstemp)."""


def atomic_leftover_of(filename: str) -> str | None:
    """The target name of a temporary file a killed `atomic_write` left behind, else None."""
    match = _LEFTOVER.fullmatch(filename)
    return match["name"] if match else None


def remove_atomic_leftovers(folder: str | Path, name: str) -> None:
    """Remove the temporary files that killed `atomic_write` calls for `folder/name` left behind
    (`.{name}.*.tmp`); they never hold anything a finished write did not replace."""
    for leftover in Path(folder).glob(f".{name}.*.tmp"):
        if leftover.is_file() and atomic_leftover_of(leftover.name) == name:
            leftover.unlink(missing_ok=True)


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
