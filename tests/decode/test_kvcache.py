"""selfattn.KVCache: prefill + decode steps through the cache equal one causal call over the whole
sequence (and the reference), with GQA, ragged batches, options passed through, growth; appends are in
place and attend reads the cache without copying it; misuse is refused before anything is written."""

import tracemalloc

import numpy as np
import pytest

import selfattn
from selfattn import reference
from sa_testutil import assert_unchanged, snapshot

sdpa = selfattn.scaled_dot_product_attention
TOL = {np.float64: 1e-12, np.float32: 2e-5}


def _seq(rng, dtype, B=2, Hq=4, H=2, T=21, E=8, Ev=6):
    q = rng.standard_normal((B, Hq, T, E)).astype(dtype)
    k = rng.standard_normal((B, H, T, E)).astype(dtype)
    v = rng.standard_normal((B, H, T, Ev)).astype(dtype)
    return q, k, v


def _decode(cache, q, k, v, prompt, **opts):
    """Prefill `prompt` positions, then one position per step; the outputs concatenated."""
    cache.append(k[:, :, :prompt], v[:, :, :prompt])
    outs = [cache.attend(q[:, :, :prompt], **opts)]
    for t in range(prompt, q.shape[2]):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        outs.append(cache.attend(q[:, :, t:t + 1], **opts))
    return np.concatenate(outs, axis=2)


OPTIONS = [
    dict(),
    dict(window_size=(4, 0)),
    dict(alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625])),
    dict(softcap=3.0, scale=0.2),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("Hq,H", [(4, 4), (4, 2), (4, 1)])
def test_prefill_and_decode_equal_one_causal_call(dtype, opts, Hq, H):
    rng = np.random.default_rng(Hq * 10 + H)
    q, k, v = _seq(rng, dtype, Hq=Hq, H=H)
    cache = selfattn.KVCache(2, H, 32, 8, 6, dtype=dtype)
    snaps = snapshot(q, k, v)
    out = _decode(cache, q, k, v, prompt=7, **opts)
    assert_unchanged((q, k, v), snaps)
    assert out.dtype == dtype and out.shape == (2, Hq, 21, 6)
    kw = dict(opts, is_causal=True, enable_gqa=Hq != H)
    tol = TOL[dtype]
    np.testing.assert_allclose(out, sdpa(q, k, v, **kw), rtol=tol, atol=tol)
    np.testing.assert_allclose(out, reference.scaled_dot_product_attention(q, k, v, **kw), rtol=tol, atol=tol * 5)
    np.testing.assert_array_equal(cache.lengths, [21, 21])
    np.testing.assert_array_equal(cache.keys, k)
    np.testing.assert_array_equal(cache.values, v)


