"""One closed-loop episode: the policy sees camera images, proprio and the task instruction, predicts
an action chunk, and the first `execute` actions of it run in the simulator before it looks again.

Episode seeds come from (base seed, task, episode index) alone, so two models evaluated with the same
base seed start from identical initial states, however the episodes are spread over workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlaopt.config import VLAConfig
from vlaopt.model.vla import VLA
from vlaopt.sim.env import ACTION_DIM, DEFAULT_CAMERAS, DEFAULT_MAX_STEPS, PROPRIO_DIM, SimEnv
from vlaopt.utils.seeds import derive_seed

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
    and whether to keep the frames (for a GIF)."""

    execute: int | None = None
    max_steps: int = DEFAULT_MAX_STEPS
    record: bool = False

    def __post_init__(self) -> None:
        if self.execute is not None and self.execute < 1:
            raise ValueError(f"execute={self.execute} must be at least 1 action per chunk")
        if self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be at least 1")


@dataclass
class EpisodeResult:
    """Outcome of one episode; `frames` (T, H, cams * W, 3) only when recorded."""

    task: str
    episode: int
    seed: int
    success: bool
    steps: int
    frames: np.ndarray | None = None


def run_episode(model: VLA, env: SimEnv, task_episode: int, seed: int, cfg: RolloutConfig) -> EpisodeResult:
    """Roll `model` out in `env` from the initial state of `seed` until success or `env.max_steps`."""
    chunk = model.config.chunk
    execute = chunk if cfg.execute is None else cfg.execute
    if execute > chunk:
        raise ValueError(f"execute={execute} exceeds the model's chunk of {chunk} actions")
    obs = env.reset(seed=seed)
    frames = [_frame(obs["images"])] if cfg.record else None
    success = done = False
    while not done:
        proprio = obs["proprio"][None] if model.config.proprio_dim else None
        actions = model.predict_action(obs["images"][None], [env.instruction], proprio)[0].cpu().numpy()
        for action in actions[:execute]:
            obs, success, done = env.step(action)
            if frames is not None:
                frames.append(_frame(obs["images"]))
            if done:
                break
    return EpisodeResult(env.task, task_episode, seed, success, env.steps, np.stack(frames) if frames else None)


def _frame(images: np.ndarray) -> np.ndarray:
    """The cameras of one observation side by side: (cams, H, W, 3) -> (H, cams * W, 3)."""
    return np.concatenate(list(images), axis=1)
