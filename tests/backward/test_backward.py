"""The backward: selfattn.scaled_dot_product_attention_vjp (the fused kernel's VJP) against the
float64 reference VJP (reference.scaled_dot_product_attention_vjp, which materialises P) and
against central finite differences of the forward; the reference VJPs themselves against finite
differences; every option, tile edges of every path, threads, re-entrancy and misuse.

Gradients are compared with a bound relative to the largest gradient of the same array (an error
in one logit moves every gradient of its row), growing with the logits' magnitude like the
forward's bounds (sa_testutil.tolerance)."""

import contextvars
import math
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import selfattn
from selfattn import reference
from sa_testutil import (ISAS, assert_close_scaled, assert_unchanged, edge, examples, logit_magnitude,
                         snapshot, tile_params, with_layout)

vjp_k = selfattn.scaled_dot_product_attention_vjp
vjp_r = reference.scaled_dot_product_attention_vjp
DTYPES = (np.float32, np.float64)
NAMES = ("dq", "dk", "dv")


# ---------------------------------------------------------------- helpers

def grad_tol(dtype, logit_mag=0.0):
    """Bound on |error| / max|gradient| of one gradient array computed in `dtype`."""
    eps = float(np.finfo(dtype).eps)
    return 64.0 * eps * (logit_mag + 8.0)


def _maxnorm(a):
    a = np.asarray(a, dtype=np.float64)
    return float(np.max(np.linalg.norm(a, axis=-1), initial=0.0)) if a.size else 0.0


def natural_scales(q, k, v, dout, scale=None):
    """The size an error in (dq, dk, dv) is measured against: |dP_ij| <= |dO_i| |V_j|, so
    |dS_ij| <= 2 P_ij max|dP|, and dq = scale dS K, dk = scale dS^T Q, dv = P^T dO. (A gradient
    that is zero in exact math -- a row that sees one key -- is rounding noise of this size.)"""
    s = abs(float(scale)) if scale is not None else 1.0 / math.sqrt(max(np.shape(q)[-1], 1))
    dp = _maxnorm(dout) * _maxnorm(v)
    return (s * dp * _maxnorm(k), s * dp * _maxnorm(q), _maxnorm(dout))


def assert_grads_close(got, ref, dtype, logit_mag=0.0, ctx="", names=NAMES, nat=None):
    """|got - ref| <= grad_tol * max(max|ref|, natural scale) per gradient array."""
    assert len(got) == len(ref), f"{ctx}{len(got)} gradients, expected {len(ref)}"
    tol = grad_tol(dtype, logit_mag)
    nat = nat or (0.0,) * len(ref)
    for name, g, r, n in zip(names, got, ref, nat):
        assert isinstance(g, np.ndarray), f"{ctx}{name} is {type(g)}"
        assert g.shape == r.shape, f"{ctx}{name} shape {g.shape}, expected {r.shape}"
        scale = max(float(np.max(np.abs(r[np.isfinite(r)]), initial=0.0)), n) or 1.0
        assert_close_scaled(g, r, tol * scale, name, ctx)


def inputs(rng, qs, ks, vs, dtype=np.float64, amp=1.0):
    return tuple((amp * rng.standard_normal(s)).astype(dtype) for s in (qs, ks, vs))


def loss_directional(forward, arrays, dout, rng, h=1e-5, n_dirs=2):
    """[(finite difference, direction per array)] of f(arrays) = sum(forward(*arrays) * dout)."""
    out = []
    for _ in range(n_dirs):
        dirs = [rng.standard_normal(a.shape) for a in arrays]
        plus = forward(*[a + h * d for a, d in zip(arrays, dirs)])
        minus = forward(*[a - h * d for a, d in zip(arrays, dirs)])
        out.append((float(np.sum((plus - minus) * dout)) / (2 * h), dirs))
    return out


def assert_matches_fd(forward, arrays, dout, grads, rng, rtol=1e-6, ctx="", h=1e-5):
    """Each random direction d: <grads, d> equals the central difference of the loss along d
    (all arrays perturbed at once), and so does each array's part alone (first direction)."""
    for fd, dirs in loss_directional(forward, arrays, dout, rng, h):
        an = sum(float(np.sum(g * d)) for g, d in zip(grads, dirs))
        mag = sum(float(np.sum(np.abs(g * d))) for g, d in zip(grads, dirs)) + 1e-12
        assert abs(fd - an) <= rtol * mag + 1e-9, f"{ctx}directional derivative {fd!r} != <grad, d> {an!r}"
    for i, a in enumerate(arrays):          # one array at a time: a wrong sign in one cannot hide
        d = rng.standard_normal(a.shape)
        args_p = [x + h * d if j == i else x for j, x in enumerate(arrays)]
        args_m = [x - h * d if j == i else x for j, x in enumerate(arrays)]
        fd = float(np.sum((forward(*args_p) - forward(*args_m)) * dout)) / (2 * h)
        an = float(np.sum(grads[i] * d))
        mag = float(np.sum(np.abs(grads[i] * d))) + 1e-12
        assert abs(fd - an) <= rtol * mag + 1e-9, f"{ctx}d/d(input {i}): finite difference {fd!r} != {an!r}"


def fd_elementwise(f, arrays, dout, h=1e-6):
    """Central differences of sum(f() * dout), one element at a time (arrays modified in place
    and restored)."""
    grads = []
    for a in arrays:
        g = np.zeros(a.shape)
        for idx in np.ndindex(a.shape):
            old = a[idx]
            a[idx] = old + h
            fp = float(np.sum(f() * dout))
            a[idx] = old - h
            fm = float(np.sum(f() * dout))
            a[idx] = old
            g[idx] = (fp - fm) / (2 * h)
        grads.append(g)
    return grads


# ---------------------------------------------------------------- the option table
# (id, q shape, k shape, v shape, options); masks are given as ("bool"|"float", shape) and made
# by build(): a bool mask with a fully masked row, a float mask with -inf entries and a -inf row.

