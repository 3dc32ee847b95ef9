"""The reference VLA: vision encoder, projector, LM layer loop with hooks, action heads."""

from vlaopt.model.vla import VLA

__all__ = ["VLA"]
