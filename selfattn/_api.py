"""The public functions: thin Python over the Cython engine (_core)."""

import contextlib
import sys

import numpy as np

try:
    from . import _core
except ImportError as exc:   # most often: the uncompiled source tree shadows the installed package
    import os as _os
    raise ImportError(
        f"selfattn's compiled extension (selfattn._core) cannot be imported from "
        f"{_os.path.dirname(__file__)}: {exc}. If that is a source checkout, install it "
        f"(pip install .) and run from another directory, or build in place "
        f"(python setup.py build_ext --inplace).") from exc

__all__ = ["scaled_dot_product_attention", "varlen_attention", "attend", "config", "show_config", "use_isa", "set_isa",
           "available_isas"]

available_isas = _core.available_isas
set_isa = _core.set_isa


def scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=False, *, scale=None,
                                 enable_gqa=False, return_lse=False, num_threads=None, window_size=None,
                                 alignment="top_left", key_lengths=None, alibi_slopes=None, softcap=None):
    """softmax(query @ key^T * scale + mask) @ value, fused: the L x S scores never exist.

    Same names, layout and semantics as ``torch.nn.functional.scaled_dot_product_attention``.

    Parameters
    ----------
    query : array_like, (..., Hq, L, E)
    key : array_like, (..., H, S, E)
    value : array_like, (..., H, S, Ev)
        Leading dims broadcast (NumPy rules). A 2-D (L, E) query is valid.
    attn_mask : array_like, optional
        bool (True = the key takes part) or float (added to the scores), broadcastable
        to (..., Hq, L, S). Read in place with its own strides, never expanded. Composes
        with every structured mask below.
    is_causal : bool
        The query at position p sees keys j <= p (see `alignment`).
    scale : float, optional
        Defaults to 1/sqrt(E).
    enable_gqa : bool
        Grouped-query attention: Hq must be a multiple of H; query head h reads kv head
        h // (Hq/H), without copying K or V.
    return_lse : bool
        Also return lse = log sum_j exp(scale q.k_j + mask_j), shape (..., Hq, L).
    num_threads : int, optional
        Defaults to OMP_NUM_THREADS, else the usable cores. Results are bitwise identical
        for every thread count.
    window_size : None, int or (left, right), optional
        The query at position p sees keys j with p - left <= j <= p + right; an int w is
        (w, w), None on a side is unbounded. Evaluated in the kernel: key blocks outside
        every window are skipped, so the cost is O(L * (left + right + 1)).
    alignment : {"top_left", "bottom_right"}
        Position of query row i: p = i (torch's is_causal), or p = i + S_b - L, the last
        query on the last valid key (decoding with a KV cache, flash-attn >= 2.1). Applies
        to is_causal, window_size and alibi_slopes.
    key_lengths : array_like of int, optional
        Valid keys per batch entry, broadcastable to out.shape[:-3] (a scalar for 2-D/3-D
        inputs), 0 <= key_lengths <= S. Keys j >= key_lengths are masked and never read:
        garbage, NaN or Inf there does not matter.
    alibi_slopes : array_like of float, optional
        Broadcastable to (..., Hq): adds -slope * |p - j| to the logit (ALiBi).
    softcap : float > 0, optional
        The scaled logit s becomes softcap * tanh(s / softcap), before ALiBi and the mask
        are added (Gemma 2).

    Returns
    -------
    out : ndarray (..., Hq, L, Ev), or (out, lse) with return_lse.
        float64 if any of query/key/value is float64, else float32. A row whose keys are all
        masked gives zeros and lse = -inf.
    """
    return _core.sdpa(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                      enable_gqa=enable_gqa, return_lse=return_lse, num_threads=num_threads,
                      window_size=window_size, alignment=alignment, key_lengths=key_lengths,
                      alibi_slopes=alibi_slopes, softcap=softcap)


def varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, *, scale=None, is_causal=False,
                     window_size=None, alignment="top_left", alibi_slopes=None, softcap=None, enable_gqa=False,
                     return_lse=False, num_threads=None):
    """Attention over a packed batch of variable-length sequences: no padding is computed.

    Sequence b occupies rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of the queries and
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of the keys/values and attends only within itself:
    the result equals calling `scaled_dot_product_attention` on each sequence.

    Parameters
    ----------
    query : array_like, (Hq, total_q, E)
    key : array_like, (H, total_k, E)
    value : array_like, (H, total_k, Ev)
        A projection output of shape (total, H, E) becomes this layout with a free
        ``np.swapaxes(x, 0, 1)`` (a view, read in place with its strides).
    cu_seqlens_q, cu_seqlens_k : array_like of int, (B + 1,)
        Cumulative lengths: start at 0, non-decreasing, end at total_q / total_k.
    scale, is_causal, window_size, alignment, softcap, enable_gqa, return_lse, num_threads
        As in `scaled_dot_product_attention`, per sequence (bottom_right aligns each
        sequence's last query with its last key).
    alibi_slopes : array_like of float, optional
        Broadcastable to (Hq,).

    Returns
    -------
    out : ndarray (Hq, total_q, Ev), or (out, lse) with lse (Hq, total_q).
    """
    return _core.varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, scale=scale, is_causal=is_causal,
                        window_size=window_size, alignment=alignment, alibi_slopes=alibi_slopes, softcap=softcap,
                        enable_gqa=enable_gqa, return_lse=return_lse, num_threads=num_threads)


