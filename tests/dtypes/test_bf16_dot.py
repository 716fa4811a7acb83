"""The bfloat16-dot paths' bfloat16 forward (avx512bf16: vdpbf16ps; neonbf16: BFDOT; avx512amx: AMX
tiles, src_c/attn_amx.h) on bfloat16 pairs (src_c/attn_bf16dot.h), each that this CPU runs
(sa_testutil.BF16_FWD_ISAS), every test on each.

Scores are the exact products of the stored bfloat16 values summed in float32; the probabilities
are rounded to bfloat16 for P.V (as flash attention does), their sums kept in float32. So the error
against float64 is the output's rounding plus at most 2^-9 of max|v| from the probabilities'
rounding: bounded here on every option and schedule, and no larger than torch's own bfloat16 SDPA
where torch is installed. The packing is exact, so any layout of q, k, v gives the same bits as
contiguous copies, and any thread count the same bits. avx512bf16 is the default on AMD's Zen 4 /
Zen 5; on Intel's CPUs (slower vdpbf16ps) it runs when forced, as here; avx512amx (AMX tiles, 16
query rows x 16 keys or value columns a tile, 16 words of E a step) is the default where the CPU
has AMX-BF16 and the OS grants the tile data (Sapphire Rapids and later); neonbf16 wherever the CPU
has BF16 (under qemu in CI). avx512bf16's decode schedule has its own scores on vdpbf16ps
(test_bf16_dot_decode.py); the backward is its own on all three (test_bf16_dot_backward.py);
their float16 and float32 calls (and neonbf16's and avx512amx's decode) are the base path's:
checked bit for bit.
"""

import numpy as np
import pytest

import selfattn
from sa_testutil import BF16_DOT_BASE, BF16_FWD_ISAS, assert_bits, forced_schedule, optional_import, randn

pytestmark = pytest.mark.skipif(not BF16_FWD_ISAS, reason="no bfloat16-dot path (avx512bf16, neonbf16, "
                                "avx512amx) can run on this CPU/build (no AVX512_BF16 / BF16 / AMX-BF16)")

sdpa = selfattn.scaled_dot_product_attention
EPS = 2.0 ** -7     # one bfloat16 ulp at 1.0
PATH = None         # the path under test (the fixture below: each of BF16_FWD_ISAS in turn)
BASE = None


@pytest.fixture(autouse=True, params=BF16_FWD_ISAS or [None])
def bf16_path(request):
    """every test here runs on each bfloat16-dot forward this CPU has (avx512bf16 / neonbf16:
    vdpbf16ps / BFDOT; avx512amx: AMX tiles)"""
    global PATH, BASE
    PATH, BASE = request.param, BF16_DOT_BASE.get(request.param)
    yield PATH
    PATH = BASE = None


def dot(*args, **kw):
    with selfattn.use_isa(PATH):
        return sdpa(*args, **kw)


def check_bound(out, q, k, v, kw, ctx):
    ref = selfattn.reference.scaled_dot_product_attention(*(a.astype(np.float64) for a in (q, k, v)), **kw)
    vmax = np.abs(v.astype(np.float64)).max()
    err = np.abs(out.astype(np.float64) - ref)
    bound = EPS * np.abs(ref) + 2.0 ** -8 * vmax + 1e-5
    assert (err <= bound).all(), f"{ctx}: worst {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"
    return err


def make_case(bf16, name, qs, ks, vs, kw):
    """one of CASES: q, k (amplitude 2), v in bfloat16, and its options (a mask drawn for "bool",
    "float")"""
    rng = np.random.default_rng(len(name))
    q, k, v = randn(rng, qs, bf16, 2.0), randn(rng, ks, bf16, 2.0), randn(rng, vs, bf16)
    if kw in ("bool", "float"):
        keep = rng.random((qs[-2], ks[-2])) < 0.7
        kw = dict(attn_mask=keep if kw == "bool" else np.where(keep, rng.standard_normal(keep.shape), -np.inf))
    return q, k, v, dict(kw)


