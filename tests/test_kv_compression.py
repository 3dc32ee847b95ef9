"""KV-cache compression of the expert head (optimize/kv/): StreamingLLM, H2O and KIVI.

Each method is checked against its authors' rule re-typed below as a small reference (from
mit-han-lab/streaming-llm streaming_llm/kv_cache.py, FMInference/H2O h2o_hf/utils_real_drop/
modify_llama.py, jy-yuan/KIVI quant/new_pack.py and models/llama_kivi.py); H2O's scores against
transformers' eager attention weights; and on a tiny reasoning expert: budgets covering the cache
change nothing, eviction keeps exactly the expected tokens and decoding continues over them, KIVI's
memory is really saved, speculative decoding still works, the steps refuse what they cannot do and
reload from a saved model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import reasoner, reasoner_obs

import vlaopt
from vlaopt.config import VLAConfig
from vlaopt.model import expert_policy
from vlaopt.model.decode import decode_step
from vlaopt.model.kv_cache import KVCache
from vlaopt.model.language import LayerLoop
from vlaopt.model.vla import VLA
from vlaopt.optimize import load
from vlaopt.optimize.kv.base import evict
from vlaopt.optimize.kv.h2o import H2OCompressor, H2OScores, accumulate, attention_probs
from vlaopt.optimize.kv.kivi import (
    KiviCompressor,
    KiviKeys,
    KiviSpec,
    KiviValues,
    dequantize_keys,
    dequantize_values,
    quantize_keys,
    quantize_values,
)
from vlaopt.optimize.kv.streaming import StreamingCompressor, streaming_keep

# ---- the authors' rules, re-typed ----------------------------------------------------------------------------

def ref_start_recent(seq_len: int, start: int, recent: int) -> list[int]:
    """StartRecentKVCache.__call__: indices kept of a cache of seq_len slots."""
    if seq_len <= start + recent:
        return list(range(seq_len))
    return list(range(start)) + list(range(seq_len - recent, seq_len))


class RefH2O:
    """H2OKVCache_LayerWise for batch 1: `hh` (heads, S) accumulated scores; evict after every call."""

    def __init__(self, heavy: int, recent: int) -> None:
        self.heavy, self.recent, self.hh = heavy, recent, None

    def __call__(self, kept: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """`kept` (heads, S) slot ids held, `attn` (1, heads, q, S): the ids held afterwards."""
        summed = attn.sum(0).sum(1)  # (heads, S)
        if self.hh is not None:
            summed[:, : -attn.shape[2]] += self.hh
        self.hh = summed
        seq = kept.shape[1]
        if seq <= self.heavy + self.recent:
            return kept
        top = self.hh[:, : seq - self.recent].topk(self.heavy, dim=-1).indices.sort().values
        recent = torch.arange(seq - self.recent, seq).repeat(top.shape[0], 1)
        mask = torch.zeros_like(self.hh, dtype=torch.bool).scatter(-1, torch.cat([top, recent], -1), True)
        self.hh = self.hh[mask].view(kept.shape[0], -1)
        return kept[mask].view(kept.shape[0], -1)


def ref_quant_keys(k: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    """quant_and_pack_kcache then unpack_and_dequant_kcache (without the packing): dequantized keys."""
    b, h, t, d = k.shape
    data = k.reshape(b, h, t // group, group, d)
    mn, mx = data.min(dim=-2, keepdim=True)[0], data.max(dim=-2, keepdim=True)[0]
    scale = (mx - mn) / (2 ** bits - 1)
    code = ((data - mn) / scale).clamp(0, 2 ** bits - 1).round()
    return (code * scale + mn).view(b, h, t, d)


def ref_quant_values(v: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    """quant_and_pack_vcache then unpack_and_dequant_vcache (without the packing)."""
    b, h, t, d = v.shape
    data = v.reshape(b, h, t, d // group, group)
    mn, mx = data.min(dim=-1, keepdim=True)[0], data.max(dim=-1, keepdim=True)[0]
    scale = (mx - mn) / (2 ** bits - 1)
    code = ((data - mn) / scale).clamp(0, 2 ** bits - 1).round()
    return (code * scale + mn).view(b, h, t, d)


class RefKivi:
    """LlamaAttention_KIVI's cache state: the prefill split, then one decoded token at a time."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, group: int, bits: int, residual: int) -> None:
        self.g, self.bits, self.r = group, bits, residual
        t = k.shape[2]
        nq = 0 if t < residual else t - t % residual  # keys: a multiple of residual quantized
        self.kq = ref_quant_keys(k[:, :, :nq], group, bits) if nq else None
        self.kf = k[:, :, nq:] if nq < t else None
        self.vq = ref_quant_values(v[:, :, :-residual], group, bits) if t > residual else None
        self.vf = v[:, :, -residual:] if t > residual else v

    def step(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.kf = k if self.kf is None else torch.cat([self.kf, k], 2)
        if self.kf.shape[2] == self.r:
            new = ref_quant_keys(self.kf, self.g, self.bits)
            self.kq = new if self.kq is None else torch.cat([self.kq, new], 2)
            self.kf = None
        self.vf = torch.cat([self.vf, v], 2)
        if self.vf.shape[2] > self.r:
            new = ref_quant_values(self.vf[:, :, :1], self.g, self.bits)
            self.vq = new if self.vq is None else torch.cat([self.vq, new], 2)
            self.vf = self.vf[:, :, 1:]

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys = [t for t in (self.kq, self.kf) if t is not None]
        values = [t for t in (self.vq, self.vf) if t is not None]
        return torch.cat(keys, 2), torch.cat(values, 2)


# ---- helpers ---------------------------------------------------------------------------------------------------





def _cache(valid: torch.Tensor, kv_heads: int = 2, dim: int = 4, seed: int = 0) -> KVCache:
    """A one-layer cache whose keys/values encode each slot's position (value = position in channel 0)."""
    g = torch.Generator().manual_seed(seed)
    cache = KVCache()
    b, s = valid.shape
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    keys = torch.randn(b, kv_heads, s, dim, generator=g)
    values = keys.clone()
    values[..., 0] = positions[:, None].float()
    cache.put(0, keys, values, valid, positions)
    cache.next_position = positions.max(1).values + 1
    return cache


def _rollouts(step: dict | None, obs, noise, **kw):
    model = reasoner(**kw)
    if step is not None:
        vlaopt.apply(model, [step])
    return model, expert_policy.rollout(model, *obs, noise=noise)


def _noise(cfg: VLAConfig) -> torch.Tensor:
    return torch.randn(3, cfg.chunk, cfg.action_dim, generator=torch.Generator().manual_seed(0))


def _valid_positions(cache: KVCache, layer: int, b: int) -> list[int]:
    return cache.positions[layer][b][cache.valid[layer][b]].tolist()


# ---- StreamingLLM ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [3, 8, 9, 30])
def test_streaming_keeps_the_authors_slots(length):
    cache = _cache(torch.ones(1, length, dtype=torch.bool))
    evict(cache, 0, streaming_keep(cache.valid[0], 2, 6), 8)
    assert _valid_positions(cache, 0, 0) == ref_start_recent(length, 2, 6)


def test_streaming_keeps_each_samples_valid_tokens_and_never_padding():
    g = torch.Generator().manual_seed(1)
    valid = torch.rand(4, 40, generator=g) < 0.6
    valid[3, 5:] = False  # 5 valid slots: fewer than the budget
    cache = _cache(valid)
    ids = torch.arange(40).expand(4, -1)
    evict(cache, 0, streaming_keep(valid, 3, 9), 12)
    assert cache.length(0) == 12 and cache.keys[0].shape[2] == 12  # gathered: the slots are gone
    for b in range(4):
        slots = ids[b][valid[b]].tolist()  # the sample's valid slots, in order
        expected = [slots[i] for i in ref_start_recent(len(slots), 3, 9)]
        assert cache.values[0][b, 0, cache.valid[0][b], 0].long().tolist() == _positions_of(valid[b], expected)
        assert int(cache.valid[0][b].sum()) == min(len(slots), 12)  # padding only where no valid token is left
    assert not cache.valid[0][3, 5:].any()


def _positions_of(valid: torch.Tensor, slots: list[int]) -> list[int]:
    positions = (valid.long().cumsum(0) - 1).clamp(min=0)
    return positions[slots].tolist()


# ---- H2O -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads", [1, 3])
def test_h2o_keeps_the_authors_heavy_hitters_step_by_step(heads):
    """Evicting after every attention call, as the authors do, our per-layer rule keeps their slots:
    exactly for one head, and for several heads their rule on the head-summed scores."""
    g = torch.Generator().manual_seed(0)
    heavy, recent, prompt, dim = 4, 3, 12, 8
    keys = torch.randn(1, 1, prompt + 6, dim, generator=g)
    queries = torch.randn(1, heads, prompt + 6, dim, generator=g)
    ours = KVCache()
    compressor = H2OCompressor(heavy, recent)
    compressor.prepare(ours)
    ref = RefH2O(heavy, recent)
    ref_kept = torch.arange(prompt)[None]  # (1 "head", S): the per-layer rule has one set
    for step in range(7):
        new = slice(0, prompt) if step == 0 else slice(prompt + step - 1, prompt + step)
        n = new.stop - new.start
        at = torch.arange(new.start, new.stop)[None]
        causal = ours.with_past(0, torch.ones(1, 1, n, n, dtype=torch.bool).tril(), at)  # as the layer loop does
        ours.expect(torch.ones(1, n, dtype=torch.bool), at)
        k, _ = ours.update(keys[:, :, new], keys[:, :, new], 0)
        ours.observer(0, queries[:, :, new], k, causal, None, torch.ones(1, n, dtype=torch.bool))
        compressor(ours, last=False)
        # the reference: its own attention over the keys it holds, summed over heads (per-layer scores)
        held = torch.cat([ref_kept, torch.arange(new.start, new.stop)[None]], 1) if step else ref_kept
        logits = queries[:, :, new] @ keys[0, 0, held[0]].T / math.sqrt(dim)
        allowed = held[0][None] <= torch.arange(new.start, new.stop)[:, None]
        attn = logits.masked_fill(~allowed, float("-inf")).softmax(-1).sum(1, keepdim=True)
        ref_kept = ref(held, attn)
        assert _valid_positions(ours, 0, 0) == ref_kept[0].tolist()
        torch.testing.assert_close(ours.observer.scores[0][ours.valid[0]], ref.hh[0])
    assert ours.length(0) == heavy + recent


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_h2o_scores_are_transformers_eager_attention_weights(family):
    model = reasoner(lm=family)
    lm = model.lm
    for layer in lm.decoder.layers:  # a scaling of its own (Gemma 2's query_pre_attn_scalar): the one passed is used
        layer.self_attn.scaling = 0.4
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    eager = copy.deepcopy(lm.causal_lm)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        weights = eager(input_ids=ids, output_attentions=True).attentions  # per layer (B, heads, T, T)
    seen: dict[int, torch.Tensor] = {}
    scores = H2OScores()

    def observe(layer, query, key, mask, scaling, query_valid):
        seen[layer] = attention_probs(query, key, mask, scaling)
        scores(layer, query, key, mask, scaling, query_valid)

    cache = KVCache()
    cache.observer = observe
    with torch.no_grad():
        LayerLoop(lm, lm.text_state(ids), cache, hooks=[]).run()
    assert sorted(seen) == list(range(len(weights))) and weights[0].shape[1] == 4  # 4 query heads over 2 KV heads
    for i, w in enumerate(weights):
        torch.testing.assert_close(seen[i], w, atol=1e-5, rtol=1e-4)  # float32 rounding of sharp rows
        torch.testing.assert_close(scores.scores[i], w.sum((1, 2)), atol=1e-5, rtol=1e-5)
    assert weights[0].std() > 0.05  # attention far from uniform: a real comparison


def test_h2o_counts_only_valid_queries():
    probs = torch.rand(2, 3, 4, 6)
    query_valid = torch.tensor([[True, True, False, True], [False, True, True, True]])
    old = torch.rand(2, 5)
    new = accumulate(old, probs, query_valid)
    expected = (probs * query_valid[:, None, :, None]).sum((1, 2))
    expected[:, :5] += old  # the keys it had keep their scores; the new one starts from its queries
    torch.testing.assert_close(new, expected)
    assert not torch.allclose(new, accumulate(old, probs, torch.ones_like(query_valid)))


# ---- KIVI ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4, 2])
def test_kivi_quantizer_is_the_authors(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 3, 16, 8, generator=g) * torch.linspace(0.1, 4, 8)  # channels of different range
    spec = KiviSpec(bits, 4, 8)
    codes, scale, zero = quantize_keys(x, spec)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 3, 16, 8 * bits // 8)  # packed below 8 bits
    assert scale.shape == (2, 3, 4, 8)  # per channel, per group of 4 tokens
    assert torch.equal(dequantize_keys(codes, scale, zero, spec), ref_quant_keys(x, 4, bits))
    codes, scale, zero = quantize_values(x, spec)
    assert scale.shape == (2, 3, 16, 2)  # per token, per group of 4 channels
    assert torch.equal(dequantize_values(codes, scale, zero, spec), ref_quant_values(x, 4, bits))


@pytest.mark.parametrize("prompt", [13, 16, 5])
def test_kivi_cache_follows_the_authors_prefill_and_decoding(prompt):
    g = torch.Generator().manual_seed(prompt)
    spec = KiviSpec(8, 4, 8)
    k, v = torch.randn(1, 2, prompt + 11, 8, generator=g), torch.randn(1, 2, prompt + 11, 8, generator=g)
    valid = torch.ones(1, prompt + 11, dtype=torch.bool)
    keys = KiviKeys.of(spec, k[:, :, :prompt], valid[:, :prompt])
    values = KiviValues.of(spec, v[:, :, :prompt], valid[:, :prompt])
    ref = RefKivi(k[:, :, :prompt], v[:, :, :prompt], 4, 8, 8)
    for t in range(prompt, prompt + 11):
        rk, rv = ref.dense()
        assert torch.equal(keys.dense(), rk) and torch.equal(values.dense(), rv)
        old = keys
        keys, values = keys.append(k[:, :, t:t + 1], valid[:, :t + 1]), values.append(v[:, :, t:t + 1], valid[:, :t + 1])
        ref.step(k[:, :, t:t + 1], v[:, :, t:t + 1])
        assert old.shape[2] == t  # appending left the old entry as it was (a fork may share it)
    assert keys.codes.shape[2] > 0 and values.codes.shape[2] > 0


def test_kivi_key_scales_ignore_invalid_slots():
    x = torch.randn(1, 1, 4, 2)
    valid = torch.tensor([[True, True, False, True]])
    x[0, 0, 2] = 100.0  # an outlier in a padding slot
    _, scale, zero = quantize_keys(x, KiviSpec(8, 4, 4), valid)
    kept = x[0, 0, [0, 1, 3]]
    torch.testing.assert_close(zero[0, 0, 0], kept.min(0).values)
    torch.testing.assert_close(scale[0, 0, 0], (kept.max(0).values - kept.min(0).values) / 255)


def test_attention_reads_new_tokens_in_full_precision_then_the_cache_quantizes_them():
    """As KIVI's decoding: the new token's own attention reads it (and the residual) unquantized; the
    cache then holds it quantized once the residual is full."""
    spec = KiviSpec(8, 4, 4)
    g = torch.Generator().manual_seed(0)
    cache = KVCache()
    k, v = torch.randn(1, 2, 7, 8, generator=g), torch.randn(1, 2, 7, 8, generator=g)
    on = torch.ones(1, 7, dtype=torch.bool)
    cache.put(0, k, v, on, torch.arange(7)[None])
    KiviCompressor(spec)(cache, last=True)
    assert dict.__getitem__(cache.keys, 0).full.shape[2] == 3  # 4 keys quantized, 3 full
    before = cache.keys[0]
    new = torch.randn(1, 2, 1, 8, generator=g)
    cache.expect(on[:, :1], torch.tensor([[7]]))
    seen, _ = cache.update(new, new, 0)
    assert torch.equal(seen, torch.cat([before, new], 2))  # read as it came
    held = dict.__getitem__(cache.keys, 0)
    assert held.full.shape[2] == 0 and held.codes.shape[2] == 8  # the full residual was quantized after
    assert not torch.equal(cache.keys[0][:, :, 7:], new)


# ---- on the expert policy ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("step", [{"kv_streaming": {"sinks": 4, "window": 200}}, {"kv_h2o": {"heavy": 60, "recent": 60}},
                                  {"kv_streaming": {"sinks": 0, "window": 113}}])
