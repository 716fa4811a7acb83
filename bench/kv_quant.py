"""Decode over quantized and 16-bit K/V caches: bytes read per step, and speed against float32, in one run.

    python bench/kv_quant.py            # the issue's shapes, S = 8192 .. 65536 (about a minute)
    python bench/kv_quant.py --quick    # S = 8192 only (seconds)

A decode step reads every cached key and value once: it is bound by those bytes. The same step
(one query row per head, grouped-query heads stacked) runs on the same K/V stored as float32,
bfloat16 (``KVCache(dtype=bfloat16)``'s storage: queries bfloat16 too) and int8 with one float32
scale per key (``kv_dtype="int8"``: queries float32), timed interleaved round by round, best of N,
on the threads selfattn uses by default. Printed: milliseconds, the bytes each call must read
(K/V and scales), the rate it reads them at, and the speed-ups over float32; with the targets of
issue 20 (int8 >= 2.5x float32, bfloat16 >= 1.8x) judged at S >= 8192. The CPU, the kernel path
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
TARGETS = {"int8": 2.5, "bf16": 1.8}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    nt = impls.default_threads()
    impls.pin_threads(nt)
    c = selfattn.config()
    print(f"CPU: {impls.cpu_model()} | selfattn {c['version']} isa={c['isa']} threads={nt}")
    try:
        import ml_dtypes
        bf16 = np.dtype(ml_dtypes.bfloat16)
    except ImportError:
        bf16 = None
    sizes = [8192] if args.quick else [8192, 32768, 65536]
    sdpa = selfattn.scaled_dot_product_attention
    fails = 0
    print(f"{'shape':<26}{'S':>7}{'fp32 ms':>9}{'bf16 ms':>9}{'int8 ms':>9}{'int8 MB':>9}{'GB/s fp32':>10}"
          f"{'GB/s int8':>10}{'bf16/fp32':>10}{'int8/fp32':>10}")
    for label, Hq, Hkv, E in SHAPES:
        for S in sizes:
            rng = np.random.default_rng(S)
            q = rng.standard_normal((1, Hq, 1, E), dtype=np.float32)
            k, v = (rng.standard_normal((1, Hkv, S, E), dtype=np.float32) for _ in range(2))
            (kq, ks), (vq, vs) = selfattn.quantize_kv(k), selfattn.quantize_kv(v)
            kw = dict(enable_gqa=Hq != Hkv, num_threads=nt)
            fns = {"fp32": lambda: sdpa(q, k, v, **kw),
                   "int8": lambda: sdpa(q, kq, vq, k_scale=ks, v_scale=vs, **kw)}
            if bf16 is not None:
                qb, kb, vb = q.astype(bf16), k.astype(bf16), v.astype(bf16)
                fns["bf16"] = lambda: sdpa(qb, kb, vb, **kw)
            t = impls.best_of(fns, args.rounds)
            by32 = k.nbytes + v.nbytes
            by8 = kq.nbytes + vq.nbytes + ks.nbytes + vs.nbytes
            r8 = t["fp32"] / t["int8"]
            rb = t["fp32"] / t["bf16"] if "bf16" in t else float("nan")
            print(f"{label:<26}{S:>7}{t['fp32'] * 1e3:>9.2f}{t.get('bf16', float('nan')) * 1e3:>9.2f}"
                  f"{t['int8'] * 1e3:>9.2f}{by8 / 1e6:>9.1f}{by32 / t['fp32'] / 1e9:>10.1f}"
                  f"{by8 / t['int8'] / 1e9:>10.1f}{rb:>10.2f}{r8:>10.2f}")
            for name, ratio in (("int8", r8), ("bf16", rb)):
                if not np.isnan(ratio) and ratio < TARGETS[name]:
                    fails += 1
    print(f"\ntargets (issue 20): int8 >= {TARGETS['int8']}x float32, bfloat16 >= {TARGETS['bf16']}x: "
          f"{'all met' if not fails else f'{fails} not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
