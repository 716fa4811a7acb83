"""The options' values and per-batch arrays, validated in one place (pure Python and NumPy).

One exception type per mistake, the same wherever the option is taken: a value of the wrong kind
is a TypeError, a value of the right kind out of range a ValueError. The compiled engine
(``_core.pyx``'s problem builder), :mod:`selfattn.reference` and :mod:`selfattn.inspection` call these
functions, and ``tests/robustness/test_robust_misuse.py`` holds all three to it.
"""

import math
import numbers
from typing import Any, List, NamedTuple, Optional, Tuple

import numpy as np

ALIGNMENTS = ("top_left", "bottom_right")
_F32_MAX = float(np.finfo(np.float32).max)     # the narrowest compute dtype's largest value


def is_int(x: object) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, (bool, np.bool_))


def window_sides(window_size: object) -> Tuple[Optional[int], Optional[int]]:
    """None | w | (left, right) -> (left, right), each None (unbounded on that side) or an int >= 0."""
    if window_size is None:
        return None, None
    sides = (window_size, window_size) if is_int(window_size) else window_size
    if not isinstance(sides, (tuple, list)) or len(sides) != 2:
        raise TypeError(f"window_size must be None, an int or a (left, right) pair of ints or None, "
                        f"got {window_size!r}")
    out: List[Optional[int]] = []
    for side, name in zip(sides, ("left", "right")):
        if side is None:
            out.append(None)
        elif not is_int(side):
            raise TypeError(f"window_size {name} side must be an int or None, got {type(side).__name__} "
                            f"({window_size!r})")
        elif side < 0:
            raise ValueError(f"window_size must be >= 0 on each side (None = unbounded), got {window_size!r}")
        else:
            out.append(int(side))
    return out[0], out[1]


def check_alignment(alignment: object) -> str:
    """'top_left' or 'bottom_right' (anything else, of any type, is a ValueError: a wrong choice)."""
    if not isinstance(alignment, str) or alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be 'top_left' or 'bottom_right', got {alignment!r}")
    return alignment


_TORCH_ORDER = "torch's order is (query, key, value, attn_mask, dropout_p, is_causal, *, scale, enable_gqa)"


def check_is_causal(is_causal: object) -> bool:
    """A bool (Python's or NumPy's). Anything else is a TypeError: a string such as "no" or a
    float (a dropout_p written where is_causal was, in an older order) would count as true."""
    if is_causal is True or is_causal is False or isinstance(is_causal, np.bool_):
        return bool(is_causal)
    raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__} {is_causal!r} "
                    f"({_TORCH_ORDER})")


def check_dropout_p(dropout_p: object) -> float:
    """dropout_p as a float in [0, 1): one outside is a ValueError, anything but a real number (a
    bool: is_causal written where dropout_p is) a TypeError."""
    if isinstance(dropout_p, (bool, np.bool_)) or not isinstance(dropout_p, (numbers.Real, np.floating,
                                                                              np.integer)):
        raise TypeError(f"dropout_p must be a real number in [0, 1), got {type(dropout_p).__name__} "
                        f"{dropout_p!r} ({_TORCH_ORDER}: is_causal is the 6th positional argument)")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return p


def no_dropout(dropout_p: object, where: str) -> float:
    """check_dropout_p, then NotImplementedError for p > 0 where dropout is not built."""
    p = check_dropout_p(dropout_p)
    if p != 0.0:
        raise NotImplementedError(f"dropout_p={dropout_p!r}: {where} has no attention dropout (pass 0.0; "
                                  f"selfattn.scaled_dot_product_attention and its VJP have it)")
    return p


def dropout_seed(seed: object) -> int:
    """The 64-bit Philox key of attention dropout: an int in [0, 2^64), a numpy Generator (one draw
    from it), or None (fresh entropy from the OS: a different mask each call)."""
    if seed is None:
        return int(np.random.SeedSequence().entropy) & (2 ** 64 - 1)   # type: ignore[arg-type]
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(0, 2 ** 64, dtype=np.uint64))
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (numbers.Integral, np.integer)):
        raise TypeError(f"seed must be an int in [0, 2**64), a numpy.random.Generator or None, got "
                        f"{type(seed).__name__} {seed!r}")
    if not 0 <= int(seed) < 2 ** 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed!r}")
    return int(seed)


