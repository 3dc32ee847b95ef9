"""Side-by-side benchmark of optimization recipes on one model and identical inputs.

Every recipe is applied to its own copy of the model; timing rounds interleave the recipes (one
`predict_action` each per round, after warm-up) so machine drift hits all of them alike; medians
and ratios to the baseline come from the same run. Each row also carries per-stage FLOPs, the
fraction of the device's measured matmul throughput each stage reaches, parameters, weight memory,
visual tokens in and out, and the open-loop action error against the baseline's actions and, where
held-out demonstrations are given, against the demonstrated actions. Recipe steps that calibrate on
data (`source: given`) get the held-out observations (or the timing inputs when there are none).
With `success` set, each recipe's model also runs closed-loop episodes (`vlaopt.eval`) from the same
initial states, for a success column.
"""

from __future__ import annotations

import copy
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

import torch
from rich.progress import track

from vlaopt.bench.flops import FlopRecorder
from vlaopt.bench.machine import matmul_throughput
from vlaopt.bench.stages import summarize, time_once
from vlaopt.model.checkpoint import weight_size
from vlaopt.optimize import apply, calibration
from vlaopt.utils.checks import check_positive

# Stages in pipeline order: OFT-style heads run "lm" then "head"; expert heads run the VLM as a cached
# "prefix", optionally decode "reasoning", then "flow" steps (or an autoregressive "trajectory").
STAGES = ("inputs", "vision", "projector", "lm", "prefix", "reasoning", "head", "flow", "trajectory")


@dataclass
class BenchConfig:
    """How much to measure: timing batch, rounds, held-out samples for the action error."""

    batch: int = 1
    repeats: int = 15
    warmup: int = 3
    eval_samples: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive(self, "bench.", "batch", "repeats", "eval_samples")


@dataclass
class Observations:
    """A batch of model inputs, with demonstrated action chunks when they come from demonstrations."""

    images: torch.Tensor
    instructions: list[str]
    proprio: torch.Tensor | None
    actions: torch.Tensor | None = None

    def take(self, idx: slice) -> Observations:
        pick = lambda x: None if x is None else x[idx]  # noqa: E731
        return Observations(self.images[idx], self.instructions[idx], pick(self.proprio), pick(self.actions))

    def __len__(self) -> int:
        return len(self.instructions)

    def batches(self, size: int) -> list[tuple[Any, list[str], Any]]:
        """`(images, instructions, proprio)` batches, the form `vlaopt.apply` calibrates on."""
        parts = (self.take(slice(i, i + size)) for i in range(0, len(self), size))
        return [(p.images, p.instructions, p.proprio) for p in parts]


def random_observations(config: Any, n: int, seed: int = 0) -> Observations:
    """Synthetic inputs of the right shapes (timing only: no demonstrated actions), one batch of `n`."""
    images, instructions, proprio = calibration.random_observations(config, n, batch_size=n, seed=seed)[0]
    return Observations(torch.from_numpy(images), list(instructions),
                        None if proprio is None else torch.from_numpy(proprio))


def _predict_all(model: Any, obs: Observations, batch: int = 16) -> torch.Tensor:
    out = [model.predict_action(part.images, part.instructions, part.proprio, seed=0)
           for part in (obs.take(slice(i, i + batch)) for i in range(0, len(obs), batch))]
    return torch.cat(out)


def _visual_tokens(model: Any, obs: Observations) -> tuple[int, float]:
    """Visual tokens entering the LM and (mean over the batch) leaving its last layer."""
    with torch.inference_mode():
        state = model.lm_input(obs.images, obs.instructions, obs.proprio)
        out = model.lm(state)
    kept = out.valid[:, out.layout.span("visual")].sum(1).float().mean().item()
    return state.layout.visual, kept


