"""Which patches of a camera may reuse last step's work: VLA-Cache's selection rules as pure functions.

Read from the authors' code (siyuhsu/vla-cache, `experiments/robot/vla_cache_utils.py`):

- static patches: cosine similarity of each patch's raw pixels (float32) between the previous and the
  current frame; patches at or above a threshold (theirs 0.996), at most the `k` most similar of a
  camera (theirs 150 of 256), ties going to the earlier patch (their stable sort);
- task-relevant patches: the mean attention the prompt's tokens paid each patch at one decoder layer
  in the previous step (mean over heads and prompt tokens); the `k` most attended of a camera (theirs
  120 of 256) are never reused.

Patches are numbered row-major per camera, as the vision encoder's patch embedding flattens them.
"""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Each patch's pixels (B, cams, patches, patch * patch * 3) of uint8 frames (B, cams, H, W, 3), in float32."""
    b, cams, h, w, ch = images.shape
    grid = images.float().reshape(b, cams, h // patch, patch, w // patch, patch, ch)
    return grid.permute(0, 1, 2, 4, 3, 5, 6).reshape(b, cams, (h // patch) * (w // patch), -1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last axis (1e-8 added to the norms' product, as the authors do)."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-8)


def patch_similarity(previous: torch.Tensor, current: torch.Tensor, patch: int) -> torch.Tensor:
    """Cosine similarity (B, cams, patches) of each patch's pixels between two uint8 frames
    (B, cams, H, W, 3), in float32."""
    return cosine(patchify(previous, patch), patchify(current, patch))


def top_k_stable(scores: torch.Tensor, k: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the `k` highest `scores` along the last axis among the `eligible` ones, ties
    going to the earlier index (a stable descending sort)."""
    if eligible is not None:
        scores = scores.masked_fill(~eligible, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, True)
    return mask if eligible is None else mask & eligible


def static_patches(similarity: torch.Tensor, threshold: float, k: int) -> torch.Tensor:
    """Static patches (B, cams, patches): similarity at least `threshold`, the `k` most similar of
    each camera at most."""
    return top_k_stable(similarity, k, similarity >= threshold)


def prompt_attention(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, scaling: float,
                     valid: torch.Tensor) -> torch.Tensor:
    """Mean attention (B, S) of the query rows (B, heads, T, hd) over the S keys, each row's softmax
    of the scaled scores under the boolean `mask` (B, 1, T, S), averaged over heads, then over the
    rows where `valid` (B, T) is True. `key` (B, kv_heads, S, hd) serves query heads in groups (GQA)."""
    b, heads, t, hd = query.shape
    kv_heads = key.shape[1]
    grouped = query.float().reshape(b, kv_heads, heads // kv_heads * t, hd)
    scores = (grouped @ key.float().transpose(-1, -2)).reshape(b, heads, t, -1) * scaling
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0).mean(1)  # (B, T, S)
    weight = valid.float()
    return (probs * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp(min=1)
