"""OpenVLA-OFT and LightVLA checkpoints (moojink/openvla-oft, LiAutoAD/LightVLA) as vla-opt models.

What such a folder holds, and where it goes:

    config.json (model_type openvla)    vision_backbone_id, image_sizes, text_config (the Llama), norm_stats
    model.safetensors (or shards)       vision_backbone.featurizer.* / fused_featurizer.* (timm ViT naming,
                                        LayerScale as `scale_factor`), projector.fc1..fc3, language_model.*
    action_head--*_checkpoint.pt        the L1 head's MLPResNet (model.fc1, model.mlp_resnet_blocks.i.ffn.*)
    proprio_projector--*_checkpoint.pt  fc1, fc2 (optional)
    dataset_statistics.json             per dataset: action / proprio q01, q99, min, max, mask

OFT's model, as vla-opt builds it: features from each ViT's second-to-last block (vision.features
penultimate, timm layout), DINOv2 and SigLIP channels concatenated (our order is SigLIP first, so
the projector's first layer has its input columns permuted to match), [BOS][patches][proprio]
[prompt + Llama-2's empty token 29871][zeroed action slots][STOP], full bidirectional attention
(their transformers fork), the L1 head on the final-norm states, and actions unnormalized without
clipping. The chunk length and the normalization (q01/q99 or min/max) are constants of OFT's
platform (`prismatic/vla/constants.py`), not stored in the checkpoint: `platform` picks them.
LightVLA is the same checkpoint layout run with its parameter-free pruner before the first decoder
layer: the import adds our `lightvla` token_pruning step (optimize/tokens/lightvla.py).

Refused by name: diffusion heads (noisy_action_projector), FiLM, discrete-token checkpoints without
an action head, vision backbones other than SigLIP / DINOv2+SigLIP, LMs other than Llama.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlaopt.config import L1HeadConfig, LMConfig, VisionConfig, ViTShape, VLAConfig
from vlaopt.importers.base import (
    IMPORTERS,
    UnsupportedCheckpoint,
    WeightMap,
    find_one,
    load_into,
    read_json,
    read_pt,
    read_safetensors,
    source_tokenizer,
)
from vlaopt.model.vla import VLA
from vlaopt.optimize import apply

PLATFORMS = {"libero": (8, "bounds_q99"), "aloha": (25, "bounds"), "bridge": (5, "bounds_q99")}
"""OFT's per-platform constants: action chunk length and action/proprio normalization."""
TIMM_VITS = {
    "vit_so400m_patch14_siglip_224": ("siglip", 16, 0),
    "vit_so400m_patch14_siglip_384": ("siglip", 16, 0),
    "vit_large_patch14_reg4_dinov2.lvd142m": ("dinov2", 16, 4),
}
"""timm model id -> (family, attention heads, registers): what the weights cannot tell."""
STOP_ID = 2  # OFT's STOP_INDEX ('</s>' of Llama-2)
EMPTY_TOKEN = 29871  # appended to the prompt unless it ends it (OFT's predict_action)
UNUSED = ("attn_pool.",)  # SigLIP's attention-pooling head: the patch features never reach it


@dataclass
class OFTOptions:
    """`platform` (libero | aloha | bridge) sets the chunk and normalization as OFT's constants do;
    `chunk` overrides the chunk; `unnorm_key` picks the dataset statistics (needed when there are
    several); `cameras` is OFT's num_images_in_input (not stored in the checkpoint)."""

    platform: str = "libero"
    chunk: int | None = None
    unnorm_key: str | None = None
    cameras: int = 1

    def __post_init__(self) -> None:
        if self.platform not in PLATFORMS:
            raise ValueError(f"platform={self.platform!r}; expected one of {', '.join(PLATFORMS)}")


def _backbones(cfg: dict[str, Any]) -> list[tuple[str, str, int, int]]:
    """(source prefix, family, heads, registers) per backbone, in OFT's feature order."""
    ids = cfg.get("timm_model_ids")
    if not ids:
        raise UnsupportedCheckpoint(f"config.json has no timm_model_ids (vision_backbone_id "
                                    f"{cfg.get('vision_backbone_id')!r})")
    unknown = [i for i in ids if i not in TIMM_VITS]
    if unknown:
        raise UnsupportedCheckpoint(f"vision backbone {unknown[0]} (vision_backbone_id "
                                    f"{cfg.get('vision_backbone_id')!r}) is not supported; vla-opt imports "
                                    f"{', '.join(TIMM_VITS)}")
    if cfg.get("timm_override_act_layers") and any(cfg["timm_override_act_layers"]):
        raise UnsupportedCheckpoint(f"timm_override_act_layers={cfg['timm_override_act_layers']} (e.g. quick_gelu) "
                                    "is not supported: vla-opt's timm ViT uses exact GELU")
    prefixes = ["vision_backbone.featurizer.", "vision_backbone.fused_featurizer."][: len(ids)]
    out = [(p, *TIMM_VITS[i]) for p, i in zip(prefixes, ids)]
    families = [f for _, f, _, _ in out]
    if len(out) == 2 and families != ["dinov2", "siglip"]:
        raise UnsupportedCheckpoint(f"fused backbones {families}: vla-opt fuses DINOv2 with SigLIP only")
    if len(out) == 1 and families != ["siglip"]:
        raise UnsupportedCheckpoint(f"a single {families[0]} backbone is not supported (SigLIP alone, or fused)")
    return out


