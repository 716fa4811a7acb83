# cython: language_level=3, cdivision=True
"""The Cython engine between the Python API and the C kernels (src_c/).

It validates every argument before any work, converts dtypes, describes the
broadcast problem as "units" (one per batch x head) with element offsets into
the caller's arrays (no broadcast copies, no transposes), allocates the output
and the kernel's workspace, releases the GIL around the whole computation, and
turns the kernel's status codes into exceptions.
"""
import contextvars
import os
import threading
import warnings

import numpy as np
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from libc.math cimport sqrt
from cpython.pythread cimport PyThread_get_thread_ident
from cpython.contextvars cimport get_value

from selfattn._selfattn cimport *
from selfattn import _spec
from selfattn._spec import ArraySpec

cnp.import_array()

cdef extern from "Python.h":
    int PyErr_CheckSignals() except -1

ISA_NAMES = ("generic", "avx2", "avx512", "neon", "avx512bf16", "neonbf16", "avx512amx")   # sa_isa values

cdef object _F32 = np.dtype(np.float32)
cdef object _F64 = np.dtype(np.float64)
cdef object _BOOL = np.dtype(np.bool_)
cdef object _U8 = np.dtype(np.uint8)
cdef object _F16 = np.dtype(np.float16)
cdef object _I8 = np.dtype(np.int8)
cdef int _isa = sa_isa_best()
cdef int _forced_schedule = SA_SCHEDULE_AUTO   # test hook: _force_schedule
cdef int SA_DECODE_ROWS = 16     # src_c/attn_internal.h: SA_DECODE_MAX_ROWS (paged: the decode schedule)
cdef long _fail_allocs = 0         # debug hook: make N allocations fail ...
cdef long _fail_after = 0          # ... after letting this many succeed

# score_mod programs: the C opcodes by name (selfattn/_scoremod.py lowers to them) and the node
# layout (sa_sm_node), so that the Python side never restates a number the header defines
SCORE_MOD_OPS = {
    "score": SA_SM_SCORE,
    "fconst": SA_SM_FCONST,
    "fadd": SA_SM_FADD,
    "fsub": SA_SM_FSUB,
    "fmul": SA_SM_FMUL,
    "fdiv": SA_SM_FDIV,
    "fpow": SA_SM_FPOW,
    "fmin": SA_SM_FMIN,
    "fmax": SA_SM_FMAX,
    "fneg": SA_SM_FNEG,
    "fabs": SA_SM_FABS,
    "fexp": SA_SM_FEXP,
    "flog": SA_SM_FLOG,
    "ftanh": SA_SM_FTANH,
    "fsqrt": SA_SM_FSQRT,
    "ffloor": SA_SM_FFLOOR,
    "ffloordiv": SA_SM_FFLOORDIV,
    "fmod": SA_SM_FMOD,
    "fwhere": SA_SM_FWHERE,
    "fcast": SA_SM_FCAST,
    "fload": SA_SM_FLOAD,
    "b": SA_SM_B,
    "h": SA_SM_H,
    "q": SA_SM_Q,
    "kv": SA_SM_KV,
    "iconst": SA_SM_ICONST,
    "iadd": SA_SM_IADD,
    "isub": SA_SM_ISUB,
    "imul": SA_SM_IMUL,
    "ifloordiv": SA_SM_IFLOORDIV,
    "imod": SA_SM_IMOD,
    "ipow": SA_SM_IPOW,
    "imin": SA_SM_IMIN,
    "imax": SA_SM_IMAX,
    "ineg": SA_SM_INEG,
    "iabs": SA_SM_IABS,
    "iwhere": SA_SM_IWHERE,
    "itrunc": SA_SM_ITRUNC,
    "iload": SA_SM_ILOAD,
    "flt": SA_SM_FLT,
    "fle": SA_SM_FLE,
    "fgt": SA_SM_FGT,
    "fge": SA_SM_FGE,
    "feq": SA_SM_FEQ,
    "fne": SA_SM_FNE,
    "ilt": SA_SM_ILT,
    "ile": SA_SM_ILE,
    "igt": SA_SM_IGT,
    "ige": SA_SM_IGE,
    "ieq": SA_SM_IEQ,
    "ine": SA_SM_INE,
    "and": SA_SM_AND,
    "or": SA_SM_OR,
    "xor": SA_SM_XOR,
    "not": SA_SM_NOT,
}
SCORE_MOD_MAX_NODES = SA_SM_MAX_NODES
SCORE_MOD_MAX_DIMS = SA_SM_MAX_DIMS
cdef sa_sm_node _nd0
SCORE_MOD_NODE = np.dtype({
    "names": ["op", "arg", "arr", "kv_axis", "f", "i"],
    "formats": [np.int32, (np.int32, SA_SM_MAX_DIMS), np.int32, np.int32, np.float64, np.int64],
    "offsets": [<char *> &_nd0.op - <char *> &_nd0, <char *> &_nd0.arg - <char *> &_nd0,
                <char *> &_nd0.arr - <char *> &_nd0, <char *> &_nd0.kv_axis - <char *> &_nd0,
                <char *> &_nd0.f - <char *> &_nd0, <char *> &_nd0.i - <char *> &_nd0],
    "itemsize": sizeof(sa_sm_node)})


# ---------------------------------------------------------------- config ----

def _isa_from_name(name):
    if name not in ISA_NAMES:
        raise ValueError(f"unknown instruction set {name!r}; choose one of {ISA_NAMES}")
    return ISA_NAMES.index(name)


def available_isas():
    """Instruction sets this build can run on this CPU: the best (the default) first, then the
    others from the most capable down (avx512bf16, where supported but slower than avx512 for
    bfloat16 -- Intel's -- comes second)."""
    cdef int best = sa_isa_best()
    return [ISA_NAMES[best]] + [ISA_NAMES[i] for i in range(SA_ISA_COUNT - 1, -1, -1)
                                if i != best and sa_isa_supported(i)]


# The path a call runs: the one forced in the calling context (selfattn.use_isa sets this
# ContextVar: per thread, per asyncio task), else the process default _isa (SELFATTN_ISA at
# import, then set_isa). Read once per call, so concurrent calls on different paths never
# affect each other.
_forced_isa = contextvars.ContextVar("selfattn_forced_isa", default=None)
cdef object _forced_isa_var = _forced_isa      # the same, read through the C API (no lookups)


cdef int _call_isa() except -1:
    forced = get_value(_forced_isa_var, None)
    return _isa if forced is None else <int> forced


def storage_paths(isa_name):
    """{'bfloat16': ..., 'float16': ...}: how 16-bit inputs are widened to float32 (for the
    float32 kernels) on that instruction set, e.g. 'shifts', 'F16C vcvtph2ps'."""
    cdef int isa = _isa_from_name(isa_name)
    return {"bfloat16": sa_storage_path(isa, SA_STORE_BF16).decode(),
            "float16": sa_storage_path(isa, SA_STORE_F16).decode()}


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
    return ISA_NAMES.index(name), None


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
    """SELFATTN_ISA=<name> at import forces a path this CPU runs (a lower one, or avx512bf16
    where it is not the default); a name that is unknown or that this CPU lacks warns and keeps
    the best path."""
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
# The options' values are checked by selfattn/_spec.py (pure Python, shared with selfattn.reference
# and selfattn.inspection: one exception type and one message per mistake); here what is C's.

cdef inline object _as_array(object x, str name):
    if type(x) is np.ndarray:
        return x
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} cannot be read as an array: {exc}") from None


cdef inline object _meta(object x, str name):
    """x as an array, or an ArraySpec (shape and dtype, no data) as it is."""
    if type(x) is ArraySpec:
        return x
    return _as_array(x, name)


cdef inline int _typenum_of(object a, str name) except -1:
    """_compute_typenum of a's dtype; float32 and float64 arrays without asking the dtype object."""
    cdef int t
    if type(a) is np.ndarray:
        t = cnp.PyArray_TYPE(a)
        if t == <int>cnp.NPY_FLOAT or t == <int>cnp.NPY_DOUBLE:
            return t
    return _compute_typenum(a.dtype, name)


cdef int _compute_typenum(object dt, str name) except -1:
    """NPY_FLOAT or NPY_DOUBLE: what an input of dtype `dt` computes in; TypeError naming it if nothing."""
    cdef str kind = dt.kind
    if kind == "f" and dt.itemsize == 8:
        return cnp.NPY_DOUBLE
    if (kind == "f" and dt.itemsize <= 4) or kind == "b" or kind == "i" or kind == "u" or _storage_of(dt):
        return cnp.NPY_FLOAT
    raise TypeError(f"{name} has dtype {dt}, which selfattn cannot compute (supported: float32, float64, "
                    f"bfloat16 (ml_dtypes) and float16; integer and bool compute in float32)")


cdef inline int _storage_of(object dt):
    """SA_STORE_BF16 for ml_dtypes.bfloat16 (recognised by name: ml_dtypes is not imported
    here), SA_STORE_F16 for float16, else SA_STORE_NATIVE."""
    if dt.itemsize != 2:
        return SA_STORE_NATIVE
    if dt == _F16:
        return SA_STORE_F16
    return SA_STORE_BF16 if dt.name == "bfloat16" else SA_STORE_NATIVE


def _storage_name(dt):
    """'bfloat16' / 'float16' for the 16-bit dtypes the kernels store natively, else None."""
    cdef int s = _storage_of(np.dtype(dt))
    return "bfloat16" if s == SA_STORE_BF16 else "float16" if s == SA_STORE_F16 else None


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
    nt = _spec.check_threads(num_threads)
    return sa_default_threads() if nt is None else nt


