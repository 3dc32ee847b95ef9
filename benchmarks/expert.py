"""Stage latencies of the action-expert VLA: flow steps, reasoning, and the autoregressive trajectory.

One model (a Llama-style LM with an action expert over its KV cache; 2 cameras x 256 patches) runs
every mode on the same weights and inputs, interleaved round by round after warm-up; medians are
reported per stage (prefix / reasoning / flow or trajectory) and end to end, with ratios taken in
the same run. Modes: the expert with 1/2/4/5/10 Euler flow steps, each without and with 40 reasoning
tokens, and the autoregressive trajectory (chunk x action_dim discretised action tokens decoded one
by one) without and with reasoning. Alpamayo-R1 reports 99 ms with 5 flow steps and ~40 reasoning
tokens, 312 ms had the trajectory been decoded as 127 autoregressive tokens. Writes JSON.

    python benchmarks/expert.py --out benchmarks/results/expert.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass
from datetime import date

import numpy as np
import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from vlaopt import VLA, VLAConfig
from vlaopt.bench.timer import StageTimer
from vlaopt.config import HeadConfig, LMConfig, VisionConfig
from vlaopt.model.expert_policy import rollout
from vlaopt.model.tokenizer import BUILTIN_VOCAB_SIZE
from vlaopt.utils.io import atomic_write_text

ALPAMAYO_MS = {"flow_with_reasoning": 99.0, "autoregressive_with_reasoning": 312.0}


@dataclass(frozen=True)
class Mode:
    """One way of predicting with the same model: flow steps (0 = autoregressive) and reasoning budget."""

    steps: int
    reasoning: int

    @property
    def name(self) -> str:
        act = f"flow{self.steps}" if self.steps else "autoregressive"
        return f"{act}+reason{self.reasoning}" if self.reasoning else act

    def set_on(self, model: VLA) -> None:
        head = model.head.cfg
        head.trajectory = "flow" if self.steps else "autoregressive"
        head.steps = self.steps or head.steps
        head.reasoning_tokens = self.reasoning


def bench_model(args: argparse.Namespace) -> VLA:
    """The benchmark VLA: a Llama-style LM of `args.hidden` x `args.layers` with an expert head."""
    cfg = VLAConfig(
        vision=VisionConfig(kind="siglip", image_size=224, patch_size=14, hidden_size=64, num_layers=1, num_heads=2,
                            intermediate_size=128),
        lm=LMConfig(hf_config={
            "model_type": "llama", "vocab_size": BUILTIN_VOCAB_SIZE, "hidden_size": args.hidden,
            "intermediate_size": args.hidden * 3, "num_hidden_layers": args.layers,
            "num_attention_heads": args.hidden // 64, "num_key_value_heads": max(1, args.hidden // 256),
            "head_dim": 64, "max_position_embeddings": 4096, "tie_word_embeddings": True,
        }),
        head=HeadConfig(kind="expert", hidden_dim=args.expert_width, steps=10),
        cameras=2, proprio_dim=8, action_dim=args.action_dim, chunk=args.chunk,
    )
    return VLA(cfg).to(args.device).eval()


def main() -> None:
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()

    model = bench_model(args)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, 2, 224, 224, 3), dtype=np.uint8)
    proprio = rng.standard_normal((args.batch, 8)).astype(np.float32)
    instructions = ["put the bowl on the plate and push the block to the goal"] * args.batch
    modes = [Mode(s, r) for r in (0, args.reasoning) for s in (1, 2, 4, 5, 10, 0)]

    tokens = {}
    for mode in modes:  # what each mode decodes (an untrained LM may emit STOP before the budget)
        mode.set_on(model)
        out = rollout(model, images, instructions, proprio)
        tokens[mode.name] = {
            "reasoning": int(out.reasoning.shape[1]),
            "trajectory": 0 if mode.steps else args.chunk * args.action_dim,
            "expert_passes": mode.steps,
        }
    samples: dict[str, dict[str, list[float]]] = {m.name: {} for m in modes}
    for round_ in track(range(args.warmup + args.repeats), description="interleaved rounds", console=console):
        for mode in modes[round_ % len(modes):] + modes[: round_ % len(modes)]:  # rotate the order
            mode.set_on(model)
            timer = StageTimer(model.device)
            t0 = time.perf_counter()
            model.predict_action(images, instructions, proprio, timer=timer)
            if timer.cuda:
                torch.cuda.synchronize(model.device)
            total = time.perf_counter() - t0
            if round_ < args.warmup:
                continue
            for stage, sec in {**timer.result(), "total": total}.items():
                samples[mode.name].setdefault(stage, []).append(sec * 1000)

    results = {
        name: {stage: round(statistics.median(v), 3) for stage, v in stages.items()} for name, stages in samples.items()
    }
    flow10, ar = results["flow10"]["total"], results["autoregressive"]["total"]
    flow5_r = results[f"flow5+reason{args.reasoning}"]["total"]
    ar_r = results[f"autoregressive+reason{args.reasoning}"]["total"]
    ratios = {
        "autoregressive / flow10 (no reasoning, end to end)": round(ar / flow10, 2),
        f"autoregressive+reason{args.reasoning} / flow5+reason{args.reasoning} (end to end, Alpamayo's setting)":
            round(ar_r / flow5_r, 2),
        "alpamayo_r1 312 / 99": round(ALPAMAYO_MS["autoregressive_with_reasoning"] / ALPAMAYO_MS["flow_with_reasoning"], 2),
        "trajectory stage / flow stage with 10 steps": round(
            results["autoregressive"]["trajectory"] / results["flow10"]["flow"], 2),
        "flow stage 10 steps / 1 step": round(results["flow10"]["flow"] / results["flow1"]["flow"], 2),
    }
    report = {
        "benchmark": "expert",
        "date": date.today().isoformat(),
        "machine": {
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "device": str(model.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else None,
        },
        "setting": {
            "lm": {"family": "llama", "hidden": args.hidden, "layers": args.layers},
            "expert_width": args.expert_width, "cameras": 2, "visual_tokens": model.config.num_visual_tokens,
            "chunk": args.chunk, "action_dim": args.action_dim, "batch": args.batch,
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


if __name__ == "__main__":
    main()
