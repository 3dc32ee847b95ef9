"""Benchmark of LM compression: each method at a few strengths, and composite recipes, side by side.

For every recipe: the `lm` stage latency of `predict_action` at batch 1 (recipes interleaved round by
round after a warm-up, median and quartiles), its speed-up over the unoptimized model, the LM's
weights (elements, bytes, non-zero fraction), and the action error against the unoptimized model on
held-out observations. Writes JSON to `--out`.

    python benchmarks/compress_lm.py                          # CPU, the `small` model, all recipes
    python benchmarks/compress_lm.py --device cuda --size large
    python benchmarks/compress_lm.py --size tiny --repeats 1 --warmup 0   # seconds: checks the script runs

The VLA runs in float32 (TF32 matmuls on CUDA). On CUDA a second section times the LM alone in
bfloat16, dense against 2:4 semi-structured weights, since the sparse kernels need half precision.

The model is built from config with random weights unless `--checkpoint` names a saved VLA, so its
action errors measure fidelity to the unoptimized model, not task success. Calibration uses
`--episodes DIR` (a collection from `vla-opt collect`) when given, else synthetic observations.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from vlaopt import VLA, VLAConfig, apply
from vlaopt.bench.machine import machine_info
from vlaopt.bench.models import apply_each, bench_config, lm_config
from vlaopt.bench.stages import CPU, paired_ratio, summarize, time_interleaved
from vlaopt.config import head_config
from vlaopt.model.checkpoint import unique_state, weight_size
from vlaopt.optimize.calibration import random_observations
from vlaopt.optimize.weights.semi_structured import to_semi_structured
from vlaopt.utils.io import atomic_write_text
from vlaopt.utils.timer import StageTimer

SIZES = {  # LM shapes: "small" is a Qwen2-style 8-layer LM for CPUs, "large" a wider one (2048 wide, 0.4 B) for
    # GPUs, "tiny" the small one's depth at an eighth of its width, which runs in seconds (to check the script)
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 8,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
    },
    "small": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
    },
    "large": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 128,
    },
}


def compress_config(size: str) -> VLAConfig:
    """A VLA with one 224 px camera (256 visual tokens), 8 x 7 action slots and the Qwen2-style LM `size`."""
    lm = lm_config("qwen2", max_position_embeddings=2048, **SIZES[size])
    return bench_config(lm, head_config("l1"), cameras=1, vision_width=128, vision_layers=2, action_dim=7, chunk=8)


def recipes(layers: int, calibration: dict[str, Any], device: str) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Name -> (family, recipe). Strengths scale with the LM's depth (a quarter and half of it)."""
    quarter, half = max(1, layers // 4), max(1, layers // 2)
    cal = {"calibration": calibration}
    out: dict[str, tuple[str, list[dict[str, Any]]]] = {"baseline": ("baseline", [])}
    for n in (quarter, half):
        out[f"shortgpt n={n}"] = ("depth", [{"layer_pruning": {"method": "shortgpt", "n": n, **cal}}])
        out[f"attention_drop n={n}"] = ("depth", [{"layer_pruning": {"method": "attention_drop", "n": n, **cal}}])
        out[f"gate_norm n={n}"] = ("depth", [{"layer_pruning": {"method": "gate_norm", "n": n}}])
    for method in ("magnitude", "wanda", "sparsegpt"):
        extra = {} if method == "magnitude" else cal
        out[f"{method} 50%"] = ("sparsity", [{"weight_pruning": {"method": method, "sparsity": 0.5, **extra}}])
        out[f"{method} 2:4"] = ("sparsity", [{"weight_pruning": {"method": method, "pattern": "2:4", **extra}}])
    if device == "cpu":
        out["int8 dynamic"] = ("int8", [{"quantize": {"method": "int8"}}])
    out["int8 weight-only"] = ("int8", [{"quantize": {"method": "int8", "weight_only": True}}])
    out["int4 weight-only"] = ("int4", [{"quantize": {"method": "int4", "group_size": 64}}])
    tokens = {"token_pruning": {"method": "fastv", "layer": 2, "keep": 0.25}}
    pooled = {"token_pruning": {"method": "pooling", "layer": 0, "keep": 0.25}}
    int8 = {"quantize": {"method": "int8", "weight_only": device != "cpu"}}
    shortgpt = {"layer_pruning": {"method": "shortgpt", "n": quarter, **cal}}
    attention = {"layer_pruning": {"method": "attention_drop", "n": half, **cal}}
    out["fastv 25%"] = ("tokens", [tokens])
    out["fastv 25% + shortgpt + int8"] = ("composite", [tokens, shortgpt, int8])
    out["pooling 25% + attention_drop + int8"] = ("composite", [pooled, attention, int8])
    out["fastv 25% + attention_drop + shortgpt + int8"] = ("composite", [tokens, attention, shortgpt, int8])
    return out


def lm_weights(model: VLA) -> dict[str, float]:
    """Elements, bytes and non-zero fraction of the LM's weights (tied tensors once; int8 counted)."""
    elements, size = weight_size(model.lm)
    nonzero = sum(int(t.count_nonzero()) for t in unique_state(model.lm).values())
    return {"lm_params": elements, "lm_bytes": size, "lm_nonzero_fraction": nonzero / elements}


def action_error(model: VLA, reference: torch.Tensor, observations: list) -> dict[str, float]:
    """Errors of the model's actions against the unoptimized model's, in normalized action units."""
    actions = torch.cat([model.predict_action(*obs).cpu() for obs in observations])
    diff = actions - reference
    return {
        "action_mae": diff.abs().mean().item(),
        "action_max_err": diff.abs().max().item(),
        "action_rel_l2": (diff.norm() / reference.norm()).item(),
    }


def _predict(model: VLA, obs: tuple) -> Callable[[StageTimer], Any]:
    return lambda timer: model.predict_action(*obs, timer=timer)


def time_lm(models: dict[str, VLA], obs: tuple, repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """Per model, over `repeats` rounds that each call every model once (after `warmup` rounds): the
    `lm` stage's wall time (median, quartiles), its speed-up over the first model as the median of
    per-round ratios, its thread CPU time (median; CPU runs only) and the whole call's wall time."""
    on_cpu = next(iter(models.values())).device.type == "cpu"
    calls = {name: _predict(model, obs) for name, model in models.items()}
    samples = time_interleaved(calls, repeats, warmup, next(iter(models.values())).device, thread_cpu=on_cpu)
    first = next(iter(samples.values()))
    first_cpu = summarize(first).get("lm" + CPU)
    out = {}
    for name, s in samples.items():
        stats = summarize(s)
        lm = stats["lm"]
        out[name] = {"lm_ms": lm.median_ms, "lm_p25_ms": lm.p25_ms, "lm_p75_ms": lm.p75_ms,
                     "lm_speedup": paired_ratio(first, s, "lm")}
        if on_cpu:
            out[name]["lm_cpu_ms"] = stats["lm" + CPU].median_ms
            out[name]["lm_cpu_speedup"] = first_cpu.median_ms / out[name]["lm_cpu_ms"]
        out[name]["total_ms"] = stats["total"].median_ms
    return out


def _run_lm(lm: torch.nn.Module, state: Any) -> Callable[[StageTimer], Any]:
    def run(timer: StageTimer) -> None:
        with timer.stage("lm"):
            lm(dataclasses.replace(state))

    return run


def semi_structured_section(models: dict[str, VLA], obs: tuple, repeats: int, warmup: int) -> list[dict[str, Any]]:
    """The LM alone in bfloat16 at batch 1 and 8: dense weights against the 2:4-pruned weights of
    each 2:4 recipe, first on dense kernels, then on semi-structured sparse kernels."""
    rows = []
    for batch in (1, 8):
        images, instructions, proprio = obs
        batch_obs = (np.repeat(images, batch, 0), list(instructions) * batch, np.repeat(proprio, batch, 0))
        base = models["baseline"]
        state = base.lm_input(*batch_obs)
        state = dataclasses.replace(state, hidden=state.hidden.to(torch.bfloat16))
        lms = {"dense": copy.deepcopy(base.lm).to(torch.bfloat16)}
        for name in (n for n in models if n.endswith("2:4")):
            lms[f"{name} (dense kernels)"] = copy.deepcopy(models[name].lm).to(torch.bfloat16)
            sparse = copy.deepcopy(models[name].lm).to(torch.bfloat16)
            to_semi_structured(sparse, targets=["causal_lm.model.layers.*"])  # a runtime transform, not a recipe step
            lms[f"{name} (semi-structured)"] = sparse
        reference = lms["dense"](dataclasses.replace(state)).hidden.float()
        calls = {name: _run_lm(lm, state) for name, lm in lms.items()}
        samples = time_interleaved(calls, repeats, warmup, state.hidden.device, description=f"2:4 bf16, batch {batch}")
        lm_ms = {name: summarize(s)["lm"].median_ms for name, s in samples.items()}
        for name, lm in lms.items():
            out = lm(dataclasses.replace(state)).hidden.float()
            rows.append(
                {
                    "name": name,
                    "batch": batch,
                    "lm_ms": lm_ms[name],
                    "lm_speedup": lm_ms["dense"] / lm_ms[name],
                    "hidden_rel_err_vs_dense": ((out - reference).norm() / reference.norm()).item(),
                }
            )
    return rows


def int8_paths_section(base: VLA, obs: tuple, repeats: int, warmup: int) -> dict[str, Any]:
    """CPU int8 paths for the LM's decoder linears, timed side by side: vlaopt's `Int8Linear`
    (torch's x86 quantized engine), torch.ao's `quantize_dynamic` (same kernels, not savable), and
    torchao's W8A8-dynamic and weight-only configs when torchao is installed."""

    def in_layers(module: torch.nn.Module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and fqn.startswith("lm.causal_lm.model.layers.")

    variants: dict[str, VLA] = {"fp32": base}
    ours = copy.deepcopy(base)
    apply(ours, [{"quantize": {"method": "int8"}}])
    variants["vlaopt int8 (quantized.linear_dynamic)"] = ours
    ao = copy.deepcopy(base)
    for layer in ao.lm.decoder.layers:
        torch.ao.quantization.quantize_dynamic(layer, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    variants["torch.ao quantize_dynamic"] = ao
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        torchao = None
    else:
        import torchao

        for label, config in (
            ("W8A8 dynamic", Int8DynamicActivationInt8WeightConfig()),
            ("W8 weight-only", Int8WeightOnlyConfig()),
        ):
            m = copy.deepcopy(base)
            quantize_(m, config, filter_fn=in_layers)
            variants[f"torchao {torchao.__version__} {label}"] = m
    timings = time_lm(variants, obs, repeats, warmup)
    return {
        "torchao": None if torchao is None else torchao.__version__,
        "rows": [{"name": name, **t} for name, t in timings.items()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/compress_lm.json")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--checkpoint", help="a saved VLA to compress instead of a random-weight one")
    parser.add_argument("--episodes", help="calibrate on frames of this episode collection (default: synthetic)")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples")
    parser.add_argument("--eval-samples", type=int, default=16, help="held-out observations for the action error")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--int8-paths", action="store_true", help="also compare the CPU int8 paths (torchao if installed)"
    )
    parser.add_argument("--only", nargs="*", help="run only the recipes whose names contain one of these strings")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    console = Console(stderr=True, width=160)
    model = VLA.from_pretrained(args.checkpoint) if args.checkpoint else VLA(compress_config(args.size)).eval()
    model.to(args.device)  # recipes are applied (and calibrated) where they run
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = model.config
    calibration = {"samples": args.samples, "source": "random"}
    if args.episodes:
        calibration = {"samples": args.samples, "source": "episodes", "path": args.episodes}
    plan = recipes(len(model.lm.decoder.layers), calibration, args.device)
    if args.only:
        plan = {k: v for k, v in plan.items() if k == "baseline" or any(s in k for s in args.only)}
    held_out = random_observations(cfg, args.eval_samples, batch_size=8, seed=1234)
    timing_obs = random_observations(cfg, 1, seed=99)[0]

    models, apply_s = apply_each(model, {name: recipe for name, (_, recipe) in plan.items()})
    rows: dict[str, dict[str, Any]] = {
        name: {"name": name, "family": family, "recipe": models[name].config.recipe, "apply_s": apply_s[name]}
        for name, (family, _) in plan.items()
    }
    with torch.inference_mode():
        reference = torch.cat([models["baseline"].predict_action(*obs).cpu() for obs in held_out])
        for name, m in models.items():
            rows[name].update(lm_weights(m))
            rows[name].update(action_error(m, reference, held_out))
        timings = time_lm(models, timing_obs, args.repeats, args.warmup)
    for name, row in rows.items():
        row.update(timings[name])

    tokens = models["baseline"].lm_input(*timing_obs).hidden.shape[1]
    result = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python", *sys.argv] if argv is None else ["python", __file__, *argv]),
            "machine": machine_info(args.device),
            "device": args.device,
            "threads": torch.get_num_threads(),
            "batch": 1,
            "lm_input_tokens": tokens,
            "model": {
                "checkpoint": args.checkpoint,
                "size": None if args.checkpoint else args.size,
                "lm": {k: v for k, v in cfg.lm.hf_config.items() if k in SIZES["small"]},
            },
            "calibration": calibration,
            "eval_samples": args.eval_samples,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "notes": [
                (
                    "lm_ms: median wall time of the `lm` stage of predict_action at batch 1, recipes interleaved "
                    "round by round; lm_speedup: median over rounds of baseline / recipe wall time in the same round"
                ),
                (
                    "lm_cpu_ms (CPU runs): median CPU time of the thread in the `lm` stage; with one torch thread it "
                    "counts the work alone, not the waits for a core that other jobs on a shared machine cause"
                ),
                "action errors: against the unoptimized model on held-out observations, normalized action units",
                "random-weight model unless checkpoint is set: action errors are fidelity, not task success",
                "unstructured and N:M sparsity run on dense kernels: zeros save no time"
                + ("" if args.device == "cuda" else "; 2:4 sparse kernels exist on CUDA only"),
            ],
        },
        "rows": list(rows.values()),
    }
    if args.device == "cpu" and args.int8_paths:
        with torch.inference_mode():
            result["cpu_int8_paths"] = int8_paths_section(models["baseline"], timing_obs, args.repeats, args.warmup)
    if args.device == "cuda":
        with torch.inference_mode():
            result["cuda_2of4_bf16"] = semi_structured_section(models, timing_obs, args.repeats, args.warmup)
    out = atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")

    table = Table(title=f"LM stage, batch 1, {tokens} tokens, {args.device}, {torch.get_num_threads()} threads")
    columns = ["recipe", "lm ms", "p25-p75", "speed-up", "CPU ms", "CPU speed-up", "LM params M", "LM MB", "nonzero"]
    for col in [*columns, "action MAE", "max err"]:
        table.add_column(col, justify="left" if col == "recipe" else "right")
    for r in rows.values():
        cpu = [f"{r['lm_cpu_ms']:.1f}", f"{r['lm_cpu_speedup']:.2f}x"] if "lm_cpu_ms" in r else ["-", "-"]
        table.add_row(
            r["name"],
            f"{r['lm_ms']:.1f}",
            f"{r['lm_p25_ms']:.1f}-{r['lm_p75_ms']:.1f}",
            f"{r['lm_speedup']:.2f}x",
            *cpu,
            f"{r['lm_params'] / 1e6:.1f}",
            f"{r['lm_bytes'] / 2**20:.0f}",
            f"{r['lm_nonzero_fraction']:.2f}",
            f"{r['action_mae']:.4f}",
            f"{r['action_max_err']:.3f}",
        )
    console.print(table)
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