def test_a_budget_covering_the_cache_changes_nothing(step):
    obs = reasoner_obs(reasoner().config)
    noise = _noise(reasoner().config)
    _, a = _rollouts(None, obs, noise)
    _, b = _rollouts(step, obs, noise)
    assert a.cache.length(0) == 113
    assert torch.equal(a.reasoning, b.reasoning)
    torch.testing.assert_close(b.actions, a.actions, atol=1e-6, rtol=0)


@pytest.mark.parametrize("step,budget", [({"kv_streaming": {"sinks": 4, "window": 20}}, 24),
                                         ({"kv_streaming": {"sinks": 4, "window": 100}}, 104),
                                         ({"kv_h2o": {"heavy": 10, "recent": 14}}, 24),
                                         ({"kv_h2o": {"heavy": 50, "recent": 54}}, 104)])
def test_eviction_keeps_the_expected_tokens_and_decoding_continues_over_them(step, budget):
    obs = reasoner_obs(reasoner().config)
    noise = _noise(reasoner().config)
    _, a = _rollouts(None, obs, noise)
    _, b = _rollouts(step, obs, noise)
    cache = b.cache
    assert torch.equal(cache.next_position, a.cache.next_position)  # decoding went on at the same positions
    for i in cache.layers:
        assert cache.length(i) == budget and cache.keys[i].shape[2] == budget
        for s in range(3):
            full = _valid_positions(a.cache, i, s)  # the same positions (ids may differ after eviction)
            kept = _valid_positions(cache, i, s)
            assert len(kept) == min(len(full), budget)  # padding only where no valid token was left
            assert kept == sorted(kept) and set(kept) <= set(full)
            if "kv_streaming" in step:
                sinks = step["kv_streaming"]["sinks"]
                assert kept == [full[j] for j in ref_start_recent(len(full), sinks, budget - sinks)]
            else:
                assert kept[-step["kv_h2o"]["recent"]:] == full[-step["kv_h2o"]["recent"]:]
    assert budget < 104 or int(cache.valid[0][2].sum()) == 100  # sample 2 (100 tokens) kept all and 4 pads


