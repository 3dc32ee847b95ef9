"""One closed-loop episode: the policy sees camera images, proprio and the task instruction, predicts
an action chunk, and the first `execute` actions of it run in the simulator before it looks again.
The policy is stepped through a session (`model.session()`, reset at the episode's start), so a
model with temporal reuse reuses work between its predictions.

Latency is modeled, since the simulator waits for the policy: each prediction's measured wall time
is the time the robot would stand still waiting for it at `control_hz` (synchronous execution). With
`lead` k (asynchronous execution, as SmolVLA's async inference), the next chunk is predicted from
the observation taken when k actions of the current chunk remain, while those k actions run; it
takes over at its own k-th action (the first k cover the time already spent), and the robot stands
still only for the part of the prediction time that k control periods do not cover. `blend` mixes
the new chunk into the overlapping tail of the old one, from the first control period after the new
chunk would have arrived.

Episode seeds come from (base seed, task, episode index) alone, so two models evaluated with the same
base seed start from identical initial states, however the episodes are spread over workers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlaopt.config import VLAConfig
from vlaopt.model.session import Session
from vlaopt.model.vla import VLA
from vlaopt.sim.env import ACTION_DIM, CONTROL_HZ, DEFAULT_CAMERAS, DEFAULT_MAX_STEPS, PROPRIO_DIM, SimEnv
from vlaopt.utils.seeds import derive_seed
from vlaopt.utils.timer import StageTimer

EVAL_DOMAIN = 0x6576616C  # "eval": keeps evaluation states apart from the collection states of the same seed


def eval_seed(seed: int, task: str, episode: int) -> int:
    """The env seed of evaluation episode `episode` of `task` under base seed `seed`; stable everywhere."""
    if seed < 0 or episode < 0:
        raise ValueError(f"seed and episode must be >= 0, got seed={seed}, episode={episode}")
    return derive_seed(EVAL_DOMAIN, seed, task, episode)


def env_cameras(config: VLAConfig, cameras: Sequence[str] | None = None) -> tuple[str, ...]:
    """The cameras to render for a model: `cameras` if given, else the collection default
    (corner4, topview); raises if their number, or the model's action / proprio size, does not fit."""
    if config.action_dim != ACTION_DIM:
        raise ValueError(f"the model predicts action_dim={config.action_dim}, MetaWorld actions have {ACTION_DIM}")
    if config.proprio_dim not in (0, PROPRIO_DIM):
        raise ValueError(f"the model takes proprio_dim={config.proprio_dim}, MetaWorld proprio has {PROPRIO_DIM} (or use 0)")
    names = tuple(cameras) if cameras else DEFAULT_CAMERAS
    if len(names) != config.cameras:
        hint = "" if cameras else f"; name its {config.cameras} camera(s) with --cameras"
        raise ValueError(f"the model takes {config.cameras} camera image(s) but the env renders {len(names)}: {list(names)}{hint}")
    return names


@dataclass(frozen=True)
class RolloutConfig:
    """How one episode runs: actions executed per predicted chunk (None: the whole chunk), step limit,
    whether to keep the frames (for a GIF), and the modeled latency: the control rate, the lead k of
    asynchronous execution (None: synchronous) and the blend weight of the new chunk's overlap."""

    execute: int | None = None
    max_steps: int = DEFAULT_MAX_STEPS
    record: bool = False
    lead: int | None = None
    control_hz: float = CONTROL_HZ
    blend: float = 0.0

    def __post_init__(self) -> None:
        if self.execute is not None and self.execute < 1:
            raise ValueError(f"execute={self.execute} must be at least 1 action per chunk")
        if self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be at least 1")
        if self.lead is not None and self.lead < 1:
            raise ValueError(f"lead={self.lead} must be at least 1 action (or None for synchronous execution)")
        if not self.control_hz > 0:
            raise ValueError(f"control_hz={self.control_hz} must be a positive rate")
        if not 0 <= self.blend <= 1:
            raise ValueError(f"blend={self.blend} must be a weight in [0, 1]")
        if self.blend and self.lead is None:
            raise ValueError(f"blend={self.blend} mixes overlapping chunks, which only asynchronous execution has; set lead")


