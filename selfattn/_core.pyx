# cython: language_level=3, cdivision=True
"""The Cython engine between the Python API and the C kernels (src_c/).

It validates every argument before any work, converts dtypes, describes the
broadcast problem as "units" (one per batch x head) with element offsets into
the caller's arrays (no broadcast copies, no transposes), allocates the output
and the kernel's workspace, releases the GIL around the whole computation, and
turns the kernel's status codes into exceptions.
"""
import contextvars
import math
import os
import threading
import warnings

import numpy as np
cimport numpy as cnp
from libc.stdint cimport int64_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from cpython.pythread cimport PyThread_get_thread_ident

from selfattn._selfattn cimport *

cnp.import_array()

cdef extern from "Python.h":
    int PyErr_CheckSignals() except -1

ISA_NAMES = ("generic", "avx2", "avx512", "neon")

cdef object _F32 = np.dtype(np.float32)
cdef object _F64 = np.dtype(np.float64)
cdef object _BOOL = np.dtype(np.bool_)
cdef object _U8 = np.dtype(np.uint8)
cdef int _isa = sa_isa_best()
cdef int _forced_schedule = SA_SCHEDULE_AUTO   # test hook: _force_schedule
cdef long _fail_allocs = 0         # debug hook: make N allocations fail ...
cdef long _fail_after = 0          # ... after letting this many succeed


# ---------------------------------------------------------------- config ----

def _isa_from_name(name):
    if name not in ISA_NAMES:
        raise ValueError(f"unknown instruction set {name!r}; choose one of {ISA_NAMES}")
    return ISA_NAMES.index(name)


def available_isas():
    """Instruction sets this build can run on this CPU, best first."""
    return [ISA_NAMES[i] for i in range(SA_ISA_COUNT - 1, -1, -1) if sa_isa_supported(i)]


# The path a call runs: the one forced in the calling context (selfattn.use_isa sets this
# ContextVar: per thread, per asyncio task), else the process default _isa (SELFATTN_ISA at
# import, then set_isa). Read once per call, so concurrent calls on different paths never
# affect each other.
_forced_isa = contextvars.ContextVar("selfattn_forced_isa", default=None)


cdef int _call_isa() except -1:
    forced = _forced_isa.get()
    return _isa if forced is None else <int> forced


def get_isa():
    """The process default (what a context that forces nothing runs)."""
    return ISA_NAMES[_isa]


def current_isa():
    """The path a call from the calling context runs."""
    return ISA_NAMES[_call_isa()]


def _force_isa(name):
    """Force `name` (None: nothing) in the calling context; returns the ContextVar token."""
    if name is None:
        return _forced_isa.set(None)
    cdef int isa = _isa_from_name(name)
    if not sa_isa_supported(isa):
        raise ValueError(f"instruction set {name!r} is not available on this CPU/build "
                         f"(available: {', '.join(available_isas())})")
    return _forced_isa.set(isa)


def set_isa(name):
    """Make instruction set `name` the process default; returns the previous default."""
    global _isa
    cdef int isa = _isa_from_name(name)
    if not sa_isa_supported(isa):
        raise ValueError(f"instruction set {name!r} is not available on this CPU/build "
                         f"(available: {', '.join(available_isas())})")
    prev = ISA_NAMES[_isa]
    _isa = isa
    return prev


def _env_isa_choice(value, best, supported):
    """What SELFATTN_ISA=`value` selects: (isa index, warning text or None).

    best: the index of the best instruction set of this CPU; supported: the names it runs.
    Pure, so the tests reach every case (an ISA this CPU lacks included) on any machine."""
    name = value.strip().lower()
    where = "SELFATTN_ISA (environment variable, read when selfattn is imported)"
    if not name:
        return best, None
    if name not in ISA_NAMES:
        return best, (f"{where} is {value!r}, not one of {', '.join(ISA_NAMES)}; "
                      f"ignored, using {ISA_NAMES[best]!r}")
    if name not in supported:
        return best, (f"{where} asks for {name!r}, which this CPU does not support "
                      f"(available: {', '.join(supported)}); using {ISA_NAMES[best]!r}")
    return min(ISA_NAMES.index(name), best), None


def _warn_at_import_site(message):
    """Warn as from the line that imported selfattn, not from importlib's frozen frames."""
    import sys
    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    frame = sys._getframe(0)
    while frame is not None:
        fname = frame.f_code.co_filename
        if not (fname.startswith("<frozen") or os.path.abspath(fname).startswith(pkg_dir + os.sep)):
            break
        frame = frame.f_back
    if frame is None:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return
    warnings.warn_explicit(message, RuntimeWarning, frame.f_code.co_filename, frame.f_lineno,
                           module=frame.f_globals.get("__name__"),
                           registry=frame.f_globals.setdefault("__warningregistry__", {}))


def _apply_env_isa():
    """SELFATTN_ISA=<name> at import forces a lower path (never a higher one); a name that is
    unknown or that this CPU lacks warns and keeps the best path."""
    global _isa
    _isa, message = _env_isa_choice(os.environ.get("SELFATTN_ISA", ""), _isa, available_isas())
    if message:
        _warn_at_import_site(message)


_apply_env_isa()


def openmp_enabled():
    return bool(sa_openmp_enabled())


def default_threads():
    return sa_default_threads()


def tile_params(isa, dtype):
    """Tile sizes of the kernel for instruction set `isa` and dtype float32/float64:
    {'vw', 'mr', 'nr', 'nv', 'bq', 'bk'} (see sa_tile_params in src_c/selfattn.h).
    Tests derive their tile-edge cases from these."""
    cdef sa_tile_params p
    cdef int isz = np.dtype(dtype).itemsize
    if np.dtype(dtype) not in (_F32, _F64):
        raise ValueError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
    if sa_tile_params_get(_isa_from_name(isa), isz, &p) != SA_OK:
        raise ValueError(f"instruction set {isa!r} is not compiled into this build")
    return {"vw": p.vw, "mr": p.mr, "nr": p.nr, "nv": p.nv, "bq": p.bq, "bk": p.bk}


def _debug_fail_allocations(n, after=0):
    """Debug hook for tests: after `after` more allocations succeed, the next `n` fail with
    MemoryError. A call allocates its unit table first, then the kernel workspace, so
    after=1 fails the workspace allocation (the scratch the kernel works in)."""
    global _fail_allocs, _fail_after
    _fail_allocs = int(n)
    _fail_after = int(after)


