"""Keys and values stored narrower than the queries: ``quantize_kv`` / ``dequantize_kv``.

    kq, ks = selfattn.quantize_kv(k)            # k (..., S, E) float -> int8 (..., S, E), float32 (..., S)
    vq, vs = selfattn.quantize_kv(v)
    out = selfattn.scaled_dot_product_attention(q, kq, vq, k_scale=ks, v_scale=vs)   # q float32

The kinds (``kv_dtype``; ``KVCache(kv_dtype=...)`` and ``PagedKVCache(kv_dtype=...)`` keep their
cache so, converting on ``append``; the kernels read them as stored: the decode schedule widens
them in registers, the others where they pack):

``"int8"``
    Symmetric, one float32 scale per key (each row: ``s = max|x| / 127``, values ``round(x / s)``
    in [-127, 127]; a row of zeros: s = 0). A quarter of float32's bytes plus 4 bytes per row.
    Error per element at most s / 2, so a row is off by at most max|x| / 254.
``"float8_e4m3fn"``, ``"float8_e5m2"`` (ml_dtypes' float8 types; OCP FP8)
    One float32 scale per head (scales of shape ``x.shape[:-2] + (1,)``: they broadcast over the
    keys), ``x ~= values * scale``; by default ``s = max|x| / 448`` (e4m3fn) or ``/ 57344`` (e5m2)
    over the head, or the ``scale`` given (a calibrated one, as vLLM's ``k_scale``), values past
    the range saturating. A quarter of float32's bytes, no bytes per key. Relative error per
    element 2^-4 (e4m3fn, 3 mantissa bits) or 2^-3 (e5m2), rounded to nearest even.
``"bfloat16"``, ``"float16"`` (a cache only)
    Half of float32's bytes, no scales: float32 queries over a 16-bit cache (rounded to nearest
    even where appended; a float16 cache refuses values past its range, 65504).

The attention output's error against float64 on the float inputs is in docs/performance.rst's
table ("Quantized and 16-bit KV caches").
"""

from typing import Any, Optional, Tuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["quantize_kv", "dequantize_kv", "KV_DTYPES"]

KV_DTYPES = ("int8", "float8_e4m3fn", "float8_e5m2", "bfloat16", "float16")
QUANTIZED = ("int8", "float8_e4m3fn", "float8_e5m2")      # with scales
FLOAT8 = ("float8_e4m3fn", "float8_e5m2")
_QMAX = 127.0
FP8_MAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}


def _kv_dtype(kv_dtype: Any) -> str:
    """The name of a kv_dtype, given by name or as a dtype (np.float16, ml_dtypes.float8_e4m3fn)."""
    name = kv_dtype
    if not isinstance(kv_dtype, str):
        try:
            name = np.dtype(kv_dtype).name
        except TypeError:
            name = None
    if name not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES} (or the dtype), got {kv_dtype!r}")
    return str(name)


def kv_storage_dtype(kv_dtype: str) -> np.dtype:
    """The NumPy dtype a kv_dtype is stored in (ml_dtypes' for bfloat16 and float8)."""
    if kv_dtype == "int8":
        return np.dtype(np.int8)
    if kv_dtype == "float16":
        return np.dtype(np.float16)
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError(f"kv_dtype={kv_dtype!r} needs ml_dtypes for NumPy's {kv_dtype} arrays "
                          f"(pip install ml_dtypes)") from None
    return np.dtype(getattr(ml_dtypes, kv_dtype))


def _real(x: ArrayLike, what: str) -> NDArray[np.float64]:
    try:
        a = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} cannot be read as an array: {exc}") from None
    if a.dtype.kind not in "fiu" and a.dtype.name != "bfloat16":
        raise TypeError(f"quantize_kv needs real numbers, got dtype {a.dtype}")
    return a.astype(np.float64)


