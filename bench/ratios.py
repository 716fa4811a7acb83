#!/usr/bin/env python
"""selfattn performance report: GFLOP/s tables, ratios and the performance targets per ISA.

Four groups of measurements, all in the full run:

    dense       the GFLOP/s table (B1 H8 L{1024,4096} E{64,128}, causal or not; B1 H1 L16384;
                B32 H8 L128; fp64) against torch SDPA, NumPy and the BLAS GEMM roof, then the
                other goals: per-call overhead, thread scaling, memory, attend end to end, accuracy
    models      attention shapes of real models against torch SDPA with the same arguments:
                BERT-base with key padding, Whisper-base encoder, ViT-B/16, Llama prefill (GQA,
                causal), cross-attention with L << S and L >> S, long causal L8192, fp64
    structured  bench/structured.py's cases: a causal window, key_lengths, varlen
    backward    bench/backward.py's cases: forward + backward vs torch's, the backward's GFLOP/s
                vs the forward's, attend_vjp end to end

    python bench/ratios.py                    # every group, 5-10 minutes on 2 cores
    python bench/ratios.py --quick            # every group on fewer/smaller shapes, about 1-2 minutes
    python bench/ratios.py --group models     # one group (repeat --group for several)
    python bench/ratios.py --isa avx2         # both libraries forced to AVX2 (see below)
    python bench/ratios.py --threads 1        # pin every implementation to 1 thread
    python bench/ratios.py --plot out.png     # also sweep L (B1 H8 E64) and plot GFLOP/s vs L
    python bench/ratios.py --strict           # exit status 1 if any target FAILs

Run it from outside the source tree (e.g. ``cd /tmp``) so that the installed,
compiled selfattn is imported rather than the uncompiled sources.

Targets
-------
The bounds depend on the instruction set selfattn runs (bench/_targets.py has the table).
avx512 keeps the project's original goals, set on the development machine (2 vCPUs of an
AVX-512 AMD EPYC): >= 1.15x torch SDPA on the B1 shapes, >= 2x on B32 H8 L128, >= 0.85x
sgemm, >= 1.15x torch on the model shapes. avx2 asks >= 1.3x torch SDPA on every shape (the
model shapes included) and >= 0.85x sgemm at L >= 1024. The portable generic path has no
targets ("no targets set for ISA generic on this CPU": values are reported, nothing FAILs).
The structured-attention targets are the same on every ISA that has targets. A figure
means nothing without the CPU it came from: the report's header names the CPU model, the
ISA selfattn runs, NumPy's BLAS kernel (threadpoolctl) and torch's CPU capability; quote them.

Like for like: --isa
--------------------
torch dispatches its own kernels (ATen's CPU capability, MKL, oneDNN) to the best ISA of the
CPU whatever selfattn runs. ``--isa avx2`` re-runs this script in a child process whose
environment forces both before anything is imported: SELFATTN_ISA=avx2 for selfattn,
ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2 and ONEDNN_MAX_CPU_ISA=AVX2 for torch,
and OPENBLAS_CORETYPE=Haswell for NumPy's OpenBLAS (the GEMM roof) unless already set. The
child checks selfattn.config()["isa"] and torch.backends.cpu.get_cpu_capability() and reports
the check as a target line. ``--isa avx512`` and ``--isa generic`` work the same way.

Method
------
* Implementations, all on the very same NumPy arrays: selfattn (the fused kernel),
  torch.nn.functional.scaled_dot_product_attention on zero-copy torch.from_numpy
  views (if torch is installed), NumPy naive (q @ k^T * scale, softmax, @ v, in the
  input dtype), and a square GEMM (NumPy matmul, float32 "sgemm" for fp32 rows,
  float64 "dgemm" for the fp64 row) of fixed size as the roof: what the machine's
  BLAS sustains on the same number of threads.
* For each shape the implementations run interleaved (round robin, the starting
  implementation rotating every round) after one warm-up call each; the best time of
  each is kept (best-of-N, at least --min-rounds rounds and --min-time seconds per
  implementation, capped by a per-shape wall budget). Before each turn the script
  sleeps 0.05 s (0.25 s after an OpenBLAS call) so that the previous implementation's
  spinning idle worker threads do not steal cores from the next one.
* Threads: --threads N (default: selfattn's default_threads) for all of them:
  selfattn num_threads=N, torch.set_num_threads(N), and threadpoolctl (if installed)
  limits the NumPy BLAS to N.
* FLOPs = 4*B*H*L*S*E per forward pass, half of that for causal; with key padding, only
  the valid keys count. The NumPy naive computes the full square even when causal; it is
  still credited with half.
* Model shapes: before timing, selfattn's output is compared with torch's (the max
  difference is printed), so both really compute the same thing.
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
import timeit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import _attn_impls as impls  # noqa: E402
import _targets  # noqa: E402
from _targets import Targets  # noqa: E402

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


# ---------------------------------------------------------------------------- shapes

def _shape(B, H, L, E, causal=False, dtype=F32):
    return dict(B=B, H=H, L=L, E=E, causal=causal, dtype=np.dtype(dtype))


FULL_SHAPES = (
    [_shape(1, 8, L, E, c) for L in (1024, 4096) for E in (64, 128) for c in (False, True)]
    + [_shape(1, 1, 16384, 64), _shape(32, 8, 128, 64), _shape(1, 8, 2048, 64, dtype=F64)]
)
QUICK_SHAPES = [_shape(1, 8, 1024, 64), _shape(1, 8, 1024, 64, True), _shape(32, 8, 128, 64),
                _shape(1, 8, 1024, 64, dtype=F64)]


def _label(s):
    return impls.shape_str(s["B"], s["H"], s["L"], s["E"]) + (" causal" if s["causal"] else "")


def _dname(dt):
    return "fp32" if np.dtype(dt) == F32 else "fp64"


# ---------------------------------------------------------------------------- timing

class Timer:
    """Interleaved best-of-N timing of several zero-argument callables.

    Each turn first sleeps a little so that the previous implementation's idle
    worker threads have gone to sleep: OpenBLAS workers spin-yield for ~0.1 s after a
    matmul and OpenMP runtimes spin briefly after a parallel region, and on a 2-core
    machine a spinning neighbour can double the time of whatever runs next. Then it
    times a short burst of back-to-back calls (enough to fill ~50 ms, at most 20),
    each timed separately; the best time over all turns is kept.
    """

    BLAS_NAMES = ("numpy", "gemm", "NumPy naive")

    def __init__(self, min_rounds, min_time, max_wall, max_rounds=200, settle=0.05, settle_blas=0.25):
        self.min_rounds, self.min_time, self.max_wall = min_rounds, min_time, max_wall
        self.max_rounds, self.settle, self.settle_blas = max_rounds, settle, settle_blas

    def best(self, fns, min_rounds=None, blas_names=()):
        """{name: best seconds} for the callables in fns that are not None.

        blas_names: further names (besides BLAS_NAMES) whose calls end in an OpenBLAS matmul.
        """
        names = [n for n, f in fns.items() if f is not None]
        if not names:
            return {}
        min_rounds = self.min_rounds if min_rounds is None else min_rounds
        burst = {}
        for n in names:             # warm-up: page faults, thread pools, lazy init; sizes the burst
            t0 = time.perf_counter()
            out = fns[n]()
            dt = time.perf_counter() - t0
            del out
            burst[n] = int(max(1, min(20, 0.05 // max(dt, 1e-6))))
        best = dict.fromkeys(names, math.inf)
        total = dict.fromkeys(names, 0.0)
        t_start = time.perf_counter()
        prev = None
        r = 0
        while True:
            k = r % len(names)
            for n in names[k:] + names[:k]:
                blas = prev in self.BLAS_NAMES or prev in blas_names
                time.sleep(self.settle_blas if blas else self.settle)
                f = fns[n]
                for _ in range(burst[n]):
                    t0 = time.perf_counter()
                    out = f()
                    dt = time.perf_counter() - t0
                    del out
                    best[n] = min(best[n], dt)
                    total[n] += dt
                prev = n
            r += 1
            if r >= self.max_rounds:
                break
            if r >= min_rounds and (min(total.values()) >= self.min_time
                                    or time.perf_counter() - t_start >= self.max_wall):
                break
        return best


def _gemm(n, dtype, seed=1):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n), dtype=dtype)
    b = rng.standard_normal((n, n), dtype=dtype)
    c = np.empty((n, n), dtype)
    return (lambda: np.matmul(a, b, out=c)), 2.0 * n ** 3


# ---------------------------------------------------------------------------- header

def _cpu_model():
    return impls.cpu_model()


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return " ".join(x for x in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl") if x in flags)
    except OSError:
        pass
    return "?"


# selfattn's ISA name -> what torch.backends.cpu.get_cpu_capability() says for the same vectors
# avx512bf16: avx512's kernels for float32 / float64 (its own is bfloat16's forward)
TORCH_CAPABILITY = {"avx512bf16": "AVX512", "avx512": "AVX512", "avx2": "AVX2", "generic": "DEFAULT"}


def print_header(args, sa, torch):
    print("=" * 100)
    print("selfattn benchmark report" + ("  (--quick)" if args.quick else "")
          + f"  groups: {', '.join(args.group)}")
    print("=" * 100)
    cfg = sa.config()
    print(f"date          : {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"cpu           : {_cpu_model()}  [{_cpu_flags()}]")
    print(f"selfattn isa  : {cfg['isa']} (available: {', '.join(cfg['isas_available'])})")
    print(f"numpy BLAS    : {impls.blas_info()}   (the GEMM roof)")
    if torch is not None:
        cap = impls.torch_cpu_capability(torch)
        print(f"torch         : {torch.__version__}  cpu capability={cap}  BLAS={impls.torch_blas(torch)}  "
              f"threads={torch.get_num_threads()}")
    else:
        cap = None
        print("torch         : not installed (torch columns and torch-relative targets are skipped)")
    try:
        aff = len(os.sched_getaffinity(0))
    except AttributeError:
        aff = "?"
    print(f"cpus          : os.cpu_count()={os.cpu_count()}  affinity={aff}  load avg={_loadavg()}")
    print(f"threads       : {args.threads} (selfattn num_threads, torch.set_num_threads, NumPy BLAS)")
    print(f"python        : {platform.python_version()}  {platform.platform()}")
    print(f"numpy         : {np.__version__}")
    print("selfattn      : " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    env = ["SELFATTN_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
           "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT", "OMP_NUM_THREADS",
           "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"]
    print("environment   : " + "  ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in env))
    if _targets.TARGETS.get(cfg["isa"]) is None:
        print(f"targets       : {_targets.no_targets_line(cfg['isa'])}")
    else:
        print(f"targets       : those of ISA {cfg['isa']} (bench/_targets.py)")
    if cap is not None and cap != "?" and TORCH_CAPABILITY.get(cfg["isa"]) != cap:
        print(f"NOTE          : selfattn runs {cfg['isa']} but torch runs {cap}: not like for like; "
              f"--isa {cfg['isa']} forces both")
    _warn_load()
    print()


def _warn_load(where="below"):
    try:
        load = os.getloadavg()[0]
        ncpu = len(os.sched_getaffinity(0))
    except (OSError, AttributeError):
        return
    if load > 0.5 * ncpu:
        print(f"WARNING       : 1-minute load average {load:.2f} on {ncpu} CPUs: other work is running, "
              f"the timings {where} are noisy")


def _loadavg():
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "?"


# ---------------------------------------------------------------------------- table

COLS = ["selfattn", "torch", "numpy", "gemm"]


def run_table(shapes, args, timer, torch):
    """Measure every shape; returns a list of row dicts (GFLOP/s per implementation)."""
    print(f"GFLOP/s per implementation (best of >= {timer.min_rounds} interleaved rounds); "
          f"gemm = NumPy {args.gemm_n}x{args.gemm_n} matmul (sgemm for fp32, dgemm for fp64), the roof")
    hdr = (f"{'shape':<26}{'dtype':>5}{'GFLOP':>8} | {'selfattn':>9}{'torch':>9}{'numpy':>9}{'gemm':>9} |"
           f" {'sa/torch':>8}{'sa/numpy':>9}{'sa/gemm':>8} | {'sa ms':>8}")
    print(hdr)
    print("-" * len(hdr))
    gemms = {}
    rows = []
    for s in shapes:
        dt = s["dtype"]
        q, k, v = impls.make_qkv(s["B"], s["H"], s["L"], s["E"], dt)
        if dt not in gemms:
            gemms[dt] = _gemm(args.gemm_n, dt)
        gemm_fn, gemm_flops = gemms[dt]
        fns = {
            "selfattn": impls.make_selfattn(q, k, v, s["causal"], num_threads=args.threads),
            "torch": impls.make_torch_sdpa(q, k, v, s["causal"]) if torch is not None else None,
            "numpy": impls.make_numpy_naive(q, k, v, s["causal"]),
            "gemm": gemm_fn,
        }
        flops = impls.attn_flops(s["B"], s["H"], s["L"], s["L"], s["E"], s["causal"])
        best = timer.best(fns)
        gf = {n: (gemm_flops if n == "gemm" else flops) / t / 1e9 for n, t in best.items()}
        row = dict(shape=s, label=_label(s), flops=flops, best=best, gflops=gf)
        rows.append(row)
        print(_format_row(row), flush=True)
        del q, k, v, fns
    print()
    return rows


def _fmt(x, w, spec=".1f"):
    return f"{x:>{w}{spec}}" if x is not None else f"{'-':>{w}}"


def _ratio(a, b):
    return a / b if (a is not None and b) else None


def _format_row(row):
    gf = row["gflops"]
    g = {n: gf.get(n) for n in COLS}
    return (f"{row['label']:<26}{_dname(row['shape']['dtype']):>5}{row['flops'] / 1e9:>8.2f} | "
            f"{_fmt(g['selfattn'], 9)}{_fmt(g['torch'], 9)}{_fmt(g['numpy'], 9)}{_fmt(g['gemm'], 9)} | "
            f"{_fmt(_ratio(g['selfattn'], g['torch']), 7, '.2f')}x{_fmt(_ratio(g['selfattn'], g['numpy']), 8, '.2f')}x"
            f"{_fmt(_ratio(g['selfattn'], g['gemm']), 7, '.2f')}x | {row['best']['selfattn'] * 1e3:>8.2f}")


# ---------------------------------------------------------------------------- targets

def targets_from_table(rows, T, quick):
    qnote = "quick: reduced shape" if quick else ""
    for row in rows:
        s, gf = row["shape"], row["gflops"]
        sa_, to, ge = gf.get("selfattn"), gf.get("torch"), gf.get("gemm")
        lab = f"{_dname(s['dtype'])} {row['label']}"
        if s["dtype"] == F32 and s["B"] == 1:
            # B1 H8 L{1024,4096} E{64,128} (causal or not) and B1 H1 L16384 E64
            T.add("dense_torch", f"{lab}: selfattn / torch", _ratio(sa_, to))
        elif s["dtype"] == F32:
            T.add("dense_torch_batched", f"{lab}: selfattn / torch", _ratio(sa_, to))
        elif s["dtype"] == F64:
            note = qnote if s["L"] != 2048 else ""
            T.add("dense_torch_fp64", f"{lab}: selfattn / torch fp64", _ratio(sa_, to), note=note)
        if s["dtype"] == F32 and s["L"] >= 1024:
            T.add("dense_gemm", f"{lab}: selfattn / sgemm", _ratio(sa_, ge))


def target_overhead(T, args, sa):
    """[4] per-call overhead on the seed's 4-token example: median of many calls."""
    a = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9], [1.0, 1.1, 1.2]])
    v = np.array([[0, 0, 1], [0, 1, 0], [0, 1, 0], [1, 0, 0]], dtype=np.float64)
    number, repeat = (200, 15) if args.quick else (1000, 31)
    for dt in (F64, F32):
        q, k, vv = a.astype(dt), a.astype(dt), v.astype(dt)
        fs = {"selfattn": lambda: sa.scaled_dot_product_attention(q, k, vv),
              "numpy": lambda: impls.numpy_naive(q, k, vv)}
        per = {n: [] for n in fs}
        for n, f in fs.items():
            f()
        for _ in range(repeat):          # interleave the repeats
            for n, f in fs.items():
                per[n].append(timeit.Timer(f).timeit(number) / number)
        med = {n: statistics.median(x) for n, x in per.items()}
        r = med["selfattn"] / med["numpy"]
        T.add("overhead", f"overhead seed 4x3 {_dname(dt)}: selfattn / NumPy naive time", r,
              note=f"{med['selfattn'] * 1e6:.1f} us vs {med['numpy'] * 1e6:.1f} us" +
                   ("" if dt == F64 else "; info"))


