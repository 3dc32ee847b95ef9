"""Action expert over the VLM's KV cache (pi0, GR-3, Alpamayo-R1), trained and sampled by flow matching.

A small transformer of the LM's own family (HF decoder layers built from a copy of the LM config with
its own width; no token embedding) turns the noisy action chunk into one token per chunk step (the
action projected and mixed with a sinusoidal flow-time encoding, as pi0's `action_in_proj`). Expert
layer j attends to the cached prefix keys/values of one VLM layer and, bidirectionally, to the chunk's
own tokens; its output is projected back to a velocity. The prefix is computed once per prediction;
each flow step runs only the expert.

The expert keeps the LM's attention geometry (query heads, key/value heads, head_dim, RoPE), so the
VLM's cached keys/values are used as they are, as pi0's action expert does: no per-layer projection
to learn, and nothing between the cache and the expert that could drift from the VLM. Its depth is
one layer per VLM layer that hands over its KV: all of them (pi0, Alpamayo-R1) or the later half
(GR-3's `kv_layers: later`, a half-depth expert).

Flow convention as the `flow` head: noise at t=0, actions at t=1, velocity target actions - noise.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PretrainedConfig

from vlaopt.config import HeadConfig
from vlaopt.model.heads.base import HEADS
from vlaopt.model.heads.mlp import time_embedding
from vlaopt.model.kv_cache import ExpertKV, KVCache
from vlaopt.model.language import call_layer


def kv_layer_map(choice: str, num_layers: int) -> list[int]:
    """VLM attention layers (`layer_idx`) whose KV the expert reads: `all`, or the `later` half."""
    if choice == "all":
        return list(range(num_layers))
    if choice == "later":
        return list(range(num_layers // 2, num_layers))
    raise ValueError(f"head.kv_layers={choice!r} is not supported; expected all or later")


def expert_config(lm_config: PretrainedConfig, width: int, depth: int, mlp: int = 0) -> PretrainedConfig:
    """The expert's HF config: the LM's family, attention geometry and RoPE; its own width, depth and
    MLP width (`mlp`, 0: 4 x width)."""
    cfg = copy.deepcopy(lm_config)
    cfg.head_dim = getattr(lm_config, "head_dim", None) or lm_config.hidden_size // lm_config.num_attention_heads
    cfg.hidden_size = width
    cfg.intermediate_size = mlp or 4 * width
    cfg.num_hidden_layers = depth
    cfg.vocab_size = 1  # the embedding is deleted; no need to allocate the LM's
    cfg.pad_token_id = None  # nor to check the LM's padding id against that one-row table
    cfg.tie_word_embeddings = False
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = ["full_attention"] * depth  # our mask decides what each token sees
    return cfg


def pi0_time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """openpi's sine-cosine embedding of flow times t (B,): periods geometric from `min_period` to
    `max_period` over dim / 2 frequencies (computed in float64, as openpi's)."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = t.double()[:, None] * (2 * math.pi / period)[None]
    return torch.cat([angle.sin(), angle.cos()], dim=-1).float()


class ActionIn(nn.Module):
    """Noisy action of each chunk step plus flow time -> one expert token (pi0's action_in_proj and
    action_time_mlp); `pi0` embeds time with openpi's periods instead of ours."""

    def __init__(self, action_dim: int, width: int, pi0: bool = False) -> None:
        super().__init__()
        self.width = width
        self.pi0 = pi0
        self.action = nn.Linear(action_dim, width)
        self.mix = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, chunk, A), t (B,) -> (B, chunk, width)."""
        a = self.action(x)
        temb = pi0_time_embedding(t, self.width) if self.pi0 else time_embedding(t, self.width)
        return self.mix(torch.cat([a, temb.to(a.dtype)[:, None].expand_as(a)], dim=-1))


@dataclass
class ExpertContext:
    """What every flow step reuses: the cache view, positions after the prefix, RoPE, masks."""

    kv: ExpertKV
    positions: torch.Tensor  # (B, chunk)
    rotary: tuple[torch.Tensor, torch.Tensor]
    masks: list[torch.Tensor]  # per expert layer, (B, 1, T, S_l + T), T expert tokens
    state: torch.Tensor | None = None  # (B, 1, width): the state token (head.state_token)
    local: tuple[torch.Tensor, torch.Tensor] | None = None  # RoPE of positions from 0, for cross-attention layers


def cross_layer(layer: nn.Module, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One SmolVLA cross-attention expert layer: the expert's queries (RoPE at positions from 0)
    attend to the VLM layer's cached post-RoPE keys and values (B, KV, S, hd), each passed through
    the layer's own k/v projection; then the residual and MLP of a decoder layer."""
    attn = layer.self_attn
    b, t, _ = hidden.shape
    hd = attn.head_dim
    h = layer.input_layernorm(hidden)
    q = attn.q_proj(h).view(b, t, -1, hd).transpose(1, 2)
    cos, sin = rotary
    q = q * cos[:, None] + rotate_half(q) * sin[:, None]

    def reproject(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:  # (B, KV, S, hd) -> (B, KV', S, hd)
        s = x.shape[2]
        return proj(x.transpose(1, 2).reshape(b, s, -1)).view(b, s, -1, hd).transpose(1, 2)

    k, v = reproject(attn.k_proj, keys), reproject(attn.v_proj, values)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
    hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def integrate(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, steps: int, scheme: str
) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from t=0 to 1 in `steps` equal steps: `euler` (one velocity
    per step) or `midpoint` (two per step, second-order accurate)."""
    dt = 1.0 / steps
    for i in range(steps):
        t = torch.full((x.shape[0],), i * dt, device=x.device, dtype=x.dtype)
        if scheme == "euler":
            x = x + dt * velocity(x, t)
        elif scheme == "midpoint":
            half = x + dt / 2 * velocity(x, t)
            x = x + dt * velocity(half, t + dt / 2)
        else:
            raise ValueError(f"integrator {scheme!r} is not supported; expected euler or midpoint")
    return x


@HEADS.register("expert")
class ExpertHead(nn.Module):
    """The action expert; see the module docstring. `velocity` is one expert pass over a cache."""

    policy = "expert"
    stochastic = True

    @classmethod
    def build(cls, cfg: HeadConfig, hidden_size: int, action_dim: int, chunk: int,
              lm_config: PretrainedConfig, proprio_dim: int = 0) -> ExpertHead:
        return cls(cfg, action_dim, chunk, lm_config, proprio_dim)

    def __init__(self, cfg: HeadConfig, action_dim: int, chunk: int, lm_config: PretrainedConfig,
                 proprio_dim: int = 0) -> None:
        super().__init__()
        if cfg.state_token and not proprio_dim:
            raise ValueError("head.state_token makes the proprio the expert's first token; the model has proprio_dim=0")
        self.cfg = cfg
        self.action_dim = action_dim
        self.chunk = chunk
        self.vlm_layers = lm_config.num_hidden_layers
        self.layer_map = kv_layer_map(cfg.kv_layers, self.vlm_layers)
        self.expert = AutoModel.from_config(
            expert_config(lm_config, cfg.hidden_dim, len(self.layer_map), cfg.mlp_dim), attn_implementation="sdpa"
        )
        del self.expert.embed_tokens  # inputs come from ActionIn
        self.cross = [j % cfg.self_attn_every != 0 for j in range(len(self.layer_map))]
        kv_width = lm_config.num_key_value_heads * self.expert.config.head_dim
        for layer, cross in zip(self.expert.layers, self.cross):
            if cross:  # SmolVLA: k/v projections read the VLM layer's keys/values, not the expert's states
                bias = layer.self_attn.k_proj.bias is not None
                layer.self_attn.k_proj = nn.Linear(kv_width, layer.self_attn.k_proj.out_features, bias=bias)
                layer.self_attn.v_proj = nn.Linear(kv_width, layer.self_attn.v_proj.out_features, bias=bias)
        self.action_in = ActionIn(action_dim, cfg.hidden_dim, pi0=cfg.convention == "pi0")
        self.action_out = nn.Linear(cfg.hidden_dim, action_dim)
        self.state_in = nn.Linear(proprio_dim, cfg.hidden_dim) if cfg.state_token else None  # pi0's state_proj

    def context(self, cache: KVCache, proprio: torch.Tensor | None = None) -> ExpertContext:
        """Positions, RoPE and masks of the expert tokens over `cache` (and the state token of normalized
        `proprio` (B, P) with `state_token`), computed once per prediction."""
        if len(cache.layers) != self.vlm_layers:
            raise ValueError(
                f"the expert was built for a VLM with {self.vlm_layers} attention layers, but the cache holds "
                f"{len(cache.layers)}; dropping attention layers breaks the expert's pairing with them"
            )
        if (self.state_in is None) != (proprio is None):
            raise ValueError("head.state_token needs the normalized proprio, and only then takes it")
        kv = ExpertKV(cache, self.layer_map)
        tokens = self.chunk + int(self.state_in is not None)
        positions = cache.next_position[:, None] + torch.arange(tokens, device=cache.next_position.device)
        probe = cache.keys[self.layer_map[0]]
        rotary = self.expert.rotary_emb(probe, position_ids=positions)
        own = torch.ones(tokens, tokens, dtype=torch.bool, device=positions.device)
        if self.cfg.causal_actions:  # SmolVLA: each chunk token sees the earlier ones
            own = own.tril()
        if self.state_in is not None:  # pi0: the state sees the prefix and itself; actions see all
            own[0, 1:] = False
        masks = [kv.prefix_mask(j, tokens) if cross else kv.mask(j, tokens, own)
                 for j, cross in enumerate(self.cross)]
        state = None if self.state_in is None else self.state_in(proprio.to(probe.dtype))[:, None]
        # cross-attention queries count their positions from 0 (SmolVLA)
        local = self.expert.rotary_emb(probe, position_ids=positions - positions[:, :1]) if any(self.cross) else None
        return ExpertContext(kv, positions, rotary, masks, state, local)

    def velocity(self, ctx: ExpertContext, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predicted velocity (B, chunk, A) of noisy actions `x` at flow times `t` (B,), in our
        convention (noise at t=0, velocity actions - noise): pi0's network is asked at 1 - t and its
        velocity (noise - actions) negated, which leaves its Euler steps unchanged."""
        pi0 = self.cfg.convention == "pi0"
        hidden = self.action_in(x, 1 - t if pi0 else t)
        if ctx.state is not None:
            hidden = torch.cat([ctx.state, hidden], dim=1)
        for j, layer in enumerate(self.expert.layers):  # the expert's own layers, over the VLM's cache
            if self.cross[j]:
                src = self.layer_map[j]
                hidden = cross_layer(layer, hidden, ctx.kv.cache.keys[src], ctx.kv.cache.values[src], ctx.masks[j],
                                     ctx.local)
            else:
                hidden = call_layer(layer, hidden, ctx.masks[j], ctx.positions, ctx.rotary, ctx.kv)
        out = self.action_out(self.expert.norm(hidden[:, -self.chunk:]))
        return -out if pi0 else out

    def sample(self, cache: KVCache, noise: torch.Tensor, proprio: torch.Tensor | None = None) -> torch.Tensor:
        """Normalized actions (B, chunk, A) from `noise` by `cfg.steps` flow steps over `cache`."""
        ctx = self.context(cache, proprio)
        return integrate(lambda x, t: self.velocity(ctx, x, t), noise, self.cfg.steps, self.cfg.integrator)

    def loss(self, cache: KVCache, actions: torch.Tensor, generator: torch.Generator | None = None,
             proprio: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching loss: velocity error at a uniform random time between noise and `actions`."""
        noise = torch.randn(actions.shape, generator=generator, device=actions.device, dtype=actions.dtype)
        t = torch.rand(actions.shape[0], generator=generator, device=actions.device, dtype=actions.dtype)
        x_t = (1 - t)[:, None, None] * noise + t[:, None, None] * actions
        return ((self.velocity(self.context(cache, proprio), x_t, t) - (actions - noise)) ** 2).mean()