CASES = [  # (name, q shape, k shape, v shape, options): odd E, odd key counts, Ev off the vector width
    ("plain", (2, 3, 37, 40), (2, 3, 150, 40), (2, 3, 150, 24), {}),
    ("odd_e", (1, 2, 70, 33), (1, 2, 129, 33), (1, 2, 129, 17), {}),
    ("causal", (1, 2, 130, 64), (1, 2, 130, 64), (1, 2, 130, 64), dict(is_causal=True)),
    ("causal_bottom_right", (1, 2, 50, 32), (1, 2, 301, 32), (1, 2, 301, 32),
     dict(is_causal=True, alignment="bottom_right")),
    ("gqa", (1, 8, 20, 64), (1, 2, 200, 64), (1, 2, 200, 64), dict(enable_gqa=True)),
    ("window", (1, 2, 300, 32), (1, 2, 300, 32), (1, 2, 300, 32), dict(window_size=(21, 4))),
    ("key_lengths", (3, 2, 17, 16), (3, 2, 91, 16), (3, 2, 91, 16), dict(key_lengths=np.array([91, 1, 45]))),
    ("alibi_softcap", (2, 4, 33, 32), (2, 4, 70, 32), (2, 4, 70, 32),
     dict(alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]), softcap=5.0)),
    ("bool_mask", (1, 2, 40, 64), (1, 2, 77, 64), (1, 2, 77, 64), "bool"),
    ("float_mask", (1, 2, 40, 64), (1, 2, 77, 64), (1, 2, 77, 64), "float"),
    ("sinks", (2, 4, 45, 32), (2, 2, 120, 32), (2, 2, 120, 32),
     dict(enable_gqa=True, is_causal=True, sinks=np.array([1.0, -2.0, 4.0, -np.inf]), key_lengths=[120, 0])),
]


@pytest.mark.parametrize("name,qs,ks,vs,kw", CASES, ids=[c[0] for c in CASES])
def test_error_bound_every_option(bf16, name, qs, ks, vs, kw):
    q, k, v, kw = make_case(bf16, name, qs, ks, vs, kw)
    out, lse = dot(q, k, v, return_lse=True, **kw)
    assert out.dtype == bf16 and lse.dtype == np.float32
    check_bound(out, q, k, v, kw, name)
    # the log-sum-exp is float32's: the scores are exact products summed in float32
    _, lse_widened = sdpa(q, k, v, return_lse=True, **kw)
    finite = np.isfinite(lse_widened)
    assert np.array_equal(finite, np.isfinite(lse))
    assert np.allclose(lse[finite], lse_widened[finite], rtol=1e-5, atol=1e-5)


# sizes around every tile edge of the three paths: query rows (MR 8 groups, AMX's 16-row tiles, the
# 64-row task tile), keys (vectors of 16, AMX's passes of 64, blocks of 128), E (pairs; AMX's steps
# of 16 words and their remainder), Ev (vectors, AMX's passes of 64 columns)
EDGE_L = (1, 7, 8, 9, 15, 16, 17, 24, 33, 63, 64, 65, 129)
EDGE_S = (1, 2, 15, 16, 17, 31, 33, 63, 64, 65, 127, 128, 129, 200, 257)
EDGE_E = (1, 2, 3, 30, 31, 32, 33, 34, 62, 64, 66, 96, 130)
EDGE_EV = (1, 15, 16, 17, 48, 63, 64, 65, 80, 129)


@pytest.mark.parametrize("axis", ["L", "S", "E", "Ev"])
def test_tile_edges(bf16, axis):
    rng = np.random.default_rng(11)
    sizes = {"L": EDGE_L, "S": EDGE_S, "E": EDGE_E, "Ev": EDGE_EV}[axis]
    for n, size in enumerate(sizes):
        L, S, E, Ev = (size if axis == a else d for a, d in zip(("L", "S", "E", "Ev"), (40, 150, 34, 24)))
        q, k, v = randn(rng, (1, 2, L, E), bf16, 2.0), randn(rng, (1, 2, S, E), bf16, 2.0), randn(rng, (1, 2, S, Ev), bf16)
        kw = [{}, dict(is_causal=True, alignment="bottom_right"), dict(window_size=(37, 5))][n % 3]
        check_bound(dot(q, k, v, **kw), q, k, v, kw, f"{axis}={size} {kw}")


@pytest.mark.parametrize("schedule", ["shared", "fused", "banded"])
def test_every_schedule(bf16, schedule):
    rng = np.random.default_rng(1)
    q, k, v = randn(rng, (2, 2, 150, 48), bf16, 2.0), randn(rng, (2, 2, 333, 48), bf16, 2.0), randn(rng, (2, 2, 333, 48), bf16)
    kw = dict(window_size=(64, 0)) if schedule == "banded" else {}
    with forced_schedule(schedule):
        out = dot(q, k, v, **kw)
    check_bound(out, q, k, v, kw, schedule)


