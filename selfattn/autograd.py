"""Vector-Jacobian products: training with selfattn in plain NumPy::

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
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core, _spec

__all__ = ["scaled_dot_product_attention_vjp", "varlen_attention_vjp", "attend_vjp", "flex_attention_vjp"]


def _unbroadcast(g, shape, dtype):
    """Sum g (a broadcast of an array of `shape`) back to `shape`, as `dtype`."""
    extra = g.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(extra + i for i, n in enumerate(shape) if n == 1 and g.shape[extra + i] != 1)
    if axes:
        # 16-bit gradients are summed in float32 (then rounded once more, below)
        g = g.sum(axis=axes, keepdims=True, dtype=np.float32 if g.dtype.itemsize == 2 else None)
        g = g.reshape(g.shape[extra:]) if extra else g
    return np.ascontiguousarray(g, dtype=dtype).reshape(shape)


def _grad_dtype(a):
    """The dtype of a's gradient: a's own if floating (bfloat16 too), else the dtype it computes in."""
    return a.dtype if a.dtype.kind == "f" or _core._storage_name(a.dtype) else _core._compute_dtype_of(a.dtype, "input")


_SDPA_OPTIONS = ("scale", "enable_gqa", "num_threads", "window_size", "alignment", "key_lengths",
                 "alibi_slopes", "softcap", "sinks", "num_sink_tokens", "dropout_p", "seed")
_VARLEN_OPTIONS = ("scale", "is_causal", "window_size", "alignment", "alibi_slopes", "softcap", "enable_gqa",
                   "num_threads", "sinks", "num_sink_tokens")


def _dsinks(sinks, out, lse, dout, lead):
    """The sinks' gradient: dsink = -sum over rows of P_sink * D, P_sink = exp(sink - lse),
    D = rowsum(dout * out) (float64), summed to sinks' shape. out (lead + (L, Ev)), lse (lead + (L,)),
    lead = the (..., Hq) the sinks broadcast to."""
    s = np.asarray(sinks)
    sb = _spec.head_sinks(s, lead)
    D = np.einsum("...e,...e->...", np.asarray(dout, dtype=np.float64), np.asarray(out, dtype=np.float64))
    with np.errstate(invalid="ignore"):     # a row without sink or keys: lse = -inf, D = 0
        p = np.exp(sb[..., None] - np.asarray(lse, dtype=np.float64))
        g = -np.sum(np.where(D == 0, 0.0, p * D), axis=-1)
    dt = s.dtype if (s.dtype.kind == "f" or s.dtype.name == "bfloat16") else np.dtype(np.float32)
    return _unbroadcast(g, s.shape, dt)


def _check_options(options, allowed, fn):
    for name in options:
        if name not in allowed:
            raise TypeError(f"{fn}() got an unexpected keyword argument {name!r} "
                            f"(options: {', '.join(allowed)})")


def _check_cotangent(g, out, name="grad_out"):
    if g is None:
        raise TypeError(f"{name} must be an array of the forward's output shape {out.shape}, got None")
    g = _core._as_input(g, name)
    if g.shape != out.shape:
        raise ValueError(f"{name} must have the shape of the forward's output {out.shape}, got {g.shape}")
    if g.dtype.kind not in "fiub" and not _core._storage_name(g.dtype):
        raise TypeError(f"{name} must be a real array, got dtype {g.dtype}")
    return np.ascontiguousarray(g, dtype=out.dtype)


def scaled_dot_product_attention_vjp(query: Any, key: Any, value: Any, attn_mask: Optional[Any] = None,
                                     is_causal: bool = False, **options: Any
                                     ) -> Tuple[np.ndarray, Callable[[Any], Tuple[np.ndarray, ...]]]:
    """The forward of `scaled_dot_product_attention` and its vector-Jacobian product.

    Takes exactly the arguments of `selfattn.scaled_dot_product_attention` (every option:
    masks, causal, window, alignment, key_lengths, ALiBi, softcap, GQA, broadcasting, and
    ``dropout_p`` with ``seed`` as keywords) except `return_lse` and `out`. With dropout the
    seed is drawn once (when None) and the backward regenerates the same mask.

    Returns
    -------
    out : ndarray, as `scaled_dot_product_attention` returns it, read-only
        ``vjp`` reads it (D = rowsum(grad_out * out)), so it cannot be changed in place:
        write ``h = x + out``, not ``out += x``.
    vjp : callable
        ``vjp(grad_out) -> (dq, dk, dv)``, the gradients of ``sum(out * grad_out)`` with
        respect to query, key and value, with their shapes and dtypes (a bfloat16 or float16
        input gets a gradient of its dtype, computed in float32; integer or bool inputs get
        float32 gradients). Broadcast or GQA-shared key/value get their
        gradients summed over the units that shared them. Can be called any number of
        times, from any thread; it keeps out and the log-sum-exp (O(L) per row), never the
        attention weights. Keys no query sees, and rows whose keys are all masked, get
        zero gradients. A float `attn_mask` gets no gradient. With ``sinks``, a fourth
        result: ``dsinks`` (sinks' shape; its dtype if floating, else float32),
        ``-sum_i exp(sink - lse_i) * rowsum(grad_out * out)_i`` over what shares each sink.

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
    _check_options(options, _SDPA_OPTIONS, "scaled_dot_product_attention_vjp")
    dropout_p = _spec.check_dropout_p(options.pop("dropout_p", 0.0))
    seed = options.pop("seed", None)
    if dropout_p:                            # one mask for the forward and every vjp call
        options["dropout_p"], options["dropout_seed"] = dropout_p, _spec.dropout_seed(seed)
    q = _core._as_input(query, "query")
    k = _core._as_input(key, "key")
    v = _core._as_input(value, "value")
    narrow = _core._narrow_kv_name(q, k, v)
    if narrow:                               # before the forward's work
        raise TypeError(f"no backward through {narrow} key and value under float32 queries (a quantized or "
                        f"16-bit KV cache is for inference): attend key and value of the query's dtype to train")
    out, lse = _core.sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, return_lse=True, **options)
    sinks = options.get("sinks")
    out.flags.writeable = False              # vjp reads it (D = rowsum(dO o O)): no in-place changes
    shapes = (q.shape, k.shape, v.shape)
    dtypes = (_grad_dtype(q), _grad_dtype(k), _grad_dtype(v))

    def vjp(grad_out: Any) -> Tuple[np.ndarray, ...]:
        dout = _check_cotangent(grad_out, out)
        dq, dk, dv = _core.sdpa_bwd(q, k, v, out, lse, dout, attn_mask=attn_mask, is_causal=is_causal,
                                    **options)
        gq, gk, gv = (_unbroadcast(g, s, d) for g, s, d in zip((dq, dk, dv), shapes, dtypes))
        if sinks is None:
            return gq, gk, gv
        return gq, gk, gv, _dsinks(sinks, out, lse, dout, out.shape[:-2])

    return out, vjp


