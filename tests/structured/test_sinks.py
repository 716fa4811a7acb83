"""Attention sinks against selfattn.reference, on every path and schedule, with every other option.

* ``sinks=``: one logit per query head in every row's softmax denominator, with a value of zero
  (gpt-oss, FlashAttention's learnable sink): the closed form; its gradient through the VJPs and the
  torch bridge; varlen, KVCache, Dask; thread invariance; -inf = no sink, bit for bit; the errors.
* ``num_sink_tokens=n``: the first n keys stay visible beside a window (StreamingLLM): the same, plus
  the promise that the key blocks between the sink tokens and every window are not read (NaN there
  leaves the result bit-identical), and that the banded schedule (a ring of consecutive blocks) is
  not taken.
"""

import importlib
import math
import os

import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import selfattn
from selfattn import reference
from sa_testutil import (DTYPES, ISAS, assert_bits, assert_sdpa_close, assert_unchanged, edge, examples,
                         forced_schedule, logit_magnitude, optional_import, snapshot, vmax_of)

sdpa = selfattn.scaled_dot_product_attention
SCHEDULES = (None, "shared", "fused", "banded", "decode")


def _lse_mag(sinks, mag):
    return mag + float(np.max(np.abs(np.asarray(sinks, dtype=np.float64)[np.isfinite(sinks)]), initial=0.0))


