"""Vision side of the VLA: SigLIP / DINOv2 / fused patch encoder (transformers' models, or timm's
layout from model/vit.py), and projectors.

Images arrive as uint8 (B, cameras, H, W, 3); each camera is encoded separately and the patches of
all cameras are concatenated, as in OpenVLA-OFT with several input images.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

from vlaopt.config import VisionConfig, ViTShape
from vlaopt.model.vit import TimmViT

# Per-backbone pixel normalization (mean, std), as their image processors do.
_PIXEL_STATS = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _build_hf_backbone(name: str, shape: ViTShape, cfg: VisionConfig) -> nn.Module:
    common = {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "hidden_size": shape.hidden_size,
              "num_hidden_layers": shape.num_layers, "num_attention_heads": shape.num_heads}
    if name == "siglip":
        return SiglipVisionModel(SiglipVisionConfig(intermediate_size=shape.intermediate_size, **common))
    return Dinov2Model(Dinov2Config(mlp_ratio=shape.intermediate_size // shape.hidden_size, **common))


class VisionEncoder(nn.Module):
    """Patch features (B, cameras * patches, feature_dim) from uint8 images (B, cameras, H, W, 3)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        shapes = cfg.shapes()
        self.names = list(shapes)
        penultimate = cfg.features == "penultimate"
        if cfg.layout == "timm":
            self.backbones = nn.ModuleDict({
                n: TimmViT(n, s, cfg.image_size, cfg.patch_size, cfg.reg_tokens if n == "dinov2" else 0, penultimate)
                for n, s in shapes.items()})
        else:
            self.backbones = nn.ModuleDict({n: _build_hf_backbone(n, s, cfg) for n, s in shapes.items()})
        for n in self.names:
            mean, std = _PIXEL_STATS[n]
            self.register_buffer(f"{n}_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"{n}_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _features(self, name: str, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens of one backbone (prefix tokens dropped), at the configured layer."""
        backbone = self.backbones[name]
        if self.cfg.layout == "timm":
            return backbone(pixels)
        if self.cfg.features == "penultimate":
            out = backbone(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        else:
            out = backbone(pixel_values=pixels).last_hidden_state
        return out[:, 1:] if name == "dinov2" else out  # drop DINOv2's CLS: keep patch tokens only

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, cams, h, w, _ = images.shape
        dtype = next(self.parameters()).dtype
        pixels = images.reshape(b * cams, h, w, 3).permute(0, 3, 1, 2).to(dtype) / 255.0
        feats = []
        for n in self.names:
            x = (pixels - getattr(self, f"{n}_mean").to(dtype)) / getattr(self, f"{n}_std").to(dtype)
            feats.append(self._features(n, x))
        patches = torch.cat(feats, dim=-1)
        return patches.reshape(b, cams * patches.shape[1], patches.shape[2])


def pixel_shuffle(patches: torch.Tensor, cameras: int, factor: int) -> torch.Tensor:
    """SmolVLM's connector input: each factor x factor block of a camera's patch grid as one token whose
    features are the block's features in SmolVLM's order; tokens stay in raster order of the blocks.
    (B, cams * P, D) -> (B, cams * P / factor^2, D * factor^2)."""
    if factor == 1:
        return patches
    b, n, d = patches.shape
    side = round((n // cameras) ** 0.5)
    x = patches.reshape(b * cameras, side, side // factor, d * factor)  # rows, column blocks
    x = x.transpose(1, 2).reshape(b * cameras, side // factor, side // factor, d * factor * factor)
    return x.transpose(1, 2).reshape(b, n // factor ** 2, d * factor ** 2)


def projector(kind: str, in_dim: int, out_dim: int, fused: bool) -> nn.Module:
    """`linear` (PaliGemma's, SmolVLM's) or Prismatic's `mlp`."""
    return nn.Linear(in_dim, out_dim) if kind == "linear" else mlp_projector(in_dim, out_dim, fused)


def mlp_projector(in_dim: int, out_dim: int, fused: bool) -> nn.Sequential:
    """Prismatic's projector: 2 layers, or 3 (through 4x the input width) for fused features."""
    if fused:
        return nn.Sequential(
            nn.Linear(in_dim, 4 * in_dim), nn.GELU(), nn.Linear(4 * in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
        )
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
