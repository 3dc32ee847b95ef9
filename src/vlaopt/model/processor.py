"""Preprocessing: raw observations -> checked model inputs (in the spirit of LeRobot's processors).

A `Processor` checks a batch of raw observations (images, instructions, proprio) against the model's
configuration, with one error naming the bad value, and tokenizes the instructions into OpenVLA's
prompt (or pi0's / SmolVLA's: `prompt_style`), right-padded across the batch. Everything a
caller may get wrong is caught here, before any
network runs (an instruction too long for the LM's positions, too). The model then only encodes
`ModelInputs`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from vlaopt.config import VLAConfig

PROMPT_CACHE_SIZE = 1024
"""Instructions whose prompt ids a `Processor` keeps (least recently used ones are dropped first)."""


def prompt_text(instruction: str) -> str:
    """OpenVLA's prompt template around a task instruction."""
    return f"In: What action should the robot take to {instruction.strip().lower()}?\nOut:"


def paligemma_text(instruction: str) -> str:
    """pi0's prompt (openpi's PaligemmaTokenizer, LeRobot's newline step): the instruction cleaned of
    underscores and newlines, then "\n", the start of the answer; the BOS goes before it, after the images."""
    return instruction.strip().replace("_", " ").replace("\n", " ") + "\n"


@dataclass
class Observation:
    """A batch of raw observations, the one observation type of vla-opt: images uint8 (B, cams, H, W, 3)
    (numpy or torch), B instructions, proprio (B, P) or None. It unpacks as `(images, instructions,
    proprio)`, so `model.predict_action(*obs)` works, and a 3-tuple converts with `Observation.of`."""

    images: Any
    instructions: list[str]
    proprio: Any = None

    @classmethod
    def of(cls, value: Observation | tuple[Any, Sequence[str] | str, Any], where: str = "observation") -> Observation:
        """An Observation from itself or an `(images, instructions, proprio)` tuple (one error otherwise)."""
        if isinstance(value, Observation):
            return value
        if not isinstance(value, tuple) or len(value) != 3:
            raise ValueError(f"{where} is a {type(value).__name__}; expected an Observation or a tuple "
                             "(images (B, cams, H, W, 3) uint8, instructions (B strings), proprio (B, P) or None)")
        images, instructions, proprio = value
        return cls(images, [instructions] if isinstance(instructions, str) else list(instructions), proprio)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.images, self.instructions, self.proprio))

    def __len__(self) -> int:
        return len(self.instructions)

    def take(self, idx: slice | torch.Tensor) -> Observation:
        """The samples at `idx` (a slice, or an index tensor), of every field (subclass fields too)."""
        def pick(value: Any) -> Any:
            if value is None or isinstance(idx, slice):
                return None if value is None else value[idx]
            return [value[i] for i in idx.tolist()] if isinstance(value, list) else value[idx]

        return replace(self, **{f.name: pick(getattr(self, f.name)) for f in fields(self)})

    def batches(self, size: int) -> list[Observation]:
        """Consecutive batches of at most `size` samples."""
        return [self.take(slice(i, i + size)) for i in range(0, len(self), size)]


@dataclass
class ModelInputs:
    """A checked batch on the model's device: images uint8 (B, cams, H, W, 3), the instructions,
    proprio float32 (B, P) or None, and the right-padded prompt ids (B, L) with their validity."""

    images: torch.Tensor
    instructions: list[str]
    proprio: torch.Tensor | None
    prompt_ids: torch.Tensor
    prompt_valid: torch.Tensor

    @property
    def batch(self) -> int:
        return self.images.shape[0]


