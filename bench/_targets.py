"""The performance targets of bench/ratios.py and bench/structured.py, per instruction set.

Not a test module and not part of the installed package (imported as ``_targets`` by the
scripts beside it).

A target is a bound on a measured ratio. Which bound applies depends on the instruction set
the selfattn kernel runs (selfattn.config()["isa"]): what an AVX2 kernel can reach against
torch is not what an AVX-512 one can. An instruction set without an entry in TARGETS has no
targets: every value is reported (INFO), nothing PASSes or FAILs, and the report says so.

The avx512 bounds are the project's original goals, set on the development machine (2 vCPUs of
an AVX-512 AMD EPYC); the avx2
bounds hold for the AVX2+FMA kernel against torch on the same CPU forced to AVX2 as well
(ratios.py --isa avx2), or on a CPU without AVX-512. The structured-attention bounds compare
selfattn with itself (or with torch given a dense mask) and are the same for every
instruction set that has targets.
"""

import math

# ---------------------------------------------------------------------------- the table

# what each key bounds, and in which direction; the numbers in [ ] only group the report
TARGET_KEYS = {
    # [1]-[3] the dense table (ratios.py --group dense)
    "dense_torch": (1, ">=", "fp32 B1 shapes: selfattn / torch SDPA (GFLOP/s)"),
    "dense_torch_batched": (2, ">=", "fp32 many short sequences (B32 H8 L128): selfattn / torch"),
    "dense_torch_fp64": (3, ">=", "fp64: selfattn / torch"),
    "dense_gemm": (1, ">=", "fp32 shapes with L >= 1024: selfattn / sgemm (GFLOP/s)"),
    # [4]-[8] the other goals of the dense group
    "overhead": (4, "<=", "per-call time on the 4x3 example / NumPy naive"),
    "scaling": (5, ">=", "2 threads / 1 thread speed-up"),
    "memory_mib": (6, "<=", "peak RSS growth of one long call (MiB)"),
    "end_to_end": (7, ">=", "attend (projections + attention) / torch"),
    "accuracy": (8, "<=", "error vs float64 / torch's error"),
    # [9] realistic model shapes (ratios.py --group models)
    "models_torch": (9, ">=", "every model shape: selfattn / torch SDPA with the same arguments"),
    # [10]-[12] structured attention (ratios.py --group structured, bench/structured.py)
    "window_ideal": (10, "<=", "causal window: time / (useful FLOPs / dense kernel GFLOP/s)"),
    "window_torch": (10, ">=", "causal window: torch with a dense bool mask / selfattn (time)"),
    "key_lengths": (11, ">=", "key_lengths half invalid: all-valid time / half-valid time"),
    "varlen_dense": (12, ">=", "varlen GFLOP/s / dense batch of the same work GFLOP/s"),
    "varlen_torch": (12, ">=", "torch on the padded batch / varlen (time)"),
    # [16] sinks (bench/structured.py's case 4)
    "sinks_cost": (16, "<=", "sinks=: time with a sink per head / without"),
    "sink_tokens_window": (16, "<=", "decode with 4 sink tokens beside a window / the window alone (time)"),
    # [13]-[15] training (ratios.py --group backward, bench/backward.py)
    "bwd_torch": (13, ">=", "forward + backward / torch's forward + backward (time)"),
    "bwd_fwd": (14, ">=", "backward GFLOP/s (10 BHLSE) / forward GFLOP/s, same shape"),
    "attend_vjp_torch": (15, ">=", "attend_vjp end to end / torch linear + SDPA + autograd"),
}

_STRUCTURED = {"window_ideal": 1.3, "window_torch": 20.0, "key_lengths": 1.8, "varlen_dense": 0.8,
               "varlen_torch": 1.0, "sinks_cost": 1.05, "sink_tokens_window": 1.15}
_NOT_ISA_BOUND = {"overhead": 0.5, "scaling": 1.85, "memory_mib": 64.0, "accuracy": 2.0}
_TRAINING = {"bwd_torch": 1.3, "bwd_fwd": 0.6, "attend_vjp_torch": 1.2}