B, H, L, S, E, EV = 2, 3, 5, 7, 8, 6
QS, KS, VS = (B, H, L, E), (B, H, S, E), (B, H, S, EV)
CASES = [
    ("plain", QS, KS, VS, {}),
    ("causal", QS, KS, VS, dict(is_causal=True)),
    ("causal_L_gt_S", (B, H, 9, E), (B, H, 4, E), (B, H, 4, EV), dict(is_causal=True)),
    ("causal_bottom_right_L_lt_S", QS, KS, VS, dict(is_causal=True, alignment="bottom_right")),
    ("causal_bottom_right_L_gt_S", (B, H, 9, E), (B, H, 4, E), (B, H, 4, EV),
     dict(is_causal=True, alignment="bottom_right")),           # the first rows see nothing
    ("bool_mask", QS, KS, VS, dict(attn_mask=("bool", (L, S)))),
    ("bool_mask_full_shape", QS, KS, VS, dict(attn_mask=("bool", (B, H, L, S)))),
    ("bool_mask_causal", QS, KS, VS, dict(attn_mask=("bool", (H, L, S)), is_causal=True)),
    ("float_mask", QS, KS, VS, dict(attn_mask=("float", (H, L, S)))),
    ("float_mask_broadcast_causal", QS, KS, VS, dict(attn_mask=("float", (1, 1, L, S)), is_causal=True)),
    ("window_symmetric", QS, KS, VS, dict(window_size=1)),
    ("window_left", QS, KS, VS, dict(window_size=(2, None))),
    ("window_right", QS, KS, VS, dict(window_size=(None, 1))),
    ("window_zero", QS, KS, VS, dict(window_size=(0, 0))),
    ("window_both_bottom_right", QS, KS, VS, dict(window_size=(2, 1), alignment="bottom_right")),
    ("window_causal_bottom_right_L_gt_S", (B, H, 9, E), (B, H, 5, E), (B, H, 5, EV),
     dict(window_size=(1, 3), is_causal=True, alignment="bottom_right")),
    ("key_lengths", QS, KS, VS, dict(key_lengths=[3, 7])),
    ("key_lengths_zero", QS, KS, VS, dict(key_lengths=[0, 4])),
    ("key_lengths_full", QS, KS, VS, dict(key_lengths=S)),
    ("key_lengths_causal_bottom_right", QS, KS, VS,
     dict(key_lengths=[4, 6], is_causal=True, alignment="bottom_right")),
    ("key_lengths_window", QS, KS, VS, dict(key_lengths=[5, 2], window_size=(1, 1))),
    ("alibi", QS, KS, VS, dict(alibi_slopes=[0.5, 0.25, 0.125])),
    ("alibi_per_batch_causal", QS, KS, VS, dict(alibi_slopes=[[0.5, 0.3, 0.1], [0.2, 0.7, 1.0]], is_causal=True)),
    ("alibi_bottom_right", QS, KS, VS, dict(alibi_slopes=[0.5, 0.25, 0.125], alignment="bottom_right")),
    ("softcap", QS, KS, VS, dict(softcap=1.5)),
    ("softcap_large_logits", QS, KS, VS, dict(softcap=4.0, scale=2.0)),
    ("softcap_alibi_float_mask", QS, KS, VS, dict(softcap=2.0, alibi_slopes=[0.3, 0.2, 0.1],
                                                  attn_mask=("float", (L, S)))),
    ("scale", QS, KS, VS, dict(scale=0.3)),
    ("scale_negative", QS, KS, VS, dict(scale=-0.7)),
    ("gqa", (B, 6, L, E), (B, 2, S, E), (B, 2, S, EV), dict(enable_gqa=True)),
    ("gqa_causal_window", (B, 6, L, E), (B, 3, S, E), (B, 3, S, EV),
     dict(enable_gqa=True, is_causal=True, window_size=(2, 0))),
    ("gqa_bcast_kv", (B, 4, L, E), (1, 2, S, E), (1, 2, S, EV), dict(enable_gqa=True)),
    ("bcast_kv_batch", (3, H, L, E), (1, H, S, E), (1, H, S, EV), {}),
    ("bcast_kv_heads", QS, (B, 1, S, E), (B, 1, S, EV), dict(is_causal=True)),
    ("bcast_kv_2d", QS, (S, E), (S, EV), {}),
    ("bcast_k_only", QS, (1, H, S, E), VS, {}),
    ("bcast_q", (1, H, L, E), (3, H, S, E), (3, H, S, EV), {}),
    ("bcast_q_2d", (L, E), KS, VS, dict(is_causal=True)),
    ("bcast_q_heads", (B, 1, L, E), KS, VS, dict(alibi_slopes=[0.5, 0.25, 0.125])),
    ("bcast_q_and_kv", (1, H, L, E), (B, 1, S, E), (B, 1, S, EV), dict(key_lengths=[7, 4])),
    ("decode_rows", (B, H, 1, E), (B, H, 40, E), (B, H, 40, EV), dict(key_lengths=[40, 23])),
    ("decode_rows_gqa_bottom_right", (B, 6, 2, E), (B, 2, 40, E), (B, 2, 40, EV),
     dict(enable_gqa=True, is_causal=True, alignment="bottom_right", window_size=(9, None))),
    ("two_d", (L, E), (S, E), (S, EV), {}),
    ("three_d", (H, L, E), (H, S, E), (H, S, EV), dict(window_size=2)),
    ("five_d", (2, 1, 2, L, E), (1, 3, 2, S, E), (1, 3, 2, S, EV), dict(key_lengths=[[3], [7]])),
    ("E5_Ev17", (B, H, L, 5), (B, H, S, 5), (B, H, S, 17), {}),
    ("E17_Ev5", (B, H, L, 17), (B, H, S, 17), (B, H, S, 5), dict(is_causal=True)),
    ("E33_Ev3", (1, 2, L, 33), (1, 2, S, 33), (1, 2, S, 3), dict(softcap=3.0)),
    ("E1_Ev1", (B, H, L, 1), (B, H, S, 1), (B, H, S, 1), {}),
    ("everything", (2, 4, 9, 6), (1, 2, 11, 6), (1, 2, 11, 5),
     dict(enable_gqa=True, attn_mask=("bool", (9, 11)), is_causal=True, alignment="bottom_right",
          window_size=(4, 2), key_lengths=[8, 11], alibi_slopes=[0.1, 0.2, 0.3, 0.4], softcap=2.5,
          scale=0.6)),
    ("everything_float_mask", (2, 4, 9, 6), (2, 4, 11, 6), (2, 4, 11, 5),
     dict(attn_mask=("float", (4, 9, 11)), window_size=(None, 3), key_lengths=[11, 5],
          alibi_slopes=[0.1, 0.2, 0.3, 0.4], softcap=1.0)),
]
CASE_IDS = [c[0] for c in CASES]


def build(case, dtype=np.float64, seed=0, amp=1.0):
    """(q, k, v, options, dout) for one CASES entry."""
    _, qs, ks, vs, kw = case
    rng = np.random.default_rng(seed)
    q, k, v = inputs(rng, qs, ks, vs, dtype, amp)
    kw = dict(kw)
    if "attn_mask" in kw:
        kind, shape = kw["attn_mask"]
        if kind == "bool":
            m = rng.random(shape) < 0.6
            m[..., 1, :] = False                              # a fully masked row
        else:
            m = rng.standard_normal(shape)
            m[rng.random(shape) < 0.2] = -np.inf
            m[..., 2, :] = -np.inf                            # a fully masked row
        kw["attn_mask"] = m
    out = reference.scaled_dot_product_attention(q, k, v, **kw)
    dout = rng.standard_normal(out.shape).astype(dtype)
    return q, k, v, kw, dout


