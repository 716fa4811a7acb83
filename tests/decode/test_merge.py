"""selfattn.merge_attention: attentions over disjoint key chunks merge into the attention over all keys,
for every option (positions kept by slicing an explicit mask built from them), exactly, associatively,
with fully masked rows, in both dtypes; bad input is refused with the argument named."""

import itertools
import warnings

import numpy as np
import pytest

import selfattn
from selfattn import reference
from sa_testutil import assert_unchanged, snapshot

sdpa = selfattn.scaled_dot_product_attention
merge = selfattn.merge_attention
TOL = {np.float64: 1e-12, np.float32: 2e-5}


def _positions(L, S, S_b, alignment):
    """p(i) (lead + (L, 1)) and j ((1, S)) as selfattn.reference defines them."""
    i = np.arange(L).reshape(L, 1)
    off = 0 if alignment == "top_left" else S_b.reshape(S_b.shape + (1, 1)) - L
    return i + off, np.arange(S).reshape(1, S)


def _explicit(L, S, S_b, Hq, *, is_causal=False, window=None, alignment="top_left", slopes=None):
    """The structured options as an explicit mask (B, 1|Hq, L, S): bool without ALiBi, float with."""
    p, j = _positions(L, S, S_b, alignment)
    vis = np.broadcast_to(j < S_b.reshape(S_b.shape + (1, 1)), S_b.shape + (L, S))
    if is_causal:
        vis = vis & (j <= p)
    if window is not None:
        left, right = window
        if left is not None:
            vis = vis & (j >= p - left)
        if right is not None:
            vis = vis & (j <= p + right)
    vis = vis[:, None]                                          # (B, 1, L, S)
    if slopes is None:
        return vis
    dist = np.broadcast_to(np.abs(p - j), S_b.shape + (L, S))[:, None]
    bias = -np.asarray(slopes, np.float64).reshape(1, Hq, 1, 1) * dist
    return np.where(vis, bias, -np.inf)


CASES = [
    dict(),
    dict(is_causal=True),
    dict(is_causal=True, alignment="bottom_right"),
    dict(window_size=(5, 3)),
    dict(is_causal=True, window_size=(7, 0), alignment="bottom_right"),
    dict(key_lengths=np.array([29, 11])),
    dict(is_causal=True, alignment="bottom_right", key_lengths=np.array([29, 4])),
    dict(alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625])),
    dict(softcap=2.0, is_causal=True, alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625])),
    dict(enable_gqa=True, is_causal=True),
]


def _data(dtype, L=13, S=29, gqa=False, seed=0):
    rng = np.random.default_rng(seed)
    H = 2 if gqa else 4
    q = rng.standard_normal((2, 4, L, 8)).astype(dtype)
    k = rng.standard_normal((2, H, S, 8)).astype(dtype)
    v = rng.standard_normal((2, H, S, 6)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(kw) or "plain")
