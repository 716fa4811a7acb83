"""dtypes, argument validation, empty dims, non-finite values, input kinds."""

import math
import re

import numpy as np
import pytest

import selfattn
from selfattn import reference
from sa_testutil import (ISAS, assert_sdpa_close, assert_unchanged, logit_magnitude, optional_import, snapshot,
                         vmax_of, with_layout)

sdpa = selfattn.scaled_dot_product_attention


def _qkv(dtype=np.float64, q_shape=(2, 3, 5, 4), k_shape=(2, 3, 7, 4), v_shape=(2, 3, 7, 6), seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(s).astype(dtype) for s in (q_shape, k_shape, v_shape))


# ------------------------------------------------------------------ result dtypes

@pytest.mark.parametrize("dtypes,expected", [
    ((np.float32, np.float32, np.float32), np.float32),
    ((np.float64, np.float64, np.float64), np.float64),
    ((np.float32, np.float64, np.float32), np.float64),
    ((np.float64, np.float32, np.float32), np.float64),
    ((np.float32, np.float32, np.float64), np.float64),
    ((np.int32, np.int32, np.int32), np.float32),
    ((np.int64, np.int64, np.int64), np.float32),
    ((np.int8, np.int16, np.uint8), np.float32),
    ((np.bool_, np.bool_, np.bool_), np.float32),
])
def test_result_dtype(isa, dtypes, expected):
    """(float16 and bfloat16 keep their dtype: tests/dtypes/; mixed with another dtype, TypeError: below)"""
    rng = np.random.default_rng(1)
    shapes = ((2, 5, 4), (2, 7, 4), (2, 7, 3))
    arrs = []
    for dt, s in zip(dtypes, shapes):
        if np.dtype(dt) == np.bool_:
            arrs.append(rng.random(s) < 0.5)
        elif np.issubdtype(dt, np.integer):
            arrs.append(rng.integers(0 if np.issubdtype(dt, np.unsignedinteger) else -3, 4, s).astype(dt))
        else:
            arrs.append((rng.standard_normal(s)).astype(dt))
    out, lse = sdpa(*arrs, return_lse=True)
    assert out.dtype == expected, f"inputs {dtypes}: result {out.dtype}, expected {np.dtype(expected)}"
    assert lse.dtype == expected, f"inputs {dtypes}: lse {lse.dtype}, expected {np.dtype(expected)}"
    ref, ref_lse = reference.scaled_dot_product_attention(*arrs, return_lse=True)
    # the values are exact in the working dtype, so the working dtype's tolerance applies
    assert_sdpa_close(out, ref, expected, vmax_of(arrs[2]), logit_magnitude(arrs[0], arrs[1]), lse, ref_lse)


@pytest.mark.parametrize("other", [np.float32, np.float64, np.int32])
def test_float16_mixed_with_another_dtype_is_refused(other):
    """16-bit inputs are read as stored: all three of one dtype (the error names them)."""
    a = np.ones((2, 5, 4), np.float16)
    with pytest.raises(TypeError, match=f"query float16, key {np.dtype(other).name}, value float16"):
        sdpa(a, a.astype(other), a)


