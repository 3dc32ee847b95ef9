"""Action heads behind one API, registered by name: l1, discrete, diffusion, flow."""

from vlaopt.model.heads import diffusion, discrete, flow, l1  # noqa: F401  (registration)
from vlaopt.model.heads.base import HEADS, ActionHead, build_head

__all__ = ["HEADS", "ActionHead", "build_head"]
