"""Weight pruning (`weight_pruning`): magnitude, wanda, sparsegpt; unstructured and N:M masks."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import observations

from vlaopt import VLA, VLAConfig, apply, load
from vlaopt.data.text import text_windows
from vlaopt.optimize.calibration import encode_observations, walk_layers
from vlaopt.optimize.weights.base import WEIGHT_PRUNERS, ColumnNorms, Hessian
from vlaopt.optimize.weights.masks import parse_pattern, zeros_per_group
from vlaopt.optimize.weights.prune import collect_stats
from vlaopt.optimize.weights.semi_structured import to_semi_structured

METHODS = ["magnitude", "wanda", "sparsegpt"]
RANDOM = {"source": "random", "samples": 4}


def _model(lm: str = "llama") -> VLA:
    return VLA(VLAConfig.tiny(lm=lm, cameras=2, proprio_dim=3)).eval()


def _step(method: str, **params) -> dict:
    if method != "magnitude":
        params["calibration"] = RANDOM
    return {"weight_pruning": {"method": method, **params}}


def _lm_linears(model: VLA) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.lm.decoder.layers.named_modules() if isinstance(m, torch.nn.Linear)}


def _layer_inputs(model: VLA, observation_batches: list, index: int):
    for i, layer, inputs in walk_layers(model.lm, encode_observations(model, observation_batches)):
        if i == index:
            return layer, inputs
    raise AssertionError(f"no layer {index}")


@pytest.mark.parametrize("sparsity", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_reconstruction_error_orders_sparsegpt_below_wanda_below_magnitude(sparsity):
    """On the VLA's own inputs to decoder layer 1 (calibration frames, then held-out frames), the
    output error sum ||(W - W') X||^2 of the layer's linears at one sparsity is ordered
    SparseGPT < Wanda < magnitude."""
    model = _model()
    cfg = model.config
    layer, calib = _layer_inputs(model, [observations(cfg, 4, seed=s) for s in range(4)], 1)
    _, held = _layer_inputs(model, [observations(cfg, 4, seed=100 + s) for s in range(2)], 1)
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    stats = {
        "wanda": collect_stats(calib, layer, linears, ColumnNorms),
        "sparsegpt": collect_stats(calib, layer, linears, Hessian),
    }
    held_h = collect_stats(held, layer, linears, Hessian)
    calib_h = stats["sparsegpt"]
    errors = {}
    for method in METHODS:
        cls = WEIGHT_PRUNERS.get(method)
        pruner = cls(cls.config_cls(**sparsity))
        err_calib = err_held = 0.0
        for name, linear in linears.items():
            w = linear.weight.detach().float()
            delta = w - pruner.prune(w, stats[method][name] if method in stats else None)
            assert (delta != 0).any()
            err_calib += torch.trace(delta @ calib_h[name].matrix() @ delta.T).item()
            err_held += torch.trace(delta @ held_h[name].matrix() @ delta.T).item()
        errors[method] = (err_calib, err_held)
    for k in range(2):
        assert errors["sparsegpt"][k] < errors["wanda"][k] < errors["magnitude"][k], errors


@pytest.mark.parametrize("method", METHODS)
def test_two_four_masks_keep_exactly_two_of_every_four(method):
    model = _model("qwen2")
    embed = model.lm.decoder.embed_tokens.weight.clone()
    apply(model, [_step(method, pattern="2:4")])
    for name, linear in _lm_linears(model).items():
        zeros = zeros_per_group(linear.weight, 4)
        assert (zeros == 2).all(), f"{name}: groups with {zeros.unique().tolist()} zeros"
    assert torch.equal(model.lm.decoder.embed_tokens.weight, embed)  # not a target
    assert torch.isfinite(model.predict_action(*observations(model.config))).all()


@pytest.mark.parametrize("method", METHODS)
def test_unstructured_sparsity_is_what_was_asked(method):
    model = _model("qwen3")
    apply(model, [_step(method, sparsity=0.6)])
    for name, linear in _lm_linears(model).items():
        w = linear.weight
        if method == "wanda":  # per output row
            assert ((w == 0).sum(1) == round(0.6 * w.shape[1])).all(), name
        else:  # magnitude over the matrix, sparsegpt over each block of columns
            assert (w == 0).float().mean().item() == pytest.approx(0.6, abs=0.01), name


def test_targets_and_ignore_choose_the_layers(tmp_path):
    model = _model("qwen2")
    before = {n: m.weight.clone() for n, m in _lm_linears(model).items()}
    apply(model, [_step("wanda", sparsity=0.5, targets=["lm.causal_lm.model.layers.1.*"], ignore=["*.mlp.*"])])
    for name, linear in _lm_linears(model).items():
        pruned = name.startswith("1.") and ".mlp." not in name
        assert ((linear.weight == 0).float().mean() == 0.5) if pruned else torch.equal(linear.weight, before[name]), (
            name
        )
    images, instructions, proprio = observations(model.config)
    model.save_pretrained(tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert torch.equal(
        loaded.predict_action(images, instructions, proprio), model.predict_action(images, instructions, proprio)
    )
    assert loaded.config.recipe == model.config.recipe


def test_sparsegpt_calibrates_on_the_observations_given_to_apply():
    given = [observations(_model().config, 4, seed=s) for s in range(2)]
    a, b = _model(), _model()
    apply(
        a,
        [{"weight_pruning": {"method": "sparsegpt", "sparsity": 0.5, "calibration": {"samples": 8}}}],
        calibration=given,
    )
    apply(b, [{"weight_pruning": {"method": "sparsegpt", "sparsity": 0.5, "calibration": RANDOM}}])
    assert a.config.recipe[0]["weight_pruning"]["calibration"]["source"] == "given"
    q = "lm.causal_lm.model.layers.0.self_attn.q_proj"
    assert not torch.equal(a.get_submodule(q).weight, b.get_submodule(q).weight)  # the data mattered


def test_weight_pruning_errors_name_the_problem():
    model = _model()
    with pytest.raises(ValueError, match=r"pattern '4:2' is not valid; expected 'N:M' with 0 < N < M"):
        apply(model, [_step("magnitude", pattern="4:2")])
    with pytest.raises(ValueError, match="give one of them"):
        apply(model, [_step("magnitude", pattern="2:4", sparsity=0.5)])
    with pytest.raises(ValueError, match=r"sparsity=1.5 must be a fraction in \(0, 1\)"):
        apply(model, [_step("wanda", sparsity=1.5)])
    with pytest.raises(ValueError, match="target 'lm.layers.*' matches no Linear module"):
        apply(model, [_step("magnitude", targets=["lm.layers.*"])])
    with pytest.raises(ValueError, match="is not inside a decoder layer"):
        apply(model, [_step("wanda", targets=["projector.*"])])
    with pytest.raises(ValueError, match=r"\(magnitude\) uses no data"):
        apply(model, [{"weight_pruning": {"method": "magnitude", "calibration": RANDOM}}])
    assert parse_pattern("2:4") == (2, 4)
    assert model.config.recipe == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured sparse kernels need CUDA")
def test_two_four_weights_run_on_sparse_kernels_on_cuda():
    linear = torch.nn.Linear(256, 128, bias=False).half().cuda()
    pruner = WEIGHT_PRUNERS.get("magnitude")(WEIGHT_PRUNERS.get("magnitude").config_cls(pattern="2:4"))
    with torch.no_grad():
        linear.weight.copy_(pruner.prune(linear.weight.float(), None).half())
    model = torch.nn.Sequential(linear)
    x = torch.randn(64, 256, dtype=torch.half, device="cuda")
    dense = model(x)
    assert to_semi_structured(model, targets=["0"]) == ["0"]
    assert type(linear.weight).__name__.startswith("SparseSemiStructuredTensor")
    torch.testing.assert_close(model(x), dense, atol=2e-2, rtol=2e-2)


def test_text_calibration_equals_the_same_token_ids_given_and_skips_the_pruners(tmp_path):
    """A `text` source cuts the file into the windows `text_windows` gives; passing those ids to apply
    prunes identically; a VLA with a token pruner calibrates on text without running it (no visual tokens)."""
    text = tmp_path / "prose.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    base = apply(_model(), [{"token_pruning": {"method": "fastv", "layer": 1, "keep": 0.5}}])
    windows = text_windows(base.tokenizer, text, count=6, length=32)
    from_file = apply(copy.deepcopy(base), [{"weight_pruning": {"method": "wanda", "calibration": {
        "source": "text", "path": str(text), "samples": 6, "length": 32, "batch_size": 4}}}])
    given = apply(copy.deepcopy(base), [{"weight_pruning": {"method": "wanda", "calibration": {"samples": 6}}}],
                  calibration=list(windows.split(4)))
    for (name, a), b in zip(_lm_linears(from_file).items(), _lm_linears(given).values(), strict=True):
        assert torch.equal(a.weight, b.weight), name
        assert (a.weight == 0).float().mean() == pytest.approx(0.5, abs=0.01)
    assert from_file.config.recipe[-1]["weight_pruning"]["calibration"]["source"] == "text"


def test_text_calibration_errors_name_the_value(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    model = _model()
    with pytest.raises(ValueError, match=r"short.txt holds 9 tokens, but 0 \+ 4 windows of 32 tokens need 128"):
        apply(model, [{"weight_pruning": {"method": "wanda", "calibration": {
            "source": "text", "path": str(short), "samples": 4, "length": 32}}}])
    with pytest.raises(ValueError, match=r"path=None with source='text': a path is needed for, and only for, "
                                         r"sources 'episodes' and 'text'"):
        apply(model, [{"weight_pruning": {"method": "wanda", "calibration": {"source": "text"}}}])
    with pytest.raises(ValueError, match=r"^token id 9999 is outside the LM's vocabulary of 515 ids"):
        apply(model, [{"weight_pruning": {"method": "wanda", "calibration": {"samples": 1}}}],
              calibration=[torch.tensor([[1, 9999]])])
    assert all((m.weight != 0).all() for m in _lm_linears(model).values())  # nothing pruned by the failures


def _sparsegpt_reference(w: torch.Tensor, x: torch.Tensor, sparsity: float, prune_n: int, prune_m: int,
                         blocksize: int, percdamp: float) -> torch.Tensor:
    """Re-typed from IST-DASLab/sparsegpt (`SparseGPT.add_batch` and `fasterprune`, no quantizer): the
    Hessian as a running mean of 2 x x^T over samples (here 100-token chunks), dead inputs, damping
    by `percdamp` of the mean diagonal, the upper Cholesky factor of H^-1, and block by block the mask
    (w^2 / d^2 at or below the block's quantile, or per group of `prune_m` the `prune_n` lowest) with
    each column's error spread over the rest of its row, then over the later blocks."""
    cols = w.shape[1]
    hessian = torch.zeros(cols, cols)
    for seen, chunk in enumerate(x.split(100)):
        hessian *= seen / (seen + 1)
        scaled = (2 / (seen + 1)) ** 0.5 * chunk.t()
        hessian += scaled @ scaled.t()
    weight = w.clone()
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    diagonal = torch.arange(cols)
    hessian[diagonal, diagonal] += percdamp * torch.mean(torch.diag(hessian))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        block, kept_block, errors = weight[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1), torch.zeros(w.shape[0], i2 - i1)
        hinv1 = hinv[i1:i2, i1:i2]
        if prune_n == 0:
            score = block**2 / torch.diag(hinv1).reshape(1, -1) ** 2
            mask = score <= torch.sort(score.flatten())[0][int(score.numel() * sparsity)]
        else:
            mask = torch.zeros_like(block, dtype=torch.bool)
        for i in range(i2 - i1):
            if prune_n != 0 and i % prune_m == 0:
                score = block[:, i : i + prune_m] ** 2 / torch.diag(hinv1)[i : i + prune_m].reshape(1, -1) ** 2
                mask.scatter_(1, i + torch.topk(score, prune_n, dim=1, largest=False)[1], True)
            column = block[:, i]
            kept = column.clone()
            kept[mask[:, i]] = 0
            kept_block[:, i] = kept
            error = (column - kept) / hinv1[i, i]
            block[:, i:] -= error[:, None] @ hinv1[i, i:][None, :]
            errors[:, i] = error
        weight[:, i1:i2] = kept_block
        weight[:, i2:] -= errors @ hinv[i1:i2, i2:]
    return weight


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_equals_a_retyped_copy_of_the_authors_fasterprune(pattern):
    """Same weights as the authors' SparseGPT on the same inputs (their Hessian's 2/n scale cancels).
    One deliberate difference: their quantile threshold (`<=` the sorted score at index
    int(numel * sparsity)) prunes one weight more than asked in every block; we prune exactly the
    asked fraction. So the unstructured case gives the reference the sparsity at which it prunes our
    count; measured at the same sparsity instead, the masks agree on 99.9% of weights here. (An input
    that is always zero gets a Hessian diagonal of 1 in both, on Hessians of different scale, theirs
    2 x tokens-per-sample times ours, which moves the mean-diagonal damping slightly; so there is
    none here.)"""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(800, 64, generator=gen) * torch.rand(64, generator=gen) * 3
    w = torch.randn(32, 64, generator=gen)
    stats = Hessian(64)
    stats.add(x)
    params = {"sparsity": 0.5} if pattern is None else {"pattern": pattern}
    ours = WEIGHT_PRUNERS.get("sparsegpt")(WEIGHT_PRUNERS.get("sparsegpt").config_cls(**params, block_size=32)).prune(w, stats)
    per_block = 32 * 32 // 2
    ref = (_sparsegpt_reference(w, x, (per_block - 1 + 0.5) / (32 * 32), 0, 0, 32, 0.01) if pattern is None
           else _sparsegpt_reference(w, x, 0.0, 2, 4, 32, 0.01))
    assert torch.equal(ours == 0, ref == 0)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()