def test_return_lse_and_several_new_tokens_per_step():
    rng = np.random.default_rng(5)
    q, k, v = _seq(rng, np.float64)
    cache = selfattn.KVCache(2, 2, 21, 8, 6, dtype=np.float64)
    outs, lses = [], []
    for t0, t1 in ((0, 9), (9, 12), (12, 13), (13, 21)):           # speculative chunks of 3, 8 tokens
        cache.append(k[:, :, t0:t1], v[:, :, t0:t1])
        o, lse = cache.attend(q[:, :, t0:t1], return_lse=True)
        outs.append(o)
        lses.append(lse)
    full, full_lse = sdpa(q, k, v, is_causal=True, enable_gqa=True, return_lse=True)
    np.testing.assert_allclose(np.concatenate(outs, 2), full, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.concatenate(lses, 2), full_lse, rtol=1e-12, atol=1e-12)
    assert cache.max_len == 21                                      # filled exactly, no growth


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ragged_batch(dtype):
    """Prompts of 9 and 4 tokens padded to 9 (padding NaN: never written, never read), then decode
    steps; sequence 1 finishes early (counts 0). Each sequence equals its own causal call."""
    rng = np.random.default_rng(7)
    q, k, v = _seq(rng, dtype, T=15)
    lens = [9, 4]
    kp, vp, qp = k[:, :, :9].copy(), v[:, :, :9].copy(), q[:, :, :9].copy()
    kp[1, :, 4:] = np.nan
    vp[1, :, 4:] = np.nan
    qp[1, :, 4:] = np.nan
    cache = selfattn.KVCache(2, 2, 16, 8, 6, dtype=dtype)
    cache.append(kp, vp, counts=lens)
    np.testing.assert_array_equal(cache.lengths, lens)
    first = cache.attend(qp, counts=lens)
    assert np.isfinite(first).all() and not first[1, :, 4:].any()    # padding rows: zeros
    # decode: token t of sequence b is its position lens[b] + step; sequence 1 stops after 3 steps
    got = {0: [first[0, :, :9]], 1: [first[1, :, :4]]}
    for step in range(6):
        counts = np.array([1, 1 if step < 3 else 0])
        pos = cache.lengths
        kn = np.stack([k[b, :, pos[b]:pos[b] + 1] if pos[b] < 15 else k[b, :, :1] for b in range(2)])
        vn = np.stack([v[b, :, pos[b]:pos[b] + 1] if pos[b] < 15 else v[b, :, :1] for b in range(2)])
        qn = np.stack([q[b, :, pos[b]:pos[b] + 1] if pos[b] < 15 else q[b, :, :1] for b in range(2)])
        cache.append(kn, vn, counts=counts)
        o = cache.attend(qn, counts=counts)
        for b in range(2):
            if counts[b]:
                got[b].append(o[b])
            else:
                assert not o[b].any()
    np.testing.assert_array_equal(cache.lengths, [15, 7])
    tol = TOL[dtype]
    for b, n in ((0, 15), (1, 7)):
        out_b = np.concatenate(got[b], axis=1)
        want = sdpa(q[b, :, :n], k[b, :, :n], v[b, :, :n], is_causal=True, enable_gqa=True)
        np.testing.assert_allclose(out_b, want, rtol=tol, atol=tol)
        np.testing.assert_array_equal(cache.keys[b, :, :n], k[b, :, :n])


def test_uniform_steps_over_ragged_lengths_use_bottom_right_positions():
    # without counts, query row i of sequence b sits at lengths[b] - n + i
    rng = np.random.default_rng(8)
    q, k, v = _seq(rng, np.float64, T=12)
    cache = selfattn.KVCache(2, 2, 12, 8, 6, dtype=np.float64)
    cache.append(k[:, :, :10], v[:, :, :10], counts=[10, 6])
    out, lse = cache.attend(q[:, :, :2], return_lse=True, window_size=(3, 0))
    want, want_lse = sdpa(q[:, :, :2], k[:, :, :10], v[:, :, :10], is_causal=True, alignment="bottom_right",
                          key_lengths=[10, 6], enable_gqa=True, window_size=(3, 0), return_lse=True)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(lse, want_lse)


