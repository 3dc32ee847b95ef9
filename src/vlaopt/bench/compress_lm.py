"""Compressing a bare causal LM (`vla-opt compress-lm`, `compress_lm`): the LM steps of a recipe
(`layer_pruning`, `weight_pruning`, `smoothquant`, `quantize`) calibrated on text, perplexity on
held-out text before and after, the LM's time before and after (interleaved rounds, ratio per round)
in both regimes: the forward of one window (a prompt: compute-bound) and token-by-token decoding
after it (`decode_tokens` steps over a KV cache of the window: memory-bound, where weight-only
quantization pays), and the result as a plain transformers directory
(`optimize.layers.export.to_hf`; a quantized LM has no such form, so only the report is written).

The LM rides in a VLA whose vision encoder and head are never run: the recipe machinery, calibration and
the layer loop are the ones a VLA's LM gets. Held-out text: when the evaluation file is the calibration
file, its windows start after the calibration windows.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vlaopt.bench.stages import paired_ratio, summarize, time_interleaved
from vlaopt.config import LMConfig, VLAConfig
from vlaopt.data.text import text_windows
from vlaopt.eval.perplexity import perplexity
from vlaopt.model.checkpoint import replace_files
from vlaopt.model.decode import decode_step, feed
from vlaopt.model.kv_cache import KVCache
from vlaopt.model.language import LanguageModel
from vlaopt.model.pretrained import resolve_lm
from vlaopt.model.vla import VLA
from vlaopt.optimize.layers.export import to_hf
from vlaopt.optimize.recipe import apply, load_recipe
from vlaopt.utils.checks import check_positive
from vlaopt.utils.io import atomic_write_text

LM_STEPS = ("layer_pruning", "weight_pruning", "smoothquant", "quantize")
REPORT_FILE = "compress_lm.json"


@dataclasses.dataclass
class CompressLMConfig:
    """Where the text comes from and how much of it: `calibration_windows` and `eval_windows` windows
    of `length` tokens; `repeats` timing rounds of one window's forward and of `decode_tokens` decoding
    steps after it, after `warmup` dropped rounds."""

    calibration_text: str
    eval_text: str
    calibration_windows: int = 32
    eval_windows: int = 16
    length: int = 256
    repeats: int = 10
    warmup: int = 2
    decode_tokens: int = 16

    def __post_init__(self) -> None:
        check_positive(self, "compress-lm ", "calibration_windows", "eval_windows", "length", "repeats",
                       "decode_tokens")
        if self.decode_tokens >= self.length:
            raise ValueError(f"compress-lm decode_tokens={self.decode_tokens} must be below length={self.length}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"compress-lm warmup={self.warmup!r} must be a non-negative integer")


def carrier(lm: str) -> VLA:
    """A VLA around the pretrained LM at `lm` (a HF directory, a .gguf file, or a shipped LM's name such
    as `smollm2`: model/pretrained.py)."""
    return VLA(dataclasses.replace(VLAConfig.tiny(), lm=LMConfig(pretrained=resolve_lm(lm)))).eval()


def decoding(lm: LanguageModel, window: torch.Tensor, tokens: int) -> Callable[[Any], torch.Tensor]:
    """A call that decodes the last `tokens` ids of `window` (1, L) one at a time (teacher-forced)
    over a KV cache filled once with the ids before them, and returns each step's logits (tokens, V);
    each call starts from that cache."""
    prompt, fed = window[:, :-tokens], window[0, -tokens:]
    cache = KVCache()
    cache.next_position = torch.zeros(1, dtype=torch.long)
    feed(lm, cache, prompt, torch.ones_like(prompt, dtype=torch.bool))
    one = torch.ones(1, dtype=torch.bool)

    def call(_: Any) -> torch.Tensor:
        own = cache.fork(cache.layers)
        return torch.cat([decode_step(lm, own, token[None], one) for token in fed])

    return call


def compress_lm(lm: str | VLA, recipe: str | Path | list[Any], cfg: CompressLMConfig,
                out: str | Path | None = None, dense_perplexity: float | None = None) -> dict[str, Any]:
    """Compress the LM at `lm` (or a carrier VLA already built) with `recipe`; returns the report and,
    with `out`, writes it and the compressed LM (plain transformers files, unless quantized) into
    `out`. `dense_perplexity`, from an earlier report on the same LM and text, saves recomputing it."""
    steps = load_recipe(recipe)
    for entry in steps:
        (kind,) = entry
        if kind not in LM_STEPS:
            raise ValueError(f"compress-lm applies LM steps only ({', '.join(LM_STEPS)}); the recipe has {kind}")
    dense = carrier(lm) if isinstance(lm, str) else lm
    tokenizer = dense.tokenizer
    calibration = text_windows(tokenizer, cfg.calibration_text, cfg.calibration_windows, cfg.length)
    same = Path(cfg.eval_text).resolve() == Path(cfg.calibration_text).resolve()
    held_out = text_windows(tokenizer, cfg.eval_text, cfg.eval_windows, cfg.length,
                            skip=cfg.calibration_windows if same else 0)
    model = apply(copy.deepcopy(dense), steps, calibration=list(calibration.split(8)))
    one = held_out[:1]
    with torch.no_grad():
        samples = time_interleaved({"dense": lambda _: dense.lm.text_logits(one),
                                    "compressed": lambda _: model.lm.text_logits(one),
                                    "dense decoding": decoding(dense.lm, one, cfg.decode_tokens),
                                    "compressed decoding": decoding(model.lm, one, cfg.decode_tokens)},
                                   cfg.repeats, warmup=cfg.warmup, description="timing rounds")
    ms = {name: summarize(s)["total"].median_ms for name, s in samples.items()}
    report = {
        "lm": str(lm) if isinstance(lm, str) else "(given)",
        "recipe": model.config.recipe,
        "text": {**dataclasses.asdict(cfg), "eval_skip_windows": cfg.calibration_windows if same else 0},
        "perplexity": {"dense": perplexity(dense.lm, held_out) if dense_perplexity is None else dense_perplexity,
                       "compressed": perplexity(model.lm, held_out)},
        "forward_ms": {"dense": ms["dense"], "compressed": ms["compressed"]},
        "speedup": 1 / paired_ratio(samples["compressed"], samples["dense"]),
        "decode_ms_per_token": {"dense": ms["dense decoding"] / cfg.decode_tokens,
                                "compressed": ms["compressed decoding"] / cfg.decode_tokens},
        "decode_speedup": 1 / paired_ratio(samples["compressed decoding"], samples["dense decoding"]),
        "threads": torch.get_num_threads(),
        "exported": not any("quantize" in e for e in steps),
    }
    if out is not None:
        def write(staging: Path) -> None:
            if report["exported"]:
                to_hf(model.lm).save_pretrained(staging)
                tokenizer.save_pretrained(staging)
            atomic_write_text(staging / REPORT_FILE, json.dumps(report, indent=2))

        replace_files(out, write)
    return report
