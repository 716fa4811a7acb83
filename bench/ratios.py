#!/usr/bin/env python
"""selfattn performance report: GFLOP/s table, ratios and the project's performance goals.

The goals (the PASS/FAIL list at the end) were set on the development machine, an AVX-512
CPU (AMD Zen 5, 2 vCPUs). On another CPU, above all one without AVX-512, a FAIL means
"slower than on that machine", not that something is broken.

    python bench/ratios.py                 # full run, several minutes on 2 cores
    python bench/ratios.py --quick         # a couple of shapes, reduced targets, < 1 minute
    python bench/ratios.py --threads 1     # pin every implementation to 1 thread
    python bench/ratios.py --plot out.png  # also sweep L (B1 H8 E64) and plot GFLOP/s vs L
    python bench/ratios.py --strict        # exit status 1 if any target FAILs

Run it from outside the source tree (e.g. ``cd /tmp``) so that the installed,
compiled selfattn is imported rather than the uncompiled sources.

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
* FLOPs = 4*B*H*L*S*E per forward pass, half of that for causal. The NumPy naive
  computes the full square even when causal; it is still credited with half.
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


def print_header(args, sa, torch):
    print("=" * 100)
    print("selfattn benchmark report" + ("  (--quick)" if args.quick else ""))
    print("=" * 100)
    print(f"date          : {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"cpu           : {_cpu_model()}  [{_cpu_flags()}]")
    try:
        aff = len(os.sched_getaffinity(0))
    except AttributeError:
        aff = "?"
    print(f"cpus          : os.cpu_count()={os.cpu_count()}  affinity={aff}  load avg={_loadavg()}")
    print(f"threads       : {args.threads} (selfattn num_threads, torch.set_num_threads, NumPy BLAS)")
    print(f"python        : {platform.python_version()}  {platform.platform()}")
    print(f"numpy         : {np.__version__}  BLAS: {_blas_info()}")
    if torch is not None:
        try:
            cap = torch.backends.cpu.get_cpu_capability()
        except Exception:
            cap = "?"
        print(f"torch         : {torch.__version__}  threads={torch.get_num_threads()}  cpu capability={cap}")
    else:
        print("torch         : not installed (torch columns and torch-relative targets are skipped)")
    try:
        cfg = sa.config()
        print("selfattn      : " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    except Exception as exc:
        print(f"selfattn      : config() failed: {exc!r}")
    env = ["OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
           "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"]
    print("environment   : " + "  ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in env))
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


def _blas_info():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "(threadpoolctl not installed: BLAS threads not pinned)"
    parts = []
    for d in threadpool_info():
        if d.get("user_api") == "blas":
            parts.append(f"{d.get('internal_api')} {d.get('version')} {d.get('architecture', '')} "
                         f"threads={d.get('num_threads')}")
    return "; ".join(parts) or "?"


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

class Targets:
    def __init__(self):
        self.items = []

    def add(self, tid, what, value, bound, op=">=", unit="x", note=""):
        """value None -> SKIP. op '>=' or '<='."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            status = "SKIP"
        elif isinstance(value, bool):
            status = "PASS" if value else "FAIL"
        elif bound is None:
            status = "INFO"
        else:
            status = "PASS" if (value >= bound if op == ">=" else value <= bound) else "FAIL"
        self.items.append(dict(tid=tid, what=what, value=value, bound=bound, op=op, unit=unit,
                               note=note, status=status))

    def print(self):
        print("PERFORMANCE GOALS (set on an AVX-512 machine, AMD Zen 5, 2 vCPUs; on other CPUs a FAIL means")
        print("'below what that machine reaches', not a defect; the numbers in [ ] only group the goals)")
        print("-" * 100)
        for t in self.items:
            v = t["value"]
            if v is None:
                vs = "n/a"
            elif isinstance(v, bool):
                vs = str(v)
            else:
                vs = _num(v) + t["unit"]
            bs = f"{t['op']} {_num(t['bound'])}{t['unit']}" if t["bound"] is not None else ""
            note = f"  ({t['note']})" if t["note"] else ""
            tid = f"[{t['tid']}]"
            print(f"  {tid:<5}{t['what']:<60} {vs:>10}  {bs:<14} {t['status']}{note}")
        counts = {s: sum(t["status"] == s for t in self.items) for s in ("PASS", "FAIL", "SKIP", "INFO")}
        print("-" * 100)
        print("  " + "  ".join(f"{k}: {v}" for k, v in counts.items()))
        return counts


def _num(x):
    if x is None:
        return ""
    ax = abs(x)
    if ax != 0 and (ax < 1e-2 or ax >= 1e5):
        return f"{x:.2e}"
    return f"{x:.2f}" if ax < 100 else f"{x:.0f}"


def targets_from_table(rows, T, quick):
    qnote = "quick: reduced shape" if quick else ""
    for row in rows:
        s, gf = row["shape"], row["gflops"]
        sa_, to, ge = gf.get("selfattn"), gf.get("torch"), gf.get("gemm")
        lab = f"{_dname(s['dtype'])} {row['label']}"
        if s["dtype"] == F32 and s["B"] == 1:
            # target 1: B1 H8 L{1024,4096} E{64,128} (causal or not) and B1 H1 L16384 E64
            T.add(1, f"{lab}: selfattn / torch", _ratio(sa_, to), 1.15)
            T.add(1, f"{lab}: selfattn / sgemm", _ratio(sa_, ge), 0.85)
        elif s["dtype"] == F32 and s["B"] == 32:
            T.add(2, f"{lab}: selfattn / torch", _ratio(sa_, to), 2.0)
        elif s["dtype"] == F64:
            note = qnote if s["L"] != 2048 else ""
            T.add(3, f"{lab}: selfattn / torch fp64", _ratio(sa_, to), 1.15, note=note)


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
        T.add(4, f"overhead seed 4x3 {_dname(dt)}: selfattn / NumPy naive time", r, 0.5, op="<=",
              note=f"{med['selfattn'] * 1e6:.1f} us vs {med['numpy'] * 1e6:.1f} us" +
                   ("" if dt == F64 else "; info"))