def varlen_attention_vjp(query: Any, key: Any, value: Any, cu_seqlens_q: Any, cu_seqlens_k: Any,
                         **options: Any
                         ) -> Tuple[np.ndarray, Callable[[Any], Tuple[np.ndarray, ...]]]:
    """The forward of `varlen_attention` and its vector-Jacobian product.

    Takes the arguments of `selfattn.varlen_attention` except `return_lse`; `out` is returned
    read-only (the backward reads it). ``vjp(grad_out)``
    returns ``(dq, dk, dv)`` in the packed layouts of query (Hq, total_q, E), key
    (H, total_k, E) and value (H, total_k, Ev); with GQA, each kv head's gradient is summed
    over its query heads; with ``sinks``, a fourth result ``dsinks`` (sinks' shape).

    Examples
    --------
    >>> import numpy as np, selfattn
    >>> h = np.random.default_rng(0).standard_normal((2, 7, 4))   # 2 heads, a 3- and a 4-token sequence
    >>> out, vjp = selfattn.varlen_attention_vjp(h, h, h, [0, 3, 7], [0, 3, 7], is_causal=True)
    >>> [g.shape for g in vjp(np.ones_like(out))]
    [(2, 7, 4), (2, 7, 4), (2, 7, 4)]
    """
    _check_options(options, _VARLEN_OPTIONS, "varlen_attention_vjp")
    q = _core._as_input(query, "query")
    k = _core._as_input(key, "key")
    v = _core._as_input(value, "value")
    out, lse = _core.varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, return_lse=True, **options)
    sinks = options.get("sinks")
    out.flags.writeable = False              # vjp reads it: no in-place changes
    dtypes = (_grad_dtype(q), _grad_dtype(k), _grad_dtype(v))

    def vjp(grad_out: Any) -> Tuple[np.ndarray, ...]:
        dout = _check_cotangent(grad_out, out)
        grads = _core.varlen_bwd(q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse, dout, **options)
        gq, gk, gv = (np.asarray(g, dtype=d) for g, d in zip(grads, dtypes))
        if sinks is None:
            return gq, gk, gv
        return gq, gk, gv, _dsinks(sinks, out, lse, dout, out.shape[:1])

    return out, vjp


