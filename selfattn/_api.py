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


def attend(x, wq, wk, wv, *, num_heads=1, wo=None, is_causal=False, scale=None, num_threads=None):
    """Multi-head self-attention of x with projection weights in (in, out) layout.

    q = x @ wq, k = x @ wk, v = x @ wv (one BLAS call on the concatenated weights). Head h
    uses columns h*E:(h+1)*E of q and k and h*Ev:(h+1)*Ev of v; heads are attended
    independently by the fused kernel (reading q, k, v in place) and concatenated back
    to (..., L, H*Ev), then multiplied by wo if given.

    Note the layout: a ``torch.nn.Linear`` weight is (out, in); pass its transpose.

    Parameters
    ----------
    x : array_like, (..., L, d_model)
    wq, wk : array_like, (d_model, H*E)
    wv : array_like, (d_model, H*Ev)
    num_heads : int
    wo : array_like, optional, (H*Ev, d_out)
    is_causal, scale, num_threads : as in scaled_dot_product_attention.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)):
        raise TypeError(f"num_heads must be an int, got {type(num_heads).__name__}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    H = int(num_heads)
    arrs = {"x": x, "wq": wq, "wk": wk, "wv": wv}
    if wo is not None:
        arrs["wo"] = wo
    arrs = {n: _core._as_input(a, n) for n, a in arrs.items()}
    dt = np.result_type(*(_core._compute_dtype_of(a.dtype, n) for n, a in arrs.items()))
    x, wq, wk, wv = arrs["x"], arrs["wq"], arrs["wk"], arrs["wv"]
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dims (..., L, d_model), got shape {x.shape}")
    d = x.shape[-1]
    for n in ("wq", "wk", "wv"):
        w = arrs[n]
        if w.ndim != 2 or w.shape[0] != d:
            raise ValueError(f"{n} must be 2-D (d_model, H*E) with d_model={d} matching x {x.shape}, "
                             f"got shape {w.shape}")
    if wq.shape[1] != wk.shape[1]:
        raise ValueError(f"wq {wq.shape} and wk {wk.shape} must have the same number of columns H*E")
    for n in ("wq", "wv"):
        if arrs[n].shape[1] % H:
            raise ValueError(f"{n} has {arrs[n].shape[1]} columns, not a multiple of num_heads={H} "
                             f"(shape {arrs[n].shape})")
    E, Ev = wq.shape[1] // H, wv.shape[1] // H
    if wo is not None:
        wo = arrs["wo"]
        if wo.ndim != 2 or wo.shape[0] != H * Ev:
            raise ValueError(f"wo must be 2-D (H*Ev, d_out) = ({H * Ev}, d_out), got shape {wo.shape}")
    # validate the scalars before the projections (errors before any work)
    _core._check_args(scale, num_threads)

    w = np.concatenate([wq.astype(dt, copy=False), wk.astype(dt, copy=False), wv.astype(dt, copy=False)], axis=1)
    qkv = np.matmul(x.astype(dt, copy=False), w)              # (..., L, 2*H*E + H*Ev)
    lead, L = qkv.shape[:-2], qkv.shape[-2]

    def heads(lo, width):   # columns lo:lo+H*width as a (..., H, L, width) view, no copy
        t = qkv[..., lo:lo + H * width].reshape(lead + (L, H, width))
        return np.swapaxes(t, -2, -3)

    out = np.empty(lead + (L, H * Ev), dtype=dt)
    out_heads = np.swapaxes(out.reshape(lead + (L, H, Ev)), -2, -3)
    _core.sdpa(heads(0, E), heads(H * E, E), heads(2 * H * E, Ev), is_causal=is_causal, scale=scale,
               num_threads=num_threads, out=out_heads)
    return out if wo is None else np.matmul(out, wo.astype(dt, copy=False))


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
