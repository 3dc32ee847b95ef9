"""The layer loop against transformers' own interfaces: what our cache receives from its decoder
layers, and that we call them without deprecated arguments (pins the calling convention of 5.24)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from conftest import observations
from transformers import DynamicCache

from vlaopt import VLA, VLAConfig
from vlaopt.config import LMConfig
from vlaopt.model.kv_cache import KVCache
from vlaopt.model.language import LayerLoop, call_layer

FAMILIES = ["llama", "qwen2", "qwen3", "gemma"]


@pytest.mark.parametrize("family", FAMILIES)
def test_our_cache_receives_what_transformers_dynamic_cache_receives(family):
    """A HF decoder layer called the way our loop calls it fills our cache with exactly the keys and
    values it hands transformers' DynamicCache; a renamed cache argument or a changed update call
    would leave ours empty or fail."""
    model = VLA(VLAConfig.tiny(lm=family, cameras=2, proprio_dim=4)).eval()
    state = model.lm_input(*observations(model.config, batch=2))
    decoder = model.lm.decoder
    rotary = decoder.rotary_emb(state.hidden, position_ids=state.position_ids)
    mask = state.attention_mask()
    ours, reference = KVCache(), DynamicCache()
    ours.expect(state.valid, state.position_ids)
    with torch.no_grad():
        for i, layer in enumerate(decoder.layers):
            a = call_layer(layer, state.hidden, mask, state.position_ids, rotary, ours)
            b = call_layer(layer, state.hidden, mask, state.position_ids, rotary, reference)
            torch.testing.assert_close(a, b, atol=0, rtol=0)
            torch.testing.assert_close(ours.keys[i], reference.layers[i].keys, atol=0, rtol=0)
            torch.testing.assert_close(ours.values[i], reference.layers[i].values, atol=0, rtol=0)
    assert ours.layers == list(range(len(decoder.layers)))


@pytest.mark.parametrize("head", ["l1", "expert"])
def test_the_layer_loop_uses_no_deprecated_transformers_argument(head):
    cfg = VLAConfig.tiny(head=head, cameras=2, proprio_dim=4)
    if head == "expert":
        cfg.head.reasoning_tokens = 3
    model = VLA(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        model.predict_action(*observations(cfg, batch=2))


def test_the_loop_yields_each_layer_input_before_running_it():
    """Consumers see layer i's input before layer i runs, and a change made to layer i then reaches
    layer i + 1 (what sequential calibration relies on)."""
    model = VLA(VLAConfig.tiny(cameras=2, proprio_dim=4)).eval()
    state = model.lm_input(*observations(model.config, batch=2))
    seen = []
    with torch.no_grad():
        for inp in LayerLoop(model.lm, state):
            seen.append(inp.state.hidden.clone())
            if inp.index == 0:
                model.lm.decoder.layers[0].mlp.down_proj.weight.zero_()
        layer = model.lm.decoder.layers[0]
        layer0 = seen[0]
        attended = layer.self_attn(layer.input_layernorm(layer0), position_embeddings=inp.rotary,
                                   attention_mask=inp.mask)[0]
    torch.testing.assert_close(seen[1], layer0 + attended, atol=1e-6, rtol=0)  # the MLP adds nothing now


@pytest.mark.parametrize("family", FAMILIES)
def test_rotary_tables_gathered_from_the_cache_equal_transformers_own(family):
    """The cached table gives bit-identical cos/sin, at contiguous and at pruned (gapped) positions."""
    model = VLA(VLAConfig.tiny(lm=family, cameras=2, proprio_dim=3)).eval()
    state = model.lm_input(*observations(model.config, 2))
    gapped = state.position_ids[:, ::3]
    for positions in (state.position_ids, gapped, gapped + 5):
        state.position_ids = positions
        state.hidden = state.hidden[:, : positions.shape[1]]
        expected = model.lm.decoder.rotary_emb(state.hidden, position_ids=positions)
        for got, want in zip(model.lm.rotary(state), expected, strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_the_cached_attention_mask_equals_the_mask_built_row_by_row(bidirectional):
    model = VLA(VLAConfig.tiny(cameras=2, proprio_dim=3)).eval()
    state = model.lm_input(*observations(model.config, 3))  # prompts of different lengths: padding
    state.bidirectional_actions = bidirectional
    rows = torch.arange(state.hidden.shape[1])
    for _ in range(2):  # built, then from the cache
        assert torch.equal(state.attention_mask(), state.attention_mask(rows))


def test_a_missing_gguf_file_is_named(tmp_path):
    missing = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError, match=rf"^lm.pretrained='{missing}': no such GGUF file"):
        VLA(dataclasses.replace(VLAConfig.tiny(), lm=LMConfig(pretrained=str(missing))))


@pytest.mark.parametrize("family", FAMILIES)
def test_our_layer_loop_gives_transformers_own_logits(family):
    """Text through our loop (embedding scale, masks, rotary, final norm) equals the HF model's forward,
    for every supported family (Gemma scales its embeddings by sqrt(hidden_size))."""
    model = VLA(VLAConfig.tiny(lm=family)).eval()
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.lm.text_logits(ids), model.lm.causal_lm(ids).logits, atol=1e-5, rtol=1e-5)
