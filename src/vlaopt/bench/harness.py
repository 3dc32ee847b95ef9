"""Side-by-side benchmark of optimization recipes on one model and identical inputs.

Every recipe is applied to its own copy of the model (a recipe that fails to apply or to run is
reported with its error while the others are still measured); timing rounds interleave the recipes (one
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

import torch

from vlaopt.bench.flops import FlopRecorder
from vlaopt.bench.machine import machine_info, matmul_throughput
from vlaopt.bench.stages import summarize, time_interleaved
from vlaopt.eval.paired import compare_episodes
from vlaopt.eval.reasoning import emitted_tokens, exact_match, predict_with_reasoning, reasons
from vlaopt.model.checkpoint import weight_size
from vlaopt.model.expert_policy import rollout
from vlaopt.model.processor import Observation
from vlaopt.optimize import apply, calibration
from vlaopt.utils.checks import check_positive

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA

# Stages in pipeline order: OFT-style heads run "lm" then "head"; expert heads run the VLM as a cached
# "prefix", optionally decode "reasoning", then "flow" steps (or an autoregressive "trajectory").
STAGES = ("inputs", "vision", "projector", "lm", "prefix", "reasoning", "head", "flow", "trajectory")
NETWORK = "network"
"""The stage of a compiled model (the compile step): everything after `inputs`, as one compiled call."""


@dataclass
class BenchConfig:
    """How much to measure: timing batch, rounds, held-out samples for the action error, and the torch
    threads the whole bench runs on (0: torch's setting as it is), since CPU timings depend on them."""

    batch: int = 1
    repeats: int = 15
    warmup: int = 3
    eval_samples: int = 64
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        check_positive(self, "bench.", "batch", "repeats", "eval_samples")
        if self.threads < 0:
            raise ValueError(f"bench.threads={self.threads} must be 0 (torch's setting) or a positive count")


@dataclass
class Demonstrations(Observation):
    """Demonstrations (torch tensors) with the demonstrated action chunks (B, chunk, action_dim) when
    they come from demonstrations (None for synthetic timing inputs), and their reasoning targets
    when the episodes carry them."""

    actions: torch.Tensor | None = None
    reasoning: list[str] | None = None

    def spread(self, n: int) -> Demonstrations:
        """`n` samples spread evenly over these (all when there are at most `n`), so a smaller set
        still covers every episode the full one does."""
        if n >= len(self):
            return self
        return self.take(torch.linspace(0, len(self) - 1, n).round().long())


def random_observations(config: Any, n: int, seed: int = 0) -> Demonstrations:
    """Synthetic inputs of the right shapes (timing only: no demonstrated actions), one batch of `n`."""
    images, instructions, proprio = calibration.random_observations(config, n, batch_size=n, seed=seed)[0]
    return Demonstrations(torch.from_numpy(images), list(instructions),
                          None if proprio is None else torch.from_numpy(proprio))


def _predict_all(model: VLA, obs: Demonstrations, batch: int = 16) -> torch.Tensor:
    out = [model.predict_action(part.images, part.instructions, part.proprio, seed=0)
           for part in (obs.take(slice(i, i + batch)) for i in range(0, len(obs), batch))]
    return torch.cat(out)


def _reasoning(model: VLA, run: _Run) -> tuple[torch.Tensor, dict[str, Any]]:
    """Actions on the quality inputs of a policy that reasons, and its reasoning statistics: tokens
    emitted per sample, tokens per LM pass and draft acceptance (speculative decoding), the KV cache
    the expert reads (KB per sample), exact-match accuracy against the demonstrations' targets, and
    the tokens the timing batch emits (for tokens/s)."""
    decoder = model.text_decoder
    if decoder is not None:
        decoder.stats.update(dict.fromkeys(decoder.stats, 0))
    actions, texts, outs = predict_with_reasoning(model, run.quality)
    emitted = sum(emitted_tokens(model, out.reasoning) for out in outs)
    stats = {"tokens": emitted / len(run.quality),
             "kv_kb": sum(out.cache.nbytes() for out in outs) / len(run.quality) / 1024,
             "accuracy": None if run.quality.reasoning is None else exact_match(texts, run.quality.reasoning),
             "tokens_per_pass": 1.0, "acceptance": None}
    if decoder is not None:
        stats["tokens_per_pass"] = decoder.stats["emitted"] / max(decoder.stats["passes"], 1)
        stats["acceptance"] = decoder.stats["accepted"] / max(decoder.stats["drafted"], 1)
    with torch.inference_mode():
        timing = rollout(model, *run.batch, seed=0).reasoning
    stats["timing_tokens"] = emitted_tokens(model, timing)
    return actions, stats


def _visual_tokens(model: VLA, obs: Demonstrations) -> tuple[int, float]:
    """Visual tokens entering the LM and (mean over the batch) leaving its last layer."""
    with torch.inference_mode():
        state = model.lm_input(obs.images, obs.instructions, obs.proprio)
        out = model.lm(state)
    kept = out.valid[:, out.layout.span("visual")].sum(1).float().mean().item()
    return state.layout.visual, kept


def closed_loop_success(model: VLA, tasks: Sequence[str], eval_cfg: Any, progress: bool = True) -> dict[str, Any]:
    """Overall and per-task closed-loop success of `model` with Wilson 95% intervals (`vlaopt.eval`),
    over the episodes that ran; `failed` counts those that failed to run (`failures` says why);
    `latency` holds the closed loop's per-prediction stage times and reuse statistics (its session's)."""
    from vlaopt.eval.closed_loop import evaluate

    result = evaluate(model, tasks, eval_cfg, progress=progress)
    return {"overall": result.overall.success_rate, "ci95": list(result.overall.ci95),
            "successes": result.overall.successes, "episodes": result.overall.episodes,
            "failed": result.overall.failed, "failures": result.failures,
            "tasks": {t: r.success_rate for t, r in result.tasks.items()}, "episode_results": result.episodes,
            "latency": result.latency}


class RecipeFailure(Exception):
    """A recipe that could not be applied or run; the bench reports it as a failed row and goes on."""

    def __init__(self, phase: str, error: Exception) -> None:
        super().__init__(" ".join(f"{type(error).__name__}: {error}".split()))
        self.phase = phase


@contextmanager
def _attempt(name: str, phase: str) -> Iterator[None]:
    """Turn an exception of recipe `name` during `phase` into a `RecipeFailure`; the baseline's own
    exception propagates (with a note), since nothing can be compared without it."""
    try:
        yield
    except Exception as error:
        if name == "baseline":
            error.add_note(f"vla-opt bench: the baseline (the model as loaded) failed during {phase}")
            raise
        raise RecipeFailure(phase, error) from error


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run the block on `n` torch threads (0: leave torch's setting), restoring the setting afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _eager(model: VLA) -> Iterator[None]:
    """Run `model` without its runner (a compiled model as eager) inside the block."""
    runner, model.runner = model.runner, None
    try:
        yield
    finally:
        model.runner = runner


@dataclass
class _Run:
    """What every recipe's measurement shares: the timing batch, the quality inputs, the device's peak."""

    batch: Demonstrations
    quality: Demonstrations
    peak: float
    success: tuple[Sequence[str], Any] | None
    progress: bool

    def predict(self, model: VLA, timer: Any = None) -> torch.Tensor:
        return model.predict_action(self.batch.images, self.batch.instructions, self.batch.proprio, timer=timer)


def _prepare(model: VLA, recipes: dict[str, list[dict[str, Any]]], run: _Run, warmup: int,
             failures: dict[str, RecipeFailure]) -> dict[str, Any]:
    """Each recipe applied to its own copy of `model` (data-driven steps calibrate on the quality
    inputs) and warmed up; a recipe that fails lands in `failures` instead."""
    calibration_batches = run.quality.batches(8)
    models = {}
    for name, recipe in recipes.items():
        try:
            with _attempt(name, "apply"):
                m = apply(copy.deepcopy(model), recipe, calibration=calibration_batches).eval()
            with _attempt(name, "warm-up"):
                for _ in range(warmup):
                    run.predict(m)
            models[name] = m
        except RecipeFailure as failure:
            failures[name] = failure
    return models


def _time_rounds(models: dict[str, Any], run: _Run, repeats: int,
                 failures: dict[str, RecipeFailure]) -> dict[str, list[dict[str, float]]]:
    """Per-stage seconds of `repeats` interleaved rounds (one `predict_action` per recipe each); a
    recipe that fails leaves the rounds and lands in `failures` (the baseline's failure raises)."""
    calls = {name: (lambda timer, m=m: run.predict(m, timer)) for name, m in models.items()}
    errors: dict[str, Exception] = {}
    device = next(iter(models.values())).device
    samples = time_interleaved(calls, repeats, device=device, progress=run.progress, failures=errors)
    for name, error in errors.items():
        try:
            with _attempt(name, "timing"):
                raise error
        except RecipeFailure as failure:
            failures[name] = failure
    return samples


def _measure(name: str, recipe: list[dict[str, Any]], m: Any, samples: list[dict[str, float]], run: _Run,
             baseline: tuple[dict[str, Any], torch.Tensor] | None) -> tuple[dict[str, Any], torch.Tensor]:
    """One recipe's row (timing statistics, FLOPs, size, tokens, action errors, success, ratios to
    the `baseline` row and actions; None when this is the baseline) and its actions on the quality inputs."""
    stats = summarize(samples)
    flops = FlopRecorder()
    with _eager(m):  # the same arithmetic as the compiled network, counted stage by stage
        run.predict(m, timer=flops)
    flops.flops[NETWORK] = sum(v for k, v in flops.flops.items() if k in STAGES and k != "inputs")
    if reasons(m):
        actions, reasoning = _reasoning(m, run)
    else:
        actions, reasoning = _predict_all(m, run.quality), None
    base_actions = actions if baseline is None else baseline[1]
    tokens_in, tokens_out = _visual_tokens(m, run.batch)
    elements, size = weight_size(m)
    row = {
        "recipe": name,
        "steps": recipe,
        "ms": {k: v.median_ms for k, v in stats.items()},
        "ms_p25": {k: v.p25_ms for k, v in stats.items()},
        "ms_p75": {k: v.p75_ms for k, v in stats.items()},
        "total_spread_ms": [stats["total"].p25_ms, stats["total"].p75_ms],
        "gflops": {k: v / 1e9 for k, v in flops.flops.items()},
        "params_m": elements / 1e6,
        "weights_mb": size / 2**20,
        "visual_tokens_in": tokens_in,
        "visual_tokens_out": tokens_out,
        "action_err_vs_baseline": (actions - base_actions).abs().mean().item(),
        "action_err_vs_demo": None if run.quality.actions is None
        else (actions - run.quality.actions[:, : actions.shape[1]]).abs().mean().item(),
    }
    if reasoning is not None:
        reasoning["tokens_per_s"] = reasoning.pop("timing_tokens") / (row["ms"]["reasoning"] / 1e3)
        row["reasoning"] = reasoning
    row["achieved_fraction"] = {
        k: (row["gflops"][k] * 1e9 / (row["ms"][k] / 1e3)) / run.peak for k in row["gflops"] if row["ms"].get(k)
    }
    row["peak_mb"] = _peak_memory(m, run)
    if m.runner is not None:
        row["compile"] = m.runner.stats()
    if run.success is not None:
        if run.progress:
            print(f"closed-loop success of {name}")
        row["success"] = closed_loop_success(m, run.success[0], run.success[1], run.progress)
        if baseline is not None and baseline[0].get("success"):
            row["success"]["paired"] = compare_episodes(baseline[0]["success"]["episode_results"],
                                                        row["success"]["episode_results"]).to_dict()
    row.update(_ratios(row, row if baseline is None else baseline[0]))
    return row, actions


def _peak_memory(m: Any, run: _Run) -> float | None:
    """Peak device memory (MiB) of one `predict_action` on CUDA; None elsewhere."""
    if m.device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(m.device)
    run.predict(m)
    return torch.cuda.max_memory_allocated(m.device) / 2**20


def _ratios(row: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Speedups and FLOP ratio against the baseline row, and whether the p25-p75 spreads of the total
    overlap (then the speedup cannot be told from timing noise; None for the baseline itself)."""
    lm = "lm" if "lm" in base["ms"] else "prefix"  # expert heads run the VLM as a cached prefix
    (lo, hi), (base_lo, base_hi) = row["total_spread_ms"], base["total_spread_ms"]
    return {
        "speedup_total": base["ms"]["total"] / row["ms"]["total"],
        "speedup_lm": base["ms"][lm] / row["ms"][lm] if lm in row["ms"] else None,  # None: compiled as one stage
        "lm_flops_ratio": row["gflops"][lm] / base["gflops"][lm],
        "spread_overlaps_baseline": None if row is base else lo <= base_hi and base_lo <= hi,
    }


def _failed_row(name: str, recipe: list[dict[str, Any]], failure: RecipeFailure) -> dict[str, Any]:
    return {"recipe": name, "steps": recipe, "error": str(failure), "failed_during": failure.phase}


def _header(device: torch.device, peak: float, cfg: BenchConfig, heldout: Demonstrations | None, quality: Demonstrations,
            success: tuple[Sequence[str], Any] | None, settings: dict[str, Any] | None) -> dict[str, Any]:
    """The result before any row: date, machine (with the thread count timing runs on), settings."""
    return {
        "date": date.today().isoformat(),
        "complete": False,
        "machine": {**machine_info(device, peak=False), "matmul_gflops": peak / 1e9},
        "settings": {"batch": cfg.batch, "repeats": cfg.repeats, "warmup": cfg.warmup,
                     "quality_inputs": "heldout demonstrations" if heldout is not None else "timing inputs (random)",
                     "quality_samples": len(quality),
                     "success": None if success is None else {"tasks": list(success[0]), **vars(success[1])},
                     **(settings or {})},
        "rows": [],
    }


def run_bench(model: VLA, recipes: dict[str, list[dict[str, Any]]], timing: Demonstrations,
              heldout: Demonstrations | None, cfg: BenchConfig, success: tuple[Sequence[str], Any] | None = None,
              progress: bool = True, settings: dict[str, Any] | None = None,
              on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure every recipe against `recipes["baseline"]`; returns a JSON-ready result.

    `success` = (MetaWorld tasks, `EvalConfig`) adds closed-loop success for every recipe; `settings`
    adds entries to the result's settings. A recipe that fails to apply or to run becomes a row with
    its `error` and the others are still measured; the baseline failing raises. `on_update(result)`
    is called after each row is added (with `"complete": False`) and once at the end (`True`), so a
    caller can save what is measured as it is measured."""
    if "baseline" not in recipes:
        raise ValueError(f"recipes must include 'baseline'; got {sorted(recipes)}")
    recipes = {"baseline": recipes["baseline"], **recipes}  # measured first: every ratio needs it
    update = on_update or (lambda result: None)
    with _threads(cfg.threads):
        quality = heldout if heldout is not None else timing
        run = _Run(timing.take(slice(0, cfg.batch)), quality, matmul_throughput(model.device), success, progress)
        result = _header(model.device, run.peak, cfg, heldout, quality, success, settings)
        failures: dict[str, RecipeFailure] = {}
        models = _prepare(model, recipes, run, cfg.warmup, failures)
        samples = _time_rounds(models, run, cfg.repeats, failures)
        baseline = None
        for name, recipe in recipes.items():
            if name not in failures:
                try:
                    with _attempt(name, "measurement"):
                        row, actions = _measure(name, recipe, models[name], samples[name], run, baseline)
                    baseline = baseline or (row, actions)
                except RecipeFailure as failure:
                    failures[name] = failure
            if name in failures:
                row = _failed_row(name, recipe, failures[name])
            models.pop(name, None)  # free each copy once measured
            result["rows"].append(row)
            update(result)
    result["complete"] = True
    update(result)
    return result
