"""Recipes: ordered optimization steps applied to a VLA, recorded in its config so that a saved
optimized model rebuilds the same structure on load.

Each step kind parses its parameters into its typed config dataclass (`make_config`), resolves them
while applying (e.g. which layers a data-driven method chose) and records the resolved form with the
recipe format `version`; `rebuild` replays the structural part of a recorded recipe on a fresh
model before its weights are loaded, without data. Steps recorded before versions existed read as
version 1; a newer version than this vla-opt reads is refused by name.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlaopt.utils.files import read_yaml
from vlaopt.utils.registry import Registry

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA

STEPS: Registry[type[RecipeStep]] = Registry("recipe step")
FORMAT_VERSION = 1
"""Version of the recorded step format; bump it (and read the old one) when a step's record changes."""


class RecipeStep(ABC):
    """One kind of recipe step (e.g. `token_pruning`)."""

    def __init__(self, calibration: Sequence[Any] | None = None) -> None:
        self.calibration = calibration  # observation batches for the steps that calibrate on data

    @abstractmethod
    def apply(self, model: VLA, params: dict[str, Any]) -> dict[str, Any]:
        """Transform `model` in place; return the resolved parameters to record."""

    @abstractmethod
    def rebuild(self, model: VLA, resolved: dict[str, Any]) -> None:
        """Re-create the structure a recorded step made, on a freshly built model (no data)."""

    @classmethod
    def config_classes(cls) -> dict[type, str | None]:
        """The typed configs of this step kind: config dataclass -> the method it configures (None
        for a kind without methods). `apply` takes an instance of any of them as a step."""
        return {}


def make_config(cls: type, params: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from `params`, naming unknown keys and the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ValueError(f"{where}: unknown parameter(s) {unknown}; expected a subset of {sorted(names)}")
    return cls(**params)


def split_method(params: dict[str, Any], registry: Registry[Any], step: str) -> tuple[str, dict[str, Any]]:
    """The `method` a step names (checked against `registry`) and its other parameters."""
    params = dict(params)
    if "method" not in params:
        raise ValueError(f"{step} needs a method; expected one of {', '.join(registry.names())}")
    method = params.pop("method")
    registry.get(method)
    return method, params


def _recorded(name: str, resolved: dict[str, Any]) -> dict[str, Any]:
    """A recorded step's parameters without its format version (refusing a version from the future)."""
    params = dict(resolved)
    version = params.pop("version", 1)
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"recorded recipe step {name} has format version {version!r}; this vla-opt reads versions "
                         f"1..{FORMAT_VERSION} (the model was saved by a newer vla-opt?)")
    return params


def step_entry(step: Any) -> Any:
    """The `{kind: {params}}` entry (the YAML form) of a typed step config such as
    `FastVConfig(layer=2, keep=0.25)` or `Int8Config()`; any other value is returned as it is."""
    if not dataclasses.is_dataclass(step) or isinstance(step, type):
        return step
    for kind in STEPS.names():
        configs = STEPS.get(kind).config_classes()
        if type(step) in configs:
            method = configs[type(step)]
            params = {k: v for k, v in dataclasses.asdict(step).items() if not (k == "calibration" and v is None)}
            return {kind: params if method is None else {"method": method, **params}}
    raise ValueError(f"{type(step).__name__} is not the config of a recipe step; expected one of "
                     f"{', '.join(sorted(c.__name__ for k in STEPS.names() for c in STEPS.get(k).config_classes()))}")


def _entries(recipe: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(recipe, list):
        raise ValueError(f"a recipe must be a list of {{step: {{params}}}} entries, got {type(recipe).__name__}")
    out = []
    for i, entry in enumerate(step_entry(e) for e in recipe):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ValueError(f"recipe entry {i} is {entry!r}; expected one mapping {{step: {{params}}}}")
        (name, params), = entry.items()
        STEPS.get(name)
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ValueError(f"recipe entry {i} ({name}) has parameters {params!r}; expected a mapping")
        out.append((name, dict(params)))
    return out


def read_recipe_file(path: str | Path) -> Any:
    """The parsed YAML of a recipe file; a missing, empty or malformed file raises one error naming
    it (and the line of a syntax error)."""
    return read_yaml(path, "recipe file", allow_empty=True)


def load_recipe(source: str | Path | list[Any]) -> list[dict[str, Any]]:
    """A recipe (validated, as `{kind: {params}}` entries) from a YAML file path or a list of entries
    and/or typed step configs (`step_entry`)."""
    recipe = [step_entry(e) for e in source] if isinstance(source, list) else read_recipe_file(source) or []
    _entries(recipe)
    return recipe


def apply(model: VLA, recipe: str | Path | list[Any], calibration: Sequence[Any] | None = None) -> VLA:
    """Apply each step of `recipe` (a YAML file, or a list of `{kind: {params}}` entries and/or typed
    step configs such as `FastVConfig(layer=2, keep=0.25)`) to `model` in order, in place, in the
    spirit of torchao's `quantize_(model, Config)`; record them in `model.config.recipe`.
    `calibration` holds observation batches for steps that calibrate on data (`source: given`)."""
    for name, params in _entries(load_recipe(recipe)):
        if model.runner is not None:
            raise ValueError(f"recipe step {name} comes after compile, which must be the last step (a compiled graph "
                             "would run the modules as they were); apply it before compile, or to the model "
                             "saved without the compile step")
        params.pop("version", None)  # a recorded step may be applied again (e.g. copied from a config.json)
        resolved = STEPS.get(name)(calibration).apply(model, params)
        model.config.recipe.append({name: {**resolved, "version": FORMAT_VERSION}})
    return model


def rebuild(model: VLA, recipe: list[dict[str, Any]]) -> None:
    """Replay a recorded recipe's structure on a fresh model (`vlaopt.load` hands it to `VLA.from_pretrained`)."""
    for name, resolved in _entries(recipe):
        STEPS.get(name)().rebuild(model, _recorded(name, resolved))
    model.config.recipe = [dict(e) for e in recipe]