def fwd_kernel(**kw):
    # many tiny calls: one thread each (the thread count changes no bit, see test_threads_*)
    return lambda q, k, v: selfattn.scaled_dot_product_attention(q, k, v, num_threads=1, **kw)


def fwd_ref(**kw):
    return lambda q, k, v: reference.scaled_dot_product_attention(q, k, v, **kw)


# ---------------------------------------------------------------- the reference against finite differences

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reference_vjp_vs_finite_differences(case):
    q, k, v, kw, dout = build(case)
    out, vjp = vjp_r(q, k, v, **kw)
    np.testing.assert_array_equal(out, reference.scaled_dot_product_attention(q, k, v, **kw))
    grads = vjp(dout)
    for g, a, n in zip(grads, (q, k, v), NAMES):
        assert g.shape == a.shape and g.dtype == np.float64, f"{n}: {g.shape} {g.dtype}"
        assert np.all(np.isfinite(g)), f"{n} not finite"
    assert_matches_fd(fwd_ref(**kw), [q, k, v], dout, grads, np.random.default_rng(1))


def test_reference_vjp_elementwise_finite_differences():
    """Every single element of every gradient, on one small case with every option."""
    rng = np.random.default_rng(2)
    q, k, v = inputs(rng, (2, 2, 4, 3), (1, 1, 6, 3), (1, 1, 6, 2))
    kw = dict(enable_gqa=True, is_causal=True, alignment="bottom_right", window_size=(3, 1), key_lengths=[4, 6],
              alibi_slopes=[0.3, 0.6], softcap=1.2, attn_mask=rng.standard_normal((4, 6)))
    out, vjp = vjp_r(q, k, v, **kw)
    dout = rng.standard_normal(out.shape)
    got = vjp(dout)
    fd = fd_elementwise(lambda: reference.scaled_dot_product_attention(q, k, v, **kw), [q, k, v], dout)
    for name, g, f in zip(NAMES, got, fd):
        np.testing.assert_allclose(g, f, rtol=1e-6, atol=1e-8, err_msg=name)
    # keys 4, 5 are beyond the first entry's length but valid for the second: dk, dv there are
    # the second entry's alone, and nonzero
    assert np.any(got[1][..., 4:, :] != 0) and np.any(got[2][..., 4:, :] != 0)


def test_reference_vjp_key_lengths_zero_gradients_beyond():
    rng = np.random.default_rng(3)
    q, k, v = inputs(rng, (3, 2, 4, 5), (3, 2, 9, 5), (3, 2, 9, 4))
    out, vjp = vjp_r(q, k, v, key_lengths=[0, 4, 9], is_causal=True, alignment="bottom_right")
    dq, dk, dv = vjp(rng.standard_normal(out.shape))
    assert np.all(dq[0] == 0) and np.all(dk[0] == 0) and np.all(dv[0] == 0) and np.all(out[0] == 0)
    assert np.all(dk[1, :, 4:] == 0) and np.all(dv[1, :, 4:] == 0)
    assert np.all(dk[1, :, :4] != 0) and np.all(dv[2] != 0)


def test_reference_vjp_validates_dout():
    q = np.ones((3, 4))
    out, vjp = vjp_r(q, q, q)
    with pytest.raises(ValueError, match="dout must have the shape"):
        vjp(np.ones((4, 3)))


VARLEN_CASES = [
    ("plain", {}),
    ("causal", dict(is_causal=True)),
    ("causal_bottom_right_window", dict(is_causal=True, alignment="bottom_right", window_size=(2, None))),
    ("gqa_alibi_softcap", dict(enable_gqa=True, alibi_slopes=[0.2, 0.4, 0.6, 0.8], softcap=2.0, scale=0.5)),
]


def varlen_inputs(rng, gqa, dtype=np.float64):
    cq, ck = [0, 3, 3, 8, 9], [0, 4, 6, 10, 10]       # an empty query sequence, an empty key sequence
    Hq, Hk = (4, 2) if gqa else (4, 4)
    q = rng.standard_normal((Hq, cq[-1], 6)).astype(dtype)
    k = rng.standard_normal((Hk, ck[-1], 6)).astype(dtype)
    v = rng.standard_normal((Hk, ck[-1], 5)).astype(dtype)
    return q, k, v, cq, ck


@pytest.mark.parametrize("kw", [c[1] for c in VARLEN_CASES], ids=[c[0] for c in VARLEN_CASES])
def test_reference_varlen_vjp_vs_finite_differences(kw):
    rng = np.random.default_rng(4)
    q, k, v, cq, ck = varlen_inputs(rng, kw.get("enable_gqa", False))
    out, vjp = reference.varlen_attention_vjp(q, k, v, cq, ck, **kw)
    np.testing.assert_array_equal(out, reference.varlen_attention(q, k, v, cq, ck, **kw))
    dout = rng.standard_normal(out.shape)
    grads = vjp(dout)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert_matches_fd(lambda a, b, c: reference.varlen_attention(a, b, c, cq, ck, **kw), [q, k, v], dout, grads, rng)


ATTEND_CASES = [
    ("plain", dict(num_heads=2)),
    ("wo_biases", dict(num_heads=2, wo=(12, 5), bq=(8,), bk=(8,), bv=(12,), bo=(5,))),
    ("bo_without_wo", dict(num_heads=2, bo=(12,), is_causal=True)),
    ("some_biases", dict(num_heads=2, bk=(8,), bo=(12,))),
    ("rope_gqa_causal", dict(num_heads=4, num_kv_heads=2, rope_base=100.0, is_causal=True, wo=(12, 3))),
    ("window_key_lengths_scale", dict(num_heads=2, window_size=(1, 2), key_lengths=[3, 5], scale=0.7,
                                      bv=(12,))),
]


def attend_inputs(rng, kw):
    H = kw["num_heads"]
    Hkv = kw.get("num_kv_heads", H)
    E, Ev = 4, 12 // H                 # the shapes in ATTEND_CASES are written for these
    x = rng.standard_normal((2, 5, 6))
    wq, wk, wv = (rng.standard_normal(s) for s in ((6, H * E), (6, Hkv * E), (6, Hkv * Ev)))
    kw = {n: (rng.standard_normal(val) if n in ("wo", "bq", "bk", "bv", "bo") else val) for n, val in kw.items()}
    return x, wq, wk, wv, kw