def _force_schedule(name):
    """Test hook: force the kernel's schedule ("shared", "fused", "banded", "decode") for every
    later call, or None for the automatic choice; returns the previous name. "banded" is only
    taken where a window allows it, "decode" where each K/V has at most 16 query rows (the
    automatic choice decides elsewhere)."""
    global _forced_schedule
    names = {None: SA_SCHEDULE_AUTO, "shared": SA_SCHEDULE_SHARED, "fused": SA_SCHEDULE_FUSED,
             "banded": SA_SCHEDULE_BANDED, "decode": SA_SCHEDULE_DECODE}
    if name not in names:
        raise ValueError(f"schedule must be one of {list(names)}, got {name!r}")
    previous = {v: k for k, v in names.items()}[_forced_schedule]
    _forced_schedule = names[name]
    return previous


# ------------------------------------------------------------ validation ----

cdef inline object _as_array(object x, str name):
    if type(x) is np.ndarray:
        return x
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} cannot be read as an array: {exc}") from None


cdef int _compute_typenum(object a, str name) except -1:
    """NPY_FLOAT or NPY_DOUBLE: what an input array computes in; TypeError naming it if nothing."""
    cdef int t = cnp.PyArray_TYPE(a)
    if t == cnp.NPY_DOUBLE:
        return cnp.NPY_DOUBLE
    if t == cnp.NPY_FLOAT or t == cnp.NPY_FLOAT16 or t == cnp.NPY_BOOL or cnp.PyTypeNum_ISINTEGER(t):
        return cnp.NPY_FLOAT
    raise TypeError(f"{name} has dtype {a.dtype}, which selfattn cannot compute "
                    f"(supported: float32, float64; float16, integer and bool compute in float32)")


cdef object _compute_dtype(object dt, str name):
    """float32 or float64: the dtype an input of dtype `dt` computes in."""
    return _F64 if _compute_typenum(np.empty(0, dtype=dt), name) == cnp.NPY_DOUBLE else _F32


cdef object _ready(object a, int typenum):
    """`a` as native-endian `typenum`, aligned (strides a multiple of the itemsize)."""
    if cnp.PyArray_TYPE(a) != typenum or not cnp.PyArray_ISNOTSWAPPED(a):
        return a.astype(_F64 if typenum == cnp.NPY_DOUBLE else _F32)
    if not cnp.PyArray_ISALIGNED(a):
        return a.copy()                      # a fresh allocation is aligned (ascontiguousarray may not copy)
    return a


cdef tuple _broadcast(tuple a, tuple b):
    """NumPy broadcasting of two shapes; None if they do not broadcast."""
    cdef Py_ssize_t na = len(a), nb = len(b), n = max(na, nb), i
    out = [0] * n
    for i in range(n):
        x = a[na - n + i] if na - n + i >= 0 else 1
        y = b[nb - n + i] if nb - n + i >= 0 else 1
        if x == y or y == 1:
            out[i] = x
        elif x == 1:
            out[i] = y
        else:
            return None
    return tuple(out)


cdef int64_t _check_threads(object num_threads) except -1:
    if num_threads is None:
        return sa_default_threads()
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)):
        raise TypeError(f"num_threads must be an int, got {type(num_threads).__name__}")
    if num_threads <= 0:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    return min(int(num_threads), 1 << 16)


cdef double _check_scale(object scale, int64_t E) except? -1.0:
    cdef double sc
    if scale is None:
        return 1.0 / math.sqrt(E) if E > 0 else 1.0
    if isinstance(scale, (str, bytes, bool, np.bool_)):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    try:
        sc = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}") from None
    except OverflowError:
        raise ValueError(f"scale must be finite, got {scale!r}") from None
    if not math.isfinite(sc):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return sc


cdef inline bint _is_int(object x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


cdef tuple _check_window(object window_size):
    """window_size -> (has_window, left, right), -1 = unbounded on that side."""
    if window_size is None:
        return (0, -1, -1)
    sides = (window_size, window_size) if _is_int(window_size) else window_size
    if not isinstance(sides, (tuple, list)) or len(sides) != 2:
        raise TypeError(f"window_size must be None, an int or a (left, right) pair of ints or None, "
                        f"got {window_size!r}")
    out = []
    for side, name in zip(sides, ("left", "right")):
        if side is None:
            out.append(-1)
        elif not _is_int(side):
            raise TypeError(f"window_size {name} side must be an int or None, got {type(side).__name__} "
                            f"({window_size!r})")
        elif side < 0:
            raise ValueError(f"window_size must be >= 0 on each side (None = unbounded), got {window_size!r}")
        else:
            out.append(min(int(side), 1 << 62))
    return (1, out[0], out[1])


cdef int _check_alignment(object alignment) except -1:
    if isinstance(alignment, str) and alignment in ("top_left", "bottom_right"):
        return SA_ALIGN_TOP_LEFT if alignment == "top_left" else SA_ALIGN_BOTTOM_RIGHT
    raise ValueError(f"alignment must be 'top_left' or 'bottom_right', got {alignment!r}")


cdef double _check_softcap(object softcap) except? -1.0:
    """softcap -> 0.0 (none) or a finite value > 0."""
    cdef double c
    if softcap is None:
        return 0.0
    if isinstance(softcap, (str, bytes, bool, np.bool_)):
        raise TypeError(f"softcap must be a real number > 0 or None, got {type(softcap).__name__}")
    try:
        c = float(softcap)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"softcap must be a real number > 0 or None, got {softcap!r}") from None
    if not (c > 0 and math.isfinite(c)):
        raise ValueError(f"softcap must be finite and > 0, got {softcap!r}")
    return c


def _per_unit_lengths(key_lengths, tuple ob, int64_t S, name="key_lengths", what="S"):
    """key_lengths broadcast over the batch dims ob[:-1] -> int64 per unit (C order of ob).
    Also the query rows per batch entry (name="query_lengths", what="L": KVCache's counts)."""
    kl = _as_array(key_lengths, name)
    if kl.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {kl.dtype}")
    batch = ob[:-1]
    try:
        klb = np.broadcast_to(kl, batch)
    except ValueError:
        raise ValueError(f"{name} of shape {kl.shape} does not broadcast to the batch dims {batch} "
                         f"(out.shape[:-3]; a scalar for 2-D/3-D inputs)") from None
    if klb.size and (int(klb.min()) < 0 or int(klb.max()) > S):
        raise ValueError(f"{name} must be in [0, {what}={S}], got values in [{int(klb.min())}, {int(klb.max())}]")
    return np.ascontiguousarray(np.broadcast_to(klb[..., None] if ob else klb, ob), dtype=np.int64).ravel()


