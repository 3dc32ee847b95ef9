"""MetaWorld simulation: task names and instructions, an offscreen-rendering env, scripted policies.

MuJoCo picks its OpenGL backend once, when it is first imported; importing this package makes that
backend headless EGL unless MUJOCO_GL is already set (e.g. to `osmesa`).
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
