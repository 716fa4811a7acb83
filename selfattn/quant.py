"""Quantized keys and values: ``quantize_kv`` / ``dequantize_kv`` (int8, symmetric, one scale per key).

    kq, ks = selfattn.quantize_kv(k)            # k (..., S, E) float -> int8 (..., S, E), float32 (..., S)
    vq, vs = selfattn.quantize_kv(v)
    out = selfattn.scaled_dot_product_attention(q, kq, vq, k_scale=ks, v_scale=vs)   # q float32

Each key's row (and each value's) is stored as int8 values ``round(x / s)`` in [-127, 127] with
``s = max|x| / 127`` over that row (a row of zeros: s = 0), a quarter of float32's bytes plus 4
bytes per row. The kernels read the int8 values as they are stored: the decode schedule widens
them in registers and applies the scales per key (q.k times k's scale, the probabilities times
v's), the others widen and scale them where they pack. ``KVCache(kv_dtype="int8")`` keeps its
cache this way, quantizing on ``append``.

Error: per element at most s / 2 (round to nearest), so a row is off by at most max|x| / 254;
the attention output's error against float64 on the same float inputs is in the README's table.
"""

from typing import Any, Tuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["quantize_kv", "dequantize_kv", "KV_DTYPES"]

KV_DTYPES = ("int8",)
_QMAX = 127.0


def _kv_dtype(kv_dtype: Any) -> str:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    return str(kv_dtype)


def quantize_kv(x: ArrayLike, kv_dtype: str = "int8") -> Tuple[NDArray[np.int8], NDArray[np.float32]]:
    """``(values, scales)``: x (..., S, E) as int8 (same shape) and one float32 scale per row
    (..., S), symmetric: ``x ~= values * scales[..., None]``. x must be real and finite."""
    _kv_dtype(kv_dtype)
    try:
        a = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"x cannot be read as an array: {exc}") from None
    if a.dtype.kind not in "fiu" and a.dtype.name != "bfloat16":
        raise TypeError(f"quantize_kv needs real numbers, got dtype {a.dtype}")
    if a.ndim < 1:
        raise ValueError(f"quantize_kv needs at least one dim (..., E), got shape {a.shape}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError("quantize_kv needs finite values (NaN or inf cannot be scaled to int8)")
    amax = np.abs(a).max(axis=-1) if a.shape[-1] else np.zeros(a.shape[:-1])
    scale = (amax / _QMAX).astype(np.float32)
    s64 = scale.astype(np.float64)[..., None]
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(s64 > 0, np.rint(a / np.where(s64 > 0, s64, 1.0)), 0.0)
    return np.clip(q, -_QMAX, _QMAX).astype(np.int8), scale


def dequantize_kv(values: ArrayLike, scales: ArrayLike) -> NDArray[np.float32]:
    """values (..., S, E) int8 times scales (..., S): float32 (exact products, rounded once)."""
    v = np.asarray(values)
    s = np.asarray(scales)
    if v.dtype != np.int8:
        raise TypeError(f"values must be int8, got dtype {v.dtype}")
    if s.shape != v.shape[:-1]:
        raise ValueError(f"scales must have the shape of values without its last dim, {v.shape[:-1]}, got {s.shape}")
    return (v.astype(np.float64) * s.astype(np.float64)[..., None]).astype(np.float32)