def _per_unit_offsets(offsets, tuple ob):
    """query_offsets (any integers) broadcast over the batch dims ob[:-1] -> int64 per unit."""
    off = _as_array(offsets, "query_offsets")
    if off.dtype.kind not in "iu":
        raise TypeError(f"query_offsets must be integers, got dtype {off.dtype}")
    batch = ob[:-1]
    try:
        ob_ = np.broadcast_to(off, batch)
    except ValueError:
        raise ValueError(f"query_offsets of shape {off.shape} does not broadcast to the batch dims {batch}") from None
    return np.ascontiguousarray(np.broadcast_to(ob_[..., None] if ob else ob_, ob), dtype=np.int64).ravel()


def _per_unit_slopes(alibi_slopes, tuple ob):
    """alibi_slopes broadcast to (..., Hq) = ob -> float64 per unit (C order of ob)."""
    a = _as_array(alibi_slopes, "alibi_slopes")
    if a.dtype.kind not in "fiu":
        raise TypeError(f"alibi_slopes must be real numbers, got dtype {a.dtype}")
    try:
        ab = np.broadcast_to(a, ob)
    except ValueError:
        raise ValueError(f"alibi_slopes of shape {a.shape} does not broadcast to (..., Hq) = {ob}") from None
    ab = np.ascontiguousarray(ab, dtype=np.float64).ravel()
    if not np.isfinite(ab).all():
        raise ValueError("alibi_slopes must be finite")
    return ab


def _as_input(x, name):
    """np.asarray with a TypeError naming the argument (for attend)."""
    return _as_array(x, name)


def _compute_dtype_of(dt, name):
    """The dtype an input of dtype `dt` computes in; TypeError naming `name` if none."""
    return _compute_dtype(dt, name)


def _check_args(scale, num_threads):
    """Validate scale and num_threads early (attend checks them before projecting)."""
    _check_threads(num_threads)
    _check_scale(scale, 1)


# ------------------------------------------------------------ workspace -----

cdef void *_alloc(size_t nbytes) except NULL:
    """64-byte aligned allocation; the raw pointer is stored just below."""
    global _fail_allocs, _fail_after
    if _fail_allocs > 0 and _fail_after > 0:
        _fail_after -= 1
    elif _fail_allocs > 0:
        _fail_allocs -= 1
        raise MemoryError(f"selfattn: could not allocate {nbytes} bytes of workspace (debug hook)")
    cdef void *raw = malloc(nbytes + 64 + sizeof(void *))
    if raw == NULL:
        raise MemoryError(f"selfattn: could not allocate {nbytes} bytes of workspace")
    cdef uintptr_t p = (<uintptr_t> raw + sizeof(void *) + 63) & ~(<uintptr_t> 63)
    (<void **> p)[-1] = raw
    return <void *> p


cdef void _free(void *p) noexcept:
    if p != NULL:
        free((<void **> p)[-1])


cdef object _pending_signal_exc = None   # set by _check_signals, main thread only


cdef int _check_signals(void *ctx) noexcept nogil:
    """Called by the kernel on the caller's (main) thread every ~20 ms, so Ctrl-C
    stops a long call. The handler's exception is kept and raised on return."""
    global _pending_signal_exc
    with gil:
        try:
            PyErr_CheckSignals()
        except BaseException as exc:
            _pending_signal_exc = exc
            return 1
    return 0


# ------------------------------------------------------------ the call ------

cdef inline void _batch_strides(object a, int nb, int64_t *dst):
    """Element strides of a's batch dims, right-aligned to nb dims; 0 where broadcast."""
    cdef int nd = cnp.PyArray_NDIM(a) - 2, d, j
    cdef cnp.npy_intp *shape = cnp.PyArray_DIMS(a)
    cdef cnp.npy_intp *strides = cnp.PyArray_STRIDES(a)
    cdef int64_t isz = cnp.PyArray_ITEMSIZE(a)
    for d in range(nb):
        j = d - (nb - nd)
        dst[d] = 0 if (j < 0 or shape[j] == 1) else strides[j] // isz


cdef inline int64_t _stride(object a, int axis):
    """Element stride of axis (negative = from the end); 0 for a missing or size-1 axis."""
    cdef int nd = cnp.PyArray_NDIM(a)
    cdef int ax = axis + nd if axis < 0 else axis
    if ax < 0 or ax >= nd or cnp.PyArray_DIMS(a)[ax] == 1:
        return 0
    return cnp.PyArray_STRIDES(a)[ax] // cnp.PyArray_ITEMSIZE(a)


def _broadcast_error(q, k, v, gqa):
    hint = "" if gqa else " (for grouped-query attention with fewer kv heads, pass enable_gqa=True)"
    return ValueError(f"the leading (batch/head) dims of query {q.shape}, key {k.shape} and value "
                      f"{v.shape} do not broadcast{hint}")


cdef tuple _check_options(object num_threads, object is_causal, object window_size, object alignment,
                          object softcap):
    """The scalar options every entry point shares, validated before any work:
    (num_threads, causal, has_window, window_left, window_right, alignment, softcap)."""
    nt = _check_threads(num_threads)
    has_window, win_left, win_right = _check_window(window_size)
    return (nt, bool(is_causal), has_window, win_left, win_right, _check_alignment(alignment),
            _check_softcap(softcap))


cdef void _apply_options(sa_attn_args *args, tuple opts):
    """Write _check_options' values into args, and the Ctrl-C hook: only the main thread sees
    signals, and which thread that is is asked at call time, not at import."""
    args.num_threads = <int> opts[0]
    args.causal = opts[1]
    args.window = opts[2]
    args.window_left = opts[3]
    args.window_right = opts[4]
    args.alignment = opts[5]
    args.softcap = opts[6]
    args.schedule = _forced_schedule
    args.dout = NULL                       # the backward's fields: set by _set_grads
    args.dq = args.dk = args.dv = NULL
    args.dq_off = args.dk_off = args.dv_off = NULL
    args.dout_sl = args.dout_se = args.dq_sl = args.dq_se = 0
    args.dk_ss = args.dk_se = args.dv_ss = args.dv_se = 0
    args.interrupt = NULL
    if PyThread_get_thread_ident() == threading.main_thread().ident:
        args.interrupt = _check_signals
    args.interrupt_ctx = NULL


