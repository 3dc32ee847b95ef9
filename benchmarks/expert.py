"""Stage latencies of the action-expert VLA: flow steps, reasoning, and the autoregressive trajectory.

One model's weights (a Llama-style LM with an action expert over its KV cache; 2 cameras x 256
patches) run every mode on the same inputs: each mode is a view of that model holding the very same
weight tensors, with its head options (trajectory, reasoning budget) and its flow steps applied as a
recipe (`flow_steps`). The modes run interleaved round by round after warm-up; medians are
reported per stage (prefix / reasoning / flow or trajectory) and end to end, with ratios taken in
the same run. Modes: the expert with 1/2/4/5/10 Euler flow steps, each without and with 40 reasoning
tokens, and the autoregressive trajectory (chunk x action_dim discretised action tokens decoded one
by one) without and with reasoning. Alpamayo-R1 reports 99 ms with 5 flow steps and ~40 reasoning
tokens, 312 ms had the trajectory been decoded as 127 autoregressive tokens. Writes JSON.

`--model DIR` times a trained expert policy instead (its own reasoning budget, on its held-out
demonstrations), and `--speculative STEP` adds the reasoning modes again with that speculative step
applied to them (e.g. '{draft: retrieval, k: 8, corpus: runs/reasoning-data}').

    python benchmarks/expert.py --out benchmarks/results/expert.json
    python benchmarks/expert.py --model runs/reasoning --speculative '{draft: retrieval, k: 8, corpus: runs/reasoning-data}' \
        --out benchmarks/results/expert_reasoning.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from datetime import date

import torch
import yaml
from rich.console import Console
from rich.table import Table

from vlaopt import VLA
from vlaopt.bench import heldout
from vlaopt.bench.machine import machine_info
from vlaopt.bench.models import apply_each, bench_config, bench_inputs, llama_shape, lm_config
from vlaopt.bench.stages import summarize, time_interleaved
from vlaopt.config import head_config
from vlaopt.model.expert_policy import rollout
from vlaopt.model.vla import resolve_model_dir
from vlaopt.optimize import load
from vlaopt.utils.io import atomic_write_text

ALPAMAYO_MS = {"flow_with_reasoning": 99.0, "autoregressive_with_reasoning": 312.0}


@dataclass(frozen=True)
class Mode:
    """One way of predicting with the same weights: flow steps (0 = autoregressive) and reasoning budget."""

    steps: int
    reasoning: int
    speculative: dict[str, object] | None = None  # the speculative step's params, applied to the reasoning

    @property
    def name(self) -> str:
        act = f"flow{self.steps}" if self.steps else "autoregressive"
        name = f"{act}+reason{self.reasoning}" if self.reasoning else act
        return name + "+speculative" if self.speculative is not None else name

    @property
    def trajectory(self) -> str:
        return "flow" if self.steps else "autoregressive"

    @property
    def recipe(self) -> list[dict[str, dict[str, int]]]:
        """The optimizations this mode applies: fewer flow steps (none for the autoregressive trajectory),
        then speculative decoding of the reasoning."""
        steps = [{"flow_steps": {"n": self.steps}}] if self.steps else []
        return steps + ([{"speculative": dict(self.speculative)}] if self.speculative is not None else [])


def bench_model(args: argparse.Namespace) -> VLA:
    """The benchmark VLA: a Llama-style LM of `args.hidden` x `args.layers` with an expert head."""
    lm = lm_config("llama", max_position_embeddings=4096,
                   **llama_shape(args.hidden, args.layers, kv_heads=max(1, args.hidden // 256)))
    head = head_config("expert", hidden_dim=args.expert_width, steps=10)
    cfg = bench_config(lm, head, cameras=2, vision_width=64, vision_layers=1, action_dim=args.action_dim,
                       chunk=args.chunk)
    return VLA(cfg).to(args.device).eval()


def with_head(model: VLA, **changes: object) -> VLA:
    """A VLA built from `model`'s config with the head options `changes` (what the policy decodes, not
    an optimization: the reasoning budget, the trajectory mode), holding `model`'s weight tensors."""
    config = dataclasses.replace(model.config, head=dataclasses.replace(model.config.head, **changes))
    variant = VLA(config).to(model.device).eval()
    variant.load_state_dict(model.state_dict(), assign=True)  # the same tensors, not a copy
    return variant


