"""The hook protocol of the layer loop: what a transform between decoder layers may read and write.

A hook runs right before decoder layer `layer` (0 = on the LM input) as `hook(state) -> state`: it
reads the token state entering that layer (hidden states, original position ids, validity, the
Layout) and returns a new one, e.g. with fewer visual tokens. Kept tokens keep their position ids;
the loop rebuilds the mask and the rotary tables from the returned state. A hook that ranks tokens
by attention names the decoder layers it observes in `observed_layers`; while such a layer runs, the
loop hands the hook that layer's post-RoPE queries and keys through `observe_attention`, and the hook
keeps what it computes from them itself. The core state carries nothing method-specific.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
from torch import nn

from vlaopt.model.layout import TokenState


class LayerHook(nn.Module):
    """Base of every hook of the layer loop (see the module docstring); `name` names it in errors."""

    name: ClassVar[str] = "layer"
    merges_tokens: ClassVar[bool] = False
    """True for a hook whose output tokens are not a subset of its input tokens (pooling averages
    them): a token's position then no longer names one input patch."""

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = layer  # runs before this decoder layer; layer removal renumbers it

    def observed_layers(self) -> tuple[int, ...]:
        """Decoder layers whose attention this hook reads (none by default)."""
        return ()

    def observe_attention(
        self, layer: int, state: TokenState, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor,
        scaling: float | None,
    ) -> None:
        """Receive the post-RoPE `query` (B, heads, S, hd) and `key` (B, kv_heads, S, hd), the boolean
        mask and the scaling of observed decoder layer `layer` run on `state` (no gradient flows)."""
        raise NotImplementedError(f"{type(self).__name__} observes layers {self.observed_layers()} but does not "
                                  "implement observe_attention")

    def training_step(self, step: int, total: int) -> None:
        """Called by the trainer before training step `step` of `total`: a hook with a schedule of its
        own follows it (LightVLA decays its score noise); none by default."""

    @abstractmethod
    def forward(self, state: TokenState) -> TokenState:
        """The token state entering decoder layer `layer`."""


def observed_attention(hooks: nn.ModuleList | list[LayerHook]) -> set[int]:
    """Decoder layers whose attention some hook reads (layer removal must keep them)."""
    return {i for hook in hooks for i in hook.observed_layers()}
