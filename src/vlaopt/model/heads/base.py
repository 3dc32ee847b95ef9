"""The action-head interface and its registry.

A head reads the final hidden states at the action slots (B, chunk * action_dim, D) and returns
normalized actions (B, chunk, action_dim) in [-1, 1]; `loss` is its training objective.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from vlaopt.config import HeadConfig
from vlaopt.utils.registry import Registry

HEADS: Registry[type[nn.Module]] = Registry("action head")  # ActionHead subclasses, and the expert head


class ActionHead(nn.Module):
    """Base class: subclasses implement `predict` and `loss`."""

    stochastic = False  # True when `predict` starts from noise
    policy: ClassVar[str] = "slots"  # model/policy.py: what drives the head (the expert head: "expert")

    def __init__(self, cfg: HeadConfig, hidden_size: int, action_dim: int, chunk: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.hidden_size = hidden_size
        self.action_dim = action_dim
        self.chunk = chunk

    @classmethod
    def build(cls, cfg: HeadConfig, hidden_size: int, action_dim: int, chunk: int,
              lm_config: PretrainedConfig, proprio_dim: int = 0) -> ActionHead:
        return cls(cfg, hidden_size, action_dim, chunk)

    def per_step(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, chunk * action_dim, D) -> (B, chunk, action_dim * D): one feature row per chunk step."""
        return hidden.reshape(hidden.shape[0], self.chunk, self.action_dim * hidden.shape[-1])

    @abstractmethod
    def predict(self, hidden: torch.Tensor, readout: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Normalized actions (B, chunk, action_dim). `readout` is the LM output-embedding matrix
        (used by heads that read logits); `noise` the initial sample of stochastic heads."""

    @abstractmethod
    def loss(
        self, hidden: torch.Tensor, readout: torch.Tensor, actions: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Training loss against normalized target actions (B, chunk, action_dim)."""


def build_head(
    cfg: HeadConfig, hidden_size: int, action_dim: int, chunk: int, lm_config: PretrainedConfig, proprio_dim: int = 0
) -> nn.Module:
    """Instantiate the head named by `cfg.kind` through its `build` (slot heads take the LM's width;
    the expert takes the LM's HF config, whose family and attention geometry it shares, and the
    proprio width when the state is its first token)."""
    return HEADS.get(cfg.kind).build(cfg, hidden_size, action_dim, chunk, lm_config, proprio_dim)
