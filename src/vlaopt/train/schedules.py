"""The learning-rate schedule: linear warm-up, cosine decay. (Hooks with a schedule of their own,
such as LightVLA's score noise, follow `LayerHook.training_step`.)"""

from __future__ import annotations

import math


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Multiplier of the base learning rate: linear warm-up to 1, cosine decay to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