def target_scaling(T, args, timer, ncpu):
    """[5] 2 threads vs 1 thread on B1 H8 L4096 E64 (and B1 H1 L4096 printed)."""
    L = 2048 if args.quick else 4096
    note = "quick: reduced shape" if args.quick else ""
    for H, is_target in ((8, True), (1, False)):
        if ncpu < 2:
            T.add("scaling" if is_target else "scaling_info", f"fp32 B1 H{H} L{L} E64: 2 threads / 1 thread",
                  None, note="fewer than 2 CPUs", group=None if is_target else "5i")
            continue
        q, k, v = impls.make_qkv(1, H, L, 64, F32)
        best = timer.best({"t1": impls.make_selfattn(q, k, v, num_threads=1),
                           "t2": impls.make_selfattn(q, k, v, num_threads=2)})
        sp = best["t1"] / best["t2"]
        fl = impls.attn_flops(1, H, L, L, 64) / 1e9
        info = f"{fl / best['t1']:.1f} -> {fl / best['t2']:.1f} GFLOP/s"
        if is_target:
            T.add("scaling", f"fp32 B1 H{H} L{L} E64: 2 threads / 1 thread", sp,
                  note=info + (f"; {note}" if note else ""))
        else:
            T.add("scaling_info", f"fp32 B1 H{H} L{L} E64: 2 threads / 1 thread", sp, note=info + "; info only",
                  group="5i")


