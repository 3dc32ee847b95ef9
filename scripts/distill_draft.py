"""Distill a `model` draft for speculative decoding of a reasoning policy's text (DistillSpec: the
draft matches the policy LM's next-token distributions on the policy's own reasoning), then measure
it on held-out frames against the undistilled draft: KL(target || draft) and the greedy acceptance
rate. Writes the draft folder `--out` (use it as `- speculative: {draft: model, path: OUT}`) and
the JSON record (loss curve, KL, acceptance, timing) beside it as OUT.json.

    python scripts/distill_draft.py --model runs/reasoning --data runs/reasoning-data --out runs/draft --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import numpy as np
import torch

from vlaopt.bench.machine import machine_info
from vlaopt.model.processor import Observation
from vlaopt.optimize.calibration import episode_observations
from vlaopt.optimize.decoding import distill
from vlaopt.optimize.decoding.drafts.model import build_draft, save_draft
from vlaopt.optimize.loading import load
from vlaopt.utils.io import atomic_write_text


def split_frames(data: str, samples: int, heldout: int, batch: int, seed: int) -> tuple[list[Observation], list[Observation]]:
    """`samples` training and `heldout` evaluation frames drawn from the episodes at `data`, assigned
    to the two at random (both span every task of the collection), in batches of `batch`."""
    (frames,) = episode_observations(data, samples + heldout, samples + heldout, seed)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(samples + heldout))
    return frames.take(order[:samples]).batches(batch), frames.take(order[samples:]).batches(batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved VLA folder whose head reasons")
    parser.add_argument("--data", required=True, help="an episode collection (vla-opt collect)")
    parser.add_argument("--out", required=True, help="the draft folder to write")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--samples", type=int, default=256, help="training frames")
    parser.add_argument("--heldout", type=int, default=32, help="evaluation frames")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--k", type=int, default=4, help="drafted tokens per round (training rounds and evaluation)")
    parser.add_argument("--read-layer", type=int, default=-1, help="the VLM attention layer the draft reads")
    parser.add_argument("--layers", type=int, default=1, help="draft decoder layers")
    parser.add_argument("--mlp", type=int, default=0, help="draft MLP width (0: the LM's)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load(args.model)
    train, held = split_frames(args.data, args.samples, args.heldout, args.batch_size, args.seed)
    start = build_draft(model, args.read_layer, args.layers, args.mlp, args.seed)
    t0 = time.perf_counter()
    teachers = distill.teacher_batches(model, train, start.read, args.seed)
    heldout = distill.teacher_batches(model, held, start.read, args.seed + len(train))
    teacher_s = time.perf_counter() - t0
    before = {"kl": distill.draft_kl(model, start, heldout, args.k), **distill.acceptance(model, start, held, args.k)}
    print(f"undistilled: held-out KL {before['kl']:.4f}, acceptance {before['acceptance']:.3f}", flush=True)
    t0 = time.perf_counter()
    net = distill.distill_draft(model, train, draft=start, steps=args.steps, lr=args.lr, block=args.k, seed=args.seed,
                                progress=not args.no_progress, teachers=teachers)
    train_s = time.perf_counter() - t0
    after = {"kl": distill.draft_kl(model, net, heldout, args.k), **distill.acceptance(model, net, held, args.k)}
    print(f"distilled:   held-out KL {after['kl']:.4f}, acceptance {after['acceptance']:.3f}", flush=True)
    settings = {k: getattr(args, k) for k in ("model", "data", "steps", "samples", "heldout", "batch_size", "k",
                                              "read_layer", "layers", "mlp", "lr", "seed")}
    out = save_draft(net, args.out, settings)
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": machine_info(peak=False), "threads": args.threads, **settings, "draft": str(out),
              "draft_parameters": sum(p.numel() for p in net.parameters()), "teacher_s": teacher_s,
              "train_s": train_s, "heldout_before": before, "heldout_after": after, "loss": net.history}
    atomic_write_text(out.parent / f"{out.name}.json", json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
