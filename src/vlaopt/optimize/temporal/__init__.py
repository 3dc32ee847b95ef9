"""Reuse across control steps: `temporal_reuse` (VLA-Cache's static-patch key/value reuse)."""

from vlaopt.optimize.temporal import step  # noqa: F401  (registers the temporal_reuse step)
