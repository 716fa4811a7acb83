"""Vector-Jacobian products: training with selfattn in plain NumPy.

    out, vjp = scaled_dot_product_attention_vjp(q, k, v, **options)
    dq, dk, dv = vjp(grad_out)

The forward is the fused kernel with its log-sum-exp kept (O(L) per row); `vjp` runs the
fused backward (src_c/attn_bwd_body.h, FlashAttention-2's algorithm): it recomputes the
probabilities block by block from q, k and lse, so nothing of size L x S is stored or
materialised, and its results are bit for bit the same for every thread count.

Gradients come back with the shapes and dtypes of the arguments as given: where key or value
(or query) was broadcast over batch dims, or shared by several query heads (GQA), its gradient
is summed over the units that shared it. A float `attn_mask` gets no gradient.

`vjp` reads query, key and value when it is called (they are kept by reference, not copied):
do not modify them in place between the forward and the backward.
"""
from typing import Any, Callable, Optional, Tuple

import numpy as np

from . import _core

__all__ = ["scaled_dot_product_attention_vjp", "varlen_attention_vjp"]


def _unbroadcast(g, shape, dtype):
    """Sum g (a broadcast of an array of `shape`) back to `shape`, as `dtype`."""
    extra = g.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(extra + i for i, n in enumerate(shape) if n == 1 and g.shape[extra + i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
        g = g.reshape(g.shape[extra:]) if extra else g
    return np.ascontiguousarray(g, dtype=dtype).reshape(shape)


def _grad_dtype(a):
    """The dtype of a's gradient: a's own if floating, else the dtype it computes in."""
    return a.dtype if a.dtype.kind == "f" else _core._compute_dtype_of(a.dtype, "input")


def _check_cotangent(g, out, name="grad_out"):
    g = _core._as_input(g, name)
    if g.shape != out.shape:
        raise ValueError(f"{name} must have the shape of the forward's output {out.shape}, got {g.shape}")
    if g.dtype.kind not in "fiub":
        raise TypeError(f"{name} must be a real array, got dtype {g.dtype}")
    return np.ascontiguousarray(g, dtype=out.dtype)


def scaled_dot_product_attention_vjp(query: Any, key: Any, value: Any, attn_mask: Optional[Any] = None,
                                     is_causal: bool = False, **options: Any
                                     ) -> Tuple[np.ndarray, Callable[[Any], Tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """The forward of `scaled_dot_product_attention` and its vector-Jacobian product.

    Takes exactly the arguments of `selfattn.scaled_dot_product_attention` (every option:
    masks, causal, window, alignment, key_lengths, ALiBi, softcap, GQA, broadcasting)
    except `return_lse` and `out`.

    Returns
    -------
    out : ndarray, as `scaled_dot_product_attention` returns it
    vjp : callable
        ``vjp(grad_out) -> (dq, dk, dv)``, the gradients of ``sum(out * grad_out)`` with
        respect to query, key and value, with their shapes and dtypes (a float16 input gets
        a float16 gradient, computed in float32; integer or bool inputs get float32
        gradients). Broadcast or GQA-shared key/value get their
        gradients summed over the units that shared them. Can be called any number of
        times, from any thread; it keeps out and the log-sum-exp (O(L) per row), never the
        attention weights. Keys no query sees, and rows whose keys are all masked, get
        zero gradients. A float `attn_mask` gets no gradient.

    Examples
    --------
    >>> import numpy as np, selfattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 8, 16)) for _ in range(3))
    >>> out, vjp = selfattn.scaled_dot_product_attention_vjp(q, k, v, is_causal=True)
    >>> dq, dk, dv = vjp(np.ones_like(out))
    >>> dq.shape, dk.shape, dv.shape
    ((2, 4, 8, 16), (2, 4, 8, 16), (2, 4, 8, 16))
    >>> bool(np.allclose(dv.sum(axis=-2), 8.0))   # each query's weights sum to 1
    True
    """
    for bad in ("return_lse", "out"):
        if bad in options:
            raise TypeError(f"scaled_dot_product_attention_vjp() got an unexpected keyword argument {bad!r}")
    q = _core._as_input(query, "query")
    k = _core._as_input(key, "key")
    v = _core._as_input(value, "value")
    out, lse = _core.sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, return_lse=True, **options)
    shapes = (q.shape, k.shape, v.shape)
    dtypes = (_grad_dtype(q), _grad_dtype(k), _grad_dtype(v))

    def vjp(grad_out: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        dout = _check_cotangent(grad_out, out)
        dq, dk, dv = _core.sdpa_bwd(q, k, v, out, lse, dout, attn_mask=attn_mask, is_causal=is_causal,
                                    **options)
        return tuple(_unbroadcast(g, s, d) for g, s, d in zip((dq, dk, dv), shapes, dtypes))  # type: ignore

    return out, vjp


def varlen_attention_vjp(query: Any, key: Any, value: Any, cu_seqlens_q: Any, cu_seqlens_k: Any,
                         **options: Any
                         ) -> Tuple[np.ndarray, Callable[[Any], Tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """The forward of `varlen_attention` and its vector-Jacobian product.

    Takes the arguments of `selfattn.varlen_attention` except `return_lse`. ``vjp(grad_out)``
    returns ``(dq, dk, dv)`` in the packed layouts of query (Hq, total_q, E), key
    (H, total_k, E) and value (H, total_k, Ev); with GQA, each kv head's gradient is summed
    over its query heads.

    Examples
    --------
    >>> import numpy as np, selfattn
    >>> h = np.random.default_rng(0).standard_normal((2, 7, 4))   # 2 heads, a 3- and a 4-token sequence
    >>> out, vjp = selfattn.varlen_attention_vjp(h, h, h, [0, 3, 7], [0, 3, 7], is_causal=True)
    >>> [g.shape for g in vjp(np.ones_like(out))]
    [(2, 7, 4), (2, 7, 4), (2, 7, 4)]
    """
    if "return_lse" in options:
        raise TypeError("varlen_attention_vjp() got an unexpected keyword argument 'return_lse'")
    q = _core._as_input(query, "query")
    k = _core._as_input(key, "key")
    v = _core._as_input(value, "value")
    out, lse = _core.varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, return_lse=True, **options)
    dtypes = (_grad_dtype(q), _grad_dtype(k), _grad_dtype(v))

    def vjp(grad_out: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        dout = _check_cotangent(grad_out, out)
        grads = _core.varlen_bwd(q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse, dout, **options)
        return tuple(np.asarray(g, dtype=d) for g, d in zip(grads, dtypes))  # type: ignore

    return out, vjp
