"""Optimizations of the action head: `flow_steps` (fewer flow / denoising steps)."""

from vlaopt.optimize.head import flow_steps  # noqa: F401  (registers the flow_steps step)