def flex_attention_vjp(query: Any, key: Any, value: Any, score_mod: Optional[Any] = None,
                       block_mask: Optional[Any] = None, *, scale: Optional[float] = None, enable_gqa: bool = False,
                       num_threads: Optional[int] = None, grad_arrays: Sequence[Any] = ()
                       ) -> Tuple[np.ndarray, Callable[[Any], Tuple[np.ndarray, ...]]]:
    """The forward of `selfattn.flex_attention` and its vector-Jacobian product.

    Takes the arguments of `flex_attention` except `return_lse`; ``vjp(grad_out)`` returns
    ``(dq, dk, dv)`` with the shapes and dtypes of query, key and value (GQA kv heads summed over
    their query heads), then the gradient of each array in `grad_arrays`. The fused backward
    reads the same block mask (tiles whose blocks are all empty are skipped, partial blocks apply
    their bits) and score_mod's derivative with respect to the score. `out` is returned
    read-only (the backward reads it).

    grad_arrays: NumPy arrays that score_mod reads (the very objects it captures: a T5 bias
    table, per-head scales), whose gradients vjp also returns, in their shapes and dtypes.
    They are computed blockwise in NumPy float64 (P recomputed from lse, blocks of query rows of
    all heads at once, summed in a fixed order), not in the fused kernel: about the cost of a
    dense float64 backward, memory ~32 MiB per program value.

    Examples
    --------
    >>> import numpy as np, selfattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 96, 8)) for _ in range(3))
    >>> bm = selfattn.create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 96, 96, BLOCK_SIZE=32)
    >>> out, vjp = selfattn.flex_attention_vjp(q, k, v, block_mask=bm)
    >>> dq, dk, dv = vjp(np.ones_like(out))
    >>> bool(np.allclose(dv.sum(axis=-2), 96.0))   # each query's weights sum to 1
    True
    """
    from .flex import _flex_args, _flex_bwd, _flex_fwd
    q, k, v, bm, sm = _flex_args(query, key, value, score_mod, block_mask, "flex_attention_vjp", enable_gqa)
    wanted = _captured(sm, grad_arrays, "flex_attention_vjp")
    opts = dict(scale=scale, enable_gqa=enable_gqa, num_threads=num_threads)
    out, lse = _flex_fwd(q, k, v, bm, sm, True, **opts)
    out.flags.writeable = False              # vjp reads it: no in-place changes
    shapes = (q.shape, k.shape, v.shape)
    dtypes = (_grad_dtype(q), _grad_dtype(k), _grad_dtype(v))

    def vjp(grad_out: Any) -> Tuple[np.ndarray, ...]:
        dout = _check_cotangent(grad_out, out)
        dq, dk, dv = _flex_bwd(q, k, v, out, lse, dout, bm, sm, **opts)
        grads = tuple(_unbroadcast(g, s, d) for g, s, d in zip((dq, dk, dv), shapes, dtypes))
        if wanted:
            ga = flex_array_grads(sm.program, wanted, q, k, v, out, lse, dout, scale, block_mask)
            grads += tuple(g.astype(_grad_dtype(sm.program.arrays[t]), copy=False) for g, t in zip(ga, wanted))
        return grads
    return out, vjp


