"""The reference VLA (OpenVLA-OFT layout): vision encoder -> projector -> LM layer loop -> action head.

    images (B, cams, H, W, 3) uint8 -> patches -> projector -+
    proprio (B, P) ------------------> proprio projector ----+-> [BOS][visual][proprio][prompt][actions][STOP]
    instructions (B strings) --------> tokenizer -> embed ---+            -> decoder layers (hooks between)
                                       action-slot hidden states -> head -> unnormalize -> (B, chunk, action_dim)

Action-slot input embeddings are zero (OFT); action slots may attend to each other bidirectionally.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from vlaopt.config import VLAConfig
from vlaopt.model.checkpoint import (CheckpointError, load_weights, non_finite_entry, read_stats, replace_files,
                                     save_weights, verify_manifest)
from vlaopt.model.expert_policy import act, expert_loss
from vlaopt.model.heads import build_head
from vlaopt.model.language import LanguageModel, build_causal_lm
from vlaopt.model.layout import Layout, TokenState
from vlaopt.model.normalize import BoundsNormalizer
from vlaopt.model.tokenizer import load_tokenizer, special_ids
from vlaopt.model.vision import VisionEncoder, mlp_projector
from vlaopt.utils.io import atomic_write_text
from vlaopt.utils.timer import NULL_TIMER, Timer

CONFIG_FILE, WEIGHTS_FILE, STATS_FILE = "config.json", "model.safetensors", "stats.json"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")  # what a fast tokenizer's save_pretrained writes
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, STATS_FILE, *TOKENIZER_FILES)
"""The files `from_pretrained` needs; `save_pretrained` records them (and any other tokenizer file) in manifest.json."""
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "default"
"""The trained default policy shipped in the package (README, "The default policy")."""


def resolve_model_dir(name: str | Path) -> Path:
    """A model directory; the name "default" means the packaged default policy (use ./default for a
    local folder of that name)."""
    return DEFAULT_MODEL_DIR if str(name) == "default" else Path(name)


def prompt_text(instruction: str) -> str:
    """OpenVLA's prompt template around a task instruction."""
    return f"In: What action should the robot take to {instruction.strip().lower()}?\nOut:"


