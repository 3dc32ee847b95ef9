"""Shared fixtures: tiny models and random observations built from config (nothing downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlaopt import VLA, VLAConfig

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