@pytest.mark.parametrize("compressor", [StreamingCompressor(4, 28), H2OCompressor(12, 20)])
def test_decoding_over_an_evicted_cache_is_decoding_with_those_tokens_masked(compressor):
    """The next tokens over the compressed cache = over the full cache with the evicted tokens masked
    out: keys, values, positions and validity were gathered consistently."""
    obs = reasoner_obs(reasoner().config)
    model, a = _rollouts(None, obs, _noise(reasoner().config))
    full = a.cache
    cache = copy.deepcopy(full)
    if isinstance(compressor, H2OCompressor):
        cache.observer = H2OScores()
        cache.observer.scores = {i: torch.rand(full.valid[i].shape, generator=torch.Generator().manual_seed(i))
                                 for i in full.layers}
    compressor(cache, last=True)
    for i in full.layers:
        assert cache.length(i) == 32 < full.length(i)
        kept = torch.stack([torch.isin(full.positions[i][s], cache.positions[i][s][cache.valid[i][s]]) for s in range(3)])
        full.valid[i] = full.valid[i] & kept
        assert torch.equal(full.valid[i].sum(1), cache.valid[i].sum(1))
    start = cache.next_position.clone()
    ids, on = torch.tensor([5, 6, 7]), torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(3):
            x, y = decode_step(model.lm, cache, ids, on), decode_step(model.lm, full, ids, on)
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
            ids = x.argmax(-1)
    assert cache.positions[0][:, -3:].tolist() == (start[:, None] + torch.arange(3)).tolist()  # the new slots


