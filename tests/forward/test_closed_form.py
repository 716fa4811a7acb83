"""Cases whose answer is known in closed form (independent of the reference)."""

import math

import numpy as np
import pytest

import selfattn
from selfattn import reference
from sa_testutil import (TOL, assert_sdpa_close, edge, lse_tolerance, logit_magnitude, tolerance, vmax_of,
                         weight_tolerance)

DTYPES = [np.float32, np.float64]

# The seed's worked example: 猫 / 在 / 草地上 / 跑
SEED_A = np.array([[0.1, 0.2, 0.3],    # 猫
                   [0.4, 0.5, 0.6],    # 在
                   [0.7, 0.8, 0.9],    # 草地上
                   [1.0, 1.1, 1.2]])   # 跑
SEED_V = np.array([[0.0, 0.0, 1.0],    # v1: 猫 is a subject
                   [0.0, 1.0, 0.0],    # v2: 在 goes with a place
                   [0.0, 1.0, 0.0],    # v3: 草地上 is a place
                   [1.0, 0.0, 0.0]])   # v4: 跑 is an action
SEED_WEIGHTS = np.array([0.1, 0.2, 0.3, 0.4])
SEED_B1 = np.array([0.4, 0.5, 0.1])


def _atol(dtype):
    """Weights of moderate logits (|logit| <= ~3): a few ulps of 1 (8 eps: 1e-6 float32, 2e-15 float64)."""
    return 8 * TOL[np.dtype(dtype)]["eps"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_seed_worked_example(isa, dtype):
    # E = 1, scale = 1, q = 1 and k_j = log(a_1j): softmax gives exactly 0.1, 0.2, 0.3, 0.4
    q = np.ones((4, 1), dtype=dtype)
    k = np.log(SEED_WEIGHTS)[:, None].astype(dtype)
    v = SEED_V.astype(dtype)
    out, lse = selfattn.scaled_dot_product_attention(q, k, v, scale=1.0, return_lse=True)
    assert out.shape == (4, 3) and out.dtype == dtype
    np.testing.assert_allclose(out, np.tile(SEED_B1, (4, 1)), rtol=0, atol=_atol(dtype))
    # sum_j exp(log 0.1 j) = 1  ->  lse = 0
    assert lse.shape == (4,) and lse.dtype == dtype
    np.testing.assert_allclose(lse, 0.0, atol=10 * _atol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_seed_example_sharpened_rows(isa, dtype):
    # query i scales the logits by c_i: weights (0.1 j)^c / sum_j (0.1 j)^c
    c = np.array([1.0, 2.0, 0.0, -1.0])
    q = c[:, None].astype(dtype)
    k = np.log(SEED_WEIGHTS)[:, None].astype(dtype)
    v = SEED_V.astype(dtype)
    out = selfattn.scaled_dot_product_attention(q, k, v, scale=1.0)
    j = np.arange(1, 5, dtype=np.float64)
    w = (j[None, :] / 10.0) ** c[:, None]
    w /= w.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out, w @ SEED_V, rtol=0, atol=_atol(dtype))
    # c = 2: (1, 4, 9, 16) / 30
    np.testing.assert_allclose(out[1], [16 / 30, 13 / 30, 1 / 30], rtol=0, atol=_atol(dtype))
    # c = 0: uniform
    np.testing.assert_allclose(out[2], [0.25, 0.5, 0.25], rtol=0, atol=_atol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_seed_example_batched_heads(isa, dtype):
    # the same example replicated over batch/head dims, with L != S and a shifted copy
    q = np.ones((2, 3, 5, 1), dtype=dtype)
    q[1] = 2.0
    k = np.broadcast_to(np.log(SEED_WEIGHTS)[:, None].astype(dtype), (2, 3, 4, 1))
    v = np.broadcast_to(SEED_V.astype(dtype), (2, 3, 4, 3))
    out = selfattn.scaled_dot_product_attention(q, k, v, scale=1.0)
    assert out.shape == (2, 3, 5, 3)
    np.testing.assert_allclose(out[0], np.broadcast_to(SEED_B1, (3, 5, 3)), rtol=0, atol=_atol(dtype))
    np.testing.assert_allclose(out[1], np.broadcast_to([16 / 30, 13 / 30, 1 / 30], (3, 5, 3)),
                               rtol=0, atol=_atol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S_at", ["1", "2", "nr-1", "nr", "nr+1", "bk-1", "bk", "bk+1", "2*bk+1"])
def test_equal_keys_give_mean_of_values(isa, dtype, S_at):
    S, L = edge(isa, dtype, S_at), edge(isa, dtype, "bq+mr-2")
    rng = np.random.default_rng(S)
    E, Ev = 17, 9
    q = rng.standard_normal((L, E)).astype(dtype)
    k = np.broadcast_to(rng.standard_normal((1, E)), (S, E)).astype(dtype)
    v = rng.standard_normal((S, Ev)).astype(dtype)
    out, lse = selfattn.scaled_dot_product_attention(q, k, v, return_lse=True)
    expect = np.broadcast_to(v.astype(np.float64).mean(axis=0), (L, Ev))
    tol = tolerance(dtype, logit_magnitude(q, k)) * vmax_of(v) * 4
    np.testing.assert_allclose(out, expect, rtol=0, atol=tol)
    # lse = logit + log S
    logit = (q.astype(np.float64) @ k[0].astype(np.float64)) / math.sqrt(E)
    np.testing.assert_allclose(lse, logit + math.log(S), rtol=0, atol=tol * (10 + abs(logit).max()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S_at", ["5", "bk", "bk+bk//2+8"])
def test_zero_scale_gives_mean_of_values(isa, dtype, S_at):
    S = edge(isa, dtype, S_at)
    rng = np.random.default_rng(1)
    q = rng.standard_normal((3, edge(isa, dtype, "bq+2"), 8)).astype(dtype)
    k = rng.standard_normal((3, S, 8)).astype(dtype)
    v = rng.standard_normal((3, S, 4)).astype(dtype)
    out = selfattn.scaled_dot_product_attention(q, k, v, scale=0.0)
    expect = np.broadcast_to(v.astype(np.float64).mean(axis=1, keepdims=True), out.shape)
    np.testing.assert_allclose(out, expect, rtol=0, atol=tolerance(dtype) * 4 * vmax_of(v))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S_at,j0_at", [("1", "0"), ("4", "3"), ("nr", "0"), ("nr", "nr-1"), ("bk+1", "bk-1"),
                                        ("bk+1", "bk"), ("2*bk+1", "2*bk"), ("2*bk+44", "bk+3")])
def test_one_dominant_score_selects_its_value(isa, dtype, S_at, j0_at):
    S, j0 = edge(isa, dtype, S_at), edge(isa, dtype, j0_at, at_least=0)
    rng = np.random.default_rng(S + j0)
    L, E, Ev = edge(isa, dtype, "bq+1"), 4, 6
    q = np.zeros((L, E), dtype=dtype)
    q[:, 0] = 1.0
    k = np.zeros((S, E), dtype=dtype)
    k[:, 1:] = rng.standard_normal((S, E - 1))
    k[j0, 0] = 60.0                       # logit 60 vs 0: other weights ~ 1e-26
    v = rng.standard_normal((S, Ev)).astype(dtype)
    out, lse = selfattn.scaled_dot_product_attention(q, k, v, scale=1.0, return_lse=True)
    np.testing.assert_allclose(out, np.broadcast_to(v[j0].astype(np.float64), (L, Ev)),
                               rtol=0, atol=_atol(dtype) * vmax_of(v))
    np.testing.assert_allclose(lse, 60.0, rtol=0, atol=lse_tolerance(dtype, 60.0, 60.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_attend_on_seed_inputs(isa, dtype):
    rng = np.random.default_rng(4)
    x = SEED_A.astype(dtype)
    # identity projections: softmax(x x^T / sqrt 3) x, spelled out here
    eye = np.eye(3, dtype=dtype)
    out = selfattn.attend(x, eye, eye, eye)
    xs = SEED_A
    s = xs @ xs.T / math.sqrt(3)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    assert out.shape == (4, 3) and out.dtype == dtype
    np.testing.assert_allclose(out, p @ xs, rtol=0, atol=_atol(dtype))
    # random projections, three heads of width 1 and 2, an output projection, causal
    wq = rng.standard_normal((3, 3)).astype(dtype)
    wk = rng.standard_normal((3, 3)).astype(dtype)
    wv = rng.standard_normal((3, 6)).astype(dtype)
    wo = rng.standard_normal((6, 5)).astype(dtype)
    for kw in (dict(), dict(num_heads=3), dict(num_heads=3, wo=wo), dict(num_heads=3, is_causal=True),
               dict(scale=0.7, wo=wo, is_causal=True)):
        got = selfattn.attend(x, wq, wk, wv, **kw)
        ref = reference.attend(x, wq, wk, wv, **kw)
        assert got.shape == ref.shape and got.dtype == dtype, kw
        np.testing.assert_allclose(got, ref, rtol=0, atol=20 * _atol(dtype) * max(1.0, np.abs(ref).max()),
                                   err_msg=str(kw))
    # causal: 猫 (first token) only sees itself
    got = selfattn.attend(x, wq, wk, wv, num_heads=3, is_causal=True)
    np.testing.assert_allclose(got[0], (x @ wv)[0], rtol=0, atol=10 * _atol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", [1e4, -1e4])
def test_huge_logits_exact_softmax(isa, dtype, base):
    # logits base, base-1, base-2 (exact in float32): weights softmax([0, -1, -2])
    q = np.ones((3, 1), dtype=dtype)
    k = np.array([[base], [base - 1], [base - 2]], dtype=dtype)
    v = np.eye(3, dtype=dtype)
    out, lse = selfattn.scaled_dot_product_attention(q, k, v, scale=1.0, return_lse=True)
    w = np.exp([0.0, -1.0, -2.0])
    w /= w.sum()
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    np.testing.assert_allclose(out, np.tile(w, (3, 1)), rtol=0, atol=weight_tolerance(dtype, abs(base)))
    np.testing.assert_allclose(lse, base + math.log(np.exp([0.0, -1.0, -2.0]).sum()), rtol=0,
                               atol=lse_tolerance(dtype, abs(base), abs(base)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S_at", ["bk+2", "2*bk+44"])
@pytest.mark.parametrize("where_max", ["first_block", "last_block"])
def test_huge_logits_across_key_blocks(isa, dtype, S_at, where_max):
    # +-1e4 logits in different key blocks: the online-softmax rescale sees exp(-2e4)
    S, L = edge(isa, dtype, S_at), edge(isa, dtype, "bq+6")
    rng = np.random.default_rng(S)
    q = np.ones((L, 1), dtype=dtype)
    k = np.full((S, 1), -1e4, dtype=dtype)
    hot = [0, 5] if where_max == "first_block" else [S - 1, S - 3]
    k[hot, 0] = 1e4
    k[hot[1], 0] = 1e4 - 1
    v = rng.standard_normal((S, 7)).astype(dtype)
    out, lse = selfattn.scaled_dot_product_attention(q, k, v, scale=1.0, return_lse=True)
    w = np.exp([0.0, -1.0])
    w /= w.sum()
    expect = w[0] * v[hot[0]].astype(np.float64) + w[1] * v[hot[1]].astype(np.float64)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    np.testing.assert_allclose(out, np.broadcast_to(expect, out.shape), rtol=0,
                               atol=weight_tolerance(dtype, 1e4) * vmax_of(v))
    # lse = log(e^1e4 + e^(1e4 - 1) + (S - 2) e^-1e4) = 1e4 + log(1 + 1/e)
    np.testing.assert_allclose(lse, 1e4 + math.log1p(math.exp(-1.0)), rtol=0, atol=lse_tolerance(dtype, 1e4, 1e4))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", [3, 64, 129])
def test_scale_100_logits_match_reference(isa, dtype, E):
    rng = np.random.default_rng(E)
    q = rng.standard_normal((2, 65, E)).astype(dtype)
    k = rng.standard_normal((2, 140, E)).astype(dtype)
    v = rng.standard_normal((2, 140, 5)).astype(dtype)
    out, lse = selfattn.scaled_dot_product_attention(q, k, v, scale=100.0, return_lse=True)
    ref, ref_lse = reference.scaled_dot_product_attention(q, k, v, scale=100.0, return_lse=True)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    # logits ~ 100 * sqrt(E) * 4: the softmax is nearly one-hot, and must pick the same key
    assert_sdpa_close(out, ref, dtype, vmax_of(v), logit_magnitude(q, k, 100.0), lse, ref_lse)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_first_key_block_then_valid_keys(isa, dtype):
    # the whole first key block (and then some) is -inf: no NaN from exp(-inf - -inf)
    rng = np.random.default_rng(7)
    L, S, dead = edge(isa, dtype, "bq+3"), edge(isa, dtype, "2*bk+4"), edge(isa, dtype, "bk+72")
    q = rng.standard_normal((L, 5)).astype(dtype)
    k = rng.standard_normal((S, 5)).astype(dtype)
    v = rng.standard_normal((S, 3)).astype(dtype)
    fmask = np.zeros((L, S), dtype=dtype)
    fmask[:, :dead] = -np.inf
    bmask = fmask == 0
    for mask in (fmask, bmask):
        out, lse = selfattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
        ref, ref_lse = reference.scaled_dot_product_attention(q[:, :], k[dead:], v[dead:], return_lse=True)
        assert_sdpa_close(out, ref, dtype, vmax_of(v), logit_magnitude(q, k), lse, ref_lse,
                          ctx=f"mask {mask.dtype}: ")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows_are_exact_zeros(isa, dtype):
    rng = np.random.default_rng(8)
    L, S = edge(isa, dtype, "bq+2"), edge(isa, dtype, "bk+3")
    q = rng.standard_normal((2, L, 4)).astype(dtype)
    k = rng.standard_normal((2, S, 4)).astype(dtype)
    v = rng.standard_normal((2, S, 3)).astype(dtype) + 5.0
    bmask = np.ones((L, S), dtype=bool)
    dead = sorted({0, 1} | {edge(isa, dtype, e) for e in ("mr-1", "mr", "bq-1", "bq", "bq+1")})
    bmask[dead] = False
    fmask = np.where(bmask, 0.0, -np.inf).astype(dtype)
    for mask in (bmask, fmask):
        out, lse = selfattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
        assert np.array_equal(out[:, dead], np.zeros((2, len(dead), 3))), f"mask {mask.dtype}"
        assert np.all(lse[:, dead] == -np.inf), f"mask {mask.dtype}"
        alive = [i for i in range(L) if i not in dead]
        assert np.isfinite(out[:, alive]).all() and np.isfinite(lse[:, alive]).all()
        ref, ref_lse = reference.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
        assert_sdpa_close(out, ref, dtype, vmax_of(v), logit_magnitude(q, k), lse, ref_lse)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L_at,S_at", [("1", "1"), ("5", "3"), ("3", "5"), ("bq", "bq"), ("bq+1", "bk+2"),
                                       ("bk+2", "bq+1"), ("3*bq+8", "2*bk+1"), ("bq-1", "nr+1")])
def test_causal_rows_closed_form(isa, dtype, L_at, S_at):
    L, S = edge(isa, dtype, L_at), edge(isa, dtype, S_at)
    # with equal keys, causal row i is the mean of v[0 .. min(i, S-1)]
    rng = np.random.default_rng(L * 1000 + S)
    q = rng.standard_normal((L, 3)).astype(dtype)
    k = np.broadcast_to(rng.standard_normal(3), (S, 3)).astype(dtype)
    v = rng.standard_normal((S, 4)).astype(dtype)
    out = selfattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    csum = np.cumsum(v.astype(np.float64), axis=0)
    n = np.minimum(np.arange(L), S - 1)
    expect = csum[n] / (n + 1)[:, None]
    np.testing.assert_allclose(out, expect, rtol=0, atol=tolerance(dtype, logit_magnitude(q, k)) * 4 * vmax_of(v))
