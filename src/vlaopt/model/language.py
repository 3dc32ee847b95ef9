"""The language model and our own loop over its decoder layers.

We call the HF decoder layers ourselves (with the rotary `position_embeddings` and a mask we build)
instead of the HF model's forward, so that hooks between layers can drop or merge tokens while the
kept tokens keep their original position ids. Nothing inside `transformers` is patched: the LM runs
on SDPA through an attention function registered with transformers' `AttentionInterface`, which
also hands a layer's post-RoPE queries and keys to a probe when the loop passes one (FastV ranks
tokens by the previous layer's attention without recomputing it). `LayerLoop` is the one loop over
the decoder layers: the forward pass, calibration (optimize/calibration.py) and token-by-token
decoding (decode.py) all run it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vlaopt.config import LMConfig
from vlaopt.model.hooks import LayerHook
from vlaopt.model.kv_cache import KVCache
from vlaopt.model.layout import Layout, TokenState
from vlaopt.utils.timer import NULL_TIMER, Timer

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


def pretrained_source(path: str) -> tuple[Path, dict[str, Any]]:
    """Where transformers reads a pretrained LM from: a local HF directory, or a `.gguf` file (its folder
    and `gguf_file=`, which transformers dequantizes to float with the `gguf` package)."""
    p = Path(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"lm.pretrained={path!r}: no such GGUF file")
        return p.parent, {"gguf_file": p.name}
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"lm.pretrained={path!r} is not a local HF model directory (no config.json) "
                                "nor a .gguf file")
    return p, {}


def _plain(config: PretrainedConfig) -> PretrainedConfig:
    """`config` without the GGUF `quantization_config` transformers attaches (the weights are float once
    loaded, and a config carrying it can neither be saved nor rebuilt without the file)."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def build_hf_config(cfg: LMConfig) -> PretrainedConfig:
    """The HF config of the LM: from `hf_config`, else from the `pretrained` directory or GGUF file."""
    if cfg.hf_config:
        data = dict(cfg.hf_config)
        return AutoConfig.for_model(data.pop("model_type"), **data)
    where, kwargs = pretrained_source(cfg.pretrained or "")
    return _plain(AutoConfig.from_pretrained(where, local_files_only=True, **kwargs))


def build_causal_lm(cfg: LMConfig, load_weights: bool) -> PreTrainedModel:
    """Instantiate the causal LM with SDPA attention (with probes); weights from `pretrained` when asked.
    A GGUF LM is rebuilt as a plain float32 model holding the dequantized weights, so it saves and
    reloads like any other."""
    if not (load_weights and cfg.pretrained):
        return AutoModelForCausalLM.from_config(build_hf_config(cfg), attn_implementation=ATTENTION)
    where, kwargs = pretrained_source(cfg.pretrained)
    model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, attn_implementation=ATTENTION,
                                                 dtype=torch.float32, **kwargs)
    if not kwargs:
        return model
    plain = AutoModelForCausalLM.from_config(_plain(model.config), attn_implementation=ATTENTION)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain


def attention_of(layer: nn.Module) -> nn.Module | None:
    """The attention module of a decoder layer, or None where it was dropped (layers/remove.py)."""
    return getattr(layer, "self_attn", None)


def call_layer(
    layer: nn.Module,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    cache: Any = None,
    **attention_kwargs: Any,
) -> torch.Tensor:
    """Run one HF decoder layer: the only place that knows its calling convention. transformers >= 5.24
    takes the cache as `cache=` (`past_key_values=` is deprecated) and calls
    `cache.update(key, value, layer_idx, kwargs=...)`; tests/test_language.py pins both."""
    return layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary, cache=cache,
                 **attention_kwargs)


@dataclass
class LayerInput:
    """What decoder layer `index` receives: the token state entering it, its mask and rotary tables."""

    index: int
    state: TokenState
    mask: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor]

    def run(self, module: nn.Module, **attention_kwargs: Any) -> torch.Tensor:
        """The output of `module` (this decoder layer, or a variant of it) on this input, without a cache."""
        return call_layer(module, self.state.hidden, self.mask, self.state.position_ids, self.rotary,
                          **attention_kwargs)


