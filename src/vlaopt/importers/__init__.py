"""Checkpoints trained elsewhere as vla-opt models: `import_checkpoint(format, src)` and
`vla-opt import --format F SRC --out DIR`. One module per source project; each registers its
formats in `IMPORTERS` (base.py)."""

from vlaopt.importers import oft  # noqa: F401  (registers oft, lightvla)
from vlaopt.importers.base import IMPORTERS, UnsupportedCheckpoint, import_checkpoint

__all__ = ["IMPORTERS", "UnsupportedCheckpoint", "import_checkpoint"]