cdef tuple _check_options(object num_threads, object is_causal, object window_size, object alignment,
                          object softcap):
    """The scalar options every entry point shares, validated before any work:
    (num_threads, causal, has_window, window_left, window_right, alignment, softcap);
    -1 = unbounded window side, softcap 0.0 = none. is_causal must be a bool (_spec.check_is_causal:
    a string such as "no", or a number written in its place, would count as true)."""
    if is_causal is not False and is_causal is not True:
        is_causal = _spec.check_is_causal(is_causal)
    if num_threads is None and window_size is None and softcap is None and type(alignment) is str:
        # the common call, answered without _spec (the same values its checks would give)
        if alignment == "top_left" or alignment == "bottom_right":
            return (sa_default_threads(), is_causal, False, -1, -1,
                    SA_ALIGN_TOP_LEFT if alignment == "top_left" else SA_ALIGN_BOTTOM_RIGHT, 0.0)
    nt = _check_threads(num_threads)
    left, right = _spec.window_sides(window_size)
    has_window = window_size is not None
    align = SA_ALIGN_TOP_LEFT if _spec.check_alignment(alignment) == "top_left" else SA_ALIGN_BOTTOM_RIGHT
    cap = _spec.check_softcap(softcap)
    return (nt, is_causal, has_window, -1 if left is None else min(left, 1 << 62),
            -1 if right is None else min(right, 1 << 62), align, 0.0 if cap is None else cap)


cdef object _per_unit(object per_batch, tuple ob, object dtype):
    """An array of the batch dims ob[:-1] -> one value per unit (C order of ob), contiguous."""
    return np.ascontiguousarray(np.broadcast_to(per_batch[..., None] if ob else per_batch, ob),
                                dtype=dtype).ravel()


def _as_input(x, name):
    """np.asarray with a TypeError naming the argument (for attend and autograd)."""
    return _as_array(x, name)


def _compute_dtype_of(dt, name):
    """The dtype an input of dtype `dt` computes in; TypeError naming `name` if none."""
    return _F64 if _compute_typenum(np.dtype(dt), name) == cnp.NPY_DOUBLE else _F32


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
cdef unsigned long _main_ident = threading.main_thread().ident   # the thread that sees signals


def _note_main_thread():
    """After a fork the child's main thread is the one that forked (threading says so first)."""
    global _main_ident
    _main_ident = threading.main_thread().ident


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_note_main_thread)


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


# ------------------------------------------------------------ the problem ---
#
#   describe(q, k, v, **options)                 dense: SDPA, attend, KVCache (ragged counts too),
#                                                selfattn.dask's blocks (query_offsets)
#   describe_varlen(q, k, v, cu_q, cu_k, **options)      packed variable-length sequences
#       -> Problem: every argument validated once, before any work; an ArraySpec (shape and
#          dtype) stands in for data that is not there yet (attend before its projections, Dask)
#   Problem.run(out=None, return_lse=False)      the forward
#   Problem.backward(out, lse, grad_out)         the backward: (dq, dk, dv)
#   Problem.schedule(backward=False)             the kernel's plan, nothing computed (tests)
#
# The three fill sa_attn_args in one place, _fill_args, from a _Units table: one unit per
# (batch, query head) [x sequence for varlen], each with element offsets into the caller's
# arrays (no broadcast copies, no transposes), and the units grouped by the K/V they read.

cdef struct _Units:
    int64_t n_units, n_kv
    int64_t *q_off                   # per unit: element offset of its query, output, lse, mask
    int64_t *o_off
    int64_t *l_off
    int64_t *m_off
    int64_t *kv_k                    # per distinct K/V: element offset of its key, value
    int64_t *kv_v
    int64_t *kv_ks                   # ... and of its key and value scales (int8 K/V)
    int64_t *kv_vs
    int64_t *kv_bt                   # ... and of its sequence's row of the block table (paged)
    int64_t *kv_start                # n_kv + 1: kv_units[kv_start[g]:kv_start[g+1]] read K/V g
    int64_t *kv_units
    int64_t *dq_off                  # the backward: per unit into dq, per K/V into dk and dv
    int64_t *dk_off
    int64_t *dv_off


