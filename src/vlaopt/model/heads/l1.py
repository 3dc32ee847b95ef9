"""L1 regression head (OpenVLA-OFT): an MLP-ResNet maps each chunk step's action-slot features to
its action, trained with mean absolute error."""

from __future__ import annotations

import torch

from vlaopt.model.heads.base import HEADS, ActionHead
from vlaopt.model.heads.mlp import MLPResNet


@HEADS.register("l1")
class L1Head(ActionHead):
    def __init__(self, cfg, hidden_size: int, action_dim: int, chunk: int) -> None:
        super().__init__(cfg, hidden_size, action_dim, chunk)
        self.net = MLPResNet(action_dim * hidden_size, cfg.hidden_dim, action_dim, cfg.num_blocks)

    def predict(self, hidden: torch.Tensor, readout: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        return self.net(self.per_step(hidden))

    def loss(self, hidden, readout, actions, generator=None) -> torch.Tensor:
        return (self.predict(hidden, readout, None) - actions).abs().mean()