@dataclass
class EpisodeResult:
    """Outcome of one episode: success, env steps, predictions, the modeled stall (seconds the robot
    waited for predictions), mean milliseconds per prediction of each stage, the mean of the session's
    per-step reuse statistics; `frames` (T, H, cams * W, 3) only when recorded."""

    task: str
    episode: int
    seed: int
    success: bool
    steps: int
    predictions: int = 0
    stall_s: float = 0.0
    stage_ms: dict[str, float] = field(default_factory=dict)
    reuse: dict[str, float] = field(default_factory=dict)
    frames: np.ndarray | None = None


def executed_actions(chunk: int, cfg: RolloutConfig) -> int:
    """Actions executed per chunk of `chunk` under `cfg`; raises when `execute` or `lead` do not fit."""
    execute = chunk if cfg.execute is None else cfg.execute
    if execute > chunk:
        raise ValueError(f"execute={execute} exceeds the model's chunk of {chunk} actions")
    if cfg.lead is not None and 2 * cfg.lead > execute:
        raise ValueError(f"lead={cfg.lead} must be at most half the {execute} actions executed per chunk (each new "
                         "chunk runs from its lead-th action, and its last lead actions overlap the next prediction)")
    return execute


class _Policy:
    """The session of one episode, timed: each prediction's wall time and per-stage seconds."""

    def __init__(self, model: VLA, session: Session, instruction: str) -> None:
        self.model, self.session, self.instruction = model, session, instruction
        self.timer = StageTimer(model.device)
        self.predictions = 0

    def __call__(self, obs: dict[str, Any]) -> tuple[np.ndarray, float]:
        """The chunk (chunk, A) for one observation and the seconds its prediction took."""
        proprio = obs["proprio"][None] if self.model.config.proprio_dim else None
        start = time.perf_counter()
        actions = self.session.step(obs["images"][None], [self.instruction], proprio, timer=self.timer)[0]
        actions = actions.cpu().numpy()
        self.predictions += 1
        return actions, time.perf_counter() - start


def run_episode(model: VLA, env: SimEnv, task_episode: int, seed: int, cfg: RolloutConfig,
                session: Session | None = None) -> EpisodeResult:
    """Roll `model` out in `env` from the initial state of `seed` until success or `env.max_steps`,
    stepping `session` (default: `model.session()`), reset first; see the module docstring."""
    execute = executed_actions(model.config.chunk, cfg)
    session = session or model.session()
    session.reset()
    policy = _Policy(model, session, env.instruction)
    period = 1.0 / cfg.control_hz
    obs = env.reset(seed=seed)
    frames = [_frame(obs["images"])] if cfg.record else None
    current, stall = policy(obs)
    start, success, done = 0, False, False
    while not done:
        upcoming = None  # (chunk, prediction seconds) predicted during this chunk's last `lead` actions
        for i in range(start, execute):
            if cfg.lead is not None and i == execute - cfg.lead:
                upcoming = policy(obs)
            action = current[i]
            if upcoming is not None and cfg.blend:
                overlap = i - (execute - cfg.lead)  # index of this step in the new chunk
                if overlap >= math.ceil(upcoming[1] / period):  # the new chunk has arrived
                    action = (1 - cfg.blend) * action + cfg.blend * upcoming[0][overlap]
            obs, success, done = env.step(action)
            if frames is not None:
                frames.append(_frame(obs["images"]))
            if done:
                break
        if done:
            break
        if upcoming is None:
            current, seconds = policy(obs)
            stall += seconds
            start = 0
        else:
            current, seconds = upcoming
            stall += max(0.0, seconds - cfg.lead * period)
            start = cfg.lead
    stages = {name: 1000 * seconds / policy.predictions for name, seconds in policy.timer.result().items()}
    return EpisodeResult(env.task, task_episode, seed, success, env.steps, policy.predictions, stall, stages,
                         mean_stats(session.history), np.stack(frames) if frames else None)


def mean_stats(records: list[dict[str, Any]]) -> dict[str, float]:
    """The mean of each numeric entry over the records that hold it (booleans as fractions): a
    session's per-step statistics, or episodes' stage times."""
    keys = dict.fromkeys(key for record in records for key in record)
    return {key: float(np.mean([float(r[key]) for r in records if key in r])) for key in keys}


def _frame(images: np.ndarray) -> np.ndarray:
    """The cameras of one observation side by side: (cams, H, W, 3) -> (H, cams * W, 3)."""
    return np.concatenate(list(images), axis=1)
