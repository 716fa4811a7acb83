"""Attention over Dask arrays: :func:`scaled_dot_product_attention`, lazily, block by block.

``selfattn.dask`` is not imported by ``import selfattn``; it needs ``pip install "selfattn[dask]"``
(``dask[array,distributed]``: dask's own extra, so that distributed matches dask's version). It
runs on every Dask scheduler (threads, processes, synchronous, distributed).

How the problem is cut
----------------------
The query's chunks along the batch and head dims and along L, and the key's chunks along S, define
the blocks; the key/value (and the mask) are rechunked to match, and E/Ev are made whole.

* batch and head chunks are independent problems (with grouped-query attention, query head chunks
  are made multiples of the group so each meets whole kv heads);
* query chunks along L are independent too: each keeps its rows' positions (below);
* key chunks along S (sequence parallelism): each (query chunk, key chunk) block computes its
  ``(out, lse)`` with the fused kernel, and the blocks of a query chunk are merged by
  :func:`selfattn.merge_attention` in a tree of fan-in `split_every`. A key chunk that no query
  of the chunk can see (causal, window, key_lengths) makes no task at all.

Positions
---------
A block holds query rows ``l0 .. l0 + Lc - 1`` and keys ``s0 .. s0 + Sc - 1`` of the full problem.
What the structured options see is the position of a query row among the keys, ``p = i + d`` in
block indices with ``d = l0 - s0`` (plus ``S_b - L`` under ``alignment="bottom_right"``, per batch
entry), and ``key_lengths`` becomes ``clip(S_b - s0, 0, Sc)``. The kernel takes ``d`` per batch entry
(the engine's ``query_offsets``, the C problem's ``q_pos``): causal, windows and ALiBi then act
on the block exactly as on the full problem, and each block is one kernel call on views.
"""

import functools
import math
import operator
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _core, _spec
from .merge import merge_attention

__all__ = ["scaled_dot_product_attention"]

Array = NDArray[Any]
Window = Optional[Union[int, Tuple[Optional[int], Optional[int]]]]


def _import_dask() -> Any:
    try:
        import dask.array as da
    except ImportError as exc:
        raise ImportError(f"selfattn.dask needs dask: pip install \"selfattn[dask]\" "
                          f"(dask[array,distributed]) ({exc})") from exc
    return da


# ----------------------------------------------------------------------------------------------------
# one block, in NumPy (runs on the workers)

def _block(q: Array, k: Array, v: Array, mask: Optional[Array], *, l0: int, s0: int, L: int, S_b: Array,
           bottom_right: bool, left: Optional[int], right: Optional[int], slopes: Optional[Array],
           kw: Dict[str, Any], sinks: Optional[Array] = None) -> Tuple[Array, Array]:
    """(out, lse) of query rows l0.. against keys s0.. of the full problem (q, k, v: the chunks): one
    kernel call on the views, its rows placed at their positions among the block's keys.

    S_b: valid keys per batch entry of the block (its batch shape); left/right: the window sides
    with the causal cut folded in (right = 0), None = unbounded. sinks: given to one block of each
    row chunk only (the merge then counts them once)."""
    Sc = k.shape[-2]
    D = l0 - s0 + (S_b - L if bottom_right else 0 * S_b)      # position of the block's row 0, per entry
    Kb = np.clip(S_b - s0, 0, Sc)
    window = None if left is None and right is None else (left, right)
    return _core.sdpa(q, k, v, attn_mask=mask, window_size=window, alibi_slopes=slopes, return_lse=True,
                      key_lengths=Kb, query_offsets=D, sinks=sinks, **kw)


def _sees(Lc: int, Sc: int, D: Array, Kb: Array, left: Optional[int], right: Optional[int]) -> bool:
    """Whether some row i < Lc of a block sees some key j < Kb: lo <= j - i <= hi (see _block)."""
    if Lc == 0 or Sc == 0:
        return False
    lo = np.full(D.shape, -(Lc - 1)) if left is None else np.maximum(D - left, -(Lc - 1))
    hi = Kb - 1 if right is None else np.minimum(D + right, Kb - 1)
    return bool(np.any((Kb > 0) & (lo <= hi)))


