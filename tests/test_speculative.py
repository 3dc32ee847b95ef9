"""Speculative decoding of reasoning: greedy verification gives plain greedy decoding's tokens and
actions; the sampled acceptance rule keeps the target's distribution (exactly, checked on a toy
distribution by a chi-square bound); the n-gram lookup; the step's refusals."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import vlaopt
from vlaopt.config import VLAConfig
from vlaopt.model import expert_policy
from vlaopt.model.vla import VLA
from vlaopt.optimize.decoding.acceptance import greedy_accept, sample_accept
from vlaopt.optimize.decoding.drafts import NGramDraft


def _reasoner(tokens: int = 12, lm: str = "llama", stop_at: int | None = None) -> VLA:
    """A tiny expert VLA that reasons; its LM's matrices widened (std 0.3) so that greedy text varies
    from token to token (at init it repeats one token, which any draft guesses). `stop_at`: the
    greedy token the first sample emits there becomes the STOP id, so decoding stops early."""
    cfg = VLAConfig.tiny(lm=lm, head="expert", cameras=2, proprio_dim=3)
    cfg.lm.hf_config["num_hidden_layers"] = 3
    cfg.head = replace(cfg.head, reasoning_tokens=tokens)
    model = VLA(cfg).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.lm.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    if stop_at is not None:
        model.stop_id = int(expert_policy.rollout(model, *_obs(cfg)).reasoning[0, stop_at])
    return model


def _obs(cfg: VLAConfig, batch: int = 3):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, cfg.cameras, cfg.vision.image_size, cfg.vision.image_size, 3), dtype=np.uint8)
    return images, ["open the drawer", "push the button hard", "pick it"][:batch], rng.normal(size=(batch, 3)).astype(
        np.float32)


@pytest.mark.parametrize("draft", [{"draft": "self", "k": 3, "layers": 1}, {"draft": "ngram", "k": 4, "ngram": 2},
                                   {"draft": "self", "k": 2, "layers": 2}])
@pytest.mark.parametrize("lm,stop_at", [("llama", None), ("gemma", None), ("llama", 5)])
def test_greedy_speculative_decoding_gives_plain_greedy_tokens_and_actions(draft, lm, stop_at):
    plain = _reasoner(lm=lm, stop_at=stop_at)
    fast = vlaopt.apply(_reasoner(lm=lm, stop_at=stop_at), [{"speculative": draft}])
    fast.stop_id = plain.stop_id
    obs = _obs(plain.config)
    noise = torch.randn(3, plain.config.chunk, plain.config.action_dim, generator=torch.Generator().manual_seed(0))
    a = expert_policy.rollout(plain, *obs, noise=noise)
    b = expert_policy.rollout(fast, *obs, noise=noise)
    assert len(set(a.reasoning[1].tolist())) > 3  # varied text
    if stop_at is not None:
        assert a.reasoning[0, stop_at + 1:].eq(plain.pad_id).all()  # the first sample stopped early
    assert torch.equal(a.reasoning, b.reasoning)
    torch.testing.assert_close(b.actions, a.actions, atol=1e-5, rtol=1e-5)
    stats = fast.text_decoder.stats
    assert stats["emitted"] == int((a.reasoning != plain.pad_id).sum())
    assert stats["drafted"] > stats["accepted"]  # rejections happened and were rolled back


def test_greedy_accept_counts_the_matching_prefix():
    drafts = torch.tensor([[1, 2, 3], [1, 9, 3], [7, 2, 3]])
    target = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    assert greedy_accept(drafts, target).tolist() == [3, 1, 0]


@pytest.mark.parametrize("k", [1, 2])
def test_sampled_acceptance_keeps_the_target_distribution(k):
    """Drafts drawn from q, verified against p with the acceptance rule: the first emitted token (the
    accepted draft, or the residual draw) is distributed as p, by a chi-square test."""
    g = torch.Generator().manual_seed(0)
    n, vocab = 200_000, 5
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3])  # a poor draft
    drafts = torch.multinomial(q.expand(n, vocab), k, replacement=True, generator=g)
    accepted, replacement = sample_accept(drafts, q.expand(n, k, vocab), p.expand(n, k, vocab), g)
    first = torch.where(accepted >= 1, drafts[:, 0], replacement)
    counts = torch.bincount(first, minlength=vocab).double()
    chi2 = (((counts - n * p.double()) ** 2) / (n * p.double())).sum()
    assert chi2 < 18.5  # p = 0.001 at 4 degrees of freedom
    assert 0 < accepted.float().mean() < k  # the draft is poor: some are rejected


def test_sampled_speculative_decoding_runs_with_the_models_sampling():
    model = _reasoner()
    model.head.cfg = model.config.head = replace(model.config.head, temperature=1.0)
    fast = vlaopt.apply(_reasoner(), [{"speculative": {"draft": "self", "k": 2, "layers": 1}}])
    fast.head.cfg = fast.config.head = replace(fast.config.head, temperature=1.0)
    out = expert_policy.rollout(fast, *_obs(fast.config), seed=3)
    assert out.reasoning.shape[0] == 3 and torch.isfinite(out.actions).all()


def test_ngram_lookup_proposes_what_followed_the_last_match():
    draft = NGramDraft.__new__(NGramDraft)
    draft.ngram = 3
    assert draft.lookup([5, 6, 7, 8, 9, 5, 6, 7], 3) == [8, 9, 5]
    assert draft.lookup([5, 6, 7, 8, 6], 3) == [7, 8, 6]  # the one-token suffix 6 matched
    assert draft.lookup([1, 2, 3], 2) == [3, 3]  # no match: the last token repeated


def test_speculative_step_refusals():
    with pytest.raises(ValueError, match=r"^speculative decodes the reasoning of an expert head; head.kind='l1'"):
        vlaopt.apply(VLA(VLAConfig.tiny()).eval(), [{"speculative": {}}])
    with pytest.raises(ValueError, match=r"^speculative layers=3: the draft needs 1 to 2 of the LM's 3 decoder layers$"):
        vlaopt.apply(_reasoner(), [{"speculative": {"layers": 3}}])
    with pytest.raises(ValueError, match=r"^speculative k=0 must be a positive integer$"):
        vlaopt.apply(_reasoner(), [{"speculative": {"k": 0}}])
