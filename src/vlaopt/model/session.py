"""Closed-loop sessions: what a policy may carry from one control step to the next.

`VLA.session()` returns one; `reset()` starts an episode (forgetting everything), `step(images,
instructions, proprio)` predicts as `predict_action` does. The plain `Session` keeps nothing, so its
actions are `predict_action`'s; a recipe step may install a factory of sessions that reuse work
between steps (optimize/temporal/: unchanged visual tokens' features and keys/values). `stats` holds
the last step's reuse statistics and `history` every step's since the last `reset`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vlaopt.utils.timer import Timer

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA


class Session:
    """A session that keeps nothing between steps (see the module docstring)."""

    def __init__(self, model: VLA) -> None:
        self.model = model
        self.stats: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []

    def reset(self) -> None:
        """Start a new episode: forget everything kept from earlier steps."""
        self.stats, self.history = {}, []

    def step(self, images: Any, instructions: Any, proprio: Any = None, *, noise: torch.Tensor | None = None,
             seed: int = 0, timer: Timer | None = None) -> torch.Tensor:
        """Unnormalized actions (B, chunk, action_dim) for this step's observations, as `predict_action`."""
        return self.model.predict_action(images, instructions, proprio, noise=noise, seed=seed, timer=timer)
