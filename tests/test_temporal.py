"""Sessions and temporal reuse (optimize/temporal/): VLA-Cache's selection rules against a re-typed
copy of the authors' functions, exactness where reuse is exact, batch = single, no leakage across
`reset`, token pruning and the expert head, and the refusals."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from conftest import observations
from transformers.models.llama.modeling_llama import eager_attention_forward

from vlaopt import VLA, VLAConfig
from vlaopt.optimize import apply, load
from vlaopt.optimize.temporal.reuse import ReuseSession
from vlaopt.optimize.temporal.static import patch_similarity, prompt_attention, static_patches, top_k_stable

ALL = {"relevant": 0.0, "max_static": 1.0}  # every unchanged patch is reused


def _model(head: str = "l1", **kw) -> VLA:
    cfg = VLAConfig.tiny(cameras=2, proprio_dim=4, head=head, **kw)
    cfg.lm.hf_config["num_hidden_layers"] = 3
    return VLA(cfg).eval()


def _reuse(model: VLA, **params) -> VLA:
    return apply(copy.deepcopy(model), [{"temporal_reuse": params}])


def _changed(images: np.ndarray, camera: int, patch: int, size: int, seed: int = 1) -> np.ndarray:
    """`images` with one patch (row-major index) of one camera replaced by noise, in every sample."""
    out = images.copy()
    grid = out.shape[2] // size
    r, c = divmod(patch, grid)
    noise = np.random.default_rng(seed).integers(0, 256, (out.shape[0], size, size, 3), dtype=np.uint8)
    out[:, camera, r * size:(r + 1) * size, c * size:(c + 1) * size] = noise
    return out


def _episode(session, frames, instructions, proprio):
    session.reset()
    return [session.step(f, instructions, proprio) for f in frames]


def _frames(model: VLA, batch: int, seed: int = 0):
    """Three frames: a random one, then one patch changed in camera 1, then one in camera 0."""
    images, instructions, proprio = observations(model.config, batch=batch, seed=seed)
    size = model.config.vision.patch_size
    second = _changed(images, 1, 3, size, seed + 1)
    return [images, second, _changed(second, 0, 6, size, seed + 2)], instructions, proprio


# ---- VLA-Cache's selection, re-typed from the authors' vla_cache_utils.py ------------------------------

def _authors_static(img_0, img_1, patch, top_k, sim_threshold):
    """find_static_patches: per-patch cosine similarity of float32 pixels, at or above the threshold,
    sorted by similarity (Python's stable sort), the first top_k."""
    def patchify(image):
        g = image.shape[0] // patch
        return image.reshape(g, patch, g, patch, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, -1).astype(np.float32)

    a, b = patchify(img_0), patchify(img_1)
    sim = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-8)
    scored = [(i, sim[i]) for i in range(len(sim)) if sim[i] >= sim_threshold]
    scored.sort(key=lambda x: x[1], reverse=True)
    return sorted(i for i, _ in scored[:top_k])


def _authors_top_attention(scores, top_k):
    """get_top_attention_patches: patches sorted by attention (stable), the first top_k."""
    flat = sorted(enumerate(scores.tolist()), key=lambda x: x[1], reverse=True)
    return sorted(i for i, _ in flat[:top_k])