_MEM_CHILD = r"""
import json, resource, sys, time
import numpy as np
import selfattn
L, E, nt = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

def ru_maxrss_mib():  # KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1.0 if sys.platform == "darwin" else 1024.0) / 2**20

def vmhwm_mib():      # Linux: peak RSS of this process's own address space (None elsewhere)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None

def peaks():
    return dict(ru_maxrss=ru_maxrss_mib(), vmhwm=vmhwm_mib())

# warm up first: shared libraries, the OpenMP thread pool and its stacks belong to the baseline
w = np.ones((1, 1, 64, E), np.float32)
selfattn.scaled_dot_product_attention(w, w, w, num_threads=nt)
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 1, L, E), dtype=np.float32) for _ in range(3))
placeholder = np.ones((1, 1, L, E), np.float32)           # stands in for the output
base = peaks()
del placeholder
t0 = time.perf_counter()
out = selfattn.scaled_dot_product_attention(q, k, v, num_threads=nt)
dt = time.perf_counter() - t0
peak = peaks()
ok = bool(np.isfinite(out).all()) and out.shape == q.shape
print(json.dumps(dict(base=base, peak=peak, seconds=dt, ok=ok, inputs_mib=4 * q.nbytes / 2**20)))
"""


def target_memory(T, args, sa):
    """[6] peak RSS growth of one B1 H1 L65536 E64 fp32 call, in a fresh subprocess."""
    L, E = (16384, 64) if args.quick else (65536, 64)
    what = f"memory fp32 B1 H1 L{L} E64: peak RSS growth"
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(sa.__file__)))
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        # cwd too: "python -c" puts the working directory ahead of PYTHONPATH, and run from
        # a source checkout that would import its unbuilt selfattn/ instead of this one
        res = subprocess.run([sys.executable, "-c", _MEM_CHILD, str(L), str(E), str(args.threads)],
                             capture_output=True, text=True, env=env, timeout=600, cwd=pkg_parent)
    except subprocess.TimeoutExpired:
        T.add("memory_mib", what, None, unit=" MiB", note="subprocess timed out")
        return
    if res.returncode != 0:
        T.add("memory_mib", what, False, note="subprocess failed: " + (res.stderr.strip().splitlines() or ["?"])[-1])
        return
    d = json.loads(res.stdout.strip().splitlines()[-1])
    # Linux carries ru_maxrss across fork+exec (the child starts with the parent's peak,
    # which after the table is GiBs), which can hide the child's own growth; VmHWM is the
    # peak of the child's own address space. Use VmHWM where there is one, report both.
    key = "vmhwm" if d["base"].get("vmhwm") is not None else "ru_maxrss"
    growth = d["peak"][key] - d["base"][key]
    ru_growth = d["peak"]["ru_maxrss"] - d["base"]["ru_maxrss"]
    naive = L * L * 4 / 2**20
    note = (f"{key}: baseline {d['base'][key]:.0f} MiB incl. q,k,v,out {d['inputs_mib']:.0f} MiB"
            + (f"; ru_maxrss growth {ru_growth:.0f} MiB" if key != "ru_maxrss" else "")
            + f"; call {d['seconds']:.1f} s; a materialised L x S fp32 would be {naive:.0f} MiB")
    if args.quick:
        note += "; quick: reduced shape"
    if not d["ok"]:
        T.add("memory_mib", what, False, note="output not finite / wrong shape; " + note)
        return
    T.add("memory_mib", what, growth, unit=" MiB", note=note)


