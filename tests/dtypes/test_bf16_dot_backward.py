"""The bfloat16-dot paths' bfloat16 backward (avx512bf16: vdpbf16ps; neonbf16: BFDOT; avx512amx: AMX
tiles, src_c/attn_amx.h) on bfloat16 pairs (src_c/attn_bwd_body.h under BF16_DOT, the pair kernels
of src_c/attn_bf16dot.h), every test on each this CPU runs (sa_testutil.BF16_FWD_ISAS).

q, k, v, out and dO are read as stored; the scores are the forward's (the same products summed in
the same order), P and dS are rounded to bfloat16 for the four products that take them (dV = P^T dO,
dK = dS^T Q, dQ = dS K; dP = dO V^T takes stored values only), as flash attention's backward does;
every sum is float32 and the gradients are rounded to bfloat16 once, at the end. So against float64
(on the rounded inputs and cotangent) the error is the gradients' own rounding (2^-9 relative) plus
a share of max|grad| from P, dS and out having been rounded: bounded here on every option, and no
larger than torch's own bfloat16 backward where torch is installed. Any layout and thread count give
the same bits. Every other ISA (and float16 everywhere) computes the 16-bit backward on float32
copies: tests/dtypes/test_half_precision.py.
"""

import numpy as np
import pytest

import selfattn
from sa_testutil import BF16_FWD_ISAS, ISAS, assert_bits, optional_import, randn
from test_bf16_dot import CASES, EDGE_E, EDGE_EV, EDGE_L, EDGE_S, make_case

pytestmark = pytest.mark.skipif(not BF16_FWD_ISAS, reason="no bfloat16-dot path (avx512bf16, neonbf16, "
                                "avx512amx) can run on this CPU/build (no AVX512_BF16 / BF16 / AMX-BF16)")
PATH = None         # the path under test (the fixture below: each of BF16_FWD_ISAS in turn)


@pytest.fixture(autouse=True, params=BF16_FWD_ISAS or [None])
def bf16_path(request):
    """every test here runs on each bfloat16-dot backward this CPU has (avx512bf16 / neonbf16:
    vdpbf16ps / BFDOT; avx512amx: AMX tiles)"""
    global PATH
    PATH = request.param
    yield PATH
    PATH = None

# err <= REL |ref| + SHARE[grad] max|ref|: REL covers the gradient's own rounding (half an ulp is
# 2^-9); SHARE what P, dS and out rounded to bfloat16 contribute (measured: at most 8e-3 of max|ref|
# for dq and dk, 1.5e-3 for dv, over CASES)
REL = 2.0 ** -8
SHARE = {"q": 2.0 ** -6, "k": 2.0 ** -6, "v": 2.0 ** -8}


def vjp_dot(q, k, v, **kw):
    with selfattn.use_isa(PATH):
        out, vjp = selfattn.scaled_dot_product_attention_vjp(q, k, v, **kw)

    def run(dout):
        with selfattn.use_isa(PATH):
            return vjp(dout)
    return out, run


def reference_grads(q, k, v, dout, kw):
    """float64 gradients on the rounded inputs and cotangent (selfattn's float64 backward is
    checked against selfattn.reference in tests/backward)"""
    _, vjp = selfattn.scaled_dot_product_attention_vjp(*(a.astype(np.float64) for a in (q, k, v)), **kw)
    return vjp(dout.astype(np.float64))


def check_grads(got, ref, ctx, names="qkv"):
    for g, r, n in zip(got, ref, names):
        r = np.asarray(r, np.float64)
        err = np.abs(g.astype(np.float64) - r)
        bound = REL * np.abs(r) + SHARE[n] * np.abs(r).max() + 1e-6
        assert (err <= bound).all(), (f"{ctx} d{n}: worst {err.max():.3g} "
                                      f"({err.max() / np.abs(r).max():.3g} of max|ref|)")


