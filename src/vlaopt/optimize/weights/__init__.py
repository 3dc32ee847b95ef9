"""Weight pruning of the LM's linear layers: magnitude, wanda, sparsegpt, unstructured or N:M;
step `weight_pruning`."""

from vlaopt.optimize.weights import magnitude, sparsegpt, step, wanda  # noqa: F401
from vlaopt.optimize.weights.base import WEIGHT_PRUNERS

__all__ = ["WEIGHT_PRUNERS"]
