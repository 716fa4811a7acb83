"""Paged KV caches: :func:`paged_attention` and :class:`PagedKVCache` (vLLM's and FlashAttention's layout).

Keys and values of many sequences live in one pool of fixed-size blocks (pages)::

    k_pages (num_blocks, block_size, H, E)     v_pages (num_blocks, block_size, H, Ev)
    block_table (batch, max_blocks) int        seq_lens (batch,) int

Position j of sequence b is row ``j % block_size`` of page ``block_table[b, j // block_size]``. A
sequence grows one page at a time wherever a free page is, sequences of any lengths share the pool,
and two sequences can share the pages of a common prefix (:meth:`PagedKVCache.fork`).

:func:`paged_attention` attends each sequence's last n positions (bottom-right causal, the query
of a decode step or a few speculative tokens) to its pages in one kernel call for the whole ragged
batch: the decode schedule reads every K/V row in place where the block table says (the C
kernel's ``sa_kv_rows``), splits the keys across threads and merges them in a fixed order, so the
result does not depend on the thread count -- and is the same bits as a dense cache holding the
same rows (:class:`selfattn.KVCache`, or ``scaled_dot_product_attention`` with ``key_lengths``).
More query rows than the decode schedule stacks (Hq / H x n > 16: a chunk of a prompt) gather the
pages of the batch into dense arrays first (one copy of the K/V the sequences use) and run the
dense kernel: same results, and the copy is small next to that much computing.

Pages narrower than the float32 queries are read as stored, as in the dense cache: int8
(``k_scale``, ``v_scale``: one float32 scale per block row and kv head, as
:func:`selfattn.quantize_kv` makes them), float8 (one scale per kv head) and bfloat16 / float16.
"""

import numbers
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from . import _core
from ._api import scaled_dot_product_attention
from .kvcache import _as_array, _cache_dtypes, _check_size, _fits
from .quant import FLOAT8, cache_fp8_scale, cache_scales_arg, encode_rows, quantize_kv

__all__ = ["paged_attention", "PagedKVCache", "CacheFullError"]

Array = NDArray[Any]


class CacheFullError(RuntimeError):
    """A :class:`PagedKVCache` has too few free blocks for an append (nothing was written)."""