def mode_models(model: VLA, modes: list[Mode]) -> dict[str, VLA]:
    """Per mode, a model on `model`'s weights: the head options of its trajectory and reasoning budget,
    then its flow steps applied as a recipe (`vlaopt.apply`)."""
    out: dict[str, VLA] = {}
    for trajectory, reasoning in dict.fromkeys((m.trajectory, m.reasoning) for m in modes):
        base = with_head(model, trajectory=trajectory, reasoning_tokens=reasoning)
        group = [m for m in modes if (m.trajectory, m.reasoning) == (trajectory, reasoning)]
        variants, _ = apply_each(base, {m.name: m.recipe for m in group}, share_weights=True, progress=False)
        out.update(variants)
    return {m.name: out[m.name] for m in modes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/expert.json")
    parser.add_argument("--hidden", type=int, default=512, help="LM width")
    parser.add_argument("--layers", type=int, default=8, help="LM decoder layers")
    parser.add_argument("--expert-width", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--action-dim", type=int, default=8, help="chunk x action_dim = autoregressive tokens")
    parser.add_argument("--reasoning", type=int, default=40, help="reasoning tokens")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="a trained expert policy (a folder or bundled name) instead of the synthetic one")
    parser.add_argument("--speculative", type=yaml.safe_load, default=None,
                        help="the params of a speculative step (YAML) to time the reasoning modes with as well")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()

    if args.model:
        model = load(resolve_model_dir(args.model), device=args.device)
        demos = heldout.for_model(resolve_model_dir(args.model), None, model.config.chunk)
        images, instructions, proprio = demos.take(slice(0, args.batch)) if demos is not None else bench_inputs(
            model.config, args.batch)
    else:
        model = bench_model(args)
        images, instructions, proprio = bench_inputs(model.config, args.batch)
    reasoning = getattr(model.config.head, "reasoning_tokens", 0) or args.reasoning
    chunk, action_dim = model.config.chunk, model.config.action_dim
    modes = [Mode(s, r) for r in (0, reasoning) for s in (1, 2, 4, 5, 10, 0)]
    if args.speculative is not None:
        modes += [Mode(s, reasoning, args.speculative) for s in (5, 10, 0)]
    models = mode_models(model, modes)

    tokens = {}
    for mode in modes:  # what each mode decodes (an untrained LM may emit STOP before the budget)
        out = rollout(models[mode.name], images, instructions, proprio)
        tokens[mode.name] = {
            "reasoning": int(out.reasoning.shape[1]),
            "trajectory": 0 if mode.steps else chunk * action_dim,
            "expert_passes": mode.steps,
        }
    calls = {name: (lambda timer, m=m: m.predict_action(images, instructions, proprio, timer=timer))
             for name, m in models.items()}
    samples = time_interleaved(calls, args.repeats, args.warmup, model.device, rotate=True,
                               description="interleaved rounds")

    results = {
        name: {stage: round(stats.median_ms, 3) for stage, stats in summarize(s).items()} for name, s in samples.items()
    }
    flow10, ar = results["flow10"]["total"], results["autoregressive"]["total"]
    flow5_r = results[f"flow5+reason{reasoning}"]["total"]
    ar_r = results[f"autoregressive+reason{reasoning}"]["total"]
    ratios = {
        "autoregressive / flow10 (no reasoning, end to end)": round(ar / flow10, 2),
        f"autoregressive+reason{reasoning} / flow5+reason{reasoning} (end to end, Alpamayo's setting)":
            round(ar_r / flow5_r, 2),
        **({} if args.speculative is None else {
            f"autoregressive+reason{reasoning}+speculative / flow5+reason{reasoning}+speculative": round(
                results[f"autoregressive+reason{reasoning}+speculative"]["total"]
                / results[f"flow5+reason{reasoning}+speculative"]["total"], 2),
            "reasoning stage, plain / speculative (flow5)": round(
                results[f"flow5+reason{reasoning}"]["reasoning"]
                / results[f"flow5+reason{reasoning}+speculative"]["reasoning"], 2)}),
        "alpamayo_r1 312 / 99": round(ALPAMAYO_MS["autoregressive_with_reasoning"] / ALPAMAYO_MS["flow_with_reasoning"], 2),
        "trajectory stage / flow stage with 10 steps": round(
            results["autoregressive"]["trajectory"] / results["flow10"]["flow"], 2),
        "flow stage 10 steps / 1 step": round(results["flow10"]["flow"] / results["flow1"]["flow"], 2),
    }
    report = {
        "benchmark": "expert",
        "date": date.today().isoformat(),
        "machine": machine_info(model.device),
        "setting": {
            "model": args.model or "synthetic", "speculative": args.speculative,
            "lm": {"family": model.lm.causal_lm.config.model_type, "hidden": model.lm.causal_lm.config.hidden_size,
                   "layers": model.lm.causal_lm.config.num_hidden_layers},
            "expert_width": model.config.head.hidden_dim, "cameras": model.config.cameras,
            "visual_tokens": model.config.num_visual_tokens,
            "chunk": chunk, "action_dim": action_dim, "batch": args.batch,
            "repeats": args.repeats, "warmup": args.warmup, "integrator": "euler",
            "parameters_m": {"lm": round(sum(p.numel() for p in model.lm.parameters()) / 1e6, 2),
                             "expert": round(sum(p.numel() for p in model.head.parameters()) / 1e6, 2)},
        },
        "stage_ms_median": results,
        "tokens": tokens,
        "ratios": ratios,
        "alpamayo_r1_ms": ALPAMAYO_MS,
    }
    atomic_write_text(args.out, json.dumps(report, indent=2))

    table = Table(title=f"expert VLA stages (median ms), batch {args.batch}, {torch.get_num_threads()} threads")
    stages = ["prefix", "reasoning", "flow", "trajectory", "total"]
    for col in ["mode", *stages]:
        table.add_column(col, justify="left" if col == "mode" else "right")
    for name, row in results.items():
        table.add_row(name, *(f"{row[s]:.1f}" if s in row else "-" for s in stages))
    console.print(table)
    for name, value in ratios.items():
        console.print(f"{name}: {value}")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