def _check_heads(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def attend(x, wq, wk, wv, *, num_heads=1, wo=None, is_causal=False, scale=None, num_threads=None, bq=None,
           bk=None, bv=None, bo=None, num_kv_heads=None, window_size=None, key_lengths=None, rope_base=None):
    """Multi-head self-attention of x with projection weights in (in, out) layout.

    q = x @ wq + bq, k = x @ wk + bk, v = x @ wv + bv (one BLAS call on the concatenated
    weights). Head h uses columns h*E:(h+1)*E of q, and kv head h // (H / num_kv_heads)
    the matching columns of k and v; heads are attended by the fused kernel (reading q,
    k, v in place) and concatenated back to (..., L, H*Ev), then @ wo + bo.

    Note the layout: a ``torch.nn.Linear`` weight is (out, in); pass its transpose.

    Parameters
    ----------
    x : array_like, (..., L, d_model)
    wq : array_like, (d_model, H*E)
    wk : array_like, (d_model, Hkv*E)
    wv : array_like, (d_model, Hkv*Ev)
    num_heads : int
        H, the query heads.
    wo : array_like, optional, (H*Ev, d_out)
    bq, bk, bv : array_like, optional, (H*E,), (Hkv*E,), (Hkv*Ev,)
        Projection biases (every BERT, GPT-2, ViT and Whisper checkpoint has them).
    bo : array_like, optional, (d_out,), or (H*Ev,) without wo
    num_kv_heads : int, optional
        Hkv for grouped-query attention (H a multiple of it); default H.
    window_size, key_lengths : as in scaled_dot_product_attention
        key_lengths broadcasts to the batch dims x.shape[:-2] (padding of each sequence).
    rope_base : float, optional
        Apply rotary position embeddings (rotate-half, positions 0..L-1, this base, e.g.
        10000.0) to each head's q and k after the projection.
    is_causal, scale, num_threads : as in scaled_dot_product_attention.

    Returns
    -------
    y : ndarray, (..., L, d_out), or (..., L, H*Ev) without wo
        float64 if any input is float64, else float32.

    Examples
    --------
    >>> import numpy as np, selfattn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 5, 16))
    >>> wq, wk, wv = (rng.standard_normal((16, 16)) for _ in range(3))
    >>> selfattn.attend(x, wq, wk, wv, num_heads=4, bq=np.zeros(16), is_causal=True).shape
    (2, 5, 16)
    """
    H = _check_heads(num_heads, "num_heads")
    Hkv = H if num_kv_heads is None else _check_heads(num_kv_heads, "num_kv_heads")
    if H % Hkv:
        raise ValueError(f"num_heads={H} must be a multiple of num_kv_heads={Hkv}")
    arrs = {"x": x, "wq": wq, "wk": wk, "wv": wv, "wo": wo, "bq": bq, "bk": bk, "bv": bv, "bo": bo}
    arrs = {n: _core._as_input(a, n) for n, a in arrs.items() if a is not None or n in ("x", "wq", "wk", "wv")}
    dt = np.result_type(*(_core._compute_dtype_of(a.dtype, n) for n, a in arrs.items()))
    x, wq, wk, wv = arrs["x"], arrs["wq"], arrs["wk"], arrs["wv"]
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dims (..., L, d_model), got shape {x.shape}")
    d = x.shape[-1]
    for n in ("wq", "wk", "wv"):
        w = arrs[n]
        if w.ndim != 2 or w.shape[0] != d:
            hint = (f"; a torch.nn.Linear weight is (out, in): pass {n}.T" if w.ndim == 2 and w.shape[1] == d
                    else "")
            raise ValueError(f"{n} must be 2-D (d_model, H*E) with d_model={d} matching x {x.shape}, "
                             f"got shape {w.shape}{hint}")
    if wq.shape[1] % H:
        raise ValueError(f"wq has {wq.shape[1]} columns, not a multiple of num_heads={H} (shape {wq.shape})")
    E = wq.shape[1] // H
    if wk.shape[1] != Hkv * E:
        if Hkv == H:
            raise ValueError(f"wq {wq.shape} and wk {wk.shape} must have the same number of columns H*E")
        raise ValueError(f"wk {wk.shape} must have num_kv_heads*E = {Hkv}*{E} = {Hkv * E} columns "
                         f"(wq {wq.shape} has num_heads*E = {H}*{E})")
    if wv.shape[1] % Hkv:
        what = f"num_heads={H}" if Hkv == H else f"num_kv_heads={Hkv}"
        raise ValueError(f"wv has {wv.shape[1]} columns, not a multiple of {what} (shape {wv.shape})")
    Ev = wv.shape[1] // Hkv
    if "wo" in arrs:
        wo = arrs["wo"]
        if wo.ndim != 2 or wo.shape[0] != H * Ev:
            raise ValueError(f"wo must be 2-D (H*Ev, d_out) = ({H * Ev}, d_out), got shape {wo.shape}")
    widths = {"bq": H * E, "bk": Hkv * E, "bv": Hkv * Ev, "bo": arrs["wo"].shape[1] if "wo" in arrs else H * Ev}
    for n, width in widths.items():
        if n in arrs and arrs[n].shape != (width,):
            raise ValueError(f"{n} must have shape ({width},), got {arrs[n].shape}")
    if rope_base is not None:
        if isinstance(rope_base, (bool, str, bytes)) or not isinstance(rope_base, (int, float, np.integer, np.floating)):
            raise TypeError(f"rope_base must be a real number or None, got {type(rope_base).__name__}")
        if not (np.isfinite(rope_base) and rope_base > 0):
            raise ValueError(f"rope_base must be finite and > 0, got {rope_base!r}")
        if E % 2:
            raise ValueError(f"rope_base needs an even head dim E, got E={E}")
    # validate everything the kernel will check before the projections (errors before any work)
    _core._check_args(scale, num_threads)
    lead, L = x.shape[:-2], x.shape[-2]
    empty_heads = lambda n: np.empty(lead + (n, L, 0), dtype=dt)   # noqa: E731  (no memory: one dim is 0)
    _core.sdpa(empty_heads(H), empty_heads(Hkv), empty_heads(Hkv), is_causal=is_causal, scale=scale,
               num_threads=num_threads, enable_gqa=Hkv != H, window_size=window_size, key_lengths=key_lengths,
               schedule_only=True)

    w = np.concatenate([wq.astype(dt, copy=False), wk.astype(dt, copy=False), wv.astype(dt, copy=False)], axis=1)
    qkv = np.matmul(x.astype(dt, copy=False), w)              # (..., L, H*E + Hkv*E + Hkv*Ev)
    if any(n in arrs for n in ("bq", "bk", "bv")):
        qkv += np.concatenate([arrs[n].astype(dt, copy=False) if n in arrs else np.zeros(widths[n], dt)
                               for n in ("bq", "bk", "bv")])

    def heads(lo, n, width):   # columns lo:lo+n*width as a (..., n, L, width) view, no copy
        t = qkv[..., lo:lo + n * width].reshape(lead + (L, n, width))
        return np.swapaxes(t, -2, -3)

    q, k, v = heads(0, H, E), heads(H * E, Hkv, E), heads(H * E + Hkv * E, Hkv, Ev)
    if rope_base is not None:
        from .positional import rope
        q, k = rope(q, base=float(rope_base)), rope(k, base=float(rope_base))
    out = np.empty(lead + (L, H * Ev), dtype=dt)
    out_heads = np.swapaxes(out.reshape(lead + (L, H, Ev)), -2, -3)
    _core.sdpa(q, k, v, is_causal=is_causal, scale=scale, num_threads=num_threads, enable_gqa=Hkv != H,
               window_size=window_size, key_lengths=key_lengths, out=out_heads)
    if "wo" in arrs:
        out = np.matmul(out, arrs["wo"].astype(dt, copy=False))
    if "bo" in arrs:
        out += arrs["bo"].astype(dt, copy=False)
    return out


def config():
    """What runs: version, instruction set in use, those available, OpenMP, default threads."""
    from . import __version__
    return {
        "version": __version__,
        "isa": _core.get_isa(),
        "isas_available": _core.available_isas(),
        "openmp": _core.openmp_enabled(),
        "default_threads": _core.default_threads(),
    }


def show_config(file=None):
    """Print config() as a few lines."""
    c = config()
    file = sys.stdout if file is None else file
    print(f"selfattn {c['version']}: isa={c['isa']} (available: {', '.join(c['isas_available'])}), "
          f"openmp={'yes' if c['openmp'] else 'no'}, default_threads={c['default_threads']}", file=file)


@contextlib.contextmanager
def use_isa(name):
    """Force instruction set `name` ('avx512', 'avx2', 'generic') inside a with block."""
    prev = _core.set_isa(name)
    try:
        yield
    finally:
        _core.set_isa(prev)