cdef tuple _qkv_arrays(object query, object key, object value):
    """query, key, value as arrays, and the type they compute in (float64 if any is)."""
    q = _as_array(query, "query")
    k = _as_array(key, "key")
    v = _as_array(value, "value")
    cdef int tq = _compute_typenum(q, "query"), tk = _compute_typenum(k, "key")
    cdef int tv = _compute_typenum(v, "value")
    # <int>: with numpy < 2's headers enum NPY_TYPES is unsigned and -Wsign-compare (in Python's
    # CFLAGS) warns on the comparisons with the int type numbers
    cdef int typenum = cnp.NPY_DOUBLE if <int>cnp.NPY_DOUBLE in (tq, tk, tv) else cnp.NPY_FLOAT
    return q, k, v, typenum


def sdpa(query, key, value, *, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
         return_lse=False, num_threads=None, window_size=None, alignment="top_left", key_lengths=None,
         alibi_slopes=None, softcap=None, out=None, schedule_only=False, _bwd=None, query_lengths=None,
         query_offsets=None):
    """Validate, then run the fused kernel. See selfattn.scaled_dot_product_attention.

    Keyword-only past the arrays, so a new parameter can never shift the others.
    schedule_only=True validates and returns the schedule the kernel would use
    ({'threads', 'fused', 'compute_tasks', 'group'}) without computing (for tests).
    _bwd=(out, lse, dout): run the backward instead (see sdpa_bwd).
    query_lengths (forward only; KVCache's ragged counts): like key_lengths, the query rows of each
    batch entry, its first ones; with alignment="bottom_right" they are the last positions of
    that entry's keys. The other rows get zeros (lse -inf). One kernel call for the whole batch.
    query_offsets (selfattn.dask's blocks): per batch entry, like key_lengths, the position of
    query row 0 among that entry's keys (any integer; row i sits at query_offsets + i): it replaces
    the alignment, so a block of a longer problem keeps its rows' positions (causal, windows, ALiBi)."""
    # -- scalars first: cheap, and errors come before any work
    opts = _check_options(num_threads, is_causal, window_size, alignment, softcap)

    # -- arrays and dtypes
    q, k, v, typenum_ = _qkv_arrays(query, key, value)
    cdef int typenum = typenum_
    dt = _F64 if typenum == cnp.NPY_DOUBLE else _F32
    for a, nm in ((q, "query"), (k, "key"), (v, "value")):
        if cnp.PyArray_NDIM(a) < 2:
            raise ValueError(f"{nm} must have at least 2 dims (..., {'L' if nm == 'query' else 'S'}, "
                             f"{'Ev' if nm == 'value' else 'E'}), got shape {a.shape}")
    cdef int64_t L = q.shape[-2], E = q.shape[-1], S = k.shape[-2], Ev = v.shape[-1]
    if k.shape[-1] != E:
        raise ValueError(f"query and key must have the same last dim E: query {q.shape} has E={E}, "
                         f"key {k.shape} has E={k.shape[-1]}")
    if v.shape[-2] != S:
        raise ValueError(f"key and value must have the same number of keys S (dim -2): key {k.shape}, "
                         f"value {v.shape}")
    cdef double sc = _check_scale(scale, E)

    # -- batch (and head) dims: broadcast, or grouped-query heads
    cdef int64_t group = 1
    qb, kb, vb = q.shape[:-2], k.shape[:-2], v.shape[:-2]
    gqa = bool(enable_gqa) and len(qb) >= 1 and len(kb) >= 1 and len(vb) >= 1
    if gqa:
        hq, hk, hv = qb[-1], kb[-1], vb[-1]
        if hk != hv:
            raise ValueError(f"enable_gqa: key {k.shape} and value {v.shape} must have the same number "
                             f"of heads (dim -3)")
        if hk == 0 or hq % hk:
            raise ValueError(f"enable_gqa: query heads Hq={hq} must be a multiple of key/value heads "
                             f"H={hk}: query {q.shape}, key {k.shape}, value {v.shape}")
        group = hq // hk
        kvb = _broadcast(kb, vb)
        ob = _broadcast(qb, kvb[:-1] + (hq,)) if kvb is not None else None
    else:
        kvb = _broadcast(kb, vb)
        ob = _broadcast(qb, kvb) if kvb is not None else None
    if ob is None:
        raise _broadcast_error(q, k, v, gqa)
    cdef int nb = len(ob), nkb = len(kvb)

    # -- mask: read in place with its own strides, never broadcast out
    cdef int mask_kind = SA_MASK_NONE
    m = None
    if attn_mask is not None:
        m = _as_array(attn_mask, "attn_mask")
        mdt = m.dtype
        if mdt == _BOOL:
            mask_kind = SA_MASK_BOOL
            m = m.view(_U8)
        elif mdt.kind == "f" and mdt.itemsize <= 8:
            if mdt.itemsize == 8:
                mask_kind = SA_MASK_F64
                m = _ready(m, cnp.NPY_DOUBLE)
            else:
                mask_kind = SA_MASK_F32
                m = _ready(m, cnp.NPY_FLOAT)
        else:
            raise TypeError(f"attn_mask must be bool (True = takes part) or floating (added to the "
                            f"scores), got dtype {mdt}")
        full = tuple(ob) + (L, S)
        ok = m.ndim <= len(full) and all(
            md == 1 or md == fd for md, fd in zip(m.shape[::-1], full[::-1]))
        if not ok:
            raise ValueError(f"attn_mask of shape {m.shape} does not broadcast to (..., Hq, L, S) = {full}")

    # -- structured masks: per-unit lengths and slopes (validated before any work)
    k_len = _per_unit_lengths(key_lengths, tuple(ob), S) if key_lengths is not None else None
    q_len = None
    if query_lengths is not None:
        if _bwd is not None or out is not None:
            raise ValueError("query_lengths is for the forward into a new output only")
        q_len = _per_unit_lengths(query_lengths, tuple(ob), L, "query_lengths", "L")
    q_pos = _per_unit_offsets(query_offsets, tuple(ob)) if query_offsets is not None else None
    slopes = _per_unit_slopes(alibi_slopes, tuple(ob)) if alibi_slopes is not None else None

    q = _ready(q, typenum)
    k = _ready(k, typenum)
    v = _ready(v, typenum)

    # -- outputs
    out_shape = tuple(ob) + (L, Ev)
    if q_len is not None:                # rows past a unit's query_lengths are never written
        out = np.zeros(out_shape, dtype=dt)
        lse = np.full(tuple(ob) + (L,), -np.inf, dtype=dt) if return_lse else None
    else:
        if out is None:
            out = np.empty(out_shape, dtype=dt)
        elif out.shape != out_shape or out.dtype != dt:
            raise ValueError(f"out must have shape {out_shape} and dtype {dt}, got {out.shape} {out.dtype}")
        lse = np.empty(tuple(ob) + (L,), dtype=dt) if return_lse else None
    dout = dq = dk = dv = None
    if _bwd is not None:                 # the backward: the forward's out and lse, the cotangent
        out, lse, dout = _bwd
        for a, nm, shp in ((out, "out", out_shape), (lse, "lse", tuple(ob) + (L,)), (dout, "grad_out", out_shape)):
            if not isinstance(a, np.ndarray) or a.shape != shp or a.dtype != dt:
                raise ValueError(f"{nm} must be an array of shape {shp} and dtype {dt}, got "
                                 f"{getattr(a, 'shape', type(a).__name__)} {getattr(a, 'dtype', '')}")
        out = np.ascontiguousarray(out)       # dout is read with out's offsets: same layout
        dout = np.ascontiguousarray(_ready(dout, typenum))
        dq = np.zeros(tuple(ob) + (L, E), dtype=dt)
        dk = np.zeros(tuple(kvb) + (S, E), dtype=dt)
        dv = np.zeros(tuple(kvb) + (S, Ev), dtype=dt)

    cdef int64_t n_units = 1, n_kv = 1
    for x in ob:
        n_units *= x
    for x in kvb:
        n_kv *= x
    if n_units == 0 or L == 0 or (Ev == 0 and lse is None):
        if schedule_only:
            return {"threads": 0, "fused": False, "compute_tasks": 0, "group": 0}
        if dout is not None:
            return dq, dk, dv
        return (out, lse) if return_lse else out

    # -- unit tables: offsets of each (batch, head) unit and its distinct K/V
    cdef int64_t *tab = <int64_t *> _alloc(sizeof(int64_t) * (6 * n_units + 3 * n_kv + 1 + 12 * (nb + nkb + 1)))
    cdef int64_t *q_off = tab
    cdef int64_t *o_off = q_off + n_units
    cdef int64_t *l_off = o_off + n_units
    cdef int64_t *m_off = l_off + n_units
    cdef int64_t *u_kv = m_off + n_units
    cdef int64_t *kv_units = u_kv + n_units
    cdef int64_t *kv_k = kv_units + n_units
    cdef int64_t *kv_v = kv_k + n_kv
    cdef int64_t *kv_start = kv_v + n_kv
    cdef int64_t *st = kv_start + n_kv + 1          # per-dim tables: 7 arrays of nb, then 4 of nkb
    cdef int64_t *qs = st                  # element strides per output batch dim: query
    cdef int64_t *os_ = st + nb            # out
    cdef int64_t *ls = st + 2 * nb         # lse
    cdef int64_t *ms = st + 3 * nb         # mask
    cdef int64_t *kvs = st + 4 * nb        # index of the distinct K/V
    cdef int64_t *idx = st + 5 * nb        # multi-index of the current unit
    cdef int64_t *ks = st + 6 * nb         # per kv batch dim: key strides
    cdef int64_t *vs = ks + nkb            # value strides
    cdef int64_t *kidx = vs + nkb          # multi-index of the current K/V
    cdef int64_t *kvshape = kidx + nkb
    cdef int64_t *oshape = kvshape + nkb
    cdef sa_attn_args args
    cdef int status, d, j, isa = _call_isa(), isz = dt.itemsize
    cdef int64_t u, off_q, off_o, off_l, off_m, off_kv, ii, c
    memset(&args, 0, sizeof(args))         # fields not set below stay "none" (selfattn.h)
    try:
        _batch_strides(q, nb, qs)
        _batch_strides(out, nb, os_)
        for d in range(nb):
            oshape[d] = ob[d]
            idx[d] = 0
            ls[d] = 0
            ms[d] = 0
            kvs[d] = 0
        if lse is not None:
            _batch_strides(lse[..., None], nb, ls)
        if m is not None:
            for d in range(nb):            # mask batch dims, right-aligned; missing/1 -> 0
                j = d - (nb - (m.ndim - 2))
                ms[d] = 0 if (j < 0 or m.shape[j] == 1) else m.strides[j] // m.itemsize
        # contiguous strides of the kv batch shape, mapped onto the output batch dims
        c = 1
        for d in range(nkb - 1, -1, -1):
            kvshape[d] = kvb[d]
            j = d + (nb - nkb)
            if kvb[d] != 1:
                kvs[j] = c
            c *= kvb[d]
        for u in range(n_units):
            off_q = off_o = off_l = off_m = off_kv = 0
            for d in range(nb):
                ii = idx[d]
                off_q += ii * qs[d]
                off_o += ii * os_[d]
                off_l += ii * ls[d]
                off_m += ii * ms[d]
                if d == nb - 1 and group > 1:
                    ii = ii // group        # query head h reads kv head h // group
                off_kv += ii * kvs[d]
            q_off[u] = off_q
            o_off[u] = off_o
            l_off[u] = off_l
            m_off[u] = off_m
            u_kv[u] = off_kv
            d = nb - 1
            while d >= 0:
                idx[d] += 1
                if idx[d] < oshape[d]:
                    break
                idx[d] = 0
                d -= 1
        # offsets of each distinct K/V
        _batch_strides(k, nkb, ks)
        _batch_strides(v, nkb, vs)
        for d in range(nkb):
            kidx[d] = 0
        for u in range(n_kv):
            off_q = off_o = 0
            for d in range(nkb):
                off_q += kidx[d] * ks[d]
                off_o += kidx[d] * vs[d]
            kv_k[u] = off_q
            kv_v[u] = off_o
            d = nkb - 1
            while d >= 0:
                kidx[d] += 1
                if kidx[d] < kvshape[d]:
                    break
                kidx[d] = 0
                d -= 1
        # units grouped by K/V (counting sort)
        for u in range(n_kv + 1):
            kv_start[u] = 0
        for u in range(n_units):
            kv_start[u_kv[u] + 1] += 1
        for u in range(n_kv):
            kv_start[u + 1] += kv_start[u]
        for u in range(n_units):
            kv_units[kv_start[u_kv[u]]] = u
            kv_start[u_kv[u]] += 1
        for u in range(n_kv, 0, -1):
            kv_start[u] = kv_start[u - 1]
        kv_start[0] = 0

        args.n_units = n_units
        args.n_kv = n_kv
        args.L = L
        args.S = S
        args.E = E
        args.Ev = Ev
        args.q = cnp.PyArray_DATA(q)
        args.q_off = q_off
        args.q_sl = _stride(q, -2)
        args.q_se = _stride(q, -1)
        args.k = cnp.PyArray_DATA(k)
        args.kv_k_off = kv_k
        args.k_ss = _stride(k, -2)
        args.k_se = _stride(k, -1)
        args.v = cnp.PyArray_DATA(v)
        args.kv_v_off = kv_v
        args.v_ss = _stride(v, -2)
        args.v_se = _stride(v, -1)
        args.kv_start = kv_start
        args.kv_units = kv_units
        args.mask_kind = mask_kind
        args.mask = cnp.PyArray_DATA(m) if m is not None else NULL
        args.mask_off = m_off
        args.mask_sl = _stride(m, -2) if (m is not None and m.ndim >= 2) else 0
        args.mask_ss = _stride(m, -1) if (m is not None and m.ndim >= 1) else 0
        args.out = cnp.PyArray_DATA(out)
        args.out_off = o_off
        args.out_sl = _stride(out, -2)
        args.out_se = _stride(out, -1)
        args.lse = cnp.PyArray_DATA(lse) if lse is not None else NULL
        args.lse_off = l_off
        args.lse_sl = _stride(lse, -1) if lse is not None else 0
        args.scale = sc
        args.q_len = <const int64_t *> cnp.PyArray_DATA(q_len) if q_len is not None else NULL
        args.k_len = <const int64_t *> cnp.PyArray_DATA(k_len) if k_len is not None else NULL
        args.q_pos = <const int64_t *> cnp.PyArray_DATA(q_pos) if q_pos is not None else NULL
        args.alibi_slope = <const double *> cnp.PyArray_DATA(slopes) if slopes is not None else NULL
        _apply_options(&args, opts)
        if dout is not None:
            # gradients: dq per unit (C order of the output batch dims), dk and dv per kv unit
            # (C order of the kv batch dims), contiguous; the caller sums them back to the inputs' shapes
            dq_off = np.arange(n_units, dtype=np.int64) * (L * E)
            dk_off = np.arange(n_kv, dtype=np.int64) * (S * E)
            dv_off = np.arange(n_kv, dtype=np.int64) * (S * Ev)
            _set_grads(&args, dout, dq, dq_off, dk, dk_off, dv, dv_off)

        if schedule_only:
            return _schedule_of(&args, isa, isz, dout is not None)
        _run_kernel(&args, isa, isz, dout is not None)
    finally:
        _free(tab)
    if dout is not None:
        return dq, dk, dv
    return (out, lse) if return_lse else out


