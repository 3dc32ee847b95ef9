"""Closed-loop latency of sessions, measured side by side with the stateless model on the same frames.

A session that reuses work between steps (temporal reuse) is only faster on the frames a closed loop
produces, so its speed is measured there: `ShadowSession` steps the measured session and, on the same
observation, a reference session (the model without reuse), alternating which goes first, and keeps
both calls' stage times. The episode follows the measured session's actions. `paired_closed_loop`
runs such episodes and reports, per episode, the ratio of the reference's to the measured session's
time in one stage summed over the episode's steps (the LM stage: `lm`, or `prefix` for the expert).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from rich.progress import track

from vlaopt.bench.stages import time_call
from vlaopt.eval.rollout import RolloutConfig, env_cameras, eval_seed, run_episode
from vlaopt.model.session import Session
from vlaopt.sim.env import SimEnv

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA
    from vlaopt.utils.timer import Timer


class ShadowSession(Session):
    """Steps `measured` and `reference` on every observation (see the module docstring); `samples`
    holds each step's stage seconds of both, `{"measured": {...}, "reference": {...}}`."""

    def __init__(self, measured: Session, reference: Session) -> None:
        super().__init__(measured.model)
        self.measured, self.reference = measured, reference
        self.samples: list[dict[str, dict[str, float]]] = []

    def reset(self) -> None:
        super().reset()
        self.measured.reset()
        self.reference.reset()
        self.samples = []

    def step(self, images: Any, instructions: Any, proprio: Any = None, *, noise: torch.Tensor | None = None,
             seed: int = 0, timer: Timer | None = None) -> torch.Tensor:
        out: dict[str, torch.Tensor] = {}

        def call(name: str, session: Session) -> Any:
            return lambda t: out.setdefault(name, session.step(images, instructions, proprio, noise=noise,
                                                               seed=seed, timer=t))

        calls = [("measured", self.measured), ("reference", self.reference)]
        if len(self.samples) % 2:
            calls.reverse()
        self.samples.append({name: time_call(call(name, session)) for name, session in calls})
        self.stats, self.history = self.measured.stats, self.measured.history
        return out["measured"]


def lm_stage(samples: dict[str, float]) -> str:
    """The LM stage of a policy's stage times: `lm` (action slots) or `prefix` (the expert)."""
    return "lm" if "lm" in samples else "prefix"


def _episode_row(shadow: ShadowSession, result: Any) -> dict[str, Any]:
    stage = lm_stage(shadow.samples[0]["reference"])
    totals = {name: sum(s[name].get(stage, 0.0) for s in shadow.samples) for name in ("measured", "reference")}
    return {"task": result.task, "episode": result.episode, "seed": result.seed, "success": result.success,
            "steps": result.steps, "predictions": result.predictions, "stage": stage,
            "lm_ms": {name: 1000 * t / len(shadow.samples) for name, t in totals.items()},
            "lm_speedup": totals["reference"] / totals["measured"], "reuse": result.reuse}


def paired_closed_loop(models: dict[str, VLA], reference: VLA, tasks: Sequence[str], episodes: int,
                       cfg: RolloutConfig, seed: int = 0, warmup: int = 3, progress: bool = True) -> dict[str, Any]:
    """Per model: every episode's success, steps, LM milliseconds per step of it and of `reference`
    on the same frames, their ratio, and its reuse statistics; then the mean ratio over episodes
    with its quartiles. Episodes start from `eval_seed(seed, task, i)`, as `vla-opt eval`'s do; first
    every model predicts `warmup` times on the first task's first frame."""
    cameras = env_cameras(reference.config)
    with SimEnv(tasks[0], eval_seed(seed, tasks[0], 0), cameras, reference.config.vision.image_size) as env:
        obs = env.reset(seed=eval_seed(seed, tasks[0], 0))
        proprio = obs["proprio"][None] if reference.config.proprio_dim else None
        for model in [reference, *models.values()]:
            for _ in range(warmup):
                model.predict_action(obs["images"][None], [env.instruction], proprio)
    jobs = [(name, task, i) for name in models for task in tasks for i in range(episodes)]
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    for name, task, i in track(jobs, description="closed-loop episodes") if progress else jobs:
        shadow = ShadowSession(models[name].session(), reference.session())
        with SimEnv(task, eval_seed(seed, task, i), cameras, reference.config.vision.image_size, cfg.max_steps) as env:
            result = run_episode(models[name], env, i, eval_seed(seed, task, i), cfg, shadow)
        rows[name].append(_episode_row(shadow, result))
    out = {}
    for name, episode_rows in rows.items():
        ratios = sorted(r["lm_speedup"] for r in episode_rows)
        quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
        out[name] = {"lm_speedup_mean": statistics.fmean(ratios), "lm_speedup_p25": quartiles[0],
                     "lm_speedup_p75": quartiles[-1], "success": sum(r["success"] for r in episode_rows),
                     "episodes": episode_rows}
    return out
