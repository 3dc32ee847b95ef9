"""Compiled execution: the `compile` recipe step (step.py)."""

from vlaopt.optimize.compile import step  # noqa: F401  (registers the step)