@pytest.mark.parametrize("dtypes,expected", [
    ((np.float32,) * 4, np.float32),
    ((np.float64,) * 4, np.float64),
    ((np.float32, np.float64, np.float64, np.float64), np.float64),
    ((np.float64, np.float32, np.float32, np.float32), np.float64),
    ((np.float16,) * 4, np.float32),
])
def test_attend_result_dtype(dtypes, expected):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 6, 8)).astype(dtypes[0])
    wq, wk, wv = (rng.standard_normal((8, 4)).astype(d) for d in dtypes[1:])
    out = selfattn.attend(x, wq, wk, wv, num_heads=2)
    assert out.dtype == expected and out.shape == (3, 6, 4)
    ref = reference.attend(x, wq, wk, wv, num_heads=2)
    tol = 2e-5 if np.dtype(expected) == np.float32 else 1e-12
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol * 10 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("mask_dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_mask_dtypes(isa, dtype, mask_dtype):
    q, k, v = _qkv(dtype)
    rng = np.random.default_rng(3)
    mask = rng.standard_normal((5, 7)).astype(mask_dtype)
    mask[1, 2:] = -np.inf
    out, lse = sdpa(q, k, v, attn_mask=mask, return_lse=True)
    assert out.dtype == dtype
    ref, ref_lse = reference.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
    assert_sdpa_close(out, ref, dtype, vmax_of(v), logit_magnitude(q, k, None, mask), lse, ref_lse)


# ------------------------------------------------------------------ TypeError naming the dtype

BAD_DTYPES = [np.complex64, np.complex128, object, "<U3", "S3"]


def _bad_array(dtype, shape):
    a = np.ones(shape)
    if dtype is object:
        return a.astype(object)
    return a.astype(dtype)


def _names_dtype(msg, dtype):
    dt = np.dtype(dtype)
    names = {str(dt), dt.name, repr(dt)}
    if dt.kind == "U":
        names |= {"str", "unicode"}
    if dt.kind == "S":
        names |= {"bytes"}
    return any(n in msg for n in names)


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
@pytest.mark.parametrize("position", ["query", "key", "value"])
def test_typeerror_for_unsupported_dtypes(dtype, position):
    q, k, v = _qkv()
    args = dict(query=q, key=k, value=v)
    args[position] = _bad_array(dtype, args[position].shape)
    with pytest.raises(TypeError) as ei:
        sdpa(args["query"], args["key"], args["value"])
    assert _names_dtype(str(ei.value), dtype), f"TypeError message does not name the dtype {np.dtype(dtype)}: {ei.value}"


@pytest.mark.parametrize("dtype", BAD_DTYPES + [np.int32, np.int64, np.uint8], ids=str)
def test_typeerror_for_bad_mask_dtype(dtype):
    q, k, v = _qkv()
    mask = _bad_array(dtype, (5, 7))
    with pytest.raises(TypeError) as ei:
        sdpa(q, k, v, attn_mask=mask)
    assert _names_dtype(str(ei.value), dtype), f"TypeError message does not name the dtype {np.dtype(dtype)}: {ei.value}"


@pytest.mark.parametrize("dtype", [np.complex128, object])
def test_attend_typeerror(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3))
    w = rng.standard_normal((3, 3))
    with pytest.raises(TypeError) as ei:
        selfattn.attend(_bad_array(dtype, x.shape), w, w, w)
    assert _names_dtype(str(ei.value), dtype), str(ei.value)
    with pytest.raises(TypeError):
        selfattn.attend(x, w, _bad_array(dtype, w.shape), w)


# ------------------------------------------------------------------ ValueError cases

def _shapes_in(msg, *shapes):
    return all(str(tuple(s)) in msg for s in shapes)


@pytest.mark.parametrize("q_shape,k_shape,v_shape,named", [
    ((2, 3, 4, 5), (2, 3, 6, 7), (2, 3, 6, 8), "qk"),       # E of q vs k
    ((4, 5), (6, 7), (6, 8), "qk"),
    ((2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 7, 8), "kv"),       # S of k vs v
    ((4, 5), (6, 5), (9, 8), "kv"),
    ((2, 3, 4, 5), (2, 2, 6, 5), (2, 2, 6, 8), "qk"),       # heads, no gqa
    ((2, 3, 4, 5), (4, 3, 6, 5), (4, 3, 6, 8), "qk"),       # batch
])
def test_valueerror_mismatched_dims_names_shapes(q_shape, k_shape, v_shape, named):
    q, k, v = _qkv(q_shape=q_shape, k_shape=k_shape, v_shape=v_shape)
    with pytest.raises(ValueError) as ei:
        sdpa(q, k, v)
    shapes = {"qk": (q_shape, k_shape), "kv": (k_shape, v_shape)}[named]
    assert _shapes_in(str(ei.value), *shapes), f"message should name the shapes {shapes}: {ei.value}"


def test_valueerror_kv_heads_mismatch():
    q, k, v = _qkv(q_shape=(2, 3, 4, 5), k_shape=(2, 3, 6, 5), v_shape=(2, 2, 6, 8))
    with pytest.raises(ValueError, match=re.escape(str((2, 2, 6, 8)))):
        sdpa(q, k, v)


@pytest.mark.parametrize("which", ["query", "key", "value"])
@pytest.mark.parametrize("shape", [(5,), ()])
def test_valueerror_too_few_dims(which, shape):
    q, k, v = _qkv(q_shape=(5, 5), k_shape=(5, 5), v_shape=(5, 5))
    args = dict(query=q, key=k, value=v)
    args[which] = np.ones(shape)
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        sdpa(args["query"], args["key"], args["value"])


