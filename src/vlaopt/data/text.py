"""Plain text as LM token windows: the calibration source `text` and the perplexity evaluation read
their tokens here, so both cut a file the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def text_windows(tokenizer: Any, path: str | Path, count: int, length: int, skip: int = 0) -> torch.Tensor:
    """`count` consecutive, non-overlapping windows (count, length) of token ids from the UTF-8 text file
    at `path` (tokenized whole, no special tokens added), after its first `skip` windows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    need = (skip + count) * length
    if len(ids) < need:
        raise ValueError(f"{path} holds {len(ids)} tokens, but {skip} + {count} windows of {length} tokens need "
                         f"{need}; use a longer text, fewer or shorter windows")
    return torch.tensor(ids[skip * length : need], dtype=torch.long).view(count, length)
