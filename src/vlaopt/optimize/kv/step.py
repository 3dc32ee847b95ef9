"""The KV-cache compression recipe steps of an expert head (`model.kv_compressor`):

    - kv_streaming: {sinks: 4, window: 64}              # StreamingLLM (streaming.py)
    - kv_h2o: {heavy: 32, recent: 32}                   # H2O (h2o.py)
    - kv_quant: {bits: 8, group: 32, residual: 32}      # KIVI (kivi.py)

No weights change; the compressor is rebuilt from the recorded parameters on load. A model takes one
of them (they compress the same cache), and none beside temporal reuse, whose sessions keep the
cache for the next step and look its keys up by position.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from vlaopt.optimize.kv.base import KVCompressor
from vlaopt.optimize.kv.h2o import H2OCompressor
from vlaopt.optimize.kv.kivi import KiviCompressor, KiviSpec
from vlaopt.optimize.kv.streaming import StreamingCompressor
from vlaopt.optimize.recipe import STEPS, RecipeStep, make_config

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA


def _check_int(step: str, name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "positive" if minimum > 0 else "non-negative"
        raise ValueError(f"{step} {name}={value!r} must be a {kind} integer")


@dataclass
class StreamingConfig:
    """StreamingLLM: keep each sample's first `sinks` valid tokens (attention sinks, 0: a plain window)
    and its last `window` valid tokens, per layer."""

    sinks: int = 4
    window: int = 64

    def __post_init__(self) -> None:
        _check_int("kv_streaming", "sinks", self.sinks, 0)
        _check_int("kv_streaming", "window", self.window, 1)


@dataclass
class H2OConfig:
    """H2O: keep the last `recent` valid tokens and the `heavy` others with the largest accumulated
    attention, per layer."""

    heavy: int = 32
    recent: int = 32

    def __post_init__(self) -> None:
        _check_int("kv_h2o", "heavy", self.heavy, 0)
        _check_int("kv_h2o", "recent", self.recent, 0)
        if self.heavy + self.recent == 0:
            raise ValueError("kv_h2o heavy=0 and recent=0 keep no token; expected heavy + recent >= 1")


@dataclass
class KiviConfig:
    """KIVI: `bits` per code (8, 4 or 2), keys per channel over groups of `group` tokens and values per
    token over groups of `group` channels, the last `residual` tokens (a multiple of `group`) in full
    precision."""

    bits: int = 8
    group: int = 32
    residual: int = 32

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8) or isinstance(self.bits, bool):
            raise ValueError(f"kv_quant bits={self.bits!r} is not supported; expected 8, 4 or 2")
        _check_int("kv_quant", "group", self.group, 1)
        _check_int("kv_quant", "residual", self.residual, 1)
        if self.residual % self.group:
            raise ValueError(f"kv_quant residual={self.residual} must be a multiple of group={self.group} (keys are "
                             "quantized residual tokens at a time, in groups of `group` tokens)")


class _KVStep(RecipeStep):
    """Install one KV-cache compressor on an expert head's model."""

    kind: ClassVar[str]
    config: ClassVar[type]

    @classmethod
    def config_classes(cls) -> dict[type, str | None]:
        return {cls.config: None}

    def build(self, model: VLA, cfg: Any) -> KVCompressor:
        raise NotImplementedError

    def apply(self, model: VLA, params: dict[str, Any]) -> dict[str, Any]:
        cfg = make_config(self.config, params, self.kind)
        if model.config.head.kind != "expert":
            raise ValueError(f"{self.kind} compresses the KV cache the action expert reads; head.kind="
                             f"{model.config.head.kind!r} keeps none (expected head.kind='expert')")
        if model.kv_compressor is not None:
            raise ValueError(f"this model already compresses its KV cache ({model.kv_compressor.name}); apply one "
                             f"kv step, not {self.kind} after it")
        if model.session_factory is not None:
            raise ValueError(f"{self.kind} cannot follow temporal_reuse: its sessions keep the cache for the next step "
                             "and look its keys up by position")
        model.kv_compressor = self.build(model, cfg)
        return dataclasses.asdict(cfg)

    def rebuild(self, model: VLA, resolved: dict[str, Any]) -> None:
        self.apply(model, resolved)


@STEPS.register("kv_streaming")
class StreamingStep(_KVStep):
    kind, config = "kv_streaming", StreamingConfig

    def build(self, model: VLA, cfg: StreamingConfig) -> KVCompressor:
        return StreamingCompressor(cfg.sinks, cfg.window)


@STEPS.register("kv_h2o")
class H2OStep(_KVStep):
    kind, config = "kv_h2o", H2OConfig

    def build(self, model: VLA, cfg: H2OConfig) -> KVCompressor:
        return H2OCompressor(cfg.heavy, cfg.recent)


@STEPS.register("kv_quant")
class KiviStep(_KVStep):
    kind, config = "kv_quant", KiviConfig

    def build(self, model: VLA, cfg: KiviConfig) -> KVCompressor:
        lm = model.lm.causal_lm.config
        head_dim = getattr(lm, "head_dim", None) or lm.hidden_size // lm.num_attention_heads
        if head_dim % cfg.group:
            raise ValueError(f"kv_quant group={cfg.group} must divide the LM's head_dim={head_dim} (values are "
                             "quantized in groups of `group` channels)")
        if head_dim % (8 // cfg.bits):
            raise ValueError(f"kv_quant bits={cfg.bits} packs {8 // cfg.bits} codes per byte along head_dim, "
                             f"which the LM's head_dim={head_dim} is not a multiple of")
        return KiviCompressor(KiviSpec(cfg.bits, cfg.group, cfg.residual))
