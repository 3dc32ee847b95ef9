"""vla-opt: make Vision-Language-Action policies fast at inference time, and measure the cost.

The public names load lazily, so light subpackages (sim, data) do not pay for torch + transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VLA": "vlaopt.model.vla",
    "VLAConfig": "vlaopt.config",
    "VisionConfig": "vlaopt.config",
    "LMConfig": "vlaopt.config",
    "HeadConfig": "vlaopt.config",
    "apply": "vlaopt.optimize",
    "load": "vlaopt.optimize",
    "load_recipe": "vlaopt.optimize",
}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlaopt' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
