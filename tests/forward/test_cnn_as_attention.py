"""examples/cnn_as_attention.py: K restricted heads + W_o == a 1-D convolution of width K."""

import importlib.util

import numpy as np
import pytest
from sa_testutil import REPO_ROOT

_EXAMPLE = REPO_ROOT / "examples" / "cnn_as_attention.py"


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("selfattn_example_cnn_as_attention", _EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("K", [1, 2, 3, 5])
@pytest.mark.parametrize("L", [1, 2, 4, 9, 33])
def test_conv_equals_attention(ex, K, L):
    rng = np.random.default_rng(100 * K + L)
    C_in, C_out = 3, 5
    x = rng.standard_normal((2, L, C_in))
    w = rng.standard_normal((K, C_in, C_out))
    b = rng.standard_normal(C_out)
    want = ex.conv1d_loop(x, w, b)
    np.testing.assert_allclose(ex.conv1d_numpy(x, w, b), want, rtol=0, atol=1e-12)
    got64 = ex.conv1d_as_attention(x, w, b)
    assert got64.dtype == np.float64 and got64.shape == (2, L, C_out)
    np.testing.assert_allclose(got64, want, rtol=0, atol=1e-12)
    got32 = ex.conv1d_as_attention(x.astype(np.float32), w.astype(np.float32), b.astype(np.float32))
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, want, rtol=0, atol=1e-5)


def test_unbatched_and_single_channel(ex):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, 1))
    w = rng.standard_normal((3, 1, 1))
    got = ex.conv1d_as_attention(x, w)
    want = np.convolve(x[:, 0], w[::-1, 0, 0], mode="same")[:, None]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_queries_and_keys_do_not_matter(ex):
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((10, 2)), rng.standard_normal((3, 2, 2))
    a = ex.conv1d_as_attention(x, w, rng=np.random.default_rng(0))
    b = ex.conv1d_as_attention(x, w, rng=np.random.default_rng(99))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("K, L", [(1, 1), (3, 1), (3, 6), (5, 4), (4, 7)])
def test_head_masks(ex, K, L):
    m = ex._head_masks(K, L)
    assert m.shape == (K, L, L)
    dense = np.full((K, L, L), -np.inf)
    for h in range(K):
        for i in range(L):
            j = i + h - K // 2
            if 0 <= j < L:
                dense[h, i, j] = 0.0
    np.testing.assert_array_equal(m, dense)
    # a strided view over O(K*L) numbers, not a K*L*L array
    span = m.itemsize + sum(abs(st) * (n - 1) for st, n in zip(m.strides, m.shape))
    assert span <= K * (2 * L - 1) * m.itemsize and not m.flags.owndata


def test_window_size_is_used_where_the_kernel_has_it(ex):
    import inspect
    import selfattn
    has = "window_size" in inspect.signature(selfattn.scaled_dot_product_attention).parameters
    kw = ex._attention_kwargs(5, 8, np.float64)
    assert kw.get("window_size") == (2 if has else None)
    assert kw["attn_mask"].shape == (5, 8, 8)


def test_main_prints_and_returns_zero(ex, capsys):
    assert ex.main() == 0
    out = capsys.readouterr().out
    assert "max |difference|" in out
    worst = float(out.strip().splitlines()[-1].split(":")[-1])
    assert worst <= 1e-12