def target_end_to_end(T, args, sa, timer, torch):
    """[7] attend(x, wq, wk, wv, num_heads=8), x (4096, 512), vs torch projections + SDPA."""
    L, D, H = (1024 if args.quick else 4096), 512, 8
    E = D // H
    rng = np.random.default_rng(7)
    x = rng.standard_normal((L, D), dtype=np.float32)
    wq, wk, wv = (rng.standard_normal((D, D), dtype=np.float32) / np.float32(math.sqrt(D)) for _ in range(3))
    what = f"end-to-end attend x({L},{D}) H{H} E{E}: selfattn / torch"
    note = "quick: reduced shape" if args.quick else ""
    fns = {"selfattn": lambda: sa.attend(x, wq, wk, wv, num_heads=H, num_threads=args.threads)}
    if torch is not None:
        F = torch.nn.functional
        tx, twq, twk, twv = (torch.from_numpy(a) for a in (x, wq, wk, wv))

        def torch_e2e():
            # heads made contiguous: torch's CPU SDPA is several times slower on the
            # transposed views (measured), so this is torch at its best
            with torch.inference_mode():
                q = (tx @ twq).view(L, H, E).transpose(0, 1).contiguous().unsqueeze(0)   # (1, H, L, E)
                k = (tx @ twk).view(L, H, E).transpose(0, 1).contiguous().unsqueeze(0)
                v = (tx @ twv).view(L, H, E).transpose(0, 1).contiguous().unsqueeze(0)
                o = F.scaled_dot_product_attention(q, k, v)
                return o.squeeze(0).transpose(0, 1).reshape(L, D)          # same (L, d_model) result
        fns["torch"] = torch_e2e
        diff = float(np.max(np.abs(np.asarray(fns["selfattn"]()) - torch_e2e().numpy())))
        note = (note + "; " if note else "") + f"max |selfattn - torch| = {diff:.1e}"
    best = timer.best(fns, blas_names=("selfattn",))   # attend projects with NumPy matmuls
    if "torch" not in best:
        T.add("end_to_end", what, None, note="torch not installed")
        return
    fl = 3 * 2.0 * L * D * D + impls.attn_flops(1, H, L, L, E)
    note += f"; {best['selfattn'] * 1e3:.1f} ms vs {best['torch'] * 1e3:.1f} ms, sa {fl / best['selfattn'] / 1e9:.1f} GFLOP/s"
    if "OPENBLAS_THREAD_TIMEOUT" not in os.environ and args.threads >= (os.cpu_count() or 1):
        # the kernel starts while NumPy's OpenBLAS workers still spin after the projection
        # matmul (README, "Reference, configuration, dispatch"); torch's one runtime has no such gap
        note += "; OPENBLAS_THREAD_TIMEOUT unset: OpenBLAS's idle spin shares the cores (set it to 4)"
    T.add("end_to_end", what, best["torch"] / best["selfattn"], note=note)