@pytest.mark.parametrize("name,qs,ks,vs,kw", CASES, ids=[c[0] for c in CASES])
def test_error_bound_every_option(bf16, name, qs, ks, vs, kw):
    q, k, v, kw = make_case(bf16, name, qs, ks, vs, kw)
    out, vjp = vjp_dot(q, k, v, **kw)
    dout = randn(np.random.default_rng(1), out.shape, bf16)
    grads = vjp(dout)
    assert [g.dtype for g in grads[:3]] == [bf16] * 3
    assert [g.shape for g in grads[:3]] == [q.shape, k.shape, v.shape]
    ref = reference_grads(q, k, v, dout, kw)
    check_grads(grads[:3], ref[:3], name)
    if "sinks" in kw:                        # dsinks: from out and lse (float32), as elsewhere
        np.testing.assert_allclose(grads[3], ref[3], rtol=2 ** -6, atol=2 ** -6 * np.abs(ref[3]).max())
    # not the widened path's bits: this is the vdpbf16ps backward
    with selfattn.use_isa(ISAS[0]):
        _, wvjp = selfattn.scaled_dot_product_attention_vjp(q, k, v, **kw)
        widened = wvjp(dout)
    assert any(not np.array_equal(a, b) for a, b in zip(grads[:3], widened[:3])), name


