"""User-defined masks without a compiler: FlexAttention's ``create_block_mask`` and ``flex_attention``.

    def document(b, h, q_idx, kv_idx):                # torch's mask_mod, written for NumPy arrays
        return doc_id[q_idx] == doc_id[kv_idx]
    block_mask = selfattn.create_block_mask(document, None, None, L, L)
    out = selfattn.flex_attention(q, k, v, block_mask=block_mask)

``mask_mod(b, h, q_idx, kv_idx) -> bool`` says whether query ``q_idx`` of batch entry ``b`` and
head ``h`` sees key ``kv_idx``. :func:`create_block_mask` evaluates it once, vectorised: it is
called with NumPy integer arrays that broadcast against each other -- ``b`` (B, 1, 1, 1), ``h``
(1, H, 1, 1), ``q_idx`` (1, 1, rows, 1), ``kv_idx`` (1, 1, 1, KV_LEN) -- one block row of queries
at a time (so memory stays at BLOCK_SIZE x KV_LEN per call, and L = 32768 builds in about a
second), never per element. Write it with elementwise operations (``&``, ``|``, ``~``,
comparisons, indexing captured arrays, ``np.where``): Python's ``and`` / ``or`` / ``if`` on the
arguments raise, as under torch's vmap. A mod that ignores ``b`` or ``h`` gives a mask that
broadcasts over them (stored once).

The :class:`BlockMask` records, for each block of ``BLOCK_SIZE`` query rows x keys, whether it is
empty, full or partial, and the partial blocks' bits. The kernels (forward, decode and backward)
read it through the one mask machinery (``src_c/attn_mask.h``, ``sa_attn_args`` with
``SA_MASK_BLOCKS``): a tile whose blocks are all empty is skipped whole (nothing packed for it,
nothing computed), a full block reads no mask, a partial block applies its bits per key. It
combines with nothing else: structure that ``scaled_dot_product_attention`` has built in (causal,
windows, key lengths) is faster there (intervals, no table).

Key compaction: when every visible pair has ``q_idx = kv_idx (mod D)`` for some D > 1 (a window
dilated key by key, a strided pattern), rows of residue r only see keys of residue r.
:func:`create_block_mask` finds D (the gcd of ``q_idx - kv_idx`` over the visible pairs, block row
by block row) and also builds each residue class's block mask, where the pattern is dense (a plain
band for a dilated window); :func:`flex_attention` and its backward then run one kernel call per
class on strided views (rows r, r + D, ... against keys r, r + D, ...: no copies), instead of
computing every partial block and masking (D - 1) / D of it (``repr`` says "runs as D strided
classes"). With a ``score_mod`` (it reads the true positions) the mask runs in one call.

``score_mod(score, b, h, q_idx, kv_idx) -> score`` changes each score (natural-log units, scale
q.k) before the softmax: T5 or Swin relative-position biases read from captured arrays
(``score + bias[h, q_idx - kv_idx + L]``), soft-capping variants, gates. It is traced once per
call with symbolic stand-ins (``selfattn._scoremod``: arithmetic, comparisons, ``np.where``,
exp / log / tanh / sqrt / abs / floor / minimum / maximum / clip, indexing captured NumPy arrays
-- or torch's equivalents in ``selfattn.torch``) into a small program that the kernels run on a
tile row of scores at a time (``src_c/score_mod.h``): no compiler, no Python per element. Its
derivative with respect to the score comes from the same trace, so the backward runs in the
fused kernel too; a bias read along a row at ``q_idx - kv_idx`` is read as a contiguous run. The
gradients of captured arrays (``flex_attention_vjp(..., grad_arrays=[bias])``,
``selfattn.torch.flex_attention`` for tensors that require grad) are computed blockwise in
NumPy. What cannot be traced is a :class:`selfattn.ScoreModTraceError` naming the operation; an
index outside a captured array an ``IndexError``. Built-in equivalents are faster where they
exist (``alibi_slopes=``, ``softcap=`` of ``scaled_dot_product_attention``).
"""

