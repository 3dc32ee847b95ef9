"""Visual-token pruning: lightvla, fastv, divprune, pooling, random; step `token_pruning`."""

from vlaopt.optimize.tokens import divprune, fastv, lightvla, pooling, random, step  # noqa: F401
from vlaopt.optimize.tokens.base import PRUNERS

__all__ = ["PRUNERS"]
