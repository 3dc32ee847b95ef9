"""DDIM diffusion head: a denoiser conditioned on the action-slot features predicts the noise added
to the action chunk (DDPM training, cosine schedule); sampling runs `steps` deterministic DDIM steps."""

from __future__ import annotations

import math

import torch

from vlaopt.model.heads.base import HEADS, ActionHead
from vlaopt.model.heads.mlp import Denoiser


def cosine_alphas_cumprod(timesteps: int) -> torch.Tensor:
    """Cumulative signal fraction of the squared-cosine schedule (Nichol & Dhariwal), betas capped at 0.999."""
    f = lambda t: math.cos((t / timesteps + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(timesteps)], dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0).float()


@HEADS.register("diffusion")
class DiffusionHead(ActionHead):
    stochastic = True

    def __init__(self, cfg, hidden_size: int, action_dim: int, chunk: int) -> None:
        super().__init__(cfg, hidden_size, action_dim, chunk)
        self.denoiser = Denoiser(action_dim * hidden_size, action_dim, cfg.hidden_dim, cfg.num_blocks)
        self.register_buffer("alphas_cumprod", cosine_alphas_cumprod(cfg.train_timesteps), persistent=False)

    def _eps(self, cond: torch.Tensor, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return self.denoiser(cond, x, step.float() / self.cfg.train_timesteps)

    def predict(self, hidden: torch.Tensor, readout: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        cond = self.per_step(hidden)
        x = noise.to(cond.dtype)
        total, steps = self.cfg.train_timesteps, self.cfg.steps
        schedule = [round(v) for v in torch.linspace(total - 1, 0, steps).tolist()]
        for i, t in enumerate(schedule):
            a_t = self.alphas_cumprod[t]
            a_prev = self.alphas_cumprod[schedule[i + 1]] if i + 1 < steps else torch.ones((), device=x.device)
            eps = self._eps(cond, x, torch.full((x.shape[0],), t, device=x.device))
            x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x

    def loss(self, hidden, readout, actions, generator=None) -> torch.Tensor:
        cond = self.per_step(hidden)
        noise = torch.randn(actions.shape, generator=generator, device=actions.device, dtype=actions.dtype)
        t = torch.randint(0, self.cfg.train_timesteps, (actions.shape[0],), generator=generator, device=actions.device)
        a = self.alphas_cumprod[t][:, None, None]
        x_t = a.sqrt() * actions + (1 - a).sqrt() * noise
        return ((self._eps(cond, x_t, t) - noise) ** 2).mean()