@pytest.mark.parametrize("bounds", [(0, 29), (0, 10, 29), (0, 1, 7, 8, 20, 29)])
def test_key_chunks_merge_to_the_single_call(kw, dtype, bounds):
    q, k, v = _data(dtype, gqa=kw.get("enable_gqa", False))
    L, S = q.shape[-2], k.shape[-2]
    full, full_lse = sdpa(q, k, v, return_lse=True, **kw)
    ref, ref_lse = reference.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    # each chunk keeps its keys' positions: the structure becomes an explicit mask, sliced per chunk
    S_b = np.broadcast_to(kw.get("key_lengths", S), (2,))
    w = kw.get("window_size")
    mask = _explicit(L, S, S_b, 4, is_causal=kw.get("is_causal", False), alignment=kw.get("alignment", "top_left"),
                     window=None if w is None else (w, w) if isinstance(w, int) else w,
                     slopes=kw.get("alibi_slopes"))
    rest = {n: kw[n] for n in ("softcap", "enable_gqa") if n in kw}
    outs, lses = [], []
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        o, lse = sdpa(q, k[..., s0:s1, :], v[..., s0:s1, :], attn_mask=mask[..., s0:s1], return_lse=True, **rest)
        outs.append(o)
        lses.append(lse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = merge(outs, lses)
    assert out.dtype == dtype and lse.dtype == dtype
    tol = TOL[dtype]
    np.testing.assert_allclose(out, full, rtol=tol, atol=tol)
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * 5)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], full_lse[fin], rtol=tol, atol=tol)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], rtol=tol * 5, atol=tol * 5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_associative_and_equal_to_one_call(dtype):
    q, k, v = _data(dtype, S=30, seed=3)
    causal = np.arange(30) <= np.arange(13)[:, None]        # top-left causal, positions kept
    parts = [sdpa(q, k[..., s, :], v[..., s, :], attn_mask=causal[:, s], return_lse=True)
             for s in (slice(0, 10), slice(10, 20), slice(20, 30))]
    (oa, la), (ob, lb), (oc, lc) = parts
    ab = merge([oa, ob], [la, lb])
    bc = merge([ob, oc], [lb, lc])
    left = merge([ab[0], oc], [ab[1], lc])
    right = merge([oa, bc[0]], [la, bc[1]])
    flat = merge([oa, ob, oc], [la, lb, lc])
    # with top-left causal over 30 keys, the 13 queries see keys 0..12 only: the last part is
    # fully masked in every row (weight 0 everywhere)
    assert np.all(lc == -np.inf) and not oc.any()
    full, full_lse = sdpa(q, k, v, is_causal=True, return_lse=True)
    tol = TOL[dtype]
    for o, lse in (left, right, flat):
        np.testing.assert_allclose(o, full, rtol=tol, atol=tol)
        np.testing.assert_allclose(lse, full_lse, rtol=tol, atol=tol)
    np.testing.assert_allclose(left[0], right[0], rtol=tol, atol=tol)


def test_stacked_array_input_equals_sequence_input_and_inputs_unchanged():
    rng = np.random.default_rng(1)
    outs = rng.standard_normal((3, 2, 5, 4))
    lses = rng.standard_normal((3, 2, 5))
    snaps = snapshot(outs, lses)
    a = merge(outs, lses)
    b = merge(list(outs), tuple(lses))
    assert_unchanged((outs, lses), snaps)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    # by hand, in float64
    w = np.exp(lses - np.log(np.exp(lses).sum(0)))
    np.testing.assert_allclose(a[0], (w[..., None] * outs).sum(0), rtol=1e-14)
    np.testing.assert_allclose(a[1], np.log(np.exp(lses).sum(0)), rtol=1e-14)


def test_single_part_is_the_identity():
    rng = np.random.default_rng(2)
    o, lse = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    mo, ml = merge([o], [lse])
    np.testing.assert_allclose(mo, o, rtol=1e-7)
    np.testing.assert_allclose(ml, lse, rtol=1e-7)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_masked_rows_without_nan_or_warnings(dtype):
    o1 = np.ones((3, 2), dtype)
    o2 = np.full((3, 2), 2.0, dtype)
    l1 = np.array([0.0, -np.inf, -np.inf], dtype)
    l2 = np.array([0.0, 1.5, -np.inf], dtype)
    o1[1:] = 0                                             # masked rows are zeros, as sdpa returns them
    o2[2] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = merge([o1, o2], [l1, l2])
    np.testing.assert_allclose(out[0], 1.5)                # equal weights
    np.testing.assert_allclose(out[1], 2.0)                # only the second part
    np.testing.assert_array_equal(out[2], 0.0)             # masked everywhere: zeros, lse -inf
    assert lse[2] == -np.inf and np.isclose(lse[1], 1.5) and np.isclose(lse[0], np.log(2.0))
    assert np.isfinite(out).all()


def test_large_lse_is_stable():
    # exp(1000) overflows: the merge subtracts the max first
    out, lse = merge([np.ones((1, 1)), np.zeros((1, 1))], [np.array([1000.0]), np.array([1000.0])])
    assert np.isclose(lse[0], 1000.0 + np.log(2.0)) and np.isclose(out[0, 0], 0.5)