cdef void _set_grads(sa_attn_args *args, object dout, object dq, object dq_off, object dk, object dk_off,
                     object dv, object dv_off):
    """The backward's fields of args: the cotangent (laid out like out) and the gradients
    (3-D or more, rows and columns the last two dims) with per-unit / per-kv-unit offsets."""
    args.dout = cnp.PyArray_DATA(dout)
    args.dout_sl = _stride(dout, -2)
    args.dout_se = _stride(dout, -1)
    args.dq = cnp.PyArray_DATA(dq)
    args.dq_off = <const int64_t *> cnp.PyArray_DATA(dq_off)
    args.dq_sl = _stride(dq, -2)
    args.dq_se = _stride(dq, -1)
    args.dk = cnp.PyArray_DATA(dk)
    args.dk_off = <const int64_t *> cnp.PyArray_DATA(dk_off)
    args.dk_ss = _stride(dk, -2)
    args.dk_se = _stride(dk, -1)
    args.dv = cnp.PyArray_DATA(dv)
    args.dv_off = <const int64_t *> cnp.PyArray_DATA(dv_off)
    args.dv_ss = _stride(dv, -2)
    args.dv_se = _stride(dv, -1)


def sdpa_bwd(query, key, value, out, lse, grad_out, *, attn_mask=None, is_causal=False, scale=None,
             enable_gqa=False, num_threads=None, window_size=None, alignment="top_left", key_lengths=None,
             alibi_slopes=None, softcap=None, schedule_only=False):
    """The fused backward of sdpa: out and lse are what sdpa(..., return_lse=True) returned for
    the same arguments, grad_out the cotangent (out's shape and dtype). Returns (dq, dk, dv):
    dq with the output's batch dims (..., Hq, L, E), dk and dv with the broadcast batch dims of
    key and value (..., H, S, E / Ev); selfattn.autograd sums them back to the inputs' shapes."""
    return sdpa(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                enable_gqa=enable_gqa, return_lse=True, num_threads=num_threads, window_size=window_size,
                alignment=alignment, key_lengths=key_lengths, alibi_slopes=alibi_slopes, softcap=softcap,
                schedule_only=schedule_only, _bwd=(out, lse, grad_out))


