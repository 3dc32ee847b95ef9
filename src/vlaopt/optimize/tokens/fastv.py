"""FastV: keep the visual tokens that the prompt and action tokens attend to most.

As in the FastV paper, a hook before decoder layer k ranks the visual tokens by the attention of
layer k - 1, the last layer that saw them all. That layer's own post-RoPE queries and keys are
handed to the hook by the layer loop's attention probe, so ranking costs only the attention rows of
the prompt and action queries (no projections, no second RoPE) and the model stays on SDPA.
Scores are averaged over heads and valid queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlaopt.model.layout import TokenState
from vlaopt.optimize.tokens.base import PRUNERS, PrunerConfig, TokenPruner, keep_count, keep_visual, top_k_mask


@dataclass
class FastVConfig(PrunerConfig):
    layer: int = 2  # FastV's K: two layers see every token, the second one's attention decides

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer < 1:
            raise ValueError(
                f"fastv ranks tokens by the attention of the layer before it; layer={self.layer!r} must be >= 1")


def attention_probs(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, scaling: float | None, rows: slice
) -> torch.Tensor:
    """Softmax attention probabilities (B, heads, Q, S) of the query positions `rows`.

    `query` (B, heads, S, hd) and `key` (B, kv_heads, S, hd) as an attention layer has them after
    RoPE, `mask` its boolean (B, 1, S, S) mask. Grouped-query heads share their key head through a
    reshape (no copy of the keys) and only the mask rows of `rows` are read. The logits buffer is the
    only large allocation (bias and softmax work in place: on CPU a fresh buffer of this size cost
    more than the softmax itself); no gradient flows, since the result only ranks tokens."""
    b, heads, s, hd = query.shape
    if key.shape[-2] != s or mask.dtype != torch.bool:
        raise ValueError(f"attention_probs needs one key per query and a boolean mask; got {s} queries, "
                         f"{key.shape[-2]} keys, a {mask.dtype} mask")
    q = query.detach()[:, :, rows] * (hd**-0.5 if scaling is None else scaling)
    n, kv_heads = q.shape[2], key.shape[1]
    grouped = q.reshape(b, kv_heads, heads // kv_heads * n, hd)  # query head h reads key head h // groups
    logits = (grouped @ key.detach().transpose(-1, -2)).view(b, heads, n, s)
    bias = torch.zeros((), dtype=logits.dtype, device=logits.device).masked_fill(
        ~mask[:, :, rows], torch.finfo(logits.dtype).min)  # (B, 1, Q, S): one add, not a fill over heads
    return torch.softmax(logits.add_(bias), -1, out=logits)


def received_attention(
    state: TokenState, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """Attention (B, Nv) each visual token receives from the prompt and action tokens, averaged over
    heads and valid queries (padded prompt tokens do not vote)."""
    layout = state.layout
    rows = slice(layout.span("prompt").start, layout.span("action").stop)
    probs = attention_probs(query, key, mask, scaling, rows)
    per_query = probs[..., layout.span("visual")].mean(1)  # (B, Q, Nv)
    q_valid = state.valid[:, rows].to(per_query.dtype)
    return (per_query * q_valid[..., None]).sum(1) / q_valid.sum(1, keepdim=True)


@PRUNERS.register("fastv")
class FastVPruner(TokenPruner):
    """Ranks by the attention of decoder layer `layer - 1`, which it observes through the layer loop."""

    name = "fastv"
    config_cls = FastVConfig

    def __init__(self, cfg: FastVConfig, model: object) -> None:
        super().__init__(cfg, model)
        self.scores: torch.Tensor | None = None  # (B, Nv) from the observed layer, consumed by forward

    def observed_layers(self) -> tuple[int, ...]:
        return (self.layer - 1,)

    def observe_attention(
        self, layer: int, state: TokenState, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor,
        scaling: float | None,
    ) -> None:
        self.scores = received_attention(state, query, key, mask, scaling)

    def forward(self, state: TokenState) -> TokenState:
        layout = state.layout
        span = layout.span("visual")
        scores, self.scores = self.scores, None  # scores of one pass only: never reused by the next call
        if scores is None or tuple(scores.shape) != (state.hidden.shape[0], layout.visual):
            got = "none" if scores is None else f"scores of shape {tuple(scores.shape)}"
            raise RuntimeError(
                f"fastv before decoder layer {self.layer} ranks the {layout.visual} visual tokens by the attention "
                f"of layer {self.layer - 1}, but found {got}: run it in the LM's layer loop, first among the hooks "
                "at its layer")
        scores = scores.masked_fill(~state.valid[:, span], -1.0)
        k = keep_count(layout.visual, self.cfg.keep)
        return keep_visual(state, top_k_mask(scores, k), k)
