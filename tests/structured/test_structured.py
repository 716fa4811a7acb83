"""Structured attention in the kernel (window, alignment, key_lengths, ALiBi, softcap, attn_mask with
is_causal, varlen) against selfattn.reference, on every path, over each path's tile edges.

Also the promises that are not about values: key blocks that no query sees are not read (NaN planted
beyond key_lengths and outside every window leaves the output bit-identical), results do not depend
on the thread count, and windows make the kernel skip work (its schedule and its reads).
"""

import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import selfattn
from selfattn import _core, reference
from sa_testutil import (DTYPES, ISAS, assert_sdpa_close, assert_unchanged, edge, examples, forced_schedule,
                         logit_magnitude, snapshot, vmax_of)

sdpa = selfattn.scaled_dot_product_attention
ALIGNMENTS = ("top_left", "bottom_right")
SCHEDULES = ("shared", "fused", "banded")


def _check(q, k, v, kw, dtype, ctx="", isas=None):
    """Kernel on the given paths (default: every one) == reference (out and lse), inputs untouched."""
    ref, ref_lse = reference.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    mag = logit_magnitude(q, k, kw.get("scale"), kw.get("attn_mask"))   # softcap only shrinks it
    if kw.get("alibi_slopes") is not None:
        mag += float(np.max(np.abs(kw["alibi_slopes"]), initial=0.0)) * (q.shape[-2] + k.shape[-2])
    snaps = snapshot(q, k, v, kw.get("attn_mask"))
    for isa in (ISAS if isas is None else isas):
        with selfattn.use_isa(isa):
            out, lse = sdpa(q, k, v, return_lse=True, **kw)
        assert_sdpa_close(out, ref, dtype, vmax_of(v), mag, lse, ref_lse, ctx=f"{ctx}[isa={isa}] ")
    assert_unchanged((q, k, v, kw.get("attn_mask")), snaps, ctx)


@st.composite
def structured_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    isa = draw(st.sampled_from(ISAS))
    edges_L = ("1", "mr+1", "bq-1", "bq", "bq+1", "2*bq+1")
    edges_S = ("1", "nr+1", "bk-1", "bk", "bk+1", "2*bk+1", "3*bk+5")
    L = edge(isa, dtype, draw(st.sampled_from(edges_L)))
    S = edge(isa, dtype, draw(st.sampled_from(edges_S)))
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    group = draw(st.integers(1, 2))
    kw = {}
    if group > 1:
        kw["enable_gqa"] = True
    side = st.one_of(st.none(), st.integers(0, 3), st.sampled_from([0, 1, 5, 17, 40, 130, 300, 1000]))
    if draw(st.booleans()):
        w = draw(st.one_of(st.integers(0, 300), st.tuples(side, side)))
        kw["window_size"] = w
    kw["alignment"] = draw(st.sampled_from(ALIGNMENTS))
    kw["is_causal"] = draw(st.booleans())
    if draw(st.booleans()):
        kl = draw(st.lists(st.one_of(st.just(0), st.just(S), st.integers(0, S)), min_size=B, max_size=B))
        kw["key_lengths"] = np.array(kl) if B > 1 else np.array(kl[0])
    if draw(st.booleans()):
        kw["alibi_slopes"] = draw(st.sampled_from([0.0, 0.0625, 0.5, 2.0])) * (np.arange(1, H * group + 1) / (H * group))
    if draw(st.booleans()):
        kw["softcap"] = draw(st.sampled_from([0.5, 5.0, 30.0]))
    mask = draw(st.sampled_from([None, None, "bool", "float"]))
    seed = draw(st.integers(0, 2**32 - 1))
    amp = draw(st.sampled_from([1.0, 3.0]))
    return dict(dtype=dtype, L=L, S=S, B=B, H=H, group=group, kw=kw, mask=mask, seed=seed, amp=amp,
                threads=draw(st.sampled_from([1, 2, None])), schedule=draw(st.sampled_from((None,) + SCHEDULES)))