def _captured(sm: Any, arrays: Sequence[Any], fn: str) -> List[int]:
    """The positions, among the arrays score_mod's trace read, of each of `arrays` (by identity)."""
    arrays = list(arrays)
    if not arrays:
        return []
    found = sm.program.arrays if sm is not None else []
    wanted = []
    for n, a in enumerate(arrays):
        t = next((i for i, x in enumerate(found) if x is a), None)
        if t is None or found[t].dtype.kind != "f":
            what = "no score_mod" if sm is None else "score_mod does not read it as a float array"
            raise ValueError(f"{fn}: grad_arrays[{n}] (shape {np.shape(a)}) is not an array score_mod captures "
                             f"({what}): pass the very array object the function reads")
        wanted.append(t)
    return wanted


def flex_array_grads(prog: Any, wanted: List[int], q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray,
                     lse: np.ndarray, dout: np.ndarray, scale: Optional[float], block_mask: Any) -> List[np.ndarray]:
    """score_mod's captured-array gradients (_scoremod.array_grads) for flex_attention's arrays:
    K and V expanded to the query heads, float64."""
    from ._scoremod import array_grads
    q64 = np.asarray(q, dtype=np.float64)
    group = q.shape[1] // k.shape[1]
    k64 = np.repeat(np.asarray(k, dtype=np.float64), group, axis=1)
    v64 = np.repeat(np.asarray(v, dtype=np.float64), group, axis=1)
    E = q.shape[-1]
    sc = (1.0 / np.sqrt(E) if E > 0 else 1.0) if scale is None else float(scale)
    return array_grads(prog, wanted, q64, k64, v64, np.asarray(out, dtype=np.float64),
                       np.asarray(lse, dtype=np.float64), np.asarray(dout, dtype=np.float64), sc,
                       None if block_mask is None else block_mask.mask_mod)