class VLA(nn.Module):
    """A Vision-Language-Action policy; see the module docstring for the data path."""

    def __init__(
        self, config: VLAConfig, tokenizer: PreTrainedTokenizerBase | None = None, load_lm_weights: bool = True
    ) -> None:
        super().__init__()
        self.config = config = copy.deepcopy(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.vision = VisionEncoder(config.vision)
            self.lm = LanguageModel(build_causal_lm(config.lm, load_weights=load_lm_weights))
            width = self.lm.hidden_size
            self.projector = mlp_projector(config.vision.feature_dim, width, fused=config.vision.kind == "fused")
            self.proprio_projector = mlp_projector(config.proprio_dim, width, False) if config.proprio_dim else None
            self.head = build_head(config.head, width, config.action_dim, config.chunk, self.lm.causal_lm.config)
        # A saved model must rebuild without the directory its LM came from.
        config.lm.hf_config = {k: v for k, v in self.lm.causal_lm.config.to_dict().items() if k != "transformers_version"}
        self.action_norm = BoundsNormalizer(config.action_dim)
        self.proprio_norm = BoundsNormalizer(config.proprio_dim)
        self.tokenizer = tokenizer or load_tokenizer(config.lm.pretrained or "builtin")
        if len(self.tokenizer) > self.lm.vocab_size:
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens but the LM vocabulary has {self.lm.vocab_size}"
            )
        self.bos_id, self.stop_id = special_ids(self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.stop_id if pad is None else pad
        if config.recipe:  # an optimized model: re-create the structure its recipe made
            from vlaopt.optimize import rebuild

            rebuild(self, config.recipe)

    # ---- construction ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def set_stats(self, stats: dict[str, Any]) -> None:
        """Normalization statistics: {"action": {"q01": [...], "q99": [...]}, "proprio": {...}}."""
        self.action_norm.set_stats(stats.get("action", {}), "action")
        if self.config.proprio_dim:
            self.proprio_norm.set_stats(stats.get("proprio", {}), "proprio")

    def stats(self) -> dict[str, Any]:
        out = {"action": self.action_norm.stats()}
        if self.config.proprio_dim:
            out["proprio"] = self.proprio_norm.stats()
        return out

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json, model.safetensors, stats.json, the tokenizer and manifest.json (their sha256
        checksums, which `from_pretrained` verifies) into `directory`, e.g. a run folder or ".".

        Only the model's own files are replaced, each atomically (written under a temporary name in the
        folder, then renamed into place); anything else there (notes, heldout.npz, training checkpoints)
        is left alone, and a file is removed only if the previous save's manifest recorded it.
        """
        directory = Path(directory)
        self.config.dtype = str(self.lm.causal_lm.get_input_embeddings().weight.dtype).removeprefix("torch.")
        stats = self.stats()
        bad = non_finite_entry(stats)
        if bad:
            raise ValueError(f"cannot save to {directory}: normalization statistic {bad[0]} is {bad[1]}; "
                             "set finite statistics with set_stats first")

        def write(staging: Path) -> None:
            self.config.save(staging / CONFIG_FILE)
            save_weights(self, staging / WEIGHTS_FILE)
            atomic_write_text(staging / STATS_FILE, json.dumps(stats, indent=2))
            self.tokenizer.save_pretrained(staging)

        return replace_files(directory, write)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> VLA:
        """Load a model written by `save_pretrained`; "default" loads the packaged default policy.

        A missing file, an unreadable config.json, tokenizer or weight file, NaN / infinite statistics, or
        a file whose sha256 differs from the one its manifest.json recorded raises one CheckpointError
        naming the file. Folders without a manifest (saved by older versions) load unverified.
        """
        directory = resolve_model_dir(directory)
        if not directory.is_dir():
            raise CheckpointError(f"checkpoint directory {directory} does not exist")
        for name in MODEL_FILES:
            if not (directory / name).is_file():
                raise CheckpointError(f"checkpoint directory {directory} lacks {name}")
        config_path = directory / CONFIG_FILE
        try:
            config = VLAConfig.load(config_path)
        except (ValueError, TypeError) as exc:
            message = str(exc) if str(config_path) in str(exc) else f"config file {config_path} cannot be loaded: {exc}"
            raise CheckpointError(message) from exc
        try:
            tokenizer = load_tokenizer(str(directory))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"the tokenizer in {directory} cannot be loaded: {exc}") from exc
        model = cls(config, tokenizer=tokenizer, load_lm_weights=False)
        model.to(getattr(torch, config.dtype))
        load_weights(model, directory / WEIGHTS_FILE)
        stats_path = directory / STATS_FILE
        try:
            model.set_stats(read_stats(stats_path))
        except CheckpointError:
            raise
        except ValueError as exc:
            raise CheckpointError(f"stats file {stats_path}: {exc}") from exc
        # checked last, so that a damaged file is reported by its own fault (a missing key, a bad shape) if it has one
        verify_manifest(directory)
        return model.to(device).eval()

    @classmethod
    def default(cls, device: str | torch.device = "cpu") -> VLA:
        """The trained default policy shipped in the package (MetaWorld, two 64 px cameras)."""
        return cls.from_pretrained(DEFAULT_MODEL_DIR, device)

    # ---- input checking ---------------------------------------------------------------------------
    def _check_inputs(
        self, images: Any, instructions: Sequence[str] | str, proprio: Any
    ) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
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
        batch = images.shape[0]
        if batch == 0:
            raise ValueError(f"images have shape {tuple(images.shape)}: a batch of 0 observations; expected at least one")
        if isinstance(instructions, str):
            instructions = [instructions]
        instructions = list(instructions)
        if len(instructions) != batch:
            raise ValueError(f"got {len(instructions)} instructions for a batch of {batch} images")
        for i, text in enumerate(instructions):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"instruction {i} is {text!r}, expected a non-empty string")
        if cfg.proprio_dim == 0:
            if proprio is not None:
                raise ValueError("proprio was given but this model has proprio_dim=0")
            return images.to(self.device), instructions, None
        if proprio is None:
            raise ValueError(f"this model needs proprio of shape ({batch}, {cfg.proprio_dim})")
        proprio = torch.as_tensor(proprio, dtype=torch.float32)
        if tuple(proprio.shape) != (batch, cfg.proprio_dim):
            raise ValueError(f"proprio has shape {tuple(proprio.shape)}, expected ({batch}, {cfg.proprio_dim})")
        if not torch.isfinite(proprio).all():
            bad = (~torch.isfinite(proprio)).nonzero()[0].tolist()
            raise ValueError(f"proprio contains a non-finite value at index {bad}: {proprio[tuple(bad)].item()}")
        return images.to(self.device), instructions, proprio.to(self.device)

    # ---- the forward path -------------------------------------------------------------------------
    def _prompt_ids(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded prompt ids (B, L) and their validity mask."""
        ids = [self.tokenizer(prompt_text(t), add_special_tokens=False)["input_ids"] for t in instructions]
        limit = getattr(self.lm.causal_lm.config, "max_position_embeddings", None)
        if limit is not None:
            others = self.sequence_length(0)
            for i, x in enumerate(ids):
                if others + len(x) > limit:
                    raise ValueError(
                        f"instruction {i} ({len(instructions[i])} characters) takes {len(x)} prompt tokens: the sequence "
                        f"would hold {others + len(x)} positions, beyond the LM's max_position_embeddings={limit}; "
                        f"shorten it to at most {limit - others} prompt tokens")
        length = max(len(x) for x in ids)
        out = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        valid = torch.zeros((len(ids), length), dtype=torch.bool)
        for i, x in enumerate(ids):
            out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            valid[i, : len(x)] = True
        return out.to(self.device), valid.to(self.device)

    def sequence_length(self, prompt_tokens: int) -> int:
        """Positions of a sample's sequence with `prompt_tokens` prompt tokens (before any pruning)."""
        slots = 0 if self.head.reads_kv_cache else self.config.num_action_tokens + 1  # action slots + STOP
        proprio = 1 if self.proprio_projector is not None else 0
        return 1 + self.config.num_visual_tokens + proprio + prompt_tokens + slots

    def lm_input(self, images: Any, instructions: Sequence[str] | str, proprio: Any = None) -> TokenState:
        """The LM input token state for raw observations, checked as `predict_action` checks them."""
        return self.encode(*self._check_inputs(images, instructions, proprio))

    def encode(
        self, images: torch.Tensor, instructions: list[str], proprio: torch.Tensor | None, timer: Any = NULL_TIMER
    ) -> TokenState:
        """Build the input token state of the LM from checked inputs."""
        with timer.stage("vision"):
            patches = self.vision(images)
        with timer.stage("projector"):
            visual = self.projector(patches)
            batch, width = visual.shape[0], visual.shape[-1]
            parts = [self.lm.embed(torch.full((batch, 1), self.bos_id, device=self.device)), visual]
            if self.proprio_projector is not None:
                parts.append(self.proprio_projector(self.proprio_norm.normalize(proprio).to(visual.dtype))[:, None])
            prompt_ids, prompt_valid = self._prompt_ids(instructions)
            parts.append(self.lm.embed(prompt_ids))
            # the action expert reads the KV cache of [BOS][visual][proprio][prompt]: no slots, no STOP
            slots = 0 if self.head.reads_kv_cache else self.config.num_action_tokens
            if not self.head.reads_kv_cache:
                parts.append(visual.new_zeros(batch, slots, width))
                parts.append(self.lm.embed(torch.full((batch, 1), self.stop_id, device=self.device)))
            hidden = torch.cat(parts, dim=1)
            layout = Layout(
                visual=visual.shape[1],
                proprio=1 if self.proprio_projector is not None else 0,
                prompt=prompt_ids.shape[1],
                action=slots,
                stop=0 if self.head.reads_kv_cache else 1,
            )
            valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=self.device)
            valid[:, layout.span("prompt")] = prompt_valid
            position_ids = (valid.long().cumsum(1) - 1).clamp(min=0)
        return TokenState(hidden, position_ids, valid, layout, self.config.bidirectional_actions)

    def action_hidden(self, state: TokenState) -> torch.Tensor:
        """Final hidden states at the action slots (B, chunk * action_dim, D)."""
        return state.hidden[:, state.layout.span("action")]

    def _readout(self) -> torch.Tensor:
        return self.lm.causal_lm.get_output_embeddings().weight

    @torch.inference_mode()
    def predict_action(
        self,
        images: Any,
        instructions: Sequence[str] | str,
        proprio: Any = None,
        *,
        noise: torch.Tensor | None = None,
        seed: int = 0,
        timer: Timer | None = None,
    ) -> torch.Tensor:
        """Unnormalized actions (B, chunk, action_dim) for a batch of observations.

        Diffusion, flow and expert heads start from `noise` (B, chunk, action_dim) when given, else from
        Gaussian noise drawn with `seed`. A `StageTimer` records inputs / vision / projector / lm / head
        times (input checking, encoders, the decoder with its pruning hooks, the action head); with
        the expert head, lm / head become prefix / reasoning / flow (or trajectory).
        """
        timer = timer or NULL_TIMER
        with timer.stage("inputs"):
            images, instructions, proprio = self._check_inputs(images, instructions, proprio)
        state = self.encode(images, instructions, proprio, timer)
        if self.head.reads_kv_cache:  # prefix / reasoning / flow stages: model/expert_policy.py
            return self.action_norm.unnormalize(act(self, state, noise, seed, timer).actions.float())
        with timer.stage("lm"):
            state = self.lm(state, timer)
        with timer.stage("head"):
            if self.head.stochastic and noise is None:
                gen = torch.Generator(device="cpu").manual_seed(seed)
                noise = torch.randn((images.shape[0], self.config.chunk, self.config.action_dim), generator=gen)
            if noise is not None:
                noise = noise.to(self.device)
            actions = self.head.predict(self.action_hidden(state), self._readout(), noise)
            actions = self.action_norm.unnormalize(actions.float())
        return actions

    def compute_loss(
        self,
        images: Any,
        instructions: Sequence[str] | str,
        actions: torch.Tensor,
        proprio: Any = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The head's training loss for unnormalized target actions (B, chunk, action_dim)."""
        images, instructions, proprio = self._check_inputs(images, instructions, proprio)
        actions = torch.as_tensor(actions, dtype=torch.float32, device=self.device)
        expected = (images.shape[0], self.config.chunk, self.config.action_dim)
        if tuple(actions.shape) != expected:
            raise ValueError(f"actions have shape {tuple(actions.shape)}, expected {expected}")
        if not torch.isfinite(actions).all():
            raise ValueError("actions contain NaN or infinite values")
        if self.head.reads_kv_cache:
            return expert_loss(self, self.encode(images, instructions, proprio), self.action_norm.normalize(actions), generator)
        state = self.lm(self.encode(images, instructions, proprio))
        return self.head.loss(self.action_hidden(state), self._readout(), self.action_norm.normalize(actions), generator)
