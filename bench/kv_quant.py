"""Decode over quantized and 16-bit K/V caches: bytes read per step, and speed against float32, in one run.

    python bench/kv_quant.py            # the issue's shapes, S = 8192 .. 65536 (about a minute)
    python bench/kv_quant.py --quick    # S = 8192 only (seconds)
    python bench/kv_quant.py --sizes 1024 --threads 1 --rounds 200   # K/V in cache: the work per key

A decode step reads every cached key and value once: it is bound by those bytes. The same step
(one query row per head, grouped-query heads stacked) runs on the same K/V stored as float32 and
each narrower kind (LEGEND below), timed interleaved round by round, best of N, on the threads
selfattn uses by default. Printed: milliseconds, the bytes each call must read (K/V and scales),
the rate it reads them at, and the speed-up over float32; with the targets of issue 20 (int8 and
float8 >= 2.5x float32, bfloat16 >= 1.8x) judged at S >= 8192. The CPU, the kernel path
and the threads are printed first: quote the ratios with them.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _attn_impls as impls  # noqa: E402

import selfattn  # noqa: E402

# (label, Hq, Hkv, E)
SHAPES = [("B1 Hq32 Hkv8 E128", 32, 8, 128), ("B1 H8 E64", 8, 8, 64)]
# kind -> issue 20's target (x float32's decode) at S >= 8192
TARGETS = {"int8": 2.5, "e4m3": 2.5, "e5m2": 2.5, "bf16": 1.8, "bf16kv": 1.8, "f16kv": 1.8}
KINDS = ("fp32", "bf16", "bf16kv", "f16kv", "int8", "e4m3", "e5m2")
LEGEND = """kinds: fp32 the float32 cache; bf16 all bfloat16 (KVCache(dtype=bfloat16): queries bfloat16 too);
bf16kv / f16kv float32 queries over a bfloat16 / float16 cache (kv_dtype="bfloat16" / "float16");
int8 one float32 scale per key; e4m3 / e5m2 float8 (ml_dtypes) with one scale per head"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--sizes", type=int, nargs="+", help="the cache lengths S (default 8192 32768 65536)")
    ap.add_argument("--threads", type=int, help="threads (default: selfattn's default)")
    args = ap.parse_args(argv)
    nt = args.threads or impls.default_threads()
    impls.pin_threads(nt)
    c = selfattn.config()
    print(f"CPU: {impls.cpu_model()} | selfattn {c['version']} isa={c['isa']} threads={nt}")
    print(LEGEND)
    try:
        import ml_dtypes
    except ImportError:
        ml_dtypes = None
    sizes = args.sizes or ([8192] if args.quick else [8192, 32768, 65536])
    sdpa = selfattn.scaled_dot_product_attention
    fails = []
    print(f"\n{'shape':<20}{'S':>7}{'kind':>8}{'ms':>9}{'MB read':>9}{'GB/s':>7}{'x fp32':>8}")
    for label, Hq, Hkv, E in SHAPES:
        for S in sizes:
            rng = np.random.default_rng(S)
            q = rng.standard_normal((1, Hq, 1, E), dtype=np.float32)
            k, v = (rng.standard_normal((1, Hkv, S, E), dtype=np.float32) for _ in range(2))
            kw = dict(enable_gqa=Hq != Hkv, num_threads=nt)
            # kind -> (the call's arrays and options, the bytes it must read)
            calls = {"fp32": ((q, k, v), {})}
            (kq, ks), (vq, vs) = selfattn.quantize_kv(k), selfattn.quantize_kv(v)
            calls["int8"] = ((q, kq, vq), dict(k_scale=ks, v_scale=vs))
            calls["f16kv"] = ((q, k.astype(np.float16), v.astype(np.float16)), {})
            if ml_dtypes is not None:
                bf16 = np.dtype(ml_dtypes.bfloat16)
                calls["bf16"] = ((q.astype(bf16), k.astype(bf16), v.astype(bf16)), {})
                calls["bf16kv"] = ((q, k.astype(bf16), v.astype(bf16)), {})
                for kind, name in (("e4m3", "float8_e4m3fn"), ("e5m2", "float8_e5m2")):
                    (k8, ks8), (v8, vs8) = selfattn.quantize_kv(k, name), selfattn.quantize_kv(v, name)
                    calls[kind] = ((q, k8, v8), dict(k_scale=ks8, v_scale=vs8))
            fns = {kind: (lambda a=a, o=o: sdpa(*a, **o, **kw)) for kind, (a, o) in calls.items()}
            t = impls.best_of(fns, args.rounds)
            for kind in KINDS:
                if kind not in calls:
                    continue
                a, o = calls[kind]
                nbytes = a[1].nbytes + a[2].nbytes + sum(x.nbytes for x in o.values())
                ratio = t["fp32"] / t[kind]
                print(f"{label:<20}{S:>7}{kind:>8}{t[kind] * 1e3:>9.2f}{nbytes / 1e6:>9.1f}"
                      f"{nbytes / t[kind] / 1e9:>7.1f}{ratio:>8.2f}")
                if kind in TARGETS and ratio < TARGETS[kind]:
                    fails.append(f"{label} S{S} {kind} {ratio:.2f}x < {TARGETS[kind]}x")
    print("\ntargets (issue 20): int8, float8 >= 2.5x float32, bfloat16 (either form) and float16 cache >= 1.8x: "
          + ("all met" if not fails else f"{len(fails)} not met: " + "; ".join(fails)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
