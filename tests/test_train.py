"""Behaviour-cloning trainer: the loss falls, checkpoints resume, bad resumes are explained."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlaopt import VLA, VLAConfig, apply
from vlaopt.train.schedules import lightvla_noise, lr_factor
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
    loaded = VLA.from_pretrained(tmp_path / "run")
    assert loaded.stats()["action"]["q01"] == STATS["action"]["q01"]


def test_resume_continues_where_it_stopped(tmp_path):
    cfg = VLAConfig.tiny(proprio_dim=2)
    data = _samples(cfg, 16)
    tc = dict(batch_size=8, lr=1e-3, warmup_steps=2, val_every=100, save_every=4)
    train(VLA(cfg), data, None, tmp_path / "run", TrainConfig(steps=4, **tc), STATS, progress=False)
    log = train(VLA(cfg), data, None, tmp_path / "run", TrainConfig(steps=8, **tc), STATS, progress=False)
    assert [s for s, _ in log["loss"]] == list(range(1, 9))


def test_resume_with_another_config_explains_the_difference(tmp_path):
    cfg = VLAConfig.tiny(proprio_dim=2)
    data = _samples(cfg, 8)
    tc = TrainConfig(steps=2, batch_size=8, warmup_steps=1, save_every=2)
    train(VLA(cfg), data, None, tmp_path / "run", tc, STATS, progress=False)
    other = VLAConfig.tiny(proprio_dim=2, head="flow")
    with pytest.raises(ValueError, match=r"cannot resume from .*run: the configuration differs \(model.head.kind: saved 'l1' vs now 'flow'\)"):
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


def test_schedules():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100) == pytest.approx(0.1)
    assert lightvla_noise(0, 10) == 1.0 and lightvla_noise(10, 10) == 0.0
    with pytest.raises(ValueError, match=r"train.steps=0 must be a positive integer"):
        TrainConfig(steps=0)