def test_attn_mask_and_ragged_options_per_sequence():
    rng = np.random.default_rng(9)
    q, k, v = _seq(rng, np.float64, T=10)
    cache = selfattn.KVCache(2, 2, 10, 8, 6, dtype=np.float64)
    cache.append(k, v, counts=[10, 7])
    keep = rng.random((2, 1, 3, 10)) < 0.8                      # (batch, 1, n, max(lengths))
    slopes = rng.random((2, 4))
    out = cache.attend(q[:, :, :3], counts=[3, 2], attn_mask=keep, alibi_slopes=slopes, softcap=4.0)
    for b, n, c in ((0, 10, 3), (1, 7, 2)):
        want = reference.scaled_dot_product_attention(
            q[b:b + 1, :, :c], k[b:b + 1, :, :n], v[b:b + 1, :, :n], attn_mask=keep[b:b + 1, :, :c, :n],
            alibi_slopes=slopes[b:b + 1], softcap=4.0, is_causal=True, alignment="bottom_right", enable_gqa=True)
        np.testing.assert_allclose(out[b:b + 1, :, :c], want, rtol=1e-12, atol=1e-12)
        assert not out[b, :, c:].any()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_ragged_counts_over_32_sequences_are_one_kernel_call(isa, monkeypatch, dtype, n):
    """counts over 32 sequences of different lengths: one call of the engine for the whole batch,
    equal to one call per sequence (its rows sliced; not always the same bits: the decode schedule
    splits the keys into chunks by the number of kv units in the call) and to the reference, zeros
    and lse -inf past each count, the same bits on 1 and 3 threads; n = 17 rows leaves the decode
    schedule (<= 16 stacked rows) for the tiled ones."""
    rng = np.random.default_rng(10 + n)
    B, Hq, H, E, Ev = 32, 4, 2, 8, 6
    lens = rng.integers(n, 40, B)
    counts = rng.integers(0, n + 1, B)
    cache = selfattn.KVCache(B, H, 48, E, Ev, dtype=dtype)
    cache.append(rng.standard_normal((B, H, 40, E)).astype(dtype), rng.standard_normal((B, H, 40, Ev)).astype(dtype),
                 counts=lens)
    q = rng.standard_normal((B, Hq, n, E)).astype(dtype)
    slopes = rng.random((B, Hq))
    opts = dict(alibi_slopes=slopes, window_size=(7, 0), return_lse=True)
    calls = []
    real_sdpa = selfattn.kvcache._core.sdpa

    def counting_sdpa(*args, **kw):
        calls.append(kw.get("query_lengths") is not None)
        return real_sdpa(*args, **kw)

    monkeypatch.setattr(selfattn.kvcache._core, "sdpa", counting_sdpa)
    out, lse = cache.attend(q, counts=counts, **opts)
    assert calls == [True], calls                                   # one call, the ragged one
    monkeypatch.undo()
    for threads in (1, 3):
        o_t, l_t = cache.attend(q, counts=counts, num_threads=threads, **opts)
        np.testing.assert_array_equal(o_t, out, err_msg=f"{threads} threads")
        np.testing.assert_array_equal(l_t, lse, err_msg=f"{threads} threads")
    close = {np.float64: 1e-13, np.float32: 1e-6}[dtype]
    S = int(lens.max())
    for b in range(B):
        c = int(counts[b])
        want, want_lse = sdpa(q[b:b + 1, :, :c], cache._k[b:b + 1, :, :S], cache._v[b:b + 1, :, :S],
                              is_causal=True, alignment="bottom_right", key_lengths=lens[b:b + 1],
                              enable_gqa=True, alibi_slopes=slopes[b:b + 1], window_size=(7, 0),
                              return_lse=True)
        np.testing.assert_allclose(out[b:b + 1, :, :c], want, rtol=close, atol=close, err_msg=f"sequence {b}")
        np.testing.assert_allclose(lse[b:b + 1, :, :c], want_lse, rtol=close, atol=close, err_msg=f"sequence {b}")
        assert not out[b, :, c:].any() and np.all(lse[b, :, c:] == -np.inf)
        ref = reference.scaled_dot_product_attention(
            q[b:b + 1, :, :c], cache._k[b:b + 1, :, :lens[b]], cache._v[b:b + 1, :, :lens[b]], is_causal=True,
            alignment="bottom_right", enable_gqa=True, alibi_slopes=slopes[b:b + 1], window_size=(7, 0))
        np.testing.assert_allclose(out[b:b + 1, :, :c], ref, rtol=TOL[dtype], atol=TOL[dtype])


