"""Sizes: 64-bit index arithmetic, and allocation failures that end in MemoryError.

* tests/c/test_index64.c is compiled against src_c/ and run: every ISA, both dtypes, offsets
  and strides far beyond 2^31 elements (without allocating that much);
* the same from Python: views with strides > 2^31 elements inside a sparse (MAP_NORESERVE)
  mapping go through the Cython layer's offset tables;
* the workspace allocation failing (debug hook, or a really impossible size) raises
  MemoryError, frees what was allocated, and the next calls work.
"""

import mmap
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import selfattn
from selfattn import _core, reference
from sa_testutil import (ISAS, assert_sdpa_close, build_c_program, env_without_sanitizer, logit_magnitude,
                         vmax_of)

sdpa = selfattn.scaled_dot_product_attention

def _under_asan():
    return "asan" in os.environ.get("LD_PRELOAD", "") or "ASAN_OPTIONS" in os.environ


@pytest.fixture(scope="module")
def index64_binary(tmp_path_factory):
    flags = ["-O1", "-g"]
    if os.environ.get("SELFATTN_CTEST_SANITIZE", "") not in ("", "0"):
        flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
    out, why = build_c_program("test_index64.c", tmp_path_factory.mktemp("index64") / "test_index64",
                               openmp=None, extra_flags=flags)
    if out is None:
        pytest.skip(why)
    return out


@pytest.mark.slow
def test_index64_c_program(index64_binary):
    env = dict(os.environ) if os.environ.get("SELFATTN_CTEST_SANITIZE") else env_without_sanitizer()
    r = subprocess.run([str(index64_binary)], capture_output=True, text=True, timeout=500, env=env)
    tail = (r.stdout[-4000:] + "\n" + r.stderr[-4000:]).strip()
    m = re.search(r"^(\d+) passed, (\d+) failed$", r.stdout, re.M)
    assert r.returncode == 0 and m, f"test_index64 exited {r.returncode}:\n{tail}"
    n_pass, n_fail = int(m.group(1)), int(m.group(2))
    assert n_fail == 0 and n_pass > 0, tail
    # every runnable ISA was covered (the C program sees the same CPU)
    info = re.search(r"isas tested: (\d+), openmp: \d, skipped cases: (\d+)", r.stdout)
    assert info, tail
    assert int(info.group(1)) == len(ISAS), tail
    # a case is skipped only when its sparse address-space reservation fails: none may be, or
    # the 64-bit offsets they exist for go untested while the run still says "passed"
    assert int(info.group(2)) == 0, f"test_index64 skipped {info.group(2)} cases:\n{tail}"


# ---------------------------------------------------------------- Python level

_NORESERVE = 0x4000   # MAP_NORESERVE on Linux (mmap.MAP_NORESERVE needs Python >= 3.13)


@pytest.fixture
def sparse_f32():
    """A 4 TiB float32 address range of which only the touched pages ever exist."""
    if not sys.platform.startswith("linux"):
        pytest.skip("sparse mappings: Linux only")
    nbytes = 1 << 42
    try:
        mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE)
    except (OSError, OverflowError, ValueError) as exc:
        pytest.skip(f"cannot reserve {nbytes} bytes of address space: {exc}")
    buf = np.frombuffer(mm, dtype=np.float32)
    yield buf
    del buf
    try:
        mm.close()
    except BufferError:   # a view is still alive somewhere: the mapping goes with the process
        pass


def _place(buf, start, shape, strides_el, values):
    """A view of buf with element strides (may exceed 2^31) holding `values`."""
    isz = buf.itemsize
    view = np.lib.stride_tricks.as_strided(buf[start:], shape=shape, strides=tuple(s * isz for s in strides_el))
    view[...] = values
    return view


def test_python_views_with_strides_beyond_2_pow_31(sparse_f32):
    buf = sparse_f32
    rng = np.random.default_rng(0)
    B, H, L, S, E, Ev = 2, 2, 5, 130, 4, 3
    G = 1 << 31
    q_vals = rng.standard_normal((B, H, L, E)).astype(np.float32)
    k_vals = rng.standard_normal((B, H, S, E)).astype(np.float32)
    v_vals = rng.standard_normal((1, H, S, Ev)).astype(np.float32)
    m_vals = rng.random((H, L, S)) < 0.7
    m_vals[:, 2, :] = False                       # a fully masked row
    # batch stride > 2^32, head stride > 2^31, rows 2^31 + 7 apart ...
    q = _place(buf, 0, q_vals.shape, (2 * G + 5, G + 3, E, 1), q_vals)
    # ... keys 2^31 + 1 apart (130 keys: two key blocks, each key on its own page)
    k = _place(buf, 1 << 33, k_vals.shape, (S * (G + 1) + 1, S * (G + 1) + 7, G + 1, 1), k_vals)
    # value: columns 2^31 + 11 apart; broadcast over the batch
    v = _place(buf, 1 << 40, v_vals.shape, (0, 4 * G, Ev, G + 11), v_vals)
    assert max(abs(s) for a in (q, k, v) for s in a.strides) > (1 << 33)
    mask = np.lib.stride_tricks.as_strided(
        np.frombuffer(buf.data, dtype=np.uint8)[3 << 40:], shape=m_vals.shape,
        strides=(G + 13, 4 * G + 1, 1)).view(np.bool_)
    mask[...] = m_vals
    for name in ISAS:
        with selfattn.use_isa(name):
            for kw in (dict(), dict(attn_mask=mask), dict(is_causal=True)):
                for nt in (1, 2):
                    out, lse = sdpa(q, k, v, return_lse=True, num_threads=nt, **kw)
                    ref_kw = {kk: (np.array(vv) if isinstance(vv, np.ndarray) else vv) for kk, vv in kw.items()}
                    ref, ref_lse = reference.scaled_dot_product_attention(
                        np.array(q), np.array(k), np.array(v), return_lse=True, **ref_kw)
                    assert_sdpa_close(out, ref, np.float32, vmax_of(v_vals), logit_magnitude(q_vals, k_vals),
                                      lse, ref_lse, ctx=f"{name} {kw.keys()} nt={nt}: ")