def target_scaling(T, args, timer, ncpu):
    """[5] 2 threads vs 1 thread on B1 H8 L4096 E64 (and B1 H1 L4096 printed)."""
    L = 2048 if args.quick else 4096
    note = "quick: reduced shape" if args.quick else ""
    for H, is_target in ((8, True), (1, False)):
        if ncpu < 2:
            T.add(5 if is_target else "5i", f"fp32 B1 H{H} L{L} E64: 2 threads / 1 thread", None, 1.85,
                  note="fewer than 2 CPUs")
            continue
        q, k, v = impls.make_qkv(1, H, L, 64, F32)
        best = timer.best({"t1": impls.make_selfattn(q, k, v, num_threads=1),
                           "t2": impls.make_selfattn(q, k, v, num_threads=2)})
        sp = best["t1"] / best["t2"]
        fl = impls.attn_flops(1, H, L, L, 64) / 1e9
        info = f"{fl / best['t1']:.1f} -> {fl / best['t2']:.1f} GFLOP/s"
        if is_target:
            T.add(5, f"fp32 B1 H{H} L{L} E64: 2 threads / 1 thread", sp, 1.85,
                  note=info + (f"; {note}" if note else ""))
        else:
            T.add("5i", f"fp32 B1 H{H} L{L} E64: 2 threads / 1 thread", sp, None, note=info + "; info only")


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
        res = subprocess.run([sys.executable, "-c", _MEM_CHILD, str(L), str(E), str(args.threads)],
                             capture_output=True, text=True, env=env, timeout=600)
    except subprocess.TimeoutExpired:
        T.add(6, what, None, 64.0, op="<=", unit=" MiB", note="subprocess timed out")
        return
    if res.returncode != 0:
        T.add(6, what, False, None, note="subprocess failed: " + (res.stderr.strip().splitlines() or ["?"])[-1])
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
        T.add(6, what, False, None, note="output not finite / wrong shape; " + note)
        return
    T.add(6, what, growth, 64.0, op="<=", unit=" MiB", note=note)


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
        T.add(7, what, None, 1.15, note="torch not installed")
        return
    fl = 3 * 2.0 * L * D * D + impls.attn_flops(1, H, L, L, E)
    note += f"; {best['selfattn'] * 1e3:.1f} ms vs {best['torch'] * 1e3:.1f} ms, sa {fl / best['selfattn'] / 1e9:.1f} GFLOP/s"
    T.add(7, what, best["torch"] / best["selfattn"], 1.15, note=note)


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
            T.add(8, what, False, None, note=note)
        else:
            T.add(8, what, e_sa / max(e_ref, 1e-300), 2.0, op="<=", note=note)


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

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=textwrap.dedent(__doc__.split("\n\n", 1)[1]))
    p.add_argument("--quick", action="store_true", help="a couple of shapes and reduced targets (< 1 min)")
    p.add_argument("--threads", type=int, default=None, help="threads for every implementation")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of GFLOP/s vs L (needs matplotlib)")
    p.add_argument("--gemm-n", type=int, default=None, help="size of the square GEMM roof (4096; 2048 with --quick)")
    p.add_argument("--min-rounds", type=int, default=None, help="minimum interleaved rounds per shape (3)")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timing per implementation (1.0; 0.5 with --quick)")
    p.add_argument("--no-targets", action="store_true", help="only the GFLOP/s table")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if a target FAILs")
    args = p.parse_args(argv)

    try:
        import selfattn as sa
        sa.scaled_dot_product_attention  # noqa: B018 - fail here on an uncompiled source tree
    except Exception as exc:
        print(f"cannot import selfattn: {exc!r}\n(run from outside the source tree after installing it)",
              file=sys.stderr)
        return 2

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
    timer = Timer(min_rounds, min_time, max_wall)

    rows = run_table(QUICK_SHAPES if args.quick else FULL_SHAPES, args, timer, torch)
    roof = max((r["gflops"].get("gemm", 0) for r in rows if r["shape"]["dtype"] == F32), default=None)

    if args.plot:
        run_plot(args.plot, args, timer, torch, roof)

    counts = {}
    if not args.no_targets:
        T = Targets()
        targets_from_table(rows, T, args.quick)
        target_overhead(T, args, sa)
        target_scaling(T, args, Timer(min_rounds, min_time, max_wall), ncpu)
        target_memory(T, args, sa)
        target_end_to_end(T, args, sa, timer, torch)
        target_accuracy(T, args, sa, torch)
        T.items.sort(key=lambda t: (int(str(t["tid"]).rstrip("i")), str(t["tid"])))
        if args.quick:
            print("(--quick: targets 1-3 cover only the shapes measured above; 3, 5, 6, 7 use reduced shapes, "
                  "so their PASS/FAIL is indicative only)")
        counts = T.print()
    print(f"\ntotal time {time.perf_counter() - t_start:.0f} s; load avg now {_loadavg()}")
    _warn_load("above")
    return 1 if (args.strict and counts.get("FAIL")) else 0


if __name__ == "__main__":
    sys.exit(main())
