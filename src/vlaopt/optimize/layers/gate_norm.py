"""Gate-Norm (Saikumar & Varghese, "Data-Free Pruning of Self-Attention Layers in LLMs", 2025): rank
attention sublayers by their query-key coupling, from the weights alone (no data, no forward pass).

For query head h and the key head g(h) it shares under grouped-query attention, the coupling is the
bilinear form W_q,h^T W_k,g(h) (D x D); its Frobenius norm is computed through head_dim x head_dim
Gram matrices, ||A^T B||_F^2 = tr(A A^T B B^T). A layer's score is the mean over its query heads.

Where the family normalizes queries and keys per head (Qwen3's q_norm / k_norm), the size of a head's
W_q,h or W_k,g cancels in that RMS normalization: the attention is the same for c * W_q,h, but the raw
score moves by c. There each head's projection is first scaled to unit RMS rows (||W||_F =
sqrt(head_dim)), which makes the score invariant to it, and the norm's weights then scale its rows
(our choice; the paper scores plain Llama layers, where nothing cancels).

On SmolLM2-135M (Llama, no QK-norm) the score falls almost monotonically with depth, so gate_norm drops
the last attention sublayers, which costs far more than the data-driven attention_drop. The reason:
the pre-attention RMSNorm gain grows with depth (mean |gamma| 0.03 at layer 0, 0.41 at layer 29) while
|W_q| and |W_k| shrink (164 -> 86, 132 -> 44): the scale lives in the norm, which the weight-only score
does not see. Folding the gain into W_q and W_k makes the score invariant to that reparametrization
but ranks layers 0 and 1 lowest, whose attention alone costs 5.6x and 15.6x perplexity; neither form
follows the measured per-layer damage (Spearman 0.20 raw, -0.36 folded over the 30 layers;
scripts/gate_norm_layers.py). We keep the paper's raw form and say where it fails
(docs/compression.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from vlaopt.model.layout import TokenState
from vlaopt.optimize.layers.base import LAYER_METHODS, AttentionMethod, LayerPruningConfig
from vlaopt.optimize.quant.int8 import float_weight

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA


def coupling_norms(attention: nn.Module) -> torch.Tensor:
    """Frobenius norm of W_q,h^T W_k,g(h) for every query head h of an HF attention module."""
    config = attention.config
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, attention.head_dim
    wq = float_weight(attention.q_proj).double().reshape(heads, head_dim, -1)
    wk = float_weight(attention.k_proj).double().reshape(kv_heads, head_dim, -1)
    if hasattr(attention, "q_norm"):  # the head's scale cancels in the per-head RMS norm (module doc)
        wq = wq * (head_dim ** 0.5 / torch.linalg.matrix_norm(wq))[:, None, None]
        wk = wk * (head_dim ** 0.5 / torch.linalg.matrix_norm(wk))[:, None, None]
        wq = wq * attention.q_norm.weight.double()[None, :, None]
        wk = wk * attention.k_norm.weight.double()[None, :, None]
    wk = wk.repeat_interleave(heads // kv_heads, dim=0)  # key head of each query head
    gram_q = wq @ wq.transpose(1, 2)
    gram_k = wk @ wk.transpose(1, 2)
    return (gram_q * gram_k).sum((1, 2)).clamp(min=0).sqrt()  # tr(A B) = sum(A * B^T), both symmetric


@dataclass
class GateNormConfig(LayerPruningConfig):
    """`layer_pruning` with method gate_norm."""


@LAYER_METHODS.register("gate_norm")
class GateNorm(AttentionMethod):
    needs_data = False
    config_cls = GateNormConfig

    def scores(self, model: VLA, states: list[TokenState] | None) -> dict[int, float]:
        layers = model.lm.decoder.layers
        with torch.no_grad():
            return {i: float(coupling_norms(layers[i].self_attn).mean()) for i in self.candidates(model)}