def test_errors_name_the_argument():
    o = np.zeros((2, 4, 3))
    lse = np.zeros((2, 4))
    with pytest.raises(ValueError, match="at least one part: outs is empty"):
        merge([], [])
    with pytest.raises(ValueError, match="outs has 2 parts but lses has 1"):
        merge(o, lse[:1])
    with pytest.raises(ValueError, match=r"lses\[1\] has shape \(5,\), expected \(4,\)"):
        merge(list(o), [lse[0], np.zeros(5)])
    with pytest.raises(ValueError, match=r"outs\[1\] has shape \(4, 2\), expected \(4, 3\)"):
        merge([o[0], o[1][:, :2]], list(lse))
    with pytest.raises(TypeError, match=r"outs\[1\] has dtype float32 but outs\[0\] has float64"):
        merge([o[0], o[1].astype(np.float32)], list(lse))
    with pytest.raises(TypeError, match=r"lses\[0\] has dtype float32 but outs\[0\] has float64"):
        merge(o, lse.astype(np.float32))
    with pytest.raises(TypeError, match=r"outs\[0\] has dtype int64"):
        merge(o.astype(np.int64), lse)
    with pytest.raises(TypeError, match=r"lses\[0\] has dtype complex128"):
        merge(o, lse.astype(complex))
    with pytest.raises(ValueError, match="at least 2 dims"):
        merge(np.zeros((2, 3)), np.zeros((2,)))
    with pytest.raises(ValueError, match="outs must be an array"):
        merge(np.float64(1.0), lse)


@pytest.mark.parametrize("n", [2, 5])
def test_random_groupings_agree(n):
    rng = np.random.default_rng(n)
    outs = rng.standard_normal((n, 3, 7, 4))
    lses = 10 * rng.standard_normal((n, 3, 7))
    lses[0, 0, :3] = -np.inf
    flat = merge(outs, lses)
    for k in range(1, n):
        a, b = merge(outs[:k], lses[:k]), merge(outs[k:], lses[k:])
        two = merge([a[0], b[0]], [a[1], b[1]])
        np.testing.assert_allclose(two[0], flat[0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(two[1], flat[1], rtol=1e-12, atol=1e-12)
    for perm in itertools.islice(itertools.permutations(range(n)), 6):
        p = merge(outs[list(perm)], lses[list(perm)])
        np.testing.assert_allclose(p[0], flat[0], rtol=1e-12, atol=1e-12)


def test_docstring_example_runs():
    import doctest
    import selfattn.merge
    result = doctest.testmod(selfattn.merge, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted >= 5 and result.failed == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merge_does_not_depend_on_threads_and_checks_them(dtype):
    """The C merge splits rows over threads; each row is computed the same way whatever their number."""
    rng = np.random.default_rng(12)
    outs = rng.standard_normal((5, 3, 4, 700, 24)).astype(dtype)
    lses = (10 * rng.standard_normal((5, 3, 4, 700))).astype(dtype)
    lses[:, 0, 0, :50] = -np.inf                      # rows masked in every part
    lses[2, 1, :, 100:] = -np.inf                     # a part masked in some rows
    runs = [selfattn.merge_attention(outs, lses, num_threads=t) for t in (1, 2, 3, None)]
    for out, lse in runs[1:]:
        assert np.array_equal(out, runs[0][0]) and np.array_equal(lse, runs[0][1])
    out, lse = runs[0]
    assert np.all(out[0, 0, :50] == 0) and np.all(lse[0, 0, :50] == -np.inf)
    l64 = lses.astype(np.float64)
    m = l64.max(0)
    w = np.exp(l64 - np.where(np.isneginf(m), 0, m))
    ref = np.einsum("n...,n...e->...e", w, outs.astype(np.float64)) / np.where(w.sum(0) == 0, 1, w.sum(0))[..., None]
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol)
    with pytest.raises(ValueError, match="num_threads"):
        selfattn.merge_attention(outs, lses, num_threads=0)
