"""LightVLA's parameter-free pruner (seed notes, module 4).

Scoring: RMS-normed patches attend to the RMS-normed task tokens (everything after the visual
segment), the result is RMS-normed again and scored against every patch: score[i, j] says how much
patch i points at patch j. Inference: every patch votes for its argmax, and the kept set is the
union of votes, so the number kept adapts to each frame. Training (`train_path: merge`, the seed):
nothing is dropped; each patch slot is replaced by the patch it votes for, through a straight-through
one-hot/softmax merge, with uniform noise of scale `noise_scale` on the scores (decayed from 1 to 0
over training), and takes the voted patch's position id, as the authors' TokenPruner does. The LM
then sees duplicates (several slots holding one patch at one position), which inference never shows
it; RMS norms use the reference's eps 1e-6. Padding patches (from an earlier pruner) neither vote
nor are voted for; the task tokens' attention skips padded prompt tokens (the reference has none).
`train_path: drop` (ours) keeps the same straight-through merge but shows the LM exactly the
inference sequence: each voted patch at its own slot and position, the other slots masked out.

`keep` < 1 (ours, for static shapes: torch.compile's one graph, CUDA graphs) keeps a fixed count
instead of the union of votes: the `keep` fraction of patches with the most votes, ties (most patches
have none) broken by the highest score any patch gives them. Where the union holds fewer patches, the
fixed count adds unvoted ones; where it holds more, the least-voted are dropped. Training is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlaopt.model.layout import TokenState
from vlaopt.optimize.tokens.base import (
    PRUNERS,
    PrunerConfig,
    TokenPruner,
    keep_count,
    keep_visual,
    replace_visual,
    top_k_mask,
)

TRAIN_PATHS = ("merge", "drop")


@dataclass
class LightVLAConfig(PrunerConfig):
    keep: float = 1.0  # 1: keep the union of votes (adaptive count); < 1: that fraction, ranked by votes
    train_path: str = "merge"  # what the LM sees in training: "merge" (the seed) or "drop" (as in inference)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_path not in TRAIN_PATHS:
            raise ValueError(f"train_path={self.train_path!r}; expected one of {', '.join(TRAIN_PATHS)}")


def noise_schedule(step: int, total: int) -> float:
    """LightVLA's training noise on the scores: 1 at the start, decaying linearly to 0 (1 - step / total)."""
    return max(0.0, 1.0 - step / max(1, total))


RMS_EPS = 1e-6
"""The epsilon of the reference TokenPruner's RMS norms (of patches, task tokens and queries)."""


def _rms(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), eps=RMS_EPS)


def lightvla_scores(patches: torch.Tensor, task: torch.Tensor, task_valid: torch.Tensor) -> torch.Tensor:
    """Patch-to-patch scores (B, P, P) of LightVLA from patches (B, P, D) and task tokens (B, T, D).

    By definition q = attention(rms(patches) -> rms(task)) and score = rms(q) . rms(patches)^T / sqrt(D).
    Since q = A t (A the attention weights, t the normed task tokens), q . p_j = A (p t^T)^T, so the
    scores come from the logits p t^T already computed, and |q_i| from the T x T Gram matrix t t^T:
    P*T*(P + T) multiply-adds instead of P*P*D for the score matrix (3x fewer at P=512, T~160, D=512)."""
    p, t = _rms(patches), _rms(task)
    d = patches.shape[-1]
    logits = p @ t.transpose(1, 2) / d**0.5  # (B, P, T)
    attn = logits.masked_fill(~task_valid[:, None, :], float("-inf")).softmax(-1)
    q_sq = ((attn @ (t @ t.transpose(1, 2))) * attn).sum(-1)  # |q_i|^2 = a_i^T (t t^T) a_i
    q_rms = (q_sq / d + RMS_EPS).sqrt()
    return (attn @ logits.transpose(1, 2)) / q_rms[..., None]