def closed_loop_success(model: Any, tasks: Sequence[str], eval_cfg: Any, progress: bool = True) -> dict[str, Any]:
    """Overall and per-task closed-loop success of `model` with Wilson 95% intervals (`vlaopt.eval`)."""
    from vlaopt.eval.closed_loop import evaluate

    result = evaluate(model, tasks, eval_cfg, progress=progress)
    return {"overall": result.overall.success_rate, "ci95": list(result.overall.ci95),
            "successes": result.overall.successes, "episodes": result.overall.episodes,
            "tasks": {t: r.success_rate for t, r in result.tasks.items()}, "episode_results": result.episodes}


def run_bench(model: Any, recipes: dict[str, list[dict[str, Any]]], timing: Observations,
              heldout: Observations | None, cfg: BenchConfig, success: tuple[Sequence[str], Any] | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Measure every recipe against `recipes["baseline"]`; returns a JSON-ready result.

    `success` = (MetaWorld tasks, `EvalConfig`) adds closed-loop success for every recipe."""
    if "baseline" not in recipes:
        raise ValueError(f"recipes must include 'baseline'; got {sorted(recipes)}")
    device = model.device
    quality_set = heldout if heldout is not None else timing
    calibration_batches = quality_set.batches(8)
    models = {name: apply(copy.deepcopy(model), recipe, calibration=calibration_batches).eval()
              for name, recipe in recipes.items()}
    batch = timing.take(slice(0, cfg.batch))
    peak = matmul_throughput(device)
    for m in models.values():
        for _ in range(cfg.warmup):
            m.predict_action(batch.images, batch.instructions, batch.proprio)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    rounds = track(range(cfg.repeats), description="timing rounds") if progress else range(cfg.repeats)
    for _ in rounds:
        for name, m in models.items():
            samples[name].append(time_once(m, batch.images, batch.instructions, batch.proprio))
    baseline_actions = _predict_all(models["baseline"], quality_set)
    rows = []
    for name, m in models.items():
        stats = summarize(samples[name])
        flops = FlopRecorder()
        m.predict_action(batch.images, batch.instructions, batch.proprio, timer=flops)
        actions = _predict_all(m, quality_set)
        tokens_in, tokens_out = _visual_tokens(m, batch)
        elements, size = weight_size(m)
        row = {
            "recipe": name,
            "steps": recipes[name],
            "ms": {k: v.median_ms for k, v in stats.items()},
            "ms_p25": {k: v.p25_ms for k, v in stats.items()},
            "ms_p75": {k: v.p75_ms for k, v in stats.items()},
            "gflops": {k: v / 1e9 for k, v in flops.flops.items()},
            "params_m": elements / 1e6,
            "weights_mb": size / 2**20,
            "visual_tokens_in": tokens_in,
            "visual_tokens_out": tokens_out,
            "action_err_vs_baseline": (actions - baseline_actions).abs().mean().item(),
            "action_err_vs_demo": None if quality_set.actions is None
            else (actions - quality_set.actions[:, : actions.shape[1]]).abs().mean().item(),
        }
        row["achieved_fraction"] = {
            k: (row["gflops"][k] * 1e9 / (row["ms"][k] / 1e3)) / peak for k in row["gflops"] if row["ms"].get(k)
        }
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            m.predict_action(batch.images, batch.instructions, batch.proprio)
            row["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            row["peak_mb"] = None
        if success is not None:
            if progress:
                print(f"closed-loop success of {name}")
            row["success"] = closed_loop_success(m, success[0], success[1], progress)
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["speedup_total"] = base["ms"]["total"] / row["ms"]["total"]
        lm = "lm" if "lm" in row["ms"] else "prefix"  # expert heads run the VLM as a cached prefix
        row["speedup_lm"] = base["ms"][lm] / row["ms"][lm]
        row["lm_flops_ratio"] = row["gflops"][lm] / base["gflops"][lm]
    return {
        "date": date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "matmul_gflops": peak / 1e9},
        "settings": {"batch": cfg.batch, "repeats": cfg.repeats, "warmup": cfg.warmup,
                     "quality_inputs": "heldout demonstrations" if heldout is not None else "timing inputs (random)",
                     "quality_samples": len(quality_set),
                     "success": None if success is None else {"tasks": list(success[0]), **vars(success[1])}},
        "rows": rows,
    }