import numbers
from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _core, _scoremod

__all__ = ["BlockMask", "create_block_mask", "flex_attention", "noop_mask", "and_masks", "or_masks"]

Array = NDArray[Any]

_EMPTY, _FULL = -1, -2          # src_c/selfattn.h: SA_BLOCK_EMPTY, SA_BLOCK_FULL
_MAX_CLASSES = 64               # a dilated mask runs as at most this many strided classes (one kernel call each)
_CLASS_GAIN = 0.8               # ... and only when their blocks hold less than this share of the mask's work


class _Strided(NamedTuple):
    """A mask run as D residue classes (see _strided_classes): one kernel mask per class."""
    D: int
    masks: Tuple[Tuple[Array, Array, int, int], ...]


def noop_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    """The mask_mod that masks nothing (torch's ``noop_mask``)."""
    return np.ones(np.broadcast_shapes(np.shape(q_idx), np.shape(kv_idx)), dtype=bool)


def and_masks(*mods: Callable[..., Any]) -> Callable[..., Any]:
    """A mask_mod that is True where every one of ``mods`` is (torch's ``and_masks``)."""
    def both(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        out = noop_mask(b, h, q_idx, kv_idx)
        for m in mods:
            out = out & _evaluate(m, b, h, q_idx, kv_idx)
        return out
    return both


def or_masks(*mods: Callable[..., Any]) -> Callable[..., Any]:
    """A mask_mod that is True where any one of ``mods`` is (torch's ``or_masks``)."""
    def either(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        out = ~noop_mask(b, h, q_idx, kv_idx)
        for m in mods:
            out = out | _evaluate(m, b, h, q_idx, kv_idx)
        return out
    return either


def _evaluate(mask_mod: Callable[..., Any], b: Array, h: Array, q: Array, kv: Array) -> Array:
    """mask_mod on index arrays, as a bool array of at most 4 dims (its own broadcast shape)."""
    try:
        r = mask_mod(b, h, q, kv)
    except Exception as exc:
        raise TypeError(f"mask_mod raised {type(exc).__name__}: {exc}. It is called once per block row with "
                        f"NumPy int64 index arrays that broadcast -- b {b.shape}, h {h.shape}, q_idx {q.shape}, "
                        f"kv_idx {kv.shape} -- so write it with elementwise operations (&, |, ~, comparisons, "
                        f"np.where, indexing arrays), not Python's and / or / if") from exc
    r = np.asarray(r)
    if r.dtype != np.bool_:
        raise TypeError(f"mask_mod must return bool (True = the query sees the key), got dtype {r.dtype}")
    if r.ndim > 4:
        raise ValueError(f"mask_mod returned shape {r.shape}: it must broadcast to (B, H, rows, KV_LEN)")
    return r.reshape((1,) * (4 - r.ndim) + r.shape)


def _size(x: Any, name: str, minimum: int, none_ok: bool = False) -> int:
    if x is None and none_ok:
        return 1
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or int(x) < minimum:
        raise (TypeError if not isinstance(x, numbers.Integral) or isinstance(x, bool) else ValueError)(
            f"{name} must be an integer >= {minimum}{' or None (broadcast)' if none_ok else ''}, got {x!r}")
    return int(x)


class BlockMask:
    """Which blocks of (query rows x keys) a mask leaves empty, full or partial, and the partial
    blocks' bits: what :func:`create_block_mask` builds and :func:`flex_attention` takes.

    Attributes
    ----------
    shape : (B, H, Q_LEN, KV_LEN)
        B or H is 1 where the mask broadcasts over them (mask_mod ignores ``b`` / ``h``, or
        ``None`` was given).
    BLOCK_SIZE : (int, int)
        Query rows and keys per block.
    mask_mod : callable
        The function it was built from.
    """

    def __init__(self, table: Array, bits: Array, shape: Tuple[int, int, int, int],
                 block_size: Tuple[int, int], mask_mod: Callable[..., Any]) -> None:
        self._table = table            # int64 (B, H, Q blocks, KV blocks): _EMPTY, _FULL, or bits' index
        self._bits = bits              # uint8 (partial blocks, rows, keys)
        self._table.flags.writeable = False
        self._bits.flags.writeable = False
        self.shape = shape
        self.BLOCK_SIZE = block_size
        self.mask_mod = mask_mod
        self._dilation = 0             # gcd of q_idx - kv_idx over the visible pairs (create_block_mask)
        self._classes: Optional[_Strided] = None   # when the mask runs as strided classes

    def _kernel_mask(self) -> Tuple[Array, Array, int, int]:
        return self._table, self._bits, self.BLOCK_SIZE[0], self.BLOCK_SIZE[1]

    def _counts(self, kind: int) -> Tuple[Array, Array]:
        """Per block row: how many blocks of this kind, and their column indices first (torch's
        kv_num_blocks / kv_indices layout: the rest of each row is padding)."""
        sel = self._table >= 0 if kind >= 0 else self._table == kind
        num = sel.sum(axis=-1).astype(np.int32)
        order = np.argsort(~sel, axis=-1, kind="stable").astype(np.int32)
        return num, order

    @property
    def kv_num_blocks(self) -> Array:
        """(B, H, Q blocks) int32: the partial blocks of each block row (torch's name)."""
        return self._counts(0)[0]

    @property
    def kv_indices(self) -> Array:
        """(B, H, Q blocks, KV blocks) int32: their KV block indices first, in order."""
        return self._counts(0)[1]

    @property
    def full_kv_num_blocks(self) -> Array:
        """(B, H, Q blocks) int32: the full blocks of each block row."""
        return self._counts(_FULL)[0]

    @property
    def full_kv_indices(self) -> Array:
        """(B, H, Q blocks, KV blocks) int32: their KV block indices first, in order."""
        return self._counts(_FULL)[1]

    def to_dense(self) -> Array:
        """(B, H, Q blocks, KV blocks) int32: 1 where a block is computed (partial or full)."""
        return (self._table != _EMPTY).astype(np.int32)

    def to_bool(self) -> Array:
        """The element mask it stands for, (B, H, Q_LEN, KV_LEN) bool (materialised: for checks
        and small shapes)."""
        B, H, L, S = self.shape
        br, bk = self.BLOCK_SIZE
        nqb, nkb = self._table.shape[-2:]
        out = np.zeros((B, H, nqb * br, nkb * bk), dtype=bool)
        blocks = out.reshape(B, H, nqb, br, nkb, bk)
        full = self._table == _FULL
        blocks.transpose(0, 1, 2, 4, 3, 5)[full] = True
        part = self._table >= 0
        blocks.transpose(0, 1, 2, 4, 3, 5)[part] = self._bits[self._table[part]].astype(bool)
        return out[:, :, :L, :S]

    def sparsity(self) -> float:
        """Percentage of blocks skipped (empty), as torch's ``BlockMask.sparsity``."""
        n = self._table.size
        return 100.0 * float(np.count_nonzero(self._table == _EMPTY)) / n if n else 0.0

    def __repr__(self) -> str:
        n = self._table.size
        full = int(np.count_nonzero(self._table == _FULL))
        part = int(self._bits.shape[0])
        run = f", runs as {self._classes[0]} strided classes" if self._classes else ""
        return (f"BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, blocks={n}: {full} full, "
                f"{part} partial, sparsity={self.sparsity():.2f}%{run})")


def create_block_mask(mask_mod: Callable[..., Any], B: Optional[int], H: Optional[int], Q_LEN: int, KV_LEN: int,
                      device: Any = None, BLOCK_SIZE: Union[int, Tuple[int, int]] = 128,
                      _compile: bool = False) -> BlockMask:
    """The block mask of ``mask_mod`` (torch's ``create_block_mask``, evaluated in NumPy).

    Parameters
    ----------
    mask_mod : callable ``(b, h, q_idx, kv_idx) -> bool array``
        Called with broadcasting int64 index arrays (module docstring), one block row of queries
        at a time; returns True where the query sees the key.
    B, H : int or None
        Batch size and heads; None: the mask is the same for all (broadcast).
    Q_LEN, KV_LEN : int
        Query rows and keys.
    device : None or "cpu"
        For torch's signature (selfattn runs on the CPU).
    BLOCK_SIZE : int or (int, int)
        Query rows and keys per block (default 128, as torch's).
    _compile : bool
        Accepted for torch's signature; there is nothing to compile.

    Returns
    -------
    BlockMask

    Examples
    --------
    >>> import numpy as np, selfattn
    >>> causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
    >>> bm = selfattn.create_block_mask(causal, None, None, 256, 256, BLOCK_SIZE=64)
    >>> bm
    BlockMask(shape=(1, 1, 256, 256), BLOCK_SIZE=(64, 64), blocks=16: 6 full, 4 partial, sparsity=37.50%)
    """
    if not callable(mask_mod):
        raise TypeError(f"mask_mod must be callable (b, h, q_idx, kv_idx) -> bool, got {type(mask_mod).__name__}")
    Bn, Hn = _size(B, "B", 1, True), _size(H, "H", 1, True)
    L, S = _size(Q_LEN, "Q_LEN", 0), _size(KV_LEN, "KV_LEN", 0)
    if device is not None and str(device) != "cpu":
        raise ValueError(f"device must be None or 'cpu' (selfattn runs on the CPU), got {device!r}")
    bs = BLOCK_SIZE if isinstance(BLOCK_SIZE, tuple) else (BLOCK_SIZE, BLOCK_SIZE)
    if len(bs) != 2:
        raise ValueError(f"BLOCK_SIZE must be an int or (rows, keys), got {BLOCK_SIZE!r}")
    br, bk = _size(bs[0], "BLOCK_SIZE", 1), _size(bs[1], "BLOCK_SIZE", 1)
    b_idx = np.arange(Bn, dtype=np.int64).reshape(Bn, 1, 1, 1)
    h_idx = np.arange(Hn, dtype=np.int64).reshape(1, Hn, 1, 1)
    # stored once over b / h unless mask_mod uses them (known from its results' shapes; a mod that
    # uses b or h only in later block rows makes the build start over with them)
    Bm = Hm = 1
    while True:
        built = _build(mask_mod, b_idx, h_idx, Bm, Hm, L, S, br, bk)
        if isinstance(built, BlockMask):
            _strided_classes(built, b_idx, h_idx)
            return built
        Bm, Hm = built


def _build(mask_mod: Callable[..., Any], b_idx: Array, h_idx: Array, Bm: int, Hm: int, L: int, S: int,
           br: int, bk: int) -> Union[BlockMask, Tuple[int, int]]:
    """The block mask stored over (Bm, Hm), or the (Bm, Hm) it needs when mask_mod uses more."""
    Bn, Hn = b_idx.shape[0], h_idx.shape[1]
    nqb, nkb = -(-L // br), -(-S // bk)
    kv = np.arange(S, dtype=np.int64).reshape(1, 1, 1, S)
    valid_keys = np.minimum(bk, S - np.arange(nkb, dtype=np.int64) * bk)   # the last block: to KV_LEN
    table = np.empty((Bm, Hm, nqb, nkb), dtype=np.int64)
    chunks, n = [], 0
    g = 0                       # gcd of q_idx - kv_idx over every visible pair (0: none off the diagonal yet)
    buf = np.zeros((Bm, Hm, br, nkb * bk), dtype=bool)
    for qb in range(nqb):
        r0 = qb * br
        rows = min(br, L - r0)
        q = np.arange(r0, r0 + rows, dtype=np.int64).reshape(1, 1, rows, 1)
        r = _evaluate(mask_mod, b_idx, h_idx, q, kv)
        if any(d not in (1, w) for d, w in zip(r.shape, (Bn, Hn, rows, S))):
            raise ValueError(f"mask_mod returned shape {r.shape} for b {b_idx.shape}, h {h_idx.shape}, q_idx "
                             f"{q.shape}, kv_idx {kv.shape}: it must broadcast to {(Bn, Hn, rows, S)}")
        need = (Bn if r.shape[0] != 1 else Bm, Hn if r.shape[1] != 1 else Hm)
        if need != (Bm, Hm):
            return need
        if g != 1:
            g = _gcd_update(g, np.broadcast_to(r.any(axis=(0, 1)), (rows, S)), q[0, 0], kv[0, 0])
        if rows < br:
            buf[:] = False
        buf[:, :, :rows, :S] = r
        blocks = buf.reshape(Bm, Hm, br, nkb, bk)
        count = blocks.sum(axis=(2, 4), dtype=np.int64)              # visible keys per block
        t = np.where(count == 0, _EMPTY, np.where(count == rows * valid_keys, _FULL, 0)).astype(np.int64)
        part = np.nonzero(t == 0)
        t[part] = n + np.arange(part[0].size, dtype=np.int64)
        n += part[0].size
        chunks.append(blocks.transpose(0, 1, 3, 2, 4)[part].view(np.uint8))   # (partial, br, bk)
        table[:, :, qb] = t
    bits = np.ascontiguousarray(np.concatenate(chunks) if chunks else np.zeros((0, br, bk), np.uint8))
    bm = BlockMask(table, bits, (Bm, Hm, L, S), (br, bk), mask_mod)
    bm._dilation = g
    return bm


def _gcd_update(g: int, seen: Array, q: Array, kv: Array) -> int:
    """The gcd of g and of q_idx - kv_idx over the pairs `seen` (rows x keys) marks. Once g > 1,
    only the pairs in another residue class than g's are looked at (usually none: a cheap test)."""
    if g > 1:
        seen = seen & ((q % g) != (kv % g))
    if not seen.any():
        return g
    d = np.abs((q - kv)[seen])
    return int(np.gcd.reduce(np.append(d, g)))


def _strided_classes(bm: BlockMask, b_idx: Array, h_idx: Array) -> None:
    """Key compaction for dilated masks. When every visible pair has q_idx = kv_idx (mod D), D > 1
    (a window that sees every D-th key, a strided pattern), rows of residue r only ever see keys of
    residue r: run each class on strided views (q[..., r::D, :] with k, v[..., r::D, :]; no copy)
    under its own block mask, where the pattern is dense (a plain band for a dilated window)
    instead of every block being partial with (D - 1) / D of its scores thrown away. Kept on the
    mask (bm._classes) when the classes' blocks hold less work than the mask's own."""
    D = bm._dilation
    _, _, L, S = bm.shape
    if not 1 < D <= min(L, S, _MAX_CLASSES):
        return
    br, bk = bm.BLOCK_SIZE
    mod = bm.mask_mod
    Bm, Hm = bm._table.shape[:2]
    classes = []
    for r in range(D):
        def mod_r(b: Any, h: Any, q_idx: Any, kv_idx: Any, r: int = r) -> Any:
            return mod(b, h, q_idx * D + r, kv_idx * D + r)
        c = _build(mod_r, b_idx[:Bm], h_idx[:, :Hm], Bm, Hm, len(range(r, L, D)), len(range(r, S, D)), br, bk)
        if not isinstance(c, BlockMask):     # the mod used b or h differently on the class: keep the plain mask
            return
        classes.append(c)
    if sum(_work(c) for c in classes) < _CLASS_GAIN * _work(bm):
        bm._classes = _Strided(D, tuple(c._kernel_mask() for c in classes))


def _work(bm: BlockMask) -> int:
    """Scores the kernels compute under the mask: its computed blocks (partial or full) x area."""
    return int(np.count_nonzero(bm._table != _EMPTY)) * bm.BLOCK_SIZE[0] * bm.BLOCK_SIZE[1]


def flex_attention(query: ArrayLike, key: ArrayLike, value: ArrayLike, score_mod: Optional[Callable[..., Any]] = None,
                   block_mask: Optional[BlockMask] = None, *, scale: Optional[float] = None,
                   enable_gqa: bool = False, return_lse: bool = False,
                   num_threads: Optional[int] = None) -> Union[Array, Tuple[Array, Array]]:
    """Attention under a user-defined block mask (torch's ``flex_attention``, without a compiler).

    Parameters
    ----------
    query : array_like, (B, Hq, L, E)
    key : array_like, (B, H, S, E)
    value : array_like, (B, H, S, Ev)
        float32, float64, or bfloat16 / float16 (all three), as for
        `selfattn.scaled_dot_product_attention`.
    score_mod : callable, optional
        ``score_mod(score, b, h, q_idx, kv_idx) -> score``, traced once (see the module
        docstring): elementwise NumPy operations and captured arrays indexed by the arguments.
    block_mask : BlockMask, optional
        From :func:`create_block_mask` for ``(B or None, Hq or None, L, S)``; None: every query
        sees every key.
    scale : float, optional
        Multiplies q k^T; default 1 / sqrt(E).
    enable_gqa : bool
        H < Hq, Hq a multiple of H: query heads share kv heads.
    return_lse : bool
        Also return the log-sum-exp of each row (natural log; -inf where a row sees no key).
    num_threads : int, optional
        Results are the same bits for every thread count.

    Returns
    -------
    out : ndarray (B, Hq, L, Ev)
        A row that sees no key gives zeros.
    lse : ndarray (B, Hq, L), with ``return_lse=True``

    Examples
    --------
    >>> import numpy as np, selfattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 256, 16), dtype=np.float32) for _ in range(3))
    >>> doc = np.repeat(np.arange(4), 64)                    # 4 documents of 64 tokens, packed
    >>> bm = selfattn.create_block_mask(lambda b, h, qi, ki: doc[qi] == doc[ki], None, None, 256, 256)
    >>> out = selfattn.flex_attention(q, k, v, block_mask=bm)
    >>> ref = selfattn.scaled_dot_product_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64])
    >>> bool(np.allclose(out[:, :, :64], ref, atol=1e-6))
    True
    >>> bias = rng.standard_normal((2, 511))                # T5-style: [head, q_idx - kv_idx + 255]
    >>> out = selfattn.flex_attention(q, k, v, lambda s, b, h, qi, ki: s + bias[h, qi - ki + 255])
    >>> out.shape
    (1, 2, 256, 16)
    """
    q, k, v, bm, sm = _flex_args(query, key, value, score_mod, block_mask, "flex_attention", enable_gqa)
    return _flex_fwd(q, k, v, bm, sm, return_lse, scale=scale, enable_gqa=enable_gqa, num_threads=num_threads)


def _flex_fwd(q: Array, k: Array, v: Array, bm: Any, sm: Any, return_lse: bool, **opts: Any) -> Any:
    """The forward under _flex_args' mask: one kernel call, or one per strided class (views of
    q, k, v: rows r, r + D, ... of each; the results written to those rows)."""
    if not isinstance(bm, _Strided):
        return _core.sdpa(q, k, v, block_mask=bm, score_mod=sm, return_lse=return_lse, **opts)
    D = bm.D
    out: Any = None
    lse: Any = None
    for r, m in enumerate(bm.masks):
        o, s = _core.sdpa(q[..., r::D, :], k[..., r::D, :], v[..., r::D, :], block_mask=m, score_mod=sm,
                          return_lse=True, **opts)
        if out is None:
            out = np.empty(o.shape[:-2] + (q.shape[-2], o.shape[-1]), dtype=o.dtype)
            lse = np.empty(s.shape[:-1] + (q.shape[-2],), dtype=s.dtype)
        out[..., r::D, :] = o
        lse[..., r::D] = s
    return (out, lse) if return_lse else out


def _flex_bwd(q: Array, k: Array, v: Array, out: Array, lse: Array, dout: Array, bm: Any, sm: Any,
              **opts: Any) -> Tuple[Array, Array, Array]:
    """The fused backward under _flex_args' mask (per strided class as _flex_fwd): dq, dk, dv."""
    if not isinstance(bm, _Strided):
        return _core.sdpa_bwd(q, k, v, out, lse, dout, block_mask=bm, score_mod=sm, **opts)
    D = bm.D
    grads: Any = None
    for r, m in enumerate(bm.masks):
        rows, keys = (Ellipsis, slice(r, None, D), slice(None)), (Ellipsis, slice(r, None, D), slice(None))
        g = _core.sdpa_bwd(q[rows], k[keys], v[keys], out[rows], lse[..., r::D], dout[rows], block_mask=m,
                           score_mod=sm, **opts)
        if grads is None:     # every row and key is in one class: each gradient row is written once
            grads = tuple(np.empty(d.shape[:-2] + (a.shape[-2], d.shape[-1]), dtype=d.dtype)
                          for d, a in zip(g, (q, k, v)))
        for full, part, sl in zip(grads, g, (rows, keys, keys)):
            full[sl] = part
    return grads


def _flex_args(query: Any, key: Any, value: Any, score_mod: Any, block_mask: Any, fn: str,
               enable_gqa: Any = False) -> Tuple[Any, Any, Any, Any, Any]:
    """flex_attention's arguments checked: 4-D arrays of one batch size, heads equal (or, with
    enable_gqa, a multiple: checked by the engine), a block mask that fits; score_mod traced and
    lowered (selfattn._scoremod) for the kernels, or None."""
    sm = None
    if score_mod is not None:
        prog = score_mod if isinstance(score_mod, _scoremod.Program) else _scoremod.trace(score_mod)
        sm = _scoremod.lower(prog)
    q = _core._as_input(query, "query")
    k = _core._as_input(key, "key")
    v = _core._as_input(value, "value")
    for a, nm, dims in ((q, "query", "(B, Hq, L, E)"), (k, "key", "(B, H, S, E)"), (v, "value", "(B, H, S, Ev)")):
        if a.ndim != 4:
            raise ValueError(f"{fn}: {nm} must be 4-D {dims}, got shape {a.shape}")
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"{fn}: query {q.shape}, key {k.shape} and value {v.shape} must have the same batch size B")
    if not enable_gqa and not q.shape[1] == k.shape[1] == v.shape[1]:
        raise ValueError(f"{fn}: query {q.shape} has {q.shape[1]} heads and key {k.shape} / value {v.shape} "
                         f"{k.shape[1]} / {v.shape[1]}: they must be equal (for grouped-query attention with "
                         f"fewer kv heads, pass enable_gqa=True)")
    if block_mask is None:
        return q, k, v, None, sm
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"{fn}: block_mask must be a selfattn.BlockMask (selfattn.create_block_mask), got "
                        f"{type(block_mask).__module__}.{type(block_mask).__name__}")
    B, Hq, L, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    mB, mH, mL, mS = block_mask.shape
    if (mL, mS) != (L, S):
        raise ValueError(f"{fn}: block_mask was made for Q_LEN={mL}, KV_LEN={mS}, but query has L={L} rows and "
                         f"key S={S} keys")
    if mB not in (1, B) or mH not in (1, Hq):
        raise ValueError(f"{fn}: block_mask's B={mB}, H={mH} do not fit query's batch {B} and heads {Hq}")
    if block_mask._classes is not None and sm is None:     # score_mod sees the true q_idx / kv_idx: one call
        return q, k, v, block_mask._classes, sm
    return q, k, v, block_mask._kernel_mask(), sm
