"""Behaviour-cloning trainer: the loss falls, a stopped run resumes exactly, runs extend, bad resumes are explained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_collection

from vlaopt import VLA, VLAConfig, apply, load
from vlaopt.bench.heldout import HELDOUT_FILE
from vlaopt.cli import build_parser, main
from vlaopt.optimize.tokens.lightvla import noise_schedule
from vlaopt.train.schedules import lr_factor
from vlaopt.train.trainer import TrainConfig, train


def _samples(cfg: VLAConfig, n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    size = cfg.vision.image_size
    out = []
    for i in range(n):
        images = rng.integers(0, 256, (cfg.cameras, size, size, 3), dtype=np.uint8)
        # the target depends on the image, so there is something to learn
        actions = np.full((cfg.chunk, cfg.action_dim), images.mean() / 128 - 1, dtype=np.float32)
        out.append({"images": images, "instruction": ["open the drawer", "reach the goal"][i % 2],
                    "proprio": rng.standard_normal(cfg.proprio_dim).astype(np.float32), "actions": actions})
    return out


STATS = {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7}, "proprio": {"q01": [-2.0] * 2, "q99": [2.0] * 2}}


def test_training_lowers_the_loss_and_saves_a_loadable_model(tmp_path):
    cfg = VLAConfig.tiny(proprio_dim=2)
    data = _samples(cfg, 16)
    model = VLA(cfg)
    log = train(model, data, data[:8], tmp_path / "run", TrainConfig(steps=30, batch_size=8, lr=2e-3, warmup_steps=3,
                                                                      val_every=30, save_every=30), STATS, progress=False)
    losses = [loss for _, loss in log["loss"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert len(log["val_action_error"]) == 1
    loaded = load(tmp_path / "run")
    assert loaded.stats()["action"]["q01"] == STATS["action"]["q01"]


class _Stop(Exception):
    """Stands for a kill: raised in the middle of a run."""


@pytest.mark.parametrize("head", ["l1", "flow"])  # flow: a loss that draws from the torch RNG
def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, head):
    cfg = VLAConfig.tiny(proprio_dim=2, head=head)
    data = _samples(cfg, 24)  # 3 batches per epoch: the stop falls inside an epoch
    tc = TrainConfig(steps=8, batch_size=8, lr=1e-3, warmup_steps=2, val_every=3, save_every=4)
    reference = VLA(cfg)
    ref_log = train(reference, data, data[:8], tmp_path / "ref", tc, STATS, progress=False)
    losses = VLA.compute_loss
    calls = []

    def stop_at_step_6(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise _Stop
        return losses(self, *args, **kwargs)

    monkeypatch.setattr(VLA, "compute_loss", stop_at_step_6)
    with pytest.raises(_Stop):
        train(VLA(cfg), data, data[:8], tmp_path / "run", tc, STATS, progress=False)
    monkeypatch.setattr(VLA, "compute_loss", losses)
    resumed = VLA(cfg)
    log = train(resumed, data, data[:8], tmp_path / "run", tc, STATS, progress=False)  # from the step-4 checkpoint
    assert log == ref_log
    saved = load(tmp_path / "run").state_dict()
    for name, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value) and torch.equal(saved[name], value), name


def test_a_finished_run_extends_with_more_steps(tmp_path):
    cfg = VLAConfig.tiny(proprio_dim=2)
    data = _samples(cfg, 16)
    tc = dict(batch_size=8, lr=1e-3, warmup_steps=2, val_every=100, save_every=4)
    train(VLA(cfg), data, None, tmp_path / "run", TrainConfig(steps=4, **tc), STATS, progress=False)
    log = train(VLA(cfg), data, None, tmp_path / "run", TrainConfig(steps=8, **tc), STATS, progress=False)
    assert [s for s, _ in log["loss"]] == list(range(1, 9))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000008"]
    with pytest.raises(ValueError, match=r"cannot resume .*run with steps=6: its checkpoint is at step 8 already"):
        train(VLA(cfg), data, None, tmp_path / "run", TrainConfig(steps=6, **tc), STATS, progress=False)


def test_resume_with_another_config_explains_the_difference(tmp_path):
    cfg = VLAConfig.tiny(proprio_dim=2)
    data = _samples(cfg, 8)
    tc = TrainConfig(steps=2, batch_size=8, warmup_steps=1, save_every=2)
    train(VLA(cfg), data, None, tmp_path / "run", tc, STATS, progress=False)
    other = VLAConfig.tiny(proprio_dim=2, head="flow")
    with pytest.raises(ValueError, match=r"cannot resume from .*run: the configuration differs \(model.head.kind: saved 'l1' vs now 'flow'; model.head.steps: saved None vs now 4\)"):
        train(VLA(other), data, None, tmp_path / "run", TrainConfig(steps=4, batch_size=8, warmup_steps=1, save_every=2),
              STATS, progress=False)


def test_lightvla_noise_decays_during_training(tmp_path):
    cfg = VLAConfig.tiny(proprio_dim=2)
    model = apply(VLA(cfg), [{"token_pruning": {"method": "lightvla"}}])
    seen = []
    pruner = model.lm.hooks[0]
    original = pruner.set_noise_scale
    pruner.set_noise_scale = lambda v: (seen.append(v), original(v))
    train(model, _samples(cfg, 8), None, tmp_path / "run", TrainConfig(steps=4, batch_size=8, warmup_steps=1,
                                                                        save_every=4), STATS, progress=False)
    assert seen == [1.0, 0.75, 0.5, 0.25]
    assert not model.lm.hooks[0].training  # back in eval mode: it prunes for real


@pytest.fixture
def cli_run(tmp_path):
    """`vla-opt train` arguments for a tiny model on a tiny collection, into tmp_path/run."""
    VLAConfig.tiny(cameras=2, proprio_dim=4, action_dim=4).save(tmp_path / "cfg.json")
    data = write_collection(tmp_path)
    return ["train", "--data", str(data), "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "run"),
            "--batch-size", "4", "--val-every", "4", "--save-every", "4", "--val-fraction", "0.25"]


def test_the_cli_extends_a_finished_run_keeping_its_warmup(tmp_path, cli_run, capsys):
    run = tmp_path / "run"
    assert main([*cli_run, "--steps", "4"]) == 0  # warm-up min(100, 4 // 10 + 1) = 1
    assert "training with 1 torch thread(s)" in capsys.readouterr().out
    heldout = (run / HELDOUT_FILE).read_bytes()
    assert main([*cli_run, "--steps", "12"]) == 0  # 12 // 10 + 1 would be 2: the saved run's 1 is kept
    state = json.loads((run / "checkpoints" / "step-000012" / "trainer_state.json").read_text())
    assert state["train_config"]["warmup_steps"] == 1 and [s for s, _ in state["log"]["loss"]] == list(range(1, 13))
    assert (run / HELDOUT_FILE).read_bytes() == heldout  # written once, at the start of the run
    capsys.readouterr()
    assert main([*cli_run, "--steps", "14", "--warmup-steps", "3"]) == 2
    assert "train.warmup_steps: saved 1 vs now 3" in capsys.readouterr().err


def test_the_cli_writes_heldout_before_training_and_refuses_bad_threads(tmp_path, cli_run, monkeypatch, capsys):
    from vlaopt.train import trainer

    def fake_train(*args, **kwargs):
        assert (tmp_path / "run" / HELDOUT_FILE).is_file()  # there from the start, whenever the run is killed
        assert torch.get_num_threads() == 1
        return {"loss": [], "val_action_error": []}

    monkeypatch.setattr(trainer, "train", fake_train)
    assert build_parser().parse_args(cli_run).threads == 1
    assert main([*cli_run, "--steps", "2"]) == 0
    assert main([*cli_run, "--threads", "-1"]) == 2
    assert "vla-opt: error: --threads -1 must be 0" in capsys.readouterr().err


def test_schedules():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100) == pytest.approx(0.1)
    assert noise_schedule(0, 10) == 1.0 and noise_schedule(10, 10) == 0.0
    with pytest.raises(ValueError, match=r"train.steps=0 must be a positive integer"):
        TrainConfig(steps=0)
