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
from collections.abc import Callable
from dataclasses import dataclass

import torch
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


def expert_config(lm_config: PretrainedConfig, width: int, depth: int) -> PretrainedConfig:
    """The expert's HF config: the LM's family, attention geometry and RoPE; its own width and depth."""
    cfg = copy.deepcopy(lm_config)
    cfg.head_dim = getattr(lm_config, "head_dim", None) or lm_config.hidden_size // lm_config.num_attention_heads
    cfg.hidden_size = width
    cfg.intermediate_size = 4 * width
    cfg.num_hidden_layers = depth
    cfg.vocab_size = 1  # the embedding is deleted; no need to allocate the LM's
    cfg.tie_word_embeddings = False
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = ["full_attention"] * depth  # our mask decides what each token sees
    return cfg


class ActionIn(nn.Module):
    """Noisy action of each chunk step plus flow time -> one expert token (pi0's action_in_proj)."""

    def __init__(self, action_dim: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.action = nn.Linear(action_dim, width)
        self.mix = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, chunk, A), t (B,) -> (B, chunk, width)."""
        a = self.action(x)
        temb = time_embedding(t, self.width).to(a.dtype)[:, None].expand_as(a)
        return self.mix(torch.cat([a, temb], dim=-1))


@dataclass
class ExpertContext:
    """What every flow step reuses: the cache view, positions after the prefix, RoPE, masks."""

    kv: ExpertKV
    positions: torch.Tensor  # (B, chunk)
    rotary: tuple[torch.Tensor, torch.Tensor]
    masks: list[torch.Tensor]  # per expert layer, (B, 1, chunk, S_l + chunk)


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
              lm_config: PretrainedConfig) -> ExpertHead:
        return cls(cfg, action_dim, chunk, lm_config)

    def __init__(self, cfg: HeadConfig, action_dim: int, chunk: int, lm_config: PretrainedConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.action_dim = action_dim
        self.chunk = chunk
        self.vlm_layers = lm_config.num_hidden_layers
        self.layer_map = kv_layer_map(cfg.kv_layers, self.vlm_layers)
        self.expert = AutoModel.from_config(
            expert_config(lm_config, cfg.hidden_dim, len(self.layer_map)), attn_implementation="sdpa"
        )
        del self.expert.embed_tokens  # inputs come from ActionIn
        self.action_in = ActionIn(action_dim, cfg.hidden_dim)
        self.action_out = nn.Linear(cfg.hidden_dim, action_dim)

    def context(self, cache: KVCache) -> ExpertContext:
        """Positions, RoPE and masks of the chunk tokens over `cache`, computed once per prediction."""
        if len(cache.layers) != self.vlm_layers:
            raise ValueError(
                f"the expert was built for a VLM with {self.vlm_layers} attention layers, but the cache holds "
                f"{len(cache.layers)}; dropping attention layers breaks the expert's pairing with them"
            )
        kv = ExpertKV(cache, self.layer_map)
        positions = cache.next_position[:, None] + torch.arange(self.chunk, device=cache.next_position.device)
        probe = cache.keys[self.layer_map[0]]
        rotary = self.expert.rotary_emb(probe, position_ids=positions)
        masks = [kv.mask(j, self.chunk) for j in range(len(self.layer_map))]
        return ExpertContext(kv, positions, rotary, masks)

    def velocity(self, ctx: ExpertContext, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predicted velocity (B, chunk, A) of noisy actions `x` at flow times `t` (B,)."""
        hidden = self.action_in(x, t)
        for j, layer in enumerate(self.expert.layers):  # the expert's own layers, over the VLM's cache
            hidden = call_layer(layer, hidden, ctx.masks[j], ctx.positions, ctx.rotary, ctx.kv)
        return self.action_out(self.expert.norm(hidden))

    def sample(self, cache: KVCache, noise: torch.Tensor) -> torch.Tensor:
        """Normalized actions (B, chunk, A) from `noise` by `cfg.steps` flow steps over `cache`."""
        ctx = self.context(cache)
        return integrate(lambda x, t: self.velocity(ctx, x, t), noise, self.cfg.steps, self.cfg.integrator)

    def loss(self, cache: KVCache, actions: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Flow-matching loss: velocity error at a uniform random time between noise and `actions`."""
        noise = torch.randn(actions.shape, generator=generator, device=actions.device, dtype=actions.dtype)
        t = torch.rand(actions.shape[0], generator=generator, device=actions.device, dtype=actions.dtype)
        x_t = (1 - t)[:, None, None] * noise + t[:, None, None] * actions
        return ((self.velocity(self.context(cache), x_t, t) - (actions - noise)) ** 2).mean()