def check_softcap(softcap: object) -> Optional[float]:
    """None, or a finite float > 0."""
    if softcap is None:
        return None
    if isinstance(softcap, (str, bytes, bool, np.bool_)):
        raise TypeError(f"softcap must be a real number > 0 or None, got {type(softcap).__name__}")
    try:
        c = float(softcap)      # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"softcap must be a real number > 0 or None, got {softcap!r}") from None
    if not (c > 0 and math.isfinite(c)):       # also False for NaN
        raise ValueError(f"softcap must be finite and > 0, got {softcap!r}")
    return c


def check_threads(num_threads: object) -> Optional[int]:
    """None (the default thread count) or an int >= 1 (capped at 65536)."""
    if num_threads is None:
        return None
    if not is_int(num_threads):
        raise TypeError(f"num_threads must be an int, got {type(num_threads).__name__}")
    if num_threads < 1:     # type: ignore[operator]
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    return min(int(num_threads), 1 << 16)   # type: ignore[call-overload]


def check_scale(scale: object, E: int, dtype: Any = None) -> float:
    """The score scale: 1/sqrt(E) for None, else a finite real number (with `dtype`, one that
    dtype can hold: float32 rounds 1e300 to inf, and every score would be NaN)."""
    if scale is None:
        return 1.0 / math.sqrt(E) if E > 0 else 1.0
    if isinstance(scale, (str, bytes, bool, np.bool_)):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    try:
        sc = float(scale)       # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}") from None
    except OverflowError:
        raise ValueError(f"scale must be finite, got {scale!r}") from None
    if not math.isfinite(sc):
        raise ValueError(f"scale must be finite, got {scale!r}")
    # np.finfo costs about a microsecond a call: consulted only past float32's largest value
    if dtype is not None and abs(sc) > _F32_MAX and abs(sc) > float(np.finfo(dtype).max):
        raise ValueError(f"scale={scale!r} does not fit the compute dtype {np.dtype(dtype)} "
                         f"(largest {float(np.finfo(dtype).max):.4g}): the scores would overflow to inf")
    return sc


def _array(x: object, name: str) -> "np.ndarray[Any, Any]":
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} cannot be read as an array: {exc}") from None


def batch_lengths(lengths: object, batch: Tuple[int, ...], upper: int, name: str = "key_lengths",
                  what: str = "S") -> "np.ndarray[Any, Any]":
    """key_lengths (or query_lengths, with what="L") broadcast to the batch dims out.shape[:-3]:
    int64 of shape `batch`, each in [0, upper]."""
    a = _array(lengths, name)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {a.dtype}")
    try:
        b = np.broadcast_to(a, batch)
    except ValueError:
        raise ValueError(f"{name} of shape {a.shape} does not broadcast to the batch dims {batch} "
                         f"(out.shape[:-3]; a scalar for 2-D/3-D inputs)") from None
    if b.size and (int(b.min()) < 0 or int(b.max()) > upper):
        raise ValueError(f"{name} must be in [0, {what}={upper}], got values in [{int(b.min())}, {int(b.max())}]")
    return b.astype(np.int64)


def batch_offsets(offsets: object, batch: Tuple[int, ...]) -> "np.ndarray[Any, Any]":
    """query_offsets (any integers: the position of query row 0) broadcast to the batch dims."""
    a = _array(offsets, "query_offsets")
    if a.dtype.kind not in "iu":
        raise TypeError(f"query_offsets must be integers, got dtype {a.dtype}")
    try:
        return np.broadcast_to(a, batch).astype(np.int64)
    except ValueError:
        raise ValueError(f"query_offsets of shape {a.shape} does not broadcast to the batch dims {batch}") from None


def head_slopes(alibi_slopes: object, lead: Tuple[int, ...]) -> "np.ndarray[Any, Any]":
    """alibi_slopes broadcast to (..., Hq) = `lead`: float64, finite."""
    a = _array(alibi_slopes, "alibi_slopes")
    if a.dtype.kind not in "fiu":
        raise TypeError(f"alibi_slopes must be real numbers, got dtype {a.dtype}")
    try:
        b = np.broadcast_to(a, lead).astype(np.float64)
    except ValueError:
        raise ValueError(f"alibi_slopes of shape {a.shape} does not broadcast to (..., Hq) = {lead}") from None
    if not np.isfinite(b).all():
        raise ValueError("alibi_slopes must be finite")
    return b


def check_sink_tokens(n: object) -> int:
    """num_sink_tokens: an int >= 0 (the first n keys stay visible beside a window)."""
    if not is_int(n):
        raise TypeError(f"num_sink_tokens must be an int >= 0, got {type(n).__name__}")
    if int(n) < 0:  # type: ignore[call-overload]
        raise ValueError(f"num_sink_tokens must be >= 0, got {n}")
    return int(n)  # type: ignore[call-overload]