@settings(max_examples=examples(80), deadline=None)
@given(c=structured_cases())
def test_every_option_and_combination_matches_reference(c):
    note(repr(c))
    rng = np.random.default_rng(c["seed"])
    B, H, g, L, S, dt = c["B"], c["H"], c["group"], c["L"], c["S"], c["dtype"]
    q = (c["amp"] * rng.standard_normal((B, H * g, L, 16))).astype(dt)
    k = (c["amp"] * rng.standard_normal((B, H, S, 16))).astype(dt)
    v = rng.standard_normal((B, H, S, 7)).astype(dt)
    kw = dict(c["kw"], num_threads=c["threads"])
    if c["mask"] == "bool":
        kw["attn_mask"] = rng.random((L, S)) < 0.8
    elif c["mask"] == "float":
        kw["attn_mask"] = np.where(rng.random((L, S)) < 0.8, rng.standard_normal((L, S)), -np.inf).astype(dt)
    kw_ref = {k_: v_ for k_, v_ in kw.items() if k_ != "num_threads"}
    ref, ref_lse = reference.scaled_dot_product_attention(q, k, v, return_lse=True, **kw_ref)
    mag = logit_magnitude(q, k, None, kw.get("attn_mask"))      # softcap only shrinks it
    if kw.get("alibi_slopes") is not None:
        mag += float(np.max(kw["alibi_slopes"], initial=0.0)) * (L + S)
    for isa in ISAS:
        with selfattn.use_isa(isa), forced_schedule(c["schedule"]):
            out, lse = sdpa(q, k, v, return_lse=True, **kw)
        assert_sdpa_close(out, ref, dt, vmax_of(v), mag, lse, ref_lse, ctx=f"[isa={isa}] ")


