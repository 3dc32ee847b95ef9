"""Building blocks shared by the heads: OFT's MLP-ResNet and a sinusoidal time embedding."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLPResNet(nn.Module):
    """LayerNorm -> Linear -> ReLU, then residual MLP blocks, then LayerNorm -> Linear (OpenVLA-OFT)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_blocks: int) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, hidden_dim), nn.ReLU())
            for _ in range(num_blocks)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of times t (B,) in [0, 1] (diffusion passes timestep / train_timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class Denoiser(nn.Module):
    """Predicts noise (diffusion) or velocity (flow) for a noisy chunk given the action-slot features."""

    time_dim = 32

    def __init__(self, cond_dim: int, action_dim: int, hidden_dim: int, num_blocks: int) -> None:
        super().__init__()
        self.net = MLPResNet(cond_dim + action_dim + self.time_dim, hidden_dim, action_dim, num_blocks)

    def forward(self, cond: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """cond (B, chunk, C), noisy (B, chunk, A), t (B,) -> (B, chunk, A)."""
        temb = time_embedding(t, self.time_dim).to(cond.dtype)[:, None].expand(-1, cond.shape[1], -1)
        return self.net(torch.cat([cond, noisy, temb], dim=-1))
