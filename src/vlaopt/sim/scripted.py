"""MetaWorld's scripted policies (its hand-written "experts"), looked up by task name.

Named `ScriptedPolicy` so that "expert" means one thing in vla-opt: the action expert head.

They read the privileged state (object and goal positions), so they only serve to make demonstrations.
"""

from __future__ import annotations

import warnings

import numpy as np

from vlaopt.sim.env import SimEnv


class ScriptedPolicy:
    """The hand-written MetaWorld policy for one task."""

    def __init__(self, task: str) -> None:
        # Imported here, after vlaopt.sim.env has loaded MuJoCo and reported a missing EGL clearly.
        from metaworld.policies import ENV_POLICY_MAP

        if task not in ENV_POLICY_MAP:
            raise ValueError(f"no scripted policy for task {task!r}; expected one of {sorted(ENV_POLICY_MAP)}")
        self.task = task
        self._policy = ENV_POLICY_MAP[task]()

    def act(self, env: SimEnv) -> np.ndarray:
        """The scripted (4,) float32 action for the env's current state, clipped to [-1, 1] as the env does."""
        if env.task != self.task:
            raise ValueError(f"the scripted policy for {self.task!r} was asked to act in a {env.task!r} env")
        with warnings.catch_warnings():  # the policies warn on every step that their gains exceed 1
            warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
            action = self._policy.get_action(env.state)
        return np.clip(action, -1.0, 1.0).astype(np.float32)
