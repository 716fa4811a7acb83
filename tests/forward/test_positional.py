"""selfattn.positional: sinusoidal table and rotary embeddings (RoPE), against closed forms."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from selfattn import positional

rope = positional.rope
sinusoidal_encoding = positional.sinusoidal_encoding


def _rng(seed=0):
    return np.random.default_rng(seed)


def _pairs(E, interleaved):
    """Index pairs (a, b) rotated together."""
    if interleaved:
        return [(2 * i, 2 * i + 1) for i in range(E // 2)]
    return [(i, i + E // 2) for i in range(E // 2)]


def _rope_loops(x, positions, base, interleaved):
    """RoPE of a 2-D (L, E) x written with scalar loops and math.cos / math.sin."""
    L, E = x.shape
    out = np.array(x, dtype=np.float64)
    for r in range(L):
        for i, (ia, ib) in enumerate(_pairs(E, interleaved)):
            ang = float(positions[r]) * base ** (-2.0 * i / E)
            a, b = float(x[r, ia]), float(x[r, ib])
            out[r, ia] = a * math.cos(ang) - b * math.sin(ang)
            out[r, ib] = b * math.cos(ang) + a * math.sin(ang)
    return out


# --------------------------------------------------------------------------------- sinusoidal

def test_sinusoidal_row0_and_shape():
    t = sinusoidal_encoding(5, 8)
    assert t.shape == (5, 8) and t.dtype == np.float32
    np.testing.assert_array_equal(t[0], np.array([0, 1] * 4, dtype=np.float32))


@pytest.mark.parametrize("p,c,dim,base", [(1, 0, 8, 10000.0), (3, 1, 8, 10000.0), (7, 5, 8, 10000.0),
                                          (100, 6, 16, 10000.0), (2, 3, 6, 100.0), (4, 4, 5, 10000.0)])
def test_sinusoidal_closed_form(p, c, dim, base):
    t = sinusoidal_encoding(p + 1, dim, base=base, dtype=np.float64)
    ang = p * base ** (-2 * (c // 2) / dim)
    expected = math.sin(ang) if c % 2 == 0 else math.cos(ang)
    assert t[p, c] == pytest.approx(expected, abs=1e-13)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_sinusoidal_dtype(dtype):
    t = sinusoidal_encoding(4, 6, dtype=dtype)
    assert t.dtype == dtype
    np.testing.assert_allclose(t, sinusoidal_encoding(4, 6, dtype=np.float64), atol=1e-3)


def test_sinusoidal_empty_and_odd_dim():
    assert sinusoidal_encoding(0, 4).shape == (0, 4)
    t = sinusoidal_encoding(3, 3, dtype=np.float64)
    assert t.shape == (3, 3)
    assert t[2, 2] == pytest.approx(math.sin(2 * 10000.0 ** (-2 / 3)))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(length=-1, dim=4), ValueError, "length"),
    (dict(length=2.0, dim=4), TypeError, "length"),
    (dict(length=True, dim=4), TypeError, "length"),
    (dict(length=2, dim=0), ValueError, "dim"),
    (dict(length=2, dim=4.0), TypeError, "dim"),
    (dict(length=2, dim=4, base=0.0), ValueError, "base"),
    (dict(length=2, dim=4, base=-3), ValueError, "base"),
    (dict(length=2, dim=4, base=float("inf")), ValueError, "base"),
    (dict(length=2, dim=4, base=float("nan")), ValueError, "base"),
    (dict(length=2, dim=4, base="10"), TypeError, "base"),
    (dict(length=2, dim=4, dtype=np.int32), TypeError, "dtype"),
    (dict(length=2, dim=4, dtype="nonsense"), TypeError, "dtype"),
])
def test_sinusoidal_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        sinusoidal_encoding(**kw)


# --------------------------------------------------------------------------------------- rope

@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("base", [10000.0, 50.0])
def test_rope_against_loops(interleaved, base):
    x = _rng(1).standard_normal((5, 6))
    pos = np.array([0, 3, 1, 7, 100])
    got = rope(x, positions=pos, base=base, interleaved=interleaved)
    np.testing.assert_allclose(got, _rope_loops(x, pos, base, interleaved), rtol=0, atol=1e-12)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_position_zero_is_identity(interleaved):
    x = _rng(2).standard_normal((2, 4, 8))
    got = rope(x, positions=np.zeros(4), interleaved=interleaved)
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(rope(x, interleaved=interleaved)[:, 0], x[:, 0])


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_preserves_pair_norms(interleaved):
    x = _rng(3).standard_normal((3, 7, 10))
    y = rope(x, interleaved=interleaved, base=10.0)
    for ia, ib in _pairs(10, interleaved):
        np.testing.assert_allclose(np.hypot(y[..., ia], y[..., ib]), np.hypot(x[..., ia], x[..., ib]),
                                   rtol=1e-13)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_relative_property(interleaved):
    # <rope(q, m), rope(k, n)> depends only on m - n
    rng = _rng(4)
    q, k = rng.standard_normal((1, 8)), rng.standard_normal((1, 8))

    def dot(m, n):
        return float((rope(q, positions=[m], interleaved=interleaved) @
                      rope(k, positions=[n], interleaved=interleaved).T)[0, 0])

    for m, n in [(5, 2), (13, 10), (3, 0), (103, 100)]:
        assert dot(m, n) == pytest.approx(dot(3, 0), abs=1e-12)
    assert dot(4, 0) != pytest.approx(dot(3, 0), abs=1e-6)      # and it does depend on m - n
    assert dot(0.5, 0.25) == pytest.approx(dot(7.25, 7.0), abs=1e-12)  # fractional positions too


def test_rotate_half_and_interleaved_same_rotation_up_to_permutation():
    E = 8
    x = _rng(5).standard_normal((2, 6, E))
    # perm sends the interleaved layout to the rotate-half layout: (x0,x1,x2,...) -> (x0,x2,..,x1,x3,..)
    perm = np.concatenate([np.arange(0, E, 2), np.arange(1, E, 2)])
    np.testing.assert_allclose(rope(x, interleaved=True)[..., perm], rope(x[..., perm]), rtol=0, atol=1e-14)


@pytest.mark.parametrize("interleaved", [False, True])
def test_explicit_positions_equal_default(interleaved):
    x = _rng(6).standard_normal((2, 3, 5, 4))
    d = rope(x, interleaved=interleaved)
    np.testing.assert_array_equal(rope(x, positions=np.arange(5), interleaved=interleaved), d)
    np.testing.assert_array_equal(rope(x, positions=list(range(5)), interleaved=interleaved), d)
    np.testing.assert_array_equal(rope(x, positions=np.arange(5.0), interleaved=interleaved), d)
    np.testing.assert_array_equal(rope(x, positions=np.broadcast_to(np.arange(5), (2, 3, 5)),
                                       interleaved=interleaved), d)


def test_positions_broadcast_over_leading_dims():
    x = _rng(7).standard_normal((2, 3, 4, 6))
    pos = np.array([[0, 5, 9, 2], [1, 1, 1, 1]]).reshape(2, 1, 4)    # per batch, shared by heads
    got = rope(x, positions=pos)
    for b in range(2):
        for h in range(3):
            np.testing.assert_allclose(got[b, h], _rope_loops(x[b, h], pos[b, 0], 10000.0, False),
                                       rtol=0, atol=1e-12)
    # a scalar position applies to every row
    np.testing.assert_allclose(rope(x, positions=3)[0, 0], _rope_loops(x[0, 0], [3] * 4, 10000.0, False),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,out_dtype", [(np.float32, np.float32), (np.float64, np.float64),
                                             (np.float16, np.float32)])
def test_rope_dtype(dtype, out_dtype):
    x = _rng(8).standard_normal((3, 4)).astype(dtype)
    y = rope(x, positions=[0, 1, 50000])
    assert y.dtype == out_dtype and y.shape == x.shape
    ref = _rope_loops(x.astype(np.float64), [0, 1, 50000], 10000.0, False)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-12 if dtype == np.float64 else 2e-6)


def test_rope_lists_give_float64():
    y = rope([[1.0, 0.0], [1.0, 0.0]])
    assert y.dtype == np.float64
    np.testing.assert_allclose(y[1], [math.cos(1), math.sin(1)], rtol=1e-15)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_input_untouched(interleaved):
    x = _rng(9).standard_normal((4, 6)).astype(np.float32)
    pos = np.arange(4)[::-1].copy()
    x0, pos0 = x.copy(), pos.copy()
    x.flags.writeable = False
    y = rope(x, positions=pos, interleaved=interleaved)
    assert y is not x and not np.shares_memory(x, y)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(pos, pos0)


def test_rope_non_contiguous_and_empty():
    x = _rng(10).standard_normal((6, 8))
    np.testing.assert_allclose(rope(x[::2]), rope(np.ascontiguousarray(x[::2])), rtol=0, atol=0)
    xt = np.asfortranarray(x)
    np.testing.assert_array_equal(rope(xt), rope(x))
    assert rope(np.zeros((0, 4))).shape == (0, 4)
    assert rope(np.zeros((3, 0))).shape == (3, 0)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: rope(np.ones((3, 5))), ValueError, "even"),
    (lambda: rope(np.ones(4)), ValueError, "x must have at least 2 dims"),
    (lambda: rope(np.ones((3, 4), dtype=np.int64)), TypeError, "x must be a floating"),
    (lambda: rope(np.ones((3, 4), dtype=bool)), TypeError, "x must be a floating"),
    (lambda: rope(np.ones((3, 4), dtype=np.complex128)), TypeError, "x must be a floating"),
    (lambda: rope(np.ones((3, 4)), positions=np.arange(4)), ValueError, "positions"),
    (lambda: rope(np.ones((2, 3, 4)), positions=np.zeros((3, 3, 3))), ValueError, "positions"),
    (lambda: rope(np.ones((3, 4)), positions=np.zeros((2, 3))), ValueError, "positions"),
    (lambda: rope(np.ones((3, 4)), positions=np.array([0, 1, 2]) + 0j), TypeError, "positions"),
    (lambda: rope(np.ones((3, 4)), positions=np.array([True, False, True])), TypeError, "positions"),
    (lambda: rope(np.ones((3, 4)), positions=["a", "b", "c"]), TypeError, "positions"),
    (lambda: rope(np.ones((3, 4)), positions=[0.0, np.nan, 1.0]), ValueError, "positions"),
    (lambda: rope(np.ones((3, 4)), positions=[0.0, np.inf, 1.0]), ValueError, "positions"),
    (lambda: rope(np.ones((3, 4)), base=0), ValueError, "base"),
    (lambda: rope(np.ones((3, 4)), base=-2.0), ValueError, "base"),
    (lambda: rope(np.ones((3, 4)), base=np.inf), ValueError, "base"),
    (lambda: rope(np.ones((3, 4)), base=None), TypeError, "base"),
    (lambda: rope(np.ones((3, 4)), interleaved="yes"), TypeError, "interleaved"),
])
def test_rope_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@given(L=st.integers(0, 5), half=st.integers(0, 4), lead=st.lists(st.integers(1, 3), max_size=2),
       interleaved=st.booleans(), shift=st.integers(-50, 50), seed=st.integers(0, 2**16))
def test_rope_property_shift_invariance_of_scores(L, half, lead, interleaved, shift, seed):
    """Shifting every position by the same amount leaves q k^T of rotated q, k unchanged."""
    rng = np.random.default_rng(seed)
    E = 2 * half
    q, k = rng.standard_normal(tuple(lead) + (L, E)), rng.standard_normal(tuple(lead) + (L, E))
    pos = rng.integers(0, 100, size=L)
    s0 = rope(q, positions=pos, interleaved=interleaved) @ np.swapaxes(
        rope(k, positions=pos, interleaved=interleaved), -1, -2)
    s1 = rope(q, positions=pos + shift, interleaved=interleaved) @ np.swapaxes(
        rope(k, positions=pos + shift, interleaved=interleaved), -1, -2)
    np.testing.assert_allclose(s1, s0, rtol=0, atol=1e-10 * max(1.0, E))