def target_accuracy(T, args, sa, torch):
    """[8] relative Frobenius error vs the float64 reference, unit-normal and scale-100 logits."""
    from selfattn import reference

    B, H, L, E = 1, 8, 1024, 64
    q, k, v = impls.make_qkv(B, H, L, E, F32, seed=8)

    def rel(out, ref):
        out = np.asarray(out, dtype=np.float64)
        return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))

    for label, scale in (("unit-normal", None), ("logits std 100", 100.0 / math.sqrt(E))):
        ref = reference.scaled_dot_product_attention(q, k, v, scale=scale)
        out = np.asarray(sa.scaled_dot_product_attention(q, k, v, scale=scale, num_threads=args.threads))
        finite = bool(np.isfinite(out).all())
        e_sa = rel(out, ref) if finite else math.inf
        if torch is not None:
            e_ref = rel(impls.make_torch_sdpa(q, k, v, scale=scale)().numpy(), ref)
            who = "torch"
        else:
            e_ref = rel(impls.numpy_naive(q, k, v, scale), ref)
            who = "NumPy fp32 (no torch)"
        what = f"accuracy fp32 B1 H8 L1024 E64 {label}: err / {who} err"
        note = f"selfattn {e_sa:.2e}, {who} {e_ref:.2e}" + ("" if finite else "; NON-FINITE output")
        if not finite:
            T.add("accuracy", what, False, note=note)
        else:
            T.add("accuracy", what, e_sa / max(e_ref, 1e-300), note=note)


