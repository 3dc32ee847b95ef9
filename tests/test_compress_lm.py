"""`vla-opt compress-lm`: a bare LM compressed on text, perplexity before and after, written as a plain
transformers directory (a tiny random Llama here; tests/test_gguf.py holds the real-LM checks)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from vlaopt.bench.compress_lm import CompressLMConfig, carrier, decoding
from vlaopt.cli import main
from vlaopt.config import VLAConfig
from vlaopt.data.text import text_windows
from vlaopt.model.language import build_causal_lm
from vlaopt.model.tokenizer import build_builtin_tokenizer


@pytest.fixture
def lm_dir(tmp_path):
    cfg = VLAConfig.tiny().lm
    cfg.hf_config["num_hidden_layers"] = 3
    torch.manual_seed(0)
    build_causal_lm(cfg, load_weights=False).save_pretrained(tmp_path / "lm")
    build_builtin_tokenizer().save_pretrained(tmp_path / "lm")
    text = tmp_path / "prose.txt"
    text.write_text("Every window of this text is read the same way by calibration and evaluation. " * 60,
                    encoding="utf-8")
    return tmp_path / "lm", text


def _run(lm, text, recipe_text, out, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text, encoding="utf-8")
    return main(["compress-lm", "--lm", str(lm), "--recipe", str(recipe), "--calibration-text", str(text),
                 "--out", str(out), "--calibration-windows", "8", "--eval-windows", "4", "--length", "64",
                 "--repeats", "2"])


def test_compress_lm_writes_a_plain_lm_whose_perplexity_is_the_reported_one(lm_dir, tmp_path):
    lm, text = lm_dir
    out = tmp_path / "out"
    (out).mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    assert _run(lm, text, "- layer_pruning: {method: shortgpt, n: 1, calibration: {samples: 8}}\n"
                          "- weight_pruning: {method: wanda, sparsity: 0.5, calibration: {samples: 8}}\n",
                out, tmp_path) == 0
    report = json.loads((out / "compress_lm.json").read_text())
    assert report["exported"] and report["text"]["eval_skip_windows"] == 8  # held out: after calibration
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()) and loaded.config.num_hidden_layers == 2
    held_out = text_windows(build_builtin_tokenizer(), text, 4, 64, skip=8)
    with torch.no_grad():
        theirs = math.exp(loaded(held_out, labels=held_out).loss.item())
    assert report["perplexity"]["compressed"] == pytest.approx(theirs, rel=1e-4)
    assert report["perplexity"]["dense"] != report["perplexity"]["compressed"]
    assert (out / "notes.txt").read_text() == "mine"


def test_compress_lm_int8_writes_the_report_only_and_refuses_other_steps(lm_dir, tmp_path, capsys):
    lm, text = lm_dir
    assert _run(lm, text, "- quantize: {method: int8}\n", tmp_path / "q", tmp_path) == 0
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["compress_lm.json", "manifest.json"]
    assert _run(lm, text, "- token_pruning: {method: fastv, keep: 0.5}\n", tmp_path / "t", tmp_path) == 2
    assert ("compress-lm applies LM steps only (layer_pruning, weight_pruning, smoothquant, quantize); the recipe has "
            "token_pruning") in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_the_timed_decoding_gives_the_window_logits_of_the_full_forward(lm_dir, tmp_path):
    """What compress-lm times as decoding is the LM's real token-by-token path: teacher-forced steps
    over the cache of the window's start give the logits a forward of the whole window gives there;
    and the report carries both regimes."""
    lm, text = lm_dir
    model = carrier(str(lm))
    window = text_windows(model.tokenizer, text, 1, 64)
    with torch.no_grad():
        full = model.lm.text_logits(window)[0, -5:]
        stepped = decoding(model.lm, window, 5)(None)
        assert torch.allclose(stepped, full, atol=1e-5)
        assert torch.equal(decoding(model.lm, window, 5)(None), stepped)  # each call starts from the same cache
    assert _run(lm, text, "- quantize: {method: int4, group_size: 32}\n", tmp_path / "q", tmp_path) == 0
    report = json.loads((tmp_path / "q" / "compress_lm.json").read_text())
    assert report["decode_speedup"] > 0 and set(report["decode_ms_per_token"]) == {"dense", "compressed"}
    with pytest.raises(ValueError, match="compress-lm decode_tokens=64 must be below length=64"):
        CompressLMConfig(str(text), str(text), length=64, decode_tokens=64)