def test_static_patches_match_the_authors_selection_with_ties():
    """Patches of a few kinds (unchanged, slightly and strongly changed, black), repeated so that
    similarities tie: the same patches as the authors' function, for several thresholds and k."""
    rng = np.random.default_rng(0)
    patch, grid = 8, 4
    kinds = []
    for noise in (0, 0, 3, 12, 60):
        before = rng.integers(40, 200, (patch, patch, 3))
        kinds.append((before, np.clip(before + rng.integers(-noise, noise + 1, before.shape), 0, 255)))
    kinds.append((np.zeros((patch, patch, 3)), np.zeros((patch, patch, 3))))  # black: similarity 0
    choice = rng.integers(0, len(kinds), (2, grid * grid))
    frames = np.zeros((2, 2, grid * patch, grid * patch, 3), dtype=np.uint8)
    for t in range(2):
        for cam in range(2):
            for i, kind in enumerate(choice[cam]):
                r, c = divmod(i, grid)
                frames[t, cam, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = kinds[kind][t]
    similarity = patch_similarity(torch.from_numpy(frames[:1]), torch.from_numpy(frames[1:]), patch)[0]
    for threshold in (0.9, 0.99, 0.996):
        for k in (3, 7, 16):
            ours = static_patches(similarity, threshold, k)
            for cam in range(2):
                want = _authors_static(frames[1, cam], frames[0, cam], patch, k, threshold)
                assert ours[cam].nonzero().flatten().tolist() == want, (threshold, k, cam)


def test_relevant_patches_match_the_authors_top_attention_with_ties():
    scores = torch.tensor([0.2, 0.5, 0.5, 0.1, 0.5, 0.3, 0.2, 0.0])
    for k in range(1, 9):
        assert top_k_stable(scores, k).nonzero().flatten().tolist() == _authors_top_attention(scores, k)


def test_prompt_attention_is_the_mean_of_transformers_eager_attention_weights():
    """Heads in GQA groups, a padded prompt row and masked keys: the mean over heads and valid rows of
    the attention weights transformers' eager attention computes."""
    torch.manual_seed(0)
    b, heads, kv_heads, t, s, hd = 2, 4, 2, 5, 9, 8
    query, key = torch.randn(b, heads, t, hd), torch.randn(b, kv_heads, s, hd)
    mask = torch.rand(b, 1, t, s) > 0.3
    mask[..., 0] = True
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = heads // kv_heads, False
    additive = torch.zeros(b, 1, t, s).masked_fill(~mask, torch.finfo(torch.float32).min)
    _, weights = eager_attention_forward(module, query, key, key, additive, scaling=hd ** -0.5)
    want = torch.stack([weights[i].mean(0)[valid[i]].mean(0) for i in range(b)])
    torch.testing.assert_close(prompt_attention(query, key, mask, hd ** -0.5, valid), want)


# ---- the session ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["l1", "expert"])
def test_a_session_that_reuses_nothing_gives_exactly_the_stateless_actions(head):
    model = _model(head)
    frames, instructions, proprio = _frames(model, batch=2)
    session = _reuse(model, max_static=0.0).session()  # no patch is ever static
    got = _episode(session, frames + frames, instructions, proprio)
    assert [s["reused"] for s in session.history] == [0] * 6 and not any(s["static"] for s in session.history)
    for images, actions in zip(frames + frames, got, strict=True):
        assert torch.equal(actions, model.predict_action(images, instructions, proprio))
    plain = _episode(model.session(), frames, instructions, proprio)  # the plain session keeps nothing
    assert all(torch.equal(a, model.predict_action(f, instructions, proprio)) for a, f in zip(plain, frames, strict=True))


@pytest.mark.parametrize("head", ["l1", "expert"])
def test_a_repeated_observation_in_exact_mode_gives_the_recomputed_actions(head):
    model = _model(head)
    images, instructions, proprio = observations(model.config, batch=2)
    session = _reuse(model, mode="exact", **ALL).session()
    session.reset()
    session.step(images, instructions, proprio)
    again = session.step(images, instructions, proprio)
    assert session.stats["reused"] == session.stats["visual"] and session.stats["encoded_cameras"] == 0
    torch.testing.assert_close(again, model.predict_action(images, instructions, proprio), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", ["l1", "expert"])
def test_exact_reuse_equals_recomputing_the_same_inputs(head):
    """A patch changed in the second camera: exact mode reuses the first camera and the patches before
    the change at every layer, and its actions are those of a full pass over the same LM inputs."""
    model = _model(head)
    frames, instructions, proprio = _frames(model, batch=2)
    session = _reuse(model, mode="exact", **ALL).session()
    session.reset()
    session.step(frames[0], instructions, proprio)
    actions = session.step(frames[1], instructions, proprio)
    patches = session.patches
    assert session.stats["reused"] == patches + 3 and session.stats["layers"] == 3
    with torch.inference_mode():
        inputs = model.preprocess(frames[1], instructions, proprio)
        state = model.encode(inputs, visual=session.memory.visual)
        want = model.action_norm.unnormalize(model.policy.act(model, state, None, 0).float())
    torch.testing.assert_close(actions, want, atol=1e-5, rtol=1e-5)


def test_reuse_statistics_on_constructed_frames():
    """One patch changed in camera 0 at index 6: every other patch is static, one camera is encoded;
    approximate mode reuses all static patches from start_layer on, exact mode the six before it."""
    model = _model()
    images, instructions, proprio = observations(model.config, batch=1)
    changed = _changed(images, 0, 6, model.config.vision.patch_size)
    for mode, reused, layers in (("approximate", None, 2), ("exact", 6, 3)):
        session = _reuse(model, mode=mode, **ALL).session()
        session.reset()
        session.step(images, instructions, proprio)
        session.step(changed, instructions, proprio)
        nv = session.stats["visual"]
        assert session.stats == {"full": False, "visual": nv, "static": nv - 1, "encoded_cameras": 1,
                                 "reused": nv - 1 if reused is None else reused, "layers": layers}
        session.step(changed, instructions, proprio)  # nothing changed now: no camera encoded
        assert session.stats["encoded_cameras"] == 0 and session.stats["static"] == nv
    vla_cache = _reuse(model).session()  # the authors' defaults: at most 150/256 static, 120/256 relevant excluded
    vla_cache.reset()
    vla_cache.step(images, instructions, proprio)
    vla_cache.step(images, instructions, proprio)
    per_camera = session.patches
    assert vla_cache.stats["static"] == 2 * round(150 / 256 * per_camera)
    assert 0 < vla_cache.stats["reused"] <= vla_cache.stats["static"]


def test_refresh_recomputes_everything_every_n_steps():
    model = _model()
    images, instructions, proprio = observations(model.config, batch=2)
    session = _reuse(model, refresh=3, **ALL).session()
    got = _episode(session, [images] * 7, instructions, proprio)
    assert [s["full"] for s in session.history] == [True, False, False, True, False, False, True]
    want = model.predict_action(images, instructions, proprio)
    assert all(torch.equal(got[i], want) for i in (0, 3, 6))


@pytest.mark.parametrize("mode", ["approximate", "exact"])
def test_a_batch_of_sessions_equals_each_sample_alone(mode):
    model = _model()
    frames, instructions, proprio = _frames(model, batch=2)
    reusing = _reuse(model, mode=mode, relevant=0.25, max_static=1.0)
    batched = _episode(reusing.session(), frames, instructions, proprio)
    for i in range(2):
        alone = _episode(reusing.session(), [f[i:i + 1] for f in frames], instructions[i:i + 1], proprio[i:i + 1])
        for a, b in zip(batched, alone, strict=True):
            torch.testing.assert_close(a[i:i + 1], b, atol=1e-5, rtol=1e-5)


def test_reset_leaves_nothing_behind_in_either_order():
    model = _reuse(_model(), relevant=0.25, max_static=1.0)
    a = _frames(model, batch=1, seed=0)
    b = _frames(model, batch=1, seed=5)
    session = model.session()
    first = [_episode(session, *a), _episode(session, *b)]
    session = model.session()
    second = [_episode(session, *b), _episode(session, *a)]
    assert session.history and session.history[1]["reused"] > 0  # the episodes do reuse
    for x, y in zip(first, reversed(second), strict=True):
        assert all(torch.equal(p, q) for p, q in zip(x, y, strict=True))


@pytest.mark.parametrize("method", ["lightvla", "random"])
def test_reuse_runs_with_token_pruning_on_the_lm_input(method):
    model = apply(_model(), [{"token_pruning": {"method": method, "keep": 0.5}}])
    images, instructions, proprio = observations(model.config, batch=2)
    exact = _reuse(model, mode="exact", **ALL).session()
    exact.reset()
    exact.step(images, instructions, proprio)
    again = exact.step(images, instructions, proprio)
    with torch.inference_mode():
        kept = model.lm(model.lm_input(images, instructions, proprio)).layout.visual
    assert 0 < exact.stats["reused"] <= kept < exact.stats["visual"]
    torch.testing.assert_close(again, model.predict_action(images, instructions, proprio), atol=1e-5, rtol=1e-5)
    frames, instructions, proprio = _frames(model, batch=2)
    nothing = _episode(_reuse(model, max_static=0.0).session(), frames, instructions, proprio)
    assert all(torch.equal(a, model.predict_action(f, instructions, proprio)) for a, f in zip(nothing, frames, strict=True))


def test_a_saved_model_reloads_with_its_sessions(tmp_path):
    model = _reuse(_model(), relevant=0.25, max_static=1.0)
    model.set_stats({"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7}, "proprio": {"q01": [-1.0] * 4, "q99": [1.0] * 4}})
    model.save_pretrained(tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert isinstance(loaded.session(), ReuseSession)
    frames, instructions, proprio = _frames(model, batch=2)
    for x, y in zip(_episode(model.session(), frames, instructions, proprio),
                    _episode(loaded.session(), frames, instructions, proprio), strict=True):
        assert torch.equal(x, y)


def test_what_temporal_reuse_refuses_names_the_reason():
    model = _model()
    with pytest.raises(ValueError, match="pooling merges visual tokens"):
        apply(copy.deepcopy(model), [{"token_pruning": {"method": "pooling", "keep": 0.25}}, {"temporal_reuse": {}}])
    with pytest.raises(ValueError, match="fastv acts at decoder layer 2, after layer 1"):
        apply(copy.deepcopy(model), [{"token_pruning": {"method": "fastv", "layer": 2}}, {"temporal_reuse": {}}])
    with pytest.raises(ValueError, match=r"fastv acts at decoder layer 1, after layer 0, where temporal_reuse \(mode exact\)"):
        apply(copy.deepcopy(model), [{"token_pruning": {"method": "fastv", "layer": 1}},
                                     {"temporal_reuse": {"mode": "exact"}}])
    with pytest.raises(ValueError, match="already has a temporal_reuse step"):
        apply(copy.deepcopy(model), [{"temporal_reuse": {}}, {"temporal_reuse": {}}])
    compiled = apply(copy.deepcopy(model), [{"temporal_reuse": {}}, {"compile": {"backend": "eager"}}])
    with pytest.raises(ValueError, match="this model is compiled"):
        compiled.session()
    for params, message in (({"mode": "fast"}, "mode='fast' is not supported; expected one of exact, approximate"),
                            ({"max_static": 1.5}, "max_static=1.5 must be a fraction in"),
                            ({"start_layer": 3}, "start_layer=3 is past the LM's 3 decoder layers"),
                            ({"relevance_layer": 7}, "relevance_layer=7 names no decoder layer"),
                            ({"refresh": -1}, "refresh=-1 must be a non-negative integer"),
                            ({"stride": 2}, r"unknown parameter\(s\) \['stride'\]")):
        with pytest.raises(ValueError, match=message):
            _reuse(model, **params)
    images, instructions, proprio = observations(model.config, batch=2)
    session = _reuse(model).session()
    session.reset()
    session.step(images, instructions, proprio)
    with pytest.raises(ValueError, match=r"last step had images of shape \(2, 2, 32, 32, 3\), this one "
                                         r"\(1, 2, 32, 32, 3\); call reset\(\)"):
        session.step(images[:1], instructions[:1], proprio[:1])


def test_a_slowly_drifting_patch_is_compared_with_the_pixels_its_keys_came_from():
    """A patch brightening a little each step stays within the threshold of the previous frame, but
    not of the frame its keys/values were computed from: it is reused until the drift exceeds the
    threshold, then recomputed (VLA-Cache compares with the previous frame only)."""
    model = _model()
    rng = np.random.default_rng(0)
    size = model.config.vision.patch_size
    base = rng.integers(60, 200, (1, model.config.cameras, 32, 32, 3)).astype(np.float64)
    instructions, proprio = ["open the drawer"], torch.zeros(1, 4)
    ramp = np.zeros_like(base)
    ramp[:, 0, :size, :size] = np.linspace(0, 60, size * size * 3).reshape(size, size, 3)  # patch 0 of camera 0
    frames = [np.clip(base + ramp * k, 0, 255).astype(np.uint8) for k in (0.0, 0.25, 0.5, 0.75, 1.0)]
    def similarity(a, b):  # of the drifting patch
        return patch_similarity(torch.from_numpy(a), torch.from_numpy(b), size)[0, 0, 0].item()

    previous = [similarity(a, b) for a, b in itertools.pairwise(frames)]
    first = [similarity(frames[0], f) for f in frames[1:]]
    threshold = (min(previous) + min(first)) / 2
    assert min(previous) > threshold > min(first)  # each step is small, the whole drift is not
    session = _reuse(model, relevant=0.0, max_static=1.0, threshold=threshold).session()
    _episode(session, frames, instructions, proprio)
    nv, reference, want = session.stats["visual"], 0, []
    for k in range(1, len(frames)):  # the reference moves to the frame the patch was last recomputed on
        if similarity(frames[reference], frames[k]) >= threshold:
            want.append(nv)
        else:
            want.append(nv - 1)
            reference = k
    assert [s["static"] for s in session.history[1:]] == want and nv - 1 in want
