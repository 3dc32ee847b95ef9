"""Typed configuration of a VLA: vision, language model, action head, sequence layout.

Every config is a dataclass with sensible defaults, validated on construction, and round-trips
through plain dicts, JSON and YAML so a saved model rebuilds exactly from its `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlaopt.utils.checks import check_choice, check_positive
from vlaopt.utils.files import read_config_file
from vlaopt.utils.io import atomic_write_text

VISION_KINDS = ("siglip", "dinov2", "fused")
LM_FAMILIES = ("llama", "qwen2", "qwen3")
DTYPES = ("float32", "bfloat16", "float16")
HEAD_KINDS = ("l1", "discrete", "diffusion", "flow", "expert")
KV_LAYER_CHOICES = ("all", "later")  # expert: VLM layers handing their KV to it (later = GR-3's later half)
INTEGRATORS = ("euler", "midpoint")
TRAJECTORY_MODES = ("flow", "autoregressive")
BUILTIN_VOCAB_SIZE = 3 + 256 + 256  # the built-in byte tokenizer: 3 specials, 256 bytes, 256 action bins
EXPERT_ONLY = {"kv_layers": "all", "integrator": "euler", "reasoning_tokens": 0, "temperature": 0.0, "top_p": 1.0,
               "trajectory": "flow"}  # HeadConfig fields (and defaults) that only the expert head reads


@dataclass
class VisionConfig:
    """Vision backbone built from `transformers` config: SigLIP, DINOv2, or both fused per patch."""

    kind: str = "siglip"
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072

    def __post_init__(self) -> None:
        check_choice("vision.kind", self.kind, VISION_KINDS)
        check_positive(self, "vision.", "image_size", "patch_size", "hidden_size", "num_layers", "num_heads",
                       "intermediate_size")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision.image_size={self.image_size} must be a multiple of vision.patch_size={self.patch_size}"
            )
        if self.kind != "siglip" and self.intermediate_size % self.hidden_size:
            raise ValueError(
                f"vision.intermediate_size={self.intermediate_size} must be a multiple of "
                f"vision.hidden_size={self.hidden_size} for DINOv2 (its MLP width is an integer ratio)"
            )

    @property
    def patches_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def feature_dim(self) -> int:
        """Width of one patch feature; fused concatenates the two backbones."""
        return self.hidden_size * (2 if self.kind == "fused" else 1)


@dataclass
class LMConfig:
    """A decoder-only causal LM from `transformers`, as the HF config dict it is built from.

    `pretrained` names a local HF directory whose weights (and tokenizer) seed a fresh VLA; a saved
    VLA stores the full `hf_config` so it reloads without that directory.
    """

    hf_config: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if not self.hf_config and self.pretrained is None:
            raise ValueError("lm needs either hf_config (a transformers config dict) or pretrained (a local directory)")
        if self.hf_config and "model_type" not in self.hf_config:
            raise ValueError(f"lm.hf_config must contain 'model_type'; got keys {sorted(self.hf_config)}")

    @property
    def family(self) -> str:
        return str(self.hf_config.get("model_type", "?"))


@dataclass
class HeadConfig:
    """Action head: `l1` regression, `discrete` 256-bin tokens, `diffusion` (DDIM) or `flow` matching, or
    `expert`: a small transformer over the VLM's KV cache refined by flow steps (pi0 / GR-3 / Alpamayo-R1).

    Expert-only options (docs/expert.md): `kv_layers` (all | later), `integrator` (euler | midpoint),
    `reasoning_tokens` (text the VLM may generate before acting; sampled when `temperature` > 0, with
    `top_p`) and `trajectory` (`autoregressive` decodes discretised action tokens one by one instead)."""

    kind: str = "l1"
    hidden_dim: int = 256
    num_blocks: int = 2
    steps: int = 10
    train_timesteps: int = 100
    bins: int = 256
    kv_layers: str = EXPERT_ONLY["kv_layers"]
    integrator: str = EXPERT_ONLY["integrator"]
    reasoning_tokens: int = EXPERT_ONLY["reasoning_tokens"]
    temperature: float = EXPERT_ONLY["temperature"]
    top_p: float = EXPERT_ONLY["top_p"]
    trajectory: str = EXPERT_ONLY["trajectory"]

    def __post_init__(self) -> None:
        check_choice("head.kind", self.kind, HEAD_KINDS)
        check_positive(self, "head.", "hidden_dim", "num_blocks", "steps", "train_timesteps", "bins")
        if self.steps > self.train_timesteps:
            raise ValueError(f"head.steps={self.steps} cannot exceed head.train_timesteps={self.train_timesteps}")
        check_choice("head.kv_layers", self.kv_layers, KV_LAYER_CHOICES)
        check_choice("head.integrator", self.integrator, INTEGRATORS)
        check_choice("head.trajectory", self.trajectory, TRAJECTORY_MODES)
        if not isinstance(self.reasoning_tokens, int) or self.reasoning_tokens < 0:
            raise ValueError(f"head.reasoning_tokens={self.reasoning_tokens!r} must be a non-negative integer")
        if not self.temperature >= 0:
            raise ValueError(f"head.temperature={self.temperature!r} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"head.top_p={self.top_p!r} must be in (0, 1]")
        for name, default in EXPERT_ONLY.items():
            if self.kind != "expert" and getattr(self, name) != default:
                raise ValueError(f"head.{name}={getattr(self, name)!r} applies only to head.kind='expert', not {self.kind!r}")


@dataclass
class VLAConfig:
    """The whole reference VLA (OpenVLA-OFT layout).

    Sequence: [BOS][patches x cameras][proprio][prompt][chunk x action_dim action slots][STOP].
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=lambda: LMConfig(hf_config={"model_type": "llama"}))
    head: HeadConfig = field(default_factory=HeadConfig)
    cameras: int = 1
    proprio_dim: int = 0
    action_dim: int = 7
    chunk: int = 8
    bidirectional_actions: bool = True
    seed: int = 0
    recipe: list[dict[str, Any]] = field(default_factory=list)  # optimization steps applied, resolved
    dtype: str = "float32"  # of the saved weights; `save_pretrained` records it, `from_pretrained` builds in it

    def __post_init__(self) -> None:
        check_positive(self, "", "cameras", "action_dim", "chunk")
        check_choice("dtype", self.dtype, DTYPES)
        if not isinstance(self.proprio_dim, int) or self.proprio_dim < 0:
            raise ValueError(f"proprio_dim={self.proprio_dim!r} must be a non-negative integer")

    @property
    def num_visual_tokens(self) -> int:
        return self.cameras * self.vision.patches_per_image

    @property
    def num_action_tokens(self) -> int:
        return self.chunk * self.action_dim

    # ---- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLAConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VLAConfig keys {unknown}; expected a subset of {sorted(known)}")
        sub = {"vision": VisionConfig, "lm": LMConfig, "head": HeadConfig}
        for key, sub_cls in sub.items():
            if key in data and isinstance(data[key], dict):
                sub_known = {f.name for f in dataclasses.fields(sub_cls)}
                bad = sorted(set(data[key]) - sub_known)
                if bad:
                    raise ValueError(f"unknown {key} config keys {bad}; expected a subset of {sorted(sub_known)}")
                data[key] = sub_cls(**data[key])
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write as JSON or YAML, chosen by the file suffix."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2)
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> VLAConfig:
        path = Path(path)
        data = read_config_file(path, "config file")
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping, got {type(data).__name__}")
        return cls.from_dict(data)

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def tiny(
        cls,
        lm: str = "llama",
        head: str = "l1",
        vision: str = "siglip",
        cameras: int = 1,
        proprio_dim: int = 0,
        seed: int = 0,
        image_size: int = 32,
        action_dim: int = 7,
        chunk: int = 4,
    ) -> VLAConfig:
        """A few-hundred-thousand-parameter VLA for tests and demos (built from config, no download)."""
        check_choice("lm", lm, LM_FAMILIES)
        hf = {
            "model_type": lm,
            "vocab_size": BUILTIN_VOCAB_SIZE,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": True,
        }
        return cls(
            vision=VisionConfig(
                kind=vision,
                image_size=image_size,
                patch_size=8,
                hidden_size=32,
                num_layers=2,
                num_heads=2,
                intermediate_size=64,
            ),
            lm=LMConfig(hf_config=hf),
            head=HeadConfig(kind=head, hidden_dim=64, num_blocks=2, steps=4, train_timesteps=20),
            cameras=cameras,
            proprio_dim=proprio_dim,
            action_dim=action_dim,
            chunk=chunk,
            seed=seed,
        )
