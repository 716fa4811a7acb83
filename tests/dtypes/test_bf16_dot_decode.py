"""The avx512bf16 path's bfloat16 decode: scores on vdpbf16ps (src_c/attn_micro.h, decode_dots_pairs).

The decode schedule (few query rows against long K/V, split-KV, K and V read in place) on this path
computes q.k from the stored bfloat16 pairs of q and of each K row (exact products summed in
float32, times scale * log2(e) afterwards, as the bfloat16 forward does), and P.V from P rounded to
bfloat16 and the V rows of two keys zipped in registers (decode_pv_pairs, as the forward's P.V).
So the error against float64 is bounded as test_bf16_dot.py bounds the forward's, on
every option, K/V paged or dense, through KVCache and paged_attention; any thread count gives the
same bits (the chunking depends on the shapes only), and so does paging (a key's score does not
depend on where its row lies). An odd E or K with strided columns keeps the widening decode:
avx512's bits.
"""

import numpy as np
import pytest

import selfattn
from selfattn import _core
from sa_testutil import AVAILABLE_ISAS, assert_bits, forced_schedule, randn

pytestmark = pytest.mark.skipif("avx512bf16" not in AVAILABLE_ISAS,
                                reason="the avx512bf16 kernels cannot run on this CPU/build (no AVX512_BF16)")


sdpa = selfattn.scaled_dot_product_attention
EPS = 2.0 ** -7     # one bfloat16 ulp at 1.0


def dot(*args, **kw):
    """the avx512bf16 path, the decode schedule forced (it is asserted taken where it is asked for)"""
    with selfattn.use_isa("avx512bf16"), forced_schedule("decode"):
        return sdpa(*args, **kw)


def widening(*args, **kw):
    with selfattn.use_isa("avx512"), forced_schedule("decode"):
        return sdpa(*args, **kw)


def is_decode(q, k, v, **kw):
    return _core.sdpa(q, k, v, schedule_only=True, **kw)["decode"]


def check_bound(out, q, k, v, kw, ctx):
    """|out - ref| <= EPS |ref| + 2^-8 max|v| + 1e-5: the form of test_bf16_dot.py's bound"""
    ref = selfattn.reference.scaled_dot_product_attention(*(a.astype(np.float64) for a in (q, k, v)), **kw)
    vmax = np.abs(np.nan_to_num(v.astype(np.float64))).max()
    err = np.abs(out.astype(np.float64) - ref)
    bound = EPS * np.abs(ref) + 2.0 ** -8 * vmax + 1e-5
    assert (err <= bound).all(), f"{ctx}: worst {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"


def check_lse(q, k, v, kw, lse, ctx):
    """the log-sum-exp is float32's: the widening decode's within float32 rounding, the same -inf"""
    _, lse_widened = widening(q, k, v, return_lse=True, **kw)
    finite = np.isfinite(lse_widened)
    assert np.array_equal(finite, np.isfinite(lse)), ctx
    assert np.array_equal(lse[~finite], lse_widened[~finite]), ctx
    assert np.allclose(lse[finite], lse_widened[finite], rtol=1e-5, atol=1e-5), ctx


OPTIONS = [
    ("plain", {}),
    ("causal_bottom_right", dict(is_causal=True, alignment="bottom_right")),
    ("window", dict(window_size=(21, 0), alignment="bottom_right")),
    ("key_lengths", "key_lengths"),
    ("alibi_softcap", "alibi_softcap"),
    ("bool_mask", "bool"),
    ("float_mask", "float"),
    ("sinks", "sinks"),
    ("sink_tokens", dict(window_size=(40, 0), num_sink_tokens=5, alignment="bottom_right")),
    ("scale", dict(scale=0.05)),
]


