"""Checkpoints trained elsewhere as vla-opt models: `import_checkpoint(format, src)` and
`vla-opt import --format F SRC --out DIR`. One module per source project; each registers its
formats in `IMPORTERS` (base.py): oft, lightvla (oft.py), openpi-pytorch, lerobot-pi0 (pi0.py),
lerobot-smolvla (smolvla.py)."""

from vlaopt.importers import oft, pi0, smolvla  # noqa: F401  (register the formats)
from vlaopt.importers.base import IMPORTERS, UnsupportedCheckpoint, import_checkpoint

__all__ = ["IMPORTERS", "UnsupportedCheckpoint", "import_checkpoint"]
