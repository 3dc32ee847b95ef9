"""Flow-matching head (rectified flow, as pi0): a denoiser conditioned on the action-slot features
predicts the velocity from noise (t=0) to actions (t=1); sampling integrates it with Euler steps."""

from __future__ import annotations

import torch

from vlaopt.model.heads.base import HEADS, ActionHead
from vlaopt.model.heads.mlp import Denoiser


@HEADS.register("flow")
class FlowHead(ActionHead):
    stochastic = True

    def __init__(self, cfg, hidden_size: int, action_dim: int, chunk: int) -> None:
        super().__init__(cfg, hidden_size, action_dim, chunk)
        self.denoiser = Denoiser(action_dim * hidden_size, action_dim, cfg.hidden_dim, cfg.num_blocks)

    def predict(self, hidden: torch.Tensor, readout: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        cond = self.per_step(hidden)
        x = noise.to(cond.dtype)
        dt = 1.0 / self.cfg.steps
        for i in range(self.cfg.steps):
            t = torch.full((x.shape[0],), i * dt, device=x.device)
            x = x + dt * self.denoiser(cond, x, t)
        return x

    def loss(self, hidden, readout, actions, generator=None) -> torch.Tensor:
        cond = self.per_step(hidden)
        noise = torch.randn(actions.shape, generator=generator, device=actions.device, dtype=actions.dtype)
        t = torch.rand(actions.shape[0], generator=generator, device=actions.device, dtype=actions.dtype)
        x_t = (1 - t)[:, None, None] * noise + t[:, None, None] * actions
        return ((self.denoiser(cond, x_t, t) - (actions - noise)) ** 2).mean()
