"""Discrete action tokens (OpenVLA / RT-2): each action dimension is one of 256 uniform bins over
[-1, 1], predicted from the LM logits of the last 256 vocabulary ids at that dimension's action
slot (all slots decoded in parallel, as OFT does), trained with cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlaopt.model.heads.base import HEADS, ActionHead


def bin_centers(bins: int, device: torch.device) -> torch.Tensor:
    """Centres of `bins` uniform bins over [-1, 1] (also the expert's autoregressive trajectory tokens)."""
    edges = torch.linspace(-1.0, 1.0, bins + 1, device=device)
    return (edges[:-1] + edges[1:]) / 2


@HEADS.register("discrete")
class DiscreteHead(ActionHead):
    def bin_logits(self, hidden: torch.Tensor, readout: torch.Tensor) -> torch.Tensor:
        """Logits over the action bins (B, chunk, action_dim, bins)."""
        logits = hidden @ readout[-self.cfg.bins :].t()
        return logits.reshape(hidden.shape[0], self.chunk, self.action_dim, self.cfg.bins)

    def to_bins(self, actions: torch.Tensor) -> torch.Tensor:
        """Bin index of each normalized action value."""
        idx = torch.floor((actions.clamp(-1, 1) + 1) / 2 * self.cfg.bins).long()
        return idx.clamp(0, self.cfg.bins - 1)

    def predict(self, hidden: torch.Tensor, readout: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        return bin_centers(self.cfg.bins, hidden.device)[self.bin_logits(hidden, readout).argmax(-1)]

    def loss(self, hidden, readout, actions, generator=None) -> torch.Tensor:
        logits = self.bin_logits(hidden, readout)
        return F.cross_entropy(logits.reshape(-1, self.cfg.bins), self.to_bins(actions).reshape(-1))
