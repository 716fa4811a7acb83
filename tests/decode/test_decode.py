"""The decode path (src_c/attn_decode_body.h): a few query rows per distinct K/V (GQA heads stacked),
nothing packed, K/V read in place once, the keys split into chunks across threads and merged by
log-sum-exp in a fixed order.

Checked here: when it is taken; every option against selfattn.reference on every path, over the
chunk and block edges; results identical for every thread count; keys past key_lengths or outside
the window never read; and agreement with the tiled path (forced) on the same problem.
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


def _schedule(q, k, v, **kw):
    return _core.sdpa(q, k, v, schedule_only=True, **kw)


def test_decode_path_is_taken_for_few_rows_per_kv():
    z = np.zeros
    f32 = np.float32
    # one new token, B4 H16
    assert _schedule(z((4, 16, 1, 64), f32), z((4, 16, 2048, 64), f32), z((4, 16, 2048, 64), f32))["decode"]
    # GQA: 4 query heads per kv head, 4 new tokens -> 16 stacked rows
    s = _schedule(z((1, 32, 4, 128), f32), z((1, 8, 4096, 128), f32), z((1, 8, 4096, 128), f32), enable_gqa=True)
    assert s["decode"] and s["compute_tasks"] >= 8, s
    # 17 stacked rows, or a prefill: the tiled path
    assert not _schedule(z((1, 1, 17, 64), f32), z((1, 1, 512, 64), f32), z((1, 1, 512, 64), f32))["decode"]
    assert not _schedule(z((1, 32, 1, 64), f32), z((1, 1, 512, 64), f32), z((1, 1, 512, 64), f32),
                         enable_gqa=True)["decode"]      # 32 query heads on one kv head
    assert not _schedule(z((2, 8, 128, 64), f32), z((2, 8, 128, 64), f32), z((2, 8, 128, 64), f32))["decode"]


def test_sixteen_stacked_rows_fit():
    z, f32 = np.zeros, np.float32
    assert _schedule(z((1, 16, 1, 64), f32), z((1, 1, 512, 64), f32), z((1, 1, 512, 64), f32),
                     enable_gqa=True)["decode"]


@st.composite
def decode_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    isa = draw(st.sampled_from(ISAS))
    L = draw(st.sampled_from([1, 1, 2, 3, 4]))
    group = draw(st.sampled_from([1, 2, 3, 4, 5]))       # stacked rows: whole fours and 1-3 left
    if L * group > 16:
        group = 1
    S = draw(st.sampled_from([1, 5, edge(isa, dtype, "bk-1"), edge(isa, dtype, "bk+1"), 255, 256, 257,
                              edge(isa, dtype, "3*bk+5"), 1100, 2600]))
    B, H = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    E = draw(st.sampled_from([1, 7, 16, 33, 64]))
    Ev = draw(st.sampled_from([1, 5, 16, 64, 72]))
    kw = {"enable_gqa": group > 1}
    side = st.one_of(st.none(), st.integers(0, 3), st.sampled_from([0, 5, 130, 300, 1000]))
    if draw(st.booleans()):
        kw["window_size"] = draw(st.one_of(st.integers(0, 600), st.tuples(side, side)))
    kw["alignment"] = draw(st.sampled_from(["top_left", "bottom_right", "bottom_right"]))
    kw["is_causal"] = draw(st.booleans())
    if draw(st.booleans()):
        kl = draw(st.lists(st.one_of(st.just(0), st.just(S), st.integers(0, S)), min_size=B, max_size=B))
        kw["key_lengths"] = np.array(kl)
    if draw(st.booleans()):
        kw["alibi_slopes"] = draw(st.sampled_from([0.0, 0.0625, 0.5])) * np.arange(1, H * group + 1) / (H * group)
    if draw(st.booleans()):
        kw["softcap"] = draw(st.sampled_from([0.5, 5.0, 30.0]))
    mask = draw(st.sampled_from([None, None, "bool", "float"]))
    return dict(dtype=dtype, isa=isa, L=L, S=S, B=B, H=H, group=group, E=E, Ev=Ev, kw=kw, mask=mask,
                seed=draw(st.integers(0, 2**32 - 1)), threads=draw(st.sampled_from([1, 2, 3, None])))


@settings(max_examples=examples(80), deadline=None)
@given(c=decode_cases())
def test_decode_every_option_matches_reference(c):
    note(repr(c))
    rng = np.random.default_rng(c["seed"])
    B, H, g, L, S, dt = c["B"], c["H"], c["group"], c["L"], c["S"], c["dtype"]
    q = rng.standard_normal((B, H * g, L, c["E"])).astype(dt)
    k = rng.standard_normal((B, H, S, c["E"])).astype(dt)
    v = rng.standard_normal((B, H, S, c["Ev"])).astype(dt)
    kw = dict(c["kw"])
    if c["mask"] == "bool":
        kw["attn_mask"] = rng.random((L, S)) < 0.8
    elif c["mask"] == "float":
        kw["attn_mask"] = np.where(rng.random((L, S)) < 0.8, rng.standard_normal((L, S)), -np.inf).astype(dt)
    ref, ref_lse = reference.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    mag = logit_magnitude(q, k, None, kw.get("attn_mask"))
    if kw.get("alibi_slopes") is not None:
        mag += float(np.max(kw["alibi_slopes"], initial=0.0)) * (L + S)
    snaps = snapshot(q, k, v, kw.get("attn_mask"))
    with selfattn.use_isa(c["isa"]):
        assert _schedule(q, k, v, num_threads=c["threads"], **kw)["decode"]
        out, lse = sdpa(q, k, v, return_lse=True, num_threads=c["threads"], **kw)
    assert_sdpa_close(out, ref, dt, vmax_of(v), mag, lse, ref_lse, ctx=f"[isa={c['isa']}] ")
    assert_unchanged((q, k, v, kw.get("attn_mask")), snaps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_results_do_not_depend_on_threads(isa, dtype):
    """Split-KV with a fixed chunking (from the shapes only) and a fixed merge order: the same bits
    for 1, 2, 3 threads and the default."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 8, 2, 64)).astype(dtype)
    k = rng.standard_normal((2, 2, 5000, 64)).astype(dtype)
    v = rng.standard_normal((2, 2, 5000, 48)).astype(dtype)
    kw = dict(enable_gqa=True, is_causal=True, alignment="bottom_right", key_lengths=np.array([5000, 3111]),
              alibi_slopes=np.linspace(0.01, 0.1, 8), softcap=30.0)
    with selfattn.use_isa(isa):
        sched = _schedule(q, k, v, num_threads=3, **kw)
        assert sched["decode"] and sched["compute_tasks"] > 3, sched
        runs = [sdpa(q, k, v, return_lse=True, num_threads=t, **kw) for t in (1, 2, 3, None)]
    for out, lse in runs[1:]:
        assert np.array_equal(out, runs[0][0]) and np.array_equal(lse, runs[0][1])
    ref = reference.scaled_dot_product_attention(q, k, v, **kw)
    assert_sdpa_close(runs[0][0], ref, dtype, vmax_of(v), logit_magnitude(q, k))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_stacked_row_count(isa, dtype):
    """1 to 16 rows on one K/V (GQA groups, times 1 or 2 new tokens whose causal ranges differ by a
    key, a window cutting both ends): the decode reads K and V for up to four rows at a time, then
    the 1-3 rows left together; every count against the reference, every thread count the same bits."""
    rng = np.random.default_rng(21)
    S = 700
    for L in (1, 2):
        for group in range(1, 16 // L + 1):
            q = rng.standard_normal((2, group, L, 64)).astype(dtype)
            k = rng.standard_normal((2, 1, S, 64)).astype(dtype)
            v = rng.standard_normal((2, 1, S, 40)).astype(dtype)
            kw = dict(enable_gqa=True, is_causal=True, alignment="bottom_right", window_size=(300, 0),
                      key_lengths=np.array([S, 433]))
            ctx = f"[isa={isa} rows={group * L} L={L}] "
            with selfattn.use_isa(isa):
                assert _schedule(q, k, v, **kw)["decode"], ctx
                runs = [sdpa(q, k, v, return_lse=True, num_threads=t, **kw) for t in (1, 2, 3)]
            for out, lse in runs[1:]:
                assert np.array_equal(out, runs[0][0]) and np.array_equal(lse, runs[0][1]), ctx
            ref, ref_lse = reference.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
            assert_sdpa_close(runs[0][0], ref, dtype, vmax_of(v), logit_magnitude(q, k), runs[0][1], ref_lse, ctx=ctx)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_never_reads_keys_no_query_sees(isa, dtype):
    """NaN/Inf planted past key_lengths and before every row's window leaves the bits unchanged."""
    rng = np.random.default_rng(8)
    S, w = 3000, 700
    q = rng.standard_normal((3, 4, 2, 32)).astype(dtype)
    k = rng.standard_normal((3, 2, S, 32)).astype(dtype)
    v = rng.standard_normal((3, 2, S, 16)).astype(dtype)
    kl = np.array([S, 1500, 2])
    kw = dict(enable_gqa=True, is_causal=True, alignment="bottom_right", key_lengths=kl, window_size=(w, 0))
    with selfattn.use_isa(isa):
        clean = sdpa(q, k, v, return_lse=True, **kw)
        kp, vp = k.copy(), v.copy()
        for b, sb in enumerate(kl):
            first = sb - 2 - w                               # the first row's first key
            for a, val in ((kp, np.nan), (vp, np.inf)):
                a[b, :, sb:] = val
                a[b, :, :max(first, 0)] = val
        dirty = sdpa(q, kp, vp, return_lse=True, **kw)
    for x, y in zip(clean, dirty):
        assert np.array_equal(x, y) and np.isfinite(x).all(), "a key no query may see was read"


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_agrees_with_the_tiled_path(isa, dtype):
    rng = np.random.default_rng(11)
    q = rng.standard_normal((1, 16, 1, 128)).astype(dtype)
    k = rng.standard_normal((1, 4, 4100, 128)).astype(dtype)
    v = rng.standard_normal((1, 4, 4100, 128)).astype(dtype)
    with selfattn.use_isa(isa):
        with forced_schedule("decode"):
            a = sdpa(q, k, v, enable_gqa=True, return_lse=True)
        with forced_schedule("shared"):
            b = sdpa(q, k, v, enable_gqa=True, return_lse=True)
    tol = 2e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(a[0], b[0], rtol=0, atol=tol)
    np.testing.assert_allclose(a[1], b[1], rtol=0, atol=tol * 10)


def test_fully_masked_rows_give_zeros_and_minus_inf():
    q = np.ones((2, 1, 3, 8), np.float32)
    k = np.ones((2, 1, 600, 8), np.float32)
    v = np.ones((2, 1, 600, 4), np.float32)
    out, lse = sdpa(q, k, v, key_lengths=np.array([0, 600]), return_lse=True, is_causal=True,
                    alignment="bottom_right")
    assert np.array_equal(out[0], np.zeros((1, 3, 4), np.float32)) and np.all(lse[0] == -np.inf)
    np.testing.assert_allclose(out[1], 1.0, rtol=1e-6)