def _vit_shape(weights: WeightMap, prefix: str, heads: int) -> tuple[ViTShape, int, int]:
    """(shape, patch size, patches) of one timm ViT from its tensors."""
    depth = 1 + max(int(k[len(prefix) + 7:].split(".")[0]) for k in weights.left if k.startswith(prefix + "blocks."))
    width = weights.peek(prefix + "pos_embed").shape[-1]
    mlp = weights.peek(prefix + "blocks.0.mlp.fc1.weight").shape[0]
    patch = weights.peek(prefix + "patch_embed.proj.weight").shape[-1]
    if width % heads:
        raise UnsupportedCheckpoint(f"{prefix}: width {width} is not divisible by the {heads} heads of its timm id")
    return ViTShape(width, depth, heads, mlp), patch, weights.peek(prefix + "pos_embed").shape[1]


def _vit_key(rest: str) -> str:
    """timm's ViT names are ours; OFT renamed LayerScale's `gamma` to `scale_factor`."""
    return rest.replace(".scale_factor", ".gamma")


def _stats(src: Path, cfg: dict[str, Any], key: str | None, normalization: str) -> dict[str, Any]:
    """vla-opt statistics from dataset_statistics.json (else config.json's norm_stats)."""
    path = src / "dataset_statistics.json"
    stats = read_json(path) if path.is_file() else cfg.get("norm_stats")
    if not stats:
        raise UnsupportedCheckpoint(f"{src} has no dataset_statistics.json and config.json no norm_stats: the "
                                    "actions cannot be unnormalized")
    if key is None:
        if len(stats) > 1:
            raise UnsupportedCheckpoint(f"the checkpoint has statistics of {len(stats)} datasets "
                                        f"({', '.join(stats)}); choose one with unnorm_key")
        key = next(iter(stats))
    if key not in stats:
        raise UnsupportedCheckpoint(f"unnorm_key={key!r} is not among the statistics ({', '.join(stats)})")
    low, high = ("q01", "q99") if normalization == "bounds_q99" else ("min", "max")
    out = {}
    for name in ("action", "proprio"):
        entry = stats[key].get(name)
        if entry is not None:
            out[name] = {"q01": entry[low], "q99": entry[high]}
            if "mask" in entry:
                out[name]["mask"] = [bool(m) for m in entry["mask"]]
    return out


