"""The language model and our own loop over its decoder layers.

We call the HF decoder layers ourselves (with the rotary `position_embeddings` and a mask we build)
instead of the HF model's forward, so that hooks between layers can drop or merge tokens while the
kept tokens keep their original position ids. Nothing inside `transformers` is patched: the LM runs
on SDPA through an attention function registered with transformers' `AttentionInterface`, which
also hands a layer's post-RoPE queries and keys to a probe when the loop passes one (FastV ranks
tokens by the previous layer's attention without recomputing it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vlaopt.bench.timer import NULL_TIMER
from vlaopt.config import LMConfig
from vlaopt.model.kv_cache import KVCache
from vlaopt.model.layout import TokenState


ATTENTION = "vlaopt_sdpa"


def _sdpa_with_probe(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    attention_probe: Callable[..., None] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention; first hands the post-RoPE queries and keys, the mask and the
    scaling to `attention_probe` when the layer loop passes one."""
    if attention_probe is not None:
        attention_probe(query, key, attention_mask, kwargs.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION, _sdpa_with_probe)


def reads_attention(hook: nn.Module) -> bool:
    """Whether a hook ranks tokens by the attention of the layer before it (FastV)."""
    return getattr(hook, "reads_attention", False)


def probe_arguments(hooks: Iterable[nn.Module], i: int, state: TokenState, timer: Any = NULL_TIMER) -> dict[str, Any]:
    """Extra keyword arguments for decoder layer `i` run on `state`: an `attention_probe` when a hook
    before layer i + 1 reads this layer's attention; it stores the hook's scores in
    `state.received_attention` (timed as `lm.prune`)."""
    readers = [h for h in hooks if h.layer == i + 1 and reads_attention(h)]
    if not readers:
        return {}

    def probe(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, scaling: float | None) -> None:
        with timer.stage("lm.prune"), torch.no_grad():
            state.received_attention = readers[0].score_attention(state, query, key, mask, scaling)

    return {"attention_probe": probe}


def build_hf_config(cfg: LMConfig) -> PretrainedConfig:
    """The HF config of the LM: from `hf_config`, else from the `pretrained` directory."""
    if cfg.hf_config:
        data = dict(cfg.hf_config)
        return AutoConfig.for_model(data.pop("model_type"), **data)
    path = Path(cfg.pretrained or "")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"lm.pretrained={cfg.pretrained!r} is not a local HF model directory (no config.json)")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def build_causal_lm(cfg: LMConfig, load_weights: bool) -> PreTrainedModel:
    """Instantiate the causal LM with SDPA attention (with probes); weights from `pretrained` when asked."""
    if load_weights and cfg.pretrained:
        return AutoModelForCausalLM.from_pretrained(
            cfg.pretrained, local_files_only=True, attn_implementation=ATTENTION, dtype=torch.float32
        )
    return AutoModelForCausalLM.from_config(build_hf_config(cfg), attn_implementation=ATTENTION)


class LanguageModel(nn.Module):
    """A HF causal LM run through our layer loop.

    `hooks` holds modules with an int attribute `layer`; each is called as `hook(state) -> state`
    right before decoder layer `layer` and may rewrite the token state (e.g. prune visual tokens).
    A hook with `reads_attention` also sees the attention of layer `layer - 1` (`probe_arguments`).
    """

    def __init__(self, causal_lm: PreTrainedModel) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        self.hooks = nn.ModuleList()

    @property
    def decoder(self) -> nn.Module:
        return self.causal_lm.model

    @property
    def hidden_size(self) -> int:
        return self.causal_lm.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.causal_lm.get_output_embeddings().weight.shape[0]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(ids)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.causal_lm.get_output_embeddings()(hidden)

    def forward(self, state: TokenState, timer: Any = NULL_TIMER, cache: KVCache | None = None) -> TokenState:
        """Run all decoder layers (and hooks) and the final norm; returns a new final token state.

        Hook time is recorded under the stage `lm.prune` (a part of the caller's `lm` stage). With a
        `cache`, each attention layer appends the keys/values of the tokens it saw (with their
        validity) to it, for the action expert and for decoding."""
        decoder = self.decoder
        state = replace(state)
        rotary = decoder.rotary_emb(state.hidden, position_ids=state.position_ids)
        mask = state.attention_mask()
        for i, layer in enumerate(decoder.layers):
            for hook in self.hooks:
                if hook.layer == i:
                    with timer.stage("lm.prune"):
                        state = hook(state)
                        rotary = decoder.rotary_emb(state.hidden, position_ids=state.position_ids)
                        mask = state.attention_mask()
            if cache is not None:
                cache.expect(state.valid)
            state.hidden = layer(
                state.hidden, attention_mask=mask, position_ids=state.position_ids, position_embeddings=rotary,
                past_key_values=cache, **probe_arguments(self.hooks, i, state, timer),
            )
        state.hidden = decoder.norm(state.hidden)
        return state