def test_kivi_8bit_stays_close_and_holds_a_quarter_of_the_bytes():
    obs = reasoner_obs(reasoner().config)
    noise = _noise(reasoner().config)
    _, a = _rollouts(None, obs, noise)
    _, b = _rollouts({"kv_quant": {"bits": 8, "group": 16, "residual": 16}}, obs, noise)
    assert torch.equal(a.reasoning, b.reasoning)
    torch.testing.assert_close(b.actions, a.actions, atol=1e-2, rtol=0)
    assert not torch.equal(b.actions, a.actions)  # lossy, and really used
    # 3 layers of (B=3, KV=2, S=113, hd=16) float32 keys and values; prefix 101 tokens, then 12 decoded
    batch_heads, hd, layers = 3 * 2, 16, 3
    assert a.cache.nbytes() == layers * 2 * batch_heads * 113 * hd * 4
    # keys: 96 quantized after the prefix (a multiple of residual 16), 112 once the 16-token residual
    # filled up while decoding, 1 full-precision; values: all but the last 16 quantized (97)
    keys = batch_heads * (112 * hd * 1 + 112 // 16 * hd * 2 * 4 + 1 * hd * 4)  # codes, scale + zero per group, full
    values = batch_heads * (97 * hd * 1 + 97 * (hd // 16) * 2 * 4 + 16 * hd * 4)
    assert b.cache.nbytes() == layers * (keys + values)
    assert b.cache.nbytes() < 0.45 * a.cache.nbytes()


def test_kivi_packs_4_and_2_bit_codes():
    obs = reasoner_obs(reasoner().config)
    sizes = {}
    for bits in (8, 4, 2):
        _, out = _rollouts({"kv_quant": {"bits": bits, "group": 16, "residual": 16}}, obs, _noise(reasoner().config))
        sizes[bits] = out.cache.nbytes()
        assert torch.isfinite(out.actions).all()
    codes = 3 * 6 * (112 + 97) * 16  # 8-bit code bytes over the 3 layers
    assert sizes[8] - sizes[4] == codes // 2 and sizes[8] - sizes[2] == codes * 3 // 4


def test_speculative_decoding_runs_over_a_compressed_cache():
    """Greedy speculative decoding over the cache evicted after the prefix gives plain greedy decoding's
    tokens over that cache (fork, keep_last and masked rejections keep working on it), and the same
    actions once the rejected slots are evicted with the rest."""
    obs = reasoner_obs(reasoner().config)
    noise = _noise(reasoner().config)
    kv = {"kv_streaming": {"sinks": 4, "window": 20}}
    _, a = _rollouts(kv, obs, noise)
    fast = vlaopt.apply(reasoner(), [kv, {"speculative": {"draft": "self", "k": 3, "layers": 1}}])
    b = expert_policy.rollout(fast, *obs, noise=noise)
    assert torch.equal(a.reasoning, b.reasoning)
    assert fast.text_decoder.stats["drafted"] > fast.text_decoder.stats["accepted"]  # rejections rolled back
    torch.testing.assert_close(b.actions, a.actions, atol=1e-5, rtol=1e-5)


def test_speculative_decoding_runs_over_a_quantized_cache():
    """The draft's fork shares the quantized entries (appending to it leaves them); verification reads
    T new tokens in full precision, so the text may differ from one-by-one KIVI decoding."""
    obs = reasoner_obs(reasoner().config)
    kv = {"kv_quant": {"group": 16, "residual": 16}}
    fast = vlaopt.apply(reasoner(), [kv, {"speculative": {"draft": "self", "k": 3, "layers": 1}}])
    out = expert_policy.rollout(fast, *obs, noise=_noise(fast.config))
    assert out.reasoning.shape == (3, 12) and torch.isfinite(out.actions).all()
    assert all(isinstance(dict.__getitem__(out.cache.keys, i), KiviKeys) for i in out.cache.layers)


# ---- the steps -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("step,message", [
    ({"kv_streaming": {"window": 0}}, "kv_streaming window=0 must be a positive integer"),
    ({"kv_streaming": {"sinks": -1}}, "kv_streaming sinks=-1 must be a non-negative integer"),
    ({"kv_streaming": {"window": 2.5}}, "kv_streaming window=2.5 must be a positive integer"),
    ({"kv_h2o": {"heavy": 0, "recent": 0}}, r"kv_h2o heavy=0 and recent=0 keep no token; expected heavy \+ recent >= 1"),
    ({"kv_h2o": {"recent": True}}, "kv_h2o recent=True must be a non-negative integer"),
    ({"kv_quant": {"bits": 3}}, "kv_quant bits=3 is not supported; expected 8, 4 or 2"),
    ({"kv_quant": {"group": 16, "residual": 24}}, r"kv_quant residual=24 must be a multiple of group=16 \(keys"),
    ({"kv_quant": {"group": 32}}, r"kv_quant group=32 must divide the LM's head_dim=16 \(values"),
    ({"kv_h2o": {"budget": 3}}, r"kv_h2o: unknown parameter\(s\) \['budget'\]"),
])
def test_bad_parameters_raise_one_clear_error(step, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        vlaopt.apply(reasoner(), [step])


def test_the_steps_refuse_what_they_cannot_compress():
    with pytest.raises(ValueError, match=r"^kv_h2o compresses the KV cache the action expert reads; head.kind='l1' "
                                         r"keeps none \(expected head.kind='expert'\)$"):
        vlaopt.apply(VLA(VLAConfig.tiny()).eval(), [{"kv_h2o": {}}])
    with pytest.raises(ValueError, match=r"^this model already compresses its KV cache \(kv_streaming\); apply one kv "
                                         r"step, not kv_quant after it$"):
        vlaopt.apply(reasoner(), [{"kv_streaming": {}}, {"kv_quant": {"group": 16, "residual": 16}}])
    with pytest.raises(ValueError, match=r"^temporal_reuse looks last step's keys up by position in its cache, but "
                                         r"kv_streaming compresses that cache"):
        vlaopt.apply(reasoner(), [{"kv_streaming": {}}, {"temporal_reuse": {}}])
    with pytest.raises(ValueError, match=r"^kv_streaming cannot follow temporal_reuse"):
        vlaopt.apply(reasoner(), [{"temporal_reuse": {}}, {"kv_streaming": {}}])


@pytest.mark.parametrize("step", [{"kv_streaming": {"sinks": 2, "window": 30}}, {"kv_h2o": {"heavy": 16, "recent": 8}},
                                  {"kv_quant": {"bits": 4, "group": 8, "residual": 16}}])
def test_an_optimized_model_reloads_with_its_kv_step(tmp_path, step):
    model = vlaopt.apply(reasoner(), [step])
    model.set_stats({"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7}, "proprio": {"q01": [-1.0] * 3, "q99": [1.0] * 3}})
    model.save_pretrained(tmp_path / "m")
    loaded = load(tmp_path / "m")
    (kind, params), = loaded.config.recipe[0].items()
    assert kind == next(iter(step)) and loaded.kv_compressor.name == kind
    assert {k: v for k, v in params.items() if k != "version"} == {**_defaults(kind), **step[kind]}
    obs = reasoner_obs(model.config)
    assert torch.equal(loaded.predict_action(*obs), model.predict_action(*obs))


def _defaults(kind: str) -> dict:
    from dataclasses import asdict

    from vlaopt.optimize import STEPS

    (cls,) = STEPS.get(kind).config_classes()
    return asdict(cls())
