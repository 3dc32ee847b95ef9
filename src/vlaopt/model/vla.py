"""The reference VLA (OpenVLA-OFT layout): processor -> vision encoder -> projector -> LM layer loop
-> policy (head) -> unnormalize.

    raw batch -> processor (checks, prompt ids) -----------------------------------------+
    images (B, cams, H, W, 3) uint8 -> patches -> projector -+                           |
    proprio (B, P) ------------------> proprio projector ----+-> [BOS][visual][proprio][prompt][policy suffix]
    prompt ids ----------------------> embed ----------------+            -> decoder layers (hooks between)
                                      policy: slots -> head | KV cache -> expert -> unnormalize -> (B, chunk, A)

The policy (model/policy.py) is chosen once, by the head: `slots` appends chunk x action_dim action
slots (zero input embeddings, as OFT; bidirectional among themselves) and STOP, `expert` nothing.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from vlaopt.config import VLAConfig
from vlaopt.model import expert_policy  # noqa: F401  (registers the expert policy)
from vlaopt.model.checkpoint import (
    CheckpointError,
    load_weights,
    non_finite_entry,
    read_stats,
    replace_files,
    save_weights,
    verify_manifest,
)
from vlaopt.model.heads import build_head
from vlaopt.model.language import LanguageModel, build_causal_lm
from vlaopt.model.layout import Layout, TokenState
from vlaopt.model.normalize import NORMALIZERS
from vlaopt.model.policy import POLICIES, Policy
from vlaopt.model.processor import ModelInputs, Processor
from vlaopt.model.session import Session
from vlaopt.model.tokenizer import load_tokenizer, special_ids
from vlaopt.model.vision import VisionEncoder, pixel_shuffle, projector
from vlaopt.utils.io import atomic_write_text
from vlaopt.utils.timer import NULL_TIMER, Timer

CONFIG_FILE, WEIGHTS_FILE, STATS_FILE = "config.json", "model.safetensors", "stats.json"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")  # what a fast tokenizer's save_pretrained writes
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, STATS_FILE, *TOKENIZER_FILES)
"""The files `from_pretrained` needs; `save_pretrained` records them (and any other tokenizer file) in manifest.json."""
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
BUNDLED_MODELS: dict[str, Path] = {"default": ASSETS_DIR / "default", "medium": ASSETS_DIR / "medium"}
"""The policies trained here and shipped in the package, by name (README, "The default policy" and
"The medium policy"): `default` is tiny (tests, --quick), `medium` is shaped like a deployed VLA."""
DEFAULT_MODEL_DIR = BUNDLED_MODELS["default"]


def resolve_model_dir(name: str | Path) -> Path:
    """A model directory; a bundled model's name ("default", "medium") means the packaged policy (use
    ./default for a local folder of that name)."""
    return BUNDLED_MODELS.get(str(name), Path(name))


def step_names(recipe: list[dict[str, Any]]) -> str:
    """The step kinds of a recorded recipe, for messages: "token_pruning, quantize"."""
    return ", ".join(next(iter(entry)) for entry in recipe)


class VLA(nn.Module):
    """A Vision-Language-Action policy; see the module docstring for the data path."""

    def __init__(
        self, config: VLAConfig, tokenizer: PreTrainedTokenizerBase | None = None, load_lm_weights: bool = True
    ) -> None:
        super().__init__()
        if config.recipe:
            raise ValueError(f"VLA(config) builds an unoptimized model, but config.recipe lists {len(config.recipe)} "
                             f"step(s) ({step_names(config.recipe)}); build it without them and vlaopt.apply the recipe, or load a saved "
                             "optimized model with vlaopt.load")
        self.config = config = copy.deepcopy(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.vision = VisionEncoder(config.vision)
            self.lm = LanguageModel(build_causal_lm(config.lm, load_weights=load_lm_weights))
            width = self.lm.hidden_size
            features = config.vision.feature_dim * config.pixel_shuffle ** 2
            self.projector = projector(config.projector, features, width, fused=config.vision.kind == "fused")
            in_prefix = config.proprio_dim and not getattr(config.head, "state_token", False)
            self.proprio_projector = projector(config.proprio_projector, config.proprio_dim, width,
                                               False) if in_prefix else None
            self.head = build_head(config.head, width, config.action_dim, config.chunk, self.lm.causal_lm.config,
                                   config.proprio_dim)
        # A saved model must rebuild without the directory its LM came from.
        config.lm.hf_config = {k: v for k, v in self.lm.causal_lm.config.to_dict().items() if k != "transformers_version"}
        self.action_norm = NORMALIZERS[config.normalization](config.action_dim)
        self.proprio_norm = NORMALIZERS[config.normalization](config.proprio_dim)
        self.tokenizer = tokenizer or load_tokenizer(config.lm.pretrained or "builtin")
        if len(self.tokenizer) > self.lm.vocab_size:
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens but the LM vocabulary has {self.lm.vocab_size}"
            )
        self.bos_id, self.stop_id = special_ids(self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.stop_id if pad is None else pad
        self.policy: Policy = POLICIES.get(self.head.policy)()
        decodes = getattr(config.head, "reasoning_tokens", 0) or getattr(config.head, "trajectory", "flow") != "flow"
        if config.full_attention and decodes:
            raise ValueError("full_attention (no causal mask) cannot decode tokens over the cache: the head reasons "
                             "or decodes its trajectory (head.reasoning_tokens / head.trajectory)")
        slots, stop = self.policy.suffix(self)
        bos = int(config.prompt_style == "openvla")  # paligemma: the BOS starts the prompt, after the images
        fixed = bos + config.num_visual_tokens + int(self.proprio_projector is not None) + slots + stop
        self.runner: Callable[[ModelInputs, torch.Tensor | None, int], torch.Tensor] | None = None
        """Runs `network(inputs, noise, seed)` in its place when set (a compiled copy: optimize/compile/)."""
        self.text_decoder: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
        """Decodes reasoning in place of `decode.generate_text` when set (speculative: optimize/decoding/)."""
        self.kv_compressor: Any = None
        """Compresses the expert's KV cache after the prefix and after reasoning when set (optimize/kv/)."""
        self.session_factory: Callable[[VLA], Session] | None = None
        """Makes `session()`'s sessions when set (one that reuses work between steps: optimize/temporal/)."""
        self.processor = Processor(config, self.tokenizer, self.pad_id, self.bos_id, fixed,
                                   getattr(self.lm.causal_lm.config, "max_position_embeddings", None))

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
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu",
        rebuild: Callable[[VLA, list[dict[str, Any]]], None] | None = None,
    ) -> VLA:
        """Load a model written by `save_pretrained`; a bundled model's name ("default", "medium") loads it.

        An optimized model (its config records a recipe) needs `rebuild`, which re-creates the recipe's
        structure before the weights load: use `vlaopt.load`, which passes the recipe registry's. A
        missing file, an unreadable config.json, tokenizer or weight file, NaN / infinite statistics, or
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
        recipe, config.recipe = config.recipe, []
        if recipe and rebuild is None:
            raise CheckpointError(f"{directory} holds an optimized model (recipe: {step_names(recipe)}); load it with "
                                  "vlaopt.load, which replays the recipe before loading the weights")
        model = cls(config, tokenizer=tokenizer, load_lm_weights=False)
        if recipe:
            rebuild(model, recipe)
        model.to(getattr(torch, config.dtype))
        model.load_state(directory)
        return model.to(device).eval()

    def load_state(self, directory: str | Path) -> None:
        """Load the weights and normalization statistics saved in `directory` into this model, which
        must have the structure they were saved from (e.g. resuming a training checkpoint)."""
        directory = Path(directory)
        load_weights(self, directory / WEIGHTS_FILE)
        stats_path = directory / STATS_FILE
        try:
            self.set_stats(read_stats(stats_path))
        except CheckpointError:
            raise
        except ValueError as exc:
            raise CheckpointError(f"stats file {stats_path}: {exc}") from exc
        # checked last, so that a damaged file is reported by its own fault (a missing key, a bad shape) if it has one
        verify_manifest(directory)

    @classmethod
    def default(cls, device: str | torch.device = "cpu") -> VLA:
        """The trained default policy shipped in the package (MetaWorld, two 64 px cameras)."""
        return cls.from_pretrained(DEFAULT_MODEL_DIR, device)

    # ---- the forward path -------------------------------------------------------------------------
    def preprocess(self, images: Any, instructions: Sequence[str] | str, proprio: Any = None) -> ModelInputs:
        """Checked, tokenized inputs on the model's device (model/processor.py); one clear error per bad value."""
        return self.processor(images, instructions, proprio, self.device)

    def sequence_length(self, prompt_tokens: int) -> int:
        """Positions of a sample's sequence with `prompt_tokens` prompt tokens (before any pruning)."""
        return self.processor.fixed_positions + prompt_tokens

    def lm_input(self, images: Any, instructions: Sequence[str] | str, proprio: Any = None) -> TokenState:
        """The LM input token state for raw observations, checked as `predict_action` checks them."""
        return self.encode(self.preprocess(images, instructions, proprio))

    def visual_tokens(self, images: torch.Tensor, timer: Timer = NULL_TIMER) -> torch.Tensor:
        """The visual segment of the LM input (B, cams * patches, D) for checked uint8 images
        (B, cams, H, W, 3): each camera's patches through the vision encoder, then the projector."""
        with timer.stage("vision"):
            patches = self.vision(images)
        with timer.stage("projector"):
            return self.projector(pixel_shuffle(patches, images.shape[1], self.config.pixel_shuffle))

    def encode(self, inputs: ModelInputs, timer: Timer = NULL_TIMER, visual: torch.Tensor | None = None) -> TokenState:
        """The input token state of the LM: [BOS][visual][proprio][prompt] and the policy's suffix
        (action slots with zero embeddings, STOP), positions counting valid tokens only. `visual`
        (B, cams * patches, D) replaces `visual_tokens` of the images (a session reusing them)."""
        if visual is None:
            visual = self.visual_tokens(inputs.images, timer)
        with timer.stage("projector"):
            batch, width = visual.shape[0], visual.shape[-1]
            slots, stop = self.policy.suffix(self)
            cfg = self.config
            bos = int(cfg.prompt_style == "openvla")
            prompt = self.lm.embed(inputs.prompt_ids)
            if cfg.embed_scale:  # SmolVLA scales its image and text embeddings by sqrt(width)
                visual, prompt = (x * torch.tensor(width ** 0.5, dtype=x.dtype) for x in (visual, prompt))
            parts = [self.lm.embed(torch.full((batch, bos), self.bos_id, device=self.device)), visual]
            proprio = None if inputs.proprio is None else self.proprio_norm.normalize(inputs.proprio).to(visual.dtype)
            state = [] if self.proprio_projector is None else [self.proprio_projector(proprio)[:, None]]
            after = cfg.proprio_position == "after_prompt"
            parts += [prompt, *state] if after else [*state, prompt]
            parts.append(visual.new_zeros(batch, slots, width))
            parts.append(self.lm.embed(torch.full((batch, stop), self.stop_id, device=self.device)))
            hidden = torch.cat(parts, dim=1)
            layout = Layout(visual=visual.shape[1], proprio=len(state), prompt=inputs.prompt_ids.shape[1], action=slots,
                            bos=bos, stop=stop, proprio_after_prompt=after, proprio_block=cfg.proprio_block)
            valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=self.device)
            valid[:, layout.span("prompt")] = inputs.prompt_valid
            position_ids = (valid.long().cumsum(1) - 1).clamp(min=0)
        return TokenState(hidden, position_ids, valid, layout, self.config.bidirectional_actions,
                          self.config.full_attention, None if self.proprio_projector is not None else proprio)

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
        times (checking and tokenizing the inputs, encoders, the decoder with its pruning hooks, the
        action head); with the expert policy, lm / head become prefix / reasoning / flow (or trajectory).
        A model with a `runner` (the compile step) runs `network` through it, timed as one stage `network`.
        """
        timer = timer or NULL_TIMER
        with timer.stage("inputs"):
            inputs = self.preprocess(images, instructions, proprio)
        if self.runner is None:
            actions = self.network(inputs, noise, seed, timer)
        else:
            with timer.stage("network"):
                actions = self.runner(inputs, noise, seed)
        return self.unnormalize(actions)

    def unnormalize(self, actions: torch.Tensor) -> torch.Tensor:
        """Actions in the data's units (float32) from the network's normalized ones."""
        return self.action_norm.unnormalize(actions.float(), clip=self.config.clip_actions)

    def session(self) -> Session:
        """A closed-loop session: `reset()` at each episode's start, then `step(images, instructions,
        proprio)` -> actions as `predict_action`, with what it may reuse between steps kept inside it
        (model/session.py). Without a temporal_reuse step it keeps nothing and gives `predict_action`'s
        actions."""
        return Session(self) if self.session_factory is None else self.session_factory(self)

    def network(self, inputs: ModelInputs, noise: torch.Tensor | None = None, seed: int = 0,
                timer: Timer = NULL_TIMER) -> torch.Tensor:
        """Normalized actions for checked inputs: encode, then the policy (everything after the processor)."""
        return self.policy.act(self, self.encode(inputs, timer), noise, seed, timer)

    def compute_loss(
        self,
        images: Any,
        instructions: Sequence[str] | str,
        actions: torch.Tensor,
        proprio: Any = None,
        generator: torch.Generator | None = None,
        reasoning: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """The head's training loss for unnormalized target actions (B, chunk, action_dim); with
        `reasoning` (B texts, an expert head that reasons), plus the cross-entropy of those texts
        decoded after the prompt (Alpamayo-R1's joint loss)."""
        inputs = self.preprocess(images, instructions, proprio)
        actions = torch.as_tensor(actions, dtype=torch.float32, device=self.device)
        expected = (inputs.batch, self.config.chunk, self.config.action_dim)
        if tuple(actions.shape) != expected:
            raise ValueError(f"actions have shape {tuple(actions.shape)}, expected {expected}")
        if not torch.isfinite(actions).all():
            raise ValueError("actions contain NaN or infinite values")
        targets = None if reasoning is None else self.reasoning_targets(reasoning)
        if targets is not None and targets[0].shape[0] != inputs.batch:
            raise ValueError(f"{targets[0].shape[0]} reasoning texts for a batch of {inputs.batch}")
        return self.policy.loss(self, self.encode(inputs), self.action_norm.normalize(actions), generator, targets)

    def reasoning_targets(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) of reasoning texts as the model decodes them (a space after the prompt's
        `Out:`, the text, STOP; the pad id after it) and their validity (B, T)."""
        limit = getattr(self.config.head, "reasoning_tokens", 0)
        if not limit:
            raise ValueError(f"reasoning targets train a head that reasons; head.kind={self.config.head.kind!r} "
                             f"with reasoning_tokens={limit} decodes none")
        ids = [self.tokenizer(" " + text, add_special_tokens=False)["input_ids"] + [self.stop_id] for text in texts]
        longest = max(ids, key=len)
        if len(longest) > limit:
            raise ValueError(f"the reasoning target {texts[ids.index(longest)]!r} takes {len(longest)} tokens with "
                             f"STOP, more than head.reasoning_tokens={limit}")
        out = torch.full((len(ids), len(longest)), self.pad_id, dtype=torch.long)
        valid = torch.zeros(out.shape, dtype=torch.bool)
        for row, seq in enumerate(ids):
            out[row, : len(seq)] = torch.tensor(seq)
            valid[row, : len(seq)] = True
        return out.to(self.device), valid.to(self.device)
