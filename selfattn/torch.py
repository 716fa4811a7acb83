"""selfattn as a differentiable torch op (CPU): ``selfattn.torch.scaled_dot_product_attention``
and ``selfattn.torch.flex_attention`` (a selfattn.BlockMask from ``selfattn.create_block_mask``).

    import selfattn.torch
    out = selfattn.torch.scaled_dot_product_attention(q, k, v, is_causal=True)   # torch tensors
    out.sum().backward()                                                          # q.grad, k.grad, v.grad

A ``torch.autograd.Function`` over selfattn's fused forward and fused backward (the VJP of
`selfattn.scaled_dot_product_attention_vjp`). Tensors cross into NumPy and back through the
array protocols (``tensor.detach().numpy()``, ``torch.from_numpy``): no copy for CPU tensors,
and the forward keeps only the output and its log-sum-exp, never the L x S weights.

Not imported by ``import selfattn`` (torch is optional): ``import selfattn.torch``.
"""

from typing import Any, Optional

import numpy as _np
import torch as _torch
from torch.autograd.function import once_differentiable

from . import _spec
from .autograd import _grad_dtype, _unbroadcast, flex_array_grads, scaled_dot_product_attention_vjp
from .flex import _flex_args, _flex_bwd, _flex_fwd

__all__ = ["scaled_dot_product_attention", "flex_attention"]

_DTYPES = (_torch.float32, _torch.float64, _torch.float16, _torch.bfloat16)
# float8 (key and value of a float8 KV cache only: read as stored under float32 queries)
_FP8 = {"float8_e4m3fn": _torch.float8_e4m3fn, "float8_e5m2": _torch.float8_e5m2}


def _bfloat16(name: str) -> Any:
    """NumPy's bfloat16 dtype (ml_dtypes), or a TypeError saying where to get it."""
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError(f"{name} is a bfloat16 tensor: NumPy sees bfloat16 through ml_dtypes, which is not "
                        f"installed (pip install 'selfattn[bf16]', or pip install ml_dtypes)") from None
    return ml_dtypes.bfloat16


def _to_torch(a: Any) -> Any:
    """torch.from_numpy, bfloat16 and float8 included (viewed through int16 / uint8: no copy)."""
    if a.dtype.name == "bfloat16":
        return _torch.from_numpy(a.view(_np.int16)).view(_torch.bfloat16)
    if a.dtype.name in _FP8:
        return _torch.from_numpy(a.view(_np.uint8)).view(_FP8[a.dtype.name])
    return _torch.from_numpy(a)


def _as_numpy(t: Any, name: str) -> Any:
    """A CPU float32/float64/float16/bfloat16 tensor as an ndarray sharing its memory (bfloat16
    as ml_dtypes.bfloat16); other values as they are."""
    if not isinstance(t, _torch.Tensor):
        return t
    if t.device.type != "cpu":
        raise ValueError(f"selfattn.torch runs on the CPU: {name} is on {t.device}; move it with "
                         f"{name}.cpu() (for CUDA, torch.nn.functional.scaled_dot_product_attention "
                         f"is the fused kernel to use)")
    fp8 = next((n for n, d in _FP8.items() if t.dtype == d), None)
    if t.is_complex() or (t.is_floating_point() and t.dtype not in _DTYPES and fp8 is None):
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}"
                        + (" (convert with .float())" if t.is_floating_point() else ""))
    if t.layout != _torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    t = t.detach().resolve_conj().resolve_neg()
    if t.dtype == _torch.bfloat16:
        return t.view(_torch.int16).numpy().view(_bfloat16(name))
    if fp8 is not None:                  # (ml_dtypes is there: float8 tensors come from a float8 cache)
        import ml_dtypes
        return t.view(_torch.uint8).numpy().view(getattr(ml_dtypes, fp8))
    return t.numpy()


class _SDPA(_torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, query: Any, key: Any, value: Any, attn_mask: Any, sinks: Any,  # type: ignore[override, unused-ignore]
                is_causal: bool, options: dict) -> Any:
        for t, name in ((query, "query"), (key, "key"), (value, "value")):
            if not t.is_floating_point():
                raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
        q, k, v = _as_numpy(query, "query"), _as_numpy(key, "key"), _as_numpy(value, "value")
        mask = _as_numpy(attn_mask, "attn_mask")
        if sinks is not None:            # an input of the Function (so that it gets a gradient)
            options = dict(options, sinks=_as_numpy(sinks, "sinks"))
        out, vjp = scaled_dot_product_attention_vjp(q, k, v, attn_mask=mask, is_causal=is_causal, **options)
        out.flags.writeable = True       # ours alone; autograd's version counter guards it (below)
        result = _to_torch(out)
        ctx.vjp = vjp
        # saved so that autograd's version counters catch in-place changes between forward and
        # backward (the VJP reads these very buffers)
        ctx.save_for_backward(query, key, value, result)
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Any) -> Any:  # type: ignore[override, unused-ignore]
        ctx.saved_tensors                                    # raises if an input was modified in place
        need = ctx.needs_input_grad[:3]
        need_sinks = ctx.needs_input_grad[4]
        if not any(need) and not need_sinks:
            return None, None, None, None, None, None, None
        g = _as_numpy(grad_out.contiguous(), "grad_out")
        grads = ctx.vjp(g)
        dsinks = _to_torch(_np.ascontiguousarray(grads[3])) if need_sinks else None
        return tuple(_to_torch(d) if n else None for d, n in zip(grads[:3], need)) + (None, dsinks, None, None)