def test_appends_in_place_and_attend_reads_the_cache_without_copying():
    cache = selfattn.KVCache(1, 2, 1 << 16, 32, dtype=np.float32)     # 16 MiB of keys + 16 MiB of values
    ptr = cache._k.__array_interface__["data"][0]
    rng = np.random.default_rng(0)
    cache.append(rng.standard_normal((1, 2, 1 << 15, 32), dtype=np.float32),
                 rng.standard_normal((1, 2, 1 << 15, 32), dtype=np.float32))
    q = rng.standard_normal((1, 4, 1, 32), dtype=np.float32)
    tracemalloc.start()
    try:
        for _ in range(3):
            cache.append(q[:, :2], q[:, :2])
            cache.attend(q)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated through NumPy: the cache was copied"
    assert cache._k.__array_interface__["data"][0] == ptr          # no reallocation
    assert cache.max_len == 1 << 16 and cache.lengths[0] == (1 << 15) + 3


def test_grow_doubles_and_keeps_the_data():
    rng = np.random.default_rng(3)
    q, k, v = _seq(rng, np.float64, T=20)
    cache = selfattn.KVCache(2, 2, 3, 8, 6, dtype=np.float64, grow=True)
    caps = []
    out = []
    for t in range(20):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        caps.append(cache.max_len)
        out.append(cache.attend(q[:, :, t:t + 1]))
    assert caps[:4] == [3, 3, 3, 6] and caps[-1] == 24            # amortised doubling
    np.testing.assert_allclose(np.concatenate(out, 2), sdpa(q, k, v, is_causal=True, enable_gqa=True),
                               rtol=1e-12, atol=1e-12)
    cache.append(np.zeros((2, 2, 60, 8)), np.zeros((2, 2, 60, 6)))   # more than double at once
    assert cache.max_len == 80 and list(cache.lengths) == [80, 80]


