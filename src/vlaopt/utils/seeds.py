"""Stable seeds derived from several parts (ints and names), the same on every machine and process."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int | str) -> int:
    """A 32-bit seed from `parts`; strings enter as their UTF-8 bytes read as one integer
    (NumPy's SeedSequence takes arbitrarily large ints)."""
    entropy = [int.from_bytes(p.encode(), "little") if isinstance(p, str) else int(p) for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])
