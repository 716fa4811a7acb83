"""A preallocated key/value cache for decoding: :class:`KVCache`.

Keys and values live in two arrays of shape (batch, num_kv_heads, max_len, head_dim|value_dim),
allocated once. :meth:`KVCache.append` writes new positions in place (no reallocation per step),
per sequence at its own length, so ragged batches are fine; :meth:`KVCache.attend` runs
:func:`selfattn.scaled_dot_product_attention` on the cache arrays themselves (views, no copy) with
``key_lengths = lengths``, bottom-right causal alignment (the last query on the last valid key)
and grouped-query attention when the query has more heads than the cache.
"""

import numbers
from typing import Any, Optional, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from . import _core
from ._api import scaled_dot_product_attention
from .quant import FLOAT8, QUANTIZED, _kv_dtype, cache_fp8_scale, cache_scales_arg, encode_rows, kv_storage_dtype, quantize_kv

__all__ = ["KVCache"]

Array = NDArray[Any]


def _check_size(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _fits(src: np.dtype, dst: np.dtype) -> bool:
    """Every value of src is a value of dst (16-bit floats: exactly in float32 and float64)."""
    if _core._storage_name(dst):
        return False                  # a 16-bit cache takes its own dtype only
    if _core._storage_name(src):
        return True                   # float16 and bfloat16 widen exactly to float32 / float64
    return bool(np.can_cast(src, dst, casting="safe"))


def _cache_dtypes(dtype: DTypeLike, kv_dtype: Optional[str]) -> Tuple[np.dtype, Optional[str], np.dtype]:
    """A cache's (dtype of queries and output, kv_dtype, dtype its keys and values are stored in)."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32, float64, float16 or bfloat16, got {dtype!r}") from None
    if dt not in (np.float32, np.float64) and not _core._storage_name(dt):
        raise TypeError(f"dtype must be float32, float64, float16 or bfloat16, got {dt}")
    kv = None if kv_dtype is None else _kv_dtype(kv_dtype)
    if kv is not None and dt != np.float32:
        raise TypeError(f"{'an' if kv == 'int8' else 'a'} {kv} cache (kv_dtype={kv!r}) takes float32 queries: dtype "
                        f"must be float32, got {dt}")
    return dt, kv, (kv_storage_dtype(kv) if kv else dt)


def _as_array(x: Any, name: str) -> Array:
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} cannot be read as an array: {exc}") from None


class KVCache:
    """Preallocated keys and values of a batch of sequences, appended in place, attended in place.

    Parameters
    ----------
    batch : int
        Number of sequences B.
    num_kv_heads : int
        Key/value heads H (the query may have a multiple of it: grouped-query attention).
    max_len : int
        Positions preallocated per sequence (the capacity).
    head_dim : int
        E, the key (and query) width.
    value_dim : int, optional
        Ev, the value width; defaults to `head_dim`.
    dtype : {np.float32, np.float64, np.float16, ml_dtypes.bfloat16}
        Of the cached keys and values. A 16-bit cache holds half the bytes, and the kernel
        reads it as it is stored (each value widened to float32 where it is loaded): its
        queries have its dtype, and so has the output.
    kv_dtype : {None, "int8", "float8_e4m3fn", "float8_e5m2", "bfloat16", "float16"}, or the dtype
        None (default): keys and values are kept in `dtype`. Otherwise kept narrower than the
        float32 queries (`dtype` must be float32; :mod:`selfattn.quant`): ``"int8"``, one
        float32 scale per position and kv head, for K and for V (a quarter of float32's bytes
        plus 8 bytes per position and head); float8 (ml_dtypes), one scale per sequence and kv
        head, for K and for V (a quarter of the bytes): set by the sequence's first append
        (max|x| of those rows, per head, at 1/16 of float8's range: later values up to 16x
        larger still fit, past that they saturate) unless `kv_scale` fixes them; ``"bfloat16"``
        / ``"float16"``, no scales (half the bytes). `append` converts what it writes, and the
        kernel reads the values as they are stored (decode: widened in registers, the scales
        applied per key). The forward only: no VJP through it.
    kv_scale : float, array_like or (k_scale, v_scale), optional
        float8 only: fixed scales (> 0) for keys and values, each broadcasting to (batch,
        num_kv_heads), e.g. a model's calibrated ones; one value stands for both.
    grow : bool
        What :meth:`append` does when a sequence would pass `max_len`: False (the default)
        raises ``ValueError`` before writing anything, so memory stays exactly what was asked
        for; True reallocates both arrays with capacity ``max(2 * max_len, needed)`` (amortised
        doubling: O(1) copies per appended position on average) and copies the valid positions
        over. Arrays obtained earlier from :attr:`keys` / :attr:`values` then refer to the old
        buffers.

    Attributes
    ----------
    batch, num_kv_heads, head_dim, value_dim : int
    dtype : numpy.dtype
    grow : bool

    Notes
    -----
    Layout: keys ``(batch, num_kv_heads, max_len, head_dim)``, values ``(batch, num_kv_heads,
    max_len, value_dim)``, C order, the layout :func:`selfattn.scaled_dot_product_attention`
    reads. Sequence b's valid positions are ``0 .. lengths[b] - 1``; what lies past them is
    never read (positions are written in order, and the kernel skips keys past ``key_lengths``).

    Examples
    --------
    Prefill a prompt of 5 tokens, then decode 3 more one at a time; every output equals the
    matching row of one causal call over the whole sequence:

    >>> import numpy as np
    >>> import selfattn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 4, 8, 16))         # 4 query heads
    >>> k, v = rng.standard_normal((2, 1, 2, 8, 16))   # 2 kv heads (grouped-query attention)
    >>> cache = selfattn.KVCache(1, 2, 64, 16, dtype=np.float64)
    >>> cache.append(k[:, :, :5], v[:, :, :5])
    >>> outs = [cache.attend(q[:, :, :5])]
    >>> for t in range(5, 8):
    ...     cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    ...     outs.append(cache.attend(q[:, :, t:t + 1]))
    >>> cache.lengths, cache.keys.shape
    (array([8]), (1, 2, 8, 16))
    >>> full = selfattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    >>> bool(np.allclose(np.concatenate(outs, axis=2), full, rtol=0, atol=1e-12))
    True
    """

    def __init__(self, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 value_dim: Optional[int] = None, dtype: DTypeLike = np.float32, *, grow: bool = False,
                 kv_dtype: Any = None, kv_scale: Any = None) -> None:
        self.batch = _check_size(batch, "batch", 1)
        self.num_kv_heads = _check_size(num_kv_heads, "num_kv_heads", 1)
        cap = _check_size(max_len, "max_len", 0)
        self.head_dim = _check_size(head_dim, "head_dim", 1)
        self.value_dim = self.head_dim if value_dim is None else _check_size(value_dim, "value_dim", 1)
        self.dtype, self.kv_dtype, store = _cache_dtypes(dtype, kv_dtype)
        if not isinstance(grow, (bool, np.bool_)):
            raise TypeError(f"grow must be a bool, got {type(grow).__name__}")
        self.grow = bool(grow)
        # zeros, not empty: the pages are only touched when written, and a key_lengths-bounded read
        # never sees them anyway, but a view of the whole buffer holds no garbage
        self._k = np.zeros((self.batch, self.num_kv_heads, cap, self.head_dim), dtype=store)
        self._v = np.zeros((self.batch, self.num_kv_heads, cap, self.value_dim), dtype=store)
        # scales, for K and for V (None without): int8 each position's per kv head (batch, H, cap);
        # float8 each sequence's per kv head (batch, H, 1), broadcast over the positions
        fixed = cache_scales_arg(kv_scale, (self.batch, self.num_kv_heads), self.kv_dtype)
        self._fp8 = self.kv_dtype in FLOAT8
        ncol = 1 if self._fp8 else cap
        scaled = self.kv_dtype in QUANTIZED
        self._ks: Optional[Array] = np.ones((self.batch, self.num_kv_heads, ncol), np.float32) if scaled else None
        self._vs: Optional[Array] = np.ones((self.batch, self.num_kv_heads, ncol), np.float32) if scaled else None
        self._fixed_scales = fixed is not None
        if fixed is not None and self._ks is not None and self._vs is not None:
            self._ks[:, :, 0], self._vs[:, :, 0] = fixed
        self._scaled_seq = np.full(self.batch, fixed is not None)   # float8: sequence b's scales are set
        self._lengths = np.zeros(self.batch, dtype=np.int64)

    # -------------------------------------------------------------- state

    @property
    def max_len(self) -> int:
        """The capacity: positions allocated per sequence."""
        return int(self._k.shape[2])

    @property
    def lengths(self) -> Array:
        """Valid positions per sequence, int64 (batch,) (a copy)."""
        return self._lengths.copy()

    def _valid(self, a: Array) -> Array:
        view = a[:, :, :int(self._lengths.max(initial=0))]
        view.flags.writeable = False
        return view

    @property
    def keys(self) -> Array:
        """Read-only view (batch, num_kv_heads, max(lengths), head_dim) of the cached keys.

        Sequence b's keys are ``keys[b, :, :lengths[b]]``; past that, the rows are not valid.
        """
        return self._valid(self._k)

    @property
    def values(self) -> Array:
        """Read-only view (batch, num_kv_heads, max(lengths), value_dim) of the cached values."""
        return self._valid(self._v)

    @property
    def key_scales(self) -> Optional[Array]:
        """Quantized cache: read-only view of the keys' scales (:attr:`keys` holds the int8 or
        float8 values: ``dequantize_kv(keys, key_scales)``): int8 (batch, num_kv_heads,
        max(lengths)), float8 (batch, num_kv_heads, 1); else None."""
        return None if self._ks is None else self._scales_view(self._ks)

    @property
    def value_scales(self) -> Optional[Array]:
        """Quantized cache: read-only view of the values' scales, as :attr:`key_scales`; else None."""
        return None if self._vs is None else self._scales_view(self._vs)

    def _scales_view(self, a: Array) -> Array:
        if not self._fp8:
            return self._valid(a)
        view = a[:]                            # float8: per head, whatever the lengths
        view.flags.writeable = False
        return view

    def reset(self) -> None:
        """Forget every position (lengths = 0), keeping the memory (a float8 cache's scales that
        its first appends set are set again by the next ones)."""
        self._lengths[:] = 0
        if self._fp8 and not self._fixed_scales:
            self._scaled_seq[:] = False

    def __repr__(self) -> str:
        return (f"KVCache(batch={self.batch}, num_kv_heads={self.num_kv_heads}, max_len={self.max_len}, "
                f"head_dim={self.head_dim}, value_dim={self.value_dim}, dtype={self.dtype.name}, "
                + (f"kv_dtype={self.kv_dtype!r}, " if self.kv_dtype else "")
                + f"grow={self.grow}; lengths={self._lengths.tolist()})")

    # -------------------------------------------------------------- append

    def _counts(self, counts: Optional[ArrayLike], n: int, name: str) -> Array:
        if counts is None:
            return np.full(self.batch, n, dtype=np.int64)
        c = _as_array(counts, name)
        if c.dtype == np.bool_ or c.dtype.kind not in "iu":
            raise TypeError(f"{name} must be integers, got dtype {c.dtype}")
        try:
            c = np.broadcast_to(c, (self.batch,))
        except ValueError:
            raise ValueError(f"{name} of shape {c.shape} does not broadcast to (batch,) = ({self.batch},)") from None
        if c.size and (c.min() < 0 or c.max() > n):
            raise ValueError(f"{name} must be in [0, n={n}] (the new rows given), got values in "
                             f"[{c.min()}, {c.max()}]")
        return c.astype(np.int64)

    def _check_new(self, a: Any, name: str, width: int, what: str) -> Array:
        a = _as_array(a, name)
        want = f"(batch, num_kv_heads, n, {what}) = ({self.batch}, {self.num_kv_heads}, n, {width})"
        if a.ndim != 4 or a.shape[0] != self.batch or a.shape[1] != self.num_kv_heads or a.shape[3] != width:
            raise ValueError(f"{name} must have shape {want}, got {a.shape}")
        if a.dtype.kind != "f" and not _core._storage_name(a.dtype):
            raise TypeError(f"{name} has dtype {a.dtype}; the cache holds {self.dtype} (pass floats)")
        if a.dtype != self.dtype and not self.kv_dtype and not _fits(a.dtype, self.dtype):
            raise TypeError(f"{name} has dtype {a.dtype}, which does not fit the {self.dtype} cache without "
                            f"rounding: pass {name}.astype(np.{self.dtype.name}), or make the cache "
                            f"{a.dtype}")
        return a

    def append(self, key: ArrayLike, value: ArrayLike, counts: Optional[ArrayLike] = None) -> None:
        """Write new positions at the end of each sequence, in place.

        Parameters
        ----------
        key : array_like, (batch, num_kv_heads, n, head_dim)
        value : array_like, (batch, num_kv_heads, n, value_dim)
            n new positions per sequence (n = 1 when decoding one token). Floats that fit the
            cache's dtype without rounding (float16, bfloat16 or float32 into a float32 cache;
            any of them into a float64 one; a 16-bit cache takes its own dtype only).
        counts : array_like of int, (batch,), optional
            Ragged appends: sequence b takes only its first ``counts[b]`` new rows (0 <= counts[b]
            <= n; the rest, e.g. padding, is ignored), written at positions ``lengths[b] ..
            lengths[b] + counts[b] - 1``. Default: all n rows for every sequence.

        Raises
        ------
        ValueError
            A shape that does not match the cache (naming it), counts out of range, or, without
            ``grow``, a sequence that would pass `max_len`. Nothing is written then.
        TypeError
            A non-float dtype, or one that does not fit the cache's dtype.
        """
        k = self._check_new(key, "key", self.head_dim, "head_dim")
        v = self._check_new(value, "value", self.value_dim, "value_dim")
        n = k.shape[2]
        if v.shape[2] != n:
            raise ValueError(f"key {k.shape} and value {v.shape} must have the same number of new positions n "
                             f"(dim 2)")
        c = self._counts(counts, n, "counts")
        new = self._lengths + c
        need = int(new.max(initial=0))
        if need > self.max_len:
            if not self.grow:
                b = int(np.argmax(new))
                raise ValueError(f"KVCache overflow: sequence {b} has {self._lengths[b]} positions and "
                                 f"{c[b]} more would pass max_len={self.max_len}; create the cache with a "
                                 f"larger max_len, or with grow=True to reallocate by doubling")
            self._reserve(max(2 * self.max_len, need))
        scales = None                               # int8: (new key scales, new value scales, the cache's)
        if self.kv_dtype == "int8" and self._ks is not None and self._vs is not None:
            (k, ks), (v, vs) = quantize_kv(k), quantize_kv(v)     # quantized here, before anything is written
            scales = (ks, vs, self._ks, self._vs)
        elif self._fp8 and self._ks is not None and self._vs is not None:
            kind = str(self.kv_dtype)
            first = ~self._scaled_seq & (c > 0)    # sequences whose first rows these are: their scales
            kscale, vscale = self._ks[:, :, 0].copy(), self._vs[:, :, 0].copy()
            for i in np.flatnonzero(first).tolist():
                m = int(c[i])
                kscale[i] = cache_fp8_scale(np.asarray(k[i, :, :m], np.float64), kind, (1, 2))
                vscale[i] = cache_fp8_scale(np.asarray(v[i, :, :m], np.float64), kind, (1, 2))
            k, v = encode_rows(k, kind, "key", kscale), encode_rows(v, kind, "value", vscale)
            self._ks[:, :, 0], self._vs[:, :, 0] = kscale, vscale      # nothing raised: commit
            self._scaled_seq |= first
        elif self.kv_dtype:                         # bfloat16 / float16 cache
            k, v = encode_rows(k, self.kv_dtype, "key"), encode_rows(v, self.kv_dtype, "value")
        lo = self._lengths
        if c.min(initial=0) == c.max(initial=0) and lo.min(initial=0) == lo.max(initial=0):
            l0, m = int(lo[0]), int(c[0])          # one block for the whole batch (the usual decode step)
            self._k[:, :, l0:l0 + m] = k[:, :, :m]
            self._v[:, :, l0:l0 + m] = v[:, :, :m]
            if scales is not None:
                scales[2][:, :, l0:l0 + m] = scales[0][:, :, :m]
                scales[3][:, :, l0:l0 + m] = scales[1][:, :, :m]
        else:
            for b in range(self.batch):
                l0, m = int(lo[b]), int(c[b])
                self._k[b, :, l0:l0 + m] = k[b, :, :m]
                self._v[b, :, l0:l0 + m] = v[b, :, :m]
                if scales is not None:
                    scales[2][b, :, l0:l0 + m] = scales[0][b, :, :m]
                    scales[3][b, :, l0:l0 + m] = scales[1][b, :, :m]
        self._lengths = new

    def crop(self, max_length: int) -> None:
        """Keep at most `max_length` positions of each sequence (the first ones); a negative value
        drops that many from the end of each sequence (transformers' ``Cache.crop``: speculative
        decoding rolls back rejected tokens so). In place, nothing copied; the capacity stays."""
        if isinstance(max_length, (bool, np.bool_)) or not isinstance(max_length, (numbers.Integral, np.integer)):
            raise TypeError(f"max_length must be an int, got {type(max_length).__name__}")
        n = int(max_length)
        keep = np.maximum(self._lengths + n, 0) if n < 0 else np.minimum(self._lengths, n)
        self._lengths = keep.astype(np.int64)

    def reorder(self, indices: ArrayLike) -> None:
        """Make sequence i the former sequence ``indices[i]``: beam search's reorder (a permutation,
        repeats allowed) and batch selection (fewer indices: `batch` shrinks). Copies the valid
        positions into new buffers of the same capacity."""
        idx = _as_array(indices, "indices")
        if idx.ndim != 1 or idx.dtype == np.bool_ or idx.dtype.kind not in "iu":
            raise TypeError(f"indices must be a 1-D integer array, got {idx.dtype} of shape {idx.shape}")
        if idx.size == 0:
            raise ValueError("indices must name at least one sequence")
        if idx.min() < -self.batch or idx.max() >= self.batch:
            raise ValueError(f"indices must be in [-batch, batch) = [{-self.batch}, {self.batch}), got values in "
                             f"[{idx.min()}, {idx.max()}]")
        idx = np.where(idx < 0, idx + self.batch, idx).astype(np.intp)
        used = int(self._lengths.max(initial=0))
        for name in ("_k", "_v", "_ks", "_vs"):
            old = getattr(self, name)
            if old is None:
                continue
            if self._fp8 and name in ("_ks", "_vs"):      # float8: per sequence and head, no positions
                setattr(self, name, old[idx].copy())
                continue
            new = np.zeros((idx.size,) + old.shape[1:], dtype=old.dtype)
            new[:, :, :used] = old[idx, :, :used]
            setattr(self, name, new)
        self._lengths = self._lengths[idx].copy()
        self._scaled_seq = self._scaled_seq[idx].copy()
        self.batch = int(idx.size)

    def _reserve(self, capacity: int) -> None:
        used = int(self._lengths.max(initial=0))
        for name in ("_k", "_v", "_ks", "_vs"):
            old = getattr(self, name)
            if old is None or (self._fp8 and name in ("_ks", "_vs")):    # float8: per head, no positions
                continue
            grown = np.zeros(old.shape[:2] + (capacity,) + old.shape[3:], dtype=old.dtype)
            grown[:, :, :used] = old[:, :, :used]
            setattr(self, name, grown)

    # -------------------------------------------------------------- attend

    def attend(self, query: ArrayLike, *, counts: Optional[ArrayLike] = None, is_causal: bool = True,
               alignment: str = "bottom_right", **options: Any) -> Union[Array, Tuple[Array, Array]]:
        """Attention of `query` to the cached keys and values, read in place.

        ``scaled_dot_product_attention(query, keys, values, is_causal=True,
        alignment="bottom_right", key_lengths=lengths, enable_gqa=Hq != num_kv_heads, **options)``
        on views of the cache (no copy): query row i of sequence b sits at position
        ``lengths[b] - n + i``, i.e. the n queries are the last n cached positions (append their
        keys and values first), and each sees the positions up to its own.

        Parameters
        ----------
        query : array_like, (batch, Hq, n, head_dim)
            Hq a multiple of num_kv_heads. Its dtype must not be wider than the cache's (a float64
            query on a float32 cache would convert the whole cache on every call): TypeError.
        counts : array_like of int, (batch,), optional
            Ragged queries, as :meth:`append`'s counts: sequence b has ``counts[b]`` valid rows
            (the first ones), the last counts[b] positions of that sequence; its other rows get
            zeros (lse -inf). Still one kernel call for the whole batch, on views: the kernel
            takes a number of query rows per sequence as it takes a number of keys.
        is_causal, alignment : as in scaled_dot_product_attention
            Defaults: causal, bottom-right.
        **options
            Any other option of :func:`selfattn.scaled_dot_product_attention`: ``scale``,
            ``window_size``, ``alibi_slopes``, ``softcap``, ``sinks``, ``return_lse``, ``num_threads``,
            ``attn_mask`` (broadcastable to (batch, Hq, n, max(lengths)), the width of
            :attr:`keys`). ``key_lengths`` and ``enable_gqa`` are set by the cache; an
            ``enable_gqa`` that agrees with it (True, or False when Hq equals the cache's
            kv heads) is accepted, as a torch user passes it, and one that contradicts it is a
            ValueError.

        Returns
        -------
        out : ndarray, (batch, Hq, n, value_dim), or (out, lse) with ``return_lse=True``.
        """
        if "key_lengths" in options:
            raise TypeError("KVCache.attend sets key_lengths itself (from the cache); do not pass it")
        gqa = options.pop("enable_gqa", None)      # the cache sets it; a value that agrees is accepted
        if gqa is not None and not isinstance(gqa, (bool, np.bool_)):
            raise TypeError(f"enable_gqa must be a bool, got {type(gqa).__name__}")
        q = _as_array(query, "query")
        if q.ndim != 4 or q.shape[0] != self.batch or q.shape[3] != self.head_dim:
            raise ValueError(f"query must have shape (batch, Hq, n, head_dim) = ({self.batch}, Hq, n, "
                             f"{self.head_dim}), got {q.shape}")
        Hq = q.shape[1]
        if Hq % self.num_kv_heads:
            raise ValueError(f"query heads Hq={Hq} (query {q.shape}) must be a multiple of the cache's "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.dtype == np.float32 and q.dtype == np.float64:
            raise TypeError("query is float64 but the cache holds float32: the cache would be converted to "
                            "float64 on every call; pass query.astype(np.float32), or use a float64 cache")
        if _core._storage_name(self.dtype) and q.dtype != self.dtype:
            raise TypeError(f"query is {q.dtype} but the cache holds {self.dtype}: the kernel reads the "
                            f"cache as it is stored, with queries of its dtype; pass "
                            f"query.astype(cache.dtype)")
        if gqa is not None and not gqa and Hq != self.num_kv_heads:
            raise ValueError(f"enable_gqa=False contradicts the cache: query has Hq={Hq} heads over its "
                             f"num_kv_heads={self.num_kv_heads} (grouped-query attention); leave enable_gqa "
                             f"out, the cache sets it")
        n = q.shape[2]
        kw = dict(options, is_causal=is_causal, alignment=alignment, enable_gqa=Hq != self.num_kv_heads)
        S = int(self._lengths.max(initial=0))
        k, v = self._k[:, :, :S], self._v[:, :, :S]
        if self._ks is not None and self._vs is not None:      # the scales of the same positions (float8: per head)
            kw.update(k_scale=self._ks if self._fp8 else self._ks[:, :, :S],
                      v_scale=self._vs if self._fp8 else self._vs[:, :, :S])
        if counts is None:
            return scaled_dot_product_attention(q, k, v, key_lengths=self._lengths, **kw)
        c = self._counts(counts, n, "counts")
        if np.any(c > self._lengths):
            b = int(np.argmax(c - self._lengths))
            raise ValueError(f"counts[{b}]={c[b]} query rows but sequence {b} holds only {self._lengths[b]} "
                             f"positions")
        return self._attend_ragged(q, k, v, c, kw)

    def _attend_ragged(self, q: Array, k: Array, v: Array, c: Array,
                       kw: dict) -> Union[Array, Tuple[Array, Array]]:
        # one kernel call for the whole batch: sequence b's units see c[b] query rows (the first
        # ones; bottom-right: the last c[b] positions of its lengths[b] keys), the rows past c[b]
        # are zeros with lse -inf. Options (attn_mask, alibi_slopes, ...) apply per unit as in a
        # call without counts.
        return _core.sdpa(q, k, v, key_lengths=self._lengths, query_lengths=c, **kw)