class LayerLoop:
    """The one loop over the decoder layers, shared by the forward pass, calibration and decoding.

    Iterating yields each layer's `LayerInput` right before the layer runs, so a consumer may change
    the layer first (sequential calibration); resuming runs it. Before layer i the hooks at i rewrite
    the state (then mask and rotary tables are rebuilt); a layer whose attention a hook observes gets
    an `attention_probe`. With a `cache`, each attention layer appends the keys/values of the tokens
    it sees (with their validity and positions) and attends causally to what the cache already holds
    for it. `state` is the
    current token state (after the last layer once the loop is exhausted; the final norm is not
    applied)."""

    def __init__(
        self, lm: LanguageModel, state: TokenState, cache: KVCache | None = None,
        hooks: Sequence[LayerHook] | None = None, timer: Timer = NULL_TIMER,
    ) -> None:
        self.lm, self.cache, self.timer = lm, cache, timer
        self.hooks = list(lm.hooks if hooks is None else hooks)
        self.state = replace(state)

    def __iter__(self) -> Iterator[LayerInput]:
        decoder = self.lm.decoder
        state = self.state
        mask, rotary = state.attention_mask(), self.lm.rotary(state)
        for i, layer in enumerate(decoder.layers):
            at_layer = [hook for hook in self.hooks if hook.layer == i]
            if at_layer:
                with self.timer.stage("lm.prune"):
                    for hook in at_layer:
                        state = hook(state)
                    mask = state.attention_mask()
                    rotary = self.lm.rotary(state)
                self.state = state
            yield LayerInput(i, state, mask, rotary)
            attention = attention_of(layer)
            layer_mask = mask
            if self.cache is not None:
                self.cache.expect(state.valid, state.position_ids)
                if attention is not None:
                    layer_mask = self.cache.with_past(attention.layer_idx, mask, state.position_ids)
            state.hidden = call_layer(layer, state.hidden, layer_mask, state.position_ids, rotary, self.cache,
                                      **self._probe(i, state))

    def _probe(self, i: int, state: TokenState) -> dict[str, Any]:
        """`attention_probe` for layer i when hooks observe its attention (timed as `lm.prune`) or the
        cache has an `observer` (KV-cache compression that ranks keys by attention)."""
        observers = [hook for hook in self.hooks if i in hook.observed_layers()]
        attention = attention_of(self.lm.decoder.layers[i])
        watch = None if self.cache is None or attention is None else self.cache.observer
        if not observers and watch is None:
            return {}

        def probe(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, scaling: float | None) -> None:
            if watch is not None:  # the cache's own observer (H2O scores), over all its keys of this layer
                with torch.no_grad():
                    watch(attention.layer_idx, query, key, mask, scaling, state.valid)
            if not observers:
                return
            with self.timer.stage("lm.prune"), torch.no_grad():
                for hook in observers:
                    hook.observe_attention(i, state, query, key, mask, scaling)

        return {"attention_probe": probe}

    def run(self) -> TokenState:
        """Run every layer; the state after the last one (before the final norm)."""
        for _ in self:
            pass
        return self.state


class LanguageModel(nn.Module):
    """A HF causal LM run through our layer loop (`LayerLoop`).

    `hooks` holds `LayerHook`s (model/hooks.py); each runs right before decoder layer `hook.layer`
    and may rewrite the token state (e.g. prune visual tokens).
    """

    def __init__(self, causal_lm: PreTrainedModel) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        self.hooks = nn.ModuleList()
        self._rotary_table: tuple[tuple[Any, ...], torch.Tensor, torch.Tensor] | None = None

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
        """Token embeddings as the first decoder layer takes them (Gemma's embedding module scales them
        by sqrt(hidden_size) itself; the VLA's image tokens bypass it, as in PaliGemma)."""
        return self.decoder.embed_tokens(ids)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.causal_lm.get_output_embeddings()(hidden)

    def rotary(self, state: TokenState) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary (cos, sin) tables at the state's position ids. For a RoPE whose frequencies do not
        depend on the sequence (every type but dynamic and longrope) they are gathered from a table
        computed once for positions 0..max (the same values: each entry is one product); eagerly only,
        since a compiled graph fuses the computation anyway."""
        rotary_emb = self.decoder.rotary_emb
        rope_type = getattr(rotary_emb, "rope_type", None)
        positions = state.position_ids
        if (torch.compiler.is_compiling() or not isinstance(rope_type, str) or "dynamic" in rope_type
                or rope_type == "longrope"):
            return rotary_emb(state.hidden, position_ids=positions)
        x = state.hidden
        key = (x.device, x.dtype, rotary_emb.inv_freq.data_ptr())
        needed = int(positions.max()) + 1
        if self._rotary_table is None or self._rotary_table[0] != key or len(self._rotary_table[1]) < needed:
            length = max(needed, getattr(self.causal_lm.config, "max_position_embeddings", 0) or 0)
            all_positions = torch.arange(length, device=x.device)[None]
            cos, sin = rotary_emb(x[:1, :1], position_ids=all_positions)
            self._rotary_table = (key, cos[0], sin[0])
        _, cos, sin = self._rotary_table
        return F.embedding(positions, cos), F.embedding(positions, sin)  # a row gather, faster than indexing

    def readout(self) -> torch.Tensor:
        """The output-embedding matrix (V, D), which heads that read logits use."""
        return self.causal_lm.get_output_embeddings().weight

    def text_state(self, ids: torch.Tensor, valid: torch.Tensor | None = None) -> TokenState:
        """Plain (right-padded) text ids (B, L) as a token state of one causal prompt segment."""
        if ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"token id {bad} is outside the LM's vocabulary of {self.vocab_size} ids")
        valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid
        layout = Layout(visual=0, proprio=0, prompt=ids.shape[1], action=0, bos=0, stop=0)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        return TokenState(self.embed(ids), positions, valid, layout, bidirectional_actions=False)

    def text_logits(self, ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits (B, L, V) of plain text through our layer loop (without the VLA's hooks)."""
        state = LayerLoop(self, self.text_state(ids, valid), hooks=[]).run()
        return self.lm_head(self.decoder.norm(state.hidden))

    def forward(self, state: TokenState, timer: Timer = NULL_TIMER, cache: KVCache | None = None,
                hooks: Sequence[LayerHook] | None = None) -> TokenState:
        """Run all decoder layers (and hooks: the model's own unless `hooks` is given) and the final
        norm; returns a new final token state.

        Hook time is recorded under the stage `lm.prune` (a part of the caller's `lm` stage). With a
        `cache`, each attention layer appends the keys/values of the tokens it saw (with their
        validity and positions) to it, for the action expert, for decoding and for a session's next
        step."""
        state = LayerLoop(self, state, cache, hooks, timer=timer).run()
        state.hidden = self.decoder.norm(state.hidden)
        return state
