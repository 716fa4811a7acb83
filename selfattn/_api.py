"""The public functions: thin Python over the Cython engine (_core)."""

import contextlib
import contextvars
import sys
from typing import IO, Any, Dict, Iterator, List, Literal, Optional, Tuple, Union, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

try:
    from . import _core
except ImportError as exc:   # most often: the uncompiled source tree shadows the installed package
    import os as _os
    raise ImportError(
        f"selfattn's compiled extension (selfattn._core) cannot be imported from "
        f"{_os.path.dirname(__file__)}: {exc}. If that is a source checkout, install it "
        f"(pip install .) and run from another directory (python puts the current directory "
        f"first on sys.path; the installed `selfattn` command works anywhere), or build in place "
        f"(python setup.py build_ext --inplace).") from exc
from . import _spec
from ._spec import ArraySpec

__all__ = ["scaled_dot_product_attention", "varlen_attention", "attend", "config", "show_config", "use_isa", "set_isa",
           "available_isas"]

Array = NDArray[Any]   # float32 or float64, as documented per function


def available_isas() -> List[str]:
    """Instruction sets this build can run on this CPU, best first.

    Examples
    --------
    >>> import selfattn
    >>> "generic" in selfattn.available_isas()   # the portable path runs everywhere
    True
    """
    return list(_core.available_isas())


# ---------------------------------------------------------------- which instruction set runs
#
# The path a call runs = the instruction set forced in the calling context (use_isa: a
# ContextVar in the engine, per thread and per asyncio task), else the process default
# (SELFATTN_ISA at import, then set_isa). The engine reads it once per call, so calls on
# different paths run side by side without affecting each other.


