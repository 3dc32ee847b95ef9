"""Perplexity of a VLA's LM (or a bare LM) on held-out text, through vla-opt's own layer loop: each
window of token ids is scored on its own, every token but the first predicted from those before it,
and the perplexity is exp of the mean negative log-likelihood over all scored tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vlaopt.model.language import LanguageModel


def perplexity(lm: LanguageModel, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) of `lm` over the windows (N, L) of token ids (`data.text.text_windows`)."""
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise ValueError(f"perplexity needs windows of shape (N >= 1, L >= 2), got {tuple(windows.shape)}")
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(batch_size):
            batch = batch.to(lm.readout().device)
            logits = lm.text_logits(batch)[:, :-1].float()
            targets = batch[:, 1:]
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
            count += targets.numel()
    return math.exp(nll / count)