@pytest.mark.parametrize("axis", ["L", "S", "E", "Ev"])
def test_tile_edges(bf16, axis):
    """Sizes around every tile edge (test_bf16_dot.EDGE_*): query rows (MR groups, AMX's 16-row tiles
    and 16 row pairs, the 64-row tile), keys (vectors, AMX's 16-pair steps of dQ and its ends,
    blocks), E and Ev (pairs, AMX's 16-word steps and their remainder, 64-column passes); GQA in
    every third so that dK and dV sum over heads."""
    rng = np.random.default_rng(13)
    sizes = {"L": EDGE_L, "S": EDGE_S, "E": EDGE_E, "Ev": EDGE_EV}[axis]
    for n, size in enumerate(sizes):
        L, S, E, Ev = (size if axis == a else d for a, d in zip(("L", "S", "E", "Ev"), (40, 150, 34, 24)))
        kw = [{}, dict(is_causal=True, alignment="bottom_right"), dict(window_size=(37, 5), enable_gqa=True)][n % 3]
        hq = 4 if "enable_gqa" in kw else 2
        q, k, v = randn(rng, (1, hq, L, E), bf16, 2.0), randn(rng, (1, 2, S, E), bf16, 2.0), randn(rng, (1, 2, S, Ev), bf16)
        out, vjp = vjp_dot(q, k, v, **kw)
        dout = randn(rng, out.shape, bf16)
        got, ref = vjp(dout), reference_grads(q, k, v, dout, kw)
        # bound by the size of the terms summed, not of the sum (one key, E = 1: the sums cancel):
        # P, dS and out rounded to bfloat16 err by 2^-9 of each term (4x here)
        f = [a.astype(np.float64) for a in (q, k, v, dout)]
        kf, vf = (np.repeat(a, hq // 2, axis=1) for a in f[1:3])
        p = selfattn.reference.attention_weights(f[0], kf, **kw)
        dp = f[3] @ vf.swapaxes(-1, -2)
        d = np.abs(f[3] * (p @ vf)).sum(-1, keepdims=True)      # D = rowsum(dO o out), out rounded
        term = p * (np.abs(dp) + d) / np.sqrt(E)
        size_of = {"q": term @ np.abs(kf), "k": term.swapaxes(-1, -2) @ np.abs(f[0]),
                   "v": p.swapaxes(-1, -2) @ np.abs(f[3])}
        for g, r, nm in zip(got, ref, "qkv"):
            m = size_of[nm]
            if nm != "q":                  # summed over the heads that share a kv head
                m = m.reshape(1, 2, hq // 2, *m.shape[2:]).sum(2)
            err = np.abs(g.astype(np.float64) - r)
            bound = REL * np.abs(r) + 2.0 ** -6 * m + 1e-6
            assert (err <= bound).all(), f"{axis}={size} {kw} d{nm}: worst {(err / bound).max():.3g} of its bound"


def test_same_bits_any_layout_and_thread_count(bf16):
    """Pairing is exact and every sum has a fixed order: strided, transposed and Fortran-ordered
    inputs give the bits of contiguous copies, at any thread count; the inputs are untouched."""
    rng = np.random.default_rng(2)
    q = randn(rng, (2, 3, 150, 2 * 41), bf16, 2.0)[..., ::2]                # strided, odd E
    k = randn(rng, (2, 3, 41, 300), bf16, 2.0).swapaxes(-1, -2)           # column-major rows
    v = np.asfortranarray(randn(rng, (2, 3, 300, 24), bf16))
    dout = randn(rng, (2, 3, 150, 24), bf16)
    before = [a.copy() for a in (q, k, v, dout)]
    for kw in ({}, dict(is_causal=True, alignment="bottom_right"), dict(window_size=(40, 7))):
        contiguous = [np.ascontiguousarray(a) for a in (q, k, v)]
        want = vjp_dot(*contiguous, num_threads=1, **kw)[1](dout)
        for nt in (1, 2, 3):
            got = vjp_dot(q, k, v, num_threads=nt, **kw)[1](dout)
            for g, w, n in zip(got, want, "qkv"):
                assert_bits(g, w, f"{kw} threads={nt} d{n}")
    for a, b in zip((q, k, v, dout), before):
        assert_bits(a, b, "inputs untouched")


@pytest.mark.parametrize("kw", [{}, dict(is_causal=True)], ids=["plain", "causal"])
def test_error_no_larger_than_torch(bf16, kw):
    """Against float64: the worst and the mean error of each gradient <= torch's bfloat16 backward
    (its CPU flash attention) on the same inputs and cotangent."""
    torch = optional_import("torch")
    rng = np.random.default_rng(7)
    shape = (1, 4, 256, 64)
    q, k, v, dout = (randn(rng, shape, bf16, 2), randn(rng, shape, bf16, 2), randn(rng, shape, bf16),
                     randn(rng, shape, bf16))
    ref = reference_grads(q, k, v, dout, kw)
    ours = vjp_dot(q, k, v, **kw)[1](dout)
    tq, tk, tv = (torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16).requires_grad_() for a in (q, k, v))
    torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, **kw).backward(
        torch.from_numpy(dout.astype(np.float32)).to(torch.bfloat16))
    for g, t, r, n in zip(ours, (tq, tk, tv), ref, "qkv"):
        e_ours = np.abs(g.astype(np.float64) - r)
        e_torch = np.abs(t.grad.float().numpy().astype(np.float64) - r)
        assert e_ours.max() <= e_torch.max() and e_ours.mean() <= e_torch.mean(), \
            (n, e_ours.max(), e_torch.max(), e_ours.mean(), e_torch.mean())


def test_fully_masked_rows_and_keys_beyond_lengths(bf16):
    """Rows that see no key get zero gradients; keys beyond every entry's length (NaN, Inf) change
    no bit and get zero gradients; keys that are another entry's (shared K/V) never reach an
    entry's dQ -- at an odd length too, where a key pair straddles the end."""
    rng = np.random.default_rng(11)
    q, k, v = randn(rng, (2, 2, 6, 34), bf16), randn(rng, (2, 2, 9, 34), bf16), randn(rng, (2, 2, 9, 18), bf16)
    mask = rng.random((2, 1, 6, 9)) < 0.7
    mask[0, :, 2] = False
    out, vjp = vjp_dot(q, k, v, attn_mask=mask)
    dout = randn(rng, out.shape, bf16)
    dq, dk, dv = vjp(dout)
    assert all(np.isfinite(g.astype(np.float32)).all() for g in (dq, dk, dv))
    assert (dq[0, :, 2].astype(np.float32) == 0).all() and (out[0, :, 2].astype(np.float32) == 0).all()
    check_grads((dq, dk, dv), reference_grads(q, k, v, dout, dict(attn_mask=mask)), "masked rows")

    kl = [3, 6]
    clean = vjp_dot(q, k, v, key_lengths=kl)[1](dout)
    kd, vd = k.copy(), v.copy()
    kd[0, :, 3:], vd[0, :, 3:] = np.nan, np.inf
    kd[1, :, 6:], vd[1, :, 6:] = np.inf, np.nan
    got = vjp_dot(q, kd, vd, key_lengths=kl)[1](dout)
    for g, r, n in zip(got, clean, "qkv"):
        assert_bits(g, r, f"d{n} depends on keys beyond key_lengths")
    assert (got[1][0, :, 3:].astype(np.float32) == 0).all() and (got[2][1, :, 6:].astype(np.float32) == 0).all()

    for n_keys in (3, 4, 17):              # odd and even lengths: the pair at the end
        qs = randn(rng, (2, 1, 4, 8), bf16)
        ks, vs = randn(rng, (1, 1, 20, 8), bf16), randn(rng, (1, 1, 20, 5), bf16)
        ks[..., n_keys:, :] = np.nan
        o, svjp = vjp_dot(qs, ks, vs, key_lengths=[n_keys, 20])
        assert np.isfinite(o[0].astype(np.float32)).all()
        dqs = svjp(np.ones_like(o))[0]
        assert np.isfinite(dqs[0].astype(np.float32)).all(), f"dq of entry 0 read keys >= {n_keys}"


def test_nan_propagates_as_in_float32(bf16):
    """A NaN in q reaches the same gradient elements as on the float32-computed path."""
    rng = np.random.default_rng(5)
    q, k, v = randn(rng, (1, 2, 40, 32), bf16), randn(rng, (1, 2, 70, 32), bf16), randn(rng, (1, 2, 70, 16), bf16)
    q[0, 1, 7, 3] = np.nan
    dout = randn(rng, (1, 2, 40, 16), bf16)
    got = vjp_dot(q, k, v, is_causal=True)[1](dout)
    with selfattn.use_isa(ISAS[0]):
        want = selfattn.scaled_dot_product_attention_vjp(q, k, v, is_causal=True)[1](dout)
    for g, w, n in zip(got, want, "qkv"):
        assert np.array_equal(np.isnan(g.astype(np.float32)), np.isnan(w.astype(np.float32))), f"d{n}"
        assert np.isnan(g.astype(np.float32)).any(), f"d{n}"


def close_to_widened(got, kwargs_fn, ctx):
    """Where the float64 reference is not at hand (dropout, score_mod, varlen): the float32-computed
    path's gradients, within the same bound."""
    with selfattn.use_isa(ISAS[0]):
        want = kwargs_fn()
    check_grads(got, [w.astype(np.float64) for w in want], ctx)


def test_varlen_flex_dropout_and_torch(bf16):
    rng = np.random.default_rng(9)
    # varlen: packed sequences of 5, 40 and 77 tokens, causal, GQA
    h = randn(rng, (4, 122, 32), bf16)
    kv = randn(rng, (2, 122, 32), bf16)
    cu = [0, 5, 45, 122]
    dout = randn(rng, (4, 122, 32), bf16)

    def varlen():
        return selfattn.varlen_attention_vjp(h, kv, kv, cu, cu, is_causal=True, enable_gqa=True)[1](dout)
    with selfattn.use_isa(PATH):
        got = varlen()
    close_to_widened(got, varlen, "varlen")

    # flex_attention: a document mask and a relative bias through score_mod
    q, k, v = randn(rng, (1, 2, 130, 32), bf16), randn(rng, (1, 2, 130, 32), bf16), randn(rng, (1, 2, 130, 32), bf16)
    doc = np.arange(130) // 50
    bm = selfattn.create_block_mask(lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki), None, None, 130, 130,
                                    BLOCK_SIZE=32)
    dflex = randn(rng, q.shape, bf16)

    def flex():
        return selfattn.flex_attention_vjp(q, k, v, lambda s, b, h, qi, ki: s - 0.05 * abs(qi - ki),
                                           block_mask=bm)[1](dflex)
    with selfattn.use_isa(PATH):
        got = flex()
    close_to_widened(got[:3], flex, "flex")

    # dropout: the same mask regenerated in the backward
    def drop():
        return selfattn.scaled_dot_product_attention_vjp(q, k, v, dropout_p=0.2, seed=3)[1](dflex)
    with selfattn.use_isa(PATH):
        got = drop()
    close_to_widened(got, drop, "dropout")

    # the torch bridge: bfloat16 tensors, zero-copy, the same bits as the NumPy VJP
    torch = optional_import("torch")
    import selfattn.torch as st
    tq, tk, tv = (torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16).requires_grad_() for a in (q, k, v))
    with selfattn.use_isa(PATH):
        st.scaled_dot_product_attention(tq, tk, tv, is_causal=True).backward(
            torch.from_numpy(dflex.astype(np.float32)).to(torch.bfloat16))
        want = vjp_dot(q, k, v, is_causal=True)[1](dflex)
    for t, w, n in zip((tq, tk, tv), want, "qkv"):
        assert_bits(t.grad.float().numpy().astype(bf16), w, f"torch d{n}")


def test_schedule_is_the_native_backward(bf16):
    """schedule(backward=True) describes the kernel that runs: bfloat16 problems on the bfloat16-dot path get
    the bfloat16-dot backward's workspace (the paired P^T, dS^T), elsewhere the float32 copies'."""
    q = np.ones((1, 2, 100, 64), bf16)
    p = selfattn._core.describe(q, q, q)
    with selfattn.use_isa(PATH):
        native = p.schedule(backward=True)
    with selfattn.use_isa(ISAS[0]):
        widened = p.schedule(backward=True)
    assert native["workspace_bytes"] > widened["workspace_bytes"]