def _torch_seed() -> int:
    """A 63-bit seed drawn from torch's default CPU generator."""
    return int(_torch.randint(0, 2 ** 63 - 1, (1,), dtype=_torch.int64).item())


def scaled_dot_product_attention(query: Any, key: Any, value: Any, attn_mask: Optional[Any] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, *, scale: Optional[float] = None,
                                 enable_gqa: bool = False, **options: Any) -> Any:
    """Fused attention on CPU tensors, differentiable: ``softmax(q k^T * scale + mask) v``.

    Parameters
    ----------
    query, key, value : torch.Tensor, float32, float64, float16 or bfloat16, on the CPU
        (..., Hq, L, E), (..., H, S, E), (..., H, S, Ev), as for
        `selfattn.scaled_dot_product_attention` (broadcast batch dims allowed). float16 and
        bfloat16 (all three the same) are read as stored, computed in float32 and returned in
        their dtype; bfloat16 crosses into NumPy through ml_dtypes (the ``bf16`` extra).
    attn_mask : torch.Tensor (bool: True = takes part, or float: added) or array, optional
        Gets no gradient: a mask that requires grad is an error.
    dropout_p : float in [0, 1)
        Attention dropout in the fused kernel (see `selfattn.scaled_dot_product_attention`); the
        mask's seed is drawn from torch's default generator (``torch.manual_seed`` fixes it)
        unless ``seed=`` is given, and the backward draws the same mask.
    is_causal : bool
    scale, enable_gqa
        Keyword-only, as in torch: ``(query, key, value, attn_mask=None, dropout_p=0.0,
        is_causal=False, *, scale=None, enable_gqa=False)``.
    **options
        Every other option of `selfattn.scaled_dot_product_attention` but ``return_lse`` and
        ``out``: window_size, alignment, key_lengths, alibi_slopes, softcap, num_threads, and
        ``sinks`` (a tensor (..., Hq) that gets its gradient when it requires one, as gpt-oss's
        learnable sinks).

    Returns
    -------
    torch.Tensor
        (..., Hq, L, Ev), float64 if any input is float64, the inputs' dtype if they are
        float16 or bfloat16, else float32, sharing memory with the array the kernel wrote. Backward gives query, key and value their gradients (summed over
        broadcast or GQA-shared units), only for the inputs that require them.

    Raises
    ------
    ValueError
        A tensor not on the CPU (CUDA, MPS, meta): move it with ``.cpu()``.
    TypeError
        integer tensors, mixed 16-bit dtypes, bfloat16 without ml_dtypes; an ``attn_mask``
        that requires grad; an is_causal that is not a bool.

    Examples
    --------
    >>> import torch, selfattn.torch
    >>> q, k, v = (torch.randn(2, 4, 8, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    >>> out = selfattn.torch.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> out.shape
    torch.Size([2, 4, 8, 16])
    >>> out.sum().backward()
    >>> q.grad.shape, bool(torch.allclose(v.grad.sum(dim=-2), torch.full((2, 4, 16), 8.0, dtype=torch.float64)))
    (torch.Size([2, 4, 8, 16]), True)
    """
    is_causal = _spec.check_is_causal(is_causal)
    if _spec.check_dropout_p(dropout_p):
        # the mask's seed from torch's generator (torch.manual_seed makes it reproducible), unless given
        options["dropout_p"] = float(dropout_p)
        if options.get("seed") is None:
            options["seed"] = _torch_seed()
    if scale is not None:
        options["scale"] = scale
    if enable_gqa is not False:
        options["enable_gqa"] = enable_gqa
    for bad in ("return_lse", "out"):
        if bad in options:
            raise TypeError(f"scaled_dot_product_attention() got an unexpected keyword argument {bad!r}")
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        if not isinstance(t, _torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__} (for NumPy arrays use "
                            f"selfattn.scaled_dot_product_attention)")
    if isinstance(attn_mask, _torch.Tensor) and attn_mask.requires_grad:
        raise TypeError("attn_mask requires grad, but selfattn.torch gives the mask no gradient; pass "
                        "attn_mask.detach() if no gradient is wanted")
    sinks = options.pop("sinks", None)
    if sinks is not None and not isinstance(sinks, _torch.Tensor):
        sinks = _torch.as_tensor(_np.asarray(sinks))
    options = {n: (_as_numpy(o, n) if isinstance(o, _torch.Tensor) else o) for n, o in options.items()}
    return _SDPA.apply(query, key, value, attn_mask, sinks, is_causal, options)


