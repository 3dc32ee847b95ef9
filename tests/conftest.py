"""Shared fixtures: tiny models and random observations built from config (nothing downloaded)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from vlaopt import VLA, VLAConfig
from vlaopt.data.episodes import Episode, write_episode, write_index

# Tiny models gain nothing from intra-op threads; one thread keeps tests steady on a busy machine.
torch.set_num_threads(1)

INSTRUCTIONS = ["pick up the red cup", "open the drawer", "push the small block all the way to the green goal"]


def observations(cfg: VLAConfig, batch: int = 3, seed: int = 0):
    """uint8 images, instructions of different lengths, and proprio (or None) for a batch."""
    rng = np.random.default_rng(seed)
    size = cfg.vision.image_size
    images = rng.integers(0, 256, (batch, cfg.cameras, size, size, 3), dtype=np.uint8)
    instructions = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch)]
    proprio = torch.from_numpy(rng.standard_normal((batch, cfg.proprio_dim)).astype(np.float32)) if cfg.proprio_dim else None
    return images, instructions, proprio


@pytest.fixture
def tiny_model():
    return VLA(VLAConfig.tiny(proprio_dim=4, cameras=2)).eval()


def write_collection(root: Path, episodes: int = 4, steps: int = 12, reasoning: bool = False) -> Path:
    """A tiny collection folder in the `vla-opt collect` format (random frames; no simulator needed).
    Proprio's first value is -2 in the first half of an episode and 2 in the second; with `reasoning`,
    each step's text says which half it is in (learnable from the proprio)."""
    rng = np.random.default_rng(0)
    entries = []
    for i in range(episodes):
        proprio = rng.standard_normal((steps, 4)).astype(np.float32)
        proprio[:, 0] = np.where(np.arange(steps) < steps // 2, -2.0, 2.0)
        texts = tuple("first half; go on" if p < 0 else "second half; stop" for p in proprio[:, 0])
        episode = Episode(images=rng.integers(0, 256, (steps, 2, 32, 32, 3), dtype=np.uint8), proprio=proprio,
                          actions=rng.uniform(-1, 1, (steps, 4)).astype(np.float32), task="reach-v3",
                          instruction="move the gripper to the goal", cameras=("corner4", "topview"), seed=i,
                          success=True, success_step=steps - 1, reasoning=texts if reasoning else None)
        write_episode(root / f"ep{i}.npz", episode)
        entries.append({"file": f"ep{i}.npz", "task": "reach-v3", "instruction": episode.instruction, "seed": i,
                        "attempt": i, "length": steps, "success": True, "success_step": steps - 1})
    write_index(root, {"tasks": ["reach-v3"], "image_size": 32}, entries, attempts={"reach-v3": episodes},
                metaworld_version="test")
    return root


def reasoner_obs(cfg: VLAConfig, batch: int = 3):
    """Observations for `reasoner`s: prompts of different lengths, proprio of 3."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, cfg.cameras, cfg.vision.image_size, cfg.vision.image_size, 3), dtype=np.uint8)
    return images, ["open the drawer", "push the button hard", "pick it"][:batch], rng.normal(size=(batch, 3)).astype(
        np.float32)


def reasoner(tokens: int = 12, lm: str = "llama", stop_at: int | None = None, std: float = 0.3) -> VLA:
    """A tiny expert VLA (3 LM layers) that reasons `tokens` tokens; its LM's matrices widened (to
    `std`) so that greedy text and attention vary from token to token (at init it repeats one token,
    which any draft guesses). `stop_at`: the greedy token the first sample emits there becomes the
    STOP id, so decoding stops early."""
    from vlaopt.model import expert_policy

    cfg = VLAConfig.tiny(lm=lm, head="expert", cameras=2, proprio_dim=3)
    cfg.lm.hf_config["num_hidden_layers"] = 3
    cfg.head = replace(cfg.head, reasoning_tokens=tokens)
    model = VLA(cfg).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.lm.parameters():
            if p.ndim == 2:
                p.normal_(0, std)
    if stop_at is not None:
        model.stop_id = int(expert_policy.rollout(model, *reasoner_obs(cfg)).reasoning[0, stop_at])
    return model


def assert_same_greedy(plain: VLA, fast: VLA):
    """`fast` (speculative) decodes `plain`'s greedy reasoning exactly and acts alike (1e-5), on
    `reasoner_obs` with one noise draw; the text varies. Returns plain's rollout."""
    from vlaopt.model import expert_policy

    obs = reasoner_obs(plain.config)
    noise = torch.randn(3, plain.config.chunk, plain.config.action_dim, generator=torch.Generator().manual_seed(0))
    a = expert_policy.rollout(plain, *obs, noise=noise)
    b = expert_policy.rollout(fast, *obs, noise=noise)
    assert len(set(a.reasoning[1].tolist())) > 3  # varied text
    assert torch.equal(a.reasoning, b.reasoning)
    torch.testing.assert_close(b.actions, a.actions, atol=1e-5, rtol=1e-5)
    return a
