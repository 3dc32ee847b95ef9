"""A ViT in timm's module layout, the one OpenVLA-OFT checkpoints store (`featurizer.blocks.N.attn.qkv`...).

SigLIP (timm's `vit_so400m_patch14_siglip_*`): no class token, a learned position embedding per patch.
DINOv2 (`vit_large_patch14[_reg4]_dinov2`): a class token, `reg_tokens` registers, LayerScale; its
position embedding covers the class token only without registers (timm's `no_embed_class` for the
register variants). Blocks are pre-norm with fused qkv, exact GELU and LayerNorm eps 1e-6, as timm
builds them. `forward` returns the patch tokens (prefix tokens dropped) after the last block and the
final norm, or the raw output of the second-to-last block (`penultimate`, OpenVLA-OFT's features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlaopt.config import ViTShape

EPS = 1e-6


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (DINOv2)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, shape: ViTShape, layer_scale: bool) -> None:
        super().__init__()
        dim = shape.hidden_size
        self.norm1 = nn.LayerNorm(dim, eps=EPS)
        self.attn = Attention(dim, shape.num_heads)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=EPS)
        self.mlp = Mlp(dim, shape.intermediate_size)
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)


class TimmViT(nn.Module):
    """Patch tokens (B, patches, D) of normalized pixels (B, 3, H, W); see the module docstring."""

    def __init__(self, family: str, shape: ViTShape, image_size: int, patch_size: int, reg_tokens: int,
                 penultimate: bool) -> None:
        super().__init__()
        dim, patches = shape.hidden_size, (image_size // patch_size) ** 2
        dinov2 = family == "dinov2"
        self.prefix = int(dinov2) + reg_tokens
        embed_class = dinov2 and not reg_tokens
        self.patch_embed = PatchEmbed(dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if dinov2 else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, dim)) if reg_tokens else None
        self.embed_class = embed_class
        self.pos_embed = nn.Parameter(torch.randn(1, patches + int(embed_class), dim) * 0.02)
        self.blocks = nn.ModuleList(Block(shape, layer_scale=dinov2) for _ in range(shape.num_layers))
        self.norm = nn.LayerNorm(dim, eps=EPS)
        self.penultimate = penultimate

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        b = x.shape[0]
        cls = [] if self.cls_token is None else [self.cls_token.expand(b, -1, -1)]
        regs = [] if self.reg_token is None else [self.reg_token.expand(b, -1, -1)]
        if self.embed_class:
            x = torch.cat(cls + [x], dim=1) + self.pos_embed
            x = torch.cat([x[:, :1], *regs, x[:, 1:]], dim=1)
        else:
            x = torch.cat(cls + regs + [x + self.pos_embed], dim=1)
        blocks = self.blocks[:-1] if self.penultimate else self.blocks
        for block in blocks:
            x = block(x)
        if not self.penultimate:
            x = self.norm(x)
        return x[:, self.prefix:]
