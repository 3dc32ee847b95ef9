"""LM-stage latency and FLOPs against keep ratio for each visual-token pruning method.

Setting: 2 cameras x 256 patches (224 px, patch 14) into a Llama-style LM; every method and ratio
runs on the same weights and the same encoded inputs, interleaved round by round after warm-up; the
median time is reported, and ratios to the unpruned baseline (and the pruner's share of the LM time)
are medians over rounds of the ratio within each round. Writes JSON.

    python benchmarks/token_pruning.py --out benchmarks/results/token_pruning.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date

import numpy as np
import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table
from torch import nn

from vlaopt import VLA, VLAConfig
from vlaopt.bench.flops import count_flops
from vlaopt.bench.timer import StageTimer
from vlaopt.config import HeadConfig, LMConfig, VisionConfig
from vlaopt.model.tokenizer import BUILTIN_VOCAB_SIZE
from vlaopt.optimize.tokens.base import PRUNERS
from vlaopt.utils.io import atomic_write_text


def bench_model(hidden: int, layers: int, batch: int) -> tuple[VLA, object]:
    """The benchmark VLA and its encoded LM input for `batch` observations."""
    cfg = VLAConfig(
        vision=VisionConfig(kind="siglip", image_size=224, patch_size=14, hidden_size=64, num_layers=1, num_heads=2,
                            intermediate_size=128),
        lm=LMConfig(hf_config={
            "model_type": "llama", "vocab_size": BUILTIN_VOCAB_SIZE, "hidden_size": hidden,
            "intermediate_size": hidden * 3, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
            "num_key_value_heads": max(1, hidden // 128), "head_dim": 64, "tie_word_embeddings": True,
        }),
        head=HeadConfig(kind="l1", hidden_dim=256),
        cameras=2, proprio_dim=8, action_dim=7, chunk=8,
    )
    model = VLA(cfg).eval()
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (batch, 2, 224, 224, 3), dtype=np.uint8))
    proprio = torch.from_numpy(rng.standard_normal((batch, 8)).astype(np.float32))
    instructions = ["put the bowl on the plate and push the block to the goal"] * batch
    with torch.inference_mode():
        state = model.lm_input(images, instructions, proprio)
    return model, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/token_pruning.json")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--fastv-layer", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    model, state = bench_model(args.hidden, args.layers, args.batch)
    settings: list[tuple[str, dict]] = [("baseline", {})]
    for method in ("fastv", "divprune", "pooling", "random"):
        for keep in args.keeps:
            layer = args.fastv_layer if method == "fastv" else 0
            settings.append((method, {"layer": layer, "keep": keep}))
    settings.append(("lightvla", {"layer": 0}))

    def hooks_for(method: str, params: dict) -> nn.ModuleList:
        if method == "baseline":
            return nn.ModuleList()
        cls = PRUNERS.get(method)
        return nn.ModuleList([cls(cls.config_cls(**params), model).eval()])

    hooks = [hooks_for(m, p) for m, p in settings]
    times: list[list[float]] = [[] for _ in settings]
    prune: list[list[float]] = [[] for _ in settings]
    kept: list[int] = []
    flops: list[int] = []
    with torch.inference_mode():
        for h in hooks:
            model.lm.hooks = h
            flops.append(count_flops(lambda: model.lm(state)))
            out = model.lm(state)
            kept.append(int(out.valid[:, out.layout.span("visual")].sum(1).float().mean().round().item()))
        for rnd in track(range(args.warmup + args.repeats), description="timing rounds"):
            for i, h in enumerate(hooks):
                model.lm.hooks = h
                timer = StageTimer()
                t0 = time.perf_counter()
                model.lm(state, timer)
                if rnd >= args.warmup:
                    times[i].append(time.perf_counter() - t0)
                    prune[i].append(timer.result().get("lm.prune", 0.0))

    base_f = flops[0]
    rows = []
    for (method, params), t, p, f, k in zip(settings, times, prune, flops, kept):
        med = statistics.median(t)
        # ratios per round (the baseline ran moments before in the same round), then their median:
        # drifts of a shared machine between rounds cancel
        ratio = statistics.median(x / b for x, b in zip(t, times[0], strict=True))
        lat_saved, flop_saved = 1 - ratio, 1 - f / base_f
        rows.append({
            "method": method, **params, "visual_tokens_in": state.layout.visual, "visual_tokens_kept": k,
            "lm_ms_median": med * 1e3, "lm_ms_min": min(t) * 1e3, "lm_ms_max": max(t) * 1e3,
            "lm_gflops": f / 1e9, "latency_ratio": ratio, "flops_ratio": f / base_f,
            "latency_saved_over_flops_saved": lat_saved / flop_saved if flop_saved > 1e-9 else None,
            "pruner_ms_median": statistics.median(p) * 1e3,
            "pruner_share_of_lm": statistics.median(x / y for x, y in zip(p, t, strict=True)),
        })
    result = {
        "benchmark": "token_pruning", "date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu",
        "setting": {"cameras": 2, "patches_per_camera": 256, "lm_hidden": args.hidden, "lm_layers": args.layers,
                    "batch": args.batch, "sequence_length": state.layout.length, "repeats": args.repeats},
        "rows": rows,
    }
    atomic_write_text(args.out, json.dumps(result, indent=2))
    table = Table(title=f"LM stage, {state.layout.length} tokens, batch {args.batch}, {args.repeats} rounds")
    for col in ("method", "layer", "keep", "kept", "ms", "x base", "FLOPs x base", "lat/FLOP saved", "pruner %"):
        table.add_column(col, justify="right")
    for r in rows:
        eff = r["latency_saved_over_flops_saved"]
        table.add_row(r["method"], str(r.get("layer", "")), str(r.get("keep", "")), str(r["visual_tokens_kept"]),
                      f"{r['lm_ms_median']:.1f}", f"{r['latency_ratio']:.3f}", f"{r['flops_ratio']:.3f}",
                      "" if eff is None else f"{eff:.2f}", f"{100 * r['pruner_share_of_lm']:.1f}")
    Console().print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
