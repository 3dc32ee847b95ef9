"""Visual-token pruning: equivalence at keep=1, batching, LightVLA's votes and straight-through
training path, FastV's attention rows, recipes that save and reload."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import observations
from transformers import AutoModelForCausalLM

from vlaopt import VLA, VLAConfig, apply, load, load_recipe
from vlaopt.model.policy import action_hidden
from vlaopt.optimize.tokens.base import PRUNERS
from vlaopt.optimize.tokens.divprune import max_min_select
from vlaopt.optimize.tokens.fastv import attention_probs
from vlaopt.optimize.tokens.lightvla import lightvla_scores, straight_through_merge
from vlaopt.optimize.tokens.pooling import pool_kernel

FAMILIES = ["llama", "qwen2", "qwen3"]
FIXED_K = ["fastv", "divprune", "random", "pooling"]


def _model(lm="llama", recipe=None, **kw) -> VLA:
    cfg = VLAConfig.tiny(lm=lm, cameras=2, proprio_dim=3, **kw)
    model = VLA(cfg).eval()
    return apply(model, recipe) if recipe else model


def _layer(method: str) -> int:
    return 1 if method == "fastv" else 0  # fastv reads the attention of the layer before it


@pytest.mark.parametrize("lm", FAMILIES)
@pytest.mark.parametrize("method", FIXED_K)
def test_keeping_all_tokens_gives_the_unpruned_actions(lm, method):
    base = _model(lm)
    pruned = _model(lm, [{"token_pruning": {"method": method, "layer": 0 if method == "pooling" else 1, "keep": 1.0}}])
    images, instructions, proprio = observations(base.config)
    diff = (pruned.predict_action(images, instructions, proprio) - base.predict_action(images, instructions, proprio))
    assert diff.abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "lm,step",
    [("llama", {"method": m, "layer": _layer(m), "keep": 0.25}) for m in FIXED_K]
    + [(lm, {"method": "lightvla"}) for lm in FAMILIES]
    + [("qwen3", {"method": "fastv", "layer": 1, "keep": 0.3})],
)
def test_pruned_batch_equals_each_sample_pruned_alone(lm, step):
    model = _model(lm, [{"token_pruning": step}])
    images, instructions, proprio = observations(model.config)
    batch = model.predict_action(images, instructions, proprio)
    for i in range(3):
        alone = model.predict_action(images[i : i + 1], instructions[i : i + 1], proprio[i : i + 1])
        torch.testing.assert_close(alone, batch[i : i + 1], atol=1e-5, rtol=0)


def _encoded(model: VLA):
    images, instructions, proprio = observations(model.config)
    return model.lm_input(images, instructions, proprio)


def _pruned(model: VLA, state):
    """The token state the model's first pruning hook returns inside the LM's layer loop."""
    out = []
    handle = model.lm.hooks[0].register_forward_hook(lambda mod, args, result: out.append(result))
    model.lm(state)
    handle.remove()
    return out[0]


@pytest.mark.parametrize("method,keep", [("fastv", 0.25), ("divprune", 0.4), ("random", 0.1), ("pooling", 0.25)])
def test_fixed_ratio_methods_keep_round_k_and_original_positions(method, keep):
    model = _model(recipe=[{"token_pruning": {"method": method, "layer": _layer(method), "keep": keep}}])
    state = _encoded(model)
    out = _pruned(model, state)
    n = state.layout.visual
    assert out.layout.visual == max(1, round(n * keep))
    assert out.valid[:, out.layout.span("visual")].all()
    # the segments after the visual tokens keep their position ids
    after = slice(state.layout.span("visual").stop, None)
    assert torch.equal(out.position_ids[:, out.layout.span("visual").stop :], state.position_ids[:, after])
    if method != "pooling":  # dropped, not merged: kept tokens carry their original positions
        vis = out.position_ids[:, out.layout.span("visual")]
        assert set(vis.flatten().tolist()) <= set(range(1, 1 + n))
        assert (vis.diff(dim=1) > 0).all()  # original order


def test_lightvla_keeps_exactly_the_union_of_votes():
    model = _model(recipe=[{"token_pruning": {"method": "lightvla"}}])
    pruner = model.lm.hooks[0]
    state = _encoded(model)
    votes = pruner.votes(state)
    out = pruner(state)
    kept = out.valid[:, out.layout.span("visual")].sum(1)
    expected = torch.tensor([len(torch.unique(v)) for v in votes])
    assert torch.equal(kept, expected)
    assert out.layout.visual == int(expected.max())
    vis_pos = out.position_ids[:, out.layout.span("visual")]
    for b in range(votes.shape[0]):  # kept tokens are exactly the voted ones, at their positions
        assert vis_pos[b, : kept[b]].tolist() == (torch.unique(votes[b]) + 1).tolist()


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_lightvla_fixed_count_keeps_the_most_voted_patches(keep):
    """keep < 1: every sample keeps the same k patches, ranked (brute force here) by votes, then by the
    highest score any patch gives them; the union of votes is inside the kept set whenever it fits."""
    model = _model(recipe=[{"token_pruning": {"method": "lightvla", "keep": keep}}])
    pruner = model.lm.hooks[0]
    state = _encoded(model)
    scores = pruner._scores(state)
    n = state.layout.visual
    k = max(1, round(n * keep))
    out = pruner(state)
    assert out.layout.visual == k and bool(out.valid[:, out.layout.span("visual")].all())
    for b in range(scores.shape[0]):
        votes = scores[b].argmax(-1).tolist()
        best = scores[b].max(0).values.tolist()
        ranked = sorted(range(n), key=lambda j: (votes.count(j), best[j]), reverse=True)
        expected = sorted(ranked[:k])
        assert (out.position_ids[b, out.layout.span("visual")] - 1).tolist() == expected
        if len(set(votes)) <= k:
            assert set(votes) <= set(expected)


def test_lightvla_scores_equal_their_definition():
    """The factored scores equal the seed's definition: rms-normed patches attend to the rms-normed
    task tokens, the result is rms-normed and scored against every normed patch, over sqrt(D)."""
    gen = torch.Generator().manual_seed(0)
    patches, task = torch.randn(2, 12, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)
    task_valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    rms = lambda x: torch.nn.functional.rms_norm(x, (x.shape[-1],))  # noqa: E731
    p, t = rms(patches), rms(task)
    queries = torch.nn.functional.scaled_dot_product_attention(p, t, t, attn_mask=task_valid[:, None, :])
    expected = rms(queries) @ p.transpose(1, 2) / 16**0.5
    torch.testing.assert_close(lightvla_scores(patches, task, task_valid), expected, atol=1e-5, rtol=1e-5)


def test_lightvla_training_merge_is_straight_through():
    scores = torch.randn(2, 5, 5, requires_grad=True)
    patches = torch.randn(2, 5, 3)
    merged = straight_through_merge(scores, patches)
    expected = patches.gather(1, scores.argmax(-1)[..., None].expand(-1, -1, 3))
    torch.testing.assert_close(merged, expected)  # forward: the hard choice
    (merged * torch.randn_like(merged)).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0  # backward: the softmax


def test_lightvla_training_mode_keeps_the_sequence_and_passes_gradients():
    model = _model(recipe=[{"token_pruning": {"method": "lightvla"}}]).train()
    model.lm.hooks[0].set_noise_scale(1.0)
    images, instructions, proprio = observations(model.config)
    actions = torch.zeros(3, model.config.chunk, model.config.action_dim)
    loss = model.compute_loss(images, instructions, actions, proprio)
    loss.backward()
    assert model.projector[0].weight.grad.abs().sum() > 0


def test_lightvla_drop_training_path_shows_the_lm_the_inference_sequence():
    """train_path=drop: the training forward (no noise) gives the inference actions, and the loss
    still reaches the scores' inputs through the straight-through merge."""
    model = _model(recipe=[{"token_pruning": {"method": "lightvla", "train_path": "drop"}}])
    state = _encoded(model)
    inferred = action_hidden(model.lm(state))
    model.train()
    hidden = state.hidden.detach().requires_grad_(True)
    trained = action_hidden(model.lm(replace(state, hidden=hidden)))
    torch.testing.assert_close(trained, inferred, atol=1e-5, rtol=0)
    merge = _model(recipe=[{"token_pruning": {"method": "lightvla"}}]).train()
    merge.load_state_dict(model.state_dict())
    assert (action_hidden(merge.lm(state)) - inferred).abs().max() > 1e-3  # the seed's path differs
    trained.sum().backward()
    span = state.layout.span("visual")
    votes = model.lm.hooks[0].votes(state)
    unvoted = [j for j in range(span.stop - span.start) if j not in votes[0].tolist()]
    assert hidden.grad[0, span][unvoted].abs().sum() > 0  # only the scores can carry gradient to unvoted patches


