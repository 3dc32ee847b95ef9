"""The recipes `vla-opt bench` compares when none are given, and loading user recipe files: a file
holding a YAML list is one recipe named by the file stem; a file holding a mapping of names to lists
is a set of recipes (e.g. `configs/bench/token_pruning.yaml`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlaopt.optimize import load_recipe
from vlaopt.optimize.recipe import read_recipe_file

CALIBRATION = {"samples": 16}  # held-out observations the data-driven steps calibrate on

DEFAULT_RECIPES: dict[str, list[dict[str, Any]]] = {
    "baseline": [],
    "fastv-50": [{"token_pruning": {"method": "fastv", "layer": 1, "keep": 0.5}}],
    "fastv-25": [{"token_pruning": {"method": "fastv", "layer": 1, "keep": 0.25}}],
    "pooling-25": [{"token_pruning": {"method": "pooling", "keep": 0.25}}],
    "divprune-25": [{"token_pruning": {"method": "divprune", "keep": 0.25}}],
    "random-25": [{"token_pruning": {"method": "random", "keep": 0.25}}],
    "lightvla": [{"token_pruning": {"method": "lightvla"}}],
    "shortgpt-1": [{"layer_pruning": {"method": "shortgpt", "n": 1, "calibration": CALIBRATION}}],
    "attn-drop-1": [{"layer_pruning": {"method": "attention_drop", "n": 1, "calibration": CALIBRATION}}],
    "wanda-2:4": [{"weight_pruning": {"method": "wanda", "pattern": "2:4", "calibration": CALIBRATION}}],
    "int8": [{"quantize": {"method": "int8"}}],
    "pooling-25+int8": [{"token_pruning": {"method": "pooling", "keep": 0.25}}, {"quantize": {"method": "int8"}}],
}

QUICK_RECIPES = ["baseline", "fastv-25", "pooling-25"]
COMPILE_STEP: dict[str, Any] = {"compile": {}}
"""What `vla-opt bench --compile` appends to each recipe for its compiled twin (inductor, static shapes)."""


def with_compiled(recipes: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Each recipe followed by its compiled twin, named `<name>+compile` (the baseline's is `compiled`)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, recipe in recipes.items():
        out[name] = recipe
        if not any("compile" in entry for entry in recipe):
            out["compiled" if name == "baseline" else f"{name}+compile"] = [*recipe, COMPILE_STEP]
    return out


def recipes_from_files(paths: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Recipes from YAML files (a list: one recipe named by the file stem; a mapping: named recipes);
    the baseline (no steps) is always included first."""
    out: dict[str, list[dict[str, Any]]] = {"baseline": []}
    for path in paths:
        data = read_recipe_file(path)
        named = data.items() if isinstance(data, dict) else [(Path(path).stem, data or [])]
        for name, recipe in named:
            if name in out and (name != "baseline" or recipe):
                raise ValueError(f"two recipes are named {name!r} (file {path}); rename one of them")
            if not isinstance(recipe, list):
                raise ValueError(f"recipe {name!r} in {path} is {recipe!r}; expected a list of {{step: {{params}}}}")
            out[str(name)] = load_recipe(recipe)
    return out
