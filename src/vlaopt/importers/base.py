"""What every importer shares: the registry, the one refusal error, reading weight files, and a
weight map that must account for every source tensor.

An importer reads a checkpoint trained elsewhere and returns a vla-opt `VLA` holding its weights.
A tensor the importer neither maps nor knows to be unused at inference is refused by name, so a
checkpoint with a part vla-opt does not model never turns into a silently different model.
"""

from __future__ import annotations

import inspect
import json
import pickle
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from vlaopt.model.checkpoint import unique_state
from vlaopt.model.tokenizer import load_tokenizer
from vlaopt.utils.registry import Registry

IMPORTERS: Registry[Callable[..., Any]] = Registry("checkpoint format")
"""Format name -> `fn(src: Path, **options) -> VLA`."""


class UnsupportedCheckpoint(ValueError):
    """A checkpoint, or a part of one, that vla-opt cannot represent; the message names it."""


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UnsupportedCheckpoint(f"{path.parent} lacks {path.name}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UnsupportedCheckpoint(f"{path} is not valid JSON: {exc}") from exc


def read_safetensors(src: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """The tensors of `name` in `src`, or of every shard its `<name>.index.json` lists."""
    index = src / f"{name}.index.json"
    if index.is_file():
        files = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not files:
            raise UnsupportedCheckpoint(f"{index} lists no weight files in its weight_map")
    elif (src / name).is_file():
        files = [name]
    else:
        raise UnsupportedCheckpoint(f"{src} has neither {name} nor {name}.index.json")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(src / file)))
    return tensors


def read_pt(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch state dict read with `weights_only=True` (no pickled code runs), without the
    `module.` prefix that DistributedDataParallel training leaves on every key."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise UnsupportedCheckpoint(f"{path} cannot be read as a weights-only state dict: {exc}") from exc
    if not isinstance(state, dict):
        raise UnsupportedCheckpoint(f"{path} holds a {type(state).__name__}, expected a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings off (a tokenizer load reads the source's config.json, whose model type
    is no tokenizer's, and warns)."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def source_tokenizer(folder: Path, hint: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `folder`; `hint` says where the project's tokenizer is, when there is none."""
    try:
        with quiet_transformers():
            return load_tokenizer(str(folder))
    except (OSError, ValueError) as exc:
        raise UnsupportedCheckpoint(f"no tokenizer could be loaded from {folder} ({exc}); {hint}") from exc


def find_one(src: Path, pattern: str) -> Path | None:
    """The one file in `src` matching `pattern`, None if there is none; several are refused."""
    found = sorted(src.glob(pattern))
    if len(found) > 1:
        raise UnsupportedCheckpoint(f"{src} holds {len(found)} files matching {pattern}: "
                                    f"{', '.join(p.name for p in found)}; keep the one to import")
    return found[0] if found else None


class WeightMap:
    """Source tensors being moved to vla-opt names; `finish` refuses whatever was not accounted for."""

    def __init__(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        self.left = dict(tensors)
        self.source = source
        self.out: dict[str, torch.Tensor] = {}
        self.origin: dict[str, str] = {}  # our name -> the source's, for messages

    def has(self, key: str) -> bool:
        return key in self.left

    def peek(self, key: str) -> torch.Tensor:
        if key not in self.left:
            raise UnsupportedCheckpoint(f"{self.source} lacks tensor {key}")
        return self.left[key]

    def move(self, key: str, to: str, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        tensor = self.peek(key)
        del self.left[key]
        self.out[to] = tensor if fn is None else fn(tensor)
        self.origin[to] = f"{key} of {self.source}"

    def add(self, to: str, tensor: torch.Tensor, why: str) -> None:
        """A model tensor the source has no counterpart for, given its exact value (`why` says which)."""
        self.out[to] = tensor
        self.origin[to] = f"({why})"

    def move_prefix(self, prefix: str, to: str, rename: Callable[[str], str] = lambda k: k) -> None:
        """Every tensor under `prefix` to `to` + its renamed remainder."""
        keys = [k for k in self.left if k.startswith(prefix)]
        if not keys:
            raise UnsupportedCheckpoint(f"{self.source} has no tensors under {prefix}")
        for key in keys:
            self.move(key, to + rename(key[len(prefix):]))

    def drop(self, prefixes: Iterable[str]) -> None:
        """Tensors known to be unused at inference (e.g. a pooling head the features skip)."""
        prefixes = tuple(prefixes)
        for key in [k for k in self.left if k.startswith(prefixes)]:
            del self.left[key]

    def finish(self) -> dict[str, torch.Tensor]:
        if self.left:
            names = sorted(self.left)
            more = f" (and {len(names) - 3} more)" if len(names) > 3 else ""
            raise UnsupportedCheckpoint(f"{self.source} holds tensors vla-opt does not model: "
                                        f"{', '.join(names[:3])}{more}")
        return self.out


def layer_count(weights: WeightMap, prefix: str) -> int:
    """How many numbered layers `prefix`N. the source holds."""
    found = {int(k[len(prefix):].split(".")[0]) for k in weights.left if k.startswith(prefix)}
    if not found:
        raise UnsupportedCheckpoint(f"{weights.source} has no tensors under {prefix}")
    return max(found) + 1


def load_into(model: torch.nn.Module, maps: list[WeightMap],
              own: tuple[str, ...] = ("action_norm.", "proprio_norm.")) -> None:
    """Load the mapped tensors into `model`: every model tensor (a tied one once) must be given, with
    its shape, except those under `own` (the normalization bounds, set from the statistics)."""
    state = {k: v for m in maps for k, v in m.finish().items()}
    origin = {k: v for m in maps for k, v in m.origin.items()}
    expected = {k: v for k, v in unique_state(model).items() if not k.startswith(own)}
    extra = sorted(set(state) - set(expected))
    if extra:
        raise UnsupportedCheckpoint(f"vla-opt does not model tensor {origin[extra[0]]}"
                                    + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UnsupportedCheckpoint(f"the checkpoint gives no tensor for {missing[0]} of the model built from its "
                                    "config" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UnsupportedCheckpoint(f"tensor {origin[key]} has shape {tuple(tensor.shape)}; the model built "
                                        f"from its config expects {tuple(expected[key].shape)} for {key}")
    with torch.no_grad():
        for key, tensor in state.items():
            expected[key].copy_(tensor)


def options_of(fmt: str) -> list[str]:
    """The options format `fmt`'s importer takes besides the source folder."""
    return [p for p in inspect.signature(IMPORTERS.get(fmt)).parameters if p != "src"]


def import_checkpoint(fmt: str, src: str | Path, **options: Any) -> Any:
    """The VLA that format `fmt`'s importer makes of the checkpoint folder `src`."""
    src = Path(src)
    known = options_of(fmt)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"option {unknown[0]!r} does not apply to format {fmt!r}; it takes {', '.join(known)}")
    if not src.is_dir():
        raise UnsupportedCheckpoint(f"checkpoint folder {src} does not exist")
    return IMPORTERS.get(fmt)(src, **options)