cdef int _run_kernel(sa_attn_args *args, int isa, int isz, bint bwd=False) except -1:
    """Workspace, the kernel (forward, or backward) without the GIL, status codes -> exceptions
    (Ctrl-C included)."""
    global _pending_signal_exc
    cdef size_t ws_bytes = 0
    cdef void *ws = NULL
    cdef int status = (sa_attn_bwd_workspace_size(args, isa, isz, &ws_bytes) if bwd
                       else sa_attn_workspace_size(args, isa, isz, &ws_bytes))
    if status != SA_OK:
        raise RuntimeError(f"selfattn: kernel rejected the problem (status {status})")
    ws = _alloc(ws_bytes)
    try:
        with nogil:
            if bwd and isz == 4:
                status = sa_attn_bwd_f32(args, isa, ws, ws_bytes)
            elif bwd:
                status = sa_attn_bwd_f64(args, isa, ws, ws_bytes)
            elif isz == 4:
                status = sa_attn_fwd_f32(args, isa, ws, ws_bytes)
            else:
                status = sa_attn_fwd_f64(args, isa, ws, ws_bytes)
        if status == SA_ERR_INTERRUPTED:
            exc, _pending_signal_exc = _pending_signal_exc, None
            raise exc if exc is not None else KeyboardInterrupt()
        if status != SA_OK:
            raise RuntimeError(f"selfattn: kernel failed (status {status})")
    finally:
        _free(ws)
    return 0