def quantize_kv(x: ArrayLike, kv_dtype: Any = "int8", *,
                scale: Optional[ArrayLike] = None) -> Tuple[NDArray[Any], NDArray[np.float32]]:
    """``(values, scales)`` with ``x ~= values * scales[..., None]`` (see the module docstring).

    int8: x (..., S, E) as int8 (same shape) and one float32 scale per row (..., S), symmetric.
    float8 (``"float8_e4m3fn"``, ``"float8_e5m2"``, or ml_dtypes' dtypes): x (..., S, E) as that
    dtype and one float32 scale per head, shape ``x.shape[:-2] + (1,)``: ``max|x|`` over the
    head's (S, E) over the largest finite float8 (a head of zeros: 1), or `scale` (broadcast
    to that shape, > 0), values past ``scale * max`` saturating. x must be real and finite."""
    kind = _kv_dtype(kv_dtype)
    if kind not in QUANTIZED:
        raise ValueError(f"quantize_kv makes int8 or float8 values with scales, got kv_dtype={kind!r} (a "
                         f"{kind} cache keeps values as x.astype({kind}), no scales)")
    a = _real(x, "x")
    if a.ndim < (1 if kind == "int8" else 2):
        raise ValueError(f"quantize_kv needs at least {'one dim (..., E)' if kind == 'int8' else 'two dims (..., S, E)'}"
                         f", got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"quantize_kv needs finite values (NaN or inf cannot be scaled to {kind})")
    if kind == "int8":
        if scale is not None:
            raise TypeError("scale= is for float8 (one scale per head); int8 takes each row's own")
        amax = np.abs(a).max(axis=-1) if a.shape[-1] else np.zeros(a.shape[:-1])
        s32 = (amax / _QMAX).astype(np.float32)
        s64 = s32.astype(np.float64)[..., None]
        with np.errstate(invalid="ignore", divide="ignore"):
            q = np.where(s64 > 0, np.rint(a / np.where(s64 > 0, s64, 1.0)), 0.0)
        return np.clip(q, -_QMAX, _QMAX).astype(np.int8), s32
    top = FP8_MAX[kind]
    shape = a.shape[:-2] + (1,)
    if scale is None:
        amax = np.abs(a).max(axis=(-2, -1)) if a.shape[-1] and a.shape[-2] else np.zeros(a.shape[:-2])
        s32 = np.where(amax > 0, amax / top, 1.0).astype(np.float32)[..., None]
        s32 = np.where(s32 > 0, s32, np.float32(1.0)).astype(np.float32)     # (amax below float32's range)
    else:
        s32 = _fp8_scale(scale, shape)
    return to_float8(a / s32.astype(np.float64)[..., None], kind), s32


def _fp8_scale(scale: ArrayLike, shape: Tuple[int, ...]) -> NDArray[np.float32]:
    s = _real(scale, "scale").astype(np.float32)
    try:
        s = np.broadcast_to(s, shape).copy()
    except ValueError:
        raise ValueError(f"scale of shape {s.shape} does not broadcast to {shape} (one per head)") from None
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise ValueError("scale must be finite and > 0")
    return s


def to_float8(a: NDArray[np.float64], kind: str) -> NDArray[Any]:
    """a (already scaled) rounded to float8 `kind`, to nearest even, saturating at its largest finite."""
    top = FP8_MAX[kind]
    return np.clip(a, -top, top).astype(kv_storage_dtype(kind))


def dequantize_kv(values: ArrayLike, scales: ArrayLike) -> NDArray[np.float32]:
    """values (..., S, E) int8 or float8 times scales (broadcasting to (..., S): one per key, or
    one per head for float8): float32 (exact products, rounded once)."""
    v = np.asarray(values)
    s = np.asarray(scales)
    if v.dtype != np.int8 and v.dtype.name not in FLOAT8:
        raise TypeError(f"values must be int8 or float8 (float8_e4m3fn, float8_e5m2), got dtype {v.dtype}")
    try:
        np.broadcast_to(s, v.shape[:-1])
    except ValueError:
        raise ValueError(f"scales must broadcast to the shape of values without its last dim, {v.shape[:-1]}, "
                         f"got {s.shape}") from None
    return (v.astype(np.float64) * s.astype(np.float64)[..., None]).astype(np.float32)


# ---------------------------------------------------------------- the caches' side

CACHE_HEADROOM = 16.0    # a cache's float8 scale leaves later values 16x the first ones' max|x|


def cache_fp8_scale(x: NDArray[np.float64], kind: str, axes: Tuple[int, ...]) -> NDArray[np.float32]:
    """A cache's float8 scale from the first values it holds: max|x| over `axes` mapped to the
    largest finite float8 / CACHE_HEADROOM (1 where they are all zero)."""
    amax = np.abs(x).max(axis=axes) if x.size else np.zeros(np.delete(x.shape, axes))
    s = (amax * (CACHE_HEADROOM / FP8_MAX[kind])).astype(np.float32)
    return np.where(s > 0, s, np.float32(1.0)).astype(np.float32)


def cache_scales_arg(kv_scale: Any, shape: Tuple[int, ...], kind: Optional[str]) -> Optional[Tuple[Any, Any]]:
    """A cache's kv_scale argument -> fixed (k scales, v scales) of `shape`, or None (dynamic)."""
    if kv_scale is None:
        return None
    if kind not in FLOAT8:
        raise TypeError(f"kv_scale is for a float8 cache (one scale per head), got kv_dtype={kind!r}")
    pair = kv_scale if isinstance(kv_scale, (tuple, list)) and len(kv_scale) == 2 else (kv_scale, kv_scale)
    return _fp8_scale(pair[0], shape), _fp8_scale(pair[1], shape)


def encode_rows(x: NDArray[Any], kind: str, name: str, scale: Optional[NDArray[np.float32]] = None) -> NDArray[Any]:
    """New rows of a cache (..., T, E) in its kv_dtype: float8 divided by `scale` (broadcasting
    over the rows) and saturated; bfloat16 / float16 rounded to nearest even (float16 past its
    range: ValueError naming `name`). int8 is quantize_kv's (its scales are per row)."""
    if kind in FLOAT8:
        a = _real(x, name)
        if not np.isfinite(a).all():
            raise ValueError(f"{name} must be finite for a {kind} cache (NaN or inf cannot be scaled)")
        assert scale is not None
        return to_float8(a / scale.astype(np.float64)[..., None, None], kind)
    with np.errstate(over="ignore"):             # (float16's overflow: the error below)
        out = np.asarray(x).astype(kv_storage_dtype(kind))
    if kind == "float16" and not np.isfinite(out).all() and np.isfinite(np.asarray(x, np.float64)).all():
        raise ValueError(f"{name} has values past float16's range (65504): a float16 cache cannot hold them; "
                         f"use kv_dtype='bfloat16'")
    return out