cdef class Problem:
    """One attention problem, validated: dtype, shapes, options and per-unit arrays.
    Built by describe / describe_varlen; run, backward and schedule bind outputs and call C."""
    cdef readonly object dtype           # float32 or float64: what it computes in (and lse's dtype)
    cdef readonly object out_dtype       # the output's (and gradients'): dtype, or the 16-bit input dtype
    cdef readonly int storage            # SA_STORE_*: how q, k, v and out are stored
    cdef readonly tuple batch            # the output's batch dims (..., Hq)
    cdef readonly tuple kv_batch         # the distinct K/V's batch dims (..., H)
    cdef readonly tuple out_shape, lse_shape
    cdef readonly int64_t L, S, E, Ev, group, n_units
    cdef int64_t k_rows                  # varlen: total_k (the packed key rows)
    cdef readonly double scale
    cdef readonly bint varlen
    cdef bint ragged_rows                # dense with query_lengths: rows past them are not computed
    cdef tuple opts                      # _check_options
    cdef int typenum, mask_kind
    cdef object q, k, v, mask            # the data; None when described from ArraySpecs
    cdef object bm_bits                  # block mask (SA_MASK_BLOCKS; mask = its table): partial blocks' bits
    cdef int64_t bm_rows, bm_keys        # ... and its block sizes
    cdef double dropout_p                # attention dropout (0: none) and its Philox seed
    cdef uint64_t dropout_seed
    cdef bint has_sm                     # a score_mod program (_score_mod): the C description,
    cdef sa_score_mod smod               # pointing into sm_keep (nodes, arrays and their tables)
    cdef object sm_keep
    cdef object q_len, k_len, q_pos, slopes, sinks   # per unit (C order of the units), or None
    cdef int64_t sink_tokens             # num_sink_tokens (0: none)
    cdef object k_scale, v_scale         # quantized K/V: float32 scales (..., H, S, 1); else None
    cdef readonly int kv_quant           # sa_kv_quant: K and V stored apart from q (SA_KV_PLAIN: as q)
    cdef readonly bint kv_scaled         # ... quantized (int8, float8), with their scales
    cdef object cu_q, cu_k               # varlen: cumulative rows of the sequences
    cdef readonly bint paged             # k and v are pages (num_blocks, page_size, H, E) read
    cdef object block_table              # through block_table (B, max_blocks) int32, C order
    cdef int64_t page_size

    @property
    def has_data(self):
        return self.q is not None

    cdef bint _empty(self, bint with_lse):
        return self.n_units == 0 or self.L == 0 or (self.Ev == 0 and not with_lse)

    cdef _need_data(self):
        if self.q is None:
            raise RuntimeError("this Problem was described from ArraySpecs (no data): describe it "
                               "again with the arrays to run it")

    # the gradients' shapes (made when asked: a forward never needs them). dq is laid out like
    # the output, dk and dv like the distinct K/V (varlen: packed, k_rows = total_k)
    @property
    def dq_shape(self):
        return self.out_shape[:-1] + (self.E,)

    @property
    def dk_shape(self):
        return self.kv_batch[:-1] + (self.k_rows, self.E) if self.varlen else self.kv_batch + (self.S, self.E)

    @property
    def dv_shape(self):
        return self.kv_batch[:-1] + (self.k_rows, self.Ev) if self.varlen else self.kv_batch + (self.S, self.Ev)

    def run(self, out=None, bint return_lse=False):
        """The forward into `out` (a new array when None): out, or (out, lse)."""
        return self._run(out, return_lse)

    cdef object _run(self, object out, bint return_lse):
        cdef cnp.npy_intp dims[64]
        cdef int nd, d
        self._need_data()
        if self.ragged_rows:                 # rows past a unit's query_lengths are never written
            if out is not None:
                raise ValueError("query_lengths is for the forward into a new output only")
            out = np.zeros(self.out_shape, dtype=self.out_dtype)
            lse = np.full(self.lse_shape, -np.inf, dtype=self.dtype) if return_lse else None
        else:
            if out is None:
                nd = len(self.out_shape)
                if nd <= 64 and self.storage == SA_STORE_NATIVE:   # NumPy's limit (NPY_MAXDIMS; 32 before 2.0)
                    for d in range(nd):
                        dims[d] = self.out_shape[d]
                    out = cnp.PyArray_EMPTY(nd, dims, self.typenum, 0)
                else:
                    out = np.empty(self.out_shape, dtype=self.out_dtype)
            elif not isinstance(out, np.ndarray) or out.shape != self.out_shape or out.dtype != self.out_dtype:
                raise ValueError(f"out must have shape {self.out_shape} and dtype {self.out_dtype}, got "
                                 f"{getattr(out, 'shape', type(out).__name__)} {getattr(out, 'dtype', '')}")
            lse = np.empty(self.lse_shape, dtype=self.dtype) if return_lse else None
        if not self._empty(return_lse):
            self._call(out, lse, None, None, None, None, False)
        return (out, lse) if return_lse else out

    def backward(self, out, lse, grad_out):
        """The fused backward from the forward's out and lse and the cotangent: (dq, dk, dv),
        dq with the output's batch dims, dk and dv with the distinct K/V's (varlen: packed)."""
        self._need_data()
        if self.paged:
            raise TypeError("no backward through a paged KV cache (it is for inference): attend dense key and "
                            "value to train")
        if self.kv_quant:
            raise TypeError(f"no backward through {_KV_NAMES[self.kv_quant]} key and value under float32 queries "
                            f"(a quantized or 16-bit KV cache is for inference): attend key and value of the "
                            f"query's dtype to train")
        if self.ragged_rows:
            raise ValueError("query_lengths is for the forward into a new output only")
        for a, nm, shp, dt in ((out, "out", self.out_shape, self.out_dtype), (lse, "lse", self.lse_shape, self.dtype),
                               (grad_out, "grad_out", self.out_shape, self.out_dtype)):
            if not isinstance(a, np.ndarray) or a.shape != shp or a.dtype != dt:
                raise ValueError(f"{nm} must be an array of shape {shp} and dtype {dt}, got "
                                 f"{getattr(a, 'shape', type(a).__name__)} {getattr(a, 'dtype', '')}")
        if self.storage != SA_STORE_NATIVE and not self._bwd_native16():
            # the 16-bit backward elsewhere runs in float32 on float32 copies; the gradients are
            # rounded to the inputs' dtype
            dq, dk, dv = self._widened().backward(out.astype(_F32), lse, grad_out.astype(_F32))
            return dq.astype(self.out_dtype), dk.astype(self.out_dtype), dv.astype(self.out_dtype)
        out = np.ascontiguousarray(out)        # dout is read with out's offsets: same layout
        # bfloat16 on vdpbf16ps: dout and the gradients as stored (rounded once, in the kernel)
        native16 = self.storage != SA_STORE_NATIVE
        dout = np.ascontiguousarray(grad_out if native16 else _ready(grad_out, self.typenum))
        gdt = self.out_dtype if native16 else self.dtype
        dq = np.zeros(self.dq_shape, dtype=gdt)
        dk = np.zeros(self.dk_shape, dtype=gdt)
        dv = np.zeros(self.dv_shape, dtype=gdt)
        if not self._empty(True):
            self._call(out, lse, dout, dq, dk, dv, False)
        return dq, dk, dv

    def schedule(self, bint backward=False, bint return_lse=False):
        """The kernel's plan for this problem, nothing computed: {'threads', 'fused', 'banded',
        'decode', 'compute_tasks', 'group', 'ring_blocks', 'prefetch', 'workspace_bytes'}."""
        self._need_data()
        if self._empty(backward or return_lse):
            return {"threads": 0, "fused": False, "compute_tasks": 0, "group": 0}
        if backward and self.storage != SA_STORE_NATIVE and not self._bwd_native16():
            return self._widened().schedule(backward=True)       # what backward runs
        empty = lambda shape: np.empty(shape, dtype=self.dtype)   # noqa: E731 (never touched)
        out = np.empty(self.out_shape, dtype=self.out_dtype)
        lse = empty(self.lse_shape) if (backward or return_lse) else None
        if not backward:
            return self._call(out, lse, None, None, None, None, True)
        return self._call(out, lse, empty(self.out_shape), empty(self.dq_shape), empty(self.dk_shape),
                          empty(self.dv_shape), True)

    cdef bint _bwd_native16(self):
        """Whether the backward reads this problem's 16-bit storage itself: bfloat16 on the
        avx512bf16, neonbf16 and avx512amx paths (vdpbf16ps, BFDOT, AMX tiles); every other 16-bit
        backward computes on float32 copies."""
        cdef int isa = _call_isa()
        return self.storage == SA_STORE_BF16 and (isa == SA_ISA_AVX512BF16 or isa == SA_ISA_NEONBF16
                                                  or isa == SA_ISA_AVX512AMX)

    cdef Problem _widened(self):
        """This problem on float32 copies of its 16-bit data (the backward's path, for now)."""
        cdef Problem w = Problem.__new__(Problem)
        w.dtype, w.out_dtype, w.storage = self.dtype, self.dtype, SA_STORE_NATIVE
        w.batch, w.kv_batch, w.out_shape, w.lse_shape = self.batch, self.kv_batch, self.out_shape, self.lse_shape
        w.L, w.S, w.E, w.Ev, w.group, w.n_units, w.k_rows = self.L, self.S, self.E, self.Ev, self.group, \
            self.n_units, self.k_rows
        w.scale, w.varlen, w.ragged_rows, w.opts = self.scale, self.varlen, self.ragged_rows, self.opts
        w.typenum, w.mask_kind, w.mask = self.typenum, self.mask_kind, self.mask
        w.bm_bits, w.bm_rows, w.bm_keys = self.bm_bits, self.bm_rows, self.bm_keys
        w.dropout_p, w.dropout_seed = self.dropout_p, self.dropout_seed
        w.has_sm, w.smod, w.sm_keep = self.has_sm, self.smod, self.sm_keep
        w.q, w.k, w.v = self.q.astype(_F32), self.k.astype(_F32), self.v.astype(_F32)
        w.q_len, w.k_len, w.q_pos, w.slopes, w.cu_q, w.cu_k = self.q_len, self.k_len, self.q_pos, self.slopes, \
            self.cu_q, self.cu_k
        w.sinks, w.sink_tokens = self.sinks, self.sink_tokens
        return w

    cdef object _call(self, out, lse, dout, dq, dk, dv, bint schedule_only):
        cdef sa_attn_args args
        cdef _Units t
        cdef int isa = _call_isa(), isz = self.dtype.itemsize
        cdef int64_t *tab = NULL
        memset(&t, 0, sizeof(t))
        try:
            if self.varlen:
                keep = _varlen_units(self, &t, out, lse, dq, dk, dv)     # noqa: F841 (t points into it)
            else:
                tab = _dense_units(self, &t, out, lse, dq is not None)
            _fill_args(&args, self, &t, out, lse, dout, dq, dk, dv)
            if schedule_only:
                return _schedule_of(&args, isa, isz, dout is not None)
            if self.has_sm:
                self.sm_keep[-1][:] = 0
            _run_kernel(&args, isa, isz, dout is not None)
            if self.has_sm and self.sm_keep[-1].any():
                _score_mod_oob(self.sm_keep)
        finally:
            _free(tab)
        return None


cdef inline int _storage_in(object a, int typenum):
    """_storage_of a's dtype; float32 and float64 arrays without asking the dtype object."""
    if typenum == <int>cnp.NPY_DOUBLE or (type(a) is np.ndarray and cnp.PyArray_TYPE(a) == <int>cnp.NPY_FLOAT):
        return SA_STORE_NATIVE
    return _storage_of(a.dtype)


cdef tuple _qkv(object query, object key, object value, bint scaled):
    """query, key, value as arrays (or ArraySpecs), the type they compute in (float64 if any is),
    their storage (SA_STORE_BF16 / _F16: all three bfloat16, or all float16) and how key and
    value are stored apart from the query (sa_kv_quant, _kv_kind_of; scaled: k_scale or v_scale
    given)."""
    q = _meta(query, "query")
    k = _meta(key, "key")
    v = _meta(value, "value")
    cdef int kind = _kv_kind_of(q, k, v, scaled)
    cdef int tq
    if kind != SA_KV_PLAIN:
        tq = _typenum_of(q, "query")
        if q.dtype != _F32:
            raise TypeError(f"with {_KV_NAMES[kind]} key and value the query must be float32, got {q.dtype} (the "
                            f"kernels read such key and value as stored, under float32 queries)")
        return q, k, v, cnp.NPY_FLOAT, SA_STORE_NATIVE, kind
    tq = _typenum_of(q, "query")
    cdef int tk = _typenum_of(k, "key"), tv = _typenum_of(v, "value")
    # <int>: with numpy < 2's headers enum NPY_TYPES is unsigned and -Wsign-compare (in Python's
    # CFLAGS) warns on the comparisons with the int type numbers
    cdef int typenum = cnp.NPY_DOUBLE if <int>cnp.NPY_DOUBLE in (tq, tk, tv) else cnp.NPY_FLOAT
    cdef int sq = _storage_in(q, tq), sk = _storage_in(k, tk), sv = _storage_in(v, tv)
    if sq or sk or sv:
        if not (q.dtype == k.dtype and k.dtype == v.dtype):
            raise TypeError(f"query, key and value must have one dtype when one of them is bfloat16 or float16 "
                            f"(the kernels read them as they are stored; a float32 query over bfloat16 or "
                            f"float16 key and value is the one mix taken): got query {q.dtype}, key {k.dtype}, "
                            f"value {v.dtype}")
    return q, k, v, typenum, sq, SA_KV_PLAIN


# sa_kv_quant -> what the messages call it
_KV_NAMES = {SA_KV_INT8: "int8", SA_KV_FP8_E4M3: "float8_e4m3fn", SA_KV_FP8_E5M2: "float8_e5m2",
             SA_KV_BF16: "bfloat16", SA_KV_F16: "float16"}
_FP8_KINDS = {"float8_e4m3fn": SA_KV_FP8_E4M3, "float8_e5m2": SA_KV_FP8_E5M2}


def _narrow_kv_name(q, k, v):
    """The name of key and value's kind when they are stored apart from the query (float8, a 16-bit
    cache under float32 queries; int8 only with scales, so not here), else None."""
    cdef int kind = _kv_kind_of(q, k, v, False)
    return _KV_NAMES[kind] if kind != SA_KV_PLAIN else None


