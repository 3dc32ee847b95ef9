"""Depth pruning of the LM: shortgpt (blocks), attention_drop and gate_norm (attention sublayers);
step `layer_pruning`."""

from vlaopt.optimize.layers import attention_drop, gate_norm, shortgpt, step  # noqa: F401
from vlaopt.optimize.layers.base import LAYER_METHODS

__all__ = ["LAYER_METHODS"]
