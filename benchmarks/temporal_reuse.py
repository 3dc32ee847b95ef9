"""LM-stage speed of temporal reuse in closed loop, measured side by side with the stateless policy.

Each recipe (a `temporal_reuse` step, by default the two in configs/recipes/) is applied to the model
with `vlaopt.apply`; its episodes run in MetaWorld from `vla-opt eval`'s initial states, and at every
prediction the stateless model predicts on the same frames too, the two calls alternating which goes
first (`vlaopt.bench.sessions`). Per episode, the reference's LM time over the measured session's LM
time, both summed over the episode's predictions; the mean over episodes and its quartiles, the
reuse statistics, and the recipes' success in these episodes (too few to compare success: use
`vla-opt eval` and `vla-opt compare` for that). Writes JSON.

    python benchmarks/temporal_reuse.py --threads 1 --out benchmarks/results/temporal_reuse.json
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from vlaopt.bench.machine import machine_info
from vlaopt.bench.sessions import paired_closed_loop
from vlaopt.eval.rollout import RolloutConfig
from vlaopt.optimize import apply, load, load_recipe
from vlaopt.sim.tasks import resolve_tasks
from vlaopt.utils.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RECIPES = [ROOT / "configs" / "recipes" / "temporal-reuse.yaml", ROOT / "configs" / "recipes" / "temporal-reuse-exact.yaml"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medium", help="a saved model directory or a bundled policy")
    parser.add_argument("--recipes", nargs="+", default=[str(p) for p in RECIPES], help="temporal_reuse recipe files")
    parser.add_argument("--tasks", default="mt10")
    parser.add_argument("--episodes", type=int, default=3, help="episodes per task and recipe")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="base seed of the initial states (vla-opt eval's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3, help="untimed predictions of each model before the episodes")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "temporal_reuse.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reference = load(args.model)
    models = {Path(r).stem: apply(load(args.model), load_recipe(r)) for r in args.recipes}
    tasks = resolve_tasks(args.tasks)
    result = paired_closed_loop(models, reference, tasks, args.episodes, RolloutConfig(max_steps=args.max_steps),
                                seed=args.seed, warmup=args.warmup)
    table = Table(title=f"LM stage in closed loop vs the stateless policy, {args.episodes} episodes per task, "
                        f"{args.threads} thread(s)")
    for col in ("recipe", "LM speedup (mean)", "p25-p75", "reused visual tokens", "success"):
        table.add_column(col)
    for name, row in result.items():
        reused = [e["reuse"].get("reused", 0.0) for e in row["episodes"]]
        table.add_row(name, f"{row['lm_speedup_mean']:.2f}x", f"{row['lm_speedup_p25']:.2f}-{row['lm_speedup_p75']:.2f}",
                      f"{sum(reused) / len(reused):.1f}", f"{row['success']}/{len(row['episodes'])}")
    Console().print(table)
    out = {"date": date.today().isoformat(), "machine": machine_info("cpu"),
           "setting": {"model": args.model, "tasks": tasks, "episodes": args.episodes, "max_steps": args.max_steps,
                       "seed": args.seed, "threads": args.threads,
                       "recipes": {Path(r).stem: load_recipe(r) for r in args.recipes}},
           "results": result}
    atomic_write_text(Path(args.out), json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
