"""Speculative decoding of reasoning: greedy verification gives plain greedy decoding's tokens and
actions; the sampled acceptance rule keeps the target's distribution (exactly, checked on a toy
distribution by a chi-square bound); the n-gram lookup; the step's refusals."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import assert_same_greedy, reasoner, reasoner_obs

import vlaopt
from vlaopt.config import VLAConfig
from vlaopt.model import expert_policy
from vlaopt.model.vla import VLA
from vlaopt.optimize.decoding.acceptance import greedy_accept, sample_accept
from vlaopt.optimize.decoding.drafts.ngram import NGramDraft
from vlaopt.optimize.decoding.drafts.retrieval import RetrievalDraft
from vlaopt.optimize.decoding.speculative import SpeculativeDecoder


@pytest.mark.parametrize("draft", [{"draft": "self", "k": 3, "layers": 1}, {"draft": "ngram", "k": 4, "ngram": 2},
                                   {"draft": "self", "k": 2, "layers": 2},
                                   {"draft": "retrieval", "k": 4, "texts": {"open it now": 3, "at the goal": 1}}])
@pytest.mark.parametrize("lm,stop_at", [("llama", None), ("gemma", None), ("llama", 5)])
def test_greedy_speculative_decoding_gives_plain_greedy_tokens_and_actions(draft, lm, stop_at):
    plain = reasoner(lm=lm, stop_at=stop_at)
    fast = vlaopt.apply(reasoner(lm=lm, stop_at=stop_at), [{"speculative": draft}])
    fast.stop_id = plain.stop_id
    a = assert_same_greedy(plain, fast)
    if stop_at is not None:
        assert a.reasoning[0, stop_at + 1:].eq(plain.pad_id).all()  # the first sample stopped early
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
    model = reasoner()
    model.head.cfg = model.config.head = replace(model.config.head, temperature=1.0)
    fast = vlaopt.apply(reasoner(), [{"speculative": {"draft": "self", "k": 2, "layers": 1}}])
    fast.head.cfg = fast.config.head = replace(fast.config.head, temperature=1.0)
    out = expert_policy.rollout(fast, *reasoner_obs(fast.config), seed=3)
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
        vlaopt.apply(reasoner(), [{"speculative": {"layers": 3}}])
    with pytest.raises(ValueError, match=r"^speculative k=0 must be a positive integer$"):
        vlaopt.apply(reasoner(), [{"speculative": {"k": 0}}])


def _rest_reference(corpus: list[list[int]], tokens: list[int], spans: int, long: int, choices: int) -> list[int]:
    """REST's retrieval, re-typed from FasterDecoding/REST (DraftRetriever search, generate_candidates):
    the corpus as one token stream (entries apart), the longest span of the tokens' end that occurs,
    the `long` tokens after every occurrence, every prefix counted, the `choices` most frequent kept
    as a trie; then the path our single-sequence verification takes: the most frequent child, ties to
    the lower id."""
    stream = [t for entry in corpus for t in [*entry, -1]]
    for span in range(min(spans, len(tokens)), 0, -1):
        query = tokens[-span:]
        hits = [i for i in range(len(stream) - span + 1) if stream[i:i + span] == query]
        follows = [[t for t in stream[i + span:i + span + long]] for i in hits]
        follows = [f[:f.index(-1)] if -1 in f else f for f in follows]
        counts = {}
        for f in follows:
            for j in range(len(f)):
                counts[tuple(f[:j + 1])] = counts.get(tuple(f[:j + 1]), 0) + 1
        if not counts:
            continue
        kept = dict(sorted(counts.items(), key=lambda kv: -kv[1])[:choices])
        path = []
        while True:
            nxt = [(c, -p[-1]) for p, c in kept.items() if len(p) == len(path) + 1 and list(p[:-1]) == path]
            if not nxt:
                return path
            path.append(-max(nxt)[1])
    return []


def test_retrieval_draft_follows_rest():
    rng = np.random.default_rng(0)
    draft = RetrievalDraft.__new__(RetrievalDraft)
    draft.span = 4
    for _ in range(200):
        texts = [rng.integers(0, 4, rng.integers(2, 9)).tolist() for _ in range(5)]
        counts = rng.integers(1, 4, 5).tolist()
        draft.store = list(zip(texts, counts))
        corpus = [t for t, c in zip(texts, counts) for _ in range(c)]  # REST's datastore holds the duplicates
        tokens = rng.integers(0, 4, rng.integers(1, 6)).tolist()
        expected = _rest_reference(corpus, tokens, spans=4, long=3, choices=10_000)
        got = draft.lookup(tokens, 3)
        assert got[:len(expected)] == expected, (texts, counts, tokens)
        if expected:
            assert got[len(expected):] == [expected[-1]] * (3 - len(expected))
        else:
            assert got == [tokens[-1]] * 3


def test_retrieval_draft_holding_the_text_is_accepted_whole():
    """With the datastore holding what the model will say, each verification pass emits k + 1 tokens."""
    plain, fast = reasoner(tokens=16), reasoner(tokens=16)
    obs = reasoner_obs(plain.config, batch=1)
    said = expert_policy.rollout(plain, *obs).reasoning[0].tolist()
    draft = RetrievalDraft.__new__(RetrievalDraft)
    draft.span, draft.vocab, draft.store = 16, plain.lm.vocab_size, [(said, 1)]
    fast.text_decoder = SpeculativeDecoder(draft, 3)
    assert expert_policy.rollout(fast, *obs).reasoning[0].tolist() == said
    assert fast.text_decoder.stats["rounds"] == 4  # 16 tokens, 4 per pass
    assert fast.text_decoder.stats["accepted"] == fast.text_decoder.stats["drafted"] == 12


def test_retrieval_corpus_and_refusals(tmp_path):
    with pytest.raises(ValueError, match=r"^speculative corpus=None, texts=<0 texts> with draft='retrieval': a datastore"):
        vlaopt.apply(reasoner(), [{"speculative": {"draft": "retrieval"}}])
    with pytest.raises(ValueError, match=r"^speculative texts=\{'a': 0\} must map reasoning texts to positive counts$"):
        vlaopt.apply(reasoner(), [{"speculative": {"draft": "retrieval", "texts": {"a": 0}}}])
    with pytest.raises(ValueError, match=r"a datastore \(corpus or texts\) is needed for, and only for, draft retrieval$"):
        vlaopt.apply(reasoner(), [{"speculative": {"draft": "ngram", "texts": {"a": 1}}}])
