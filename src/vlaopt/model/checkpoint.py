"""Saving and loading model weights as safetensors, with one clear error per bad checkpoint, and the
file set of a model folder: replaced file by file (nothing else in the folder is touched) and recorded
in a manifest with sha256 checksums that loading verifies.

Tied parameters (e.g. an LM whose output matrix is its input embedding) are stored once, under the
first name the state dict lists them by.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vlaopt.utils.io import atomic_write, atomic_write_text, fsync_path, remove_atomic_leftovers, sha256_file

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "vlaopt-manifest/1"
STAGING_PREFIX = ".vlaopt-save-"
"""Hidden folder inside a model folder where a save assembles its files before renaming them into place."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(ValueError):
    """A checkpoint directory or weight file that does not fit the model it should load into."""


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor kept once (first name wins)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def weight_size(model: nn.Module) -> tuple[int, int]:
    """Elements and bytes of the model's saved tensors (tied ones once; int8 weights and their scales
    counted, which `parameters()` misses since they are buffers)."""
    state = unique_state(model)
    return sum(t.numel() for t in state.values()), sum(t.numel() * t.element_size() for t in state.values())


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the model's unique tensors to a safetensors file, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in unique_state(model).items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors file into `model`, naming any missing, unexpected or mis-shaped key."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file {path} is missing")
    try:
        loaded = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"weight file {path} cannot be read as safetensors: {exc}") from exc
    expected = unique_state(model)
    missing = [k for k in expected if k not in loaded]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"weight file {path} lacks key {missing[0]!r}{more}")
    unexpected = [k for k in loaded if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"weight file {path} has unexpected key {unexpected[0]!r}{more}; it belongs to another model")
    for key, tensor in expected.items():
        if tuple(loaded[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"weight {key!r} in {path} has shape {tuple(loaded[key].shape)}, expected {tuple(tensor.shape)}"
            )
        if loaded[key].dtype != tensor.dtype:
            raise CheckpointError(f"weight {key!r} in {path} has dtype {loaded[key].dtype}, expected {tensor.dtype} "
                                  "(cast the model before loading, or save it in the dtype you load it in)")
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(loaded[key])


# ---- the file set of a model folder -------------------------------------------------------------------
def _is_plain_name(name: Any) -> bool:
    """A file name a manifest may list: no folder part, not hidden, not the manifest itself (so that a
    crafted manifest cannot make a save delete anything outside its own files)."""
    return (isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..", MANIFEST_FILE)
            and not name.startswith("."))


def read_manifest(directory: str | Path) -> dict[str, dict[str, Any]] | None:
    """The files recorded by `directory/manifest.json` ({name: {"sha256", "bytes"}}), None when the
    folder has no manifest (saved before vla-opt kept one); an unreadable manifest raises CheckpointError."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"manifest {path} cannot be read as JSON ({exc}); it is damaged or truncated") from exc
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
        raise CheckpointError(f"manifest {path} is not a {MANIFEST_FORMAT} manifest (format tag or file list missing)")
    for name, entry in files.items():
        if not _is_plain_name(name) or not isinstance(entry, dict) or not _SHA256.fullmatch(str(entry.get("sha256"))):
            raise CheckpointError(f"manifest {path} has a malformed entry {name!r}: {entry!r}; expected a plain "
                                  "file name with {'sha256': 64 hex digits, 'bytes': size}")
    return files


def verify_manifest(directory: str | Path) -> None:
    """Check every file that `directory/manifest.json` lists against its recorded sha256; a folder
    without a manifest (older saves, e.g. the bundled default policy) passes unchecked."""
    directory = Path(directory)
    files = read_manifest(directory)
    for name, entry in (files or {}).items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint directory {directory} lacks {name}, which its {MANIFEST_FILE} lists")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise CheckpointError(
                f"{path} has sha256 {digest} ({path.stat().st_size} bytes) but {MANIFEST_FILE} records sha256 "
                f"{entry['sha256']} ({entry.get('bytes')} bytes): the file changed after it was saved (an "
                "interrupted save or copy, or a damaged disk); save the model again or restore the file"
            )


def _remove_leftovers(directory: Path) -> None:
    """Remove what killed saves left in `directory`: staging folders and half-written manifests."""
    for leftover in directory.glob(f"{STAGING_PREFIX}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    remove_atomic_leftovers(directory, MANIFEST_FILE)


def replace_files(directory: str | Path, write: Callable[[Path], None]) -> Path:
    """Save a set of files into `directory` (created if needed) without touching anything else in it.

    `write(staging)` puts the files into a hidden staging folder inside `directory`; each is then
    renamed over its namesake (a rename within one file system is atomic: no file is ever half
    written), the files that the previous manifest recorded and this set lacks are removed, and
    `manifest.json` (names, sizes, sha256) is written last. Other files (notes, heldout.npz, training
    state) are never touched. Until the new manifest is in place, an interrupted save shows as a
    checksum mismatch when loading, never as a silent mix of old and new files. One save at a time
    per folder: a save removes the staging folders of earlier, killed saves.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"cannot save a model into {directory}: it is a file, not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(directory)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, suffix=".tmp", dir=directory))
    try:
        write(staging)
        names = sorted(p.name for p in staging.iterdir())
        for name in names:
            if not _is_plain_name(name) or not (staging / name).is_file():
                raise ValueError(f"a model save may write plain files only, not {name!r}")
            fsync_path(staging / name)
        entries = {name: {"sha256": sha256_file(staging / name), "bytes": (staging / name).stat().st_size}
                   for name in names}
        try:
            previous = read_manifest(directory) or {}
        except CheckpointError:
            previous = {}  # a damaged manifest: its stale files stay, the new manifest replaces it
        for name in names:
            os.replace(staging / name, directory / name)
        for name in sorted(set(previous) - set(names)):
            (directory / name).unlink(missing_ok=True)
        manifest = {"format": MANIFEST_FORMAT, "files": entries}
        atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
        fsync_path(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


# ---- normalization statistics -------------------------------------------------------------------------
def non_finite_entry(value: Any, key: str = "") -> tuple[str, float] | None:
    """The first NaN or infinite number in a JSON-like value, as (dotted key such as "action.q99[3]",
    value), or None when every number is finite."""
    if isinstance(value, dict):
        for k, v in value.items():
            found = non_finite_entry(v, f"{key}.{k}" if key else str(k))
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = non_finite_entry(v, f"{key}[{i}]")
            if found:
                return found
    elif isinstance(value, float) and not math.isfinite(value):
        return key, value
    return None


def read_stats(path: str | Path) -> dict[str, Any]:
    """Read a stats.json; unreadable JSON, a non-mapping, or a NaN / infinite bound (which would make
    every predicted action NaN) raises one CheckpointError naming the file and the key."""
    path = Path(path)
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"stats file {path} cannot be read as JSON ({exc}); it is empty, truncated or damaged") from exc
    if not isinstance(stats, dict):
        raise CheckpointError(f"stats file {path} must hold a mapping such as {{'action': {{'q01': [...], 'q99': [...]}}}}, "
                              f"got {type(stats).__name__}")
    bad = non_finite_entry(stats)
    if bad:
        raise CheckpointError(f"stats file {path} has the non-finite value {bad[1]} at {bad[0]}; normalization bounds "
                              "must be finite numbers (recompute the statistics of the training data)")
    return stats