@pytest.mark.parametrize("mask_shape", [(6, 7), (8,), (5, 1, 7), (2, 2, 5, 7), (5, 6)])
@pytest.mark.parametrize("mask_dtype", [bool, np.float32])
def test_valueerror_mask_not_broadcastable(mask_shape, mask_dtype):
    q, k, v = _qkv()            # out (2, 3, 5, 6), scores (2, 3, 5, 7)
    mask = np.zeros(mask_shape, dtype=mask_dtype)
    with pytest.raises(ValueError, match=re.escape(str(mask_shape))):
        sdpa(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("hq,h", [(6, 4), (3, 2), (5, 3)])
def test_valueerror_gqa_not_multiple(hq, h):
    q, k, v = _qkv(q_shape=(2, hq, 5, 4), k_shape=(2, h, 7, 4), v_shape=(2, h, 7, 6))
    with pytest.raises(ValueError) as ei:
        sdpa(q, k, v, enable_gqa=True)
    msg = str(ei.value)
    assert re.search(rf"\b{hq}\b", msg) and re.search(rf"\b{h}\b", msg), f"message should name {hq} and {h}: {msg}"


def test_gqa_requires_flag():
    q, k, v = _qkv(q_shape=(2, 6, 5, 4), k_shape=(2, 2, 7, 4), v_shape=(2, 2, 7, 6))
    with pytest.raises(ValueError):
        sdpa(q, k, v)
    out = sdpa(q, k, v, enable_gqa=True)
    ref = reference.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert_sdpa_close(out, ref, np.float64, vmax_of(v), logit_magnitude(q, k))


def test_mask_and_causal_compose():
    """attn_mask and is_causal together: a key must pass both (the causal limit as a bool mask)."""
    q, k, v = _qkv()
    rng = np.random.default_rng(2)
    keep = rng.random((5, 7)) < 0.7
    causal = np.tri(5, 7, dtype=bool)
    for mask, as_bool in ((keep, causal & keep), (np.where(keep, rng.standard_normal((5, 7)), -np.inf), None)):
        out = sdpa(q, k, v, attn_mask=mask, is_causal=True)
        if as_bool is not None:
            ref = reference.scaled_dot_product_attention(q, k, v, attn_mask=as_bool)
        else:
            ref = reference.scaled_dot_product_attention(q, k, v, attn_mask=np.where(causal, mask, -np.inf))
        assert_sdpa_close(out, ref, np.float64, vmax_of(v), logit_magnitude(q, k, None, np.where(keep, 1.0, 0.0)))


@pytest.mark.parametrize("bad", [0, -1, -8])
def test_valueerror_num_threads(bad):
    q, k, v = _qkv()
    with pytest.raises(ValueError):
        sdpa(q, k, v, num_threads=bad)
    x = np.ones((4, 3))
    with pytest.raises(ValueError):
        selfattn.attend(x, np.ones((3, 3)), np.ones((3, 3)), np.ones((3, 3)), num_threads=bad)


@pytest.mark.parametrize("bad", [1.5, 2.0, "2", [2]])
def test_typeerror_num_threads(bad):
    q, k, v = _qkv()
    with pytest.raises(TypeError):
        sdpa(q, k, v, num_threads=bad)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, np.float32(np.nan)])
def test_valueerror_nonfinite_scale(bad):
    q, k, v = _qkv()
    with pytest.raises(ValueError):
        sdpa(q, k, v, scale=bad)
    x = np.ones((4, 3))
    with pytest.raises(ValueError):
        selfattn.attend(x, np.ones((3, 3)), np.ones((3, 3)), np.ones((3, 3)), scale=bad)


@pytest.mark.parametrize("bad", ["1", [1.0], 1j, object()])
def test_typeerror_scale(bad):
    q, k, v = _qkv()
    with pytest.raises(TypeError):
        sdpa(q, k, v, scale=bad)


@pytest.mark.parametrize("scale", [2, np.float32(0.5), np.float64(-1.25), 0])
def test_numeric_scale_types_accepted(scale):
    q, k, v = _qkv()
    out = sdpa(q, k, v, scale=scale)
    ref = reference.scaled_dot_product_attention(q, k, v, scale=float(scale))
    assert_sdpa_close(out, ref, np.float64, vmax_of(v), logit_magnitude(q, k, float(scale)))


