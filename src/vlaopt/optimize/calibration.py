"""Calibration: real inputs run through our own layer loop, to give data-driven methods the inputs
each decoder layer actually sees.

Inputs are observation batches (`vlaopt.model.processor.Observation`, or `(images uint8 (B, cams, H,
W, 3), instructions (B strings), proprio (B, P) or None)` tuples) or token sequences (integer tensors
(B, L) of LM token ids, run as plain text: the LM alone, no visual or action tokens). A recipe step
names where they come from in `calibration: {samples, source, ...}`: `given` (what was passed as
`apply(model, recipe, calibration=...)`), `episodes` (frames drawn from a collection written by
`vla-opt collect`, at `path`), `text` (`samples` windows of `length` consecutive tokens from the start
of the text file at `path`, in the model's tokenizer), or `random` (synthetic observations, used only
when asked for by name). `walk_layers` then steps the encoded token states through the model's own
`LayerLoop` one layer at a time (token-pruning hooks where the forward pass runs them; text has no
visual tokens to prune), so a method may change layer i before layer i + 1 sees its output
(sequential calibration).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from vlaopt.config import VLAConfig
from vlaopt.data.text import text_windows
from vlaopt.model.language import LayerInput, LayerLoop
from vlaopt.model.layout import TokenState
from vlaopt.model.processor import Observation
from vlaopt.optimize.recipe import RecipeStep, make_config

if TYPE_CHECKING:
    from vlaopt.model.language import LanguageModel
    from vlaopt.model.vla import VLA

SOURCES = ("given", "episodes", "text", "random")
PATH_SOURCES = ("episodes", "text")
RANDOM_INSTRUCTIONS = (
    "pick up the red cup",
    "open the top drawer",
    "push the block to the green goal",
    "press the button on the wall",
)


@dataclass
class CalibrationConfig:
    """How many observation samples to calibrate on and where they come from (see the module doc)."""

    samples: int = 32
    source: str = "given"
    path: str | None = None  # the episode collection (source `episodes`) or text file (source `text`)
    batch_size: int = 8  # for sources that batch the samples themselves (episodes, text, random)
    seed: int = 0
    length: int = 128  # tokens per sequence, for source `text`

    def __post_init__(self) -> None:
        for name in ("samples", "batch_size", "length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"calibration {name}={value!r} must be a positive integer")
        if self.source not in SOURCES:
            raise ValueError(
                f"calibration source={self.source!r} is not supported; expected one of {', '.join(SOURCES)}"
            )
        if (self.source in PATH_SOURCES) != (self.path is not None):
            raise ValueError(
                f"calibration path={self.path!r} with source={self.source!r}: a path is needed for, "
                f"and only for, sources {' and '.join(repr(x) for x in PATH_SOURCES)}"
            )


def random_observations(config: VLAConfig, samples: int, batch_size: int = 8, seed: int = 0) -> list[Observation]:
    """Synthetic observations for a model with `config`: uniform random images, a few fixed
    instructions, standard normal proprio; deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    size = config.vision.image_size
    out: list[Observation] = []
    for start in range(0, samples, batch_size):
        b = min(batch_size, samples - start)
        images = rng.integers(0, 256, (b, config.cameras, size, size, 3), dtype=np.uint8)
        instructions = [RANDOM_INSTRUCTIONS[(start + i) % len(RANDOM_INSTRUCTIONS)] for i in range(b)]
        proprio = rng.standard_normal((b, config.proprio_dim)).astype(np.float32) if config.proprio_dim else None
        out.append(Observation(images, instructions, proprio))
    return out


def episode_observations(path: str | Path, samples: int, batch_size: int = 8, seed: int = 0) -> list[Observation]:
    """`samples` frames drawn without replacement (deterministically in `seed`) from the episodes of
    the collection at `path`, as observation batches of its images, instruction and proprio."""
    from vlaopt.data.episodes import read_episode, read_index

    root = Path(path)
    episodes = [read_episode(root / entry["file"]) for entry in read_index(root)["episodes"]]
    frames = [(e, t) for e in episodes for t in range(e.length)]
    if len(frames) < samples:
        raise ValueError(f"calibration asks for {samples} samples but the episodes at {root} hold {len(frames)} frames")
    picks = np.random.default_rng(seed).choice(len(frames), samples, replace=False)
    chosen = [frames[i] for i in sorted(picks)]
    out: list[Observation] = []
    for start in range(0, samples, batch_size):
        part = chosen[start : start + batch_size]
        images = np.stack([e.images[t] for e, t in part])
        proprio = np.stack([e.proprio[t] for e, t in part])
        out.append(Observation(images, [e.instruction for e, _ in part], proprio))
    return out