def import_oft(src: str | Path, pruner: bool = False, **options: Any) -> VLA:
    """A VLA predicting the actions of the OFT checkpoint in `src` (see the module docstring);
    `pruner` adds LightVLA's token pruning. `options` are `OFTOptions` fields."""
    src, opts = Path(src), OFTOptions(**options)
    cfg = read_json(src / "config.json")
    if cfg.get("model_type") != "openvla":
        raise UnsupportedCheckpoint(f"{src}/config.json has model_type {cfg.get('model_type')!r}, expected 'openvla'")
    text = dict(cfg.get("text_config") or {})
    if text.get("model_type", "llama") != "llama":
        raise UnsupportedCheckpoint(f"text_config.model_type {text['model_type']!r} is not supported (Llama only)")
    text["model_type"] = "llama"
    for part, why in (("noisy_action_projector--*checkpoint.pt", "diffusion action heads"),
                      ("vision_backbone--*checkpoint.pt", "FiLM vision backbones")):
        if (found := find_one(src, part)) is not None:
            raise UnsupportedCheckpoint(f"{found.name}: {why} are not supported")
    head_file = find_one(src, "action_head--*checkpoint.pt")
    if head_file is None:
        raise UnsupportedCheckpoint(f"{src} has no action_head--*_checkpoint.pt: discrete-token OFT checkpoints are "
                                    "not supported (the L1 regression head is)")

    weights = WeightMap(read_safetensors(src), f"{src}/model.safetensors")
    backbones = _backbones(cfg)
    shapes = {}
    for prefix, family, heads, regs in backbones:
        shape, patch, positions = _vit_shape(weights, prefix, heads)
        shapes[family] = (shape, patch, positions, regs)
    image_size = int(cfg.get("image_sizes", [0])[0])
    sizes = {(p, n) for _, p, n, _ in shapes.values()}
    if len(set(cfg.get("image_sizes", []))) > 1 or len({p for p, _ in sizes}) > 1:
        raise UnsupportedCheckpoint(f"image_sizes {cfg.get('image_sizes')} / patch sizes {sorted(sizes)}: the fused "
                                    "backbones must share image and patch size")
    siglip = shapes["siglip"][0]
    vision = VisionConfig(
        kind="fused" if "dinov2" in shapes else "siglip", image_size=image_size, patch_size=shapes["siglip"][1],
        hidden_size=siglip.hidden_size, num_layers=siglip.num_layers, num_heads=siglip.num_heads,
        intermediate_size=siglip.intermediate_size, layout="timm", features="penultimate",
        reg_tokens=shapes["dinov2"][3] if "dinov2" in shapes else 0,
        dinov2_shape=shapes["dinov2"][0] if "dinov2" in shapes else None)

    head = WeightMap(read_pt(head_file), head_file.name)
    blocks = len({k.split(".")[2] for k in head.left if k.startswith("model.mlp_resnet_blocks.")})
    hidden_dim, action_dim = head.peek("model.fc1.weight").shape[0], head.peek("model.fc2.weight").shape[0]
    proprio_file = find_one(src, "proprio_projector--*checkpoint.pt")
    proprio = None if proprio_file is None else WeightMap(read_pt(proprio_file), proprio_file.name)
    chunk, normalization = PLATFORMS[opts.platform]
    config = VLAConfig(
        vision=vision, lm=LMConfig(hf_config=text), head=L1HeadConfig(hidden_dim=hidden_dim, num_blocks=blocks),
        cameras=opts.cameras, proprio_dim=0 if proprio is None else proprio.peek("fc1.weight").shape[1],
        action_dim=action_dim, chunk=opts.chunk or chunk, full_attention=True, clip_actions=False,
        prompt_suffix_ids=[EMPTY_TOKEN])
    tokenizer = source_tokenizer(src, "OFT checkpoints ship Llama-2's tokenizer files")
    if tokenizer.eos_token_id != STOP_ID:
        raise UnsupportedCheckpoint(f"the tokenizer's eos id is {tokenizer.eos_token_id}; OFT's STOP token is "
                                    f"{STOP_ID} (Llama-2's '</s>')")
    model = VLA(config, tokenizer=tokenizer, load_lm_weights=False)
    model.set_stats(_stats(src, cfg, opts.unnorm_key, normalization))

    for prefix, family, _, _ in backbones:
        weights.drop(prefix + u for u in UNUSED)
        weights.move_prefix(prefix, f"vision.backbones.{family}.", _vit_key)
    fused = len(backbones) == 2
    if fused:  # OFT concatenates [DINOv2 | SigLIP]; ours is [SigLIP | DINOv2]
        dino = shapes["dinov2"][0].hidden_size
        weights.move("projector.fc1.weight", "projector.0.weight", lambda w: torch.cat([w[:, dino:], w[:, :dino]], 1))
    else:
        weights.move("projector.fc1.weight", "projector.0.weight")
    weights.move("projector.fc1.bias", "projector.0.bias")
    for i, name in enumerate(("fc2", "fc3")[: 1 + fused]):
        for p in ("weight", "bias"):
            weights.move(f"projector.{name}.{p}", f"projector.{2 * i + 2}.{p}")
    weights.move_prefix("language_model.", "lm.causal_lm.")

    names = {"layer_norm1": "inp.0", "fc1": "inp.1", "layer_norm2": "out.0", "fc2": "out.1"}
    for key in list(head.left):
        part = key.removeprefix("model.").split(".")
        if part[0] == "mlp_resnet_blocks" and part[2] == "ffn":
            head.move(key, f"head.net.blocks.{part[1]}.{part[3]}.{part[4]}")
        elif part[0] in names:
            head.move(key, f"head.net.{names[part[0]]}.{part[1]}")
    if proprio is not None:
        for name, ours_idx in (("fc1", 0), ("fc2", 2)):
            for p in ("weight", "bias"):
                proprio.move(f"{name}.{p}", f"proprio_projector.{ours_idx}.{p}")
    load_into(model, [weights, head] + ([] if proprio is None else [proprio]))
    if pruner:
        apply(model, [{"token_pruning": {"method": "lightvla", "layer": 0}}])
    return model.eval()


@IMPORTERS.register("oft")
def _oft(src: str | Path, platform: str = "libero", chunk: int | None = None, unnorm_key: str | None = None,
         cameras: int = 1) -> VLA:
    return import_oft(src, platform=platform, chunk=chunk, unnorm_key=unnorm_key, cameras=cameras)


@IMPORTERS.register("lightvla")
def _lightvla(src: str | Path, platform: str = "libero", chunk: int | None = None, unnorm_key: str | None = None,
              cameras: int = 1) -> VLA:
    return import_oft(src, pruner=True, platform=platform, chunk=chunk, unnorm_key=unnorm_key, cameras=cameras)