@st.composite
def sink_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    isa = draw(st.sampled_from(ISAS))
    L = edge(isa, dtype, draw(st.sampled_from(("1", "2", "mr+1", "bq-1", "bq+1", "2*bq+1"))))
    S = edge(isa, dtype, draw(st.sampled_from(("1", "nr+1", "bk-1", "bk+1", "2*bk+1", "3*bk+5"))))
    B, H, g = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    kw = dict(is_causal=draw(st.booleans()), alignment=draw(st.sampled_from(("top_left", "bottom_right"))))
    if g > 1:
        kw["enable_gqa"] = True
    if draw(st.booleans()):
        kw["window_size"] = (draw(st.sampled_from([None, 0, 3, 40])), draw(st.sampled_from([None, 0, 5])))
        ns = draw(st.sampled_from([None, 0, 1, 4, "nr+1", "bk-1", "bk+3", "S"]))
        if ns is not None:
            kw["num_sink_tokens"] = S if ns == "S" else ns if isinstance(ns, int) else edge(isa, dtype, ns)
    if draw(st.booleans()):
        kl = draw(st.lists(st.one_of(st.just(0), st.integers(0, S)), min_size=B, max_size=B))
        kw["key_lengths"] = np.array(kl)
    if draw(st.booleans()):
        kw["alibi_slopes"] = np.linspace(0.05, 0.5, H * g)
    if draw(st.booleans()):
        kw["softcap"] = 5.0
    shape = draw(st.sampled_from(["head", "batch_head", "scalar", "none"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    sinks = {"head": rng.standard_normal(H * g) * 3, "batch_head": rng.standard_normal((B, H * g)) * 3,
             "scalar": np.float64(rng.standard_normal() * 3), "none": None}[shape]
    if shape in ("head", "batch_head") and draw(st.booleans()):
        sinks.reshape(-1)[0] = -np.inf                   # no sink for one head
    if shape != "none":
        kw["sinks"] = sinks
    return dict(dtype=dtype, L=L, S=S, B=B, H=H, g=g, kw=kw, seed=seed, mask=draw(st.sampled_from([None, "bool"])),
                threads=draw(st.sampled_from([1, 2])), schedule=draw(st.sampled_from(SCHEDULES)))


@settings(max_examples=examples(30), deadline=None)
@given(c=sink_cases())
def test_every_option_with_sinks_matches_reference(c):
    note(repr(c))
    rng = np.random.default_rng(c["seed"])
    B, H, g, L, S, dt = c["B"], c["H"], c["g"], c["L"], c["S"], c["dtype"]
    q = rng.standard_normal((B, H * g, L, 16)).astype(dt)
    k = rng.standard_normal((B, H, S, 16)).astype(dt)
    v = rng.standard_normal((B, H, S, 7)).astype(dt)
    kw = dict(c["kw"])
    if c["mask"] == "bool":
        kw["attn_mask"] = rng.random((L, S)) < 0.8
    ref, ref_lse = reference.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    mag = logit_magnitude(q, k)
    if kw.get("alibi_slopes") is not None:
        mag += 0.5 * (L + S)
    sinks = kw.get("sinks", 0.0)
    snaps = snapshot(q, k, v, kw.get("sinks"))
    for isa in ISAS:
        with selfattn.use_isa(isa), forced_schedule(c["schedule"]):
            out, lse = sdpa(q, k, v, return_lse=True, num_threads=c["threads"], **kw)
        assert_sdpa_close(out, ref, dt, vmax_of(v), _lse_mag(sinks, mag), lse, ref_lse, ctx=f"[isa={isa}] ")
    assert_unchanged((q, k, v, kw.get("sinks")), snaps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_closed_form(isa, dtype, schedule):
    """Logits all 0 (q = 0): each of the S keys has weight 1 / (S + e^sink), so out = sum_j v_j /
    (S + e^sink) and lse = log(S + e^sink); a row with no key (key_lengths 0) gives zeros and lse = sink."""
    S, sink = 37, 1.75
    q = np.zeros((2, 1, 3, 8), dtype)
    rng = np.random.default_rng(3)
    k = rng.standard_normal((2, 1, S, 8)).astype(dtype)
    v = rng.standard_normal((2, 1, S, 5)).astype(dtype)
    with selfattn.use_isa(isa), forced_schedule(schedule):
        out, lse = sdpa(q, k, v, sinks=[sink], key_lengths=[S, 0], return_lse=True)
    denom = S + math.exp(sink)
    want = v[0, 0].astype(np.float64).sum(axis=0) / denom
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(out[0, 0], np.broadcast_to(want, (3, 5)), rtol=tol, atol=tol)
    np.testing.assert_allclose(lse[0, 0], math.log(denom), rtol=tol)
    assert (out[1] == 0).all()
    np.testing.assert_allclose(lse[1], sink, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_minus_inf_sink_is_no_sink_bit_for_bit(isa, dtype, schedule):
    rng = np.random.default_rng(5)
    L = 1 if schedule == "decode" else 70
    q = rng.standard_normal((2, 4, L, 32)).astype(dtype)
    k, v = (rng.standard_normal((2, 2, 300, 32)).astype(dtype) for _ in range(2))
    kw = dict(enable_gqa=True, is_causal=True, alignment="bottom_right", window_size=(100, 0), return_lse=True)
    with selfattn.use_isa(isa), forced_schedule(schedule):
        a = sdpa(q, k, v, **kw)
        b = sdpa(q, k, v, sinks=np.full(4, -np.inf), **kw)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sinks_do_not_depend_on_threads(isa, dtype):
    rng = np.random.default_rng(8)
    k, v = (rng.standard_normal((2, 2, 3000, 32)).astype(dtype) for _ in range(2))
    sinks = rng.standard_normal((2, 4))
    for L in (1, 3, 200):               # decode (split keys across threads, merged) and the tiled forward
        q = rng.standard_normal((2, 4, L, 32)).astype(dtype)
        runs = [sdpa(q, k, v, sinks=sinks, enable_gqa=True, is_causal=True, alignment="bottom_right",
                     return_lse=True, num_threads=t) for t in (1, 2, 3)]
        for out, lse in runs[1:]:
            assert np.array_equal(out, runs[0][0]) and np.array_equal(lse, runs[0][1]), L


@pytest.mark.parametrize("sinks_shape", [(4,), (2, 4), ()])
def test_vjp_gradients_match_reference(sinks_shape):
    rng = np.random.default_rng(11)
    q = rng.standard_normal((2, 4, 19, 16))
    k, v = rng.standard_normal((2, 2, 45, 16)), rng.standard_normal((2, 2, 45, 8))
    sinks = rng.standard_normal(sinks_shape)
    kw = dict(enable_gqa=True, is_causal=True, alignment="bottom_right", key_lengths=[45, 20], softcap=8.0,
              sinks=sinks)
    out, vjp = selfattn.scaled_dot_product_attention_vjp(q, k, v, **kw)
    rout, rvjp = reference.scaled_dot_product_attention_vjp(q, k, v, **kw)
    np.testing.assert_allclose(out, rout, rtol=1e-12, atol=1e-12)
    d = rng.standard_normal(out.shape)
    got, want = vjp(d), rvjp(d)
    assert len(got) == 4 and got[3].shape == np.shape(sinks) and got[3].dtype == np.float64
    for g_, w_, name in zip(got, want, ("dq", "dk", "dv", "dsinks")):
        np.testing.assert_allclose(g_, w_, rtol=1e-10, atol=1e-11, err_msg=name)
    # dsinks by central differences of sum(out * d)
    eps, flat = 1e-6, np.array(sinks, dtype=np.float64).reshape(-1)
    for i in range(flat.size):
        hi, lo = flat.copy(), flat.copy()
        hi[i] += eps
        lo[i] -= eps
        f = [float(np.sum(sdpa(q, k, v, **dict(kw, sinks=x.reshape(sinks_shape))) * d)) for x in (hi, lo)]
        assert abs((f[0] - f[1]) / (2 * eps) - got[3].reshape(-1)[i]) < 1e-6


def test_varlen_with_sinks_and_its_vjp():
    rng = np.random.default_rng(12)
    cu_q, cu_k = np.array([0, 5, 5, 40]), np.array([0, 30, 31, 90])
    q, k, v = rng.standard_normal((4, 40, 16)), rng.standard_normal((2, 90, 16)), rng.standard_normal((2, 90, 8))
    sinks = rng.standard_normal(4)
    kw = dict(enable_gqa=True, is_causal=True, alignment="bottom_right", sinks=sinks)
    out, lse = selfattn.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    rout, rlse = reference.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    np.testing.assert_allclose(out, rout, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, rlse, rtol=1e-12, atol=1e-12)
    o, vjp = selfattn.varlen_attention_vjp(q, k, v, cu_q, cu_k, **kw)
    ro, rvjp = reference.varlen_attention_vjp(q, k, v, cu_q, cu_k, **kw)
    d = rng.standard_normal(o.shape)
    for g_, w_ in zip(vjp(d), rvjp(d)):
        np.testing.assert_allclose(g_, w_, rtol=1e-10, atol=1e-11)


def test_kvcache_attend_with_sinks():
    rng = np.random.default_rng(13)
    cache = selfattn.KVCache(batch=2, num_kv_heads=2, head_dim=16, max_len=600, dtype=np.float32)
    k, v = rng.standard_normal((2, 2, 500, 16)).astype(np.float32), rng.standard_normal((2, 2, 500, 16)).astype(np.float32)
    cache.append(k, v)
    q = rng.standard_normal((2, 4, 1, 16)).astype(np.float32)
    sinks = np.array([0.5, -1.0, 2.0, -np.inf])
    got = cache.attend(q, sinks=sinks, return_lse=True)
    want = sdpa(q, k, v, sinks=sinks, enable_gqa=True, is_causal=True, alignment="bottom_right", return_lse=True)
    for x, y in zip(got, want):
        assert np.array_equal(x, y)
    ref = reference.scaled_dot_product_attention(q, k, v, sinks=sinks, enable_gqa=True)
    np.testing.assert_allclose(got[0], ref, rtol=0, atol=2e-6)


def test_16_bit_storage_with_sinks_is_the_float32_path_rounded():
    rng = np.random.default_rng(14)
    dts = [np.dtype(np.float16)]
    try:
        dts.append(np.dtype(importlib.import_module("ml_dtypes").bfloat16))
    except ImportError:
        if "ml_dtypes" in os.environ.get("SELFATTN_REQUIRE_OPTIONAL", "").split(","):
            raise
    sinks = np.array([1.0, -0.5, 3.0, 0.0])
    previous = selfattn.set_isa(ISAS[0])           # the widening paths (avx512bf16: test_bf16_dot.py)
    try:
        for dt in dts:
            for L in (1, 50):
                q = rng.standard_normal((1, 4, L, 32)).astype(dt)
                k, v = (rng.standard_normal((1, 2, 400, 32)).astype(dt) for _ in range(2))
                kw = dict(enable_gqa=True, is_causal=True, alignment="bottom_right", sinks=sinks, return_lse=True)
                for isa in ISAS:
                    with selfattn.use_isa(isa):
                        out, lse = sdpa(q, k, v, **kw)
                        wo, wl = sdpa(*(np.ascontiguousarray(a, dtype=np.float32) for a in (q, k, v)), **kw)
                    assert_bits(out, wo.astype(dt), f"{dt} L={L} {isa}")
                    assert_bits(lse, wl, f"{dt} L={L} {isa} lse")
    finally:
        selfattn.set_isa(previous)


def test_torch_bridge_sinks_get_their_gradient():
    torch = optional_import("torch")
    import selfattn.torch as st_
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 13, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 13, 8, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def peer(q, k, v, sinks):    # gpt-oss's formulation: the sink as one more logit column, dropped after softmax
        kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        s = (q @ kk.transpose(-1, -2)) / 4.0
        s = s.masked_fill(~torch.ones(9, 13, dtype=torch.bool).tril(4), -float("inf"))
        s = torch.cat([s, sinks[None, :, None, None].expand(2, 4, 9, 1)], -1)
        return s.softmax(-1)[..., :-1] @ vv

    out = st_.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, alignment="bottom_right",
                                           sinks=sinks)
    ref = peer(q, k, v, sinks)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    d = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, sinks), d)
    want = torch.autograd.grad(ref, (q, k, v, sinks), d)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-10, atol=1e-11)
    assert torch.autograd.gradcheck(lambda s: st_.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(),
                                                                                enable_gqa=True, sinks=s),
                                    (sinks.detach().clone().requires_grad_(),))
    # a sink that needs no gradient, as a list: no gradient asked for it
    out2 = st_.scaled_dot_product_attention(q, k, v, enable_gqa=True, sinks=[0.0, 1.0, -1.0, 2.0])
    out2.sum().backward()
    assert q.grad is not None