def test_attend_shape_errors():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 8))
    w = rng.standard_normal((8, 6))
    with pytest.raises(ValueError):            # d_model mismatch
        selfattn.attend(x, rng.standard_normal((7, 6)), w, w)
    with pytest.raises(ValueError):            # H*E not divisible by num_heads
        selfattn.attend(x, w, w, w, num_heads=4)
    with pytest.raises(ValueError):            # wq and wk widths differ
        selfattn.attend(x, w, rng.standard_normal((8, 4)), w)
    with pytest.raises(ValueError):            # wo rows != H*Ev
        selfattn.attend(x, w, w, w, num_heads=2, wo=rng.standard_normal((5, 3)))


# ------------------------------------------------------------------ empty dims

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_L(isa, dtype):
    q, k, v = _qkv(dtype, q_shape=(2, 3, 0, 4))
    for kw in (dict(), dict(is_causal=True), dict(attn_mask=np.ones((0, 7), bool))):
        out, lse = sdpa(q, k, v, return_lse=True, **kw)
        assert out.shape == (2, 3, 0, 6) and out.dtype == dtype
        assert lse.shape == (2, 3, 0) and lse.dtype == dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_S_gives_zeros_and_minus_inf(isa, dtype):
    q, k, v = _qkv(dtype, k_shape=(2, 3, 0, 4), v_shape=(2, 3, 0, 6))
    for kw in (dict(), dict(is_causal=True), dict(attn_mask=np.ones((5, 0), bool)),
               dict(attn_mask=np.zeros((5, 0), dtype))):
        out, lse = sdpa(q, k, v, return_lse=True, **kw)
        assert out.shape == (2, 3, 5, 6) and out.dtype == dtype
        assert np.array_equal(out, np.zeros((2, 3, 5, 6))), kw
        assert lse.shape == (2, 3, 5) and np.all(lse == -np.inf), kw


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_batch_and_heads(isa, dtype):
    q, k, v = _qkv(dtype, q_shape=(0, 3, 5, 4), k_shape=(0, 3, 7, 4), v_shape=(0, 3, 7, 6))
    out, lse = sdpa(q, k, v, return_lse=True)
    assert out.shape == (0, 3, 5, 6) and lse.shape == (0, 3, 5)
    q, k, v = _qkv(dtype, q_shape=(2, 0, 5, 4), k_shape=(2, 0, 7, 4), v_shape=(2, 0, 7, 6))
    out = sdpa(q, k, v)
    assert out.shape == (2, 0, 5, 6) and out.dtype == dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_Ev_still_gives_lse(isa, dtype):
    q, k, v = _qkv(dtype, v_shape=(2, 3, 7, 0))
    out, lse = sdpa(q, k, v, return_lse=True)
    assert out.shape == (2, 3, 5, 0) and out.dtype == dtype
    _, ref_lse = reference.scaled_dot_product_attention(q, k, v, return_lse=True)
    np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("scale", [None, 0.5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_E_gives_mean_of_values(isa, dtype, scale):
    # no features: every logit is 0 -> uniform weights, lse = log S
    q, k, v = _qkv(dtype, q_shape=(2, 3, 5, 0), k_shape=(2, 3, 130, 0), v_shape=(2, 3, 130, 6))
    out, lse = sdpa(q, k, v, return_lse=True, scale=scale)
    assert out.shape == (2, 3, 5, 6)
    np.testing.assert_allclose(out, np.broadcast_to(v.astype(np.float64).mean(axis=-2, keepdims=True), out.shape),
                               rtol=0, atol=1e-5 if dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(lse, math.log(130), rtol=1e-5 if dtype == np.float32 else 1e-12)


# ------------------------------------------------------------------ NaN / Inf propagation

def _nonfinite_cases():
    rng = np.random.default_rng(42)
    L, S, E, Ev = 70, 140, 6, 5
    base = (rng.standard_normal((L, E)), rng.standard_normal((S, E)), rng.standard_normal((S, Ev)))
    cases = {}

    def case(name, mutate, **kw):
        q, k, v = (a.copy() for a in base)
        mutate(q, k, v)
        cases[name] = (q, k, v, kw)

    case("nan_q_row", lambda q, k, v: q.__setitem__((3, 2), np.nan))
    case("nan_k_key", lambda q, k, v: k.__setitem__((100, 0), np.nan))
    case("nan_k_key_causal", lambda q, k, v: k.__setitem__((30, 0), np.nan), is_causal=True)
    bmask = rng.random((L, S)) < 0.7
    bmask[:, 100] = False
    bmask[5, 100] = True
    case("nan_k_key_boolmask", lambda q, k, v: k.__setitem__((100, 1), np.nan), attn_mask=bmask)
    case("nan_v", lambda q, k, v: v.__setitem__((129, 2), np.nan))
    case("inf_v", lambda q, k, v: v.__setitem__((64, 1), np.inf))
    case("inf_and_minus_inf_v", lambda q, k, v: (v.__setitem__((64, 1), np.inf), v.__setitem__((3, 1), -np.inf)))
    case("inf_q", lambda q, k, v: q.__setitem__((10, 0), np.inf))
    fmask = rng.standard_normal((L, S))
    fmask[7, 9] = np.nan
    fmask[8, 130] = np.inf
    case("nonfinite_float_mask", lambda q, k, v: None, attn_mask=fmask)
    case("all_nan", lambda q, k, v: (q.fill(np.nan), k.fill(np.nan), v.fill(np.nan)))
    return cases


NONFINITE = _nonfinite_cases()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(NONFINITE))
def test_nonfinite_propagates_like_reference(isa, name, dtype):
    q, k, v, kw = NONFINITE[name]
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    if "attn_mask" in kw and kw["attn_mask"].dtype != bool:
        kw = dict(kw, attn_mask=kw["attn_mask"].astype(dtype))
    with np.errstate(all="ignore"):
        ref, ref_lse = reference.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    out, lse = sdpa(q, k, v, return_lse=True, **kw)
    assert not np.isfinite(ref).all()   # the case is not vacuous
    assert_sdpa_close(out, ref, dtype, vmax_of(v), logit_magnitude(q, k, None, kw.get("attn_mask")), lse, ref_lse,
                      ctx=f"[{name}] ")


# ------------------------------------------------------------------ inputs are never modified

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_readonly_inputs_unchanged(isa, dtype):
    rng = np.random.default_rng(0)
    q, k, v = _qkv(dtype, q_shape=(2, 4, 70, 16), k_shape=(2, 2, 131, 16), v_shape=(2, 2, 131, 8))
    masks = [rng.random((70, 131)) < 0.5, rng.standard_normal((4, 70, 131)).astype(dtype)]
    for mask in masks:
        arrs = [with_layout(a, "readonly") for a in (q, k, v, mask)]
        snaps = snapshot(*arrs)
        out = sdpa(*arrs[:3], attn_mask=arrs[3], enable_gqa=True)
        assert_unchanged(arrs, snaps)
        assert isinstance(out, np.ndarray) and out.flags.writeable
        assert not any(np.shares_memory(out, a) for a in arrs)
        ref = reference.scaled_dot_product_attention(*arrs[:3], attn_mask=arrs[3], enable_gqa=True)
        assert_sdpa_close(out, ref, dtype, vmax_of(v), logit_magnitude(q, k, None, mask))


@pytest.mark.parametrize("layout", ["strided", "negative", "F", "swapped"])
def test_strided_inputs_unchanged(isa, layout):
    q, k, v = _qkv(np.float32, q_shape=(3, 66, 9), k_shape=(3, 129, 9), v_shape=(3, 129, 4))
    arrs = [with_layout(a, layout) for a in (q, k, v)]
    snaps = snapshot(*arrs)
    out = sdpa(*arrs, is_causal=True)
    assert_unchanged(arrs, snaps)
    ref = reference.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_sdpa_close(out, ref, np.float32, vmax_of(v), logit_magnitude(q, k))


# ------------------------------------------------------------------ other input kinds

def test_python_lists():
    q = [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]
    k = [[0.7, 0.8, 0.9], [1.0, 1.1, 1.2], [0.1, 0.2, 0.3]]
    v = [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    out = sdpa(q, k, v)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (2, 3)
    ref = reference.scaled_dot_product_attention(q, k, v)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-13)
    out_i = sdpa([[1, 0]], [[1, 0], [0, 1]], [[2, 4], [6, 8]], attn_mask=[[True, False]])
    assert out_i.dtype == np.float32
    np.testing.assert_allclose(out_i, [[2.0, 4.0]], rtol=0, atol=1e-6)
    # nested lists into attend
    out_a = selfattn.attend(q, np.eye(3).tolist(), np.eye(3).tolist(), np.eye(3).tolist())
    np.testing.assert_allclose(out_a, reference.attend(q, np.eye(3), np.eye(3), np.eye(3)), rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_memmap_inputs(tmp_path, dtype):
    q, k, v = _qkv(dtype, q_shape=(2, 65, 8), k_shape=(2, 130, 8), v_shape=(2, 130, 3))
    maps = []
    for name, a in zip("qkv", (q, k, v)):
        mm = np.memmap(tmp_path / f"{name}.bin", dtype=dtype, mode="w+", shape=a.shape)
        mm[...] = a
        mm.flush()
        del mm
        maps.append(np.memmap(tmp_path / f"{name}.bin", dtype=dtype, mode="r", shape=a.shape))
    for isa in ISAS:
        with selfattn.use_isa(isa):
            out = sdpa(*maps, is_causal=True)
        assert type(out) is np.ndarray or isinstance(out, np.ndarray)
        ref = reference.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert_sdpa_close(np.asarray(out), ref, dtype, vmax_of(v), logit_magnitude(q, k), ctx=f"[isa={isa}] ")
    assert all(np.array_equal(m, a) for m, a in zip(maps, (q, k, v)))


def test_torch_tensor_inputs():
    torch = optional_import("torch")
    g = torch.Generator().manual_seed(0)
    for tdt, ndt in ((torch.float32, np.float32), (torch.float64, np.float64)):
        q = torch.randn(2, 3, 66, 8, generator=g, dtype=tdt)
        k = torch.randn(2, 3, 8, 130, generator=g, dtype=tdt).transpose(-1, -2)   # non-contiguous
        v = torch.randn(2, 3, 130, 5, generator=g, dtype=tdt)
        mask = torch.rand(66, 130, generator=g) < 0.8
        out = sdpa(q, k, v, attn_mask=mask)
        assert isinstance(out, np.ndarray) and out.dtype == ndt and out.shape == (2, 3, 66, 5)
        qn, kn, vn, mn = (t.numpy() for t in (q, k, v, mask))
        ref = reference.scaled_dot_product_attention(qn, kn, vn, attn_mask=mn)
        assert_sdpa_close(out, ref, ndt, vmax_of(vn), logit_magnitude(qn, kn))
        x = torch.randn(4, 6, generator=g, dtype=tdt)
        w = torch.randn(6, 6, generator=g, dtype=tdt)
        out = selfattn.attend(x, w, w, w, num_heads=2)
        ref = reference.attend(x.numpy(), w.numpy(), w.numpy(), w.numpy(), num_heads=2)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 if ndt == np.float32 else 1e-11)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unaligned_inputs(isa, dtype):
    rng = np.random.default_rng(6)
    itemsize = np.dtype(dtype).itemsize

    def unaligned(a):
        buf = np.zeros(a.nbytes + itemsize, dtype=np.uint8)
        u = buf[1:1 + a.nbytes].view(dtype).reshape(a.shape)
        u[...] = a
        return u

    q, k, v = (rng.standard_normal(s).astype(dtype) for s in ((2, 67, 19), (2, 133, 19), (2, 133, 7)))
    uq, uk, uv = unaligned(q), unaligned(k), unaligned(v)
    assert not uq.flags.aligned and not uk.flags.aligned and not uv.flags.aligned
    out = sdpa(uq, uk, uv)
    ref = reference.scaled_dot_product_attention(q, k, v)
    assert_sdpa_close(out, ref, dtype, vmax_of(v), logit_magnitude(q, k))


@pytest.mark.parametrize("dtype", [">f4", ">f8"])
def test_non_native_byte_order(isa, dtype):
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in ((2, 65, 5), (2, 129, 5), (2, 129, 3)))
    out = sdpa(q, k, v, is_causal=True)
    native = np.dtype(dtype).newbyteorder("=")
    assert out.dtype == native
    ref = reference.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_sdpa_close(out, ref, native, vmax_of(v), logit_magnitude(q, k))
