"""Loading a saved model, optimized or not: `vlaopt.load(directory)`.

It lives here, beside the recipe registry, because re-creating an optimized model's structure needs
the recipe steps, and `model/` knows nothing of them: `VLA.from_pretrained` builds the plain model,
this function hands it `rebuild` to replay the recorded recipe before the weights load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlaopt.model.vla import VLA
from vlaopt.optimize.recipe import rebuild


def load(directory: str | Path, device: str | torch.device = "cpu") -> VLA:
    """The model saved in `directory` ("default": the bundled policy), with its recipe replayed."""
    return VLA.from_pretrained(directory, device, rebuild=rebuild)
