"""Merging attention computed over disjoint key sets: :func:`merge_attention`.

Attention over keys K = K_1 ∪ ... ∪ K_n (disjoint) is a weighted mean of the attentions over
each part. With ``(out_i, lse_i) = scaled_dot_product_attention(q, k_i, v_i, return_lse=True)``::

    lse = log sum_i exp(lse_i)                    (computed stably: m + log sum_i exp(lse_i - m),
                                                   m = max_i lse_i)
    out = sum_i exp(lse_i - lse) * out_i

because softmax over the union renormalises each part's softmax by its share exp(lse_i - lse) of
the total. The merge is exact (up to rounding) and associative, so parts can be merged in any
grouping: split-K attention, sequence parallelism (:mod:`selfattn.dask`), a KV cache split in
pages, or the same query attending to several memories.
"""

from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _core

__all__ = ["merge_attention"]

Array = NDArray[Any]


def _parts(x: Union[ArrayLike, Sequence[ArrayLike]], name: str) -> list:
    """The parts of `x` as a list of arrays (an array's first axis, or a sequence's items)."""
    if isinstance(x, np.ndarray) or not isinstance(x, (list, tuple)):
        try:
            a = np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} cannot be read as an array: {exc}") from None
        if a.ndim == 0:
            raise ValueError(f"{name} must be an array with the parts on its first axis, or a sequence "
                             f"of arrays, got a scalar")
        return list(a)
    parts = []
    for i, p in enumerate(x):
        try:
            parts.append(np.asarray(p))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name}[{i}] cannot be read as an array: {exc}") from None
    return parts


def _check_dtype(a: Array, name: str, half_ok: bool) -> None:
    """float32 / float64; bfloat16 / float16 too where half_ok (the outs)."""
    if a.dtype not in (np.float32, np.float64) and not (half_ok and _core._storage_name(a.dtype)):
        raise TypeError(f"{name} has dtype {a.dtype}; merge_attention takes float32 or float64 "
                        f"(outs also bfloat16 or float16, with float32 lses: what "
                        f"scaled_dot_product_attention returns)")


def merge_attention(outs: Union[ArrayLike, Sequence[ArrayLike]],
                    lses: Union[ArrayLike, Sequence[ArrayLike]], *,
                    num_threads: Optional[int] = None) -> Tuple[Array, Array]:
    """Combine attentions over disjoint key sets into the attention over their union.

    Given ``(out_i, lse_i)`` from ``scaled_dot_product_attention(q, k_i, v_i, return_lse=True)``
    on the same queries and disjoint key/value parts ``i = 1..n`` (with the same options, each
    part keeping its keys' positions), returns what a single call over all the keys gives::

        lse = log(sum_i exp(lse_i))               stable: m + log(sum_i exp(lse_i - m)), m = max_i lse_i
        out = sum_i exp(lse_i - lse) * out_i

    A part whose row is fully masked (``lse_i = -inf``, ``out_i = 0``) gets weight 0 in that row;
    a row masked in every part gives zeros and ``lse = -inf``, like a fully masked row of one
    call, without NaN or warnings. The merge is associative (up to rounding): parts may be merged
    in any grouping, e.g. a tree.

    Parameters
    ----------
    outs : array_like (n, ..., L, Ev), or a sequence of n arrays (..., L, Ev)
        The parts' outputs.
    lses : array_like (n, ..., L), or a sequence of n arrays (..., L)
        The parts' log-sum-exps, ``lses[i].shape == outs[i].shape[:-1]``.
    num_threads : int, optional
        Threads for the merge (rows are split between them); default: selfattn's default.
        The result does not depend on it.

    Returns
    -------
    out : ndarray, (..., L, Ev)
    lse : ndarray, (..., L)
        In the dtype of the inputs (float32 or float64; bfloat16 or float16 outs give an out
        of their dtype and a float32 lse). The arithmetic runs in float64 either way (in C,
        src_c/merge.c) and is rounded once at the end (16-bit outs: to float32, then to
        their dtype). The inputs are never modified.

    Raises
    ------
    ValueError
        No parts (n = 0), a different number of outs and lses, shapes that differ between
        the parts, or a lse that does not match its out's shape without the last dim.
    TypeError
        An input that is not float32/float64, or dtypes that differ between the parts.

    Examples
    --------
    Attention over 10 keys, as the merge of attentions over keys 0..5 and 6..9:

    >>> import numpy as np
    >>> import selfattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 4, 10, 8))
    >>> full = selfattn.scaled_dot_product_attention(q, k, v)
    >>> a = selfattn.scaled_dot_product_attention(q, k[..., :6, :], v[..., :6, :], return_lse=True)
    >>> b = selfattn.scaled_dot_product_attention(q, k[..., 6:, :], v[..., 6:, :], return_lse=True)
    >>> out, lse = selfattn.merge_attention([a[0], b[0]], [a[1], b[1]])
    >>> bool(np.allclose(out, full, rtol=0, atol=1e-12))
    True
    """
    out_parts, lse_parts = _parts(outs, "outs"), _parts(lses, "lses")
    if not out_parts:
        raise ValueError("merge_attention needs at least one part: outs is empty")
    if len(out_parts) != len(lse_parts):
        raise ValueError(f"outs has {len(out_parts)} parts but lses has {len(lse_parts)}")
    shape = out_parts[0].shape
    if len(shape) < 2:
        raise ValueError(f"each part of outs must have at least 2 dims (..., L, Ev), got shape {shape}")
    for name, parts, want in (("outs", out_parts, shape), ("lses", lse_parts, shape[:-1])):
        for i, p in enumerate(parts):
            _check_dtype(p, f"{name}[{i}]", half_ok=name == "outs")
            if p.shape != want:
                what = "outs[0]" if name == "outs" else "outs[0].shape[:-1]"
                raise ValueError(f"{name}[{i}] has shape {p.shape}, expected {want} ({what}); every part "
                                 f"covers the same queries")
    dtype = out_parts[0].dtype
    half = _core._storage_name(dtype) is not None        # 16-bit outs come with float32 lses
    for name, parts, want in (("outs", out_parts, dtype), ("lses", lse_parts, np.dtype(np.float32) if half else dtype)):
        for i, p in enumerate(parts):
            if p.dtype != want:
                raise TypeError(f"{name}[{i}] has dtype {p.dtype} but outs[0] has {dtype}: merge parts "
                                f"of one dtype" + (" (and float32 lses)" if half else ""))
    if half:   # widened exactly to float32 for the C merge, the result rounded back
        out, lse = _core.merge([p.astype(np.float32) for p in out_parts], lse_parts, num_threads)
        return out.astype(dtype), lse

    # the C merge (src_c/merge.c): float64 arithmetic, one pass over the parts, rows split over
    # threads; about 13x the speed of the same formula in vectorised NumPy (bench/README.md)
    out, lse = _core.merge(out_parts, lse_parts, num_threads)
    return out, lse
