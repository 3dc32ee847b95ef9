"""Typed configuration of a VLA: vision, language model, action head, sequence layout.

Every config is a dataclass with sensible defaults, validated on construction, and round-trips
through plain dicts, JSON and YAML so a saved model rebuilds exactly from its `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from vlaopt.utils.checks import check_choice, check_positive
from vlaopt.utils.files import read_config_file
from vlaopt.utils.io import atomic_write_text
from vlaopt.utils.registry import Registry

VISION_KINDS = ("siglip", "dinov2", "fused")
VISION_LAYOUTS = ("hf", "timm")  # module layout of the backbones: transformers' models, or timm's ViT naming
VISION_FEATURES = ("last", "penultimate")  # patch features: after the last block and final norm, or OFT's
LM_FAMILIES = ("llama", "qwen2", "qwen3", "gemma")
DTYPES = ("float32", "bfloat16", "float16")
KV_LAYER_CHOICES = ("all", "later")  # expert: VLM layers handing their KV to it (later = GR-3's later half)
INTEGRATORS = ("euler", "midpoint")
TRAJECTORY_MODES = ("flow", "autoregressive")
EXPERT_CONVENTIONS = ("vlaopt", "pi0")  # flow time and its embedding: noise at t=0 (ours) or at t=1 (pi0)
NORMALIZATIONS = ("bounds", "mean_std")  # actions / proprio: q01-q99 to [-1, 1] (OpenVLA) or z-score (pi0)
PROJECTORS = ("mlp", "linear")  # vision -> LM: Prismatic's MLP, or PaliGemma's one linear layer
PROMPT_STYLES = ("openvla", "paligemma", "smolvla")  # model/processor.py: [BOS] first + OpenVLA's template;
# images first, then [BOS] text "\n" (pi0) or text "\n" without BOS (SmolVLA)
PROPRIO_POSITIONS = ("before_prompt", "after_prompt")  # OFT: [visual][proprio][prompt]; SmolVLA: after the prompt
TINY_HEAD = {"hidden_dim": 64, "num_blocks": 2, "steps": 4, "train_timesteps": 20}  # head fields of `tiny()`
BUILTIN_VOCAB_SIZE = 3 + 256 + 256  # the built-in byte tokenizer: 3 specials, 256 bytes, 256 action bins

def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@dataclass
class ViTShape:
    """The size of one ViT: width, depth, heads and MLP width."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int

    def __post_init__(self) -> None:
        check_positive(self, "vision.dinov2_shape.", "hidden_size", "num_layers", "num_heads", "intermediate_size")


@dataclass
class VisionConfig:
    """Vision backbone: SigLIP, DINOv2, or both fused per patch (channels concatenated, SigLIP first).

    `layout` hf builds transformers' SiglipVisionModel / Dinov2Model; timm builds timm's ViT module
    naming (model/vit.py), which OpenVLA-OFT checkpoints use, with `reg_tokens` DINOv2 registers.
    `features` last takes the final block after the final norm; penultimate the second-to-last
    block's raw output, as OpenVLA-OFT. `dinov2_shape` sizes the DINOv2 half of a fused encoder when
    it differs from the SigLIP half (OFT: SigLIP-So400m 1152 wide beside DINOv2-L 1024 wide).
    """

    kind: str = "siglip"
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    layout: str = "hf"
    features: str = "last"
    reg_tokens: int = 0
    dinov2_shape: ViTShape | None = None

    def __post_init__(self) -> None:
        check_choice("vision.kind", self.kind, VISION_KINDS)
        check_choice("vision.layout", self.layout, VISION_LAYOUTS)
        check_choice("vision.features", self.features, VISION_FEATURES)
        check_positive(self, "vision.", "image_size", "patch_size", "hidden_size", "num_layers", "num_heads",
                       "intermediate_size")
        if isinstance(self.dinov2_shape, dict):
            self.dinov2_shape = ViTShape(**self.dinov2_shape)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision.image_size={self.image_size} must be a multiple of vision.patch_size={self.patch_size}"
            )
        if not isinstance(self.reg_tokens, int) or self.reg_tokens < 0:
            raise ValueError(f"vision.reg_tokens={self.reg_tokens!r} must be a non-negative integer")
        if self.reg_tokens and self.layout != "timm":
            raise ValueError(f"vision.reg_tokens={self.reg_tokens} needs vision.layout='timm' (transformers' "
                             "Dinov2Model has no registers)")
        if self.reg_tokens and self.kind == "siglip":
            raise ValueError(f"vision.reg_tokens={self.reg_tokens}: registers belong to DINOv2, and vision.kind is "
                             "'siglip'")
        if self.dinov2_shape is not None and self.kind != "fused":
            raise ValueError(f"vision.dinov2_shape sizes the DINOv2 half of a fused encoder; vision.kind is "
                             f"{self.kind!r} (size it with hidden_size etc.)")
        if self.features == "penultimate" and min(s.num_layers for s in self.shapes().values()) < 2:
            raise ValueError("vision.features='penultimate' needs at least 2 layers in every backbone")
        dinov2 = self.shapes().get("dinov2")
        if self.layout == "hf" and dinov2 is not None and dinov2.intermediate_size % dinov2.hidden_size:
            raise ValueError(
                f"vision.intermediate_size={dinov2.intermediate_size} must be a multiple of "
                f"vision.hidden_size={dinov2.hidden_size} for DINOv2 (its MLP width is an integer ratio)"
            )

    def shapes(self) -> dict[str, ViTShape]:
        """Each backbone's size by name, in feature order (fused: SigLIP, then DINOv2)."""
        own = ViTShape(self.hidden_size, self.num_layers, self.num_heads, self.intermediate_size)
        if self.kind != "fused":
            return {self.kind: own}
        return {"siglip": own, "dinov2": self.dinov2_shape or own}

    @property
    def patches_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def feature_dim(self) -> int:
        """Width of one patch feature; fused concatenates the two backbones."""
        return sum(s.hidden_size for s in self.shapes().values())