def straight_through_merge(scores: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Forward: each patch becomes the patch it votes for; backward: gradients of the softmax."""
    hard = F.one_hot(scores.argmax(-1), scores.shape[-1]).to(scores.dtype)
    soft = scores.softmax(-1)
    return (hard + soft - soft.detach()) @ patches


def vote_counts(scores: torch.Tensor, voter_valid: torch.Tensor) -> torch.Tensor:
    """Votes each patch (B, P) receives: every valid patch votes for the argmax of its scores."""
    return torch.zeros(voter_valid.shape, device=scores.device).scatter_add_(1, scores.argmax(-1), voter_valid.float())


def vote_ranking(scores: torch.Tensor, voter_valid: torch.Tensor) -> torch.Tensor:
    """Rank key of each patch (B, P) for the fixed-count mode: its number of votes from valid patches
    plus, in [0, 1), the rank of the highest score a valid patch gives it (the tie-break)."""
    p = scores.shape[-1]
    counts = vote_counts(scores, voter_valid)
    best = scores.masked_fill(~voter_valid[..., None], torch.finfo(scores.dtype).min).amax(1)
    return counts + best.argsort(1).argsort(1).to(counts.dtype) / p


def first_voters(votes: torch.Tensor, voter_valid: torch.Tensor) -> torch.Tensor:
    """For each patch j (B, P): the first valid patch i whose vote is j, or P where none votes for j."""
    b, p = votes.shape
    order = torch.arange(p, device=votes.device).expand(b, p).masked_fill(~voter_valid, p)
    return torch.full_like(votes, p).scatter_reduce(1, votes, order, reduce="amin")


@PRUNERS.register("lightvla")
class LightVLAPruner(TokenPruner):
    name = "lightvla"
    config_cls = LightVLAConfig

    def __init__(self, cfg: LightVLAConfig, model) -> None:
        super().__init__(cfg, model)
        self.noise_scale = 0.0

    def set_noise_scale(self, value: float) -> None:
        """Scale of the uniform score noise used in training."""
        self.noise_scale = float(value)

    def training_step(self, step: int, total: int) -> None:
        self.set_noise_scale(noise_schedule(step, total))

    def votes(self, state: TokenState) -> torch.Tensor:
        """Index of the patch each patch votes for (B, P), from the noise-free scores."""
        return self._scores(state).argmax(-1)

    def _scores(self, state: TokenState) -> torch.Tensor:
        span = state.layout.span("visual")
        task = slice(span.stop, None)
        scores = lightvla_scores(state.hidden[:, span], state.hidden[:, task], state.valid[:, task])
        # padding patches (from an earlier pruner) can neither vote nor be voted for
        vis_valid = state.valid[:, span]
        return scores.masked_fill(~vis_valid[:, None, :], torch.finfo(scores.dtype).min)

    def forward(self, state: TokenState) -> TokenState:
        span = state.layout.span("visual")
        scores = self._scores(state)
        vis_valid = state.valid[:, span]
        if self.training:
            if self.noise_scale > 0:
                scores = scores + torch.rand_like(scores) * self.noise_scale
            merged = straight_through_merge(scores, state.hidden[:, span])
            votes = scores.argmax(-1)
            positions = state.position_ids[:, span]
            if self.cfg.train_path == "drop":  # slot j holds patch j (through its first voter's merge) or is masked
                voter = first_voters(votes, vis_valid)
                merged = merged.gather(1, voter.clamp(max=merged.shape[1] - 1)[..., None].expand_as(merged))
                vis_valid = vis_valid & (voter < merged.shape[1])
            else:  # the seed: slot i holds the patch it voted for, at that patch's position
                positions = positions.gather(1, votes).where(vis_valid, positions)
            return replace_visual(state, merged, positions, vis_valid)
        if self.cfg.keep < 1:
            k = keep_count(state.layout.visual, self.cfg.keep)
            return keep_visual(state, top_k_mask(vote_ranking(scores, vis_valid), k), k)
        return keep_visual(state, vote_counts(scores, vis_valid) > 0)
