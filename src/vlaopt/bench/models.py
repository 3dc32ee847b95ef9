"""What the scripts in `benchmarks/` measure: random-weight VLAs built from config (nothing
downloaded), their fixed inputs, and copies of one model with a recipe applied to each
(`vlaopt.apply`, the one way a model gets optimized)."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import track

from vlaopt.bench.stages import time_call
from vlaopt.config import BUILTIN_VOCAB_SIZE, HeadConfig, LMConfig, VisionConfig, VLAConfig
from vlaopt.model.vla import VLA
from vlaopt.optimize import apply

INSTRUCTION = "put the bowl on the plate and push the block to the goal"
WEIGHT_FREE_STEPS = ("token_pruning", "flow_steps", "speculative")
"""Recipe steps that leave every weight of the model as it is (copies may then share them)."""


def lm_config(model_type: str, **shape: Any) -> dict[str, Any]:
    """A transformers config dict for a decoder of `model_type` with the built-in vocabulary and tied
    embeddings; `shape` holds its sizes (`hidden_size`, `num_hidden_layers`, ...)."""
    return {"model_type": model_type, "vocab_size": BUILTIN_VOCAB_SIZE, "tie_word_embeddings": True, **shape}


def llama_shape(hidden: int, layers: int, kv_heads: int) -> dict[str, int]:
    """A Llama-style decoder's sizes: `hidden` wide in 64-wide heads, a 3x MLP, `layers` deep."""
    return {"hidden_size": hidden, "intermediate_size": hidden * 3, "num_hidden_layers": layers,
            "num_attention_heads": hidden // 64, "num_key_value_heads": kv_heads, "head_dim": 64}


def bench_config(lm: dict[str, Any], head: HeadConfig, *, cameras: int, vision_width: int, vision_layers: int,
                 action_dim: int, chunk: int, proprio_dim: int = 8) -> VLAConfig:
    """A VLA whose `cameras` 224 px images become 256 patches each (a SigLIP encoder `vision_width`
    wide and `vision_layers` deep), read by the LM `lm` (a transformers config dict), with `head`."""
    vision = VisionConfig(kind="siglip", image_size=224, patch_size=14, hidden_size=vision_width,
                          num_layers=vision_layers, num_heads=2, intermediate_size=2 * vision_width)
    return VLAConfig(vision=vision, lm=LMConfig(hf_config=lm), head=head, cameras=cameras, proprio_dim=proprio_dim,
                     action_dim=action_dim, chunk=chunk)


def bench_inputs(config: VLAConfig, batch: int, seed: int = 0) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """`batch` fixed observations for `config`: uniform random uint8 images, one instruction, standard
    normal proprio (None without proprio); deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    size = config.vision.image_size
    images = rng.integers(0, 256, (batch, config.cameras, size, size, 3), dtype=np.uint8)
    proprio = rng.standard_normal((batch, config.proprio_dim)).astype(np.float32) if config.proprio_dim else None
    return images, [INSTRUCTION] * batch, proprio


def _copy(model: VLA, share_weights: bool) -> VLA:
    """A deep copy of `model`; with `share_weights`, one that holds `model`'s own parameters and buffers."""
    if not share_weights:
        return copy.deepcopy(model)
    return copy.deepcopy(model, {id(t): t for t in itertools.chain(model.parameters(), model.buffers())})


def apply_each(model: VLA, recipes: dict[str, list[dict[str, Any]]], *, share_weights: bool = False,
               progress: bool = True) -> tuple[dict[str, VLA], dict[str, float]]:
    """Each recipe applied (`vlaopt.apply`) to its own copy of `model`, and the seconds each took.

    With `share_weights` the copies hold `model`'s parameters and buffers, so every variant runs on
    the very same weight tensors and they are in memory once; this is allowed only for recipes whose
    steps leave weights alone (`WEIGHT_FREE_STEPS`), and raises for any other step."""
    if share_weights:
        for name, recipe in recipes.items():
            steps = [step for entry in recipe for step in entry]
            changing = [step for step in steps if step not in WEIGHT_FREE_STEPS]
            if changing:
                raise ValueError(f"recipe {name!r} has step(s) {changing} that change weights; copies sharing "
                                 f"weights take only {', '.join(WEIGHT_FREE_STEPS)}")
    models: dict[str, VLA] = {}
    seconds: dict[str, float] = {}
    items = recipes.items()
    if progress:
        items = track(items, description="applying recipes", console=Console(stderr=True))
    for name, recipe in items:
        m = _copy(model, share_weights)
        try:
            seconds[name] = time_call(lambda _timer, m=m, recipe=recipe: apply(m, recipe))["total"]
        except Exception as error:
            error.add_note(f"while applying recipe {name!r}: {recipe}")
            raise
        models[name] = m
    return models, seconds
