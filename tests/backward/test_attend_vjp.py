"""selfattn.attend_vjp: the trainable attention layer (forward of attend + its vector-Jacobian product).

Checked against central finite differences of selfattn.attend in float64 (directional
derivatives along random directions, and every coordinate on one small case), against torch
autograd in float64 when torch is installed, and for the contract: the order and number of
the gradients, shapes and dtypes, the same validation as attend, inputs left untouched.
"""

import numpy as np
import pytest

import selfattn
from sa_testutil import optional_import, snapshot, assert_unchanged

D = 8          # d_model
NAMES = ("x", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo")


def _problem(rng, *, lead=(2,), L=6, H=2, Hkv=None, E=4, Ev=3, d_out=5, wo=True, biases="qkvo",
             dtype=np.float64):
    """Arguments of attend: a dict with the arrays given, and the options H / Hkv."""
    Hkv = H if Hkv is None else Hkv
    a = {"x": rng.standard_normal(lead + (L, D)),
         "wq": 0.5 * rng.standard_normal((D, H * E)), "wk": 0.5 * rng.standard_normal((D, Hkv * E)),
         "wv": rng.standard_normal((D, Hkv * Ev))}
    if wo:
        a["wo"] = rng.standard_normal((H * Ev, d_out))
    widths = {"q": H * E, "k": Hkv * E, "v": Hkv * Ev, "o": d_out if wo else H * Ev}
    for c in biases:
        a["b" + c] = rng.standard_normal(widths[c])
    a = {n: v.astype(dtype) for n, v in a.items()}
    opts = {"num_heads": H}
    if Hkv != H:
        opts["num_kv_heads"] = Hkv
    return a, opts


def _call(fn, a, opts):
    kw = {n: v for n, v in a.items() if n not in ("x", "wq", "wk", "wv")}
    return fn(a["x"], a["wq"], a["wk"], a["wv"], **kw, **opts)


def _order(a):
    return [n for n in NAMES if n in a]


CASES = {
    "plain": dict(problem=dict(wo=False, biases=""), opts={}),
    "one_head_2d_x": dict(problem=dict(lead=(), H=1, wo=False, biases=""), opts={}),
    "wo_and_biases": dict(problem=dict(), opts={}),
    "causal": dict(problem=dict(), opts=dict(is_causal=True)),
    "gqa": dict(problem=dict(H=4, Hkv=2), opts=dict(is_causal=True)),
    "mqa_no_wo": dict(problem=dict(H=4, Hkv=1, wo=False, biases="ko"), opts={}),
    "rope": dict(problem=dict(E=6), opts=dict(rope_base=100.0)),
    "rope_causal_gqa": dict(problem=dict(H=4, Hkv=2, E=4), opts=dict(rope_base=10000.0, is_causal=True)),
    "window": dict(problem=dict(L=9), opts=dict(window_size=2)),
    "window_left_causal": dict(problem=dict(L=9), opts=dict(window_size=(3, None), is_causal=True)),
    "key_lengths": dict(problem=dict(lead=(3,)), opts=dict(key_lengths=[6, 3, 1])),
    "key_lengths_causal_rope": dict(problem=dict(lead=(2, 2)), opts=dict(key_lengths=[[6, 2], [4, 5]],
                                                                         is_causal=True, rope_base=50.0)),
    "scale": dict(problem=dict(biases="v"), opts=dict(scale=0.9)),
    "batch_dims": dict(problem=dict(lead=(2, 3), L=4), opts={}),
    "one_token": dict(problem=dict(L=1), opts={}),
}


def _fd_directional(a, opts, dy, grads, rng, h=1e-5, directions=2):
    """Compare <grad_n, u> with the central difference of sum(attend(..) * dy) along u, per argument."""
    f = lambda args: float(np.sum(_call(selfattn.attend, args, opts) * dy))  # noqa: E731
    for n, g in zip(_order(a), grads):
        for _ in range(directions):
            u = rng.standard_normal(a[n].shape)
            plus, minus = dict(a), dict(a)
            plus[n], minus[n] = a[n] + h * u, a[n] - h * u
            fd = (f(plus) - f(minus)) / (2 * h)
            an = float(np.sum(g * u))
            assert abs(an - fd) <= 1e-6 * (1 + abs(fd)), (n, an, fd)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_finite_differences_float64(case):
    rng = np.random.default_rng(sorted(CASES).index(case))
    a, opts = _problem(rng, **CASES[case]["problem"])
    opts.update(CASES[case]["opts"])
    snaps = snapshot(*a.values())
    y, vjp = _call(selfattn.attend_vjp, a, opts)
    np.testing.assert_allclose(y, _call(selfattn.attend, a, opts), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(y, _call(selfattn.reference.attend, a, opts), rtol=1e-11, atol=1e-11)
    dy = rng.standard_normal(y.shape)
    grads = vjp(dy)
    assert len(grads) == len(a)
    for n, g in zip(_order(a), grads):
        assert g.shape == a[n].shape and g.dtype == np.float64, (n, g.shape, g.dtype)
        assert np.all(np.isfinite(g)), n
    _fd_directional(a, opts, dy, grads, rng)
    assert_unchanged(list(a.values()), snaps)
    again = vjp(dy)                      # callable again, same result
    for g1, g2 in zip(grads, again):
        np.testing.assert_array_equal(g1, g2)


def test_every_coordinate_against_finite_differences():
    rng = np.random.default_rng(42)
    a, opts = _problem(rng, lead=(2,), L=4, H=2, Hkv=1, E=2, Ev=2, d_out=3)
    opts.update(is_causal=True, rope_base=10.0)
    y, vjp = _call(selfattn.attend_vjp, a, opts)
    dy = rng.standard_normal(y.shape)
    f = lambda args: float(np.sum(_call(selfattn.attend, args, opts) * dy))  # noqa: E731
    h = 1e-6
    for n, g in zip(_order(a), vjp(dy)):
        num = np.zeros_like(a[n])
        for i in np.ndindex(a[n].shape):
            plus, minus = dict(a), dict(a)
            plus[n], minus[n] = a[n].copy(), a[n].copy()
            plus[n][i] += h
            minus[n][i] -= h
            num[i] = (f(plus) - f(minus)) / (2 * h)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8, err_msg=n)


def test_gradient_order_follows_the_signature():
    rng = np.random.default_rng(1)
    a, opts = _problem(rng, wo=True, biases="ko")          # wo, bk, bo given; bq, bv not
    y, vjp = _call(selfattn.attend_vjp, a, opts)
    grads = vjp(np.ones_like(y))
    assert [g.shape for g in grads] == [a[n].shape for n in ("x", "wq", "wk", "wv", "wo", "bk", "bo")]
    # dbo = dy summed over tokens; with dy = 1 that is the number of tokens
    np.testing.assert_allclose(grads[-1], np.full(a["bo"].shape, y.size // y.shape[-1]))
    # the softmax is invariant to bk (a per-query constant in the logits): dbk = 0
    np.testing.assert_allclose(grads[-2], 0.0, atol=1e-12)
    a, opts = _problem(rng, wo=False, biases="")
    assert len(_call(selfattn.attend_vjp, a, opts)[1](np.ones((2, 6, 6)))) == 4


def _torch_attend(torch, t, opts, L):
    """attend written with torch ops (float64), for autograd."""
    F = torch.nn.functional
    H = opts.get("num_heads", 1)
    Hkv = opts.get("num_kv_heads", H)
    q = t["x"] @ t["wq"] + (t["bq"] if "bq" in t else 0)
    k = t["x"] @ t["wk"] + (t["bk"] if "bk" in t else 0)
    v = t["x"] @ t["wv"] + (t["bv"] if "bv" in t else 0)
    E, Ev = q.shape[-1] // H, v.shape[-1] // Hkv
    heads = lambda z, n, hd: z.reshape(z.shape[:-1] + (n, hd)).transpose(-2, -3)  # noqa: E731
    q, k, v = heads(q, H, E), heads(k, Hkv, E), heads(v, Hkv, Ev)
    if opts.get("rope_base") is not None:
        theta = opts["rope_base"] ** (-2.0 * torch.arange(E // 2, dtype=torch.float64) / E)
        ang = torch.arange(L, dtype=torch.float64)[:, None] * theta
        cos, sin = torch.cos(ang), torch.sin(ang)

        def rot(z):
            a, b = z[..., :E // 2], z[..., E // 2:]
            return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
        q, k = rot(q), rot(k)
    k, v = k.repeat_interleave(H // Hkv, dim=-3), v.repeat_interleave(H // Hkv, dim=-3)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    keep = torch.ones(L, L, dtype=torch.bool)
    if opts.get("is_causal"):
        keep &= j <= i
    w = opts.get("window_size")
    if w is not None:
        left, right = (w, w) if isinstance(w, int) else w
        if left is not None:
            keep &= j >= i - left
        if right is not None:
            keep &= j <= i + right
    if opts.get("key_lengths") is not None:
        kl = torch.as_tensor(np.asarray(opts["key_lengths"]))
        keep = keep & (j < kl[..., None, None, None])          # (..., 1, L, L)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=opts.get("scale"))
    o = o.transpose(-2, -3).reshape(o.shape[:-3] + (L, H * Ev))
    if "wo" in t:
        o = o @ t["wo"]
    return o + (t["bo"] if "bo" in t else 0)


@pytest.mark.parametrize("case", sorted(c for c in CASES if c != "one_head_2d_x"))
def test_matches_torch_autograd_float64(case):
    torch = optional_import("torch")
    rng = np.random.default_rng(100 + sorted(CASES).index(case))
    a, opts = _problem(rng, **CASES[case]["problem"])
    opts.update(CASES[case]["opts"])
    y, vjp = _call(selfattn.attend_vjp, a, opts)
    dy = rng.standard_normal(y.shape)
    grads = vjp(dy)
    t = {n: torch.tensor(v, requires_grad=True) for n, v in a.items()}
    yt = _torch_attend(torch, t, opts, a["x"].shape[-2])
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-11, atol=1e-11)
    yt.backward(torch.from_numpy(dy))
    for n, g in zip(_order(a), grads):
        np.testing.assert_allclose(g, t[n].grad.numpy(), rtol=1e-10, atol=1e-10, err_msg=n)


def test_float32_close_to_float64_and_dtypes_follow_the_inputs():
    rng = np.random.default_rng(7)
    a64, opts = _problem(rng, H=4, Hkv=2)
    opts.update(is_causal=True, rope_base=10000.0)
    a32 = {n: v.astype(np.float32) for n, v in a64.items()}
    y32, vjp32 = _call(selfattn.attend_vjp, a32, opts)
    y64, vjp64 = _call(selfattn.attend_vjp, a64, opts)
    assert y32.dtype == np.float32
    dy = rng.standard_normal(y64.shape)
    for n, g32, g64 in zip(_order(a64), vjp32(dy.astype(np.float32)), vjp64(dy)):
        assert g32.dtype == np.float32
        np.testing.assert_allclose(g32, g64, rtol=2e-3, atol=2e-3 * np.abs(g64).max(), err_msg=n)
    # mixed: float32 weights with float64 x compute in float64; each gradient keeps its argument's dtype
    mixed = dict(a64, wq=a32["wq"], bo=a32["bo"])
    y, vjp = _call(selfattn.attend_vjp, mixed, opts)
    assert y.dtype == np.float64
    grads = dict(zip(_order(mixed), vjp(dy)))
    assert grads["wq"].dtype == np.float32 and grads["bo"].dtype == np.float32 and grads["x"].dtype == np.float64
    # lists are taken like attend takes them
    y_list, vjp_list = selfattn.attend_vjp(a64["x"].tolist(), a64["wq"].tolist(), a64["wk"], a64["wv"],
                                           num_heads=4, num_kv_heads=2)
    assert y_list.dtype == np.float64 and vjp_list(np.ones_like(y_list))[1].shape == a64["wq"].shape


def test_strided_inputs_and_gradient():
    rng = np.random.default_rng(3)
    a, opts = _problem(rng, wo=True, biases="q")
    x_t = np.ascontiguousarray(np.swapaxes(a["x"], -1, -2)).swapaxes(-1, -2)    # same values, F-order slices
    wq_t = np.asfortranarray(a["wq"])
    y, vjp = _call(selfattn.attend_vjp, a, opts)
    y2, vjp2 = _call(selfattn.attend_vjp, dict(a, x=x_t, wq=wq_t), opts)
    np.testing.assert_allclose(y2, y, rtol=1e-14, atol=1e-14)
    dy = rng.standard_normal(y.shape)
    dy_t = np.asfortranarray(dy[..., ::-1])[..., ::-1]
    for g1, g2 in zip(vjp(dy), vjp2(dy_t)):
        np.testing.assert_allclose(g2, g1, rtol=1e-12, atol=1e-12)


BAD = [
    (dict(num_heads=3), ValueError),                             # 8 columns, not a multiple of 3
    (dict(num_heads=0), ValueError),
    (dict(num_heads=2.0), TypeError),
    (dict(num_heads=2, num_kv_heads=3), ValueError),
    (dict(wq=np.zeros((8, 3))), ValueError),                     # torch's (out, in) layout
    (dict(wo=np.zeros((5, 8))), ValueError),
    (dict(bq=np.zeros(7)), ValueError),
    (dict(rope_base=-1.0), ValueError),
    (dict(rope_base="x"), TypeError),
    (dict(window_size=-2), ValueError),
    (dict(key_lengths=[9]), ValueError),
    (dict(scale=float("nan")), ValueError),
    (dict(num_threads=0), ValueError),
]


@pytest.mark.parametrize("bad,exc", BAD, ids=[str(b) for b, _ in BAD])
def test_validation_is_attends(bad, exc):
    rng = np.random.default_rng(0)
    args = {"x": rng.standard_normal((1, 4, 3)), "wq": np.ones((3, 8)), "wk": np.ones((3, 8)),
            "wv": np.ones((3, 8))}
    kw = dict(bad)
    for n in ("wq", "wk", "wv"):
        if n in kw:
            args[n] = kw.pop(n)
    with pytest.raises(exc) as e_attend:
        selfattn.attend(args["x"], args["wq"], args["wk"], args["wv"], **kw)
    with pytest.raises(exc) as e_vjp:
        selfattn.attend_vjp(args["x"], args["wq"], args["wk"], args["wv"], **kw)
    assert str(e_vjp.value) == str(e_attend.value)


def test_bad_cotangent():
    rng = np.random.default_rng(0)
    a, opts = _problem(rng)
    y, vjp = _call(selfattn.attend_vjp, a, opts)
    with pytest.raises(ValueError, match="dy must have the shape"):
        vjp(np.ones(y.shape[:-1]))
    with pytest.raises(TypeError):
        vjp(np.ones(y.shape, dtype=complex))
    with pytest.raises(TypeError):
        selfattn.attend_vjp(a["x"], a["wq"], a["wk"], a["wv"], 2)        # options are keyword-only


def test_exported():
    assert selfattn.attend_vjp is selfattn.autograd.attend_vjp
    assert "attend_vjp" in selfattn.__all__ and "attend_vjp" in selfattn.autograd.__all__


@pytest.mark.parametrize("shapes", [
    dict(x=(2, 0, 4), wq=(4, 4), wk=(4, 4), wv=(4, 4)),                        # no tokens
    dict(x=(0, 3, 4), wq=(4, 4), wk=(4, 4), wv=(4, 4), wo=(4, 2)),             # no sequences
    dict(x=(2, 3, 4), wq=(4, 4), wk=(4, 4), wv=(4, 0)),                        # Ev = 0
    dict(x=(2, 3, 4), wq=(4, 0), wk=(4, 0), wv=(4, 4)),                        # E = 0
    dict(x=(2, 3, 0), wq=(0, 4), wk=(0, 4), wv=(0, 4), bq=(4,), wo=(4, 3), bo=(3,)),   # d_model = 0
    dict(x=(2, 3, 4), wq=(4, 4), wk=(4, 4), wv=(4, 4), wo=(4, 0), bo=(0,)),    # d_out = 0
], ids=["L0", "B0", "Ev0", "E0", "d0", "dout0"])
def test_empty_sizes(shapes):
    rng = np.random.default_rng(0)
    a = {n: rng.standard_normal(s) for n, s in shapes.items()}
    y, vjp = _call(selfattn.attend_vjp, a, {})
    np.testing.assert_array_equal(y, _call(selfattn.attend, a, {}))
    grads = vjp(np.ones_like(y))
    assert [g.shape for g in grads] == [a[n].shape for n in _order(a)]
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_float16_and_integer_arguments():
    w = np.eye(4, dtype=np.float32)
    y, vjp = selfattn.attend_vjp(np.ones((3, 4), np.float16), w, w, w)
    assert [g.dtype for g in vjp(np.ones_like(y))] == [np.float16] + [np.float32] * 3
    y, vjp = selfattn.attend_vjp(np.arange(12).reshape(3, 4), w, w, w.astype(np.float64))
    assert y.dtype == np.float64
    dx, dwq, dwk, dwv = vjp(np.ones_like(y))
    assert dx.dtype == np.float32 and dwq.dtype == np.float32 and dwv.dtype == np.float64
