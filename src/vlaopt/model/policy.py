"""The policy interface: how a VLA turns the encoded sequence into actions, and its training loss.

Two implementations, chosen once at construction from the head's `policy` name:

- `slots` (this file): OpenVLA-OFT. The sequence ends in chunk x action_dim action slots and STOP;
  the LM runs once and the head (l1, discrete, diffusion, flow) reads the slots' final states.
- `expert` (expert_policy.py): pi0 / GR-3 / Alpamayo-R1. The sequence ends after the prompt; the LM
  fills a KV cache once, may reason, and the action expert refines the chunk over the cache.

Both return normalized actions (B, chunk, action_dim) in [-1, 1]; the VLA unnormalizes them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from vlaopt.model.hooks import LayerHook
from vlaopt.model.kv_cache import KVCache
from vlaopt.model.layout import TokenState
from vlaopt.utils.registry import Registry
from vlaopt.utils.timer import NULL_TIMER, Timer

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA

POLICIES: Registry[type[Policy]] = Registry("policy")


class Policy(ABC):
    """What follows `VLA.encode`: `act` (inference) and `loss` (training) on an encoded token state."""

    @abstractmethod
    def suffix(self, model: VLA) -> tuple[int, int]:
        """(action slots, STOP tokens) this policy appends to [BOS][visual][proprio][prompt]."""

    @abstractmethod
    def act(self, model: VLA, state: TokenState, noise: torch.Tensor | None, seed: int,
            timer: Timer = NULL_TIMER, cache: KVCache | None = None,
            hooks: Sequence[LayerHook] | None = None) -> torch.Tensor:
        """Normalized actions (B, chunk, action_dim); stochastic heads start from `noise` when given,
        else from Gaussian noise drawn with `seed`. A session (model/session.py) passes the `cache`
        the LM pass fills (it may hold keys placed before the pass) and the `hooks` it runs."""

    @abstractmethod
    def loss(self, model: VLA, state: TokenState, actions: torch.Tensor, generator: torch.Generator | None,
             reasoning: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The training loss against normalized target actions (B, chunk, action_dim), and, for a
        policy that reasons, reasoning target ids and their validity (`VLA.reasoning_targets`)."""


def initial_noise(model: VLA, batch: int, noise: torch.Tensor | None, seed: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """`noise` moved to the model's device, or (B, chunk, action_dim) float32 Gaussian noise drawn on
    the CPU (the same numbers on every device) from `generator`, else from a generator seeded `seed`."""
    if noise is None:
        generator = generator or torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn((batch, model.config.chunk, model.config.action_dim), generator=generator)
    return noise.to(model.device)


@POLICIES.register("slots")
class SlotPolicy(Policy):
    """Action slots read by a head after one LM pass (stages `lm`, then `head`)."""

    def suffix(self, model: VLA) -> tuple[int, int]:
        return model.config.num_action_tokens, 1

    def act(self, model: VLA, state: TokenState, noise: torch.Tensor | None, seed: int,
            timer: Timer = NULL_TIMER, cache: KVCache | None = None,
            hooks: Sequence[LayerHook] | None = None) -> torch.Tensor:
        with timer.stage("lm"):
            final = model.lm(state, timer, cache=cache, hooks=hooks)
        with timer.stage("head"):
            batch = state.hidden.shape[0]
            if model.head.stochastic:
                noise = initial_noise(model, batch, noise, seed)
            return model.head.predict(action_hidden(final), model.lm.readout(), noise)

    def loss(self, model: VLA, state: TokenState, actions: torch.Tensor, generator: torch.Generator | None,
             reasoning: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        final = model.lm(state)
        return model.head.loss(action_hidden(final), model.lm.readout(), actions, generator)


def action_hidden(state: TokenState) -> torch.Tensor:
    """Final hidden states at the action slots (B, chunk * action_dim, D)."""
    return state.hidden[:, state.layout.span("action")]
