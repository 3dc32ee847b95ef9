"""The action-head interface and its registry.

A head reads the final hidden states at the action slots (B, chunk * action_dim, D) and returns
normalized actions (B, chunk, action_dim) in [-1, 1]; `loss` is its training objective.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn
from transformers import PretrainedConfig

from vlaopt.config import HeadConfig
from vlaopt.utils.registry import Registry

HEADS: Registry[type[nn.Module]] = Registry("action head")  # ActionHead subclasses, and the expert head


class ActionHead(nn.Module):
    """Base class: subclasses implement `predict` and `loss`."""

    stochastic = False  # True when `predict` starts from noise
    reads_kv_cache = False  # the expert head reads the VLM's KV cache instead of action-slot states

    def __init__(self, cfg: HeadConfig, hidden_size: int, action_dim: int, chunk: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.hidden_size = hidden_size
        self.action_dim = action_dim
        self.chunk = chunk

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
    cfg: HeadConfig, hidden_size: int, action_dim: int, chunk: int, lm_config: PretrainedConfig
) -> nn.Module:
    """Instantiate the head named by `cfg.kind`; the expert head (`reads_kv_cache`) is built from the
    LM's HF config instead of its width, as it shares the LM's family and attention geometry."""
    cls = HEADS.get(cfg.kind)
    if cls.reads_kv_cache:
        return cls(cfg, action_dim, chunk, lm_config)
    return cls(cfg, hidden_size, action_dim, chunk)
