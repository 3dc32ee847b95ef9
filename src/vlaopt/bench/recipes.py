"""The recipes `vla-opt bench` compares when none are given, and loading user recipe files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlaopt.optimize import load_recipe

DEFAULT_RECIPES: dict[str, list[dict[str, Any]]] = {
    "baseline": [],
    "fastv-50": [{"token_pruning": {"method": "fastv", "layer": 1, "keep": 0.5}}],
    "fastv-25": [{"token_pruning": {"method": "fastv", "layer": 1, "keep": 0.25}}],
    "pooling-25": [{"token_pruning": {"method": "pooling", "keep": 0.25}}],
    "divprune-25": [{"token_pruning": {"method": "divprune", "keep": 0.25}}],
    "random-25": [{"token_pruning": {"method": "random", "keep": 0.25}}],
    "lightvla": [{"token_pruning": {"method": "lightvla"}}],
}

QUICK_RECIPES = ["baseline", "fastv-25", "pooling-25"]


def recipes_from_files(paths: list[str]) -> dict[str, list[dict[str, Any]]]:
    """One recipe per YAML file, named by the file stem; the baseline is always included first."""
    out: dict[str, list[dict[str, Any]]] = {"baseline": []}
    for path in paths:
        name = Path(path).stem
        if name in out:
            raise ValueError(f"two recipes are named {name!r} (file {path}); rename one of the files")
        out[name] = load_recipe(path)
    return out