@pytest.mark.parametrize("kw", [c[1] for c in ATTEND_CASES], ids=[c[0] for c in ATTEND_CASES])
def test_reference_attend_vjp_vs_finite_differences(kw):
    rng = np.random.default_rng(5)
    x, wq, wk, wv, kw = attend_inputs(rng, kw)
    y, vjp = reference.attend_vjp(x, wq, wk, wv, **kw)
    np.testing.assert_allclose(y, reference.attend(x, wq, wk, wv, **kw), rtol=0, atol=1e-13)
    np.testing.assert_allclose(y, selfattn.attend(x, wq, wk, wv, **kw), rtol=0, atol=1e-10)
    dy = rng.standard_normal(y.shape)
    grads = vjp(dy)
    extra = [n for n in ("wo", "bq", "bk", "bv", "bo") if n in kw]
    assert len(grads) == 4 + len(extra)
    arrays = [x, wq, wk, wv] + [kw[n] for n in extra]
    for g, a in zip(grads, arrays):
        assert g.shape == a.shape and g.dtype == np.float64

    def forward(*arrs):
        opts = dict(kw)
        opts.update(zip(extra, arrs[4:]))
        return reference.attend(*arrs[:4], **opts)

    assert_matches_fd(forward, arrays, dy, grads, rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kw", [c[1] for c in ATTEND_CASES], ids=[c[0] for c in ATTEND_CASES])
def test_attend_vjp_vs_reference(kw, dtype):
    """selfattn.attend_vjp (the fused forward and backward inside) against reference.attend_vjp:
    the same gradients, in the same order, with the arguments' shapes and the compute dtype."""
    rng = np.random.default_rng(6)
    x, wq, wk, wv, kw = attend_inputs(rng, kw)
    x, wq, wk, wv = (a.astype(dtype) for a in (x, wq, wk, wv))
    kw = {n: (val.astype(dtype) if isinstance(val, np.ndarray) and val.dtype.kind == "f" else val)
          for n, val in kw.items()}
    y, vjp = selfattn.attend_vjp(x, wq, wk, wv, **kw)
    ry, rvjp = reference.attend_vjp(x, wq, wk, wv, **kw)
    assert y.dtype == dtype
    dy = rng.standard_normal(y.shape).astype(dtype)
    got, ref = vjp(dy), rvjp(dy)
    extra = [n for n in ("wo", "bq", "bk", "bv", "bo") if n in kw]
    names = ["dx", "dwq", "dwk", "dwv"] + ["d" + n for n in extra]
    assert len(got) == len(ref) == len(names)
    # dbk is zero in exact math (adding one vector to every key shifts a row's logits by a
    # constant): rounding noise there is measured against the other gradients' size
    floor = 0.1 * max(float(np.abs(r).max()) for r in ref)
    for g, r, a, n in zip(got, ref, [x, wq, wk, wv] + [kw[e] for e in extra], names):
        assert g.shape == a.shape and g.dtype == dtype, f"{n}: {g.shape} {g.dtype}"
        scale = max(float(np.abs(r).max()), floor) or 1.0
        np.testing.assert_allclose(g, r, rtol=0, atol=grad_tol(dtype, 30.0) * scale, err_msg=n)


# ---------------------------------------------------------------- the kernel against the reference

def check_against_reference(q, k, v, kw, dout, dtype, ctx=""):
    out, vjp = vjp_k(q, k, v, **kw)
    grads = vjp(dout)
    rout, rvjp = vjp_r(q, k, v, **{n: x for n, x in kw.items() if n != "num_threads"})
    rgrads = rvjp(dout)
    mag = logit_magnitude(q, k, kw.get("scale"))
    if "softcap" in kw:
        mag = min(mag, kw["softcap"])
    mag += logit_magnitude(q[..., :0], k[..., :0], 1.0, kw.get("attn_mask"))        # the float mask's part
    mag += float(np.max(np.abs(np.asarray(kw.get("alibi_slopes", 0.0))))) * (q.shape[-2] + k.shape[-2])
    for g, a, n in zip(grads, (q, k, v), NAMES):
        assert g.dtype == dtype, f"{ctx}{n} dtype {g.dtype}, expected {np.dtype(dtype)}"
        assert g.shape == a.shape, f"{ctx}{n} shape {g.shape}, expected {a.shape}"
    assert out.dtype == dtype
    assert_grads_close(grads, rgrads, dtype, mag, ctx, nat=natural_scales(q, k, v, dout, kw.get("scale")))
    return grads, rgrads


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kernel_vjp_vs_reference(isa, case, dtype):
    q, k, v, kw, dout = build(case, dtype)
    if dtype is np.float64:
        kw["num_threads"] = 1        # float32 runs with the default thread count, float64 with one
    grads, rgrads = check_against_reference(q, k, v, kw, dout, dtype, f"{isa} {case[0]}: ")
    # structural zeros are exact: rows that see no key get dq = 0, keys that no row sees dk = dv = 0
    opts = {n: x for n, x in kw.items() if n != "num_threads"}
    P = reference.attention_weights(q, k, **opts)                        # lead + (L, S)
    dead_rows, unseen_keys = np.all(P == 0, axis=-1), np.all(P == 0, axis=-2)
    dq, dk, dv = grads
    if dq.shape[:-1] == dead_rows.shape:
        assert np.all(dq[dead_rows] == 0), f"{isa}: dq of rows that see no key is not zero"
    if dk.shape[:-1] == unseen_keys.shape:
        assert np.all(dk[unseen_keys] == 0) and np.all(dv[unseen_keys] == 0), \
            f"{isa}: dk/dv of keys that no row sees is not zero"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kernel_vjp_vs_finite_differences(case):
    """The kernel's gradients are the derivative of the kernel's own forward (float64)."""
    q, k, v, kw, dout = build(case, seed=7)
    out, vjp = vjp_k(q, k, v, **kw)
    assert_matches_fd(fwd_kernel(**kw), [q, k, v], dout, vjp(dout), np.random.default_rng(8), ctx=case[0])


# ---------------------------------------------------------------- tile edges of every path

def _edge_sizes(isa, dtype):
    p = tile_params(isa, dtype)
    Ls = sorted({edge(isa, dtype, e) for e in ("mr-1", "mr+1", "bq-1", "bq", "bq+1", "2*bq+1")})
    Ss = sorted({edge(isa, dtype, e) for e in ("nr-1", "nr+1", "bk-1", "bk", "bk+1", "2*bk+1")})
    Es = sorted({edge(isa, dtype, e) for e in ("vw-1", "vw+1", "2*vw+1")} | {5, 17, 33})
    return p, Ls, Ss, Es


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("mode", ["plain", "causal", "causal_bottom_right_window", "key_lengths_gqa"])
def test_kernel_vjp_tile_edges(isa, dtype, mode):
    """L and S around the query-tile (bq) and key-block (bk) edges, E and Ev around the vector
    width: a whole diagonal of (L, S, E, Ev) combinations per path, against the reference."""
    p, Ls, Ss, Es = _edge_sizes(isa, dtype)
    rng = np.random.default_rng(9)
    n = max(len(Ls), len(Ss))
    for i in range(n):
        Lx, Sx = Ls[i % len(Ls)], Ss[(i * 5 + 2) % len(Ss)]
        Ex, Evx = Es[i % len(Es)], Es[(i + 2) % len(Es)]
        if mode == "key_lengths_gqa":
            q, k, v = inputs(rng, (2, 2, Lx, Ex), (2, 1, Sx, Ex), (2, 1, Sx, Evx), dtype)
            kw = dict(enable_gqa=True, key_lengths=[Sx, max(0, Sx - p["bk"] // 2 - 1)])
        else:
            q, k, v = inputs(rng, (1, 1, Lx, Ex), (1, 1, Sx, Ex), (1, 1, Sx, Evx), dtype)
            kw = {"plain": {}, "causal": dict(is_causal=True),
                  "causal_bottom_right_window": dict(is_causal=True, alignment="bottom_right",
                                                     window_size=(p["bk"] - 3, None))}[mode]
        dout = rng.standard_normal(q.shape[:-1] + (Evx,)).astype(dtype)
        if mode == "key_lengths_gqa":
            dout = rng.standard_normal((2, 2, Lx, Evx)).astype(dtype)
        check_against_reference(q, k, v, kw, dout, dtype, f"{isa} {mode} L={Lx} S={Sx} E={Ex} Ev={Evx}: ")


def test_kernel_vjp_many_key_chunks_with_a_narrow_window(isa):
    """One kv unit and many key blocks: the backward splits the keys into chunks, each with its own
    partial dQ; with a narrow window most chunks see no row of a query tile (their partials must
    still count as zero) -- repeated, so a stale workspace would show."""
    rng = np.random.default_rng(10)
    for dtype, kw in ((np.float32, dict(window_size=(3, 2))), (np.float64, dict(window_size=(1, 0), is_causal=True))):
        bk = tile_params(isa, dtype)["bk"]
        Sx = 4 * bk + 3
        q, k, v = inputs(rng, (1, 1, 40, 8), (1, 1, Sx, 8), (1, 1, Sx, 4), dtype)
        kw = dict(kw, alignment="bottom_right")          # the 40 queries sit on the last keys
        dout = rng.standard_normal((1, 1, 40, 4)).astype(dtype)
        first = check_against_reference(q, k, v, kw, dout, dtype, f"{isa} {dtype.__name__} {kw}: ")[0]
        _, junk = vjp_k(rng.standard_normal(q.shape) * 1e6, k, v)           # dirty the heap
        junk(np.full(dout.shape, np.nan))
        again = vjp_k(q, k, v, **kw)[1](dout)
        for a, b, n in zip(first, again, NAMES):
            assert a.tobytes() == b.tobytes(), f"{isa}: {n} differs on a second call"


@pytest.mark.parametrize("shape", ["many_kv_units", "one_unit_long_keys"])
def test_kernel_vjp_chunks_of_several_key_blocks(isa, shape):
    """A task of the backward walks a chunk of consecutive key blocks of one kv unit, reusing its
    dK/dV block accumulators: chunks hold several blocks when there are many kv units (one chunk
    each) or very many blocks (at most SA_BWD_MAX_CHUNKS chunks). The schedule's compute_tasks
    (kv units x chunks) shows that the chunks really hold several blocks here."""
    rng = np.random.default_rng(31)
    for dtype in DTYPES:
        bk = tile_params(isa, dtype)["bk"]
        if shape == "many_kv_units":
            qs, ks, vs = (4, 8, 5, 8), (4, 8, 2 * bk + 1, 8), (4, 8, 2 * bk + 1, 3)
            kw_list = ({}, dict(window_size=(3, 3), alignment="bottom_right"))
        else:
            Sx = 17 * bk + 1
            qs, ks, vs = (1, 1, 8, 4), (1, 1, Sx, 4), (1, 1, Sx, 3)
            kw_list = ({}, dict(window_size=(bk + 5, 0), alignment="bottom_right", softcap=3.0))
        q, k, v = inputs(rng, qs, ks, vs, dtype)
        n_kv, n_kb = int(np.prod(ks[:-2])), -(-ks[-2] // bk)
        for kw in kw_list:
            out, lse = selfattn._core.sdpa(q, k, v, return_lse=True, **kw)
            sched = selfattn._core.sdpa_bwd(q, k, v, out, lse, out, schedule_only=True, **kw)
            assert sched["compute_tasks"] < n_kv * n_kb, f"{isa}: every chunk is one key block here: {sched}"
            dout = rng.standard_normal(out.shape).astype(dtype)
            check_against_reference(q, k, v, kw, dout, dtype, f"{isa} {shape} {np.dtype(dtype)} {kw}: ")


# ---------------------------------------------------------------- special values

def test_fully_masked_rows_give_zero_gradients(isa):
    rng = np.random.default_rng(11)
    for dtype in DTYPES:
        q, k, v = inputs(rng, (2, 2, 6, 5), (2, 2, 7, 5), (2, 2, 7, 3), dtype)
        mask = rng.random((2, 1, 6, 7)) < 0.7
        mask[0, :, 2] = False
        mask[1, :, 4] = False
        fmask = np.where(mask, 0.0, -np.inf)
        for kw in (dict(attn_mask=mask), dict(attn_mask=fmask), dict(key_lengths=[0, 7]),
                   dict(is_causal=True, alignment="bottom_right", key_lengths=[7, 3]),
                   dict(window_size=(0, 0), alignment="bottom_right", key_lengths=[2, 7])):
            out, vjp = vjp_k(q, k, v, **kw)
            dout = rng.standard_normal(out.shape).astype(dtype)
            dq, dk, dv = vjp(dout)
            rout, rvjp = vjp_r(q, k, v, **kw)
            rdq, rdk, rdv = rvjp(dout)
            dead = np.all(rout == 0, axis=-1) & np.all(rdq == 0, axis=-1)      # rows that see nothing
            assert dead.any(), kw
            for g, n in zip((dq, dk, dv), NAMES):
                assert np.all(np.isfinite(g)), f"{isa} {kw}: {n} not finite"
            assert np.all(dq[dead] == 0), f"{isa} {kw}: dq of fully masked rows not zero"
            assert np.all(out[dead] == 0)
            assert_grads_close((dq, dk, dv), (rdq, rdk, rdv), dtype, logit_magnitude(q, k), f"{isa} {kw}: ",
                               nat=natural_scales(q, k, v, dout))


def test_key_lengths_zero_and_full(isa):
    rng = np.random.default_rng(12)
    for dtype in DTYPES:
        q, k, v = inputs(rng, (3, 2, 5, 4), (3, 2, 9, 4), (3, 2, 9, 6), dtype)
        out, vjp = vjp_k(q, k, v, key_lengths=[0, 9, 4])
        dout = rng.standard_normal(out.shape).astype(dtype)
        dq, dk, dv = vjp(dout)
        assert np.all(dq[0] == 0) and np.all(dk[0] == 0) and np.all(dv[0] == 0)
        assert np.all(dk[2, :, 4:] == 0) and np.all(dv[2, :, 4:] == 0)
        full, fvjp = vjp_k(q, k, v)
        for a, b, n in zip((dq[1], dk[1], dv[1]), [g[1] for g in fvjp(dout)], NAMES):
            # S_b = S is the same problem as no key_lengths
            np.testing.assert_allclose(a, b, rtol=0, atol=grad_tol(dtype) * float(np.abs(b).max()), err_msg=n)
        check_against_reference(q, k, v, dict(key_lengths=[0, 9, 4]), dout, dtype)


def test_keys_beyond_key_lengths_are_never_read(isa):
    """NaN and Inf in keys/values beyond every entry's length change nothing, and get zero gradients."""
    rng = np.random.default_rng(13)
    for dtype in DTYPES:
        q, k, v = inputs(rng, (2, 2, 5, 4), (2, 2, 9, 4), (2, 2, 9, 3), dtype)
        kl = [3, 6]
        clean = vjp_k(q, k, v, key_lengths=kl)
        kd, vd = k.copy(), v.copy()
        kd[0, :, 3:], vd[0, :, 3:] = np.nan, np.inf
        kd[1, :, 6:], vd[1, :, 6:] = np.inf, np.nan
        out, vjp = vjp_k(q, kd, vd, key_lengths=kl)
        dout = rng.standard_normal(out.shape).astype(dtype)
        got, ref = vjp(dout), clean[1](dout)
        for g, r, n in zip(got, ref, NAMES):
            assert g.tobytes() == r.tobytes(), f"{isa} {np.dtype(dtype)}: {n} depends on keys beyond key_lengths"
        assert np.all(got[1][0, :, 3:] == 0) and np.all(got[2][1, :, 6:] == 0)


def test_shared_keys_beyond_one_entrys_length_do_not_leak_into_its_dq():
    """The forward of entry 0 ignores keys >= 3 even when they are NaN (valid keys of entry 1, which
    shares K and V); its dQ must too."""
    rng = np.random.default_rng(14)
    q = rng.standard_normal((2, 1, 4, 8))
    k, v = rng.standard_normal((1, 1, 7, 8)), rng.standard_normal((1, 1, 7, 5))
    k[..., 3:, :] = np.nan
    out, vjp = vjp_k(q, k, v, key_lengths=[3, 7])
    assert np.all(np.isfinite(out[0]))
    dq, dk, dv = vjp(np.ones_like(out))
    assert np.all(np.isfinite(dq[0])), "dq of entry 0 is NaN: it read keys beyond its length"


@pytest.mark.parametrize("how", ["scale", "amplitude", "softcap"])
def test_huge_logits(isa, how):
    """Logits of thousands (a saturated softmax): finite gradients that match the reference."""
    rng = np.random.default_rng(15)
    for dtype in DTYPES:
        amp = 100.0 if how == "amplitude" else 1.0
        q, k, v = inputs(rng, (2, 2, 9, 8), (2, 2, 11, 8), (2, 2, 11, 5), dtype)
        q = (q * amp).astype(dtype)
        kw = {"scale": dict(scale=1e3, is_causal=True), "amplitude": dict(alibi_slopes=[1.0, 3.0]),
              "softcap": dict(scale=1e3, softcap=30.0)}[how]
        out, vjp = vjp_k(q, k, v, **kw)
        dout = rng.standard_normal(out.shape).astype(dtype)
        grads = vjp(dout)
        for g, n in zip(grads, NAMES):
            assert np.all(np.isfinite(g)), f"{isa} {how}: {n} not finite"
        check_against_reference(q, k, v, kw, dout, dtype, f"{isa} {how}: ")


# ---------------------------------------------------------------- threads, re-entrancy, inputs

THREAD_CASES = [
    ("causal_gqa", (2, 4, 150, 24), (2, 2, 300, 24), (2, 2, 300, 20), dict(is_causal=True, enable_gqa=True)),
    ("bcast_kv_window_key_lengths", (3, 2, 140, 16), (1, 2, 290, 16), (1, 2, 290, 9),
     dict(window_size=(70, 10), key_lengths=[290, 200, 131], alignment="bottom_right")),
    ("one_unit_many_blocks", (1, 1, 70, 8), (1, 1, 700, 8), (1, 1, 700, 8), dict(softcap=5.0)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", THREAD_CASES, ids=[c[0] for c in THREAD_CASES])
def test_threads_bitwise_identical(isa, case, dtype):
    q, k, v, kw, dout = build(case, dtype, seed=16)
    results = []
    for nt in (1, 2, 3):
        out, vjp = vjp_k(q, k, v, num_threads=nt, **kw)
        grads = vjp(dout)
        results.append([out.tobytes()] + [g.tobytes() for g in grads])
        if nt == 1 and isa == ISAS[0]:     # these larger problems are right, too
            rout, rvjp = vjp_r(q, k, v, **kw)
            assert_grads_close(grads, rvjp(dout), dtype, logit_magnitude(q, k), f"{case[0]}: ",
                               nat=natural_scales(q, k, v, dout))
    for nt, r in zip((2, 3), results[1:]):
        for name, a, b in zip(("out",) + NAMES, results[0], r):
            assert a == b, f"{isa}: {name} with {nt} threads differs from 1 thread"


def test_vjp_called_several_times():
    """The same vjp with several cotangents: each call is independent (linear in the cotangent),
    and calling again with the first cotangent gives the same bits."""
    q, k, v, kw, dout = build(CASES[CASE_IDS.index("everything")], np.float64, seed=17)
    out, vjp = vjp_k(q, k, v, **kw)
    rng = np.random.default_rng(18)
    d2 = rng.standard_normal(out.shape)
    first = vjp(dout)
    second = vjp(d2)
    both = vjp(dout + 2.0 * d2)
    again = vjp(dout)
    for a, b, n in zip(first, again, NAMES):
        assert a.tobytes() == b.tobytes(), f"{n}: a second call with the same cotangent differs"
    for a, b, c, n in zip(first, second, both, NAMES):
        np.testing.assert_allclose(c, a + 2.0 * b, rtol=1e-10, atol=1e-12, err_msg=n)
    assert not np.allclose(first[0], second[0])
    _, rvjp = vjp_r(q, k, v, **kw)
    assert_grads_close(second, rvjp(d2), np.float64, 10.0)
    zero = vjp(np.zeros_like(out))
    assert all(np.all(g == 0) for g in zero)


def test_vjp_from_two_python_threads_at_once():
    case = THREAD_CASES[0]
    q, k, v, kw, dout = build(case, np.float32, seed=19)
    out, vjp = vjp_k(q, k, v, num_threads=2, **kw)
    expected = [g.tobytes() for g in vjp(dout)]
    barrier = threading.Barrier(2)
    results, errors = [None, None], []

    def worker(i):
        try:
            barrier.wait(timeout=30)
            got = []
            for _ in range(3):
                got.append([g.tobytes() for g in vjp(dout)])
            results[i] = got
        except BaseException as exc:      # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=contextvars.copy_context().run, args=(worker, i)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i in range(2):
        assert results[i] is not None
        for got in results[i]:
            assert got == expected, f"thread {i}: gradients differ from the serial call's"


def test_inputs_are_not_modified(isa):
    q, k, v, kw, dout = build(CASES[CASE_IDS.index("everything")], np.float32, seed=20)
    slopes = np.asarray(kw.pop("alibi_slopes"), dtype=np.float64)
    kl = np.asarray(kw.pop("key_lengths"))
    mask = kw.pop("attn_mask")
    arrays = [q, k, v, dout, slopes, kl, mask]
    snaps = snapshot(*arrays)
    out, vjp = vjp_k(q, k, v, attn_mask=mask, alibi_slopes=slopes, key_lengths=kl, **kw)
    out_copy = out.copy()
    for _ in range(2):
        vjp(dout)
    assert_unchanged(arrays, snaps, f"{isa}: ")
    assert out.tobytes() == out_copy.tobytes(), "the backward modified the returned output"


@pytest.mark.parametrize("entry", ["sdpa", "varlen"])
def test_modifying_the_returned_output_does_not_change_the_gradients(entry):
    q, k, v, kw, dout = build(CASES[0], np.float64)
    if entry == "sdpa":
        out, vjp = vjp_k(q, k, v)
    else:
        q, k, v = q[0], k[0], v[0]
        out, vjp = selfattn.varlen_attention_vjp(q, k, v, [0, 2, 5], [0, 3, 7])
        dout = dout[0]
    before = vjp(dout)
    with pytest.raises(ValueError, match="read-only"):
        out += 1.0                    # what a residual connection written in place does
    after = vjp(dout)
    for a, b, n in zip(before, after, NAMES):
        assert a.tobytes() == b.tobytes(), f"{n} changed after the caller modified the returned out"


def test_gradients_are_fresh_arrays():
    q, k, v, kw, dout = build(CASES[0], np.float64)
    out, vjp = vjp_k(q, k, v)
    g1 = vjp(dout)
    g1c = [g.copy() for g in g1]
    for g in g1:
        g[...] = 0.0       # writable, and owned by the caller: the next call is not affected
    g2 = vjp(dout)
    for a, b in zip(g1c, g2):
        assert a.tobytes() == b.tobytes()
    assert not any(np.shares_memory(a, b) for a in g2 for b in (q, k, v, out, dout))


@pytest.mark.parametrize("layout", ["F", "strided", "negative", "swapped", "readonly"])
def test_input_layouts(layout):
    """Non-contiguous q, k, v, mask and cotangent (NaN padding where strided) read correctly."""
    rng = np.random.default_rng(21)
    q, k, v, kw, dout = build(CASES[CASE_IDS.index("bool_mask_causal")], np.float64, seed=22)
    ref = vjp_k(q, k, v, **kw)[1](dout)
    lay = lambda a: with_layout(a, layout, rng)      # noqa: E731
    kw2 = dict(kw, attn_mask=lay(kw["attn_mask"]))
    out, vjp = vjp_k(lay(q), lay(k), lay(v), **kw2)
    got = vjp(lay(dout))
    for g, r, n in zip(got, ref, NAMES):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-13, err_msg=f"{layout}: {n}")


# ---------------------------------------------------------------- dtypes, shapes, errors

@pytest.mark.parametrize("dt_in,dt_grad", [(np.float16, np.float16), (np.int32, np.float32), (np.int64, np.float32),
                                           (np.bool_, np.float32), (np.float32, np.float32),
                                           (np.float64, np.float64)])
def test_gradient_dtypes(dt_in, dt_grad):
    rng = np.random.default_rng(23)
    q = (rng.standard_normal((2, 4, 3)) * 2).astype(dt_in)
    k = (rng.standard_normal((2, 6, 3)) * 2).astype(dt_in)
    v = (rng.standard_normal((2, 6, 5)) * 2).astype(dt_in)
    out, vjp = vjp_k(q, k, v, is_causal=True)
    dout = rng.standard_normal(out.shape).astype(out.dtype)
    grads = vjp(dout)
    for g, a, n in zip(grads, (q, k, v), NAMES):
        assert g.dtype == dt_grad and g.shape == a.shape, f"{n}: {g.dtype} {g.shape}"
    _, rvjp = vjp_r(q, k, v, is_causal=True)
    ref = rvjp(dout)
    if dt_grad is np.float16:
        # computed in float32 from the float16 output, rounded once to float16: within a few ulps
        # of float16 (bit for bit: tests/dtypes/test_half_precision.py)
        for g, r, n in zip(grads, ref, NAMES):
            scale = float(np.abs(r).max())
            np.testing.assert_allclose(g.astype(np.float64), r, rtol=4e-3, atol=4e-3 * scale, err_msg=n)
    else:
        assert_grads_close(grads, ref, out.dtype, logit_magnitude(q, k))


def test_mixed_dtypes_each_gradient_has_its_inputs_dtype():
    rng = np.random.default_rng(24)
    q = rng.standard_normal((2, 4, 3)).astype(np.float32)
    k = rng.standard_normal((2, 6, 3)).astype(np.float64)
    v = rng.integers(-3, 4, (2, 6, 5)).astype(np.int32)
    out, vjp = vjp_k(q, k, v)
    assert out.dtype == np.float64
    dq, dk, dv = vjp(rng.standard_normal(out.shape).astype(np.float32))      # a cotangent of another dtype
    assert (dq.dtype, dk.dtype, dv.dtype) == (np.float32, np.float64, np.float32)   # integers: float32
    with pytest.raises(TypeError, match="query float32, key float64, value float16"):   # 16 bits: one dtype
        vjp_k(q, k, v.astype(np.float16))


def test_cotangent_as_list_and_int():
    q, k, v, kw, dout = build(CASES[0], np.float64)
    out, vjp = vjp_k(q, k, v)
    a = vjp(dout)
    b = vjp(dout.tolist())
    for x, y in zip(a, b):
        assert x.tobytes() == y.tobytes()
    c = vjp(np.ones(out.shape, dtype=np.int8))
    d = vjp(np.ones(out.shape))
    for x, y in zip(c, d):
        assert x.tobytes() == y.tobytes()


@pytest.mark.parametrize("bad,exc,match", [
    (lambda o: np.ones(o.shape[:-1] + (o.shape[-1] + 1,)), ValueError, r"grad_out must have the shape"),
    (lambda o: np.ones(o.shape[1:]), ValueError, r"grad_out must have the shape"),
    (lambda o: np.ones((1,) + o.shape), ValueError, r"grad_out must have the shape"),
    (lambda o: np.ones(o.shape[:-1] + (1,)), ValueError, r"grad_out must have the shape"),   # no broadcasting
    (lambda o: np.ones(o.shape, np.complex128), TypeError, r"grad_out"),
    (lambda o: np.ones(o.shape, object), TypeError, r"grad_out"),
    (lambda o: None, (TypeError, ValueError), r"grad_out"),
])
def test_bad_cotangent(bad, exc, match):
    q, k, v, kw, dout = build(CASES[0], np.float32)
    out, vjp = vjp_k(q, k, v)
    with pytest.raises(exc, match=match):
        vjp(bad(out))
    vjp(dout)      # still usable


def test_empty_problems():
    rng = np.random.default_rng(25)
    for qs, ks, vs in (((2, 0, 4), (2, 5, 4), (2, 5, 3)), ((2, 3, 4), (2, 0, 4), (2, 0, 3)),
                       ((0, 3, 4), (0, 5, 4), (0, 5, 3)), ((2, 3, 4), (2, 5, 4), (2, 5, 0))):
        q, k, v = inputs(rng, qs, ks, vs)
        out, vjp = vjp_k(q, k, v)
        grads = vjp(np.ones(out.shape))
        rgrads = vjp_r(q, k, v)[1](np.ones(out.shape))
        for g, r, a in zip(grads, rgrads, (q, k, v)):
            assert g.shape == a.shape and np.all(g == 0) and np.all(r == 0)


# ---------------------------------------------------------------- varlen

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kw", [c[1] for c in VARLEN_CASES], ids=[c[0] for c in VARLEN_CASES])
def test_varlen_vjp_vs_per_sequence(isa, kw, dtype):
    rng = np.random.default_rng(26)
    q, k, v, cq, ck = varlen_inputs(rng, kw.get("enable_gqa", False), dtype)
    out, vjp = selfattn.varlen_attention_vjp(q, k, v, cq, ck, **kw)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dq, dk, dv = vjp(dout)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert dq.dtype == dk.dtype == dv.dtype == dtype
    rout, rvjp = reference.varlen_attention_vjp(q, k, v, cq, ck, **kw)
    mag = logit_magnitude(q, k, kw.get("scale")) + 20.0
    assert_grads_close((dq, dk, dv), rvjp(dout), dtype, mag, "varlen vs reference: ",
                       nat=natural_scales(q, k, v, dout, kw.get("scale")))
    for b in range(len(cq) - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        o, f = vjp_k(q[:, qs], k[:, ks], v[:, ks], **kw)
        np.testing.assert_allclose(out[:, qs], o, rtol=0, atol=grad_tol(dtype))
        ref = f(dout[:, qs])
        got = (dq[:, qs], dk[:, ks], dv[:, ks])
        for g, r, n in zip(got, ref, NAMES):
            scale = float(np.abs(r).max(initial=0.0)) or 1.0
            np.testing.assert_allclose(g, r, rtol=0, atol=grad_tol(dtype, mag) * scale, err_msg=f"seq {b}: {n}")


def test_varlen_vjp_vs_finite_differences():
    rng = np.random.default_rng(27)
    kw = VARLEN_CASES[-1][1]
    q, k, v, cq, ck = varlen_inputs(rng, True)
    out, vjp = selfattn.varlen_attention_vjp(q, k, v, cq, ck, **kw)
    dout = rng.standard_normal(out.shape)
    assert_matches_fd(lambda a, b, c: selfattn.varlen_attention(a, b, c, cq, ck, **kw), [q, k, v], dout,
                      vjp(dout), rng)


def test_varlen_threads_bitwise_identical():
    rng = np.random.default_rng(28)
    cq = [0, 100, 101, 260]
    ck = [0, 140, 141, 300]
    q, k, v = inputs(rng, (4, 260, 16), (2, 300, 16), (2, 300, 12), np.float32)
    res = []
    for nt in (1, 2, 3):
        out, vjp = selfattn.varlen_attention_vjp(q, k, v, cq, ck, is_causal=True, enable_gqa=True, num_threads=nt)
        res.append([g.tobytes() for g in vjp(np.ones_like(out))])
    assert res[0] == res[1] == res[2]


def test_varlen_bad_cotangent():
    rng = np.random.default_rng(29)
    q, k, v, cq, ck = varlen_inputs(rng, False)
    out, vjp = selfattn.varlen_attention_vjp(q, k, v, cq, ck)
    with pytest.raises(ValueError, match="grad_out must have the shape"):
        vjp(np.ones((out.shape[0], out.shape[1] - 1, out.shape[2])))


# ---------------------------------------------------------------- a few random problems

@settings(max_examples=examples(10))
@given(data=st.data())
def test_random_problems_vs_reference(data):
    d = data.draw
    dtype = d(st.sampled_from(DTYPES))
    Lx, Sx, Ex, Evx = d(st.integers(1, 40)), d(st.integers(0, 140)), d(st.integers(1, 20)), d(st.integers(1, 20))
    Hk = d(st.integers(1, 2))
    g = d(st.integers(1, 2))
    Bq, Bk = d(st.sampled_from([(1, 1), (2, 2), (2, 1), (1, 2)]))
    kw = dict(enable_gqa=g > 1)
    if d(st.booleans()):
        kw["is_causal"] = True
    if d(st.booleans()):
        kw["alignment"] = "bottom_right"
    if d(st.booleans()):
        kw["window_size"] = (d(st.none() | st.integers(0, 10)), d(st.none() | st.integers(0, 10)))
    if d(st.booleans()):
        kw["key_lengths"] = d(st.lists(st.integers(0, Sx), min_size=max(Bq, Bk), max_size=max(Bq, Bk)))
    if d(st.booleans()):
        kw["softcap"] = d(st.floats(0.5, 20.0))
    if d(st.booleans()):
        kw["alibi_slopes"] = d(st.lists(st.floats(0.0, 1.0), min_size=Hk * g, max_size=Hk * g))
    rng = np.random.default_rng(d(st.integers(0, 2 ** 32 - 1)))
    if d(st.booleans()):
        kw["attn_mask"] = rng.random((Lx, Sx)) < 0.8
    q, k, v = inputs(rng, (Bq, Hk * g, Lx, Ex), (Bk, Hk, Sx, Ex), (Bk, Hk, Sx, Evx), dtype)
    dout = rng.standard_normal((max(Bq, Bk), Hk * g, Lx, Evx)).astype(dtype)
    with selfattn.use_isa(d(st.sampled_from(ISAS))):
        check_against_reference(q, k, v, kw, dout, dtype, f"{kw}: ")