def test_views_are_read_only_and_reset():
    cache = selfattn.KVCache(1, 1, 4, 2)
    cache.append(np.ones((1, 1, 2, 2), np.float32), np.ones((1, 1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="read-only"):
        cache.keys[0, 0, 0, 0] = 5
    lengths = cache.lengths
    lengths[0] = 3                                                  # a copy
    assert cache.lengths[0] == 2 and cache.keys.shape == (1, 1, 2, 2) and cache.values.shape == (1, 1, 2, 2)
    assert "lengths=[2]" in repr(cache)
    cache.reset()
    assert cache.lengths[0] == 0 and cache.keys.shape == (1, 1, 0, 2)
    out = cache.attend(np.ones((1, 3, 1, 2), np.float32))          # nothing cached: zeros
    assert out.shape == (1, 3, 1, 2) and not out.any()


# ---- misuse ------------------------------------------------------------------------------------------

def _small():
    return selfattn.KVCache(2, 2, 5, 4, 3)


def test_constructor_errors():
    with pytest.raises(TypeError, match="batch must be an int"):
        selfattn.KVCache(2.0, 2, 5, 4)
    with pytest.raises(ValueError, match="num_kv_heads must be >= 1"):
        selfattn.KVCache(2, 0, 5, 4)
    with pytest.raises(ValueError, match="max_len must be >= 0"):
        selfattn.KVCache(2, 1, -1, 4)
    with pytest.raises(TypeError, match="head_dim must be an int"):
        selfattn.KVCache(2, 1, 5, True)
    with pytest.raises(TypeError, match="dtype must be float32, float64, float16 or bfloat16, got int32"):
        selfattn.KVCache(2, 1, 5, 4, dtype=np.int32)
    with pytest.raises(TypeError, match="grow must be a bool"):
        selfattn.KVCache(2, 1, 5, 4, grow="yes")


@pytest.mark.parametrize("shape,match", [
    ((2, 2, 1, 5), r"key must have shape \(batch, num_kv_heads, n, head_dim\) = \(2, 2, n, 4\), got \(2, 2, 1, 5\)"),
    ((3, 2, 1, 4), r"key must have shape .* got \(3, 2, 1, 4\)"),           # wrong batch
    ((2, 1, 1, 4), r"key must have shape .* got \(2, 1, 1, 4\)"),           # wrong heads
    ((2, 1, 4), r"key must have shape .* got \(2, 1, 4\)"),                 # 3-D
])
def test_append_shape_errors_write_nothing(shape, match):
    cache = _small()
    with pytest.raises(ValueError, match=match):
        cache.append(np.ones(shape, np.float32), np.ones((2, 2, 1, 3), np.float32))
    assert not cache.lengths.any() and not cache._k.any()


def test_append_errors():
    cache = _small()
    k, v = np.ones((2, 2, 2, 4), np.float32), np.ones((2, 2, 2, 3), np.float32)
    with pytest.raises(ValueError, match=r"value must have shape .* = \(2, 2, n, 3\), got \(2, 2, 2, 4\)"):
        cache.append(k, k)
    with pytest.raises(ValueError, match="same number of new positions"):
        cache.append(k, v[:, :, :1])
    with pytest.raises(TypeError, match=r"key has dtype float64, which does not fit the float32 cache.*astype"):
        cache.append(k.astype(np.float64), v)
    with pytest.raises(TypeError, match="value has dtype int64"):
        cache.append(k, v.astype(np.int64))
    with pytest.raises(TypeError, match="key has dtype complex64"):
        cache.append(k.astype(np.complex64), v)
    with pytest.raises(ValueError, match=r"counts must be in \[0, n=2\]"):
        cache.append(k, v, counts=[3, 1])
    with pytest.raises(ValueError, match=r"counts of shape \(3,\) does not broadcast to \(batch,\) = \(2,\)"):
        cache.append(k, v, counts=[1, 1, 1])
    with pytest.raises(TypeError, match="counts must be integers"):
        cache.append(k, v, counts=[1.0, 1.0])
    assert not cache.lengths.any()
    cache.append(k.astype(np.float16), v)                          # float16 fits float32 exactly
    assert list(cache.lengths) == [2, 2]


def test_overflow_raises_and_writes_nothing():
    cache = _small()
    k, v = np.ones((2, 2, 2, 4), np.float32), np.ones((2, 2, 2, 3), np.float32)
    cache.append(k, v)
    cache.append(k, v, counts=[2, 0])
    snap = cache._k.copy()
    with pytest.raises(ValueError, match=r"KVCache overflow: sequence 0 has 4 positions and 2 more would pass "
                                         r"max_len=5.*grow=True"):
        cache.append(k, v)
    np.testing.assert_array_equal(cache.lengths, [4, 2])
    np.testing.assert_array_equal(cache._k, snap)
    cache.append(k, v, counts=[1, 2])                               # fits exactly
    np.testing.assert_array_equal(cache.lengths, [5, 4])


def test_attend_errors():
    cache = _small()
    cache.append(np.ones((2, 2, 2, 4), np.float32), np.ones((2, 2, 2, 3), np.float32))
    q = np.ones((2, 4, 1, 4), np.float32)
    with pytest.raises(ValueError, match=r"query must have shape \(batch, Hq, n, head_dim\) = \(2, Hq, n, 4\), "
                                         r"got \(3, 4, 1, 4\)"):
        cache.attend(np.ones((3, 4, 1, 4), np.float32))
    with pytest.raises(ValueError, match="got \\(2, 4, 1, 5\\)"):
        cache.attend(np.ones((2, 4, 1, 5), np.float32))
    with pytest.raises(ValueError, match="query heads Hq=3 .* multiple of the cache's num_kv_heads=2"):
        cache.attend(np.ones((2, 3, 1, 4), np.float32))
    with pytest.raises(TypeError, match="query is float64 but the cache holds float32"):
        cache.attend(q.astype(np.float64))
    with pytest.raises(TypeError, match="sets key_lengths itself"):
        cache.attend(q, key_lengths=[1, 1])
    # enable_gqa: the cache sets it; a value that agrees is accepted (a torch user's habit), one that
    # contradicts it is refused
    np.testing.assert_array_equal(cache.attend(q, enable_gqa=True), cache.attend(q))
    with pytest.raises(ValueError, match=r"enable_gqa=False contradicts the cache: query has Hq=4 heads"):
        cache.attend(q, enable_gqa=False)
    with pytest.raises(TypeError, match="enable_gqa must be a bool, got str"):
        cache.attend(q, enable_gqa="yes")
    same_heads = selfattn.KVCache(2, 2, 5, 4, 3)
    same_heads.append(np.ones((2, 2, 1, 4), np.float32), np.ones((2, 2, 1, 3), np.float32))
    q2 = np.ones((2, 2, 1, 4), np.float32)
    for agreeing in (False, True):
        np.testing.assert_array_equal(same_heads.attend(q2, enable_gqa=agreeing), same_heads.attend(q2))
    c2 = selfattn.KVCache(2, 2, 5, 4, 3)
    c2.append(np.ones((2, 2, 2, 4), np.float32), np.ones((2, 2, 2, 3), np.float32), counts=[2, 1])
    with pytest.raises(ValueError, match=r"counts\[1\]=2 query rows but sequence 1 holds only 1"):
        c2.attend(np.ones((2, 4, 2, 4), np.float32), counts=[2, 2])
    with pytest.raises(ValueError, match="attn_mask"):
        cache.attend(q, counts=[1, 1], attn_mask=np.ones((7, 7), bool))   # validated before any call
    with pytest.raises(ValueError, match="window_size"):
        cache.attend(q, window_size=-1)


def test_docstring_example_runs():
    import doctest
    import selfattn.kvcache
    result = doctest.testmod(selfattn.kvcache, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted >= 10 and result.failed == 0


def test_crop_and_reorder():
    """crop keeps the first positions (negative: drops the last ones); reorder selects / permutes
    sequences (beam search); attention afterwards equals a cache built directly with those rows."""
    rng = np.random.default_rng(21)
    B, H, E = 3, 2, 8
    k = rng.standard_normal((B, H, 10, E))
    v = rng.standard_normal((B, H, 10, E))
    c = selfattn.KVCache(B, H, 16, E, dtype=np.float64)
    c.append(k, v, counts=[10, 7, 4])
    c.crop(-2)
    assert c.lengths.tolist() == [8, 5, 2]
    c.crop(6)
    assert c.lengths.tolist() == [6, 5, 2]
    c.crop(-9)
    assert c.lengths.tolist() == [0, 0, 0]
    c.append(k, v, counts=[10, 7, 4])
    c.reorder([2, 0, 0, 1])                                   # grows the batch: repeats allowed
    assert c.batch == 4 and c.lengths.tolist() == [4, 10, 10, 7]
    np.testing.assert_array_equal(c.keys[0, :, :4], k[2, :, :4])
    np.testing.assert_array_equal(c.values[3, :, :7], v[1, :, :7])
    q = rng.standard_normal((4, 4, 1, E))
    out = c.attend(q)
    d = selfattn.KVCache(4, H, 16, E, dtype=np.float64)
    d.append(k[[2, 0, 0, 1]], v[[2, 0, 0, 1]], counts=[4, 10, 10, 7])
    np.testing.assert_array_equal(out, d.attend(q))
    c.reorder(np.array([-1]))                                 # select the last one
    assert c.batch == 1 and c.lengths.tolist() == [7]
    for bad, exc, msg in ((lambda: c.crop(1.5), TypeError, "max_length must be an int"),
                          (lambda: c.reorder([[0]]), TypeError, "indices must be a 1-D integer"),
                          (lambda: c.reorder(np.array([], np.int64)), ValueError, "at least one"),
                          (lambda: c.reorder([1]), ValueError, r"indices must be in \[-batch, batch\)")):
        with pytest.raises(exc, match=msg):
            bad()