class _Flex(_torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, query: Any, key: Any, value: Any, block_mask: Any, score_mod: Any, options: dict,  # type: ignore[override, unused-ignore]
                *captured: Any) -> Any:
        """captured: the tensors score_mod reads that want a gradient (their data is in the
        program's arrays already: here they only take part in autograd)."""
        for t, name in ((query, "query"), (key, "key"), (value, "value")):
            if not isinstance(t, _torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"{name} must be a float32, float64, float16 or bfloat16 torch.Tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
        q, k, v, bm, sm = _flex_args(_as_numpy(query, "query"), _as_numpy(key, "key"), _as_numpy(value, "value"),
                                     score_mod, block_mask, "flex_attention", options["enable_gqa"])
        out, lse = _flex_fwd(q, k, v, bm, sm, True, **options)
        wanted = [next(i for i, x in enumerate(sm.program.sources) if x is c) for c in captured]
        ctx.arrays, ctx.options, ctx.block_mask = (q, k, v, out, lse, bm, sm, wanted), options, block_mask
        result, lse_t = _to_torch(out), _torch.from_numpy(lse)
        ctx.mark_non_differentiable(lse_t)
        ctx.save_for_backward(query, key, value, result)     # version counters: in-place changes caught
        return result, lse_t

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Any, grad_lse: Any) -> Any:  # type: ignore[override, unused-ignore]
        ctx.saved_tensors
        q, k, v, out, lse, bm, sm, wanted = ctx.arrays
        need = ctx.needs_input_grad
        none = (None, None, None)
        if not any(need):
            return (None,) * (6 + len(wanted))
        g = _np.ascontiguousarray(_as_numpy(grad_out, "grad_out"), dtype=out.dtype)
        res: list = [None, None, None]
        if any(need[:3]):
            dq, dk, dv = _flex_bwd(q, k, v, out, lse, g, bm, sm, **ctx.options)
            grads = [_unbroadcast(d, a.shape, _grad_dtype(a)) for d, a in zip((dq, dk, dv), (q, k, v))]
            res = [_to_torch(d) if n else None for d, n in zip(grads, need[:3])]
        cap: list = [None] * len(wanted)
        if any(need[6:]):
            ga = flex_array_grads(sm.program, wanted, q, k, v, out, lse, g, ctx.options["scale"], ctx.block_mask)
            cap = [_torch.from_numpy(d).to(sm.program.sources[t].dtype) if n else None
                   for d, t, n in zip(ga, wanted, need[6:])]
        return tuple(res) + none + tuple(cap)


def flex_attention(query: Any, key: Any, value: Any, score_mod: Optional[Any] = None, block_mask: Optional[Any] = None,
                   *, scale: Optional[float] = None, enable_gqa: bool = False, return_lse: bool = False,
                   num_threads: Optional[int] = None) -> Any:
    """`selfattn.flex_attention` on CPU tensors, differentiable: query, key and value get
    gradients through the fused backward (which reads the same block mask and score_mod's
    derivative), and so do the tensors score_mod captures that require grad (a T5 bias table:
    computed blockwise in NumPy float64, see `selfattn.flex_attention_vjp`'s grad_arrays).

    block_mask is a `selfattn.BlockMask` (`selfattn.create_block_mask`: mask_mod evaluated on
    NumPy index arrays; a mod written with operators and indexing works unchanged), not torch's.
    score_mod may be written with torch's functions (torch.tanh, torch.where, .abs(), ...) or
    NumPy's; it is traced once per call (selfattn._scoremod), never run per element. Returns
    out (B, Hq, L, Ev) in the inputs' dtype (float64 if any is), or (out, lse) with
    ``return_lse=True`` (lse gets no gradient).

    Examples
    --------
    >>> import torch, selfattn, selfattn.torch
    >>> q, k, v = (torch.randn(1, 2, 64, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    >>> bm = selfattn.create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 64, 64, BLOCK_SIZE=16)
    >>> out = selfattn.torch.flex_attention(q, k, v, block_mask=bm)
    >>> out.sum().backward()
    >>> bool(torch.allclose(v.grad.sum(dim=-2), torch.full((1, 2, 8), 64.0, dtype=torch.float64)))
    True
    >>> bias = torch.zeros(2, 127, dtype=torch.float64, requires_grad=True)   # T5: [head, q - kv + 63]
    >>> out = selfattn.torch.flex_attention(q, k, v, lambda s, b, h, qi, ki: s + bias[h, qi - ki + 63])
    >>> out.sum().backward()
    >>> bias.grad.shape
    torch.Size([2, 127])
    """
    options = dict(scale=scale, enable_gqa=enable_gqa, num_threads=num_threads)
    captured: list = []
    if score_mod is not None:
        from ._scoremod import trace
        prog = trace(score_mod)
        captured = [x for x, a in zip(prog.sources, prog.arrays) if isinstance(x, _torch.Tensor) and x.requires_grad
                    and a.dtype.kind == "f" and any(n[0] == "load" and prog.arrays[n[1][0]] is a
                                                    for n in prog.nodes)]
        score_mod = prog                                     # traced once
    out, lse = _Flex.apply(query, key, value, block_mask, score_mod, options, *captured)
    return (out, lse) if return_lse else out