def head_sinks(sinks: object, lead: Tuple[int, ...]) -> "np.ndarray[Any, Any]":
    """sinks (one logit per query head, in every row's softmax denominator) broadcast to
    (..., Hq) = `lead`: float64, each finite or -inf (no sink for that head)."""
    a = _array(sinks, "sinks")
    if a.dtype.kind not in "fiu" and a.dtype.name != "bfloat16":
        raise TypeError(f"sinks must be real numbers (one logit per query head), got dtype {a.dtype}")
    try:
        b = np.broadcast_to(a.astype(np.float64), lead)
    except ValueError:
        raise ValueError(f"sinks of shape {a.shape} does not broadcast to (..., Hq) = {lead}") from None
    if np.isnan(b).any() or (b == np.inf).any():
        raise ValueError("sinks must be finite or -inf (no sink), got NaN or +inf")
    return b


class ArraySpec(NamedTuple):
    """An array's shape and dtype without its data: what the problem builder validates when the
    data is not there yet (attend before its projections, Dask before its blocks)."""
    shape: Tuple[int, ...]
    dtype: "np.dtype[Any]"

    @property
    def ndim(self) -> int:
        return len(self.shape)


def cu_seqlens(cu: object, name: str, total: int) -> "np.ndarray[Any, Any]":
    """Cumulative sequence lengths: 1-D integers from 0, non-decreasing, ending at `total` -> int64."""
    a = _array(cu, name)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        what = f"dtype {a.dtype}" if a.ndim == 1 else f"shape {a.shape}"
        raise TypeError(f"{name} must be a 1-D integer array, got {what}")
    if a.size == 0 or a[0] != 0:
        raise ValueError(f"{name} must start at 0 (cumulative sequence lengths), got {a[:4].tolist()}...")
    a = a.astype(np.int64)
    if a.size > 1 and (np.diff(a) < 0).any():
        raise ValueError(f"{name} must be non-decreasing, got {a.tolist()[:16]}")
    if a[-1] != total:
        raise ValueError(f"{name} must end at the total number of rows {total}, got {int(a[-1])}")
    return a


def paged_tables(block_table: object, seq_lens: object, batch: int, num_blocks: int,
                 page_size: int) -> Tuple["np.ndarray[Any, Any]", "np.ndarray[Any, Any]"]:
    """A paged cache's block_table (batch, max_blocks) and seq_lens (batch,): int32 C-order table,
    int64 lengths in [0, max_blocks * page_size]; the entries of the pages a sequence uses
    (its first ceil(seq_lens / page_size)) in [0, num_blocks) -- the rest are never read (vLLM
    pads them with -1)."""
    bt = _array(block_table, "block_table")
    if bt.ndim != 2 or bt.dtype.kind not in "iu":
        what = f"dtype {bt.dtype}" if bt.ndim == 2 else f"shape {bt.shape}"
        raise TypeError(f"block_table must be a 2-D integer array (batch, max_blocks), got {what}")
    if bt.shape[0] != batch:
        raise ValueError(f"block_table has {bt.shape[0]} rows, the query's batch is {batch}: one row per sequence")
    sl = _array(seq_lens, "seq_lens")
    if sl.ndim != 1 or sl.dtype.kind not in "iu":
        what = f"dtype {sl.dtype}" if sl.ndim == 1 else f"shape {sl.shape}"
        raise TypeError(f"seq_lens must be a 1-D integer array (batch,), got {what}")
    if sl.shape[0] != batch:
        raise ValueError(f"seq_lens has {sl.shape[0]} entries, the query's batch is {batch}")
    cap = bt.shape[1] * page_size
    if sl.size and (int(sl.min()) < 0 or int(sl.max()) > cap):
        raise ValueError(f"seq_lens must be in [0, max_blocks * block_size = {bt.shape[1]} * {page_size} = {cap}], "
                         f"got values in [{int(sl.min())}, {int(sl.max())}]")
    used = np.arange(bt.shape[1])[None, :] * page_size < sl.astype(np.int64)[:, None]
    vals = bt[used]
    if vals.size and (int(vals.min()) < 0 or int(vals.max()) >= num_blocks):
        b = int(np.nonzero(((bt < 0) | (bt >= num_blocks)) & used)[0][0])
        raise ValueError(f"block_table row {b} names a block outside [0, num_blocks={num_blocks}) among the "
                         f"{-(-int(sl[b]) // page_size)} pages its seq_lens={int(sl[b])} uses: "
                         f"{bt[b][used[b]].tolist()[:16]}")
    return np.ascontiguousarray(bt, dtype=np.int32), sl.astype(np.int64)