def merge(list outs, list lses, num_threads=None):
    """The log-sum-exp merge in C (merge.c): outs, n arrays of one float dtype and shape
    (..., L, Ev); lses, n arrays (..., L) of that dtype. Validated by selfattn.merge; here they
    are made contiguous (no copy when they are) and handed over by pointer."""
    cdef int64_t n = len(outs), nt = _check_threads(num_threads), i
    if n < 1 or len(lses) != n:
        raise ValueError("merge needs n >= 1 outs and as many lses")
    dt = outs[0].dtype
    shape = outs[0].shape
    cdef int64_t Ev = shape[-1], rows = 1
    for d in shape[:-1]:
        rows *= d
    os_ = [np.ascontiguousarray(o) for o in outs]
    ls_ = [np.ascontiguousarray(l) for l in lses]
    out = np.empty(shape, dtype=dt)
    lse = np.empty(shape[:-1], dtype=dt)
    cdef void **po = <void **> _alloc(2 * n * sizeof(void *))
    cdef void **pl = po + n
    cdef size_t ws_bytes = sa_merge_workspace_size(n, Ev, <int> nt)
    cdef void *ws = NULL
    cdef int status
    cdef bint f32 = dt == _F32
    cdef void *pout = cnp.PyArray_DATA(out)
    cdef void *plse = cnp.PyArray_DATA(lse)
    try:
        for i in range(n):
            po[i] = cnp.PyArray_DATA(os_[i])
            pl[i] = cnp.PyArray_DATA(ls_[i])
        ws = _alloc(ws_bytes if ws_bytes > 0 else 64)
        with nogil:
            if f32:
                status = sa_merge_f32(n, rows, Ev, <const float *const *> po, <const float *const *> pl,
                                      <float *> pout, <float *> plse, ws, ws_bytes, <int> nt)
            else:
                status = sa_merge_f64(n, rows, Ev, <const double *const *> po, <const double *const *> pl,
                                      <double *> pout, <double *> plse, ws, ws_bytes, <int> nt)
        if status != SA_OK:
            raise RuntimeError(f"selfattn: merge failed (status {status})")
    finally:
        _free(ws)
        _free(po)
    return out, lse


cdef object _schedule_of(sa_attn_args *args, int isa, int isz, bint bwd=False):
    cdef sa_schedule sched
    cdef size_t ws_bytes = 0
    cdef int status = (sa_attn_bwd_schedule(args, isa, isz, &sched) if bwd
                       else sa_attn_schedule(args, isa, isz, &sched))
    if status == SA_OK:
        status = (sa_attn_bwd_workspace_size(args, isa, isz, &ws_bytes) if bwd
                  else sa_attn_workspace_size(args, isa, isz, &ws_bytes))
    if status != SA_OK:
        raise RuntimeError(f"selfattn: kernel rejected the problem (status {status})")
    return {"threads": sched.threads, "fused": bool(sched.fused), "banded": bool(sched.banded),
            "decode": bool(sched.decode),
            "compute_tasks": sched.compute_tasks, "group": sched.key_chunks if bwd else sched.packed_kv,
            "ring_blocks": sched.ring_blocks,
            "workspace_bytes": ws_bytes}


def _check_cu_seqlens(cu, str name, int64_t total):
    a = _as_array(cu, name)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be a 1-D integer array, got {'dtype ' + str(a.dtype) if a.ndim == 1 else 'shape ' + str(a.shape)}")
    if a.size == 0 or a[0] != 0:
        raise ValueError(f"{name} must start at 0 (cumulative sequence lengths), got {a[:4].tolist()}...")
    a = a.astype(np.int64)
    if a.size > 1 and (np.diff(a) < 0).any():
        raise ValueError(f"{name} must be non-decreasing, got {a.tolist()[:16]}")
    if a[-1] != total:
        raise ValueError(f"{name} must end at the total number of rows {total}, got {int(a[-1])}")
    return a


def varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, *, scale=None, is_causal=False, window_size=None,
           alignment="top_left", alibi_slopes=None, softcap=None, enable_gqa=False, return_lse=False,
           num_threads=None, schedule_only=False, _bwd=None):
    """Packed variable-length batches. See selfattn.varlen_attention. _bwd=(out, lse, dout):
    the backward instead (see varlen_bwd)."""
    opts = _check_options(num_threads, is_causal, window_size, alignment, softcap)
    q, k, v, typenum_ = _qkv_arrays(query, key, value)
    cdef int typenum = typenum_
    dt = _F64 if typenum == cnp.NPY_DOUBLE else _F32
    for a, nm, dims in ((q, "query", "(Hq, total_q, E)"), (k, "key", "(H, total_k, E)"),
                        (v, "value", "(H, total_k, Ev)")):
        if cnp.PyArray_NDIM(a) != 3:
            raise ValueError(f"varlen_attention: {nm} must be 3-D {dims}, got shape {a.shape}")
    cdef int64_t Hq = q.shape[0], Tq = q.shape[1], E = q.shape[2]
    cdef int64_t H = k.shape[0], Tk = k.shape[1], Ev = v.shape[2]
    if k.shape[2] != E:
        raise ValueError(f"query and key must have the same last dim E: query {q.shape}, key {k.shape}")
    if v.shape[0] != H or v.shape[1] != Tk:
        raise ValueError(f"key {k.shape} and value {v.shape} must have the same heads and rows (H, total_k)")
    if enable_gqa:
        if H == 0 or Hq % H:
            raise ValueError(f"enable_gqa: query heads Hq={Hq} must be a multiple of key/value heads H={H}")
    elif Hq != H:
        raise ValueError(f"query has {Hq} heads and key/value {H}: they must be equal "
                         f"(for grouped-query attention with fewer kv heads, pass enable_gqa=True)")
    cdef double sc = _check_scale(scale, E)
    cu_q = _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", Tq)
    cu_k = _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", Tk)
    if cu_q.size != cu_k.size:
        raise ValueError(f"cu_seqlens_q ({cu_q.size - 1} sequences) and cu_seqlens_k ({cu_k.size - 1}) must "
                         f"describe the same number of sequences")
    slopes_h = _per_unit_slopes(alibi_slopes, (Hq,)) if alibi_slopes is not None else None

    cdef int64_t B = cu_q.size - 1, group = Hq // H if H else 1
    out = np.empty((Hq, Tq, Ev), dtype=dt)
    lse = np.empty((Hq, Tq), dtype=dt) if return_lse else None
    dout = dq = dk = dv = None
    if _bwd is not None:
        out, lse, dout = _bwd
        for a, nm, shp in ((out, "out", (Hq, Tq, Ev)), (lse, "lse", (Hq, Tq)), (dout, "grad_out", (Hq, Tq, Ev))):
            if not isinstance(a, np.ndarray) or a.shape != shp or a.dtype != dt:
                raise ValueError(f"{nm} must be an array of shape {shp} and dtype {dt}, got "
                                 f"{getattr(a, 'shape', type(a).__name__)} {getattr(a, 'dtype', '')}")
        out = np.ascontiguousarray(out)
        dout = np.ascontiguousarray(_ready(dout, typenum))
        dq = np.zeros((Hq, Tq, E), dtype=dt)
        dk = np.zeros((H, Tk, E), dtype=dt)
        dv = np.zeros((H, Tk, Ev), dtype=dt)
    if Hq == 0 or B == 0 or Tq == 0 or (Ev == 0 and lse is None):
        if schedule_only:
            return {"threads": 0, "fused": False, "compute_tasks": 0, "group": 0}
        if dout is not None:
            return dq, dk, dv
        return (out, lse) if return_lse else out
    q = _ready(q, typenum)
    k = _ready(k, typenum)
    v = _ready(v, typenum)

    # units: (query head h, sequence b) -> u = h * B + b; kv units: (kv head, b) -> g = hk * B + b
    Lb, Sb = np.diff(cu_q), np.diff(cu_k)
    hs, bs = np.arange(Hq, dtype=np.int64)[:, None], np.arange(B, dtype=np.int64)[None, :]
    isz_ = dt.itemsize
    def off(a, rows_start, h):   # element offset of (head h, first row of the sequence)
        return (h * (a.strides[0] // a.itemsize) + rows_start[None, :] * (a.strides[1] // a.itemsize)).astype(np.int64)
    q_off = np.ascontiguousarray(off(q, cu_q[:-1], hs).reshape(-1))
    o_off = np.ascontiguousarray(off(out, cu_q[:-1], hs).reshape(-1))
    l_off = np.ascontiguousarray(off(lse, cu_q[:-1], hs).reshape(-1)) if lse is not None else np.zeros(Hq * B, np.int64)
    hk = np.arange(H, dtype=np.int64)[:, None]
    kv_k = np.ascontiguousarray(off(k, cu_k[:-1], hk).reshape(-1))
    kv_v = np.ascontiguousarray(off(v, cu_k[:-1], hk).reshape(-1))
    kv_start = np.arange(H * B + 1, dtype=np.int64) * group
    # the units of g = hk * B + b are query heads hk*group .. hk*group+group-1 at sequence b
    kv_units = np.ascontiguousarray(((hk[:, :, None] * group + np.arange(group)[None, None, :]) * B
                                     + bs[:, :, None]).reshape(-1), dtype=np.int64)
    q_len = np.ascontiguousarray(np.broadcast_to(Lb[None, :], (Hq, B)).reshape(-1), dtype=np.int64)
    k_len = np.ascontiguousarray(np.broadcast_to(Sb[None, :], (Hq, B)).reshape(-1), dtype=np.int64)
    slopes = (np.ascontiguousarray(np.broadcast_to(slopes_h[:, None], (Hq, B)).reshape(-1))
              if slopes_h is not None else None)
    zero = np.zeros(1, np.int64)

    cdef sa_attn_args args
    memset(&args, 0, sizeof(args))         # fields not set below stay "none" (selfattn.h)
    args.n_units = Hq * B
    args.n_kv = H * B
    args.L = int(Lb.max()) if B else 0
    args.S = int(Sb.max()) if B else 0
    args.E = E
    args.Ev = Ev
    args.q = cnp.PyArray_DATA(q)
    args.q_off = <const int64_t *> cnp.PyArray_DATA(q_off)
    args.q_sl = q.strides[1] // q.itemsize
    args.q_se = q.strides[2] // q.itemsize
    args.k = cnp.PyArray_DATA(k)
    args.kv_k_off = <const int64_t *> cnp.PyArray_DATA(kv_k)
    args.k_ss = k.strides[1] // k.itemsize
    args.k_se = k.strides[2] // k.itemsize
    args.v = cnp.PyArray_DATA(v)
    args.kv_v_off = <const int64_t *> cnp.PyArray_DATA(kv_v)
    args.v_ss = v.strides[1] // v.itemsize
    args.v_se = v.strides[2] // v.itemsize
    args.kv_start = <const int64_t *> cnp.PyArray_DATA(kv_start)
    args.kv_units = <const int64_t *> cnp.PyArray_DATA(kv_units)
    args.mask_kind = SA_MASK_NONE
    args.mask = NULL
    args.mask_off = <const int64_t *> cnp.PyArray_DATA(zero)
    args.mask_sl = 0
    args.mask_ss = 0
    args.out = cnp.PyArray_DATA(out)
    args.out_off = <const int64_t *> cnp.PyArray_DATA(o_off)
    args.out_sl = out.strides[1] // out.itemsize
    args.out_se = out.strides[2] // out.itemsize
    args.lse = cnp.PyArray_DATA(lse) if lse is not None else NULL
    args.lse_off = <const int64_t *> cnp.PyArray_DATA(l_off)
    args.lse_sl = lse.strides[1] // lse.itemsize if lse is not None else 0
    args.scale = sc
    args.q_len = <const int64_t *> cnp.PyArray_DATA(q_len)
    args.k_len = <const int64_t *> cnp.PyArray_DATA(k_len)
    args.alibi_slope = <const double *> cnp.PyArray_DATA(slopes) if slopes is not None else NULL
    _apply_options(&args, opts)
    if dout is not None:                 # packed gradients: each unit / kv unit at its sequence's rows
        dq_off = np.ascontiguousarray(off(dq, cu_q[:-1], hs).reshape(-1))
        dk_off = np.ascontiguousarray(off(dk, cu_k[:-1], hk).reshape(-1))
        dv_off = np.ascontiguousarray(off(dv, cu_k[:-1], hk).reshape(-1))
        _set_grads(&args, dout, dq, dq_off, dk, dk_off, dv, dv_off)
    cdef int isa_ = _call_isa()
    if schedule_only:
        return _schedule_of(&args, isa_, isz_, dout is not None)
    _run_kernel(&args, isa_, isz_, dout is not None)
    if dout is not None:
        return dq, dk, dv
    return (out, lse) if return_lse else out


def varlen_bwd(query, key, value, cu_seqlens_q, cu_seqlens_k, out, lse, grad_out, *, scale=None,
               is_causal=False, window_size=None, alignment="top_left", alibi_slopes=None, softcap=None,
               enable_gqa=False, num_threads=None, schedule_only=False):
    """The fused backward of varlen: (dq, dk, dv) in the packed layouts of query, key, value."""
    return varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, scale=scale, is_causal=is_causal,
                  window_size=window_size, alignment=alignment, alibi_slopes=alibi_slopes, softcap=softcap,
                  enable_gqa=enable_gqa, return_lse=True, num_threads=num_threads,
                  schedule_only=schedule_only, _bwd=(out, lse, grad_out))
