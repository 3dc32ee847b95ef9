"""Saving and loading model weights as safetensors, with one clear error per bad checkpoint.

Tied parameters (e.g. an LM whose output matrix is its input embedding) are stored once, under the
first name the state dict lists them by.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vlaopt.utils.io import atomic_write


class CheckpointError(ValueError):
    """A checkpoint directory or weight file that does not fit the model it should load into."""


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor kept once (first name wins)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def weight_size(model: nn.Module) -> tuple[int, int]:
    """Elements and bytes of the model's saved tensors (tied ones once; int8 weights and their scales
    counted, which `parameters()` misses since they are buffers)."""
    state = unique_state(model)
    return sum(t.numel() for t in state.values()), sum(t.numel() * t.element_size() for t in state.values())


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the model's unique tensors to a safetensors file, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in unique_state(model).items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors file into `model`, naming any missing, unexpected or mis-shaped key."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file {path} is missing")
    try:
        loaded = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"weight file {path} cannot be read as safetensors: {exc}") from exc
    expected = unique_state(model)
    missing = [k for k in expected if k not in loaded]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"weight file {path} lacks key {missing[0]!r}{more}")
    unexpected = [k for k in loaded if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"weight file {path} has unexpected key {unexpected[0]!r}{more}; it belongs to another model")
    for key, tensor in expected.items():
        if tuple(loaded[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"weight {key!r} in {path} has shape {tuple(loaded[key].shape)}, expected {tuple(tensor.shape)}"
            )
        if loaded[key].dtype != tensor.dtype:
            raise CheckpointError(f"weight {key!r} in {path} has dtype {loaded[key].dtype}, expected {tensor.dtype} "
                                  "(cast the model before loading, or save it in the dtype you load it in)")
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(loaded[key])