def _merge_parts(parts: Sequence[Tuple[Array, Array]]) -> Tuple[Array, Array]:
    return merge_attention([p[0] for p in parts], [p[1] for p in parts])


def _nothing_visible(shape: Tuple[int, ...], ev: int, dt: Any, lse_dt: Any,
                     sinks: Optional[Array] = None) -> Tuple[Array, Array]:
    """A row chunk that sees no key: zeros, lse -inf (or the sink's, when there is one)."""
    lse = np.full(shape, -np.inf, dtype=lse_dt)
    if sinks is not None:
        lse[...] = sinks[..., None]
    return np.zeros(shape + (ev,), dtype=dt), lse


# ----------------------------------------------------------------------------------------------------
# the graph

def _bounds(chunks: Sequence[int]) -> List[Tuple[int, int]]:
    edges = np.concatenate([[0], np.cumsum(chunks, dtype=np.int64)])
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _group_chunks(chunks: Sequence[int], g: int) -> Tuple[int, ...]:
    """Head chunks whose boundaries are multiples of g (each then meets whole kv heads)."""
    edges = sorted({int(math.ceil(e / g)) * g for e in np.cumsum(chunks)} | {0})
    return tuple(b - a for a, b in zip(edges[:-1], edges[1:]))


def _as_dask(da: Any, x: Any, name: str) -> Any:
    if isinstance(x, da.Array):
        if any(math.isnan(c) for cs in x.chunks for c in cs):
            raise ValueError(f"{name} has unknown chunk sizes: call {name}.compute_chunk_sizes() first")
        return x
    try:
        a = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} cannot be read as an array: {exc}") from None
    return da.from_array(a, chunks=tuple(max(n, 1) for n in a.shape) if a.shape else ())


