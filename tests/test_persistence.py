"""What survives on disk: saves replace only the model's own files, loads verify checksums, trainer state
holds no pickle, and a training run killed at any point of a checkpoint save resumes exactly."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from vlaopt import VLA, VLAConfig, load
from vlaopt.model import checkpoint as checkpoint_module
from vlaopt.model.checkpoint import MANIFEST_FILE, CheckpointError
from vlaopt.model.vla import DEFAULT_MODEL_DIR
from vlaopt.train import trainer as trainer_module
from vlaopt.train.trainer import TrainConfig, checkpoints, train

TESTS = Path(__file__).resolve().parent
STATS = {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7}, "proprio": {"q01": [-2.0] * 2, "q99": [2.0] * 2}}


def _model() -> VLA:
    model = VLA(VLAConfig.tiny(proprio_dim=2)).eval()
    model.set_stats(STATS)
    return model


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# ---- save_pretrained replaces only the model's own files --------------------------------------------------
def test_save_keeps_the_users_files_and_leaves_no_temporaries(tmp_path):
    model, target = _model(), tmp_path / "run"
    model.save_pretrained(target)
    (target / "notes.txt").write_text("mine")
    (target / "heldout.npz").write_bytes(b"held-out demos")
    (target / "checkpoints").mkdir()
    (target / "checkpoints" / "state").write_text("trainer state")
    model.save_pretrained(target)
    assert (target / "notes.txt").read_text() == "mine"
    assert (target / "heldout.npz").read_bytes() == b"held-out demos"
    assert (target / "checkpoints" / "state").read_text() == "trainer state"
    assert not [p.name for p in target.iterdir() if p.name.startswith(".")]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    manifest = json.loads((target / MANIFEST_FILE).read_text())["files"]
    assert sorted(manifest) == ["config.json", "model.safetensors", "stats.json", "tokenizer.json", "tokenizer_config.json"]
    assert manifest["model.safetensors"]["bytes"] == (target / "model.safetensors").stat().st_size


def test_save_removes_only_files_its_previous_save_recorded(tmp_path):
    model, target = _model(), tmp_path / "m"
    model.save_pretrained(target)
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    # a file an earlier save wrote (and recorded) that this one no longer writes, and one it never wrote
    manifest["files"]["vocab.txt"] = {"sha256": "0" * 64, "bytes": 3}
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    (target / "vocab.txt").write_text("old")
    (target / "vocab2.txt").write_text("user")
    model.save_pretrained(target)
    assert not (target / "vocab.txt").exists()
    assert (target / "vocab2.txt").read_text() == "user"


def test_a_crafted_manifest_cannot_make_a_save_delete_outside_its_files(tmp_path):
    model, target = _model(), tmp_path / "m"
    model.save_pretrained(target)
    (tmp_path / "precious.txt").write_text("keep")
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    manifest["files"]["../precious.txt"] = {"sha256": "0" * 64, "bytes": 4}
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    model.save_pretrained(target)  # the malformed manifest is replaced, nothing outside is touched
    assert (tmp_path / "precious.txt").read_text() == "keep"
    load(target)


def test_save_into_the_current_directory(tmp_path, monkeypatch):
    model = _model()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    model.save_pretrained(".")
    model.save_pretrained(".")
    loaded = load(".")
    assert loaded.stats() == model.stats() and (tmp_path / "notes.txt").read_text() == "mine"


# ---- from_pretrained verifies what it loads -----------------------------------------------------------------
def test_a_flipped_bit_in_the_weights_names_the_file_and_both_checksums(tmp_path):
    target = _model().save_pretrained(tmp_path / "m")
    recorded = json.loads((target / MANIFEST_FILE).read_text())["files"]["model.safetensors"]["sha256"]
    data = bytearray((target / "model.safetensors").read_bytes())
    data[-3] ^= 0x10  # inside the last tensor: the file still parses, the weights are silently wrong
    (target / "model.safetensors").write_bytes(bytes(data))
    import hashlib

    now = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(CheckpointError, match=rf"model\.safetensors has sha256 {now} .*records sha256 {recorded}"):
        load(target)


def test_a_changed_tokenizer_file_is_caught_too(tmp_path):
    target = _model().save_pretrained(tmp_path / "m")
    config = json.loads((target / "tokenizer_config.json").read_text())
    config["model_max_length"] = 7
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json has sha256 [0-9a-f]{64} .*records sha256"):
        load(target)


def test_folders_without_a_manifest_still_load(tmp_path):
    assert not (DEFAULT_MODEL_DIR / MANIFEST_FILE).exists()
    load("default")
    model = _model()
    target = model.save_pretrained(tmp_path / "m")
    (target / MANIFEST_FILE).unlink()  # as written by older versions
    assert load(target).stats() == model.stats()


@pytest.mark.parametrize("content", ["", '{"lm": {"family": "lla'])
@pytest.mark.parametrize("manifest", [True, False])
def test_an_empty_or_truncated_config_is_one_checkpoint_error(tmp_path, content, manifest):
    target = _model().save_pretrained(tmp_path / "m")
    if not manifest:
        (target / MANIFEST_FILE).unlink()
    (target / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=re.escape(str(target / "config.json"))):
        load(target)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_missing_tokenizer_file_is_named_with_its_folder(tmp_path, name):
    target = _model().save_pretrained(tmp_path / "m")
    (target / name).unlink()
    with pytest.raises(CheckpointError, match=rf"checkpoint directory {re.escape(str(target))} lacks {name}"):
        load(target)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_statistics_name_the_file_and_the_key(tmp_path, value):
    target = _model().save_pretrained(tmp_path / "m")
    text = json.dumps({"action": {"q01": [-1.0] * 7, "q99": [1.0, 1.0, 12345.5, 1.0, 1.0, 1.0, 1.0]},
                       "proprio": STATS["proprio"]})
    (target / "stats.json").write_text(text.replace("12345.5", value))
    with pytest.raises(CheckpointError, match=rf"stats file {re.escape(str(target / 'stats.json'))} .*at action\.q99\[2\]"):
        load(target)


# ---- trainer state: no pickle ----------------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this creates the marker file: what a malicious state file could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))


def _samples(n: int) -> list[dict]:
    cfg = VLAConfig.tiny(proprio_dim=2)
    rng = np.random.default_rng(0)
    return [{"images": rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8), "instruction": "open the drawer",
             "proprio": rng.standard_normal(2).astype(np.float32),
             "actions": np.full((cfg.chunk, 7), i / n, dtype=np.float32)} for i in range(n)]


def test_an_old_pickled_trainer_state_is_refused_unopened(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "marker"
    tc = TrainConfig(steps=2, batch_size=4, warmup_steps=1, save_every=2)
    _model().save_pretrained(run)
    (run / "train_config.json").write_text(json.dumps(asdict(tc)))
    torch.save({"optimizer": _RunsCode(marker), "step": 1}, run / "trainer_state.pt")
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt is a pickle .*does not load"):
        train(VLA(VLAConfig.tiny(proprio_dim=2)), _samples(8), None, run, tc, STATS, progress=False)
    assert not marker.exists()


def test_a_crafted_trainer_state_cannot_run_code(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "marker"
    tc = TrainConfig(steps=2, batch_size=4, warmup_steps=1, save_every=2)
    train(VLA(VLAConfig.tiny(proprio_dim=2)), _samples(8), None, run, tc, STATS, progress=False)
    state = run / "checkpoints" / "step-000002" / "trainer_state.safetensors"
    torch.save({"rng.torch": _RunsCode(marker)}, state)
    with pytest.raises(CheckpointError, match=rf"trainer state {re.escape(str(state))} cannot be read as safetensors"):
        train(VLA(VLAConfig.tiny(proprio_dim=2)), _samples(8), None, run, TrainConfig(**{**asdict(tc), "steps": 4}),
              STATS, progress=False)
    assert not marker.exists()


def test_a_model_without_training_state_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    _model().save_pretrained(run)
    before = _snapshot(run)
    tc = TrainConfig(steps=2, batch_size=4, warmup_steps=1, save_every=2)
    with pytest.raises(CheckpointError, match=r"cannot resume .*run: it holds a model \(config\.json, model\.safetensors\) "
                                              r"but no training state .*new --out, or pass --no-resume"):
        train(VLA(VLAConfig.tiny(proprio_dim=2)), _samples(8), None, run, tc, STATS, progress=False)
    assert _snapshot(run) == before
    train(VLA(VLAConfig.tiny(proprio_dim=2)), _samples(8), None, run, tc, STATS, resume=False, progress=False)
    assert _snapshot(run)["model.safetensors"] != before["model.safetensors"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]


def test_optimize_in_place_keeps_heldout_and_training_state(tmp_path, monkeypatch):
    from vlaopt.cli import main

    run = tmp_path / "run"
    tc = TrainConfig(steps=2, batch_size=4, warmup_steps=1, save_every=2)
    train(VLA(VLAConfig.tiny(proprio_dim=2)), _samples(8), None, run, tc, STATS, progress=False)
    (run / "heldout.npz").write_bytes(b"held-out demos")
    kept = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and "checkpoints" in p.parts}
    (tmp_path / "r.yaml").write_text("- token_pruning: {method: fastv, layer: 1, keep: 0.5}\n")
    assert main(["optimize", "--model", str(run), "--recipe", str(tmp_path / "r.yaml"), "--out", str(run)]) == 0
    assert len(load(run).config.recipe) == 1
    assert (run / "heldout.npz").read_bytes() == b"held-out demos" and (run / "train_config.json").is_file()
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and "checkpoints" in p.parts} == kept
    here = tmp_path / "here"
    _model().save_pretrained(here)
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    assert main(["optimize", "--model", ".", "--recipe", str(tmp_path / "r.yaml"), "--out", "."]) == 0
    assert len(load(here).config.recipe) == 1 and (here / "notes.txt").read_text() == "mine"


# ---- kills during checkpoint saves -------------------------------------------------------------------------------
FAULT_CFG = VLAConfig.tiny(proprio_dim=2, head="flow")  # a stochastic loss: the torch RNG must resume exactly
FAULT_TRAIN = TrainConfig(steps=6, batch_size=8, lr=1e-3, warmup_steps=2, val_every=2, save_every=2)


def fault_run(out: str | Path) -> dict:
    """The training run the fault tests kill (here and in child processes) and resume."""
    data = _samples(16)
    return train(VLA(FAULT_CFG), data, data[:4], out, FAULT_TRAIN, STATS, progress=False)


@contextlib.contextmanager
def instrumented(out: Path, kill_at: int | None = None) -> Iterator[list[tuple[str, str, str]]]:
    """Record every rename and safetensors write during training as (kind, source, target) relative to
    `out`; with `kill_at`, SIGKILL this process at that event: before a rename, or in a write after
    its file was truncated to half (a torn write)."""
    events: list[tuple[str, str, str]] = []
    real = {"replace": os.replace, "rename": os.rename, "ckpt": checkpoint_module.save_file,
            "state": trainer_module.save_file}

    def note(kind: str, src: object, dst: object) -> bool:
        events.append((kind, os.path.relpath(src, out) if src else "", os.path.relpath(dst, out)))
        return kill_at is not None and len(events) == kill_at

    def renamer(name: str):  # noqa: ANN202
        def rename(src, dst, *args, **kwargs):  # noqa: ANN001, ANN202
            if note("rename", src, dst):
                os.kill(os.getpid(), signal.SIGKILL)
            return real[name](src, dst, *args, **kwargs)
        return rename

    def writer(name: str):  # noqa: ANN202
        def write(tensors, filename, metadata=None):  # noqa: ANN001, ANN202
            kill = note("write", None, filename)
            real[name](tensors, filename, metadata=metadata)
            if kill:
                os.truncate(filename, os.path.getsize(filename) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
        return write

    os.replace, os.rename = renamer("replace"), renamer("rename")
    checkpoint_module.save_file, trainer_module.save_file = writer("ckpt"), writer("state")
    try:
        yield events
    finally:
        os.replace, os.rename = real["replace"], real["rename"]
        checkpoint_module.save_file, trainer_module.save_file = real["ckpt"], real["state"]


CHILD = """
import os, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from pathlib import Path
from test_persistence import fault_run, instrumented
out = Path(sys.argv[1])
with instrumented(out, kill_at=int(os.environ["VLAOPT_TEST_KILL_AT"])):
    fault_run(out)
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, dict, dict]:
    """The uninterrupted run: its events, log and final weights."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with instrumented(out) as events:
        log = fault_run(out)
    return events, log, load(out).state_dict()


def _first(events: list, after: int, kind: str, pattern: str, side: int = 2) -> int:
    """1-based index of the first event past index `after` of this kind whose path matches `pattern`."""
    return next(i for i, e in enumerate(events, 1) if i > after and e[0] == kind and re.fullmatch(pattern, e[side]))


def _kill_point(events: list, point: str) -> int:
    placed4 = _first(events, 0, "rename", r"checkpoints/step-000004")
    return {
        "torn trainer-state write": _first(events, 0, "write", r"checkpoints/\.step-000004\..*\.tmp/trainer_state\.safetensors"),
        "before placing the checkpoint": placed4,
        "before removing the older one": _first(events, placed4, "rename", r"checkpoints/step-000002", side=1),
        "mid model refresh": _first(events, placed4, "rename", r"model\.safetensors"),
        "before the refreshed manifest": _first(events, placed4, "rename", r"manifest\.json"),
    }[point]


@pytest.mark.parametrize("point", ["torn trainer-state write", "before placing the checkpoint",
                                   "before removing the older one", "mid model refresh", "before the refreshed manifest"])
def test_a_kill_during_a_checkpoint_save_resumes_exactly(tmp_path, reference, point):
    events, ref_log, ref_weights = reference
    kill_at = _kill_point(events, point)
    out = tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(TESTS)))
    env = {**os.environ, "VLAOPT_TEST_KILL_AT": str(kill_at)}
    child = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True, timeout=170)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    # the newest complete checkpoint is the last one placed before the kill, and it loads
    placed = [int(e[2][-6:]) for e in events[: kill_at - 1] if e[0] == "rename" and re.fullmatch(r"checkpoints/step-\d+", e[2])]
    assert checkpoints(out)[-1][0] == placed[-1] == (2 if kill_at <= _kill_point(events, "before placing the checkpoint") else 4)
    load(checkpoints(out)[-1][1])
    if point == "before the refreshed manifest":  # new files under the old manifest: caught, not loaded as a mix
        with pytest.raises(CheckpointError, match=r"has sha256 .* but manifest\.json records"):
            load(out)
    log = fault_run(out)
    assert log == ref_log
    resumed = load(out).state_dict()
    assert all(torch.equal(resumed[k], ref_weights[k]) for k in ref_weights)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000006"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
