"""FastV: keep the visual tokens that the prompt and action tokens attend to most at layer k.

Only the attention rows of those query tokens are computed, with the layer's own projections,
norms and RoPE (grouped-query heads expanded), so the model stays on SDPA; scores are averaged over
heads and queries.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from vlaopt.model.layout import TokenState
from vlaopt.optimize.tokens.base import PRUNERS, TokenPruner, keep_count, keep_visual, top_k_mask


def attention_rows(layer, state: TokenState, rotary, query_idx: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities (B, heads, Q, S) of the tokens `query_idx` at decoder `layer`.

    Grouped-query heads share their key head through a reshape (no copy of the keys), the scaling
    is folded into the queries, and only the mask rows of `query_idx` are built."""
    attn = layer.self_attn
    x = layer.input_layernorm(state.hidden)
    b, s, _ = x.shape
    hd, nq = attn.head_dim, len(query_idx)
    q = attn.q_proj(x[:, query_idx]).view(b, nq, -1, hd)
    k = attn.k_proj(x).view(b, s, -1, hd)
    if hasattr(attn, "q_norm"):  # Qwen3 normalizes queries and keys per head
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = rotary
    q, _ = apply_rotary_pos_emb(q * attn.scaling, q[:, :1], cos[:, query_idx], sin[:, query_idx])
    _, k = apply_rotary_pos_emb(k[:, :, :1], k, cos, sin)
    heads, kv_heads = q.shape[1], k.shape[1]
    grouped = q.reshape(b, kv_heads, heads // kv_heads * nq, hd)  # query head h reads key head h // groups
    logits = (grouped @ k.transpose(-1, -2)).view(b, heads, nq, s)
    bias = torch.zeros((), dtype=logits.dtype, device=logits.device).masked_fill(
        ~state.attention_mask(rows=query_idx), torch.finfo(logits.dtype).min)  # (B, 1, Q, S): one add, not a fill
    return (logits + bias).softmax(-1)


@PRUNERS.register("fastv")
class FastVPruner(TokenPruner):
    def __init__(self, cfg, model) -> None:
        super().__init__(cfg, model)
        self.lm = [model.lm]  # a list: no second registration of the LM's parameters

    def forward(self, state: TokenState) -> TokenState:
        lm = self.lm[0]
        layer = lm.decoder.layers[self.layer]
        rotary = lm.decoder.rotary_emb(state.hidden, position_ids=state.position_ids)
        layout = state.layout
        query_idx = torch.arange(layout.span("prompt").start, layout.span("action").stop, device=state.hidden.device)
        probs = attention_rows(layer, state, rotary, query_idx)  # (B, H, Q, S)
        q_valid = state.valid[:, query_idx].float()  # padded prompt tokens do not vote
        per_query = probs[..., layout.span("visual")].mean(1)  # (B, Q, Nv)
        scores = (per_query * q_valid[..., None]).sum(1) / q_valid.sum(1, keepdim=True)
        scores = scores.masked_fill(~state.valid[:, layout.span("visual")], -1.0)
        return keep_visual(state, top_k_mask(scores, keep_count(layout.visual, self.cfg.keep)))
