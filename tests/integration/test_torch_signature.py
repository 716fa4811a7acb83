"""torch's exact signature: (query, key, value, attn_mask, dropout_p, is_causal, *, scale, enable_gqa).

A torch call written positionally must mean what it means in torch, or fail loudly: before, a
positional ``dropout_p=0.1`` landed in ``is_causal`` and ran causal attention silently, and
``is_causal="no"`` counted as true. Checked for every SDPA entry point: selfattn's, the float64
reference, selfattn.torch and selfattn.dask.
"""

import inspect

import numpy as np
import pytest

import selfattn
from selfattn import reference
from sa_testutil import optional_import

TORCH_ORDER = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
POSITIONAL = 6      # scale and enable_gqa are keyword-only in torch (its binding: 3 to 6 positional)


def _numpy_entries():
    return [("selfattn", selfattn.scaled_dot_product_attention),
            ("reference", reference.scaled_dot_product_attention)]


def _qkv(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((2, 3, 9, 8)).astype(dtype) for _ in range(3))


@pytest.mark.parametrize("name,fn", _numpy_entries(), ids=[n for n, _ in _numpy_entries()])
def test_positional_order_is_torchs(name, fn):
    params = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in params[:8]] == TORCH_ORDER
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params[:POSITIONAL])
    assert all(p.kind == p.KEYWORD_ONLY for p in params[POSITIONAL:]), name
    q, k, v = _qkv(np.float64)
    want = fn(q, k, v, is_causal=True, scale=0.3)
    got = fn(q, k, v, None, 0.0, True, scale=0.3, enable_gqa=False)
    assert np.array_equal(got, want)
    assert np.array_equal(fn(q, k, v, None, 0, False), fn(q, k, v))
    assert np.array_equal(fn(q, k, v, dropout_p=0.0, is_causal=np.True_), fn(q, k, v, is_causal=True))


@pytest.mark.parametrize("name,fn", _numpy_entries(), ids=[n for n, _ in _numpy_entries()])
def test_misplaced_or_wrong_values_are_errors(name, fn):
    q, k, v = _qkv()
    # torch's positional dropout runs dropout, never silently causal attention
    got = fn(q, k, v, None, 0.1, seed=3)
    assert np.array_equal(got, fn(q, k, v, dropout_p=0.1, is_causal=False, seed=3))
    assert not np.allclose(got, fn(q, k, v, is_causal=True), atol=1e-3)
    assert np.allclose(got, reference.scaled_dot_product_attention(q, k, v, None, 0.1, seed=3), atol=1e-5)
    with pytest.raises(TypeError, match="dropout_p must be a real number.*is_causal is the 6th"):
        fn(q, k, v, None, True)                      # the older order: is_causal 5th
    for bad in ("no", 1, 0.5, None, [True]):
        with pytest.raises(TypeError, match="is_causal must be a bool"):
            fn(q, k, v, is_causal=bad)
    for bad, exc in (("0", TypeError), (-0.1, ValueError), (1.0, ValueError), (float("nan"), ValueError)):
        with pytest.raises(exc, match="dropout_p"):
            fn(q, k, v, dropout_p=bad)


def test_torch_bridge_signature():
    torch = optional_import("torch")
    import selfattn.torch as st
    params = list(inspect.signature(st.scaled_dot_product_attention).parameters)
    assert params[:8] == TORCH_ORDER
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, None, 0.0, True, scale=0.3)
    got = st.scaled_dot_product_attention(q, k, v, None, 0.0, True, scale=0.3)
    torch.testing.assert_close(got, want)
    kv = k[:, :2], v[:, :2]
    torch.testing.assert_close(st.scaled_dot_product_attention(q, *kv, None, 0.0, False, enable_gqa=True),
                               torch.nn.functional.scaled_dot_product_attention(q, *kv, enable_gqa=True))
    got = st.scaled_dot_product_attention(q, k, v, None, 0.1, seed=4)    # dropout, not causal
    want = reference.scaled_dot_product_attention(q.numpy(), k.numpy(), v.numpy(), None, 0.1, seed=4)
    assert np.allclose(got.numpy(), want, atol=1e-12)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        st.scaled_dot_product_attention(q, k, v, is_causal="no")


def test_dask_signature():
    da = optional_import("dask.array")
    import selfattn.dask as sd
    params = list(inspect.signature(sd.scaled_dot_product_attention).parameters)
    assert params[:8] == TORCH_ORDER
    q, k, v = _qkv(np.float64)
    got = sd.scaled_dot_product_attention(da.from_array(q), k, v, None, 0.0, True).compute()
    assert np.allclose(got, selfattn.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-12, atol=1e-12)
    with pytest.raises(NotImplementedError, match="dropout"):
        sd.scaled_dot_product_attention(q, k, v, None, 0.1)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        sd.scaled_dot_product_attention(q, k, v, is_causal="no")