cdef int _kv_kind_of(object q, object k, object v, bint scaled) except -1:
    """sa_kv_quant of key and value: float8 (ml_dtypes' float8_e4m3fn / float8_e5m2, recognised by
    name; scales optional, 1 when not given), int8 with scales (selfattn.quantize_kv; int8
    without scales is an integer input, computed as float32), bfloat16 / float16 under a float32
    query (no scales); else SA_KV_PLAIN. Key and value one dtype in each case."""
    cdef str kn = k.dtype.name, vn = v.dtype.name
    if kn in _FP8_KINDS or vn in _FP8_KINDS:
        if k.dtype != v.dtype:
            raise TypeError(f"float8 key and value must have one dtype, got key {k.dtype} and value {v.dtype}")
        return _FP8_KINDS[kn]
    if scaled:
        if k.dtype != _I8 or v.dtype != _I8:
            raise TypeError(f"k_scale and v_scale are for quantized key and value (int8 from selfattn.quantize_kv, "
                            f"or float8_e4m3fn / float8_e5m2), got key {k.dtype} and value {v.dtype}")
        return SA_KV_INT8
    if q.dtype == _F32 and k.dtype.itemsize == 2 and k.dtype == v.dtype:
        if k.dtype == _F16:
            return SA_KV_F16
        if kn == "bfloat16":
            return SA_KV_BF16
    return SA_KV_PLAIN


cdef object _ready16(object a):
    """A 16-bit input as it is stored (the kernels convert it), native-endian and aligned."""
    if not cnp.PyArray_ISNOTSWAPPED(a):
        return a.astype(a.dtype.newbyteorder("="))
    if not cnp.PyArray_ISALIGNED(a):
        return a.copy()
    return a


cdef _quantized_kv(Problem p, q, k, v, k_scale, v_scale):
    """Quantized key and value (p.kv_quant: int8 or float8) with their float32 scales
    (selfattn.quant): validated, kept in p as (..., H, S, 1), broadcast (a float8 cache's one
    scale per head: stride 0 along S). float8 without scales: 1."""
    if (k_scale is None) != (v_scale is None):
        raise TypeError(f"k_scale and v_scale go together (quantized key and value, each with its scales): got "
                        f"{'k_scale' if v_scale is None else 'v_scale'} only")
    if k_scale is None:
        k_scale = v_scale = np.ones((), np.float32)
    ks = _meta(k_scale, "k_scale")
    vs = _meta(v_scale, "v_scale")
    for sc, nm, arr, an in ((ks, "k_scale", k, "key"), (vs, "v_scale", v, "value")):
        if sc.dtype.kind != "f" or sc.dtype.itemsize > 8:
            raise TypeError(f"{nm} must be floating (float32), got dtype {sc.dtype}")
        if _broadcast(tuple(arr.shape[:-1]), tuple(sc.shape)) != tuple(arr.shape[:-1]):
            raise ValueError(f"{nm} must broadcast to the shape of {an} without its last dim, "
                             f"{tuple(arr.shape[:-1])} (a scale per key, or per kv head), got {tuple(sc.shape)}")
    p.kv_scaled = True
    if type(ks) is not ArraySpec and type(vs) is not ArraySpec:
        # (..., H, S, 1): each key's scale where its row would be (stride 0 where broadcast)
        p.k_scale = np.broadcast_to(_ready(ks, cnp.NPY_FLOAT), tuple(k.shape[:-1]))[..., None]
        p.v_scale = np.broadcast_to(_ready(vs, cnp.NPY_FLOAT), tuple(v.shape[:-1]))[..., None]


