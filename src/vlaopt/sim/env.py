"""A MetaWorld task with a seeded initial state and fast offscreen camera images.

A `Frame` is what a VLA sees of the env at one step: camera images (uint8, (n_cams, H, W, 3)) and
proprio (hand xyz and gripper opening); with the task instruction, a batch of frames makes a model
`Observation`. The full MetaWorld state, which includes object and goal positions, stays available
as `SimEnv.state` for scripted policies only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypedDict

import numpy as np

from vlaopt.sim.tasks import instruction

EGL_PACKAGES = "libegl1 libegl-mesa0 libgl1-mesa-dri"
"""The Debian packages that headless EGL rendering with Mesa needs."""


def _rendering_unavailable(cause: BaseException) -> RuntimeError:
    backend = os.environ.get("MUJOCO_GL", "")
    return RuntimeError(
        f"MuJoCo offscreen rendering with MUJOCO_GL={backend!r} is unavailable "
        f"({type(cause).__name__}: {cause}). On Debian/Ubuntu install the EGL libraries with "
        f"`apt-get install -y {EGL_PACKAGES}` (or set MUJOCO_GL=osmesa and install libosmesa6)."
    )


try:
    import mujoco
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(f"{error}; the simulator needs MetaWorld: pip install metaworld") from error
except (ImportError, AttributeError, OSError) as error:  # how PyOpenGL reports a missing libEGL
    raise _rendering_unavailable(error) from error

DEFAULT_CAMERAS: tuple[str, ...] = ("corner4", "topview")
"""A close three-quarter view of the table and a top view: together they place the goal in 3D."""
DEFAULT_IMAGE_SIZE = 64
DEFAULT_MAX_STEPS = 200
"""MetaWorld's experts finish MT10 tasks in 50-190 steps; MetaWorld's own horizon is 500."""
PROPRIO_DIM = 4
ACTION_DIM = 4
CONTROL_HZ = 80.0
"""MetaWorld's control rate: each env step is 5 MuJoCo steps of 2.5 ms (tests/test_sim.py checks it)."""


class Frame(TypedDict):
    """What the policy sees of the env at one step (one sample of a `vlaopt.model.processor.Observation`)."""

    images: np.ndarray  # uint8 (n_cams, H, W, 3)
    proprio: np.ndarray  # float32 (4,): hand x, y, z in metres, gripper opening in [0, 1]


class SimEnv:
    """One MetaWorld v3 task whose object and goal positions are fixed by `seed`, rendered offscreen.

    `reset()` always returns to the same initial state; `reset(seed=...)` draws a new one (the same
    state `SimEnv(task, seed)` starts from). `step` returns `(obs, success, done)`, where `done` is
    True once the task succeeded or `max_steps` steps were taken; stepping on after a success is
    allowed until `max_steps`. Call `close()` (or use `with`) to free the OpenGL context.
    """

    def __init__(
        self,
        task: str,
        seed: int,
        cameras: Sequence[str] = DEFAULT_CAMERAS,
        image_size: int = DEFAULT_IMAGE_SIZE,
        max_steps: int = DEFAULT_MAX_STEPS,
    ) -> None:
        self.task = task
        self.instruction = instruction(task)
        self.cameras = tuple(cameras)
        if not self.cameras:
            raise ValueError("cameras is empty; expected at least one camera name")
        if image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        self.image_size = image_size
        self.max_steps = max_steps
        _check_seed(seed)
        # Passing the seed makes MetaWorld's constructor restore NumPy's global RNG state after use.
        self._env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{task}-goal-observable"](seed=seed)
        self._env.max_path_length = max_steps
        self._renderer = None
        try:
            self._renderer = self._make_renderer()
        finally:
            if self._renderer is None:
                self._env.close()
        self._set_initial_state(seed)
        self._state: np.ndarray | None = None
        self.steps: int | None = None  # None until the first reset()

    def _make_renderer(self) -> mujoco.Renderer:
        """A renderer with MSAA, shadows and reflections off: ~15x faster in software GL, still clear."""
        model = self._env.model
        valid = [model.camera(i).name for i in range(model.ncam)]
        unknown = [name for name in self.cameras if name not in valid]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown} for task {self.task!r}; expected names from {valid}")
        model.vis.quality.offsamples = 0  # read when the rendering context is made
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.image_size)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.image_size)
        try:
            renderer = mujoco.Renderer(model, self.image_size, self.image_size)
        except Exception as error:  # EGL reports a missing driver as ImportError or RuntimeError
            raise _rendering_unavailable(error) from error
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        return renderer

    def _set_initial_state(self, seed: int) -> None:
        """Draw the object and goal positions from `seed` and freeze them for later resets.

        MetaWorld draws them from NumPy's global RNG on a reset with `_freeze_rand_vec` off, as its own
        seeded goal-observable constructors do; the global RNG state is restored afterwards.
        """
        _check_seed(seed)
        saved = np.random.get_state()
        np.random.seed(seed)
        try:
            self._env._freeze_rand_vec = False
            self._env.reset()
        finally:
            self._env._freeze_rand_vec = True
            np.random.set_state(saved)
        self.seed = seed

    @property
    def state(self) -> np.ndarray:
        """MetaWorld's 39-d state (hand, gripper, object poses, previous frame, goal); experts only."""
        if self._state is None:
            raise RuntimeError("call reset() before reading the state")
        return self._state

    def reset(self, seed: int | None = None) -> Frame:
        """Return to the initial state of `seed` (default: the current seed) and observe it."""
        if seed is not None and seed != self.seed:
            self._set_initial_state(seed)
        self._state, _ = self._env.reset()
        self.steps = 0
        return self._observe()

    def step(self, action: np.ndarray) -> tuple[Frame, bool, bool]:
        """Apply a (4,) action (xyz hand motion and gripper effort, each clipped to [-1, 1])."""
        if self.steps is None:
            raise RuntimeError("call reset() before step()")
        if self.steps >= self.max_steps:
            raise RuntimeError(f"the episode already took max_steps={self.max_steps} steps; call reset()")
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (ACTION_DIM,) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be {ACTION_DIM} finite numbers, got shape {action.shape}: {action}")
        self._state, _, _, _, info = self._env.step(np.clip(action, -1.0, 1.0))
        self.steps += 1
        success = bool(info["success"])
        return self._observe(), success, success or self.steps >= self.max_steps

    def _observe(self) -> Frame:
        images = np.empty((len(self.cameras), self.image_size, self.image_size, 3), dtype=np.uint8)
        for i, camera in enumerate(self.cameras):
            self._renderer.update_scene(self._env.data, camera=camera)
            frame = self._renderer.render()
            images[i] = frame[::-1, ::-1] if camera.startswith("corner") else frame  # corners hang upside down
        return Frame(images=images, proprio=self._state[:PROPRIO_DIM].astype(np.float32))

    def close(self) -> None:
        """Free the OpenGL context and the MetaWorld env; safe to call twice."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
            self._env.close()

    def __enter__(self) -> SimEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_seed(seed: int) -> None:
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