# ---------------------------------------------------------------------------- models

def run_models(args, timer, torch, T):
    """--group models: each shape of impls.MODEL_CASES, selfattn vs torch SDPA on the same arrays."""
    print("MODEL SHAPES: selfattn vs torch SDPA with the equivalent arguments (GFLOP/s of the keys each query "
          "sees; best of interleaved rounds)" + ("  [--quick: some shapes reduced]" if args.quick else ""))
    hdr = (f"{'model':<22}{'shape':<34}{'dtype':>5}{'GFLOP':>8} | {'selfattn':>9}{'torch':>9} | "
           f"{'sa/torch':>8} | {'sa ms':>8} {'torch ms':>9} | max|diff|")
    print(hdr)
    print("-" * len(hdr))
    for case in impls.MODEL_CASES:
        c = impls.model_case(case, quick=args.quick)
        q, k, v, sa_kw, torch_kw, flops = impls.model_problem(c)
        fns = {"selfattn": impls.make_selfattn_call(q, k, v, sa_kw, num_threads=args.threads),
               "torch": impls.make_torch_call(q, k, v, torch_kw) if torch is not None else None}
        diff = None
        if fns["torch"] is not None:       # the same computation, or the comparison means nothing
            ref = fns["torch"]().numpy()
            diff = float(np.max(np.abs(np.asarray(fns["selfattn"]()) - ref)))
            del ref
        best = timer.best(fns)
        gf = {n: flops / t / 1e9 for n, t in best.items()}
        r = _ratio(gf.get("selfattn"), gf.get("torch"))
        lab = impls.model_label(c)
        tol = 1e-10 if c["dtype"] == F64 else 1e-4
        print(f"{c['name']:<22}{lab:<34}{_dname(c['dtype']):>5}{flops / 1e9:>8.2f} | "
              f"{_fmt(gf.get('selfattn'), 9)}{_fmt(gf.get('torch'), 9)} | {_fmt(r, 7, '.2f')}x | "
              f"{best['selfattn'] * 1e3:>8.2f} {_fmt(best['torch'] * 1e3 if 'torch' in best else None, 9, '.2f')} | "
              f"{'-' if diff is None else f'{diff:.1e}'}", flush=True)
        note = "quick: reduced shape" if args.quick and case.get("quick") else ""
        if diff is not None and not diff <= tol:
            T.add("models_agree", f"{c['name']}: selfattn output == torch's", False, group="9",
                  note=f"max |diff| {diff:.1e} > {tol:.0e}: not the same computation")
        T.add("models_torch", f"{c['name']} {lab}: selfattn / torch", r,
              note=note or ("torch not installed" if r is None else ""))
        del q, k, v, fns
    print()


