"""The `vla-opt` command line."""

from __future__ import annotations

import pytest
import torch
from conftest import observations

from vlaopt import VLA, VLAConfig, load
from vlaopt.bench.heldout import HELDOUT_FILE, load_npz
from vlaopt.cli import main
from vlaopt.data.dataset import EpisodeDataset


def test_optimize_calibrates_on_the_models_heldout_demos(tmp_path):
    """A data-driven step needs no --data when the model has heldout.npz (the bundled policies do); its
    choice equals `apply` calibrated on those demonstrations, and without any data it is refused."""
    recipe = [{"layer_pruning": {"method": "shortgpt", "n": 1, "calibration": {"samples": 16}}}]
    (tmp_path / "r.yaml").write_text("- layer_pruning: {method: shortgpt, n: 1, calibration: {samples: 16}}\n")
    assert main(["optimize", "--model", "default", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 0
    from vlaopt import apply
    from vlaopt.model.vla import DEFAULT_MODEL_DIR

    reference = apply(VLA.default(), recipe, calibration=load_npz(DEFAULT_MODEL_DIR / HELDOUT_FILE).batches(8))
    assert load(tmp_path / "o").config.recipe == reference.config.recipe
    VLA.default().save_pretrained(tmp_path / "bare")  # no heldout.npz beside it
    assert main(["optimize", "--model", str(tmp_path / "bare"), "--recipe", str(tmp_path / "r.yaml"),
                 "--out", str(tmp_path / "o2")]) == 2


def test_demo_prints_actions_and_stage_table(capsys):
    assert main(["demo", "--repeats", "2", "--image-size", "32", "--head", "flow"]) == 0
    out = capsys.readouterr().out
    for stage in ("vision", "projector", "lm", "head", "total"):
        assert stage in out
    assert "action chunk of sample 0" in out


def test_optimize_applies_a_yaml_recipe(tmp_path, capsys):
    model = VLA(VLAConfig.tiny(cameras=2, proprio_dim=3)).eval()
    model.save_pretrained(tmp_path / "base")
    (tmp_path / "r.yaml").write_text("- token_pruning: {method: fastv, layer: 1, keep: 0.5}\n")
    assert main(["optimize", "--model", str(tmp_path / "base"), "--recipe", str(tmp_path / "r.yaml"),
                 "--out", str(tmp_path / "opt")]) == 0
    assert "applied {'token_pruning'" in capsys.readouterr().out
    optimized = load(tmp_path / "opt")
    assert optimized.config.recipe == [{"token_pruning": {"method": "fastv", "layer": 1, "keep": 0.5, "version": 1}}]
    reference = load(tmp_path / "base")
    from vlaopt import apply

    apply(reference, [{"token_pruning": {"method": "fastv", "layer": 1, "keep": 0.5}}])
    images, instructions, proprio = observations(model.config)
    assert torch.equal(optimized.predict_action(images, instructions, proprio),
                       reference.predict_action(images, instructions, proprio))


def test_collect_then_train_from_the_command_line(tmp_path, capsys):
    pytest.importorskip("metaworld")
    data = tmp_path / "data"
    assert main(["collect", "--tasks", "reach-v3", "--episodes-per-task", "2", "--out", str(data), "--workers", "0",
                 "--image-size", "32", "--max-steps", "60"]) == 0
    cfg = VLAConfig.tiny(cameras=2, proprio_dim=4, action_dim=4)
    cfg.save(tmp_path / "cfg.yaml")
    assert main(["train", "--data", str(data), "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "m"),
                 "--steps", "2", "--batch-size", "4", "--val-every", "2", "--val-fraction", "0.5"]) == 0
    model = load(tmp_path / "m")
    assert len(model.stats()["action"]["q01"]) == 4
    # the trained model carries held-out demonstrations from its own val split
    heldout = load_npz(tmp_path / "m" / HELDOUT_FILE)
    val = EpisodeDataset(data, "val", chunk=cfg.chunk, val_fraction=0.5, seed=0)
    assert len(heldout) == len(val) and torch.equal(heldout.actions[0], torch.as_tensor(val[0]["actions"]))
    # --init fine-tunes the saved weights (a near-zero learning rate leaves them as they were)
    assert main(["train", "--data", str(data), "--init", str(tmp_path / "m"), "--out", str(tmp_path / "ft"),
                 "--steps", "1", "--batch-size", "4", "--lr", "1e-12", "--val-fraction", "0.5", "--pruner", "lightvla"]) == 0
    tuned = load(tmp_path / "ft")
    expected = {"method": "lightvla", "layer": 0, "keep": 1.0, "train_path": "merge", "version": 1}
    assert tuned.config.recipe == [{"token_pruning": expected}]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[name], value, atol=1e-6, rtol=0)
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--config", str(tmp_path / "cfg.yaml"), "--init", str(tmp_path / "m"),
                 "--out", str(tmp_path / "m2")]) == 2
    assert "vla-opt: error: vla-opt train needs exactly one of --config (a new model) or --init" in capsys.readouterr().err
    bad = VLAConfig.tiny(cameras=1, proprio_dim=4, action_dim=4)
    bad.save(tmp_path / "bad.yaml")
    assert main(["train", "--data", str(data), "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "m2")]) == 2
    assert "does not fit the data" in capsys.readouterr().err


def test_a_user_error_is_one_line_and_exit_status_2(tmp_path, capsys):
    assert main(["optimize", "--model", str(tmp_path / "nowhere"), "--recipe", "r.yaml", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert err == "vla-opt: error: recipe file r.yaml does not exist\n"
    assert "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="recipe file r.yaml does not exist"):
        main(["--debug", "optimize", "--model", str(tmp_path / "nowhere"), "--recipe", "r.yaml", "--out", "o"])


def test_every_option_states_its_default():
    import argparse

    from vlaopt.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"vla-opt {name} {action.option_strings[0]} has no help"
            text = formatter._get_help_string(action)
            assert action.required or "(default" in text, f"vla-opt {name} {action.option_strings[0]}: {text!r}"


def test_optimize_reads_heldout_demos_only_for_a_data_driven_step(tmp_path, capsys):
    """int8 uses no data: a damaged heldout.npz beside the model is not read; ShortGPT reads it and
    gets one error naming the file."""
    VLA.default().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / HELDOUT_FILE).write_bytes(b"not an npz")
    (tmp_path / "q.yaml").write_text("- quantize: {method: int8}\n")
    (tmp_path / "s.yaml").write_text("- layer_pruning: {method: shortgpt, n: 1}\n")
    assert main(["optimize", "--model", str(tmp_path / "m"), "--recipe", str(tmp_path / "q.yaml"),
                 "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert main(["optimize", "--model", str(tmp_path / "m"), "--recipe", str(tmp_path / "s.yaml"),
                 "--out", str(tmp_path / "s")]) == 2
    assert f"held-out demonstrations {tmp_path / 'm' / HELDOUT_FILE} cannot be read" in capsys.readouterr().err