def test_same_bits_any_layout_and_thread_count(bf16):
    """Packing pairs is exact: strided, transposed, Fortran-ordered inputs give the bits of
    contiguous copies; and the thread count changes nothing."""
    rng = np.random.default_rng(2)
    base = randn(rng, (2, 3, 64, 2 * 41), bf16, 2.0)
    q = base[..., ::2]                                       # strided last dim, odd E
    k = randn(rng, (2, 3, 41, 100), bf16, 2.0).swapaxes(-1, -2)   # column-major rows
    v = np.asfortranarray(randn(rng, (2, 3, 100, 24), bf16))
    before = [a.copy() for a in (q, k, v)]
    for kw in ({}, dict(is_causal=True)):
        want = dot(*(np.ascontiguousarray(a) for a in (q, k, v)), num_threads=1, **kw)
        for nt in (1, 2, 3):
            assert_bits(dot(q, k, v, num_threads=nt, **kw), want, f"{kw} threads={nt}")
    for a, b in zip((q, k, v), before):
        assert_bits(a, b, "inputs untouched")


@pytest.mark.parametrize("kw", [{}, dict(is_causal=True)], ids=["plain", "causal"])
def test_error_no_larger_than_torch(bf16, kw):
    torch = optional_import("torch")
    rng = np.random.default_rng(7)
    q, k, v = randn(rng, (1, 4, 256, 64), bf16, 2), randn(rng, (1, 4, 256, 64), bf16, 2), randn(rng, (1, 4, 256, 64), bf16)
    ref = selfattn.reference.scaled_dot_product_attention(*(a.astype(np.float64) for a in (q, k, v)), **kw)
    ours = np.abs(dot(q, k, v, **kw).astype(np.float64) - ref)
    tq, tk, tv = (torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16) for a in (q, k, v))
    theirs = np.abs(torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, **kw).float().numpy() - ref)
    assert ours.max() <= theirs.max() and ours.mean() <= theirs.mean(), (ours.max(), theirs.max(), ours.mean(),
                                                                            theirs.mean())


def test_nonfinite_and_fully_masked_rows(bf16):
    rng = np.random.default_rng(5)
    q, k, v = randn(rng, (1, 1, 4, 16), bf16), randn(rng, (1, 1, 50, 16), bf16), randn(rng, (1, 1, 50, 8), bf16)
    q[0, 0, 1, 3] = np.nan
    mask = np.ones((4, 50), bool)
    mask[2] = False
    out, lse = dot(q, k, v, attn_mask=mask, return_lse=True)
    o = out.astype(np.float32)
    assert np.isnan(o[0, 0, 1]).all() and np.isnan(lse[0, 0, 1])
    assert (o[0, 0, 2] == 0).all() and lse[0, 0, 2] == -np.inf
    assert np.isfinite(o[0, 0, [0, 3]]).all() and np.isfinite(lse[0, 0, [0, 3]]).all()


def test_decode_float16_and_float32_are_the_base_paths(bf16):
    """A bfloat16-dot path's own kernels are bfloat16's: its float16 and float32 calls, decode and
    forward, are its base path's functions (the same bits). avx512bf16's bfloat16 decode computes
    the scores on vdpbf16ps (test_bf16_dot_decode.py): no longer avx512's bits, within the bound
    here; neonbf16's is neon's."""
    rng = np.random.default_rng(3)
    for dt in (bf16, np.dtype(np.float16), np.dtype(np.float32)):
        q, k, v = randn(rng, (1, 8, 1, 64), dt), randn(rng, (1, 2, 900, 64), dt), randn(rng, (1, 2, 900, 64), dt)
        got = dot(q, k, v, enable_gqa=True)
        with selfattn.use_isa(BASE):
            want = sdpa(q, k, v, enable_gqa=True)
        if dt == bf16 and PATH == "avx512bf16":
            check_bound(got, q, k, v, dict(enable_gqa=True), "decode bfloat16")
        else:
            assert_bits(got, want, f"decode {dt}")
        if dt != bf16:
            q = randn(rng, (1, 8, 100, 64), dt)
            got = dot(q, k, v, enable_gqa=True)
            with selfattn.use_isa(BASE):
                assert_bits(got, sdpa(q, k, v, enable_gqa=True), f"forward {dt}")


def test_the_path_is_named():
    paths = selfattn._core.storage_paths(PATH)
    assert paths == {"avx512bf16": {"bfloat16": "vdpbf16ps", "float16": "AVX-512 vcvtph2ps"},
                     "neonbf16": {"bfloat16": "BFDOT", "float16": "NEON fcvtl"},
                     "avx512amx": {"bfloat16": "AMX tdpbf16ps", "float16": "AVX-512 vcvtph2ps"}}[PATH]
    assert selfattn._core.storage_paths(BASE)["bfloat16"] == "shifts"