def _checked_isa(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, one of {_core.ISA_NAMES}, got {type(name).__name__}")
    if name not in _core.ISA_NAMES:
        raise ValueError(f"unknown instruction set {name!r}; choose one of {_core.ISA_NAMES}")
    if name not in _core.available_isas():
        raise ValueError(f"instruction set {name!r} is not available on this CPU/build "
                         f"(available: {', '.join(_core.available_isas())})")
    return name


def _effective_isa() -> str:
    return str(_core.current_isa())


def set_isa(name: str) -> str:
    """Make instruction set `name` ('avx512amx', 'avx512bf16', 'avx512', 'avx2', 'neonbf16', 'neon' or 'generic') the process-wide default.

    Every thread and task uses the default, except inside a :func:`use_isa` block, which
    overrides it for its own context. ``SELFATTN_ISA`` sets the default at import.

    Parameters
    ----------
    name : str
        One of :func:`available_isas`.

    Returns
    -------
    str
        The default before, so that it can be restored (or use :func:`use_isa` for a block).

    Raises
    ------
    ValueError
        If `name` is unknown or this CPU cannot run it.
    TypeError
        If `name` is not a str.
    """
    return str(_core.set_isa(_checked_isa(name)))


@overload
def scaled_dot_product_attention(query: ArrayLike, key: ArrayLike, value: ArrayLike,
                                 attn_mask: Optional[ArrayLike] = ..., dropout_p: float = ...,
                                 is_causal: bool = ..., *, scale: Optional[float] = ..., enable_gqa: bool = ...,
                                 return_lse: Literal[False] = ..., num_threads: Optional[int] = ...,
                                 window_size: Optional[Union[int, Tuple[Optional[int], Optional[int]]]] = ...,
                                 alignment: str = ..., key_lengths: Optional[ArrayLike] = ...,
                                 alibi_slopes: Optional[ArrayLike] = ..., softcap: Optional[float] = ...,
                                 sinks: Optional[ArrayLike] = ..., num_sink_tokens: Optional[int] = ...,
                                 k_scale: Optional[ArrayLike] = ..., v_scale: Optional[ArrayLike] = ...,
                                 seed: Any = ...) -> Array: ...
@overload
def scaled_dot_product_attention(query: ArrayLike, key: ArrayLike, value: ArrayLike,
                                 attn_mask: Optional[ArrayLike] = ..., dropout_p: float = ...,
                                 is_causal: bool = ..., *, scale: Optional[float] = ..., enable_gqa: bool = ...,
                                 return_lse: Literal[True], num_threads: Optional[int] = ...,
                                 window_size: Optional[Union[int, Tuple[Optional[int], Optional[int]]]] = ...,
                                 alignment: str = ..., key_lengths: Optional[ArrayLike] = ...,
                                 alibi_slopes: Optional[ArrayLike] = ..., softcap: Optional[float] = ...,
                                 sinks: Optional[ArrayLike] = ..., num_sink_tokens: Optional[int] = ...,
                                 k_scale: Optional[ArrayLike] = ..., v_scale: Optional[ArrayLike] = ...,
                                 seed: Any = ...
                                 ) -> Tuple[Array, Array]: ...
@overload
def scaled_dot_product_attention(query: ArrayLike, key: ArrayLike, value: ArrayLike,
                                 attn_mask: Optional[ArrayLike] = ..., dropout_p: float = ...,
                                 is_causal: bool = ..., *, scale: Optional[float] = ..., enable_gqa: bool = ...,
                                 return_lse: bool = ..., num_threads: Optional[int] = ...,
                                 window_size: Optional[Union[int, Tuple[Optional[int], Optional[int]]]] = ...,
                                 alignment: str = ..., key_lengths: Optional[ArrayLike] = ...,
                                 alibi_slopes: Optional[ArrayLike] = ..., softcap: Optional[float] = ...,
                                 sinks: Optional[ArrayLike] = ..., num_sink_tokens: Optional[int] = ...,
                                 k_scale: Optional[ArrayLike] = ..., v_scale: Optional[ArrayLike] = ...,
                                 seed: Any = ...
                                 ) -> Union[Array, Tuple[Array, Array]]: ...


def scaled_dot_product_attention(query: ArrayLike, key: ArrayLike, value: ArrayLike,
                                 attn_mask: Optional[ArrayLike] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, *, scale: Optional[float] = None, enable_gqa: bool = False,
                                 return_lse: bool = False, num_threads: Optional[int] = None,
                                 window_size: Optional[Union[int, Tuple[Optional[int], Optional[int]]]] = None,
                                 alignment: str = "top_left", key_lengths: Optional[ArrayLike] = None,
                                 alibi_slopes: Optional[ArrayLike] = None, softcap: Optional[float] = None,
                                 sinks: Optional[ArrayLike] = None, num_sink_tokens: Optional[int] = None,
                                 k_scale: Optional[ArrayLike] = None, v_scale: Optional[ArrayLike] = None,
                                 seed: Any = None) -> Union[Array, Tuple[Array, Array]]:
    """softmax(query @ key^T * scale + mask) @ value, fused: the L x S scores never exist.

    Same names, order, layout and semantics as ``torch.nn.functional.scaled_dot_product_attention``
    (query, key, value, attn_mask, dropout_p, is_causal positional; scale, enable_gqa and the rest
    keyword-only, as torch's own).

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
    dropout_p : float in [0, 1)
        Attention dropout (torch's): each weight of the softmax is zeroed with probability
        dropout_p and the others scaled by 1 / (1 - dropout_p), in the fused kernel (nothing of
        size L x S is drawn or stored). Which are kept is a pure function of (seed, batch entry and
        head, query row, key) -- Philox4x32-10, ``src_c/dropout.h`` --, so the result does not
        depend on the thread count, and the VJP's backward draws the same mask. lse is that of
        the undropped weights. 0.0 (the default): none.
    is_causal : bool
        The query at position p sees keys j <= p (see `alignment`). A bool: anything else is a
        TypeError (a string, or a number given in is_causal's place).
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
        Broadcastable to (..., Hq): adds ``-slope * |p - j|`` to the logit (ALiBi).
    softcap : float > 0, optional
        The scaled logit s becomes softcap * tanh(s / softcap), before ALiBi and the mask
        are added (Gemma 2).
    sinks : array_like of float, optional
        Broadcastable to (..., Hq): an attention sink per query head (gpt-oss; FlashAttention's
        learnable sink), one more logit in every row's softmax denominator with a value of
        zero, ``out = sum_j e^(s_j) v_j / (e^sink + sum_j e^(s_j))``; lse includes it. In the
        logits' units (after scale). -inf is no sink; NaN and +inf are a ValueError. Its
        gradient comes from the VJPs and the torch bridge.
    num_sink_tokens : int >= 0, optional
        With a window bounded on the left: the first n keys stay visible to every query beside
        its window (StreamingLLM's attention sinks; subject to is_causal, the right side and
        key_lengths), and the key blocks between them and the window are skipped. No effect
        without such a window.
    k_scale, v_scale : array_like of float, optional
        Quantized keys and values (`selfattn.quantize_kv`): key and value int8 or float8
        (ml_dtypes' float8_e4m3fn / float8_e5m2), each key's row worth ``k_scale[..., j]`` times
        its values (v alike); broadcasting to the shapes of key and value without their last
        dim (int8: one per key; float8: usually one per head, ``(..., H, 1)``; float8 without
        scales: 1). The query float32. Read as stored: the decode path widens the values in
        registers and applies the scales per key. A float32 query also takes bfloat16 or
        float16 key and value (a 16-bit cache) as stored, without scales. The forward only (no
        VJP through any of these).
    seed : int, numpy.random.Generator or None
        With ``dropout_p > 0``: the dropout mask's 64-bit key (an int in [0, 2**64), or one draw
        from a Generator); None draws a fresh one from the OS (a different mask each call). The
        same seed and arguments give the same bits.

    Returns
    -------
    out : ndarray, (..., Hq, L, Ev)
        float64 if any of query/key/value is float64, else float32. A row whose keys are all
        masked gives zeros.
    lse : ndarray, (..., Hq, L)
        Only with ``return_lse=True``, as ``(out, lse)``; -inf for a row whose keys are all masked
        (with sinks: the sink).

    Raises
    ------
    ValueError
        Shapes that do not fit (naming them), ``num_threads <= 0``, a non-finite ``scale``, a
        negative window, an unknown alignment, key_lengths outside [0, S], softcap <= 0.
    TypeError
        A dtype that cannot be computed (complex, object, string), naming the argument; an
        is_causal that is not a bool, a dropout_p that is not a number.

    Examples
    --------
    >>> import numpy as np
    >>> import selfattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 16, 8), dtype=np.float32) for _ in range(3))
    >>> out = selfattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> out.shape, out.dtype
    ((2, 4, 16, 8), dtype('float32'))

    The first query sees only the first key under the causal mask, so its output is that
    key's value:

    >>> bool(np.allclose(out[:, :, 0], v[:, :, 0]))
    True
    >>> out, lse = selfattn.scaled_dot_product_attention(q, k, v, return_lse=True)
    >>> lse.shape
    (2, 4, 16)
    """
    if is_causal is not False and is_causal is not True:
        is_causal = _spec.check_is_causal(is_causal)
    seed_bits = 0
    if dropout_p.__class__ is not float or dropout_p != 0.0:
        dropout_p = _spec.check_dropout_p(dropout_p)
        if dropout_p:
            seed_bits = _spec.dropout_seed(seed)
    return _core.sdpa(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                      enable_gqa=enable_gqa, return_lse=return_lse, num_threads=num_threads,
                      window_size=window_size, alignment=alignment, key_lengths=key_lengths,
                      alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks, num_sink_tokens=num_sink_tokens,
                      k_scale=k_scale, v_scale=v_scale, dropout_p=dropout_p, dropout_seed=seed_bits)


def varlen_attention(query: ArrayLike, key: ArrayLike, value: ArrayLike, cu_seqlens_q: ArrayLike,
                     cu_seqlens_k: ArrayLike, *, scale: Optional[float] = None, is_causal: bool = False,
                     window_size: Optional[Union[int, Tuple[Optional[int], Optional[int]]]] = None,
                     alignment: str = "top_left", alibi_slopes: Optional[ArrayLike] = None,
                     softcap: Optional[float] = None, enable_gqa: bool = False, return_lse: bool = False,
                     num_threads: Optional[int] = None, sinks: Optional[ArrayLike] = None,
                     num_sink_tokens: Optional[int] = None) -> Union[Array, Tuple[Array, Array]]:
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
    scale, is_causal, window_size, alignment, softcap, enable_gqa, return_lse, num_threads, num_sink_tokens
        As in `scaled_dot_product_attention`, per sequence (bottom_right aligns each
        sequence's last query with its last key).
    alibi_slopes, sinks : array_like of float, optional
        Broadcastable to (Hq,) (sinks: see `scaled_dot_product_attention`).

    Returns
    -------
    out : ndarray (Hq, total_q, Ev), or (out, lse) with lse (Hq, total_q).

    Examples
    --------
    >>> import numpy as np, selfattn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((7, 2, 4))              # 7 tokens (a 3- and a 4-token sequence), 2 heads
    >>> h = np.swapaxes(x, 0, 1)                         # (2, 7, 4): a view
    >>> out = selfattn.varlen_attention(h, h, h, [0, 3, 7], [0, 3, 7], is_causal=True)
    >>> bool(np.allclose(out[:, 3:], selfattn.scaled_dot_product_attention(h[:, 3:], h[:, 3:], h[:, 3:],
    ...                                                                    is_causal=True)))
    True
    """
    return _core.varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, scale=scale, is_causal=is_causal,
                        window_size=window_size, alignment=alignment, alibi_slopes=alibi_slopes,
                        softcap=softcap, enable_gqa=enable_gqa, return_lse=return_lse, num_threads=num_threads,
                        sinks=sinks, num_sink_tokens=num_sink_tokens)


def _check_heads(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def attend(x: ArrayLike, wq: ArrayLike, wk: ArrayLike, wv: ArrayLike, *, num_heads: int = 1,
           wo: Optional[ArrayLike] = None, is_causal: bool = False, scale: Optional[float] = None,
           num_threads: Optional[int] = None, bq: Optional[ArrayLike] = None, bk: Optional[ArrayLike] = None,
           bv: Optional[ArrayLike] = None, bo: Optional[ArrayLike] = None, num_kv_heads: Optional[int] = None,
           window_size: Optional[Union[int, Tuple[Optional[int], Optional[int]]]] = None,
           key_lengths: Optional[ArrayLike] = None, rope_base: Optional[float] = None) -> Array:
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

    Raises
    ------
    ValueError
        Shapes that do not fit, naming them; a weight in torch's (out, in) layout gets
        the hint to pass its transpose.
    TypeError
        A non-integer `num_heads` or a dtype that cannot be computed.

    Examples
    --------
    The four tokens of the demo (``python -m selfattn``), with untrained weights:

    >>> import numpy as np
    >>> import selfattn
    >>> x = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9], [1.0, 1.1, 1.2]])
    >>> eye = np.eye(3)
    >>> y = selfattn.attend(x, 2 * eye, 2 * eye, eye)
    >>> y.shape, y.dtype
    ((4, 3), dtype('float64'))
    >>> np.round(y[0], 3)
    array([0.699, 0.799, 0.899])

    A weight in torch's ``nn.Linear`` layout (out, in) must be transposed:

    >>> w_torch_layout = np.ones((6, 3))
    >>> selfattn.attend(x, w_torch_layout, w_torch_layout, w_torch_layout)
    Traceback (most recent call last):
        ...
    ValueError: wq must be 2-D (d_model, H*E) with d_model=3 matching x (4, 3), got shape (6, 3); it looks like torch's (out, in) layout: pass wq.T
    >>> selfattn.attend(x, w_torch_layout.T, w_torch_layout.T, w_torch_layout.T, num_heads=2).shape
    (4, 6)
    """
    return _attend(x, wq, wk, wv, num_heads, wo, is_causal, scale, num_threads, bq, bk, bv, bo, num_kv_heads,
                   window_size, key_lengths, rope_base)


def _attend_args(x, wq, wk, wv, num_heads, wo, is_causal, scale, num_threads, bq, bk, bv, bo, num_kv_heads,
                 window_size, key_lengths, rope_base):
    """Validate attend's arguments (every error before any work); shared with autograd.attend_vjp.
    Returns (arrs, dt, H, Hkv, E, Ev, widths): the given arrays by name (as arrays), the compute
    dtype, the heads, the head dims and the bias widths."""
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
            hint = (f"; it looks like torch's (out, in) layout: pass {n}.T"
                    if w.ndim == 2 and w.shape[1] == d else "")
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
            hint = ("; it looks like torch's (out, in) layout: pass wo.T"
                    if wo.ndim == 2 and wo.shape[1] == H * Ev else "")
            raise ValueError(f"wo must be 2-D (H*Ev, d_out) = ({H * Ev}, d_out), got shape {wo.shape}{hint}")
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
    # the attention problem, validated from the heads' shapes before the projections (no work yet)
    lead, L = x.shape[:-2], x.shape[-2]
    heads = lambda n, width: ArraySpec(lead + (n, L, width), dt)   # noqa: E731
    _core.describe(heads(H, E), heads(Hkv, E), heads(Hkv, Ev), is_causal=is_causal, scale=scale,
                   num_threads=num_threads, enable_gqa=Hkv != H, window_size=window_size, key_lengths=key_lengths)
    return arrs, dt, H, Hkv, E, Ev, widths


def _heads(t, lo, n, width):
    """Columns lo:lo+n*width of t (..., L, cols) as a (..., n, L, width) view, no copy."""
    lead, L = t.shape[:-2], t.shape[-2]
    return np.swapaxes(t[..., lo:lo + n * width].reshape(lead + (L, n, width)), -2, -3)


def _project_qkv(arrs, dt, H, Hkv, E, Ev, widths, rope_base):
    """attend's input side, shared with autograd.attend_vjp: one matmul of x on the concatenated
    weights [wq | wk | wv] (plus the biases), the heads split off as views, RoPE on q and k.
    Returns (xc, w, q, k, v): x and w in the compute dtype (the backward reuses them)."""
    xc = arrs["x"].astype(dt, copy=False)
    w = np.concatenate([arrs[n].astype(dt, copy=False) for n in ("wq", "wk", "wv")], axis=1)
    qkv = np.matmul(xc, w)                                   # (..., L, H*E + Hkv*E + Hkv*Ev)
    if any(n in arrs for n in ("bq", "bk", "bv")):
        qkv += np.concatenate([arrs[n].astype(dt, copy=False) if n in arrs else np.zeros(widths[n], dt)
                               for n in ("bq", "bk", "bv")])
    q, k, v = _heads(qkv, 0, H, E), _heads(qkv, H * E, Hkv, E), _heads(qkv, H * E + Hkv * E, Hkv, Ev)
    if rope_base is not None:
        from .positional import rope
        q, k = rope(q, base=float(rope_base)), rope(k, base=float(rope_base))
    return xc, w, q, k, v


def _project_out(o, arrs, dt):
    """attend's output side, shared with autograd.attend_vjp: the concatenated heads o (..., L, H*Ev)
    times wo, plus bo (each when given; without wo, bo is added to o in place)."""
    y = np.matmul(o, arrs["wo"].astype(dt, copy=False)) if "wo" in arrs else o
    if "bo" in arrs:
        y += arrs["bo"].astype(dt, copy=False)
    return y


def _attend(x, wq, wk, wv, num_heads, wo, is_causal, scale, num_threads, bq, bk, bv, bo, num_kv_heads,
            window_size, key_lengths, rope_base):
    arrs, dt, H, Hkv, E, Ev, widths = _attend_args(x, wq, wk, wv, num_heads, wo, is_causal, scale, num_threads,
                                                   bq, bk, bv, bo, num_kv_heads, window_size, key_lengths,
                                                   rope_base)
    _, _, q, k, v = _project_qkv(arrs, dt, H, Hkv, E, Ev, widths, rope_base)
    lead, L = arrs["x"].shape[:-2], arrs["x"].shape[-2]
    out = np.empty(lead + (L, H * Ev), dtype=dt)              # the heads write their columns in place
    _core.sdpa(q, k, v, is_causal=is_causal, scale=scale, num_threads=num_threads, enable_gqa=Hkv != H,
               window_size=window_size, key_lengths=key_lengths, out=_heads(out, 0, H, Ev))
    return _project_out(out, arrs, dt)


def config() -> Dict[str, Any]:
    """What runs: version, instruction set in use, those available, OpenMP, default threads.

    Returns
    -------
    dict
        ``version`` (str), ``isa`` (str: the path the calling thread or task runs now, its
        :func:`use_isa` if any, else the process default), ``isas_available`` (list of str,
        best first), ``openmp`` (bool), ``default_threads`` (int), ``half`` (dict: how
        bfloat16 and float16 inputs run on that instruction set: widened to float32 for the
        float32 kernels by e.g. ``'shifts'`` or ``'F16C vcvtph2ps'``, or ``'vdpbf16ps'`` /
        ``'BFDOT'``: the avx512bf16 / neonbf16 path's bfloat16 forward and backward (and on
        avx512bf16 the decode's scores) multiply bfloat16 pairs; the rest widens; or
        ``'AMX tdpbf16ps'``: the avx512amx path's bfloat16 forward multiplies them on AMX tiles).

    Examples
    --------
    >>> import selfattn
    >>> c = selfattn.config()
    >>> sorted(c)
    ['default_threads', 'half', 'isa', 'isas_available', 'openmp', 'version']
    >>> c["isa"] in c["isas_available"]
    True
    """
    from . import __version__
    isa = _effective_isa()
    return {
        "version": __version__,
        "isa": isa,
        "half": _core.storage_paths(isa),
        "isas_available": _core.available_isas(),
        "openmp": _core.openmp_enabled(),
        "default_threads": _core.default_threads(),
    }


def show_config(file: Optional[IO[str]] = None) -> None:
    """Print :func:`config` as one line (to `file`, default stdout), for the calling context.

    Example output: ``selfattn 0.1.0: isa=avx512 (available: avx512, avx512bf16, avx2, generic),
    openmp=yes, default_threads=2, bfloat16/float16: float32 kernels, widened by shifts / AVX-512
    vcvtph2ps``; on AMD's Zen 4 / Zen 5 (isa=avx512bf16): ``bfloat16: vdpbf16ps (forward, backward,
    decode), float16: float32 kernels, widened by AVX-512 vcvtph2ps``;
    on Intel's with AMX (isa=avx512amx): ``bfloat16: AMX tdpbf16ps (forward and backward; decode
    widened by shifts), ...``.
    """
    c = config()
    file = sys.stdout if file is None else file
    bf, f16 = c["half"]["bfloat16"], c["half"]["float16"]
    if bf == "vdpbf16ps":
        half = (f"bfloat16: vdpbf16ps (forward, backward, decode), "
                f"float16: float32 kernels, widened by {f16}")
    elif bf == "AMX tdpbf16ps":
        half = (f"bfloat16: AMX tdpbf16ps (forward and backward; decode widened by shifts), "
                f"float16: float32 kernels, widened by {f16}")
    elif bf == "BFDOT":
        half = (f"bfloat16: BFDOT (forward, backward; decode widened by shifts), "
                f"float16: float32 kernels, widened by {f16}")
    else:
        half = f"bfloat16/float16: float32 kernels, widened by {bf} / {f16}"
    print(f"selfattn {c['version']}: isa={c['isa']} (available: {', '.join(c['isas_available'])}), "
          f"openmp={'yes' if c['openmp'] else 'no'}, default_threads={c['default_threads']}, {half}",
          file=file)



@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Force instruction set `name` ('avx512amx', 'avx512bf16', 'avx512', 'avx2', 'neonbf16', 'neon', 'generic') in a with block, this context only.

    The choice is held in a :class:`contextvars.ContextVar`: it applies to the calls made by
    the thread (or asyncio task) that entered the block, and to nothing else. Other threads
    keep the process default (:func:`set_isa`, ``SELFATTN_ISA``), or their own ``use_isa``,
    even while this block runs. Blocks nest; leaving one, by an exception too, restores the
    path that was in force when it was entered.

    A new thread starts from an empty context: it does not inherit the forced path. To
    run a thread (or a ``concurrent.futures`` job) on the path in force here, run its
    function in a copy of the current context, ``contextvars.copy_context().run(fn, ...)``;
    an asyncio task copies its context when it is created, so it inherits the path of the
    code that created it.

    Each call reads its path once, when it starts: calls on different paths run concurrently,
    as calls on the same path do.

    Parameters
    ----------
    name : str
        One of :func:`available_isas`.

    Raises
    ------
    ValueError
        If `name` is unknown or this CPU cannot run it (on entering the block).
    TypeError
        If `name` is not a str.

    Examples
    --------
    >>> import numpy as np
    >>> import selfattn
    >>> q = np.ones((4, 8))
    >>> with selfattn.use_isa("generic"):
    ...     out = selfattn.scaled_dot_product_attention(q, q, q)
    ...     selfattn.config()["isa"]
    'generic'
    >>> bool(np.allclose(out, 1.0))
    True

    A thread started inside the block runs on the process default unless it is handed
    the context:

    >>> import contextvars, threading
    >>> seen = {}
    >>> with selfattn.use_isa("generic"):
    ...     plain = threading.Thread(target=lambda: seen.update(plain=selfattn.config()["isa"]))
    ...     ctx = contextvars.copy_context()
    ...     copied = threading.Thread(target=ctx.run, args=(lambda: seen.update(copied=selfattn.config()["isa"]),))
    ...     for t in (plain, copied):
    ...         t.start()
    ...         t.join()
    >>> seen["plain"] == selfattn.config()["isa"], seen["copied"]
    (True, 'generic')
    """
    token = _core._force_isa(_checked_isa(name))
    try:
        yield
    finally:
        try:
            _core._forced_isa.reset(token)
        except ValueError:       # left in another context than it was entered (a generator moved between tasks)
            _core._forced_isa.set(token.old_value if token.old_value is not contextvars.Token.MISSING else None)