def paged_attention(query: ArrayLike, k_pages: ArrayLike, v_pages: ArrayLike, block_table: ArrayLike,
                    seq_lens: ArrayLike, *, scale: Optional[float] = None, window_size: Any = None,
                    alibi_slopes: Optional[ArrayLike] = None, softcap: Optional[float] = None,
                    sinks: Optional[ArrayLike] = None, num_sink_tokens: Optional[int] = None,
                    k_scale: Optional[ArrayLike] = None, v_scale: Optional[ArrayLike] = None,
                    return_lse: bool = False,
                    num_threads: Optional[int] = None) -> Union[Array, Tuple[Array, Array]]:
    """Attention of each sequence's last positions to its keys and values in a paged cache.

    Parameters
    ----------
    query : array_like, (batch, Hq, n, E)
        Sequence b's n queries are its positions ``seq_lens[b] - n .. seq_lens[b] - 1`` (bottom-
        right causal: each sees the positions up to its own; a row before position 0 sees
        nothing and gets zeros, lse -inf). Hq a multiple of H (grouped-query attention). The
        layout of :func:`selfattn.scaled_dot_product_attention`; FlashAttention's (batch, n, Hq,
        E) is ``q.transpose(0, 2, 1, 3)``, a view (read in place).
    k_pages, v_pages : array_like, (num_blocks, block_size, H, E) and (..., Ev)
        The pool, read in place with its strides: the query's dtype (float32, float64, float16
        or bfloat16), or, under a float32 query, int8 with `k_scale` and `v_scale`, float8
        (ml_dtypes' float8_e4m3fn / float8_e5m2, scales optional) or bfloat16 / float16. In
        FlashAttention's memory order a kv head's rows are H x E elements apart, which the CPU's
        prefetchers follow poorly (measured 1.1-1.6x the dense cache's time); stored head-major,
        ``np.empty((num_blocks, H, block_size, E)).transpose(0, 2, 1, 3)`` (a view of that
        shape; :class:`PagedKVCache` keeps its pool so), each head's block is contiguous and a
        decode step runs at the dense cache's speed.
    block_table : array_like of int, (batch, max_blocks)
        Sequence b's pages in order. Only the first ``ceil(seq_lens[b] / block_size)`` entries of
        a row are read (each in [0, num_blocks)); the rest may hold anything (-1, as vLLM pads).
    seq_lens : array_like of int, (batch,)
        Valid positions per sequence, in [0, max_blocks * block_size].
    scale, window_size, alibi_slopes, softcap, sinks, num_sink_tokens
        As in :func:`selfattn.scaled_dot_product_attention` (the window bounded on the left: a
        query at position p sees p - window_left .. p; num_sink_tokens keeps the first keys too).
    k_scale, v_scale : array_like, broadcasting to (num_blocks, block_size, H), optional
        Quantized pages' scales (:mod:`selfattn.quant`): row r of page pg for kv head h is worth
        ``k_pages[pg, r, h] * k_scale[pg, r, h]``; int8 pages have one per row and head, float8
        ones usually one per head, shape (H,) (without them: 1).
    return_lse : bool
        Also return the log-sum-exp of each row's logits, (batch, Hq, n).
    num_threads : int, optional
        Threads of the call (default: all); the result does not depend on it.

    Returns
    -------
    out : ndarray, (batch, Hq, n, Ev), the query's dtype; or (out, lse).

    Examples
    --------
    Two sequences of 5 and 3 positions in pages of 2 rows; the result equals dense attention:

    >>> import numpy as np
    >>> import selfattn
    >>> rng = np.random.default_rng(0)
    >>> k_pages, v_pages = rng.standard_normal((2, 8, 2, 1, 4))       # 8 pages of 2 rows, 1 kv head
    >>> block_table = np.array([[3, 0, 6], [5, 1, -1]])               # -1: never read
    >>> seq_lens = np.array([5, 3])
    >>> q = rng.standard_normal((2, 2, 1, 4))                         # 2 query heads, 1 new token
    >>> out = selfattn.paged_attention(q, k_pages, v_pages, block_table, seq_lens)
    >>> k = k_pages[np.maximum(block_table, 0)].reshape(2, 6, 1, 4).transpose(0, 2, 1, 3)
    >>> v = v_pages[np.maximum(block_table, 0)].reshape(2, 6, 1, 4).transpose(0, 2, 1, 3)
    >>> dense = selfattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
    ...                                               alignment="bottom_right", key_lengths=seq_lens)
    >>> bool(np.array_equal(out, dense))
    True
    """
    p = _core.describe_paged(query, k_pages, v_pages, block_table, seq_lens, scale=scale,
                             window_size=window_size, alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks,
                             num_sink_tokens=num_sink_tokens, num_threads=num_threads, k_scale=k_scale,
                             v_scale=v_scale)
    if _core.paged_decodes(p):
        return _core.paged(p, return_lse)
    # more rows than the decode schedule stacks (or no key at all): the pages gathered, the dense kernel
    kp, vp = np.asarray(k_pages), np.asarray(v_pages)
    bt, sl = np.asarray(block_table), np.asarray(seq_lens).astype(np.int64)
    S = int(sl.max(initial=0))
    ps = kp.shape[1]
    nb = -(-S // ps)
    used = np.arange(nb)[None, :] * ps < sl[:, None]
    idx = np.where(used, bt[:, :nb], 0)              # unused entries: any page (never read)

    def dense(pages: Array) -> Array:                 # (batch, H, S, width) views of the gathered pages
        g = pages[idx].reshape((bt.shape[0], nb * ps) + pages.shape[2:])[:, :S]
        return np.moveaxis(g, 2, 1)

    kw: Dict[str, Any] = {}
    if k_scale is not None and v_scale is not None:    # (per kv head ones broadcast to every row first)
        kw.update(k_scale=dense(np.broadcast_to(np.asarray(k_scale), kp.shape[:3])),
                  v_scale=dense(np.broadcast_to(np.asarray(v_scale), kp.shape[:3])))
    return scaled_dot_product_attention(
        query, dense(kp), dense(vp), is_causal=True, alignment="bottom_right", key_lengths=sl, enable_gqa=True,
        scale=scale, window_size=window_size, alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks,
        num_sink_tokens=num_sink_tokens, return_lse=return_lse, num_threads=num_threads, **kw)


class PagedKVCache:
    """A pool of key/value blocks shared by many sequences: vLLM's paged cache in NumPy.

    Parameters
    ----------
    num_blocks : int
        Blocks (pages) in the pool.
    block_size : int
        Positions per block (16 is usual).
    num_kv_heads, head_dim : int
        H and E of the keys (and values, unless `value_dim`).
    dtype : {np.float32, np.float64, np.float16, ml_dtypes.bfloat16}
        Of the queries and the output, and of the stored keys and values unless `kv_dtype`.
    kv_dtype : {None, "int8", "float8_e4m3fn", "float8_e5m2", "bfloat16", "float16"}, or the dtype
        Keys and values stored narrower than the float32 queries (`dtype` must be float32;
        :mod:`selfattn.quant`), converted on :meth:`append`: ``"int8"``, a quarter of float32's
        bytes plus a float32 scale per position and head; float8, a quarter of the bytes and one
        scale per kv head for the whole pool (K and V each), set by the first append (max|x| per
        head at 1/16 of float8's range; later values past 16x saturate) unless `kv_scale` fixes
        it; ``"bfloat16"`` / ``"float16"``, half the bytes, no scales.
    kv_scale : float, array_like or (k_scale, v_scale), optional
        float8 only: fixed scales (> 0) broadcasting to (num_kv_heads,); one value stands for both.
    value_dim : int, optional
        Ev; defaults to `head_dim`.

    Attributes
    ----------
    k_pages, v_pages : ndarray
        The pool, (num_blocks, block_size, num_kv_heads, head_dim | value_dim): views of arrays
        stored head-major, (num_blocks, num_kv_heads, block_size, head_dim) in memory, so that each
        kv head's rows of a block are back to back (see :func:`paged_attention` on layouts).
    k_scales, v_scales : ndarray or None
        int8: (num_blocks, block_size, num_kv_heads) float32 (views alike).

    Notes
    -----
    Sequences are named by the ints :meth:`add_sequence` and :meth:`fork` return. A block is
    shared by the sequences that hold it (a reference count); a sequence only ever writes into
    a block it holds alone: :meth:`append` copies a shared, partly filled last block first
    (copy on write). Every method checks its arguments and the free blocks before it changes
    anything: a :class:`CacheFullError` or ``ValueError`` leaves the cache as it was.

    Examples
    --------
    >>> import numpy as np
    >>> import selfattn
    >>> rng = np.random.default_rng(0)
    >>> cache = selfattn.PagedKVCache(num_blocks=16, block_size=4, num_kv_heads=2, head_dim=8)
    >>> a, b = cache.add_sequence(), cache.add_sequence()
    >>> k, v = rng.standard_normal((2, 2, 2, 6, 8)).astype(np.float32)
    >>> cache.append([a, b], k, v, counts=[6, 3])                 # a prompt of 6 and one of 3
    >>> c = cache.fork(a)                                          # c shares a's 6 positions
    >>> cache.seq_len(a), cache.seq_len(b), cache.seq_len(c), cache.num_free_blocks
    (6, 3, 6, 13)
    >>> q = rng.standard_normal((3, 4, 1, 8)).astype(np.float32)   # 4 query heads, one token each
    >>> cache.attend(q, [a, b, c]).shape
    (3, 4, 1, 8)
    """

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: DTypeLike = np.float32, kv_dtype: Any = None,
                 value_dim: Optional[int] = None, kv_scale: Any = None) -> None:
        self.num_blocks = _check_size(num_blocks, "num_blocks", 1)
        self.block_size = _check_size(block_size, "block_size", 1)
        self.num_kv_heads = _check_size(num_kv_heads, "num_kv_heads", 1)
        self.head_dim = _check_size(head_dim, "head_dim", 1)
        self.value_dim = self.head_dim if value_dim is None else _check_size(value_dim, "value_dim", 1)
        self.dtype, self.kv_dtype, store = _cache_dtypes(dtype, kv_dtype)
        # stored head-major, (num_blocks, H, block_size, E), each kv head's rows of a block back to back;
        # the attributes are (num_blocks, block_size, H, E) views of it (FlashAttention's shape)
        shape = (self.num_blocks, self.num_kv_heads, self.block_size)
        self.k_pages: Array = np.zeros(shape + (self.head_dim,), store).transpose(0, 2, 1, 3)
        self.v_pages: Array = np.zeros(shape + (self.value_dim,), store).transpose(0, 2, 1, 3)
        # scales (None without): int8 per row and head (num_blocks, block_size, H); float8 per head (H,)
        fixed = cache_scales_arg(kv_scale, (self.num_kv_heads,), self.kv_dtype)
        self._fp8 = self.kv_dtype in FLOAT8
        self._scales_set = fixed is not None
        self.k_scales: Optional[Array] = None
        self.v_scales: Optional[Array] = None
        if self.kv_dtype == "int8":
            self.k_scales = np.zeros(shape, np.float32).transpose(0, 2, 1)
            self.v_scales = np.zeros(shape, np.float32).transpose(0, 2, 1)
        elif self._fp8:
            self.k_scales, self.v_scales = fixed if fixed is not None else (np.ones(self.num_kv_heads, np.float32),
                                                                             np.ones(self.num_kv_heads, np.float32))
        self._ref = np.zeros(self.num_blocks, np.int64)         # sequences holding each block
        self._free: List[int] = list(range(self.num_blocks - 1, -1, -1))   # pop() gives the lowest
        self._blocks: Dict[int, List[int]] = {}
        self._len: Dict[int, int] = {}
        self._next_id = 0

    # -------------------------------------------------------------- state

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds."""
        return len(self._free)

    @property
    def sequences(self) -> List[int]:
        """The live sequence ids, in the order they were added."""
        return list(self._blocks)

    def _seq(self, seq_id: Any) -> int:
        if isinstance(seq_id, (bool, np.bool_)) or not isinstance(seq_id, (numbers.Integral, np.integer)):
            raise TypeError(f"a sequence id is an int (from add_sequence or fork), got {type(seq_id).__name__}")
        if int(seq_id) not in self._blocks:
            raise KeyError(f"no sequence {int(seq_id)} in this cache (live: {self.sequences[:16]})")
        return int(seq_id)

    def _seqs(self, seq_ids: Any) -> List[int]:
        if isinstance(seq_ids, (numbers.Integral, np.integer)) and not isinstance(seq_ids, (bool, np.bool_)):
            raise TypeError("seq_ids must be a sequence of ids (a list, tuple or 1-D array), got a single int")
        seq = seq_ids if isinstance(seq_ids, (list, tuple)) else np.asarray(seq_ids).reshape(-1).tolist()
        return [self._seq(s) for s in seq]

    def seq_len(self, seq_id: int) -> int:
        """Positions held by a sequence."""
        return self._len[self._seq(seq_id)]

    def block_table(self, seq_ids: Sequence[int]) -> Tuple[NDArray[np.int32], NDArray[np.int64]]:
        """(block_table (n, max_blocks) int32 padded with -1, seq_lens (n,) int64) of these
        sequences: the arrays :func:`paged_attention` takes."""
        ids = self._seqs(seq_ids)
        width = max([len(self._blocks[s]) for s in ids], default=0)
        bt = np.full((len(ids), width), -1, np.int32)
        for i, s in enumerate(ids):
            bt[i, :len(self._blocks[s])] = self._blocks[s]
        return bt, np.array([self._len[s] for s in ids], np.int64)

    def keys(self, seq_id: int) -> Array:
        """A copy of a sequence's keys, (num_kv_heads, seq_len, head_dim) as stored (int8: with
        :meth:`key_scales`)."""
        return self._gather(self.k_pages, self._seq(seq_id))

    def values(self, seq_id: int) -> Array:
        """A copy of a sequence's values, (num_kv_heads, seq_len, value_dim) as stored."""
        return self._gather(self.v_pages, self._seq(seq_id))

    def key_scales(self, seq_id: int) -> Optional[Array]:
        """Quantized: a copy of a sequence's key scales, int8 (num_kv_heads, seq_len), float8
        (num_kv_heads, 1) (the pool's, per head); else None."""
        return self._scales_of(self.k_scales, self._seq(seq_id))

    def value_scales(self, seq_id: int) -> Optional[Array]:
        """Quantized: a copy of a sequence's value scales, as :meth:`key_scales`; else None."""
        return self._scales_of(self.v_scales, self._seq(seq_id))

    def _scales_of(self, scales: Optional[Array], s: int) -> Optional[Array]:
        if scales is None:
            return None
        return scales[:, None].copy() if self._fp8 else self._gather(scales, s)

    def _gather(self, pages: Array, s: int) -> Array:
        n = self._len[s]
        g = pages[np.asarray(self._blocks[s], np.int64)].reshape((-1,) + pages.shape[2:])[:n]
        return np.ascontiguousarray(np.moveaxis(g, 0, 1))

    def __repr__(self) -> str:
        return (f"PagedKVCache(num_blocks={self.num_blocks}, block_size={self.block_size}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, value_dim={self.value_dim}, "
                f"dtype={self.dtype.name}, " + (f"kv_dtype={self.kv_dtype!r}, " if self.kv_dtype else "")
                + f"free={self.num_free_blocks}; sequences={ {s: self._len[s] for s in self._blocks} })")

    # -------------------------------------------------------------- sequences

    def add_sequence(self) -> int:
        """A new empty sequence (it holds no block until :meth:`append`): its id."""
        s = self._next_id
        self._next_id += 1
        self._blocks[s] = []
        self._len[s] = 0
        return s

    def fork(self, seq_id: int) -> int:
        """A new sequence holding the same positions as `seq_id` (its blocks shared, not copied;
        a shared, partly filled last block is copied when either sequence appends): its id."""
        src = self._seq(seq_id)
        s = self.add_sequence()
        self._blocks[s] = list(self._blocks[src])
        self._len[s] = self._len[src]
        self._ref[self._blocks[s]] += 1
        return s

    def free(self, seq_id: int) -> None:
        """Forget a sequence; its blocks no other sequence holds go back to the pool."""
        s = self._seq(seq_id)
        self._release(self._blocks.pop(s))
        del self._len[s]

    def _release(self, blocks: List[int]) -> None:
        """One holder fewer for each block; those no sequence holds go back to the pool (in reverse,
        so pop() hands the lowest out first again)."""
        for blk in reversed(blocks):
            self._ref[blk] -= 1
            if self._ref[blk] == 0:
                self._free.append(blk)

    def crop(self, seq_id: int, max_length: int) -> None:
        """Keep at most `max_length` positions of a sequence (its first ones); a negative value drops
        that many from its end (as :meth:`selfattn.KVCache.crop`: speculative decoding's rollback).
        The blocks it no longer needs are released (back to the pool when no other sequence holds
        them); nothing is copied. A shared last block stays shared, and is copied when either
        sequence appends (copy on write), so a fork never sees the other's new rows.

        >>> import numpy as np
        >>> import selfattn
        >>> cache = selfattn.PagedKVCache(num_blocks=8, block_size=4, num_kv_heads=1, head_dim=2)
        >>> a = cache.add_sequence()
        >>> kv = np.ones((1, 1, 10, 2), np.float32)                      # 10 positions: 3 blocks
        >>> cache.append([a], kv, kv)
        >>> cache.crop(a, -3)                                            # 7 positions: 2 blocks
        >>> cache.seq_len(a), cache.num_free_blocks
        (7, 6)
        """
        s = self._seq(seq_id)
        if isinstance(max_length, (bool, np.bool_)) or not isinstance(max_length, (numbers.Integral, np.integer)):
            raise TypeError(f"max_length must be an int, got {type(max_length).__name__}")
        n, length = int(max_length), self._len[s]
        keep = max(length + n, 0) if n < 0 else min(length, n)
        blocks = self._blocks[s]
        used = -(-keep // self.block_size)
        self._release(blocks[used:])
        del blocks[used:]
        self._len[s] = keep

    # -------------------------------------------------------------- append

    def append(self, seq_ids: Sequence[int], key: ArrayLike, value: ArrayLike,
               counts: Optional[ArrayLike] = None) -> None:
        """Write new positions at the end of these sequences.

        Parameters
        ----------
        seq_ids : sequence of int, (n_seq,)
            Distinct live sequences.
        key : array_like, (n_seq, num_kv_heads, T, head_dim)
        value : array_like, (n_seq, num_kv_heads, T, value_dim)
            Floats that fit the cache's dtype without rounding (as :meth:`selfattn.KVCache.append`).
        counts : array_like of int, (n_seq,), optional
            Sequence i takes only its first ``counts[i]`` rows (0 <= counts[i] <= T).

        Raises
        ------
        CacheFullError
            Fewer free blocks than the appends need (new blocks, and copies of shared last
            blocks): nothing is written.
        ValueError, TypeError, KeyError
            Shapes, dtypes, counts or ids that do not fit (naming them): nothing is written.
        """
        ids = self._seqs(seq_ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"seq_ids must be distinct, got {ids}")
        n = len(ids)
        k = self._check_new(key, "key", n, self.head_dim, "head_dim")
        v = self._check_new(value, "value", n, self.value_dim, "value_dim")
        T = k.shape[2]
        if v.shape[2] != T:
            raise ValueError(f"key {k.shape} and value {v.shape} must have the same number of new positions "
                             f"(dim 2)")
        if counts is None:
            c = np.full(n, T, np.int64)
        else:
            c = np.asarray(counts)
            if c.dtype == np.bool_ or c.dtype.kind not in "iu" or c.shape != (n,):
                raise TypeError(f"counts must be {n} integers (one per sequence), got {c.dtype} of shape {c.shape}")
            if c.size and (c.min() < 0 or c.max() > T):
                raise ValueError(f"counts must be in [0, T={T}], got values in [{c.min()}, {c.max()}]")
            c = c.astype(np.int64)
        bs = self.block_size
        need = 0                                    # blocks taken from the pool, all appends together
        holders: Dict[int, int] = {}                # a shared last block's holders as the writes below see them
        for s, cnt in zip(ids, c.tolist()):
            if cnt == 0:
                continue
            L, blocks = self._len[s], self._blocks[s]
            if L % bs:
                last = blocks[-1]
                h = holders.get(last, int(self._ref[last]))
                if h > 1:                           # shared: copied before writing (the last holder to
                    need += 1                       # write, alone by then, writes in place)
                    holders[last] = h - 1
            need += -(-(L + int(cnt)) // bs) - len(blocks)
        if need > len(self._free):
            raise CacheFullError(f"PagedKVCache: the append needs {need} free blocks and {len(self._free)} "
                                 f"are free (num_blocks={self.num_blocks}); free finished sequences, or "
                                 f"make a larger cache. Nothing was written.")
        set_scales = None
        if self.kv_dtype == "int8":
            (k, ks), (v, vs) = quantize_kv(k), quantize_kv(v)     # (n, H, T, E) int8, (n, H, T) scales
        elif self._fp8 and self.k_scales is not None and self.v_scales is not None:
            kscale, vscale = self.k_scales, self.v_scales
            if not self._scales_set and c.sum():      # the pool's first rows: its per-head scales
                rows = np.arange(T)[None, :] < c[:, None]             # (n, T): the rows written
                kind = str(self.kv_dtype)
                kscale = cache_fp8_scale(np.moveaxis(np.asarray(k, np.float64), 2, 1)[rows], kind, (0, 2))
                vscale = cache_fp8_scale(np.moveaxis(np.asarray(v, np.float64), 2, 1)[rows], kind, (0, 2))
                set_scales = (kscale, vscale)
            k = encode_rows(k, str(self.kv_dtype), "key", kscale)         # (H,) over (n, H, T, E)
            v = encode_rows(v, str(self.kv_dtype), "value", vscale)
        elif self.kv_dtype:                         # bfloat16 / float16
            k, v = encode_rows(k, self.kv_dtype, "key"), encode_rows(v, self.kv_dtype, "value")
        if set_scales is not None:                  # nothing raised: the scales are the pool's now
            self.k_scales, self.v_scales = set_scales
            self._scales_set = True
        # blocks first (copies of shared last blocks, new ones), then every row in one assignment
        idx_i: List[Array] = []
        idx_t: List[Array] = []
        idx_pg: List[Array] = []
        for i, (s, cnt) in enumerate(zip(ids, c.tolist())):
            m = int(cnt)
            if m == 0:
                continue
            L, blocks = self._len[s], self._blocks[s]
            if L % bs and self._ref[blocks[-1]] > 1:            # copy on write
                old, new = blocks[-1], self._free.pop()
                for a in (self.k_pages, self.v_pages) + ((self.k_scales, self.v_scales) if not self._fp8 else ()):
                    if a is not None:
                        a[new] = a[old]
                self._ref[old] -= 1
                self._ref[new] = 1
                blocks[-1] = new
            while len(blocks) * bs < L + m:
                blk = self._free.pop()
                self._ref[blk] = 1
                blocks.append(blk)
            pos = np.arange(L, L + m)
            idx_i.append(np.full(m, i))
            idx_t.append(pos - L)
            idx_pg.append(np.asarray(blocks, np.int64)[pos // bs] * bs + pos % bs)
            self._len[s] = L + m
        if not idx_i:
            return
        ii, tt, flat = np.concatenate(idx_i), np.concatenate(idx_t), np.concatenate(idx_pg)
        pg, row = flat // bs, flat % bs
        self.k_pages[pg, row] = k[ii, :, tt]          # (rows, H, E) into (rows, H, E)
        self.v_pages[pg, row] = v[ii, :, tt]
        if self.kv_dtype == "int8" and self.k_scales is not None and self.v_scales is not None:
            self.k_scales[pg, row] = ks[ii, :, tt]
            self.v_scales[pg, row] = vs[ii, :, tt]

    def _check_new(self, a: Any, name: str, n: int, width: int, what: str) -> Array:
        arr = _as_array(a, name)
        want = f"(n_seq, num_kv_heads, T, {what}) = ({n}, {self.num_kv_heads}, T, {width})"
        if arr.ndim != 4 or arr.shape[0] != n or arr.shape[1] != self.num_kv_heads or arr.shape[3] != width:
            raise ValueError(f"{name} must have shape {want}, got {arr.shape}")
        if arr.dtype.kind != "f" and not _core._storage_name(arr.dtype):
            raise TypeError(f"{name} has dtype {arr.dtype}; the cache holds {self.dtype} (pass floats)")
        if self.kv_dtype:
            return arr
        if arr.dtype != self.dtype and not _fits(arr.dtype, self.dtype):
            raise TypeError(f"{name} has dtype {arr.dtype}, which does not fit the {self.dtype} cache without "
                            f"rounding: pass {name}.astype(np.{self.dtype.name})")
        return arr

    # -------------------------------------------------------------- attend

    def attend(self, query: ArrayLike, seq_ids: Sequence[int],
               **options: Any) -> Union[Array, Tuple[Array, Array]]:
        """:func:`paged_attention` of `query` (len(seq_ids), Hq, n, head_dim) to these sequences:
        query row i of sequence s is its position ``seq_len(s) - n + i`` (append first). Options:
        those of :func:`paged_attention` (scale, window_size, alibi_slopes, softcap, sinks,
        num_sink_tokens, return_lse, num_threads). The query has the cache's dtype."""
        for bad in ("k_scale", "v_scale", "block_table", "seq_lens"):
            if bad in options:
                raise TypeError(f"PagedKVCache.attend sets {bad} itself; do not pass it")
        ids = self._seqs(seq_ids)
        q = np.asarray(query)
        if q.ndim != 4 or q.shape[0] != len(ids) or q.shape[3] != self.head_dim:
            raise ValueError(f"query must have shape (len(seq_ids), Hq, n, head_dim) = ({len(ids)}, Hq, n, "
                             f"{self.head_dim}), got {q.shape}")
        if q.dtype != self.dtype:
            raise TypeError(f"query is {q.dtype} but the cache computes in {self.dtype}: pass "
                            f"query.astype(np.{self.dtype.name})")
        bt, sl = self.block_table(ids)
        kw: Dict[str, Any] = dict(options)
        if self.k_scales is not None:
            kw.update(k_scale=self.k_scales, v_scale=self.v_scales)
        return paged_attention(q, self.k_pages, self.v_pages, bt, sl, **kw)
