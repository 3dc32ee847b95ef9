"""Where temporal reuse's error comes from: per-prediction action error of approximate reuse against
recomputing, for each first reusing decoder layer, along one closed-loop episode of the stateless
policy (every variant sees the same frames). Writes JSON.

    python scripts/reuse_action_error.py --task drawer-open-v3 --episode 2 --threshold 0.9999 --refresh 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vlaopt.eval.rollout import env_cameras, eval_seed
from vlaopt.optimize import apply, load
from vlaopt.sim.env import SimEnv
from vlaopt.utils.io import atomic_write_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medium")
    parser.add_argument("--task", default="drawer-open-v3")
    parser.add_argument("--episode", type=int, default=2, help="evaluation episode (vla-opt eval's initial state)")
    parser.add_argument("--predictions", type=int, default=12)
    parser.add_argument("--start-layers", type=int, nargs="+", default=[0, 1, 3, 5])
    parser.add_argument("--threshold", type=float, default=0.9999)
    parser.add_argument("--relevant", type=float, default=0.0)
    parser.add_argument("--refresh", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/reuse_action_error.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load(args.model)
    sessions = {}
    for layer in args.start_layers:
        step = {"temporal_reuse": {"start_layer": layer, "threshold": args.threshold, "relevant": args.relevant,
                                   "max_static": 1.0, "refresh": args.refresh}}
        sessions[layer] = apply(load(args.model), [step]).session()
        sessions[layer].reset()
    seed = eval_seed(0, args.task, args.episode)
    rows = []
    with SimEnv(args.task, seed, env_cameras(model.config), model.config.vision.image_size) as env:
        obs = env.reset(seed=seed)
        for t in range(args.predictions):
            inputs = (obs["images"][None], [env.instruction], obs["proprio"][None])
            reference = model.predict_action(*inputs)[0]
            row = {"prediction": t, "action_magnitude": reference.abs().mean().item(), "error": {}, "reused": {}}
            for layer, session in sessions.items():
                row["error"][layer] = (session.step(*inputs)[0] - reference).abs().mean().item()
                row["reused"][layer] = session.stats["reused"]
            rows.append(row)
            print(json.dumps(row))
            for action in reference.numpy():
                obs, _, done = env.step(action)
                if done:
                    break
            if done:
                break
    atomic_write_text(Path(args.out), json.dumps({"settings": vars(args), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