def options(kw, rng, B, H, L, S):
    if kw == "key_lengths":
        return dict(key_lengths=rng.integers(0, S + 1, B))
    if kw == "alibi_softcap":
        return dict(alibi_slopes=rng.uniform(0.01, 0.5, H), softcap=4.0)
    if kw in ("bool", "float"):
        keep = rng.random((L, S)) < 0.7
        return dict(attn_mask=keep if kw == "bool" else np.where(keep, rng.standard_normal(keep.shape), -np.inf))
    if kw == "sinks":
        return dict(sinks=rng.standard_normal(H), is_causal=True, alignment="bottom_right")
    return dict(kw)


# (H, Hkv, L, E): stacked rows per kv unit 4, 3 (tiles of 2 + 1), 5 (4 + 1), 6 (4 + 2), 1; E a
# multiple of 32, E/2 words off 16 (masked tail), E = 2 (one word)
SHAPES = [(8, 2, 1, 64), (6, 2, 1, 40), (10, 2, 1, 128), (4, 2, 3, 34), (3, 3, 1, 2), (2, 2, 2, 96)]


@pytest.mark.parametrize("S", [1, 15, 16, 17, 300, 4097])
@pytest.mark.parametrize("name,kw", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_error_bound_every_option(bf16, S, name, kw):
    rng = np.random.default_rng(S * 31 + len(name))
    for (H, Hkv, L, E) in SHAPES:
        if S >= 4097 and E > 64:
            continue                                   # enough: the chunk edges are the point there
        B = 2
        q, k, v = randn(rng, (B, H, L, E), bf16, 2.0), randn(rng, (B, Hkv, S, E), bf16, 2.0), randn(rng, (B, Hkv, S, 24), bf16)
        o = options(kw, rng, B, H, L, S)
        o["enable_gqa"] = True
        assert is_decode(q, k, v, **o), (H, Hkv, L, E, S)
        out, lse = dot(q, k, v, return_lse=True, **o)
        assert out.dtype == bf16 and lse.dtype == np.float32
        ctx = f"{name} S={S} H={H}/{Hkv} L={L} E={E}"
        check_bound(out, q, k, v, o, ctx)
        check_lse(q, k, v, o, lse, ctx)


@pytest.mark.parametrize("Ev", [8, 24, 32, 33, 40, 64, 72, 128, 136])
def test_pv_pairs_every_column_count_and_key_ends(bf16, Ev):
    """P.V on pairs of keys: 32 columns a chunk, 64 a pass (a last chunk short of 32 masked), pairs
    from an even key (a row group whose keys start or end on an odd one reads zeros for the other
    key of the pair, never its row: a NaN there stays out). Within the bound, and near the widening
    decode (which keeps P in float32)."""
    rng = np.random.default_rng(Ev)
    B, H, Hkv, L, S, E = 2, 8, 2, 3, 700, 64
    q, k, v = randn(rng, (B, H, L, E), bf16, 2.0), randn(rng, (B, Hkv, S, E), bf16, 2.0), randn(rng, (B, Hkv, S, Ev), bf16)
    # (options, the keys [lo, hi) some row of batch entry b sees): their ends odd and even
    cases = [(dict(window_size=(20, 0), alignment="bottom_right", key_lengths=[S, 333]),
              lambda n: (max(0, n - L - 20), n)),                  # b 0: keys from 677 (odd)
             (dict(window_size=(5, 2), alignment="top_left", key_lengths=[S - 1, 130]),
              lambda n: (0, min(n, L + 2))),                       # up to key 5 (odd end)
             (dict(is_causal=True, alignment="bottom_right", key_lengths=[1, 2]),
              lambda n: (0, n))]
    for kw, seen in cases:
        o = dict(kw, enable_gqa=True)
        vv = v.copy()
        for b, n in enumerate(kw["key_lengths"]):   # NaN in every V row no row sees
            lo, hi = seen(n)
            vv[b, :, :lo] = np.nan
            vv[b, :, hi:] = np.nan
        out = dot(q, k, vv, **o)
        ctx = f"Ev={Ev} {kw}"
        assert not np.isnan(out.astype(np.float32)).any(), ctx
        check_bound(out, q, k, v, o, ctx)
        wide = widening(q, k, v, **o).astype(np.float32)
        assert np.allclose(out.astype(np.float32), wide, rtol=2.0 ** -6, atol=2.0 ** -7), ctx


@pytest.mark.parametrize("nan_key", [0, 5])
def test_pv_pairs_row_groups_read_only_their_keys(bf16, nan_key):
    """Rows go through P.V four at a time, over the keys those four see, in pairs from an even key.
    8 rows of a top-left window (3, 1): rows 0-3 see keys 0-4 (ending on an odd count: pair (4, 5)),
    rows 4-7 keys 1-8 (starting on an odd key: pair (0, 1)). A NaN in key 0's or key 5's V row is
    NaN for the rows that see that key, and for no other: the other key of an end pair is zeros."""
    rng = np.random.default_rng(nan_key)
    q, k, v = randn(rng, (1, 2, 8, 64), bf16), randn(rng, (1, 2, 300, 64), bf16), randn(rng, (1, 2, 300, 40), bf16)
    v[:, :, nan_key] = np.nan
    kw = dict(window_size=(3, 1), alignment="top_left")
    out = dot(q, k, v, **kw).astype(np.float32)
    want = widening(q, k, v, **kw).astype(np.float32)
    sees = np.array([max(0, i - 3) <= nan_key <= i + 1 for i in range(8)])
    assert np.isnan(want[0, :, sees]).all() and not np.isnan(want[0, :, ~sees]).any()
    assert np.array_equal(np.isnan(out), np.isnan(want)), np.isnan(out).any(-1)


def test_the_scores_are_the_pairs_ones(bf16):
    """The new path runs: its log-sum-exp differs from the widening decode's in some last bits
    (another order of summation), while within float32 rounding of it (check_lse)."""
    rng = np.random.default_rng(4)
    q, k, v = randn(rng, (1, 32, 1, 128), bf16, 2.0), randn(rng, (1, 8, 3000, 128), bf16, 2.0), randn(rng, (1, 8, 3000, 128), bf16)
    _, lse = dot(q, k, v, enable_gqa=True, return_lse=True)
    _, lse_widened = widening(q, k, v, enable_gqa=True, return_lse=True)
    assert not np.array_equal(lse, lse_widened)
    check_lse(q, k, v, dict(enable_gqa=True), lse, "B1 H32/8 E128")


def test_same_bits_any_thread_count(bf16):
    rng = np.random.default_rng(2)
    for (H, Hkv, L, E, S) in [(8, 2, 1, 64, 4097), (4, 4, 2, 40, 9000), (6, 2, 1, 128, 2500)]:
        q, k, v = randn(rng, (2, H, L, E), bf16, 2.0), randn(rng, (2, Hkv, S, E), bf16, 2.0), randn(rng, (2, Hkv, S, E), bf16)
        for kw in ({}, dict(is_causal=True, alignment="bottom_right", key_lengths=[S, S // 3])):
            want = dot(q, k, v, enable_gqa=True, num_threads=1, return_lse=True, **kw)
            for nt in (2, 3):
                got = dot(q, k, v, enable_gqa=True, num_threads=nt, return_lse=True, **kw)
                assert_bits(got[0], want[0], f"out {kw} threads={nt}")
                assert_bits(got[1], want[1], f"lse {kw} threads={nt}")


def test_k_rows_anywhere_same_bits(bf16):
    """K rows read in place at any address (an odd element offset, a row stride that is no
    multiple of the cache line, negative): the bits of a contiguous copy."""
    rng = np.random.default_rng(6)
    q, v = randn(rng, (1, 8, 1, 64), bf16, 2.0), randn(rng, (1, 2, 700, 64), bf16)
    k = randn(rng, (1, 2, 700, 64), bf16, 2.0)
    want = dot(q, k, v, enable_gqa=True)
    wide = np.zeros((1, 2, 700, 67), bf16)
    wide[..., 1:65] = k
    flipped = np.ascontiguousarray(k[:, :, ::-1])[:, :, ::-1]
    for kk in (wide[..., 1:65], flipped):
        assert_bits(dot(q, kk, v, enable_gqa=True), want, "K rows elsewhere")


def test_paged_attention_bf16_pages(bf16):
    """paged_attention with bfloat16 pages: within the bound, and the bits of the dense decode."""
    rng = np.random.default_rng(8)
    B, Hq, H, n, E, ps = 3, 8, 2, 2, 64, 16
    seq_lens = np.array([1, 300, 129])
    need = -(-seq_lens // ps)
    nb = int(need.sum()) + 2
    perm = rng.permutation(nb)
    kp, vp = randn(rng, (nb, ps, H, E), bf16, 2.0), randn(rng, (nb, ps, H, E), bf16)
    bt = np.full((B, int(need.max())), -1, np.int64)
    at = 0
    for b, m in enumerate(need):
        bt[b, :m] = perm[at:at + m]
        at += m
    kp[perm[at:]] = np.nan                     # pages no sequence holds: never read
    vp[perm[at:]] = np.nan
    q = randn(rng, (B, Hq, n, E), bf16, 2.0)
    S = int(seq_lens.max())
    idx = np.where(bt >= 0, bt, perm[-1])
    kd = np.ascontiguousarray(np.moveaxis(kp[idx].reshape(B, -1, H, E)[:, :S], 2, 1))
    vd = np.ascontiguousarray(np.moveaxis(vp[idx].reshape(B, -1, H, E)[:, :S], 2, 1))
    kw = dict(is_causal=True, alignment="bottom_right", key_lengths=seq_lens, enable_gqa=True)
    for opts in ({}, dict(window_size=(50, 0)), dict(softcap=3.0)):
        with selfattn.use_isa("avx512bf16"):
            out, lse = selfattn.paged_attention(q, kp, vp, bt, seq_lens, return_lse=True, **opts)
        ref, ref_lse = dot(q, kd, vd, return_lse=True, **kw, **opts)
        assert_bits(out, ref, f"paged {opts}")
        assert_bits(lse, ref_lse, f"paged lse {opts}")
        check_bound(out, q, np.nan_to_num(kd), np.nan_to_num(vd), dict(kw, **opts), f"paged {opts}")


def test_kvcache_bf16_decode_steps(bf16):
    rng = np.random.default_rng(9)
    B, Hq, H, T, E, prompt = 2, 8, 2, 40, 64, 30
    q, k, v = randn(rng, (B, Hq, T, E), bf16, 2.0), randn(rng, (B, H, T, E), bf16, 2.0), randn(rng, (B, H, T, E), bf16)
    cache = selfattn.KVCache(B, H, T, E, E, dtype=bf16)
    with selfattn.use_isa("avx512bf16"):
        cache.append(k[:, :, :prompt], v[:, :, :prompt])
        for t in range(prompt, T):
            cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
            out = cache.attend(q[:, :, t:t + 1])
            assert out.dtype == bf16
            check_bound(out, q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], dict(enable_gqa=True), f"step {t}")
            assert_bits(out, dot(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], enable_gqa=True), f"step {t}")


def test_odd_e_and_strided_k_keep_the_widening_decode(bf16):
    """An odd E (no whole pairs) or K columns not contiguous: the widening decode, avx512's bits."""
    rng = np.random.default_rng(3)
    q, k, v = randn(rng, (1, 8, 1, 33), bf16), randn(rng, (1, 2, 900, 33), bf16), randn(rng, (1, 2, 900, 33), bf16)
    assert_bits(dot(q, k, v, enable_gqa=True), widening(q, k, v, enable_gqa=True), "odd E")
    q, v = randn(rng, (1, 8, 1, 64), bf16), randn(rng, (1, 2, 900, 64), bf16)
    k = randn(rng, (1, 2, 64, 900), bf16).swapaxes(-1, -2)
    assert_bits(dot(q, k, v, enable_gqa=True), widening(q, k, v, enable_gqa=True), "strided K")


def test_fully_masked_rows_and_nan(bf16):
    """Rows that see nothing: zeros, lse -inf; NaN where float32's widening decode has NaN."""
    rng = np.random.default_rng(5)
    q, k, v = randn(rng, (2, 4, 2, 64), bf16), randn(rng, (2, 2, 300, 64), bf16), randn(rng, (2, 2, 300, 64), bf16)
    mask = np.ones((2, 300), bool)
    mask[1] = False
    out, lse = dot(q, k, v, attn_mask=mask, enable_gqa=True, return_lse=True)
    o = out.astype(np.float32)
    assert (o[:, :, 1] == 0).all() and (lse[:, :, 1] == -np.inf).all()
    assert np.isfinite(o[:, :, 0]).all() and np.isfinite(lse[:, :, 0]).all()
    out, lse = dot(q, k, v, key_lengths=[0, 300], enable_gqa=True, return_lse=True)
    assert (out[0].astype(np.float32) == 0).all() and (lse[0] == -np.inf).all() and np.isfinite(lse[1]).all()
    # NaN in a query, in a key some rows see, in a value
    q[0, 1, 0, 7] = np.nan
    k[1, 0, 123, 5] = np.nan
    v[0, 1, 17, 3] = np.nan
    for kw in ({}, dict(window_size=(100, 0), alignment="bottom_right")):
        out, lse = dot(q, k, v, enable_gqa=True, return_lse=True, **kw)
        ref, ref_lse = widening(q, k, v, enable_gqa=True, return_lse=True, **kw)
        assert np.array_equal(np.isnan(out.astype(np.float32)), np.isnan(ref.astype(np.float32))), kw
        assert np.array_equal(np.isnan(lse), np.isnan(ref_lse)), kw
        assert np.isnan(out[0, 1, 0]).all() and np.isnan(lse[0, 1, 0])
        if not kw:                                 # key 123 of batch 1's kv head 0: its heads 0, 1
            assert np.isnan(out[1, :2]).all() and not np.isnan(out[1, 2:]).any()


def test_float16_and_float32_decode_are_avx512s(bf16):
    """avx512bf16's decode of any other storage is avx512's function: the same bits."""
    rng = np.random.default_rng(7)
    for dt in (np.dtype(np.float16), np.dtype(np.float32)):
        q, k, v = randn(rng, (1, 8, 1, 64), dt), randn(rng, (1, 2, 900, 64), dt), randn(rng, (1, 2, 900, 64), dt)
        assert_bits(dot(q, k, v, enable_gqa=True), widening(q, k, v, enable_gqa=True), f"decode {dt}")


@pytest.mark.skipif("avx512amx" not in AVAILABLE_ISAS, reason="no AMX-BF16 on this CPU/build")
def test_avx512amx_decodes_as_avx512(bf16):
    """avx512amx has no decode of its own: dispatch.c's row names avx512's (the widening one; on
    Sapphire Rapids avx512bf16's q.k on vdpbf16ps was faster for some shapes, slower for others):
    the same bits, for every storage and stacked-row count."""
    rng = np.random.default_rng(9)
    for dt in (bf16, np.dtype(np.float16), np.dtype(np.float32)):
        for (H, Hkv, L) in [(9, 3, 1), (8, 2, 1), (4, 2, 3)]:
            q, k, v = randn(rng, (2, H, L, 64), dt), randn(rng, (2, Hkv, 1100, 64), dt), randn(rng, (2, Hkv, 1100, 64), dt)
            kw = dict(enable_gqa=True, is_causal=True, alignment="bottom_right", key_lengths=[1100, 517], return_lse=True)
            with selfattn.use_isa("avx512amx"), forced_schedule("decode"):
                got = sdpa(q, k, v, **kw)
            want = widening(q, k, v, **kw)
            assert_bits(got[0], want[0], f"out {dt} {H}/{Hkv} L={L}")
            assert_bits(got[1], want[1], f"lse {dt} {H}/{Hkv} L={L}")