TARGETS = {
    "avx512": {
        "dense_torch": 1.15, "dense_torch_batched": 2.0, "dense_torch_fp64": 1.15, "dense_gemm": 0.85,
        "end_to_end": 1.15, "models_torch": 1.15, **_NOT_ISA_BOUND, **_STRUCTURED, **_TRAINING,
    },
    "avx2": {
        "dense_torch": 1.3, "dense_torch_batched": 1.3, "dense_torch_fp64": 1.3, "dense_gemm": 0.85,
        "end_to_end": 1.15, "models_torch": 1.3, **_NOT_ISA_BOUND, **_STRUCTURED, **_TRAINING,
    },
    # "generic": no targets -- the portable C path is reported, not judged
}


def no_targets_line(isa):
    return f"no targets set for ISA {isa} on this CPU (the values below are reported, not judged)"


# ---------------------------------------------------------------------------- the report

class Targets:
    """PASS/FAIL/SKIP/INFO lines against the bounds of one instruction set."""

    def __init__(self, isa):
        self.isa = isa
        # avx512bf16 runs avx512's kernels for float32 / float64 (its own is bfloat16's forward)
        self.bounds = TARGETS.get("avx512" if isa == "avx512bf16" else isa)   # None: no targets on this ISA
        self.items = []

    def add(self, key, what, value, unit="x", note="", op=None, group=None, judge=True):
        """One line for target `key` (TARGET_KEYS). value None -> SKIP; a bool -> PASS/FAIL (a
        check that holds or not, e.g. "output finite"); otherwise judged against this ISA's bound
        for `key`, INFO where there is none or with judge=False (a shape too small for the
        bound to mean anything: the bound is still shown)."""
        gid, default_op, _ = TARGET_KEYS[key] if key in TARGET_KEYS else (group, ">=", "")
        op = op or default_op
        bound = self.bounds.get(key) if self.bounds is not None else None
        if value is None or (isinstance(value, float) and math.isnan(value)):
            status = "SKIP"
        elif isinstance(value, bool):
            status = ("PASS" if value else "FAIL") if self.bounds is not None else "INFO"
        elif bound is None or not judge:
            status = "INFO"
        else:
            status = "PASS" if (value >= bound if op == ">=" else value <= bound) else "FAIL"
        self.items.append(dict(tid=gid if group is None else group, key=key, what=what, value=value,
                               bound=bound, op=op, unit=unit, note=note, status=status))

    def print(self, header=None):
        print(header or f"PERFORMANCE TARGETS for ISA {self.isa} (bench/_targets.py; the numbers in [ ] "
                        f"only group them)")
        if self.bounds is None:
            print(f"  {no_targets_line(self.isa)}")
        print("-" * 100)
        for t in sorted(self.items, key=lambda t: _tid_order(t["tid"])):
            v = t["value"]
            if v is None:
                vs = "n/a"
            elif isinstance(v, bool):
                vs = str(v)
            else:
                vs = num(v) + t["unit"]
            bs = f"{t['op']} {num(t['bound'])}{t['unit']}" if t["bound"] is not None else ""
            note = f"  ({t['note']})" if t["note"] else ""
            tid = f"[{t['tid']}]"
            print(f"  {tid:<6}{t['what']:<66} {vs:>10}  {bs:<14} {t['status']}{note}")
        counts = {s: sum(t["status"] == s for t in self.items) for s in ("PASS", "FAIL", "SKIP", "INFO")}
        print("-" * 100)
        print("  " + "  ".join(f"{k}: {v}" for k, v in counts.items()))
        return counts


def _tid_order(tid):
    s = str(tid)
    digits = "".join(c for c in s if c.isdigit())
    return (int(digits) if digits else 999, s)


def num(x):
    if x is None:
        return ""
    ax = abs(x)
    if ax != 0 and (ax < 1e-2 or ax >= 1e5):
        return f"{x:.2e}"
    return f"{x:.2f}" if ax < 100 else f"{x:.0f}"