cdef object _block_mask(Problem p, object block_mask, tuple ob):
    """A block mask (table, bits, rows, keys) -- selfattn.flex.BlockMask's arrays -- checked
    against the problem: table int64 (..., ceil(L / rows), ceil(S / keys)) broadcasting to the
    output's batch dims, entries SA_BLOCK_EMPTY, SA_BLOCK_FULL or an index into bits (n, rows,
    keys) uint8. Sets the problem's mask to it; returns the table."""
    table, bits, rows, keys = block_mask
    cdef int64_t br = rows, bk = keys
    if br < 1 or bk < 1:
        raise ValueError(f"block mask: block sizes must be >= 1, got ({br}, {bk})")
    if (not isinstance(table, np.ndarray) or table.dtype != np.int64 or table.ndim < 2
            or not isinstance(bits, np.ndarray) or bits.dtype != _U8 or bits.ndim != 3
            or tuple(bits.shape[1:]) != (br, bk)):
        raise TypeError("block mask: table must be int64 (..., Q blocks, KV blocks) and bits uint8 "
                        "(n, rows, keys) (selfattn.create_block_mask makes them)")
    cdef tuple want = ((p.L + br - 1) // br, (p.S + bk - 1) // bk)
    if tuple(table.shape[-2:]) != want:
        raise ValueError(f"block mask of {tuple(table.shape[-2:])} blocks of ({br}, {bk}) does not cover "
                         f"L={p.L} query rows and S={p.S} keys: {want} blocks")
    full = ob + want
    if not (table.ndim <= len(full) and all(md == 1 or md == fd for md, fd in zip(table.shape[::-1], full[::-1]))):
        raise ValueError(f"block mask of shape {table.shape[:-2]} (batch, heads) does not broadcast to {ob}")
    if table.size and (table.min() < SA_BLOCK_FULL or table.max() >= bits.shape[0]):
        raise ValueError("block mask: a table entry is neither empty, full nor one of the partial blocks")
    p.mask_kind = SA_MASK_BLOCKS
    p.bm_bits = np.ascontiguousarray(bits)
    p.bm_rows, p.bm_keys = br, bk
    return table


cdef _score_mod(Problem p, object prog, tuple ob):
    """A lowered score_mod (selfattn._scoremod.Lowered: nodes of SCORE_MOD_NODE, n_fwd, out,
    dout, arrays float64 / int64) for the problem: its C description in p.smod, the arrays it
    points into in p.sm_keep (the last one: oob, per array, set by the kernels)."""
    nodes = prog.nodes
    if not isinstance(nodes, np.ndarray) or nodes.dtype != SCORE_MOD_NODE or nodes.ndim != 1:
        raise TypeError("score_mod: nodes must be a 1-D array of SCORE_MOD_NODE (selfattn._scoremod lowers them)")
    cdef int64_t n = nodes.shape[0]
    if n < 1 or n > SA_SM_MAX_NODES:
        raise ValueError(f"score_mod's program has {n} nodes with its derivative; the kernels take 1 to "
                         f"{SA_SM_MAX_NODES}: simplify the function")
    nodes = np.ascontiguousarray(nodes)
    arrays = [np.ascontiguousarray(x) for x in prog.arrays]
    cdef int64_t na = len(arrays)
    ndim = np.zeros(max(na, 1), np.int32)
    is_int = np.zeros(max(na, 1), np.int32)
    dims = np.ones((max(na, 1), SA_SM_MAX_DIMS), np.int64)
    ptrs = np.zeros(max(na, 1), np.uintp)
    for t, x in enumerate(arrays):
        if x.dtype not in (_F64, np.dtype(np.int64)) or not (1 <= x.ndim <= SA_SM_MAX_DIMS) or x.size == 0:
            raise TypeError(f"score_mod: captured array {t} must be float64 or int64 with 1 to "
                            f"{SA_SM_MAX_DIMS} dims and not empty, got {x.dtype} {x.shape}")
        ndim[t], is_int[t] = x.ndim, x.dtype == np.int64
        dims[t, :x.ndim] = x.shape
        ptrs[t] = x.ctypes.data
    _check_program(nodes, arrays, prog)
    oob = np.zeros(max(na, 1), np.int32)
    p.sm_keep = (nodes, arrays, ndim, is_int, dims, ptrs, oob)
    memset(&p.smod, 0, sizeof(p.smod))
    p.smod.nodes = <const sa_sm_node *> cnp.PyArray_DATA(nodes)
    p.smod.n_nodes, p.smod.n_fwd, p.smod.out, p.smod.dout = n, prog.n_fwd, prog.out, prog.dout
    p.smod.n_heads = ob[-1] if len(ob) and ob[-1] > 0 else 1
    p.smod.n_arrays = na
    p.smod.arrays = <const void *const *> cnp.PyArray_DATA(ptrs)
    p.smod.ndim = <const int32_t *> cnp.PyArray_DATA(ndim)
    p.smod.is_int = <const int32_t *> cnp.PyArray_DATA(is_int)
    p.smod.dims = <const int64_t *> cnp.PyArray_DATA(dims)
    p.smod.oob = <int32_t *> cnp.PyArray_DATA(oob)
    p.has_sm = True


cdef _check_program(nodes, list arrays, prog):
    """What sa_sm_ok checks in C, with the node named: operands earlier nodes, known opcodes,
    loads of arrays that exist, with their type and a kv axis among their dims."""
    cdef int64_t n = nodes.shape[0], t
    if not (0 < prog.n_fwd <= n and 0 <= prog.out < prog.n_fwd and 0 <= prog.dout < n):
        raise ValueError(f"score_mod: n_fwd={prog.n_fwd}, out={prog.out}, dout={prog.dout} do not fit {n} nodes")
    ops, args = nodes["op"], nodes["arg"]
    for t in range(n):
        if not 0 <= ops[t] < SA_SM_OP_COUNT:
            raise ValueError(f"score_mod: node {t} has no opcode {ops[t]}")
        for a in args[t]:
            if a < 0 or a >= max(t, 1):
                raise ValueError(f"score_mod: node {t} reads node {a}: operands are earlier nodes")
        if ops[t] in (SA_SM_FLOAD, SA_SM_ILOAD):
            a, ax = nodes["arr"][t], nodes["kv_axis"][t]
            if not 0 <= a < len(arrays) or (arrays[a].dtype == np.int64) != (ops[t] == SA_SM_ILOAD):
                raise ValueError(f"score_mod: node {t} loads array {a}, which is not one of its "
                                 f"{len(arrays)} arrays of that type")
            if not -1 <= ax < arrays[a].ndim:
                raise ValueError(f"score_mod: node {t}'s kv_axis {ax} is not an axis of array {a}")


cdef _score_mod_oob(tuple keep):
    arrays, oob = keep[1], keep[-1]
    bad = [f"array {t} (shape {arrays[t].shape})" for t in range(len(arrays)) if oob[t]]
    raise IndexError(f"score_mod reads captured {', '.join(bad)} out of range (an index outside its dim after "
                     f"one wrap of a negative index, as NumPy's): nothing outside was read")


cdef _set_data(Problem p, q, k, v, m):
    """Keep the data (converted to the compute type, or as stored: 16 bits) when every input is an array."""
    if type(q) is ArraySpec or type(k) is ArraySpec or type(v) is ArraySpec or type(m) is ArraySpec:
        return
    if p.kv_scaled:                      # int8 / float8 K and V, read as stored (one byte: always aligned)
        p.q = _ready(q, p.typenum)
        p.k = k if cnp.PyArray_ISNOTSWAPPED(k) else k.copy()
        p.v = v if cnp.PyArray_ISNOTSWAPPED(v) else v.copy()
        p.mask = m
        return
    if p.kv_quant:                       # a bfloat16 / float16 cache under float32 queries: read as stored
        p.q = _ready(q, p.typenum)
        p.k, p.v = _ready16(k), _ready16(v)
        p.mask = m
        return
    if p.storage != SA_STORE_NATIVE:
        p.q, p.k, p.v = _ready16(q), _ready16(k), _ready16(v)
    else:
        p.q = _ready(q, p.typenum)
        p.k = _ready(k, p.typenum)
        p.v = _ready(v, p.typenum)
    p.mask = m


def describe(query, key, value, *, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
             num_threads=None, window_size=None, alignment="top_left", key_lengths=None, alibi_slopes=None,
             softcap=None, query_lengths=None, query_offsets=None, sinks=None, num_sink_tokens=None,
             k_scale=None, v_scale=None, block_mask=None, dropout_p=0.0, dropout_seed=0, score_mod=None):
    """The dense problem (see selfattn.scaled_dot_product_attention), validated -> Problem.

    Arrays, or ArraySpecs where the data is not there yet (then run/backward refuse).
    query_lengths (KVCache's ragged counts): like key_lengths, the query rows of each batch entry,
    its first ones; with alignment="bottom_right" they are the last positions of that entry's keys;
    the other rows get zeros (lse -inf). query_offsets (selfattn.dask's blocks): per batch entry,
    the position of query row 0 among that entry's keys (any integer; row i sits at
    query_offsets + i): it replaces the alignment, so a block of a longer problem keeps its rows'
    positions (causal, windows, ALiBi). block_mask (selfattn.flex's BlockMask, as
    (table, bits, rows, keys)): see _block_mask. dropout_p in [0, 1) with dropout_seed (an int
    in [0, 2^64)): attention dropout (src_c/dropout.h). score_mod: a lowered program
    (selfattn._scoremod.Lowered; see _score_mod)."""
    return _describe(query, key, value, attn_mask, is_causal, scale, enable_gqa, num_threads, window_size,
                     alignment, key_lengths, alibi_slopes, softcap, query_lengths, query_offsets, sinks,
                     num_sink_tokens, k_scale, v_scale, block_mask, dropout_p, dropout_seed, score_mod)


cdef Problem _describe(query, key, value, attn_mask, is_causal, scale, enable_gqa, num_threads, window_size,
                       alignment, key_lengths, alibi_slopes, softcap, query_lengths, query_offsets, sinks,
                       num_sink_tokens, k_scale=None, v_scale=None, block_mask=None, dropout_p=0.0,
                       dropout_seed=0, score_mod=None):
    cdef Problem p = Problem.__new__(Problem)
    cdef int64_t n_units = 1
    p.opts = _check_options(num_threads, is_causal, window_size, alignment, softcap)
    p.sink_tokens = _spec.check_sink_tokens(num_sink_tokens) if num_sink_tokens is not None else 0
    if (k_scale is None) != (v_scale is None):
        raise TypeError(f"k_scale and v_scale go together (quantized key and value, each with its scales): got "
                        f"{'k_scale' if v_scale is None else 'v_scale'} only")
    q, k, v, p.typenum, p.storage, p.kv_quant = _qkv(query, key, value, k_scale is not None or v_scale is not None)
    if p.kv_quant in (SA_KV_INT8, SA_KV_FP8_E4M3, SA_KV_FP8_E5M2):
        _quantized_kv(p, q, k, v, k_scale, v_scale)
    p.dtype = _F64 if p.typenum == cnp.NPY_DOUBLE else _F32
    p.out_dtype = q.dtype if p.storage != SA_STORE_NATIVE else p.dtype
    cdef tuple qs = tuple(q.shape), ks = tuple(k.shape), vs = tuple(v.shape)
    for shp, nm in ((qs, "query"), (ks, "key"), (vs, "value")):
        if len(shp) < 2:
            raise ValueError(f"{nm} must have at least 2 dims (..., {'L' if nm == 'query' else 'S'}, "
                             f"{'Ev' if nm == 'value' else 'E'}), got shape {shp}")
    p.L, p.E, p.S, p.Ev = qs[-2], qs[-1], ks[-2], vs[-1]
    if ks[-1] != p.E:
        raise ValueError(f"query and key must have the same last dim E: query {qs} has E={p.E}, "
                         f"key {ks} has E={ks[-1]}")
    if vs[-2] != p.S:
        raise ValueError(f"key and value must have the same number of keys S (dim -2): key {ks}, "
                         f"value {vs}")
    # scale None: _spec.check_scale's default, without the call (C's sqrt is correctly rounded too)
    p.scale = _spec.check_scale(scale, p.E, p.dtype) if scale is not None else (1.0 / sqrt(<double> p.E)
                                                                                 if p.E > 0 else 1.0)

    # -- batch (and head) dims: broadcast, or grouped-query heads
    p.group = 1
    qb, kb, vb = qs[:-2], ks[:-2], vs[:-2]
    gqa = bool(enable_gqa) and len(qb) >= 1 and len(kb) >= 1 and len(vb) >= 1
    kvb = _broadcast(kb, vb)
    if gqa:
        hq, hk = qb[-1], kb[-1]
        if hk != vb[-1]:
            raise ValueError(f"enable_gqa: key {k.shape} and value {v.shape} must have the same number "
                             f"of heads (dim -3)")
        if hk == 0 or hq % hk:
            raise ValueError(f"enable_gqa: query heads Hq={hq} must be a multiple of key/value heads "
                             f"H={hk}: query {q.shape}, key {k.shape}, value {v.shape}")
        p.group = hq // hk
        ob = _broadcast(qb, kvb[:-1] + (hq,)) if kvb is not None else None
    else:
        ob = _broadcast(qb, kvb) if kvb is not None else None
    if ob is None:
        hint = "" if gqa else " (for grouped-query attention with fewer kv heads, pass enable_gqa=True)"
        raise ValueError(f"the leading (batch/head) dims of query {q.shape}, key {k.shape} and value "
                         f"{v.shape} do not broadcast{hint}")
    p.batch, p.kv_batch = ob, kvb
    for d in ob:
        n_units *= <int64_t> d
    p.n_units = n_units
    p.out_shape, p.lse_shape = ob + (p.L, p.Ev), ob + (p.L,)

    # -- mask: read in place with its own strides, never broadcast out
    p.mask_kind = SA_MASK_NONE
    m = None
    if attn_mask is not None:
        m = _meta(attn_mask, "attn_mask")
        mdt = m.dtype
        if mdt == _BOOL:
            p.mask_kind = SA_MASK_BOOL
            m = m.view(_U8) if type(m) is not ArraySpec else m
        elif (mdt.kind == "f" and mdt.itemsize <= 8) or _storage_of(mdt) == SA_STORE_BF16:
            p.mask_kind = SA_MASK_F64 if mdt.itemsize == 8 else SA_MASK_F32     # 16 bits: read as float32
            if type(m) is not ArraySpec:
                m = _ready(m, cnp.NPY_DOUBLE if mdt.itemsize == 8 else cnp.NPY_FLOAT)
        else:
            raise TypeError(f"attn_mask must be bool (True = takes part) or floating (added to the "
                            f"scores), got dtype {mdt}")
        full = ob + (p.L, p.S)
        if not (m.ndim <= len(full) and all(md == 1 or md == fd for md, fd in zip(m.shape[::-1], full[::-1]))):
            raise ValueError(f"attn_mask of shape {m.shape} does not broadcast to (..., Hq, L, S) = {full}")
    if block_mask is not None:
        if attn_mask is not None:
            raise TypeError("attn_mask and block_mask exclude each other: give one mask")
        m = _block_mask(p, block_mask, ob)
    if dropout_p:
        p.dropout_p = _spec.check_dropout_p(dropout_p)
        p.dropout_seed = dropout_seed
        if p.kv_quant:
            raise TypeError(f"dropout_p > 0 with {_KV_NAMES[p.kv_quant]} key and value under float32 queries: "
                            f"dropout is for training, a quantized or 16-bit cache for inference")

    if score_mod is not None:
        if p.opts[6] > 0:
            raise TypeError("softcap and score_mod exclude each other: write the cap into score_mod")
        _score_mod(p, score_mod, ob)

    # -- structured masks: per-unit lengths, positions and slopes
    if key_lengths is not None:
        p.k_len = _per_unit(_spec.batch_lengths(key_lengths, ob[:-1], p.S), ob, np.int64)
    if query_lengths is not None:
        p.ragged_rows = True
        p.q_len = _per_unit(_spec.batch_lengths(query_lengths, ob[:-1], p.L, "query_lengths", "L"), ob, np.int64)
    if query_offsets is not None:
        p.q_pos = _per_unit(_spec.batch_offsets(query_offsets, ob[:-1]), ob, np.int64)
    if alibi_slopes is not None:
        p.slopes = np.ascontiguousarray(_spec.head_slopes(alibi_slopes, ob)).ravel()
    if sinks is not None:
        p.sinks = np.ascontiguousarray(_spec.head_sinks(sinks, ob)).ravel()
    _set_data(p, q, k, v, m)
    return p


def describe_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, *, scale=None, is_causal=False,
                    window_size=None, alignment="top_left", alibi_slopes=None, softcap=None, enable_gqa=False,
                    num_threads=None, sinks=None, num_sink_tokens=None):
    """Packed variable-length sequences (see selfattn.varlen_attention), validated -> Problem.
    Units: (query head h, sequence b) -> h * B + b."""
    cdef Problem p = Problem.__new__(Problem)
    p.varlen = True
    p.opts = _check_options(num_threads, is_causal, window_size, alignment, softcap)
    p.sink_tokens = _spec.check_sink_tokens(num_sink_tokens) if num_sink_tokens is not None else 0
    q, k, v, p.typenum, p.storage, p.kv_quant = _qkv(query, key, value, False)
    if p.kv_quant not in (SA_KV_PLAIN, SA_KV_BF16, SA_KV_F16):
        raise TypeError(f"varlen_attention takes no {_KV_NAMES[p.kv_quant]} key and value (their scales have no "
                        f"place in the packed layout): attend each sequence, or use a KVCache / PagedKVCache")
    p.dtype = _F64 if p.typenum == cnp.NPY_DOUBLE else _F32
    p.out_dtype = q.dtype if p.storage != SA_STORE_NATIVE else p.dtype
    for a, nm, dims in ((q, "query", "(Hq, total_q, E)"), (k, "key", "(H, total_k, E)"),
                        (v, "value", "(H, total_k, Ev)")):
        if a.ndim != 3:
            raise ValueError(f"varlen_attention: {nm} must be 3-D {dims}, got shape {a.shape}")
    cdef int64_t Hq = q.shape[0], Tq = q.shape[1], H = k.shape[0], Tk = k.shape[1]
    p.E, p.Ev = q.shape[2], v.shape[2]
    if k.shape[2] != p.E:
        raise ValueError(f"query and key must have the same last dim E: query {q.shape}, key {k.shape}")
    if v.shape[0] != H or v.shape[1] != Tk:
        raise ValueError(f"key {k.shape} and value {v.shape} must have the same heads and rows (H, total_k)")
    if enable_gqa:
        if H == 0 or Hq % H:
            raise ValueError(f"enable_gqa: query heads Hq={Hq} must be a multiple of key/value heads H={H}")
    elif Hq != H:
        raise ValueError(f"query has {Hq} heads and key/value {H}: they must be equal "
                         f"(for grouped-query attention with fewer kv heads, pass enable_gqa=True)")
    p.scale = _spec.check_scale(scale, p.E, p.dtype)
    p.cu_q = _spec.cu_seqlens(cu_seqlens_q, "cu_seqlens_q", Tq)
    p.cu_k = _spec.cu_seqlens(cu_seqlens_k, "cu_seqlens_k", Tk)
    if p.cu_q.size != p.cu_k.size:
        raise ValueError(f"cu_seqlens_q ({p.cu_q.size - 1} sequences) and cu_seqlens_k ({p.cu_k.size - 1}) "
                         f"must describe the same number of sequences")
    cdef int64_t B = p.cu_q.size - 1
    p.group = Hq // H if H else 1
    p.batch, p.kv_batch = (Hq, B), (H, B)
    p.n_units = Hq * B
    p.out_shape, p.lse_shape = (Hq, Tq, p.Ev), (Hq, Tq)
    p.k_rows = Tk
    Lb, Sb = np.diff(p.cu_q), np.diff(p.cu_k)
    p.L = int(Lb.max()) if B else 0
    p.S = int(Sb.max()) if B else 0
    p.q_len = np.ascontiguousarray(np.broadcast_to(Lb[None, :], (Hq, B)).reshape(-1), dtype=np.int64)
    p.k_len = np.ascontiguousarray(np.broadcast_to(Sb[None, :], (Hq, B)).reshape(-1), dtype=np.int64)
    if alibi_slopes is not None:
        p.slopes = np.ascontiguousarray(np.broadcast_to(_spec.head_slopes(alibi_slopes, (Hq,))[:, None],
                                                        (Hq, B))).reshape(-1)
    if sinks is not None:
        p.sinks = np.ascontiguousarray(np.broadcast_to(_spec.head_sinks(sinks, (Hq,))[:, None],
                                                       (Hq, B))).reshape(-1)
    p.mask_kind = SA_MASK_NONE
    _set_data(p, q, k, v, None)
    return p


