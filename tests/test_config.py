"""Configs round-trip through JSON and YAML and reject bad values by name."""

from __future__ import annotations

import pytest

from vlaopt import VLAConfig
from vlaopt.config import VisionConfig
from vlaopt.model.layout import Layout


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path, suffix):
    cfg = VLAConfig.tiny(lm="qwen3", head="flow", vision="fused", cameras=2, proprio_dim=5, seed=7)
    cfg.save(tmp_path / f"c{suffix}")
    assert VLAConfig.load(tmp_path / f"c{suffix}") == cfg


def test_unknown_choices_are_named():
    with pytest.raises(KeyError, match=r"unknown action head 'mlp'; expected one of diffusion, discrete, expert, flow, l1"):
        VLAConfig.tiny(head="mlp")
    with pytest.raises(ValueError, match=r"lm='gpt2' is not supported; expected one of llama, qwen2, qwen3"):
        VLAConfig.tiny(lm="gpt2")
    with pytest.raises(ValueError, match=r"vision.image_size=30 must be a multiple of vision.patch_size=8"):
        VisionConfig(image_size=30, patch_size=8)


def test_unknown_keys_are_named():
    data = VLAConfig.tiny().to_dict()
    data["head"]["stepz"] = 3
    with pytest.raises(ValueError, match=r"unknown l1 head parameter\(s\) \['stepz'\]"):
        VLAConfig.from_dict(data)


def test_layout_spans_tile_the_sequence():
    layout = Layout(visual=10, proprio=1, prompt=6, action=8)
    spans = [layout.span(s) for s in ("bos", "visual", "proprio", "prompt", "action", "stop")]
    assert spans[0].start == 0 and spans[-1].stop == layout.length == 27
    assert all(a.stop == b.start for a, b in zip(spans, spans[1:]))
    assert layout.with_visual(3).span("action") == slice(11, 19)  # 1 + 3 + 1 + 6


def test_the_builtin_vocabulary_size_matches_the_builtin_tokenizer():
    from vlaopt.config import BUILTIN_VOCAB_SIZE
    from vlaopt.model.tokenizer import build_builtin_tokenizer

    assert len(build_builtin_tokenizer()) == BUILTIN_VOCAB_SIZE == VLAConfig.tiny().lm.hf_config["vocab_size"]


def test_head_configs_come_from_one_registry_shared_with_the_heads():
    from vlaopt.config import HEAD_CONFIGS
    from vlaopt.model.heads import HEADS

    assert HEAD_CONFIGS.names() == HEADS.names() == ["diffusion", "discrete", "expert", "flow", "l1"]
    for kind in HEAD_CONFIGS.names():
        cfg = VLAConfig.tiny(head=kind)
        assert type(cfg.head) is HEAD_CONFIGS.get(kind) and VLAConfig.from_dict(cfg.to_dict()) == cfg


def test_a_flat_head_config_saved_before_per_head_configs_still_loads():
    """Older config.json files list every head's fields; those a head lacks are dropped at their old
    defaults (they had no effect), anything else is refused by name."""
    from vlaopt.config import L1HeadConfig

    flat = {"kind": "l1", "hidden_dim": 128, "num_blocks": 3, "steps": 10, "train_timesteps": 100, "bins": 256,
            "kv_layers": "all", "integrator": "euler", "reasoning_tokens": 0, "temperature": 0.0, "top_p": 1.0,
            "trajectory": "flow"}
    data = VLAConfig.tiny().to_dict()
    data["head"] = flat
    assert VLAConfig.from_dict(data).head == L1HeadConfig(hidden_dim=128, num_blocks=3)
    data["head"] = {**flat, "kv_layers": "later"}
    with pytest.raises(ValueError, match=r"unknown l1 head parameter\(s\) \['kv_layers'\]"):
        VLAConfig.from_dict(data)