def attend_vjp(x: Any, wq: Any, wk: Any, wv: Any, *, num_heads: int = 1, wo: Optional[Any] = None,
               is_causal: bool = False, scale: Optional[float] = None, num_threads: Optional[int] = None,
               bq: Optional[Any] = None, bk: Optional[Any] = None, bv: Optional[Any] = None,
               bo: Optional[Any] = None, num_kv_heads: Optional[int] = None,
               window_size: Optional[Union[int, Tuple[Optional[int], Optional[int]]]] = None,
               key_lengths: Optional[Any] = None, rope_base: Optional[float] = None
               ) -> Tuple[np.ndarray, Callable[[Any], Tuple[np.ndarray, ...]]]:
    """The forward of `selfattn.attend` and its vector-Jacobian product: a trainable layer.

    Takes exactly the arguments of `selfattn.attend` (same options, same validation, same
    errors) and returns ``(y, vjp)`` with y as `attend` returns it.

    ``vjp(dy)`` returns the gradients of ``sum(y * dy)``, in this order:
    ``(dx, dwq, dwk, dwv)``, then ``dwo`` if `wo` was given, then ``dbq, dbk, dbv, dbo`` for
    those of the biases that were given (signature order), each with the shape of its
    argument and its dtype (a float16 argument gets a float16 gradient, computed in the layer's
    dtype; integer or bool arguments get float32 gradients).

    The backward mirrors the forward: ``dwo = concat_heads^T @ dy``; the heads' gradients come
    from the fused backward (`scaled_dot_product_attention_vjp`, GQA kv heads summed over their
    query heads); RoPE's backward is the rotation by the negative angle; the three projections
    get their gradients from one matmul each way on the concatenated weights,
    ``dW = x^T @ dqkv`` and ``dx = dqkv @ W^T``, and the biases ``dqkv`` summed over tokens.
    No per-head Python loop, nothing of size L x L kept: `vjp` keeps x, the projections and
    the attention output (and reads x, wq, wk, wv, wo as they were at the forward: they are
    converted, not copied, when already of the compute dtype, so do not modify them in place
    before calling `vjp`).

    Examples
    --------
    >>> import numpy as np, selfattn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 5, 8))                       # 2 sequences, 5 tokens, d_model 8
    >>> wq, wk, wv, wo = (0.3 * rng.standard_normal((8, 8)) for _ in range(4))
    >>> y, vjp = selfattn.attend_vjp(x, wq, wk, wv, num_heads=2, wo=wo, is_causal=True)
    >>> bool(np.allclose(y, selfattn.attend(x, wq, wk, wv, num_heads=2, wo=wo, is_causal=True)))
    True
    >>> dx, dwq, dwk, dwv, dwo = vjp(y)                          # gradients of sum(y**2) / 2
    >>> dx.shape, dwq.shape, dwo.shape
    ((2, 5, 8), (8, 8), (8, 8))
    """
    from . import _api
    arrs, dt, H, Hkv, E, Ev, widths = _api._attend_args(x, wq, wk, wv, num_heads, wo, is_causal, scale,
                                                        num_threads, bq, bk, bv, bo, num_kv_heads, window_size,
                                                        key_lengths, rope_base)
    lead, L = arrs["x"].shape[:-2], arrs["x"].shape[-2]
    xc, w, q, k, v = _api._project_qkv(arrs, dt, H, Hkv, E, Ev, widths, rope_base)
    lo_k, lo_v, width = H * E, H * E + Hkv * E, H * E + Hkv * E + Hkv * Ev
    o_heads, attn_vjp = scaled_dot_product_attention_vjp(
        q, k, v, is_causal=is_causal, scale=scale, num_threads=num_threads, enable_gqa=Hkv != H,
        window_size=window_size, key_lengths=key_lengths)
    o = np.swapaxes(o_heads, -2, -3).reshape(lead + (L, H * Ev))      # heads concatenated (one copy)
    wo_c = arrs["wo"].astype(dt, copy=False) if "wo" in arrs else None
    y = _api._project_out(o, arrs, dt)      # o itself is needed later only for dwo (then y is not o)
    names = ["x", "wq", "wk", "wv"] + [n for n in ("wo", "bq", "bk", "bv", "bo") if n in arrs]
    grad_dtypes = [_grad_dtype(arrs[n]) for n in names]

    def vjp(dy: Any) -> Tuple[np.ndarray, ...]:
        g = _check_cotangent(dy, y, "dy")
        grads = {}
        tokens = int(np.prod(lead, dtype=np.int64)) * L
        rows = lambda t: t.reshape(tokens, t.shape[-1])      # noqa: E731  (..., L, n) -> (tokens, n)
        if "bo" in arrs:
            grads["bo"] = rows(g).sum(axis=0)
        if wo_c is not None:
            grads["wo"] = rows(o).T @ rows(g)
            do = np.matmul(g, wo_c.T)
        else:
            do = g
        do_heads = np.swapaxes(do.reshape(lead + (L, H, Ev)), -2, -3)
        dq, dk, dv = attn_vjp(do_heads)
        if rope_base is not None:                            # y = R(p theta) x  ->  dx = R(-p theta) dy
            from .positional import rope
            back = -np.arange(L, dtype=np.float64)
            dq, dk = rope(dq, positions=back, base=float(rope_base)), rope(dk, positions=back, base=float(rope_base))
        dqkv = np.empty(lead + (L, width), dtype=dt)
        _api._heads(dqkv, 0, H, E)[...] = dq
        _api._heads(dqkv, lo_k, Hkv, E)[...] = dk
        _api._heads(dqkv, lo_v, Hkv, Ev)[...] = dv
        dw = rows(xc).T @ rows(dqkv)                         # (d_model, width): dwq | dwk | dwv
        grads["x"] = np.matmul(dqkv, w.T)
        grads["wq"], grads["wk"], grads["wv"] = dw[:, :lo_k], dw[:, lo_k:lo_v], dw[:, lo_v:]
        if any(n in arrs for n in ("bq", "bk", "bv")):
            db = rows(dqkv).sum(axis=0)
            grads["bq"], grads["bk"], grads["bv"] = db[:lo_k], db[lo_k:lo_v], db[lo_v:]
        return tuple(np.ascontiguousarray(grads[n], dtype=t) for n, t in zip(names, grad_dtypes))

    return y, vjp
