"""A C streaming-read yardstick: the rate one pass over an array's bytes runs at, on n threads.

NumPy's sums under-read a many-core machine (one array, one thread per call, and pairwise sums
that are not free); this is a plain C loop (OpenMP, static split, eight independent integer
accumulators so the adds never bound it), compiled once into a temporary folder with the C
compiler Python was built with and loaded with ctypes. ``available()`` is False where no compiler
works: callers then fall back to NumPy sums and say so.
"""

import ctypes
import hashlib
import os
import shlex
import subprocess
import sysconfig
import tempfile
import time

import numpy as np

SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
/* sum of the 64-bit words of buf[0 .. n), read once, split into nt contiguous parts */
uint64_t stream_sum(const uint64_t *buf, int64_t n, int nt)
{
    uint64_t total = 0;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+ : total)
    for (int t = 0; t < nt; t++) {
        int64_t a = n * t / nt, b = n * (t + 1) / nt;
        uint64_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = a;
        for (; i + 8 <= b; i += 8)
            for (int k = 0; k < 8; k++) s[k] += buf[i + k];
        for (; i < b; i++) s[0] += buf[i];
        total += s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
    }
    return total;
}
"""

_lib = None
_why = None


def _load():
    global _lib, _why
    if _lib is not None or _why is not None:
        return _lib
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    tag = hashlib.sha256(SOURCE.encode()).hexdigest()[:12]
    folder = os.path.join(tempfile.gettempdir(), f"selfattn-bench-{os.getuid() if hasattr(os, 'getuid') else 0}")
    os.makedirs(folder, exist_ok=True)
    so = os.path.join(folder, f"stream_{tag}.so")
    if not os.path.exists(so):
        src = os.path.join(folder, f"stream_{tag}.c")
        with open(src, "w") as f:
            f.write(SOURCE)
        try:
            subprocess.run(cc + ["-O3", "-fopenmp", "-shared", "-fPIC", src, "-o", so + ".tmp"], check=True,
                           capture_output=True)
            os.replace(so + ".tmp", so)
        except (OSError, subprocess.CalledProcessError) as exc:
            _why = f"no C streaming-read yardstick ({' '.join(cc)}: {exc})"
            return None
    lib = ctypes.CDLL(so)
    lib.stream_sum.restype = ctypes.c_uint64
    lib.stream_sum.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    _lib = lib
    return lib


def available():
    return _load() is not None


def why_not():
    _load()
    return _why


def read_once(buf, nt):
    """One pass over buf's bytes (a C-contiguous array whose size is a multiple of 8 bytes) on nt threads."""
    lib = _load()
    return lib.stream_sum(buf.ctypes.data, buf.nbytes // 8, int(nt))


def bandwidth(nbytes, nt, rounds=9):
    """Streaming-read GB/s over a fresh buffer of nbytes (best of rounds), on nt threads."""
    buf = np.ones(max(nbytes // 8, 1), np.uint64)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        read_once(buf, nt)
        best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best / 1e9
