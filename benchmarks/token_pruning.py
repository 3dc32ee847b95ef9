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
import sys
from datetime import date
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from vlaopt import VLA
from vlaopt.bench.flops import count_flops
from vlaopt.bench.machine import machine_info
from vlaopt.bench.models import apply_each, bench_config, bench_inputs, llama_shape, lm_config
from vlaopt.bench.stages import paired_ratio, summarize, time_interleaved
from vlaopt.config import head_config
from vlaopt.model.layout import TokenState
from vlaopt.utils.io import atomic_write_text


def bench_model(hidden: int, layers: int, batch: int) -> tuple[VLA, TokenState]:
    """The benchmark VLA and its encoded LM input for `batch` observations."""
    lm = lm_config("llama", **llama_shape(hidden, layers, kv_heads=max(1, hidden // 128)))
    cfg = bench_config(lm, head_config("l1", hidden_dim=256), cameras=2, vision_width=64, vision_layers=1,
                       action_dim=7, chunk=8)
    model = VLA(cfg).eval()
    with torch.inference_mode():
        state = model.lm_input(*bench_inputs(cfg, batch))
    return model, state


def settings(keeps: list[float], fastv_layer: int) -> list[tuple[str, dict[str, Any]]]:
    """(method, pruner parameters) of every row: the baseline, each method at each keep ratio, LightVLA."""
    out: list[tuple[str, dict[str, Any]]] = [("baseline", {})]
    for method in ("fastv", "divprune", "pooling", "random"):
        for keep in keeps:
            out.append((method, {"layer": fastv_layer if method == "fastv" else 0, "keep": keep}))
    out.append(("lightvla", {"layer": 0}))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/token_pruning.json")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--fastv-layer", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    model, state = bench_model(args.hidden, args.layers, args.batch)
    rows_in = settings(args.keeps, args.fastv_layer)
    recipes = {" ".join([method, *(f"{k}={v}" for k, v in params.items())]):
               [{"token_pruning": {"method": method, **params}}] if params else [] for method, params in rows_in}
    models, _ = apply_each(model, recipes, share_weights=True)  # pruners only: every row runs on the same weights
    kept: list[int] = []
    flops: list[int] = []
    with torch.inference_mode():
        for m in models.values():
            flops.append(count_flops(lambda m=m: m.lm(state)))
            out = m.lm(state)
            kept.append(int(out.valid[:, out.layout.span("visual")].sum(1).float().mean().round().item()))
        calls = {name: (lambda timer, m=m: m.lm(state, timer)) for name, m in models.items()}
        samples = time_interleaved(calls, args.repeats, args.warmup)

    base_f = flops[0]
    base = samples[next(iter(recipes))]
    rows = []
    for (method, params), s, f, k in zip(rows_in, samples.values(), flops, kept, strict=True):
        t = [x["total"] for x in s]
        # ratios per round (the baseline ran moments before in the same round), then their median:
        # drifts of a shared machine between rounds cancel
        ratio = paired_ratio(s, base)
        lat_saved, flop_saved = 1 - ratio, 1 - f / base_f
        stats = summarize(s)
        prune = stats.get("lm.prune")
        rows.append({
            "method": method, **params, "visual_tokens_in": state.layout.visual, "visual_tokens_kept": k,
            "lm_ms_median": stats["total"].median_ms, "lm_ms_min": min(t) * 1e3, "lm_ms_max": max(t) * 1e3,
            "lm_gflops": f / 1e9, "latency_ratio": ratio, "flops_ratio": f / base_f,
            "latency_saved_over_flops_saved": lat_saved / flop_saved if flop_saved > 1e-9 else None,
            "pruner_ms_median": 0.0 if prune is None else prune.median_ms,
            "pruner_share_of_lm": paired_ratio(s, s, "lm.prune", "total"),
        })
    result = {
        "benchmark": "token_pruning", "date": date.today().isoformat(), "machine": machine_info("cpu"),
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
    console = Console()
    console.print(table)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