# ---------------------------------------------------------------------------- structured

def run_structured(args, timer, torch, T):
    """--group structured: bench/structured.py's cases, timed by this script's timer."""
    import structured

    print("STRUCTURED ATTENTION (bench/structured.py's cases)" + ("  [--quick: reduced shapes]" if args.quick else ""))
    structured.run_cases(timer.best, T, torch=torch, quick=args.quick, threads=args.threads,
                         out=lambda line: print(line, flush=True))
    print()


def run_backward(args, timer, torch, T):
    """--group backward: bench/backward.py's cases, timed by this script's timer."""
    import backward

    print("TRAINING: THE FUSED BACKWARD (bench/backward.py's cases)" + ("  [--quick: reduced shapes]" if args.quick else ""))
    backward.run_cases(timer.best, T, torch=torch, quick=args.quick, threads=args.threads,
                       out=lambda line: print(line, flush=True))
    print()


# ---------------------------------------------------------------------------- --isa: both libraries forced

# the environment that makes selfattn, torch (ATen, MKL, oneDNN) and NumPy's OpenBLAS run one ISA;
# read by each library when it loads, so it is set for a fresh child process
FORCE_ENV = {
    "avx512": {"SELFATTN_ISA": "avx512", "ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
               "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "avx2": {"SELFATTN_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "ONEDNN_MAX_CPU_ISA": "AVX2", "OPENBLAS_CORETYPE": "Haswell"},
    "generic": {"SELFATTN_ISA": "generic", "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
_FORCED_MARK = "SELFATTN_BENCH_FORCED_ISA"      # set in the child: it is the forced run


def reexec_forced(isa, argv):
    """Run this script again in a child whose environment forces `isa` on both libraries."""
    env = dict(os.environ)
    force = dict(FORCE_ENV[isa])
    if "OPENBLAS_CORETYPE" in force and env.get("OPENBLAS_CORETYPE"):
        force.pop("OPENBLAS_CORETYPE")          # the user's choice of the GEMM roof wins; printed in the header
    env.update(force)
    env[_FORCED_MARK] = isa
    print(f"--isa {isa}: re-running in a child process with " + " ".join(f"{k}={v}" for k, v in force.items()),
          flush=True)
    return subprocess.run([sys.executable, os.path.abspath(__file__)] + list(argv), env=env).returncode


def check_forced(isa, sa, torch, T):
    """In the forced child: did each library take the ISA? Printed, and a target line (FAIL if not)."""
    got_sa = sa.config()["isa"]
    print(f"forced ISA    : {isa} for both libraries (--isa {isa})")
    print(f"  selfattn    : SELFATTN_ISA={os.environ.get('SELFATTN_ISA')} -> config()['isa'] = {got_sa}")
    ok = got_sa == isa
    if torch is not None:
        cap = impls.torch_cpu_capability(torch)
        print(f"  torch       : ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY')} -> "
              f"torch.backends.cpu.get_cpu_capability() = {cap}")
        print(f"                MKL_ENABLE_INSTRUCTIONS={os.environ.get('MKL_ENABLE_INSTRUCTIONS')}, "
              f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')} (caps only: MKL and oneDNN do not "
              f"report their choice back to Python)")
        ok = ok and cap == TORCH_CAPABILITY[isa]
        what = f"forced: selfattn {got_sa}, torch {cap} (both {isa})"
    else:
        what = f"forced: selfattn {got_sa} (torch not installed)"
    print(f"  numpy BLAS  : OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')} -> {impls.blas_info()}")
    if not ok:
        print(f"WARNING       : the ISA was NOT forced on both libraries: {what}; the comparison is not like for like")
    print()
    T.add("forced", what, ok, group=0)


# ---------------------------------------------------------------------------- plot

def run_plot(path, args, timer, torch, roof):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot: matplotlib is not installed, no plot written to {path}")
        return
    Ls = [256, 512, 1024, 2048] if args.quick else [256, 512, 1024, 2048, 4096, 8192]
    print(f"GFLOP/s vs L for the plot (B1 H8 E64 fp32, non-causal): L = {Ls}")
    series = {"selfattn": [], "torch SDPA": [], "NumPy naive": []}
    for L in Ls:
        q, k, v = impls.make_qkv(1, 8, L, 64, F32)
        fns = {"selfattn": impls.make_selfattn(q, k, v, num_threads=args.threads),
               "torch SDPA": impls.make_torch_sdpa(q, k, v) if torch is not None else None,
               "NumPy naive": impls.make_numpy_naive(q, k, v)}
        best = timer.best(fns)
        fl = impls.attn_flops(1, 8, L, L, 64)
        for n in series:
            series[n].append(fl / best[n] / 1e9 if n in best else None)
        print(f"  L={L:<6} " + "  ".join(f"{n} {_fmt(series[n][-1], 7)}" for n in series), flush=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, ys in series.items():
        pts = [(L, y) for L, y in zip(Ls, ys) if y is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=n)
    if roof:
        ax.axhline(roof, color="k", linestyle="--", label=f"sgemm {args.gemm_n}^2 roof ({roof:.0f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length L (= S)")
    ax.set_ylabel("GFLOP/s (4*B*H*L*S*E / time)")
    ax.set_title(f"attention forward, B1 H8 E64 fp32, {args.threads} thread(s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")
    print()


# ---------------------------------------------------------------------------- main

GROUPS = ("dense", "models", "structured", "backward")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=textwrap.dedent(__doc__.split("\n\n", 1)[1]))
    p.add_argument("--quick", action="store_true", help="fewer and smaller shapes, reduced targets (1-2 min)")
    p.add_argument("--group", action="append", choices=GROUPS,
                   help="run this group only (repeat for several; default: all of them)")
    p.add_argument("--isa", choices=tuple(FORCE_ENV),
                   help="force this ISA on selfattn AND torch (and NumPy's OpenBLAS for avx2), in a child process")
    p.add_argument("--threads", type=int, default=None, help="threads for every implementation")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of GFLOP/s vs L (needs matplotlib)")
    p.add_argument("--gemm-n", type=int, default=None, help="size of the square GEMM roof (4096; 2048 with --quick)")
    p.add_argument("--min-rounds", type=int, default=None, help="minimum interleaved rounds per shape (3)")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timing per implementation (1.0; 0.5 with --quick)")
    p.add_argument("--no-targets", action="store_true", help="only the tables")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if a target FAILs")
    args = p.parse_args(argv)
    args.group = [g for g in GROUPS if g in (args.group or GROUPS)]

    try:
        import selfattn as sa
        sa.scaled_dot_product_attention  # noqa: B018 - fail here on an uncompiled source tree
    except Exception as exc:
        print(f"cannot import selfattn: {exc!r}\n(run from outside the source tree after installing it)",
              file=sys.stderr)
        return 2

    if args.isa and os.environ.get(_FORCED_MARK) != args.isa:
        if args.isa not in sa.available_isas():
            print(f"--isa {args.isa}: this CPU/build cannot run it (available: {', '.join(sa.available_isas())})",
                  file=sys.stderr)
            return 2
        return reexec_forced(args.isa, argv)

    if args.threads is None:
        args.threads = impls.default_threads()
    if args.gemm_n is None:
        args.gemm_n = 2048 if args.quick else 4096
    min_rounds = args.min_rounds or 3
    min_time = args.min_time if args.min_time is not None else (0.5 if args.quick else 1.0)
    max_wall = 5.0 if args.quick else 15.0

    torch = impls.try_import_torch()
    limiter = impls.pin_threads(args.threads)  # noqa: F841 - keep the BLAS limit alive
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:
        ncpu = os.cpu_count() or 1

    t_start = time.perf_counter()
    print_header(args, sa, torch)
    T = Targets(sa.config()["isa"])
    if args.isa:
        check_forced(args.isa, sa, torch, T)
    timer = Timer(min_rounds, min_time, max_wall)

    if "dense" in args.group:
        rows = run_table(QUICK_SHAPES if args.quick else FULL_SHAPES, args, timer, torch)
        roof = max((r["gflops"].get("gemm", 0) for r in rows if r["shape"]["dtype"] == F32), default=None)
        if args.plot:
            run_plot(args.plot, args, timer, torch, roof)
        if not args.no_targets:
            targets_from_table(rows, T, args.quick)
            target_overhead(T, args, sa)
            target_scaling(T, args, Timer(min_rounds, min_time, max_wall), ncpu)
            target_memory(T, args, sa)
            target_end_to_end(T, args, sa, timer, torch)
            target_accuracy(T, args, sa, torch)
    if "models" in args.group:
        run_models(args, timer, torch, T)
    if "structured" in args.group:
        run_structured(args, timer, torch, T)
    if "backward" in args.group:
        run_backward(args, timer, torch, T)

    counts = {}
    if not args.no_targets:
        if args.quick and "dense" in args.group:
            print("(--quick: the dense targets cover only the shapes measured above; several targets use reduced "
                  "shapes, so their PASS/FAIL is indicative only)")
        counts = T.print()
    print(f"\ntotal time {time.perf_counter() - t_start:.0f} s; load avg now {_loadavg()}; "
          f"cpu {_cpu_model()}, selfattn isa {sa.config()['isa']}")
    _warn_load("above")
    return 1 if (args.strict and counts.get("FAIL")) else 0


if __name__ == "__main__":
    sys.exit(main())
