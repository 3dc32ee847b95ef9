"""A compressed LM as a plain transformers model, which `AutoModelForCausalLM.from_pretrained` loads
strictly and whose own forward gives vla-opt's logits.

transformers' decoder models run `config.num_hidden_layers` full layers, each with its attention, so:
removed blocks (ShortGPT) are simply absent (the remaining ones renumbered), and a layer whose
attention sublayer was dropped (attention_drop, gate_norm) keeps an attention whose weights are all
zero. Its output is then exactly zero (no bias reaches it: o_proj's input is a mix of zero values),
so the residual stream is the same as in our `MLPOnlyLayer`, bit for bit, at the price of computing
that attention in transformers' forward (our loop skips it). Zeroed weights (Wanda, SparseGPT, 2:4)
are stored as they are; int8 linears have no plain-transformers form and are refused.
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from vlaopt.model.language import LanguageModel
from vlaopt.optimize.layers.remove import has_attention


def to_hf(lm: LanguageModel) -> PreTrainedModel:
    """A new plain transformers causal LM (SDPA attention) equal to `lm`'s layer loop without hooks;
    refuses a layer whose weights a fresh transformers layer cannot hold (e.g. int8 linears)."""
    layers = lm.decoder.layers
    config = copy.deepcopy(lm.causal_lm.config)
    types = getattr(config, "layer_types", None)
    if types is not None:
        config.layer_types = [types[layer.self_attn.layer_idx] if has_attention(layer) else "full_attention"
                              for layer in layers]
    config.num_hidden_layers = len(layers)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=lm.readout().dtype)
    state = {k: v for k, v in lm.causal_lm.state_dict().items() if ".layers." not in k}
    for i, layer in enumerate(layers):
        target = hf.model.layers[i]
        if not has_attention(layer):
            with torch.no_grad():
                for p in target.self_attn.parameters():
                    p.zero_()
        own, fresh = layer.state_dict(), target.state_dict()
        expected = set(fresh) if has_attention(layer) else {
            k for k in fresh if not k.startswith(("self_attn.", "input_layernorm."))}
        if set(own) != expected:
            odd = sorted(set(own) ^ expected)[:4]
            raise ValueError(f"decoder layer {i} holds weights a plain transformers layer has not (or lacks some): "
                             f"{odd}; export the LM before quantizing it")
        state.update({f"model.layers.{i}.{k}": own.get(k, v) for k, v in fresh.items()})
    hf.load_state_dict(state, strict=True)
    hf.tie_weights()
    return hf.eval()