def describe_paged(query, k_pages, v_pages, block_table, seq_lens, *, scale=None, window_size=None,
                   alibi_slopes=None, softcap=None, sinks=None, num_sink_tokens=None, num_threads=None,
                   k_scale=None, v_scale=None):
    """A paged KV cache's problem (see selfattn.paged_attention), validated -> Problem: the dense
    problem of query (B, Hq, n, E) against keys (B, H, S = max(seq_lens), E), bottom-right
    causal with key_lengths = seq_lens and grouped-query heads, whose K/V rows the kernel finds
    through block_table in k_pages / v_pages (num_blocks, page_size, H, E / Ev)."""
    q = _meta(query, "query")
    k = _meta(k_pages, "k_pages")
    v = _meta(v_pages, "v_pages")
    if q.ndim != 4:
        raise ValueError(f"query must be 4-D (batch, Hq, n, E): each sequence's last n positions, got shape {q.shape}")
    for a, nm, w in ((k, "k_pages", "E"), (v, "v_pages", "Ev")):
        if a.ndim != 4:
            raise ValueError(f"{nm} must be 4-D (num_blocks, block_size, H, {w}), got shape {a.shape}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k_pages {k.shape} and v_pages {v.shape} must have the same (num_blocks, block_size, H)")
    if k.shape[1] < 1:
        raise ValueError(f"block_size (k_pages.shape[1]) must be >= 1, got shape {k.shape}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"query {q.shape} and k_pages {k.shape} must have the same last dim E")
    quant = k_scale is not None or v_scale is not None
    cdef int kind = _kv_kind_of(q, k, v, quant)
    if kind == SA_KV_PLAIN and (k.dtype != q.dtype or v.dtype != q.dtype):
        raise TypeError(f"query, k_pages and v_pages must have one dtype (pages are read as stored, never "
                        f"converted; float32 queries also take bfloat16, float16, float8 or int8 pages): got query "
                        f"{q.dtype}, k_pages {k.dtype}, v_pages {v.dtype}")
    cdef int64_t B = q.shape[0], H = k.shape[2], nblk = k.shape[0], ps = k.shape[1]
    bt, sl = _spec.paged_tables(block_table, seq_lens, B, nblk, ps)
    # S: the longest sequence (not max_blocks * page_size), as a dense cache's views have it, so that
    # the decode's key chunks (which depend on S) and so the bits are the same as there
    cdef int64_t S = int(sl.max()) if B else 0
    kspec, vspec = ArraySpec((B, H, S, k.shape[3]), k.dtype), ArraySpec((B, H, S, v.shape[3]), v.dtype)
    ks = vs = None
    if kind in (SA_KV_INT8, SA_KV_FP8_E4M3, SA_KV_FP8_E5M2):
        if (k_scale is None) != (v_scale is None):
            raise TypeError(f"k_scale and v_scale go together (quantized pages, each with its scales): got "
                            f"{'k_scale' if v_scale is None else 'v_scale'} only")
        if k_scale is None:                     # float8 without scales: 1
            k_scale = v_scale = np.ones((), np.float32)
        ks, vs = _meta(k_scale, "k_scale"), _meta(v_scale, "v_scale")
        for sc, nm, an in ((ks, "k_scale", "k_pages"), (vs, "v_scale", "v_pages")):
            if sc.dtype.kind != "f" or sc.dtype.itemsize > 8:
                raise TypeError(f"{nm} must be floating (float32), got dtype {sc.dtype}")
            if _broadcast(tuple(k.shape[:3]), tuple(sc.shape)) != tuple(k.shape[:3]):
                raise ValueError(f"{nm} must broadcast to the shape of {an} without its last dim, "
                                 f"{tuple(k.shape[:3])} (a scale per block row and kv head, or per kv head), "
                                 f"got {tuple(sc.shape)}")
    cdef Problem p = _describe(q if type(q) is ArraySpec else ArraySpec(tuple(q.shape), q.dtype), kspec, vspec,
                               None, True, scale, True, num_threads, window_size, "bottom_right", sl, alibi_slopes,
                               softcap, None, None, sinks, num_sink_tokens,
                               None if ks is None else ArraySpec((B, H, S), ks.dtype),
                               None if vs is None else ArraySpec((B, H, S), vs.dtype))
    p.paged, p.block_table, p.page_size = True, bt, ps
    if type(q) is ArraySpec or type(k) is ArraySpec or type(v) is ArraySpec:
        return p
    if p.kv_scaled:
        if type(ks) is ArraySpec or type(vs) is ArraySpec:
            return p
        p.k_scale = np.broadcast_to(_ready(ks, cnp.NPY_FLOAT), tuple(k.shape[:3]))
        p.v_scale = np.broadcast_to(_ready(vs, cnp.NPY_FLOAT), tuple(k.shape[:3]))
        p.q = _ready(q, p.typenum)
        p.k = k if cnp.PyArray_ISNOTSWAPPED(k) else k.copy()
        p.v = v if cnp.PyArray_ISNOTSWAPPED(v) else v.copy()
    elif p.kv_quant:                            # bfloat16 / float16 pages under float32 queries
        p.q, p.k, p.v = _ready(q, p.typenum), _ready16(k), _ready16(v)
    elif p.storage != SA_STORE_NATIVE:
        p.q, p.k, p.v = _ready16(q), _ready16(k), _ready16(v)
    else:
        p.q, p.k, p.v = _ready(q, p.typenum), _ready(k, p.typenum), _ready(v, p.typenum)
    return p


def paged_decodes(Problem p):
    """Whether the kernel reads this paged problem's pages in place (the decode schedule: at most
    16 query rows per kv head and sequence, Hq / H x n); else selfattn.paged gathers them."""
    if not p.paged:
        raise ValueError("not a paged problem")
    return (p.group * p.L <= SA_DECODE_ROWS and p.S > 0 and p.n_units > 0
            and _forced_schedule in (SA_SCHEDULE_AUTO, SA_SCHEDULE_DECODE))


def paged(Problem p, bint return_lse=False, bint schedule_only=False):
    """Run a paged problem (describe_paged) in the decode schedule, pages read in place."""
    if not paged_decodes(p):
        raise ValueError(f"the kernel reads pages in place for at most {SA_DECODE_ROWS} query rows per kv head "
                         f"(Hq / H x n = {p.group * p.L})")
    if schedule_only:
        return p.schedule(return_lse=return_lse)
    return p._run(None, return_lse)


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


cdef void _index_offsets(int64_t n, int nd, const int64_t *shape, const int64_t *strides, int64_t *idx,
                         int64_t *dst, int group_last) noexcept:
    """dst[u] = sum_d idx_d(u) * strides[d] over the C-order multi-indices idx(u) of `shape`, u < n;
    group_last > 1 divides the last index by it (query head h reads kv head h // group)."""
    cdef int64_t u, off, ii
    cdef int d
    for d in range(nd):
        idx[d] = 0
    for u in range(n):
        off = 0
        for d in range(nd):
            ii = idx[d]
            if d == nd - 1 and group_last > 1:
                ii = ii // group_last
            off += ii * strides[d]
        dst[u] = off
        d = nd - 1
        while d >= 0:
            idx[d] += 1
            if idx[d] < shape[d]:
                break
            idx[d] = 0
            d -= 1


cdef int64_t *_dense_units(Problem p, _Units *t, object out, object lse, bint grads) except NULL:
    """The unit table of a dense problem, in one allocation (the caller frees it): units in C
    order of the output's batch dims, each K/V once (C order of kv_batch), units grouped by K/V."""
    q, k, v, m = p.q, p.k, p.v, p.mask
    cdef tuple ob = p.batch, kvb = p.kv_batch
    cdef int nb = len(ob), nkb = len(kvb), d, j
    cdef int64_t n_units = p.n_units, n_kv = 1, u, c
    for d in range(nkb):
        n_kv *= <int64_t> kvb[d]
    cdef int64_t *tab = <int64_t *> _alloc(sizeof(int64_t) * (9 * n_units + 8 * n_kv + 1 + 8 * (nb + nkb + 1)))
    t.n_units, t.n_kv = n_units, n_kv
    t.q_off = tab
    t.o_off = t.q_off + n_units
    t.l_off = t.o_off + n_units
    t.m_off = t.l_off + n_units
    cdef int64_t *u_kv = t.m_off + n_units      # the distinct K/V of each unit
    t.kv_units = u_kv + n_units
    t.dq_off = t.kv_units + n_units
    t.kv_k = t.dq_off + n_units
    t.kv_v = t.kv_k + n_kv
    t.dk_off = t.kv_v + n_kv
    t.dv_off = t.dk_off + n_kv
    t.kv_ks = t.dv_off + n_kv
    t.kv_vs = t.kv_ks + n_kv
    t.kv_bt = t.kv_vs + n_kv
    t.kv_start = t.kv_bt + n_kv
    cdef int64_t *oshape = t.kv_start + n_kv + 1     # per-dim tables: 6 of nb, then 4 of nkb
    cdef int64_t *idx = oshape + nb
    cdef int64_t *st = idx + nb                 # element strides per output batch dim
    cdef int64_t *kvs = st + nb                 # index of the distinct K/V per output batch dim
    cdef int64_t *kvshape = kvs + nb
    cdef int64_t *ks = kvshape + nkb
    for d in range(nb):
        oshape[d] = ob[d]
        kvs[d] = 0
    for d in range(nkb):
        kvshape[d] = kvb[d]
    _batch_strides(q, nb, st)
    _index_offsets(n_units, nb, oshape, st, idx, t.q_off, 1)
    _batch_strides(out, nb, st)
    _index_offsets(n_units, nb, oshape, st, idx, t.o_off, 1)
    for d in range(nb):
        st[d] = 0
    if lse is not None:
        _batch_strides(lse[..., None], nb, st)
    _index_offsets(n_units, nb, oshape, st, idx, t.l_off, 1)
    for d in range(nb):                         # mask batch dims, right-aligned; missing/1 -> 0
        j = d - (nb - (m.ndim - 2)) if m is not None else -1
        st[d] = 0 if (j < 0 or m.shape[j] == 1) else m.strides[j] // m.itemsize
    _index_offsets(n_units, nb, oshape, st, idx, t.m_off, 1)
    c = 1                                       # the kv batch shape's contiguous strides, on ob's dims
    for d in range(nkb - 1, -1, -1):
        if kvb[d] != 1:
            kvs[d + (nb - nkb)] = c
        c *= kvb[d]
    _index_offsets(n_units, nb, oshape, kvs, idx, u_kv, <int> p.group)
    if p.paged:                 # kv unit g = (sequence b, kv head h): head h inside a page, row b of the table
        for u in range(n_kv):
            t.kv_k[u] = (u % kvb[1]) * _stride(k, 2)
            t.kv_v[u] = (u % kvb[1]) * _stride(v, 2)
            t.kv_bt[u] = (u // kvb[1]) * p.block_table.shape[1]
            if p.kv_scaled:
                t.kv_ks[u] = (u % kvb[1]) * _stride(p.k_scale, 2)
                t.kv_vs[u] = (u % kvb[1]) * _stride(p.v_scale, 2)
    else:
        _batch_strides(k, nkb, ks)
        _index_offsets(n_kv, nkb, kvshape, ks, idx, t.kv_k, 1)
        _batch_strides(v, nkb, ks)
        _index_offsets(n_kv, nkb, kvshape, ks, idx, t.kv_v, 1)
    if p.kv_scaled and not p.paged:             # the scales, shaped like K / V with one column
        _batch_strides(p.k_scale, nkb, ks)
        _index_offsets(n_kv, nkb, kvshape, ks, idx, t.kv_ks, 1)
        _batch_strides(p.v_scale, nkb, ks)
        _index_offsets(n_kv, nkb, kvshape, ks, idx, t.kv_vs, 1)
    for u in range(n_kv + 1):                   # units grouped by K/V (counting sort)
        t.kv_start[u] = 0
    for u in range(n_units):
        t.kv_start[u_kv[u] + 1] += 1
    for u in range(n_kv):
        t.kv_start[u + 1] += t.kv_start[u]
    for u in range(n_units):
        t.kv_units[t.kv_start[u_kv[u]]] = u
        t.kv_start[u_kv[u]] += 1
    for u in range(n_kv, 0, -1):
        t.kv_start[u] = t.kv_start[u - 1]
    t.kv_start[0] = 0
    if grads:           # dq per unit, dk and dv per K/V: contiguous arrays of the problem's shapes
        for u in range(n_units):
            t.dq_off[u] = u * p.L * p.E
        for u in range(n_kv):
            t.dk_off[u] = u * p.S * p.E
            t.dv_off[u] = u * p.S * p.Ev
    return tab


cdef inline int64_t *_p64(object a):
    return <int64_t *> cnp.PyArray_DATA(a)


cdef list _varlen_units(Problem p, _Units *t, object out, object lse, object dq, object dk, object dv):
    """The unit table of a varlen problem: unit h * B + b is query head h at sequence b, reading
    K/V hk * B + b (hk = h // group); each at its sequence's first row. Returns the arrays
    the table points into (the caller keeps them alive)."""
    cdef int64_t Hq = p.batch[0], B = p.batch[1], H = p.kv_batch[0], group = p.group
    cu_q, cu_k = p.cu_q[:-1], p.cu_k[:-1]
    hs, hk = np.arange(Hq, dtype=np.int64)[:, None], np.arange(H, dtype=np.int64)[:, None]

    def off(a, rows_start, h):   # element offset of (head h, first row of the sequence), C order
        if a is None:
            return np.zeros(h.shape[0] * B, np.int64)
        return np.ascontiguousarray((h * (a.strides[0] // a.itemsize)
                                     + rows_start[None, :] * (a.strides[1] // a.itemsize)).reshape(-1),
                                    dtype=np.int64)

    keep = [off(p.q, cu_q, hs), off(out, cu_q, hs), off(lse, cu_q, hs), np.zeros(Hq * B, np.int64),
            off(p.k, cu_k, hk), off(p.v, cu_k, hk), np.arange(H * B + 1, dtype=np.int64) * group,
            np.ascontiguousarray(((hk[:, :, None] * group + np.arange(group)[None, None, :]) * B
                                  + np.arange(B)[None, :, None]).reshape(-1), dtype=np.int64),
            off(dq, cu_q, hs), off(dk, cu_k, hk), off(dv, cu_k, hk)]
    t.q_off, t.o_off, t.l_off, t.m_off = _p64(keep[0]), _p64(keep[1]), _p64(keep[2]), _p64(keep[3])
    t.kv_k, t.kv_v, t.kv_start, t.kv_units = _p64(keep[4]), _p64(keep[5]), _p64(keep[6]), _p64(keep[7])
    t.dq_off, t.dk_off, t.dv_off = _p64(keep[8]), _p64(keep[9]), _p64(keep[10])
    t.n_units, t.n_kv = Hq * B, H * B
    return keep


cdef inline const int64_t *_i64(object a):
    return <const int64_t *> cnp.PyArray_DATA(a) if a is not None else NULL


cdef void _fill_args(sa_attn_args *a, Problem p, _Units *t, object out, object lse, object dout, object dq,
                     object dk, object dv):
    """sa_attn_args for a problem, its unit table and the outputs (the backward's when dout is
    given): the one place it is written. Fields not set stay "none" (selfattn.h)."""
    memset(a, 0, sizeof(a[0]))
    q, k, v, m = p.q, p.k, p.v, p.mask
    a.n_units, a.n_kv = t.n_units, t.n_kv
    a.L, a.S, a.E, a.Ev = p.L, p.S, p.E, p.Ev
    a.q, a.q_off, a.q_sl, a.q_se = cnp.PyArray_DATA(q), t.q_off, _stride(q, -2), _stride(q, -1)
    a.k, a.kv_k_off, a.k_ss, a.k_se = cnp.PyArray_DATA(k), t.kv_k, _stride(k, -2), _stride(k, -1)
    a.v, a.kv_v_off, a.v_ss, a.v_se = cnp.PyArray_DATA(v), t.kv_v, _stride(v, -2), _stride(v, -1)
    a.kv_start, a.kv_units = t.kv_start, t.kv_units
    a.storage = p.storage
    a.mask_kind, a.mask_off = p.mask_kind, t.m_off
    if m is not None:
        a.mask = cnp.PyArray_DATA(m)
        a.mask_sl = _stride(m, -2) if m.ndim >= 2 else 0
        a.mask_ss = _stride(m, -1) if m.ndim >= 1 else 0
        if p.mask_kind == SA_MASK_BLOCKS:
            a.bm_bits = <const uint8_t *> cnp.PyArray_DATA(p.bm_bits)
            a.bm_rows, a.bm_keys = p.bm_rows, p.bm_keys
    a.out, a.out_off, a.out_sl, a.out_se = cnp.PyArray_DATA(out), t.o_off, _stride(out, -2), _stride(out, -1)
    a.lse_off = t.l_off
    if lse is not None:
        a.lse, a.lse_sl = cnp.PyArray_DATA(lse), _stride(lse, -1)
    a.scale = p.scale
    a.q_len, a.k_len, a.q_pos = _i64(p.q_len), _i64(p.k_len), _i64(p.q_pos)
    a.alibi_slope = <const double *> cnp.PyArray_DATA(p.slopes) if p.slopes is not None else NULL
    a.sink = <const double *> cnp.PyArray_DATA(p.sinks) if p.sinks is not None else NULL
    a.sink_tokens = p.sink_tokens
    a.dropout_p, a.dropout_seed = p.dropout_p, p.dropout_seed
    if p.has_sm:
        a.score_mod = &p.smod
    a.kv_quant = p.kv_quant
    if p.kv_scaled:
        a.k_scale, a.kv_ks_off, a.ks_s = <const float *> cnp.PyArray_DATA(p.k_scale), t.kv_ks, _stride(p.k_scale, -2)
        a.v_scale, a.kv_vs_off, a.vs_s = <const float *> cnp.PyArray_DATA(p.v_scale), t.kv_vs, _stride(p.v_scale, -2)
    if p.paged:             # pages (num_blocks, page_size, H, E): rows along axis 1, pages along axis 0
        a.block_table, a.kv_bt_off = <const int32_t *> cnp.PyArray_DATA(p.block_table), t.kv_bt
        a.page_size, a.k_page_s, a.v_page_s = p.page_size, _stride(k, 0), _stride(v, 0)
        a.k_ss, a.v_ss = _stride(k, 1), _stride(v, 1)
        if p.kv_scaled:     # scales (num_blocks, page_size, H)
            a.ks_s, a.vs_s = _stride(p.k_scale, 1), _stride(p.v_scale, 1)
            a.ks_page_s, a.vs_page_s = _stride(p.k_scale, 0), _stride(p.v_scale, 0)
    o = p.opts
    a.num_threads, a.causal, a.window, a.window_left, a.window_right = o[0], o[1], o[2], o[3], o[4]
    a.alignment, a.softcap = o[5], o[6]
    a.schedule = _forced_schedule
    if PyThread_get_thread_ident() == _main_ident:
        a.interrupt = _check_signals      # only the main thread sees signals (asked now, not at import)
    if dout is not None:    # the cotangent (laid out like out) and the gradients, rows x columns last
        a.dout, a.dout_sl, a.dout_se = cnp.PyArray_DATA(dout), _stride(dout, -2), _stride(dout, -1)
        a.dq, a.dq_off, a.dq_sl, a.dq_se = cnp.PyArray_DATA(dq), t.dq_off, _stride(dq, -2), _stride(dq, -1)
        a.dk, a.dk_off, a.dk_ss, a.dk_se = cnp.PyArray_DATA(dk), t.dk_off, _stride(dk, -2), _stride(dk, -1)
        a.dv, a.dv_off, a.dv_ss, a.dv_se = cnp.PyArray_DATA(dv), t.dv_off, _stride(dv, -2), _stride(dv, -1)


# ------------------------------------------------------------ entry points --
# What the Python modules call: each one problem, described once.

def sdpa(query, key, value, *, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
         return_lse=False, num_threads=None, window_size=None, alignment="top_left", key_lengths=None,
         alibi_slopes=None, softcap=None, out=None, schedule_only=False, query_lengths=None,
         query_offsets=None, sinks=None, num_sink_tokens=None, k_scale=None, v_scale=None, block_mask=None,
         dropout_p=0.0, dropout_seed=0, score_mod=None):
    """The fused forward (see selfattn.scaled_dot_product_attention; query_lengths and
    query_offsets: see describe). Keyword-only past the arrays, so a new parameter can never shift
    the others. schedule_only=True validates and returns the kernel's plan without computing."""
    cdef Problem p = _describe(query, key, value, attn_mask, is_causal, scale, enable_gqa, num_threads,
                               window_size, alignment, key_lengths, alibi_slopes, softcap, query_lengths,
                               query_offsets, sinks, num_sink_tokens, k_scale, v_scale, block_mask, dropout_p,
                               dropout_seed, score_mod)
    if schedule_only:
        return p.schedule(return_lse=return_lse)
    return p._run(out, return_lse)


def sdpa_bwd(query, key, value, out, lse, grad_out, *, attn_mask=None, is_causal=False, scale=None,
             enable_gqa=False, num_threads=None, window_size=None, alignment="top_left", key_lengths=None,
             alibi_slopes=None, softcap=None, schedule_only=False, sinks=None, num_sink_tokens=None,
             block_mask=None, dropout_p=0.0, dropout_seed=0, score_mod=None):
    """The fused backward of sdpa: out and lse are what sdpa(..., return_lse=True) returned for
    the same arguments, grad_out the cotangent (out's shape and dtype). Returns (dq, dk, dv):
    dq with the output's batch dims (..., Hq, L, E), dk and dv with the broadcast batch dims of
    key and value (..., H, S, E / Ev); selfattn.autograd sums them back to the inputs' shapes."""
    cdef Problem p = _describe(query, key, value, attn_mask, is_causal, scale, enable_gqa, num_threads,
                               window_size, alignment, key_lengths, alibi_slopes, softcap, None, None, sinks,
                               num_sink_tokens, None, None, block_mask, dropout_p, dropout_seed, score_mod)
    if schedule_only:
        return p.schedule(backward=True)
    return p.backward(out, lse, grad_out)


def varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, *, scale=None, is_causal=False, window_size=None,
           alignment="top_left", alibi_slopes=None, softcap=None, enable_gqa=False, return_lse=False,
           num_threads=None, schedule_only=False, sinks=None, num_sink_tokens=None):
    """Packed variable-length batches. See selfattn.varlen_attention."""
    p = describe_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, scale=scale, is_causal=is_causal,
                        window_size=window_size, alignment=alignment, alibi_slopes=alibi_slopes,
                        softcap=softcap, enable_gqa=enable_gqa, num_threads=num_threads, sinks=sinks,
                        num_sink_tokens=num_sink_tokens)
    if schedule_only:
        return p.schedule(return_lse=return_lse)
    return p.run(None, return_lse)


def varlen_bwd(query, key, value, cu_seqlens_q, cu_seqlens_k, out, lse, grad_out, *, scale=None,
               is_causal=False, window_size=None, alignment="top_left", alibi_slopes=None, softcap=None,
               enable_gqa=False, num_threads=None, schedule_only=False, sinks=None, num_sink_tokens=None):
    """The fused backward of varlen: (dq, dk, dv) in the packed layouts of query, key, value."""
    p = describe_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, scale=scale, is_causal=is_causal,
                        window_size=window_size, alignment=alignment, alibi_slopes=alibi_slopes,
                        softcap=softcap, enable_gqa=enable_gqa, num_threads=num_threads, sinks=sinks,
                        num_sink_tokens=num_sink_tokens)
    if schedule_only:
        return p.schedule(backward=True)
    return p.backward(out, lse, grad_out)


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
            "ring_blocks": sched.ring_blocks, "prefetch": bool(sched.prefetch),
            "workspace_bytes": ws_bytes}