def take_samples(batches: Iterable[Any], samples: int) -> list[Observation | torch.Tensor]:
    """The first `samples` samples of `batches` (Observations, `(images, instructions, proprio)` tuples,
    or integer token-id tensors (B, L); the last batch cut short if needed)."""
    out: list[Observation | torch.Tensor] = []
    count = 0
    for i, value in enumerate(batches):
        obs = value if is_token_batch(value) else Observation.of(value, f"calibration observation {i}")
        part = obs[: samples - count] if is_token_batch(obs) else obs.take(slice(0, min(len(obs), samples - count)))
        out.append(part)
        count += len(part)
        if count == samples:
            return out
    raise ValueError(
        f"calibration asks for {samples} samples but only {count} were given; "
        f"pass more observations or set calibration: {{samples: {count}}}"
    )


def is_token_batch(value: Any) -> bool:
    """Whether a calibration batch is token ids (an integer tensor (B, L)) rather than observations."""
    return isinstance(value, torch.Tensor) and value.ndim == 2 and not value.dtype.is_floating_point


def calibration_observations(
    cfg: CalibrationConfig, model: VLA, given: Iterable[Any] | None, where: str
) -> list[Observation | torch.Tensor]:
    """The observation or token-id batches a step calibrates on, from the source `cfg` names (`where`
    names the step in errors)."""
    if cfg.source == "random":
        return random_observations(model.config, cfg.samples, cfg.batch_size, cfg.seed)
    if cfg.source == "episodes":
        return episode_observations(cfg.path, cfg.samples, cfg.batch_size, cfg.seed)
    if cfg.source == "text":
        return list(text_windows(model.tokenizer, cfg.path, cfg.samples, cfg.length).split(cfg.batch_size))
    if given is None:
        raise ValueError(
            f"{where} needs calibration data: pass observations as apply(model, recipe, calibration=[...]), "
            "name a collection with calibration: {source: episodes, path: DIR}, or ask for synthetic inputs "
            "with calibration: {source: random}"
        )
    return take_samples(given, cfg.samples)


def encode_observations(model: VLA, batches: Iterable[Any]) -> list[TokenState]:
    """The LM input token state of each batch: observations checked as `predict_action` checks them,
    token ids as plain text (`LanguageModel.text_state`)."""
    with torch.no_grad():
        return [model.lm.text_state(obs.to(model.device)) if is_token_batch(obs)
                else model.lm_input(*Observation.of(obs, f"calibration observation {i}"))
                for i, obs in enumerate(batches)]


def walk_layers(lm: LanguageModel, states: list[TokenState]) -> Iterator[tuple[int, nn.Module, list[LayerInput]]]:
    """Yield `(i, layer, inputs)` for each decoder layer in order: the input of every calibration
    batch as the model's `LayerLoop` feeds it (token-pruning hooks applied). When the consumer
    resumes the walk, every input is run through the layer as it is then, so changes made to layer i
    reach layer i + 1. The list of layers must not change during the walk."""
    with torch.no_grad():  # text (no visual segment) runs without the token-pruning hooks
        loops = [iter(LayerLoop(lm, state, hooks=[] if state.layout.visual == 0 else None)) for state in states]
        for i, layer in enumerate(lm.decoder.layers):
            yield i, layer, [next(loop) for loop in loops]
        for loop in loops:  # run the last layer
            next(loop, None)


class CalibratedStep(RecipeStep):
    """A recipe step that may need calibration data: it reads the observations handed to
    `apply(model, recipe, calibration=...)` from `self.calibration` (set by `RecipeStep.__init__`)."""

    def calibrated_states(
        self, model: VLA, params: dict[str, Any] | None, needs_data: bool, where: str, resolved: dict[str, Any]
    ) -> list[TokenState] | None:
        """The encoded calibration states a data-driven method runs on (the `calibration` mapping
        `params` resolved into `resolved["calibration"]`), or None for a data-free method, which
        refuses a `calibration` mapping (`params` not None)."""
        if not needs_data:
            if params is not None:
                raise ValueError(f"{where} uses no data; remove its calibration {params!r}")
            return None
        cfg = make_config(CalibrationConfig, dict(params or {}), f"{where} calibration")
        given = self.calibration if cfg.source == "given" else None
        resolved["calibration"] = asdict(cfg)
        return encode_observations(model, calibration_observations(cfg, model, given, where))
