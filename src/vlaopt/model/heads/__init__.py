"""Action heads registered by name: l1, discrete, diffusion, flow (one API over the action-slot states)
and expert (an action expert over the VLM's KV cache)."""

from vlaopt.model.heads import diffusion, discrete, expert, flow, l1  # noqa: F401  (registration)
from vlaopt.model.heads.base import HEADS, ActionHead, build_head

__all__ = ["HEADS", "ActionHead", "build_head"]