# ---------------------------------------------------------------- MemoryError

def _entry_points():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 3, 9, 8))
    k = rng.standard_normal((2, 3, 11, 8))
    v = rng.standard_normal((2, 3, 11, 5))
    mask = rng.random((9, 11)) < 0.6
    x = rng.standard_normal((2, 9, 12))
    wq, wk, wv, wo = (rng.standard_normal(s) for s in ((12, 8), (12, 8), (12, 6), (6, 7)))
    kv1 = (k[:, :1], v[:, :1])
    return {
        "sdpa": lambda: sdpa(q, k, v),
        "sdpa_mask_lse": lambda: sdpa(q, k, v, attn_mask=mask, return_lse=True),
        "sdpa_causal_f32": lambda: sdpa(q.astype(np.float32), k, v.astype(np.float32), is_causal=True),
        "sdpa_gqa": lambda: sdpa(q, *kv1, enable_gqa=True, num_threads=2),
        "attend": lambda: selfattn.attend(x, wq, wk, wv, num_heads=2),
        "attend_wo": lambda: selfattn.attend(x, wq, wk, wv, num_heads=2, wo=wo, is_causal=True),
    }


def _same(a, b):
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b))
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("after", [0, 1], ids=["unit-table", "workspace"])
@pytest.mark.parametrize("n_fail", [1, 3])
@pytest.mark.parametrize("entry", list(_entry_points()))
def test_allocation_failure_is_memoryerror_and_recovers(isa, entry, n_fail, after):
    """after=0 fails a call's first allocation (its unit table), after=1 its second: the
    kernel's workspace (scratch). Each failing call must raise MemoryError and free the rest."""
    fn = _entry_points()[entry]
    expected = fn()
    try:
        _core._debug_fail_allocations(n_fail, after=after)
        for i in range(n_fail):
            with pytest.raises(MemoryError, match="could not allocate"):
                fn()
    finally:
        _core._debug_fail_allocations(0)
    for _ in range(2):                # the failures left nothing behind: same bits as before
        assert _same(fn(), expected)


def test_impossible_workspace_is_memoryerror():
    """E = 2^40 through zero-stride views: the unit table allocates, the workspace (~2^49 bytes)
    cannot; MemoryError, the table is freed, later calls work."""
    if _under_asan() and "allocator_may_return_null=1" not in os.environ.get("ASAN_OPTIONS", ""):
        pytest.skip("ASan aborts on impossible allocations unless allocator_may_return_null=1")
    E = 1 << 40
    rng = np.random.default_rng(3)
    q = np.broadcast_to(np.float32(0.5), (2, 1, E))
    k = np.broadcast_to(np.float32(0.25), (2, 3, E))
    v = rng.standard_normal((2, 3, 2)).astype(np.float32)   # not constant: any weights would pass
    q_small = rng.standard_normal((2, 1, 4)).astype(np.float32)
    k_small = rng.standard_normal((2, 3, 4)).astype(np.float32)
    ref = reference.scaled_dot_product_attention(q_small, k_small, v)
    for name in ISAS:
        with selfattn.use_isa(name):
            with pytest.raises(MemoryError, match="could not allocate"):
                sdpa(q, k, v)
            small = sdpa(q_small, k_small, v)
            assert_sdpa_close(small, ref, np.float32, vmax_of(v), logit_magnitude(q_small, k_small),
                              ctx=f"[isa={name}] after MemoryError: ")


# ---------------------------------------------------------------- thread counts

def test_huge_num_threads_does_not_kill_the_process(tmp_path):
    """num_threads=65536 on a call with 70000 tasks: capped (4 threads per core), not 65536 OpenMP threads."""
    code = ("import numpy as np, selfattn\n"
            "q = np.broadcast_to(np.float32(1), (70000, 1, 4))\n"
            "out = selfattn.scaled_dot_product_attention(q, np.ones((1, 1, 4), np.float32), "
            "np.ones((1, 1, 2), np.float32), num_threads=65536)\n"
            "assert out.shape == (70000, 1, 2)\n")
    # cwd outside the source tree, so the child imports the installed package
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