class Processor:
    """Checks and tokenizes raw observations for one model (see the module docstring).

    `fixed_positions` is the number of sequence positions besides the prompt (BOS, visual, proprio,
    action slots, STOP); with the LM's `max_positions` it bounds the prompt length."""

    def __init__(self, config: VLAConfig, tokenizer: PreTrainedTokenizerBase, pad_id: int, bos_id: int,
                 fixed_positions: int, max_positions: int | None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.bos_id = bos_id
        self.fixed_positions = fixed_positions
        self.max_positions = max_positions
        self._prompt_cache: OrderedDict[str, list[int]] = OrderedDict()
        # prompts are right-padded to a multiple of this many tokens (padding is masked): a compiled
        # model with static shapes then meets a few prompt lengths instead of one per instruction
        self.prompt_multiple = 1

    def __call__(self, images: Any, instructions: Sequence[str] | str, proprio: Any = None,
                 device: torch.device | str = "cpu") -> ModelInputs:
        images = self.check_images(images)
        instructions = self.check_instructions(instructions, images.shape[0])
        proprio = self.check_proprio(proprio, images.shape[0])
        ids, valid = self.prompt_ids(instructions)
        return ModelInputs(images.to(device), instructions, None if proprio is None else proprio.to(device),
                           ids.to(device), valid.to(device))

    def check_images(self, images: Any) -> torch.Tensor:
        """uint8 images (B, cameras, H, W, 3) as a tensor, B >= 1."""
        cfg = self.config
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a uint8 array or tensor, got {type(images).__name__}")
        if images.dtype != torch.uint8:
            raise ValueError(f"images have dtype {images.dtype}, expected uint8 (B, cameras, H, W, 3)")
        size = cfg.vision.image_size
        expected = f"(B, {cfg.cameras}, {size}, {size}, 3)"
        if images.ndim != 5:
            raise ValueError(f"images have shape {tuple(images.shape)}, expected {expected}")
        if images.shape[-1] != 3:
            raise ValueError(f"images have {images.shape[-1]} channels, expected 3 (RGB) in shape {expected}")
        if images.shape[1] != cfg.cameras:
            raise ValueError(f"images have {images.shape[1]} cameras, expected {cfg.cameras} in shape {expected}")
        if tuple(images.shape[2:4]) != (size, size):
            raise ValueError(f"images are {images.shape[2]}x{images.shape[3]}, expected {size}x{size} in shape {expected}")
        if images.shape[0] == 0:
            raise ValueError(f"images have shape {tuple(images.shape)}: a batch of 0 observations; expected at least one")
        return images

    @staticmethod
    def check_instructions(instructions: Sequence[str] | str, batch: int) -> list[str]:
        """One non-empty instruction string per sample."""
        if isinstance(instructions, str):
            instructions = [instructions]
        instructions = list(instructions)
        if len(instructions) != batch:
            raise ValueError(f"got {len(instructions)} instructions for a batch of {batch} images")
        for i, text in enumerate(instructions):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"instruction {i} is {text!r}, expected a non-empty string")
        return instructions

    def check_proprio(self, proprio: Any, batch: int) -> torch.Tensor | None:
        """Finite float32 proprio (B, P), or None for a model without proprio."""
        dim = self.config.proprio_dim
        if dim == 0:
            if proprio is not None:
                raise ValueError("proprio was given but this model has proprio_dim=0")
            return None
        if proprio is None:
            raise ValueError(f"this model needs proprio of shape ({batch}, {dim})")
        proprio = torch.as_tensor(proprio, dtype=torch.float32)
        if tuple(proprio.shape) != (batch, dim):
            raise ValueError(f"proprio has shape {tuple(proprio.shape)}, expected ({batch}, {dim})")
        if not torch.isfinite(proprio).all():
            bad = (~torch.isfinite(proprio)).nonzero()[0].tolist()
            raise ValueError(f"proprio contains a non-finite value at index {bad}: {proprio[tuple(bad)].item()}")
        return proprio

    def tokens(self, instruction: str) -> list[int]:
        """The prompt token ids of one instruction, cached: a closed-loop episode repeats its instruction at
        every step (the cache keeps the `PROMPT_CACHE_SIZE` most recently used instructions)."""
        ids = self._prompt_cache.get(instruction)
        if ids is not None:
            self._prompt_cache.move_to_end(instruction)
            return ids
        if len(self._prompt_cache) >= PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        if self.config.prompt_style == "paligemma":
            ids = [self.bos_id] + self.tokenizer(paligemma_text(instruction), add_special_tokens=False)["input_ids"]
        elif self.config.prompt_style == "smolvla":  # LeRobot's newline step, no BOS
            text = instruction if instruction.endswith("\n") else instruction + "\n"
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(prompt_text(instruction), add_special_tokens=False)["input_ids"]
        suffix = list(self.config.prompt_suffix_ids)
        if suffix and ids[-len(suffix):] != suffix:  # OFT appends Llama-2's empty token unless it ends the prompt
            ids = ids + suffix
        self._prompt_cache[instruction] = ids
        return ids

    def prompt_ids(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded prompt ids (B, L) and their validity, L the longest prompt rounded up to a multiple of
        `prompt_multiple`; refuses a prompt the LM has no positions for."""
        ids = [self.tokens(t) for t in instructions]
        if self.max_positions is not None:
            room = self.max_positions - self.fixed_positions
            for i, x in enumerate(ids):
                if len(x) > room:
                    raise ValueError(
                        f"instruction {i} ({len(instructions[i])} characters) takes {len(x)} prompt tokens: the sequence "
                        f"would hold {self.fixed_positions + len(x)} positions, beyond the LM's "
                        f"max_position_embeddings={self.max_positions}; shorten it to at most {room} prompt tokens")
        length = -(-max(len(x) for x in ids) // self.prompt_multiple) * self.prompt_multiple
        out = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        valid = torch.zeros((len(ids), length), dtype=torch.bool)
        for i, x in enumerate(ids):
            out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            valid[i, : len(x)] = True
        return out, valid
