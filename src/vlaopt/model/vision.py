"""Vision side of the VLA: SigLIP / DINOv2 / fused patch encoder from `transformers`, and projectors.

Images arrive as uint8 (B, cameras, H, W, 3); each camera is encoded separately and the patches of
all cameras are concatenated, as in OpenVLA-OFT with several input images.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

from vlaopt.config import VisionConfig

# Per-backbone pixel normalization (mean, std), as their image processors do.
_PIXEL_STATS = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _build_backbone(name: str, cfg: VisionConfig) -> nn.Module:
    if name == "siglip":
        hf = SiglipVisionConfig(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
        )
        return SiglipVisionModel(hf)
    hf = Dinov2Config(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        mlp_ratio=cfg.intermediate_size // cfg.hidden_size,
    )
    return Dinov2Model(hf)


class VisionEncoder(nn.Module):
    """Patch features (B, cameras * patches, feature_dim) from uint8 images (B, cameras, H, W, 3)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.names = ["siglip", "dinov2"] if cfg.kind == "fused" else [cfg.kind]
        self.backbones = nn.ModuleDict({n: _build_backbone(n, cfg) for n in self.names})
        for n in self.names:
            mean, std = _PIXEL_STATS[n]
            self.register_buffer(f"{n}_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"{n}_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, cams, h, w, _ = images.shape
        dtype = next(self.parameters()).dtype
        pixels = images.reshape(b * cams, h, w, 3).permute(0, 3, 1, 2).to(dtype) / 255.0
        feats = []
        for n in self.names:
            x = (pixels - getattr(self, f"{n}_mean").to(dtype)) / getattr(self, f"{n}_std").to(dtype)
            out = self.backbones[n](pixel_values=x).last_hidden_state
            if n == "dinov2":
                out = out[:, 1:]  # drop CLS: keep patch tokens only
            feats.append(out)
        patches = torch.cat(feats, dim=-1)
        return patches.reshape(b, cams * patches.shape[1], patches.shape[2])


def mlp_projector(in_dim: int, out_dim: int, fused: bool) -> nn.Sequential:
    """Prismatic's projector: 2 layers, or 3 (through 4x the input width) for fused features."""
    if fused:
        return nn.Sequential(
            nn.Linear(in_dim, 4 * in_dim), nn.GELU(), nn.Linear(4 * in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
        )
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