def test_dask_with_sinks_equals_numpy():
    da = optional_import("dask.array")
    import selfattn.dask as sd
    rng = np.random.default_rng(15)
    q = rng.standard_normal((1, 4, 30, 16))
    k, v = rng.standard_normal((1, 2, 50, 16)), rng.standard_normal((1, 2, 50, 8))
    sinks = rng.standard_normal(4)
    for kw in (dict(is_causal=True), dict(window_size=(3, 0)), {}):
        got = sd.scaled_dot_product_attention(da.from_array(q, chunks=(1, 2, 7, 16)), da.from_array(k, chunks=(1, 1, 11, 16)),
                                              da.from_array(v, chunks=(1, 1, 11, 8)), enable_gqa=True, sinks=sinks,
                                              return_lse=True, **kw)
        want = sdpa(q, k, v, enable_gqa=True, sinks=sinks, return_lse=True, **kw)
        np.testing.assert_allclose(got[0].compute(), want[0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got[1].compute(), want[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad,exc,msg", [
    (np.array([np.nan, 0, 0, 0]), ValueError, "sinks must be finite or -inf"),
    (np.array([np.inf, 0, 0, 0]), ValueError, "sinks must be finite or -inf"),
    (np.zeros(3), ValueError, r"sinks of shape \(3,\) does not broadcast"),
    (np.array(["a"] * 4), TypeError, "sinks must be real numbers"),
])
def test_bad_sinks_are_clear_errors(bad, exc, msg):
    q = np.zeros((1, 4, 2, 8), np.float32)
    with pytest.raises(exc, match=msg):
        sdpa(q, q, q, sinks=bad)
    with pytest.raises(exc, match=msg):
        selfattn.scaled_dot_product_attention_vjp(q, q, q, sinks=bad)


def test_attention_weights_with_sinks():
    rng = np.random.default_rng(16)
    q, k, v = rng.standard_normal((2, 4, 6, 8)), rng.standard_normal((2, 2, 9, 8)), rng.standard_normal((2, 2, 9, 3))
    sinks = np.array([0.0, 2.0, -np.inf, -1.0])
    kw = dict(enable_gqa=True, is_causal=True, key_lengths=[9, 0], sinks=sinks)
    w = selfattn.attention_weights(q, k, **kw)
    np.testing.assert_allclose(w, reference.attention_weights(q, k, **kw), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(w @ np.repeat(v, 2, axis=1), sdpa(q, k, v, **kw), rtol=1e-12, atol=1e-13)
    assert (w[0, 2].sum(-1) > 1 - 1e-12).all() and (w[0, [0, 1, 3]].sum(-1) < 1).all() and (w[1] == 0).all()


# ---------------------------------------------------------------- num_sink_tokens (StreamingLLM)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_sink_tokens_closed_form(isa, dtype, schedule):
    """q = 0: every visible key has weight 1 / (number visible), so row p's output is the mean of the
    values of keys [0, n) and [p - w, p] (causal window w, n sink tokens), whatever the gap."""
    L, S, w, n = 3, 500, 40, 5
    rng = np.random.default_rng(21)
    q = np.zeros((1, 2, L, 8), dtype)
    k = rng.standard_normal((1, 2, S, 8)).astype(dtype)
    v = rng.standard_normal((1, 2, S, 6)).astype(dtype)
    with selfattn.use_isa(isa), forced_schedule(schedule):
        out = sdpa(q, k, v, is_causal=True, window_size=(w, 0), num_sink_tokens=n, alignment="bottom_right")
    v64 = v.astype(np.float64)
    for i in range(L):
        p = S - L + i
        want = np.concatenate([v64[0, :, :n], v64[0, :, p - w:p + 1]], axis=1).mean(axis=1)
        np.testing.assert_allclose(out[0, :, i], want, rtol=1e-5 if dtype == np.float32 else 1e-12,
                                   atol=1e-6 if dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 4, "bq+3"])
def test_blocks_between_sink_tokens_and_window_are_not_read(isa, dtype, L):
    """Keys in whole blocks between the sink tokens and every query's window: NaN there leaves out,
    lse and the backward's gradients bit-identical (the kernels step over those blocks)."""
    bk = edge(isa, dtype, "bk")
    L = edge(isa, dtype, L) if isinstance(L, str) else L
    n, w, S = 3, 2 * bk, 12 * bk + 5
    rng = np.random.default_rng(22)
    q = rng.standard_normal((2, 4, L, 16)).astype(dtype)
    k, v = rng.standard_normal((2, 2, S, 16)).astype(dtype), rng.standard_normal((2, 2, S, 8)).astype(dtype)
    kw = dict(enable_gqa=True, is_causal=True, window_size=(w, 0), num_sink_tokens=n, alignment="bottom_right")
    lo_min = S - L - w                                  # the first key of the first query's window
    gap = slice(bk, lo_min // bk * bk)                  # whole blocks after the sink tokens' block
    assert gap.stop - gap.start >= 4 * bk
    kn, vn = k.copy(), v.copy()
    kn[:, :, gap] = np.nan
    vn[:, :, gap] = np.inf
    with selfattn.use_isa(isa):
        for sched in (None, "shared", "fused", "decode"):
            with forced_schedule(sched):
                clean, dirty = sdpa(q, k, v, return_lse=True, **kw), sdpa(q, kn, vn, return_lse=True, **kw)
            for x, y in zip(clean, dirty):
                assert np.array_equal(x, y), sched
        o1, f1 = selfattn.scaled_dot_product_attention_vjp(q, k, v, **kw)
        o2, f2 = selfattn.scaled_dot_product_attention_vjp(q, kn, vn, **kw)
        d = rng.standard_normal(o1.shape).astype(dtype)
        g1, g2 = f1(d), f2(d)
        assert np.array_equal(g1[0], g2[0])
        for a, b in zip(g1[1:], g2[1:]):              # dk, dv: zero on the blocks no query sees
            assert np.array_equal(a, b) and not a[:, :, gap].any()
    ref = reference.scaled_dot_product_attention(q, k, v, **kw)
    assert_sdpa_close(clean[0], ref, dtype, vmax_of(v), logit_magnitude(q, k))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sink_tokens_backward_matches_reference(isa, dtype):
    rng = np.random.default_rng(23)
    bk = edge(isa, dtype, "bk")
    L = S = 3 * bk + 7
    q = rng.standard_normal((2, 4, L, 16)).astype(dtype)
    k, v = rng.standard_normal((2, 2, S, 16)).astype(dtype), rng.standard_normal((2, 2, S, 8)).astype(dtype)
    for kw in (dict(is_causal=True, window_size=(bk // 2, 0), num_sink_tokens=4),
               dict(window_size=(5, 9), num_sink_tokens=bk + 3, sinks=np.array([0.5, -1.0, 2.0, 0.0]),
                    key_lengths=[S, S - bk], softcap=7.0)):
        with selfattn.use_isa(isa):
            out, vjp = selfattn.scaled_dot_product_attention_vjp(q, k, v, enable_gqa=True, **kw)
            d = rng.standard_normal(out.shape).astype(dtype)
            got = vjp(d)
        rout, rvjp = reference.scaled_dot_product_attention_vjp(q, k, v, enable_gqa=True, **kw)
        want = rvjp(d)
        tol = 2e-4 if dtype == np.float32 else 1e-10
        for g_, w_ in zip(got, want):
            scale = max(1.0, float(np.abs(w_).max()))
            assert np.abs(g_ - w_).max() <= tol * scale, kw


@pytest.mark.parametrize("dtype", DTYPES)
def test_sink_tokens_threads_and_schedules(isa, dtype):
    rng = np.random.default_rng(24)
    bk = edge(isa, dtype, "bk")
    S = 20 * bk + 3
    k, v = rng.standard_normal((2, 2, S, 32)).astype(dtype), rng.standard_normal((2, 2, S, 16)).astype(dtype)
    kw = dict(enable_gqa=True, is_causal=True, window_size=(3 * bk, 0), num_sink_tokens=4)
    assert _core_sched(k, v, dtype, kw, num_sink_tokens=0)["banded"]            # the band alone: banded
    assert not _core_sched(k, v, dtype, kw)["banded"]                           # with sinks: never
    with forced_schedule("banded"):
        assert not _core_sched(k, v, dtype, kw)["banded"]
    for L in (1, 5, S):
        q = rng.standard_normal((2, 4, L, 32)).astype(dtype)
        kwl = dict(kw, alignment="bottom_right")
        with selfattn.use_isa(isa):
            runs = [sdpa(q, k, v, return_lse=True, num_threads=t, **kwl) for t in (1, 2, 3)]
            tiled = []        # the shared and fused schedules sum in the same order (decode: its own)
            for sched in ("shared", "fused"):
                with forced_schedule(sched):
                    tiled.append(sdpa(q, k, v, return_lse=True, num_threads=2, **kwl))
        for group in (runs, tiled):
            for out, lse in group[1:]:
                assert np.array_equal(out, group[0][0]) and np.array_equal(lse, group[0][1]), L
        o, f = selfattn.scaled_dot_product_attention_vjp(q, k, v, num_threads=1, **kwl)
        d = rng.standard_normal(o.shape).astype(dtype)
        g1 = f(d)
        g3 = selfattn.scaled_dot_product_attention_vjp(q, k, v, num_threads=3, **kwl)[1](d)
        for a, b in zip(g1, g3):
            assert np.array_equal(a, b)


def _core_sched(k, v, dtype, kw, **over):
    q = np.zeros((2, 4, k.shape[2], k.shape[3]), dtype)
    return selfattn._core.sdpa(q, k, v, schedule_only=True, num_threads=2, **dict(kw, **over))


def test_sink_tokens_varlen_kvcache_dask_and_weights():
    rng = np.random.default_rng(25)
    kw = dict(is_causal=True, window_size=(20, 0), num_sink_tokens=3, alignment="bottom_right")
    # varlen
    cu_q, cu_k = np.array([0, 5, 45]), np.array([0, 100, 240])
    q, k, v = rng.standard_normal((4, 45, 16)), rng.standard_normal((2, 240, 16)), rng.standard_normal((2, 240, 8))
    got = selfattn.varlen_attention(q, k, v, cu_q, cu_k, enable_gqa=True, **kw)
    want = reference.varlen_attention(q, k, v, cu_q, cu_k, enable_gqa=True, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # KVCache
    cache = selfattn.KVCache(batch=2, num_kv_heads=2, head_dim=16, max_len=400, dtype=np.float64)
    kk, vv = rng.standard_normal((2, 2, 300, 16)), rng.standard_normal((2, 2, 300, 16))
    cache.append(kk, vv)
    qq = rng.standard_normal((2, 4, 2, 16))
    got = cache.attend(qq, window_size=(20, 0), num_sink_tokens=3)
    want = reference.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # attention_weights
    w = selfattn.attention_weights(qq, kk, enable_gqa=True, **kw)
    np.testing.assert_allclose(w, reference.attention_weights(qq, kk, enable_gqa=True, **kw), rtol=1e-12, atol=1e-15)
    assert (w[..., 3:277] == 0).all() and (w[..., :3] > 0).all()
    # Dask: key chunks before, across and after the sink tokens
    da = optional_import("dask.array")
    import selfattn.dask as sd
    q2 = rng.standard_normal((1, 4, 60, 16))
    k2, v2 = rng.standard_normal((1, 2, 90, 16)), rng.standard_normal((1, 2, 90, 8))
    for ns, chunk in ((3, 2), (3, 7), (25, 10), (0, 10)):
        kw2 = dict(is_causal=True, window_size=(6, 0), num_sink_tokens=ns, alignment="bottom_right", enable_gqa=True)
        got = sd.scaled_dot_product_attention(da.from_array(q2, chunks=(1, 2, 13, 16)),
                                              da.from_array(k2, chunks=(1, 1, chunk, 16)),
                                              da.from_array(v2, chunks=(1, 1, chunk, 8)), return_lse=True, **kw2)
        want = sdpa(q2, k2, v2, return_lse=True, **kw2)
        np.testing.assert_allclose(got[0].compute(), want[0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got[1].compute(), want[1], rtol=1e-12, atol=1e-12)


def test_sink_tokens_without_a_left_bound_change_nothing():
    rng = np.random.default_rng(26)
    q, k, v = (rng.standard_normal((1, 2, 70, 16)) for _ in range(3))
    for kw in (dict(is_causal=True), dict(window_size=(None, 4)), {}):
        assert np.array_equal(sdpa(q, k, v, num_sink_tokens=5, **kw), sdpa(q, k, v, **kw))


@pytest.mark.parametrize("bad,exc,msg", [
    (-1, ValueError, "num_sink_tokens must be >= 0, got -1"),
    (2.0, TypeError, "num_sink_tokens must be an int >= 0, got float"),
    (True, TypeError, "num_sink_tokens must be an int >= 0, got bool"),
    ("4", TypeError, "num_sink_tokens must be an int >= 0, got str"),
])
def test_bad_sink_tokens_are_clear_errors(bad, exc, msg):
    q = np.zeros((1, 4, 2, 8), np.float32)
    with pytest.raises(exc, match=msg):
        sdpa(q, q, q, window_size=(3, 0), num_sink_tokens=bad)
    with pytest.raises(exc, match=msg):
        selfattn.attention_weights(q, q, window_size=(3, 0), num_sink_tokens=bad)
    with pytest.raises(exc, match=msg):
        reference.scaled_dot_product_attention(q, q, q, window_size=(3, 0), num_sink_tokens=bad)