# ---------------------------------------------------------------- deterministic corners

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("window", [0, "mr", "bk-1", "bk+1", (None, 3), (5, None), (0, "bk"), "2*bk+50000"])
@pytest.mark.parametrize("LS", [("bq+1", "bk+1"), ("1", "2*bk+1"), ("2*bq+1", "bq-1")])
def test_windows_narrower_than_a_tile_and_wider_than_S(isa, dtype, alignment, window, LS):
    L, S = (edge(isa, dtype, x) for x in LS)
    side = lambda w: w if w is None or isinstance(w, int) else edge(isa, dtype, w, at_least=0)  # noqa: E731
    win = tuple(side(w) for w in window) if isinstance(window, tuple) else side(window)
    rng = np.random.default_rng(L * 7 + S)
    q = rng.standard_normal((2, L, 12)).astype(dtype)
    k = rng.standard_normal((2, S, 12)).astype(dtype)
    v = rng.standard_normal((2, S, 5)).astype(dtype)
    for causal in (False, True):
        _check(q, k, v, dict(window_size=win, alignment=alignment, is_causal=causal), dtype,
               ctx=f"L={L} S={S} window={win} causal={causal} ", isas=(isa,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_key_lengths_zero_and_S_and_between(isa, dtype, alignment):
    S = edge(isa, dtype, "2*bk+3")
    L = edge(isa, dtype, "bq+2")
    rng = np.random.default_rng(3)
    q = rng.standard_normal((5, 2, L, 8)).astype(dtype)
    k = rng.standard_normal((5, 2, S, 8)).astype(dtype)
    v = rng.standard_normal((5, 2, S, 4)).astype(dtype)
    kl = np.array([0, S, 1, edge(isa, dtype, "bk"), edge(isa, dtype, "bk+1")])
    for causal in (False, True):
        _check(q, k, v, dict(key_lengths=kl, alignment=alignment, is_causal=causal), dtype, isas=(isa,))
    out, lse = sdpa(q, k, v, key_lengths=kl, return_lse=True)
    assert not out[0].any() and np.all(lse[0] == -np.inf), "key_lengths=0: zeros and lse = -inf"


@pytest.mark.parametrize("dtype", DTYPES)
def test_everything_at_once_with_gqa_and_broadcasting(isa, dtype):
    rng = np.random.default_rng(11)
    L, S = edge(isa, dtype, "bq+3"), edge(isa, dtype, "2*bk+7")
    q = rng.standard_normal((3, 4, L, 16)).astype(dtype)
    k = rng.standard_normal((3, 2, S, 16)).astype(dtype)
    v = rng.standard_normal((1, 2, S, 9)).astype(dtype)            # broadcast over batch
    mask = rng.random((4, 1, S)) < 0.85                            # per head, every row
    kw = dict(attn_mask=mask, is_causal=True, window_size=(40, 7), alignment="bottom_right",
              key_lengths=np.array([S, S - 50, 3]), alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]),
              softcap=20.0, enable_gqa=True)
    _check(q, k, v, kw, dtype, isas=(isa,))
    fmask = np.where(rng.random((L, S)) < 0.85, rng.standard_normal((L, S)), -np.inf).astype(dtype)
    _check(q, k, v, dict(kw, attn_mask=fmask), dtype, isas=(isa,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_closed_form_and_huge_logits(isa, dtype):
    # two keys with logits +-1e4: capped at +-c, weights softmax([c, -c])
    c = 3.0
    q = np.ones((1, 1), dtype=dtype)
    k = np.array([[1e4], [-1e4]], dtype=dtype)
    v = np.eye(2, dtype=dtype)
    out, lse = sdpa(q, k, v, scale=1.0, softcap=c, return_lse=True)
    w = np.exp([c, -c]) / np.exp([c, -c]).sum()
    np.testing.assert_allclose(out[0], w, rtol=0, atol=1e-6 if dtype == np.float32 else 1e-14)
    np.testing.assert_allclose(lse[0], np.log(np.exp([c, -c]).sum()), rtol=0, atol=1e-6 if dtype == np.float32 else 1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
def test_alibi_closed_form(isa, dtype):
    # equal logits: weights proportional to exp(-slope |p - j|)
    L, S, slope = 5, 9, 0.7
    q = np.zeros((L, 3), dtype=dtype)
    k = np.zeros((S, 3), dtype=dtype)
    v = np.eye(S, dtype=dtype)
    for alignment, off in (("top_left", 0), ("bottom_right", S - L)):
        out = sdpa(q, k, v, alibi_slopes=slope, alignment=alignment)
        p = np.arange(L)[:, None] + off
        w = np.exp(-slope * np.abs(p - np.arange(S)[None, :]))
        np.testing.assert_allclose(out, w / w.sum(1, keepdims=True), rtol=0,
                                   atol=1e-6 if dtype == np.float32 else 1e-14, err_msg=alignment)


# ---------------------------------------------------------------- skipped blocks are not read

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_nan_beyond_key_lengths_and_outside_every_window_is_not_read(isa, dtype, schedule):
    """NaN/Inf planted where no query may look leaves the output bit-identical (every schedule:
    packing shared by the threads, fused into each task, or banded: each task packs its window)."""
    rng = np.random.default_rng(5)
    bk = edge(isa, dtype, "bk")
    L, S = edge(isa, dtype, "bq+5"), 6 * bk + 11
    B, H = (1, 3) if schedule == "shared" else (8, 1)   # 3 or 8 distinct K/V at 1 thread
    q = rng.standard_normal((B, H, L, 8)).astype(dtype)
    k = rng.standard_normal((B, H, S, 8)).astype(dtype)
    v = rng.standard_normal((B, H, S, 4)).astype(dtype)
    kl = np.resize(np.array([S - 2 * bk - 3, 4 * bk + 1, L + 3, S]), B)
    kw = dict(key_lengths=kl, window_size=(bk + 9, 0), alignment="bottom_right", is_causal=True, num_threads=1)
    with forced_schedule(schedule):
        sched = _core.sdpa(q, k, v, schedule_only=True, **kw)
        clean = sdpa(q, k, v, return_lse=True, **kw)
    assert (sched["fused"], sched["banded"]) == (schedule == "fused", schedule == "banded"), sched
    # no query of batch b sees a key before S_b - L - (bk + 9), nor one at or after S_b
    kp, vp = k.copy(), v.copy()
    for b, sb in enumerate(kl):
        first = sb - L - (bk + 9)
        for a, val in ((kp, np.nan), (vp, np.inf)):
            a[b, :, sb:] = val
            a[b, :, :max(first, 0)] = val
    with forced_schedule(schedule):
        dirty = sdpa(q, kp, vp, return_lse=True, **kw)
    for x, y in zip(clean, dirty):
        assert np.array_equal(x, y) and np.isfinite(x).all(), "a key no query may see was read"
    kw.pop("num_threads")
    ref = reference.scaled_dot_product_attention(q, k, v, **kw)
    assert_sdpa_close(clean[0], ref, dtype, vmax_of(v), logit_magnitude(q, k))


@pytest.mark.parametrize("dtype", DTYPES)
def test_schedules_agree_bit_for_bit(isa, dtype):
    """Shared, fused and banded schedules differ only in where and when K/V blocks are packed:
    every tile computes the same sums in the same order, so the results are identical, and the
    automatic choice takes the banded one for a narrow window over a long sequence."""
    rng = np.random.default_rng(17)
    bk = edge(isa, dtype, "bk")
    L, S = edge(isa, dtype, "3*bq+7"), 9 * bk + 3
    q = rng.standard_normal((2, 4, L, 24)).astype(dtype)
    k = rng.standard_normal((2, 2, S, 24)).astype(dtype)
    v = rng.standard_normal((2, 2, S, 9)).astype(dtype)
    cases = [dict(is_causal=True, window_size=(bk + 3, 0)),
             dict(window_size=(5, bk // 2), alignment="bottom_right", key_lengths=np.array([S, S - bk - 1])),
             dict(is_causal=True, window_size=(2 * bk, 7), alibi_slopes=np.array([0.5, 0.25, 0.1, 0.0]),
                  softcap=20.0, attn_mask=rng.random((L, S)) < 0.9)]
    for kw in cases:
        kw.update(enable_gqa=True, num_threads=2)
        assert _core.sdpa(q, k, v, schedule_only=True, **kw)["banded"], kw
        runs = {}
        for name in SCHEDULES:
            with selfattn.use_isa(isa), forced_schedule(name):
                runs[name] = sdpa(q, k, v, return_lse=True, **kw)
        for name in SCHEDULES[1:]:
            for x, y in zip(runs[name], runs["shared"]):
                assert np.array_equal(x, y), (name, kw)
        kw_ref = {k_: v_ for k_, v_ in kw.items() if k_ != "num_threads"}
        ref = reference.scaled_dot_product_attention(q, k, v, **kw_ref)
        assert_sdpa_close(runs["banded"][0], ref, dtype, vmax_of(v), logit_magnitude(q, k) + 3 * S)


def test_windows_skip_work_in_the_schedule():
    """A causal window keeps every query tile to O(window) keys: packed blocks and results agree with a
    dense bool mask, and the windowed call reads only its keys (NaN elsewhere, same bits)."""
    rng = np.random.default_rng(9)
    L = S = 1024
    q, k, v = (rng.standard_normal((1, 2, L, 16)).astype(np.float32) for _ in range(3))
    kw = dict(is_causal=True, window_size=(64, 0))
    out = sdpa(q, k, v, **kw)
    i, j = np.arange(L)[:, None], np.arange(S)[None, :]
    dense = (j <= i) & (j >= i - 64)
    np.testing.assert_allclose(out, sdpa(q, k, v, attn_mask=dense), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- threads

@pytest.mark.parametrize("dtype", DTYPES)
def test_structured_results_do_not_depend_on_threads(isa, dtype):
    rng = np.random.default_rng(21)
    q = rng.standard_normal((2, 4, 200, 16)).astype(dtype)
    k = rng.standard_normal((2, 2, 333, 16)).astype(dtype)
    v = rng.standard_normal((2, 2, 333, 8)).astype(dtype)
    kw = dict(enable_gqa=True, is_causal=True, window_size=(50, 3), alignment="bottom_right",
              key_lengths=np.array([333, 250]), alibi_slopes=np.array([1.0, 0.5, 0.25, 0.125]), softcap=15.0)
    sched = _core.sdpa(q, k, v, num_threads=3, schedule_only=True, **kw)
    if selfattn.config()["openmp"]:
        assert sched["threads"] == 3 and sched["compute_tasks"] > 3, sched
    runs = [sdpa(q, k, v, return_lse=True, num_threads=t, **kw) for t in (1, 2, 3, None)]
    for out, lse in runs[1:]:
        assert np.array_equal(out, runs[0][0]) and np.array_equal(lse, runs[0][1])
    # varlen too
    cu_q, cu_k = np.array([0, 70, 70, 200]), np.array([0, 100, 130, 333])
    qv, kv, vv = q[0], k[0], v[0]
    vr = [selfattn.varlen_attention(qv, kv, vv, cu_q, cu_k, is_causal=True, alignment="bottom_right",
                                    enable_gqa=True, return_lse=True, num_threads=t) for t in (1, 2, 3)]
    for out, lse in vr[1:]:
        assert np.array_equal(out, vr[0][0]) and np.array_equal(lse, vr[0][1])


# ---------------------------------------------------------------- varlen

@st.composite
def varlen_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    B = draw(st.integers(1, 5))
    lens = st.one_of(st.just(0), st.integers(1, 5), st.sampled_from([63, 64, 65, 127, 128, 129, 200]))
    Lb = [draw(lens) for _ in range(B)]
    Sb = Lb if draw(st.booleans()) else [draw(lens) for _ in range(B)]
    H, g = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    kw = dict(is_causal=draw(st.booleans()), alignment=draw(st.sampled_from(ALIGNMENTS)), enable_gqa=g > 1)
    if draw(st.booleans()):
        kw["window_size"] = (draw(st.integers(0, 70)), draw(st.one_of(st.none(), st.integers(0, 70))))
    if draw(st.booleans()):
        kw["alibi_slopes"] = np.linspace(0.1, 1.0, H * g)
    if draw(st.booleans()):
        kw["softcap"] = 10.0
    return dtype, Lb, Sb, H, g, kw, draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from(ISAS))


@settings(max_examples=examples(40), deadline=None)
@given(c=varlen_cases())
def test_varlen_equals_per_sequence_calls(c):
    dtype, Lb, Sb, H, g, kw, seed, isa = c
    note(repr(c))
    rng = np.random.default_rng(seed)
    cq, ck = np.concatenate([[0], np.cumsum(Lb)]), np.concatenate([[0], np.cumsum(Sb)])
    # a (total, H, E) projection output, swapped to (H, total, E): a view, read in place
    q = np.swapaxes(rng.standard_normal((cq[-1], H * g, 8)).astype(dtype), 0, 1)
    k = np.swapaxes(rng.standard_normal((ck[-1], H, 8)).astype(dtype), 0, 1)
    v = np.swapaxes(rng.standard_normal((ck[-1], H, 3)).astype(dtype), 0, 1)
    with selfattn.use_isa(isa):
        out, lse = selfattn.varlen_attention(q, k, v, cq, ck, return_lse=True, **kw)
    assert out.shape == (H * g, cq[-1], 3) and lse.shape == (H * g, cq[-1])
    for b in range(len(Lb)):
        qs, ks, vs = q[:, cq[b]:cq[b + 1]], k[:, ck[b]:ck[b + 1]], v[:, ck[b]:ck[b + 1]]
        with selfattn.use_isa(isa):
            o1, l1 = sdpa(qs, ks, vs, return_lse=True, **kw)
        ref, ref_lse = reference.scaled_dot_product_attention(qs, ks, vs, return_lse=True, **kw)
        mag = logit_magnitude(qs, ks) + (float(np.max(kw["alibi_slopes"])) * (Lb[b] + Sb[b])
                                         if "alibi_slopes" in kw else 0.0)
        assert_sdpa_close(out[:, cq[b]:cq[b + 1]], ref, dtype, vmax_of(vs), mag, lse[:, cq[b]:cq[b + 1]], ref_lse,
                          ctx=f"[isa={isa}] sequence {b}: ")
        np.testing.assert_allclose(out[:, cq[b]:cq[b + 1]], o1, rtol=0, atol=1e-5 if dtype == np.float32 else 1e-12)


VARLEN_MISUSE = [
    (dict(cu_seqlens_q=[1, 5]), ValueError, r"cu_seqlens_q must start at 0"),
    (dict(cu_seqlens_q=[0, 3, 2, 5]), ValueError, r"cu_seqlens_q must be non-decreasing"),
    (dict(cu_seqlens_q=[0, 4]), ValueError, r"cu_seqlens_q must end at the total number of rows 5, got 4"),
    (dict(cu_seqlens_k=[0, 2, 7]), ValueError, r"cu_seqlens_q \(1 sequences\) and cu_seqlens_k \(2\) must describe"),
    (dict(cu_seqlens_q=[0.0, 5.0]), TypeError, r"cu_seqlens_q must be a 1-D integer array, got dtype float64"),
    (dict(cu_seqlens_k=[[0, 7]]), TypeError, r"cu_seqlens_k must be a 1-D integer array, got shape \(1, 2\)"),
    (dict(query=np.zeros((5, 8))), ValueError, r"varlen_attention: query must be 3-D \(Hq, total_q, E\)"),
    (dict(key=np.zeros((3, 7, 8)), value=np.zeros((3, 7, 4))), ValueError, r"query has 2 heads and key/value 3"),
    (dict(window_size=-2), ValueError, r"window_size must be >= 0"),
    (dict(alibi_slopes=np.ones(3)), ValueError, r"alibi_slopes of shape \(3,\) does not broadcast to \(..., Hq\) = \(2,\)"),
]


@pytest.mark.parametrize("bad,exc,msg", VARLEN_MISUSE)
def test_varlen_misuse(bad, exc, msg):
    args = dict(query=np.zeros((2, 5, 8)), key=np.zeros((2, 7, 8)), value=np.zeros((2, 7, 4)),
                cu_seqlens_q=[0, 5], cu_seqlens_k=[0, 7])
    args.update(bad)
    with pytest.raises(exc, match=msg):
        selfattn.varlen_attention(**args)


# ---- query_offsets: a block of a longer problem keeps its rows' positions (selfattn.dask's blocks)

BLOCK_CASES = [
    dict(is_causal=True),
    dict(is_causal=True, alignment="bottom_right", key_lengths=[70, 45]),
    dict(window_size=(9, 4)),
    dict(window_size=(None, 0), alibi_slopes=[[0.5, 0.25, 0.125]]),
    dict(is_causal=True, alibi_slopes=[[0.3, 0.2, 0.1]], softcap=5.0, alignment="bottom_right"),
]


def _block_of(kw, L, S, l0, l1, s0, s1):
    """The engine's arguments for block rows [l0, l1) x keys [s0, s1) of the full problem `kw`."""
    S_b = np.broadcast_to(np.asarray(kw.get("key_lengths", S), dtype=np.int64), (2,))
    D = l0 - s0 + (S_b - L if kw.get("alignment") == "bottom_right" else 0)
    left, right = (None, None)
    w = kw.get("window_size")
    if w is not None:
        left, right = w
    if kw.get("is_causal"):
        right = 0
    bk = {n: kw[n] for n in ("alibi_slopes", "softcap") if n in kw}
    window = None if left is None and right is None else (left, right)
    return dict(bk, window_size=window, key_lengths=np.clip(S_b - s0, 0, s1 - s0), query_offsets=D)


@pytest.mark.parametrize("schedule", [None, "shared", "fused", "banded", "decode"])
@pytest.mark.parametrize("case", range(len(BLOCK_CASES)))
def test_query_offsets_place_a_block_at_its_positions(isa, schedule, case):
    """_core.sdpa(query_offsets=d) on block rows [l0, l1) x keys [s0, s1) equals the full problem's
    rows l0..l1 restricted to those keys (the reference, a bool mask cutting the other keys), out
    and lse, for blocks before, across and after the diagonal (d < 0, d = 0, d > 0), on every path
    and schedule; the backward of the block equals the reference VJP of the same restriction."""
    kw = BLOCK_CASES[case]
    rng = np.random.default_rng(40 + case)
    L, S, E, Ev = 70, 70, 8, 5
    q = rng.standard_normal((2, 3, L, E))
    k = rng.standard_normal((2, 3, S, E))
    v = rng.standard_normal((2, 3, S, Ev))
    blocks = [(0, 3, 30, 60), (20, 40, 0, 70), (33, 70, 5, 40), (60, 62, 0, 64), (10, 27, 17, 33)]
    for l0, l1, s0, s1 in blocks:
        keep = np.zeros((L, S), bool)
        keep[:, s0:s1] = True
        ref, ref_lse = reference.scaled_dot_product_attention(q, k, v, attn_mask=keep, return_lse=True, **kw)
        bk = _block_of(kw, L, S, l0, l1, s0, s1)
        if schedule == "banded" and bk["window_size"] is None:
            continue
        with forced_schedule(schedule):
            out, lse = _core.sdpa(q[..., l0:l1, :], k[..., s0:s1, :], v[..., s0:s1, :], return_lse=True, **bk)
        ctx = f"block rows {l0}:{l1} keys {s0}:{s1}: "
        np.testing.assert_allclose(out, ref[..., l0:l1, :], rtol=1e-12, atol=1e-12, err_msg=ctx)
        np.testing.assert_allclose(np.nan_to_num(lse, neginf=-1e300), np.nan_to_num(ref_lse[..., l0:l1], neginf=-1e300),
                                   rtol=1e-12, atol=1e-12, err_msg=ctx)
        if schedule not in (None, "decode"):
            continue
        # the backward of the block problem: the reference VJP over the full rows, restricted
        dout = rng.standard_normal(out.shape)
        with forced_schedule(schedule):
            dq, dk, dv = _core.describe(q[..., l0:l1, :], k[..., s0:s1, :], v[..., s0:s1, :],
                                        **bk).backward(out, lse, dout)
        full_dout = np.zeros(q.shape[:-1] + (Ev,))
        full_dout[..., l0:l1, :] = dout
        _, vjp = reference.scaled_dot_product_attention_vjp(q, k, v, attn_mask=keep, **kw)
        rq, rk, rv = vjp(full_dout)
        np.testing.assert_allclose(dq, rq[..., l0:l1, :], rtol=1e-10, atol=1e-10, err_msg=ctx + "dq")
        np.testing.assert_allclose(dk, rk[..., s0:s1, :], rtol=1e-10, atol=1e-10, err_msg=ctx + "dk")
        np.testing.assert_allclose(dv, rv[..., s0:s1, :], rtol=1e-10, atol=1e-10, err_msg=ctx + "dv")


def test_query_offsets_errors():
    q = np.zeros((2, 3, 4, 8))
    with pytest.raises(TypeError, match="query_offsets must be integers, got dtype float64"):
        _core.sdpa(q, q, q, query_offsets=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"query_offsets of shape \(3,\) does not broadcast to the batch dims \(2,\)"):
        _core.sdpa(q, q, q, query_offsets=[1, 2, 3])
