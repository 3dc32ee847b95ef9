"""The `vla-opt` command line."""

from __future__ import annotations

import pytest
import torch
from conftest import observations

from vlaopt import VLA, VLAConfig
from vlaopt.bench.heldout import HELDOUT_FILE, load_npz
from vlaopt.cli import main
from vlaopt.data.dataset import EpisodeDataset


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
    optimized = VLA.from_pretrained(tmp_path / "opt")
    assert optimized.config.recipe == [{"token_pruning": {"method": "fastv", "layer": 1, "keep": 0.5}}]
    reference = VLA.from_pretrained(tmp_path / "base")
    from vlaopt import apply

    apply(reference, [{"token_pruning": {"method": "fastv", "layer": 1, "keep": 0.5}}])
    images, instructions, proprio = observations(model.config)
    assert torch.equal(optimized.predict_action(images, instructions, proprio),
                       reference.predict_action(images, instructions, proprio))


def test_collect_then_train_from_the_command_line(tmp_path):
    pytest.importorskip("metaworld")
    data = tmp_path / "data"
    assert main(["collect", "--tasks", "reach-v3", "--episodes-per-task", "2", "--out", str(data), "--workers", "0",
                 "--image-size", "32", "--max-steps", "60"]) == 0
    cfg = VLAConfig.tiny(cameras=2, proprio_dim=4, action_dim=4)
    cfg.save(tmp_path / "cfg.yaml")
    assert main(["train", "--data", str(data), "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "m"),
                 "--steps", "2", "--batch-size", "4", "--val-every", "2", "--val-fraction", "0.5"]) == 0
    model = VLA.from_pretrained(tmp_path / "m")
    assert len(model.stats()["action"]["q01"]) == 4
    # the trained model carries held-out demonstrations from its own val split
    heldout = load_npz(tmp_path / "m" / HELDOUT_FILE)
    val = EpisodeDataset(data, "val", chunk=cfg.chunk, val_fraction=0.5, seed=0)
    assert len(heldout) == len(val) and torch.equal(heldout.actions[0], torch.as_tensor(val[0]["actions"]))
    # --init fine-tunes the saved weights (a near-zero learning rate leaves them as they were)
    assert main(["train", "--data", str(data), "--init", str(tmp_path / "m"), "--out", str(tmp_path / "ft"),
                 "--steps", "1", "--batch-size", "4", "--lr", "1e-12", "--val-fraction", "0.5", "--pruner", "lightvla"]) == 0
    tuned = VLA.from_pretrained(tmp_path / "ft")
    expected = {"method": "lightvla", "layer": 0, "keep": 1.0, "train_path": "merge"}
    assert tuned.config.recipe == [{"token_pruning": expected}]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[name], value, atol=1e-6, rtol=0)
    with pytest.raises(SystemExit, match=r"needs exactly one of --config \(a new model\) or --init"):
        main(["train", "--data", str(data), "--config", str(tmp_path / "cfg.yaml"), "--init", str(tmp_path / "m"),
              "--out", str(tmp_path / "m2")])
    bad = VLAConfig.tiny(cameras=1, proprio_dim=4, action_dim=4)
    bad.save(tmp_path / "bad.yaml")
    with pytest.raises(SystemExit, match=r"does not fit the data .*: cameras=1 but the data has 2"):
        main(["train", "--data", str(data), "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "m2")])