def _rechunk(q: Any, k: Any, v: Any, mask: Any, enable_gqa: bool) -> Tuple[Any, Any, Any, Any]:
    """The blocks' chunks: the query decides batch/heads/L, the key S; E and Ev whole; with
    grouped-query heads the query's head chunks are multiples of the group (whole kv heads)."""
    nd, E, Ev = q.ndim, q.shape[-1], v.shape[-1]
    if nd >= 3:
        Hq, H = q.shape[-3], k.shape[-3]
        g = Hq // H if (enable_gqa and H and Hq != H) else 1
        hq_chunks = _group_chunks(q.chunks[-3], g) if g > 1 else q.chunks[-3]
        q = q.rechunk(q.chunks[:-3] + (hq_chunks, q.chunks[-2], (E,)))
        kv_lead = q.chunks[:-3] + (tuple(c // g for c in hq_chunks),)
    else:
        q = q.rechunk((q.chunks[-2], (E,)))
        kv_lead = ()
    k = k.rechunk(kv_lead + (k.chunks[-2], (E,)))
    v = v.rechunk(kv_lead + (k.chunks[-2], (Ev,)))
    if mask is not None:
        mask = mask.reshape((1,) * (nd - mask.ndim) + mask.shape)
        want = q.chunks[:-1] + (k.chunks[-2],)
        mask = mask.rechunk(tuple((1,) if n == 1 else c for n, c in zip(mask.shape, want)))
    return q, k, v, mask


def _merge_tree(layer: Dict[Any, Any], keys: List[Any], merge_name: str, idx: Tuple[int, ...],
                split_every: int) -> Any:
    """Merge the blocks' (out, lse) `keys` in a tree of fan-in split_every; the root's key."""
    level = 0
    while len(keys) > 1:
        merged = []
        for gi in range(0, len(keys), split_every):
            group = keys[gi:gi + split_every]
            if len(group) == 1:
                merged.append(group[0])
                continue
            mk = (f"{merge_name}-{level}",) + idx + (gi // split_every,)
            layer[mk] = (_merge_parts, list(group))
            merged.append(mk)
        keys, level = merged, level + 1
    return keys[0]


def _validated(da: Any, query: Any, key: Any, value: Any, attn_mask: Any, split_every: Any,
               **options: Any) -> Tuple[Any, Any, Any, Any, Any, int]:
    """The inputs as Dask arrays, validated as the NumPy function validates them, from their shapes
    and dtypes (the engine's problem builder; ArraySpec stands in for the data): (q, k, v, mask,
    (out dtype, lse dtype), split_every)."""
    if split_every is None:
        split_every = 8
    if isinstance(split_every, (bool, np.bool_)) or not isinstance(split_every, (int, np.integer)):
        raise TypeError(f"split_every must be an int >= 2, got {type(split_every).__name__}")
    if split_every < 2:
        raise ValueError(f"split_every must be >= 2, got {split_every}")
    q, k, v = (_as_dask(da, x, n) for x, n in ((query, "query"), (key, "key"), (value, "value")))
    mask = None if attn_mask is None else _as_dask(da, attn_mask, "attn_mask")

    # -- validate everything as the NumPy function does, from the shapes and dtypes (the engine's
    # problem builder: ArraySpec stands in for the data)
    spec = lambda a: None if a is None else _spec.ArraySpec(tuple(a.shape), a.dtype)   # noqa: E731
    p = _core.describe(spec(q), spec(k), spec(v), attn_mask=spec(mask), **options)
    dt = (p.out_dtype, p.dtype)       # the output's and lse's (they differ for 16-bit inputs)
    nd = q.ndim
    if not (k.ndim == v.ndim == nd) or k.shape[:-3] != q.shape[:-3] or v.shape[:-3] != q.shape[:-3]:
        raise ValueError(f"selfattn.dask needs query {q.shape}, key {k.shape} and value {v.shape} with the same "
                         f"number of dims and the same leading (batch) dims; broadcast them first "
                         f"(dask.array.broadcast_to)")

    return q, k, v, mask, dt, int(split_every)


def scaled_dot_product_attention(query: Any, key: Any, value: Any, attn_mask: Any = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, *, scale: Optional[float] = None,
                                 enable_gqa: bool = False, return_lse: bool = False,
                                 num_threads: Optional[int] = None, window_size: Window = None,
                                 alignment: str = "top_left", key_lengths: Optional[ArrayLike] = None,
                                 alibi_slopes: Optional[ArrayLike] = None, softcap: Optional[float] = None,
                                 sinks: Optional[ArrayLike] = None, num_sink_tokens: Optional[int] = None,
                                 split_every: Optional[int] = None) -> Any:
    """:func:`selfattn.scaled_dot_product_attention` over Dask arrays: lazy, chunk by chunk.

    Same arguments and results as the NumPy function (equal to its result up to rounding, for every
    option), returned as Dask arrays that nothing has computed yet. The query's chunks (batch, heads,
    L) and the key's chunks along S decide the blocks; chunks along S are computed separately and
    merged with :func:`selfattn.merge_attention` (sequence parallelism), so no task ever holds more
    than one key/value chunk. See the module documentation for how each block keeps its positions.

    Parameters
    ----------
    query : dask or array_like, (..., Hq, L, E)
    key : dask or array_like, (..., H, S, E)
    value : dask or array_like, (..., H, S, Ev)
        The same number of dims, with equal leading (batch) dims (no broadcasting between them:
        use ``dask.array.broadcast_to``). NumPy inputs are wrapped with ``dask.array.from_array``
        as one chunk; key and value are rechunked to the query's batch/head chunks, value to the
        key's S chunks, and E/Ev to one chunk each.
    attn_mask : dask or array_like, optional
        bool or float, broadcastable to (..., Hq, L, S); chunked along with query and key (its
        size-1 dims stay whole).
    dropout_p, is_causal, scale, enable_gqa, num_threads, window_size, alignment, softcap, num_sink_tokens
        As in :func:`selfattn.scaled_dot_product_attention` (torch's signature). `num_threads` is per block call:
        with several tasks running at once per machine (Dask's threaded scheduler, or workers
        with several threads), ``num_threads=1`` avoids oversubscribing the cores.
    key_lengths, alibi_slopes, sinks : array_like, optional
        As in :func:`selfattn.scaled_dot_product_attention`; small, read when the graph is built
        (key_lengths decides which blocks exist; the sinks go to one key chunk's block of each
        query chunk, so the merge counts them once).
    return_lse : bool
        Also return the lse (a Dask array (..., Hq, L)).
    split_every : int >= 2, optional
        Fan-in of the tree that merges the key chunks' results (default 8).

    Returns
    -------
    out : dask.array.Array, (..., Hq, L, Ev)
        Chunked like the query along its leading dims and L, one chunk along Ev; float64 if any
        input is float64, bfloat16 / float16 for such inputs (lse float32: the key chunks'
        parts are merged from their rounded outputs), else float32.
    lse : dask.array.Array, (..., Hq, L)
        Only with ``return_lse=True``, as ``(out, lse)``.

    Raises
    ------
    ImportError
        Without dask (``pip install "selfattn[dask]"``).
    ValueError, TypeError
        As the NumPy function, before anything is built; also inputs whose number of dims or
        leading dims differ, unknown chunk sizes, a bad `split_every`.

    Examples
    --------
    (Not run by the documentation build, which has no dask.)

    ::

        import dask.array as da
        import selfattn.dask

        q = da.random.default_rng(0).standard_normal((1, 8, 8192, 64), chunks=(1, 8, 2048, 64))
        k = da.random.default_rng(1).standard_normal((1, 8, 8192, 64), chunks=(1, 8, 2048, 64))
        v = da.random.default_rng(2).standard_normal((1, 8, 8192, 64), chunks=(1, 8, 2048, 64))
        out = selfattn.dask.scaled_dot_product_attention(q, k, v, is_causal=True)   # lazy: 10 blocks
        out.compute()                                   # or with a distributed Client, on a cluster
    """
    da = _import_dask()
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph
    is_causal = _spec.check_is_causal(is_causal)
    _spec.no_dropout(dropout_p, "selfattn.dask")

    q, k, v, mask, (dt, lse_dt), split_every = _validated(da, query, key, value, attn_mask, split_every, is_causal=is_causal,
                                                scale=scale, enable_gqa=enable_gqa, num_threads=num_threads,
                                                window_size=window_size, alignment=alignment,
                                                key_lengths=key_lengths, alibi_slopes=alibi_slopes, softcap=softcap,
                                                sinks=sinks, num_sink_tokens=num_sink_tokens)
    nd = q.ndim

    # -- the structure, normalised: window sides with the causal cut, valid keys per batch entry
    L, S, Ev = q.shape[-2], k.shape[-2], v.shape[-1]
    batch = q.shape[:-3]
    nb = len(batch)
    left, right = _spec.window_sides(window_size)
    if is_causal:
        right = 0                                    # right >= 0 is validated: min(right, 0)
    S_b = np.broadcast_to(np.asarray(S if key_lengths is None else key_lengths, dtype=np.int64), batch)
    slopes = None
    if alibi_slopes is not None:
        slopes = np.broadcast_to(np.asarray(alibi_slopes, dtype=np.float64), q.shape[:-2])
    sink_all = None if sinks is None else _spec.head_sinks(sinks, q.shape[:-2])
    bottom_right = alignment == "bottom_right"

    q, k, v, mask = _rechunk(q, k, v, mask, enable_gqa)
    lead_bounds = [_bounds(c) for c in q.chunks[:-2]]            # batch dims, then heads
    l_bounds, s_bounds = _bounds(q.chunks[-2]), _bounds(k.chunks[-2])

    kw = dict(scale=scale, softcap=softcap, num_threads=num_threads, enable_gqa=bool(enable_gqa))
    n_sink = 0 if num_sink_tokens is None or left is None else _spec.check_sink_tokens(num_sink_tokens)
    token = tokenize(q.name, k.name, v.name, None if mask is None else mask.name, is_causal, scale,
                     enable_gqa, num_threads, window_size, alignment, S_b, slopes, softcap, sink_all, n_sink,
                     split_every)
    out_name, lse_name = f"selfattn-sdpa-{token}", f"selfattn-sdpa-lse-{token}"
    part_name, merge_name = f"selfattn-sdpa-part-{token}", f"selfattn-sdpa-merge-{token}"
    layer: Dict[Any, Any] = {}
    finals: Dict[Tuple[int, ...], Any] = {}
    for lead in np.ndindex(*(len(b) for b in lead_bounds)):
        lead_sl = tuple(slice(*lead_bounds[d][i]) for d, i in enumerate(lead))
        S_blk = S_b[lead_sl[:nb]]
        slopes_blk = None if slopes is None else np.array(slopes[lead_sl])
        sinks_blk = None if sink_all is None else np.array(sink_all[lead_sl])
        lead_shape = tuple(s.stop - s.start for s in lead_sl)
        for li, (l0, l1) in enumerate(l_bounds):
            idx = lead + (li,)
            keys: List[Any] = []
            for si, (s0, s1) in enumerate(s_bounds):
                D = l0 - s0 + (S_blk - L if bottom_right else 0 * S_blk)
                # sink tokens in this key chunk: its first ns - s0 keys escape the left bound
                ns_blk = int(min(max(n_sink - s0, 0), s1 - s0))
                if not _sees(l1 - l0, s1 - s0, D, np.clip(S_blk - s0, 0, s1 - s0), None if ns_blk else left,
                             right):
                    continue
                fn = functools.partial(_block, l0=l0, s0=s0, L=L, S_b=S_blk, bottom_right=bottom_right,
                                       left=left, right=right, slopes=slopes_blk,
                                       kw=dict(kw, num_sink_tokens=ns_blk) if ns_blk else kw,
                                       sinks=sinks_blk if not keys else None)
                mkey = None
                if mask is not None:
                    mi = tuple(0 if n == 1 else i for n, i in zip(mask.shape, idx + (si,)))
                    mkey = (mask.name,) + mi
                key_ = (part_name,) + idx + (si,)
                layer[key_] = (fn, (q.name,) + idx + (0,), (k.name,) + lead + (si, 0),
                               (v.name,) + lead + (si, 0), mkey)
                keys.append(key_)
            if not keys:
                key_ = (part_name,) + idx + (-1,)
                layer[key_] = (functools.partial(_nothing_visible, lead_shape + (l1 - l0,), Ev, dt, lse_dt,
                                                 sinks_blk),)
                keys.append(key_)
            finals[idx] = _merge_tree(layer, keys, f"{merge_name}", idx, split_every)
            layer[(out_name,) + idx + (0,)] = (operator.getitem, finals[idx], 0)

    deps = [q, k, v] + ([] if mask is None else [mask])
    graph = HighLevelGraph.from_collections(out_name, layer, dependencies=deps)
    out = da.Array(graph, out_name, q.chunks[:-1] + ((Ev,),), meta=np.empty((0,) * nd, dtype=dt))
    if not return_lse:
        return out
    lse_layer: Dict[Any, Any] = {(lse_name,) + idx: (operator.getitem, f, 1) for idx, f in finals.items()}
    lse_graph = HighLevelGraph.from_collections(lse_name, lse_layer, dependencies=[out])
    lse = da.Array(lse_graph, lse_name, q.chunks[:-1], meta=np.empty((0,) * (nd - 1), dtype=lse_dt))
    return out, lse
