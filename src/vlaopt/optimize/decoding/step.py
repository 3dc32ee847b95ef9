"""The `speculative` recipe step: `- speculative: {draft: self, k: 4, layers: 1}` or `{draft: ngram,
k: 4, ngram: 3}` decodes an expert head's reasoning speculatively (speculative.py). No weights change;
greedy reasoning keeps its tokens exactly, sampled reasoning its distribution."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vlaopt.optimize.decoding.drafts import DRAFTS
from vlaopt.optimize.decoding.speculative import SpeculativeDecoder
from vlaopt.optimize.recipe import STEPS, RecipeStep, make_config

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA


@dataclass
class SpeculativeConfig:
    """`draft`: self (the first `layers` decoder layers and the LM head) or ngram (prompt lookup over
    the emitted text, suffixes of up to `ngram` tokens); `k` drafted tokens per verification pass."""

    draft: str = "self"
    k: int = 4
    layers: int = 1
    ngram: int = 3

    def __post_init__(self) -> None:
        DRAFTS.get(self.draft)
        for name in ("k", "layers", "ngram"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative {name}={value!r} must be a positive integer")


@STEPS.register("speculative")
class SpeculativeStep(RecipeStep):
    """Install a `SpeculativeDecoder` as the model's reasoning decoder."""

    @classmethod
    def config_classes(cls) -> dict[type, str | None]:
        return {SpeculativeConfig: None}

    def apply(self, model: VLA, params: dict[str, Any]) -> dict[str, Any]:
        cfg = make_config(SpeculativeConfig, params, "speculative")
        if getattr(model.config.head, "reasoning_tokens", 0) == 0:
            raise ValueError(f"speculative decodes the reasoning of an expert head; head.kind={model.config.head.kind!r} "
                             f"with reasoning_tokens={getattr(model.config.head, 'reasoning_tokens', 0)} decodes none")
        if model.text_decoder is not None:
            raise ValueError("this model already decodes speculatively; apply one speculative step")
        draft = DRAFTS.get(cfg.draft)(model.lm, cfg.layers, cfg.ngram)
        model.text_decoder = SpeculativeDecoder(draft, cfg.k)
        return dataclasses.asdict(cfg)

    def rebuild(self, model: VLA, resolved: dict[str, Any]) -> None:
        self.apply(model, resolved)