@dataclass
class LMConfig:
    """A decoder-only causal LM from `transformers`, as the HF config dict it is built from.

    `pretrained` names a local HF directory or a `.gguf` file (dequantized to float32) whose weights (and
    tokenizer) seed a fresh VLA; a saved VLA stores the full `hf_config` so it reloads without them.
    """

    hf_config: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if not self.hf_config and self.pretrained is None:
            raise ValueError("lm needs either hf_config (a transformers config dict) or pretrained (a local directory "
                             "or .gguf file)")
        if self.hf_config and "model_type" not in self.hf_config:
            raise ValueError(f"lm.hf_config must contain 'model_type'; got keys {sorted(self.hf_config)}")

    @property
    def family(self) -> str:
        return str(self.hf_config.get("model_type", "?"))


HEAD_CONFIGS: Registry[type[HeadConfig]] = Registry("action head")
"""Head name -> its config class; the heads themselves register under the same names (model/heads/)."""


@dataclass
class HeadConfig:
    """Base of the per-head configs: `kind` is the head's registered name (see `head_config`);
    `positive` names the integer fields that must be positive."""

    positive: ClassVar[tuple[str, ...]] = ()
    kind: str = ""

    def __post_init__(self) -> None:
        registered = HEAD_CONFIGS.get(self.kind) if self.kind else None
        if registered is not type(self):
            raise ValueError(f"head.kind={self.kind!r} does not name {type(self).__name__}; build head configs with "
                             f"head_config(kind, ...), kind one of {', '.join(HEAD_CONFIGS.names())}")
        check_positive(self, "head.", *self.positive)


@HEAD_CONFIGS.register("l1")
@dataclass
class L1HeadConfig(HeadConfig):
    """OFT's L1 regression head: an MLP-ResNet over each chunk step's action-slot states."""

    positive: ClassVar[tuple[str, ...]] = ("hidden_dim", "num_blocks")
    kind: str = "l1"
    hidden_dim: int = 256
    num_blocks: int = 2


@HEAD_CONFIGS.register("discrete")
@dataclass
class DiscreteHeadConfig(HeadConfig):
    """OpenVLA / RT-2 action tokens: `bins` bins read from the logits of the last `bins` vocabulary ids."""

    positive: ClassVar[tuple[str, ...]] = ("bins",)
    kind: str = "discrete"
    bins: int = 256


