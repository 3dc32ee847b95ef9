"""Optimizations as transforms of the one inference path: `apply(model, recipe)`.

A recipe is an ordered list of `{step: {params}}` (YAML or Python). Step kinds register by name:
`token_pruning` (tokens/), and the families that follow the same pattern.
"""

import vlaopt.optimize.compile  # noqa: F401  (registers the compile step)
from vlaopt.optimize import decoding, head, kv, layers, quant, temporal, tokens, weights  # noqa: F401  (register steps)
from vlaopt.optimize.loading import load
from vlaopt.optimize.recipe import STEPS, apply, load_recipe, rebuild

__all__ = ["STEPS", "apply", "load", "load_recipe", "rebuild"]
