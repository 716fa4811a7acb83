"""The public functions: thin Python over the Cython engine (_core)."""

import contextlib
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

__all__ = ["scaled_dot_product_attention", "attend", "config", "show_config", "use_isa", "set_isa",
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


def set_isa(name: str) -> str:
    """Use instruction set `name` ('avx512', 'avx2' or 'generic') for the following calls.

    Returns
    -------
    str
        The name in use before, so that it can be restored (or use :func:`use_isa`).

    Raises
    ------
    ValueError
        If `name` is unknown or this CPU cannot run it.
    """
    return str(_core.set_isa(name))


@overload
def scaled_dot_product_attention(query: ArrayLike, key: ArrayLike, value: ArrayLike,
                                 attn_mask: Optional[ArrayLike] = ..., is_causal: bool = ..., *,
                                 scale: Optional[float] = ..., enable_gqa: bool = ...,
                                 return_lse: Literal[False] = ..., num_threads: Optional[int] = ...) -> Array: ...
@overload
def scaled_dot_product_attention(query: ArrayLike, key: ArrayLike, value: ArrayLike,
                                 attn_mask: Optional[ArrayLike] = ..., is_causal: bool = ..., *,
                                 scale: Optional[float] = ..., enable_gqa: bool = ...,
                                 return_lse: Literal[True], num_threads: Optional[int] = ...
                                 ) -> Tuple[Array, Array]: ...
@overload
def scaled_dot_product_attention(query: ArrayLike, key: ArrayLike, value: ArrayLike,
                                 attn_mask: Optional[ArrayLike] = ..., is_causal: bool = ..., *,
                                 scale: Optional[float] = ..., enable_gqa: bool = ...,
                                 return_lse: bool = ..., num_threads: Optional[int] = ...
                                 ) -> Union[Array, Tuple[Array, Array]]: ...


def scaled_dot_product_attention(query: ArrayLike, key: ArrayLike, value: ArrayLike,
                                 attn_mask: Optional[ArrayLike] = None, is_causal: bool = False, *,
                                 scale: Optional[float] = None, enable_gqa: bool = False,
                                 return_lse: bool = False, num_threads: Optional[int] = None
                                 ) -> Union[Array, Tuple[Array, Array]]:
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
        to (..., Hq, L, S). Read in place with its own strides, never expanded.
    is_causal : bool
        Query i sees keys j <= i (top-left aligned, also when L != S). Not with attn_mask.
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

    Returns
    -------
    out : ndarray, (..., Hq, L, Ev)
        float64 if any of query/key/value is float64, else float32. A row whose keys are all
        masked gives zeros.
    lse : ndarray, (..., Hq, L)
        Only with ``return_lse=True``, as ``(out, lse)``; -inf for a row whose keys are all masked.

    Raises
    ------
    ValueError
        Shapes that do not fit (naming them), ``attn_mask`` with ``is_causal``, ``num_threads <= 0``,
        a non-finite ``scale``.
    TypeError
        A dtype that cannot be computed (complex, object, string), naming the argument.

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
    return _core.sdpa(query, key, value, attn_mask, is_causal, scale, enable_gqa, return_lse, num_threads)


def attend(x: ArrayLike, wq: ArrayLike, wk: ArrayLike, wv: ArrayLike, *, num_heads: int = 1,
           wo: Optional[ArrayLike] = None, is_causal: bool = False, scale: Optional[float] = None,
           num_threads: Optional[int] = None) -> Array:
    """Multi-head self-attention of x with projection weights in (in, out) layout.

    q = x @ wq, k = x @ wk, v = x @ wv (one BLAS call on the concatenated weights). Head h
    uses columns h*E:(h+1)*E of q and k and h*Ev:(h+1)*Ev of v; heads are attended
    independently by the fused kernel (reading q, k, v in place) and concatenated back
    to (..., L, H*Ev), then multiplied by wo if given.

    Note the layout: a ``torch.nn.Linear`` weight is (out, in); pass its transpose.

    Parameters
    ----------
    x : array_like, (..., L, d_model)
        The tokens: L of them, each a d_model vector; leading dims are batch dims.
    wq, wk : array_like, (d_model, H*E)
    wv : array_like, (d_model, H*Ev)
    num_heads : int
        H; the columns of wq, wk and wv split evenly into H heads.
    wo : array_like, optional, (H*Ev, d_out)
        Output projection applied to the concatenated heads.
    is_causal, scale, num_threads
        As in :func:`scaled_dot_product_attention`.

    Returns
    -------
    ndarray, (..., L, H*Ev), or (..., L, d_out) with `wo`
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
    return _attend(x, wq, wk, wv, num_heads, wo, is_causal, scale, num_threads)


def _attend(x, wq, wk, wv, num_heads, wo, is_causal, scale, num_threads):   # untyped: rebinds x, w* to arrays
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
            hint = (f"; it looks like torch's (out, in) layout: pass {n}.T"
                    if w.ndim == 2 and w.shape[1] == d else "")
            raise ValueError(f"{n} must be 2-D (d_model, H*E) with d_model={d} matching x {x.shape}, "
                             f"got shape {w.shape}{hint}")
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
            hint = ("; it looks like torch's (out, in) layout: pass wo.T"
                    if wo.ndim == 2 and wo.shape[1] == H * Ev else "")
            raise ValueError(f"wo must be 2-D (H*Ev, d_out) = ({H * Ev}, d_out), got shape {wo.shape}{hint}")
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
    _core.sdpa(heads(0, E), heads(H * E, E), heads(2 * H * E, Ev), None, is_causal, scale, False, False,
               num_threads, out_heads)
    return out if wo is None else np.matmul(out, wo.astype(dt, copy=False))


def config() -> Dict[str, Any]:
    """What runs: version, instruction set in use, those available, OpenMP, default threads.

    Returns
    -------
    dict
        ``version`` (str), ``isa`` (str, in use), ``isas_available`` (list of str, best first),
        ``openmp`` (bool), ``default_threads`` (int).

    Examples
    --------
    >>> import selfattn
    >>> c = selfattn.config()
    >>> sorted(c)
    ['default_threads', 'isa', 'isas_available', 'openmp', 'version']
    >>> c["isa"] in c["isas_available"]
    True
    """
    from . import __version__
    return {
        "version": __version__,
        "isa": _core.get_isa(),
        "isas_available": _core.available_isas(),
        "openmp": _core.openmp_enabled(),
        "default_threads": _core.default_threads(),
    }


def show_config(file: Optional[IO[str]] = None) -> None:
    """Print :func:`config` as one line (to `file`, default stdout).

    Example output: ``selfattn 0.1.0: isa=avx512 (available: avx512, avx2, generic),
    openmp=yes, default_threads=2``.
    """
    c = config()
    file = sys.stdout if file is None else file
    print(f"selfattn {c['version']}: isa={c['isa']} (available: {', '.join(c['isas_available'])}), "
          f"openmp={'yes' if c['openmp'] else 'no'}, default_threads={c['default_threads']}", file=file)


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Force instruction set `name` ('avx512', 'avx2', 'generic') inside a with block.

    Examples
    --------
    >>> import numpy as np
    >>> import selfattn
    >>> q = np.ones((4, 8))
    >>> with selfattn.use_isa("generic"):
    ...     out = selfattn.scaled_dot_product_attention(q, q, q)
    >>> bool(np.allclose(out, 1.0))
    True
    """
    prev = _core.set_isa(name)
    try:
        yield
    finally:
        _core.set_isa(prev)
