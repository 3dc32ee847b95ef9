"""Schedules: the learning rate (linear warm-up, cosine decay) and LightVLA's score-noise scale."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Multiplier of the base learning rate: linear warm-up to 1, cosine decay to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def lightvla_noise(step: int, total: int) -> float:
    """LightVLA's training noise on the pruner scores: 1 at the start, decaying linearly to 0."""
    return max(0.0, 1.0 - step / max(1, total))
