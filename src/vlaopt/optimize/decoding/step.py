"""The `speculative` recipe step: `- speculative: {draft: self, k: 4, layers: 1}` or `{draft: ngram,
k: 4, ngram: 3}` decodes an expert head's reasoning speculatively (speculative.py). No weights change;
greedy reasoning keeps its tokens exactly, sampled reasoning its distribution."""

from __future__ import annotations

import dataclasses
from collections import Counter
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
    the emitted text, suffixes of up to `ngram` tokens) or model (the distilled draft network saved at
    `path`, drafts/model.py) or retrieval (REST: the most frequent continuation in a datastore of
    reasoning texts, `texts` or read from the episode folder `corpus`, suffixes of up to `span`
    tokens, drafts/retrieval.py); `k` drafted tokens per verification pass."""

    draft: str = "self"
    k: int = 4
    layers: int = 1
    ngram: int = 3
    path: str | None = None  # the draft folder of draft=model (scripts/distill_draft.py writes one)
    corpus: str | None = None  # draft=retrieval: an episode folder whose train split's reasoning is the datastore
    texts: dict[str, int] | None = None  # draft=retrieval: the datastore itself, {text: count} (from corpus)
    span: int = 16  # draft=retrieval: the longest suffix looked up

    def __post_init__(self) -> None:
        DRAFTS.get(self.draft)
        for name in ("k", "layers", "ngram", "span"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative {name}={value!r} must be a positive integer")
        if self.texts is not None and not (isinstance(self.texts, dict) and self.texts and all(
                isinstance(t, str) and isinstance(c, int) and not isinstance(c, bool) and c > 0
                for t, c in self.texts.items())):
            raise ValueError(f"speculative texts={self.texts!r} must map reasoning texts to positive counts")
        if (self.draft == "retrieval") != (self.texts is not None or self.corpus is not None):
            raise ValueError(f"speculative corpus={self.corpus!r}, texts=<{len(self.texts or {})} texts> with "
                             f"draft={self.draft!r}: a datastore (corpus or texts) is needed for, and only for, "
                             "draft retrieval")
        if (self.draft == "model") != (self.path is not None) or not isinstance(self.path, (str, type(None))):
            raise ValueError(f"speculative path={self.path!r} with draft={self.draft!r}: a path (a draft folder) is "
                             "needed for, and only for, draft model")


def corpus_texts(path: str) -> dict[str, int]:
    """The reasoning texts of the train split of an episode folder (the split `vla-opt train` makes by
    default), each with its number of steps, most frequent first: a retrieval draft's datastore."""
    from vlaopt.data.dataset import EpisodeDataset

    data = EpisodeDataset(path, "train")
    if data.reasoning is None:
        raise ValueError(f"speculative corpus={path!r}: its episodes carry no reasoning texts")
    return dict(Counter(data.reasoning).most_common())


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
        if cfg.draft == "retrieval" and cfg.texts is None and cfg.corpus is not None:
            cfg = dataclasses.replace(cfg, texts=corpus_texts(cfg.corpus))
        draft = DRAFTS.get(cfg.draft)(model, cfg)
        model.text_decoder = SpeculativeDecoder(draft, cfg.k)
        return dataclasses.asdict(cfg)

    def rebuild(self, model: VLA, resolved: dict[str, Any]) -> None:
        self.apply(model, resolved)