@HEAD_CONFIGS.register("diffusion")
@dataclass
class DiffusionHeadConfig(HeadConfig):
    """DDIM sampling in `steps` of a denoiser trained on `train_timesteps` (cosine schedule)."""

    positive: ClassVar[tuple[str, ...]] = ("hidden_dim", "num_blocks", "steps", "train_timesteps")
    kind: str = "diffusion"
    hidden_dim: int = 256
    num_blocks: int = 2
    steps: int = 10
    train_timesteps: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps > self.train_timesteps:
            raise ValueError(f"head.steps={self.steps} cannot exceed head.train_timesteps={self.train_timesteps}")


@HEAD_CONFIGS.register("flow")
@dataclass
class FlowHeadConfig(HeadConfig):
    """Rectified flow integrated in `steps` Euler steps by a denoiser over the action-slot states."""

    positive: ClassVar[tuple[str, ...]] = ("hidden_dim", "num_blocks", "steps")
    kind: str = "flow"
    hidden_dim: int = 256
    num_blocks: int = 2
    steps: int = 10


@HEAD_CONFIGS.register("expert")
@dataclass
class ExpertHeadConfig(HeadConfig):
    """The action expert over the VLM's KV cache (pi0 / GR-3 / Alpamayo-R1; docs/expert.md): width
    `hidden_dim`, `steps` flow steps with `integrator`, the KV of `kv_layers` (all | later), optional
    `reasoning_tokens` decoded first (sampled when `temperature` > 0, with `top_p`), and `trajectory:
    autoregressive` to decode `bins`-bin action tokens one by one instead of flowing. pi0's variant:
    `state_token` (the proprio enters the expert as its first token, not the VLM prefix), `convention:
    pi0` (noise at flow time 1, openpi's sine-cosine time embedding), `mlp_dim` (0: 4 x hidden_dim).
    SmolVLA's: `self_attn_every` n > 1 (only layers i % n == 0 attend to the cache and the chunk; the
    others cross-attend to the VLM layer's keys/values through their own k/v projections) and
    `causal_actions` (chunk tokens see the earlier ones only)."""

    positive: ClassVar[tuple[str, ...]] = ("hidden_dim", "steps", "bins")
    kind: str = "expert"
    hidden_dim: int = 256
    steps: int = 10
    kv_layers: str = "all"
    integrator: str = "euler"
    reasoning_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    trajectory: str = "flow"
    bins: int = 256
    state_token: bool = False
    convention: str = "vlaopt"
    mlp_dim: int = 0
    self_attn_every: int = 1
    causal_actions: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("head.convention", self.convention, EXPERT_CONVENTIONS)
        if not isinstance(self.self_attn_every, int) or self.self_attn_every < 1:
            raise ValueError(f"head.self_attn_every={self.self_attn_every!r} must be a positive integer (1: every layer)")
        if not isinstance(self.mlp_dim, int) or self.mlp_dim < 0:
            raise ValueError(f"head.mlp_dim={self.mlp_dim!r} must be a non-negative integer (0: 4 x hidden_dim)")
        check_choice("head.kv_layers", self.kv_layers, KV_LAYER_CHOICES)
        check_choice("head.integrator", self.integrator, INTEGRATORS)
        check_choice("head.trajectory", self.trajectory, TRAJECTORY_MODES)
        if not isinstance(self.reasoning_tokens, int) or self.reasoning_tokens < 0:
            raise ValueError(f"head.reasoning_tokens={self.reasoning_tokens!r} must be a non-negative integer")
        if not self.temperature >= 0:
            raise ValueError(f"head.temperature={self.temperature!r} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"head.top_p={self.top_p!r} must be in (0, 1]")


LEGACY_HEAD_FIELDS = {"hidden_dim": 256, "num_blocks": 2, "steps": 10, "train_timesteps": 100, "bins": 256,
                      "kv_layers": "all", "integrator": "euler", "reasoning_tokens": 0, "temperature": 0.0,
                      "top_p": 1.0, "trajectory": "flow"}
"""The one flat head config saved before per-head configs: every head's file lists all these fields.
Loading such a file drops the fields its head does not have while they hold these defaults (they
had no effect), so older saved models keep loading."""


def head_config(kind: str, **params: Any) -> HeadConfig:
    """The config of head `kind` (a registered name) from `params`, naming unknown parameters."""
    cls = HEAD_CONFIGS.get(kind)
    names = {f.name for f in dataclasses.fields(cls)} - {"kind"}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ValueError(f"unknown {kind} head parameter(s) {unknown}; expected a subset of {sorted(names)}")
    return cls(kind=kind, **params)


def head_from_dict(data: dict[str, Any]) -> HeadConfig:
    """A head config from its saved form (see `LEGACY_HEAD_FIELDS` for files saved before per-head configs)."""
    data = dict(data)
    kind = data.pop("kind", "l1")
    names = {f.name for f in dataclasses.fields(HEAD_CONFIGS.get(kind))}
    for name, default in LEGACY_HEAD_FIELDS.items():
        if name not in names and data.get(name, default) == default:
            data.pop(name, None)
    return head_config(kind, **data)


@dataclass
class VLAConfig:
    """The whole reference VLA (OpenVLA-OFT layout).

    Sequence: [BOS][patches x cameras][proprio][prompt][chunk x action_dim action slots][STOP].
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=lambda: LMConfig(hf_config={"model_type": "llama"}))
    head: HeadConfig = field(default_factory=L1HeadConfig)
    cameras: int = 1
    proprio_dim: int = 0
    action_dim: int = 7
    chunk: int = 8
    bidirectional_actions: bool = True
    full_attention: bool = False  # every token sees every token (OpenVLA-OFT's transformers fork), no causal mask
    clip_actions: bool = True  # unnormalize clips the head's output to [-1, 1] first (OpenVLA-OFT does not)
    prompt_suffix_ids: list[int] = field(default_factory=list)  # appended to each prompt (OFT + Llama-2: [29871])
    prompt_style: str = "openvla"  # PROMPT_STYLES: model/processor.py
    projector: str = "mlp"  # PROJECTORS, vision -> LM
    proprio_projector: str = "mlp"  # PROJECTORS, proprio -> LM (SmolVLA's state_proj: linear)
    pixel_shuffle: int = 1  # SmolVLM's connector: each f x f block of patch features becomes one token
    embed_scale: bool = False  # visual tokens and text embeddings times sqrt(hidden_size) (SmolVLA)
    proprio_position: str = "before_prompt"  # PROPRIO_POSITIONS
    proprio_block: bool = False  # with full_attention: the proprio sees all, nothing before it sees it (SmolVLA)
    normalization: str = "bounds"  # NORMALIZATIONS
    seed: int = 0
    recipe: list[dict[str, Any]] = field(default_factory=list)  # optimization steps applied, resolved
    dtype: str = "float32"  # of the saved weights; `save_pretrained` records it, `from_pretrained` builds in it

    def __post_init__(self) -> None:
        check_positive(self, "", "cameras", "action_dim", "chunk")
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("prompt_style", self.prompt_style, PROMPT_STYLES)
        check_choice("projector", self.projector, PROJECTORS)
        check_choice("proprio_projector", self.proprio_projector, PROJECTORS)
        check_choice("proprio_position", self.proprio_position, PROPRIO_POSITIONS)
        grid = self.vision.image_size // self.vision.patch_size
        if not isinstance(self.pixel_shuffle, int) or self.pixel_shuffle < 1 or grid % self.pixel_shuffle:
            raise ValueError(f"pixel_shuffle={self.pixel_shuffle!r} must be a positive integer dividing the "
                             f"{grid} x {grid} patch grid")
        if self.proprio_block and not (self.full_attention and self.proprio_position == "after_prompt"):
            raise ValueError("proprio_block makes the proprio the last block of a full-attention prefix: it needs "
                             "full_attention and proprio_position 'after_prompt'")
        check_choice("normalization", self.normalization, NORMALIZATIONS)
        if not isinstance(self.proprio_dim, int) or self.proprio_dim < 0:
            raise ValueError(f"proprio_dim={self.proprio_dim!r} must be a non-negative integer")

    @property
    def token_patch(self) -> int:
        """Pixels per side of the image patch one visual token stands for (after the pixel shuffle)."""
        return self.vision.patch_size * self.pixel_shuffle

    @property
    def num_visual_tokens(self) -> int:
        return self.cameras * (self.vision.image_size // self.token_patch) ** 2

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
        if isinstance(data.get("head"), dict):
            data["head"] = head_from_dict(data["head"])
        sub = {"vision": VisionConfig, "lm": LMConfig}
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
            head=head_config(head, **{k: v for k, v in TINY_HEAD.items() if k in _field_names(HEAD_CONFIGS.get(head))}),
            cameras=cameras,
            proprio_dim=proprio_dim,
            action_dim=action_dim,
            chunk=chunk,
            seed=seed,
        )