def test_lightvla_train_path_is_checked():
    with pytest.raises(ValueError, match=r"train_path='keep'; expected one of merge, drop"):
        _model(recipe=[{"token_pruning": {"method": "lightvla", "train_path": "keep"}}])


@pytest.mark.parametrize("lm", FAMILIES)
def test_attention_probe_rows_reproduce_the_layer_attention(lm):
    """The queries and keys the attention probe hands over give probabilities whose product with V,
    through o_proj, is the layer's own SDPA attention output."""
    model = _model(lm)
    state = _encoded(model)
    attn = model.lm.decoder.layers[0].self_attn
    rotary = model.lm.decoder.rotary_emb(state.hidden, position_ids=state.position_ids)
    seen = []
    x = model.lm.decoder.layers[0].input_layernorm(state.hidden)
    ref, _ = attn(x, position_embeddings=rotary, attention_mask=state.attention_mask(),
                  attention_probe=lambda *args: seen.append(args))
    (query, key, mask, scaling), = seen
    b, s = state.hidden.shape[:2]
    probs = attention_probs(query, key, mask, scaling, slice(0, s))
    v = attn.v_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
    v = v.repeat_interleave(probs.shape[1] // v.shape[1], dim=1)
    ours = attn.o_proj((probs @ v).transpose(1, 2).reshape(b, s, -1))
    valid = state.valid
    torch.testing.assert_close(ours[valid], ref[valid], atol=1e-5, rtol=0)
    rows = state.layout.span("prompt")  # a block of rows equals those rows of the full matrix
    torch.testing.assert_close(attention_probs(query, key, mask, scaling, rows), probs[:, :, rows])


@pytest.mark.parametrize("lm", FAMILIES)
def test_the_probed_attention_is_transformers_sdpa(lm):
    """With no probe passed, the registered attention function is SDPA: the HF model's own forward
    (its masks included) gives what a copy built with attn_implementation="sdpa" gives."""
    causal_lm = _model(lm).lm.causal_lm
    assert causal_lm.config._attn_implementation == "vlaopt_sdpa"
    ref = AutoModelForCausalLM.from_config(causal_lm.config, attn_implementation="sdpa").eval()
    ref.load_state_dict(causal_lm.state_dict())
    ids = torch.tensor([[1, 5, 7, 9, 11, 13], [1, 8, 6, 4, 2, 3]])
    torch.testing.assert_close(causal_lm(ids).logits, ref(ids).logits, atol=1e-6, rtol=0)


def test_fastv_keeps_the_tokens_most_attended_in_the_layer_before():
    """FastV before layer 1 keeps the top-k visual tokens by the attention the prompt and action
    tokens paid them in layer 0 (probabilities rebuilt here from that layer's input)."""
    model = _model("qwen3", [{"token_pruning": {"method": "fastv", "layer": 1, "keep": 0.25}}])
    state = _encoded(model)
    out = _pruned(model, state)
    seen = []
    layer = model.lm.decoder.layers[0]
    layer.self_attn(layer.input_layernorm(state.hidden), attention_mask=state.attention_mask(),
                    position_embeddings=model.lm.decoder.rotary_emb(state.hidden, state.position_ids),
                    attention_probe=lambda *a: seen.append(a))
    (query, key, mask, scaling), = seen
    lay = state.layout
    probs = attention_probs(query, key, mask, scaling, slice(0, lay.length))
    rows = slice(lay.span("prompt").start, lay.span("action").stop)
    received = []
    for b in range(state.hidden.shape[0]):
        q = state.valid[b, rows].nonzero().squeeze(1) + rows.start  # valid prompt and action queries
        received.append(probs[b][:, q][..., lay.span("visual")].mean((0, 1)))
    k = round(lay.visual * 0.25)
    for b, r in enumerate(received):
        expected = sorted((r.topk(k).indices + lay.span("visual").start).tolist())
        assert out.position_ids[b, out.layout.span("visual")].tolist() == expected


def test_fastv_needs_the_attention_of_the_layer_before():
    with pytest.raises(ValueError, match=r"fastv ranks tokens by the attention of the layer before it; layer=0 must"):
        _model(recipe=[{"token_pruning": {"method": "fastv", "layer": 0}}])
    model = _model(recipe=[{"token_pruning": {"method": "fastv", "layer": 1}}])
    with pytest.raises(RuntimeError, match=r"fastv before decoder layer 1 ranks the 32 visual tokens by the attention "
                                           r"of layer 0, but found none: run it in the LM's layer loop"):
        model.lm.hooks[0](_encoded(model))


@pytest.mark.parametrize("step", [{"method": "fastv", "layer": 1, "keep": 0.5}, {"method": "lightvla"}])
def test_optimized_model_saves_with_its_recipe_and_reloads_identical(tmp_path, step):
    model = _model(recipe=[{"token_pruning": step}])
    images, instructions, proprio = observations(model.config)
    model.save_pretrained(tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert loaded.config.recipe == model.config.recipe
    assert [type(h).__name__ for h in loaded.lm.hooks] == [type(h).__name__ for h in model.lm.hooks]
    assert torch.equal(loaded.predict_action(images, instructions, proprio), model.predict_action(images, instructions, proprio))


def test_recipe_from_yaml_and_stacked_pruners(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- token_pruning: {method: pooling, keep: 0.5}\n- token_pruning: {method: fastv, layer: 1, keep: 0.5}\n")
    model = _model(recipe=load_recipe(path))
    assert model.config.recipe[1] == {"token_pruning": {"method": "fastv", "layer": 1, "keep": 0.5, "version": 1}}
    seen = []
    for hook in model.lm.hooks:
        hook.register_forward_hook(lambda mod, args, out: seen.append(out.layout.visual))
    model.lm(_encoded(model))
    assert seen == [16, 8]  # 2 cameras x (4x4 patches pooled 1x2 -> 4x2), then fastv keeps half of those


def test_recipe_errors_name_the_value():
    with pytest.raises(KeyError, match=r"unknown token pruning method 'fastvv'; expected one of divprune, fastv, lightvla"):
        _model(recipe=[{"token_pruning": {"method": "fastvv"}}])
    with pytest.raises(ValueError, match=r"layer=9 is out of range; the LM has 2 decoder layers"):
        _model(recipe=[{"token_pruning": {"method": "fastv", "layer": 9}}])
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['ratio'\]"):
        _model(recipe=[{"token_pruning": {"method": "fastv", "ratio": 0.5}}])
    with pytest.raises(ValueError, match=r"keep=1.5 must be in \(0, 1\]"):
        _model(recipe=[{"token_pruning": {"method": "random", "keep": 1.5}}])
    with pytest.raises(KeyError, match=r"unknown recipe step 'prune'"):
        _model(recipe=[{"prune": {}}])


def test_pool_kernel_factorizes_the_keep_ratio():
    assert pool_kernel(1.0) == (1, 1)
    assert pool_kernel(0.5) == (1, 2)
    assert pool_kernel(0.25) == (2, 2)
    assert pool_kernel(0.1) == (2, 5)


def test_registry_lists_all_methods():
    assert PRUNERS.names() == ["divprune", "fastv", "lightvla", "pooling", "random"]


@pytest.mark.parametrize("n,k", [(9, 4), (40, 5)])  # one N x N product; one product per pick (k <= N / 8)
def test_divprune_picks_the_greedy_max_min_set(n, k):
    """`first="mean"` (vla-opt's earlier first pick) against a plain-Python greedy farthest-point
    selection, with a padded token never picked."""
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, n, 6, generator=gen)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, 4] = False
    chosen = max_min_select(features, valid, k, first="mean")
    for b in range(2):
        x = torch.nn.functional.normalize(features[b], dim=-1)
        dist = 1 - x @ x.T
        idx = [i for i in range(n) if valid[b, i]]
        picks = [max(idx, key=lambda i: sum(dist[i, j].item() for j in idx) / len(idx))]
        while len(picks) < k:
            picks.append(max((i for i in idx if i not in picks), key=lambda i: min(dist[i, j].item() for j in picks)))
        assert sorted(picks) == chosen[b].nonzero().flatten().tolist()


class _ReferenceLightVLA:
    """A re-typed copy of the selection and training-merge rule of the authors' TokenPruner
    (LightVLA, prismatic/extern/hf/modeling_prismatic.py): RMS norms with eps 1e-6 in float32,
    SDPA of patches over the task tokens, a straight-through one-hot + softmax merge of the noisy
    scores, and each slot's position id taken from the patch it voted for."""

    @staticmethod
    def rms(x, eps=1e-6):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    @classmethod
    def score(cls, patches, task):
        p, t = cls.rms(patches), cls.rms(task)
        q = cls.rms(torch.nn.functional.scaled_dot_product_attention(p, t, t))
        return q @ p.transpose(-2, -1) / patches.shape[-1] ** 0.5

    @classmethod
    def train_forward(cls, patches, task, position_ids, noise_scale):
        score = cls.score(patches, task)
        score = score + torch.rand_like(score) * noise_scale
        hard = torch.nn.functional.one_hot(score.argmax(-1), num_classes=score.shape[-1])
        soft = torch.softmax(score, dim=-1)
        score = hard + soft - soft.detach()
        indices = score.argmax(-1)
        rows = torch.arange(patches.shape[0])[:, None].expand_as(indices)
        return score @ patches, position_ids[rows, indices]


def test_lightvla_matches_the_authors_token_pruner_on_the_same_inputs():
    """Scores, the training merge and the merged slots' position ids equal a re-typed copy of the
    reference pruner (same inputs, same noise draw); inference keeps the union of its votes."""
    model = _model(recipe=[{"token_pruning": {"method": "lightvla"}}])
    state = model.lm_input(*observations(model.config, batch=1))  # one prompt: no padding, as the reference
    span = state.layout.span("visual")
    patches, task = state.hidden[:, span], state.hidden[:, span.stop:]
    ref_score = _ReferenceLightVLA.score(patches, task)
    torch.testing.assert_close(lightvla_scores(patches, task, torch.ones(task.shape[:2], dtype=torch.bool)),
                               ref_score, atol=2e-5, rtol=1e-5)
    pruner = model.lm.hooks[0].train()
    pruner.set_noise_scale(0.7)
    torch.manual_seed(3)
    ours = pruner(state)
    torch.manual_seed(3)
    merged, positions = _ReferenceLightVLA.train_forward(patches, task, state.position_ids[:, span], 0.7)
    torch.testing.assert_close(ours.hidden[:, span], merged, atol=1e-6, rtol=0)
    assert torch.equal(ours.position_ids[:, span], positions)
    assert (positions != state.position_ids[:, span]).any()  # slots do move to their votes' positions
    kept = pruner.eval()(state)
    votes = ref_score.argmax(-1)
    assert torch.equal(kept.position_ids[0, kept.layout.span("visual")],
                       state.position_ids[0, span][torch.unique(votes[0])])


def _reference_divprune(features: torch.Tensor, k: int) -> list[int]:
    """A re-typed copy of the authors' DivPrune selection (vbdi/divprune, llava_arch.py) for one
    image: cosine distances; the first pick maximizes the second-smallest distance of its column
    (its nearest other token), each next pick the smallest distance to the picks so far."""
    x = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - x @ x.t()
    picks = torch.empty(k, dtype=torch.long)
    for i in range(k):
        rows = distance if i == 0 else torch.index_select(distance, 0, picks[:i])
        scores = torch.topk(rows, 2, dim=0, largest=False).values[1, :] if i == 0 else rows.min(dim=0).values
        picks[i] = torch.argmax(scores)
    return sorted(picks.tolist())


@pytest.mark.parametrize(("n", "k"), [(64, 6), (64, 16), (512, 51), (512, 128), (512, 256)])
def test_divprune_keeps_what_the_authors_rule_keeps(n, k):
    gen = torch.Generator().manual_seed(7)
    features = torch.randn(2, n, 32, generator=gen)
    chosen = max_min_select(features, torch.ones(2, n, dtype=torch.bool), k)
    for b in range(2):
        assert chosen[b].nonzero().flatten().tolist() == _reference_divprune(features[b], k)
    earlier = max_min_select(features, torch.ones(2, n, dtype=torch.bool), k, first="mean")
    assert (earlier != chosen).any() or k == n  # the first pick matters: the old rule keeps other tokens
