#!/usr/bin/env python
"""A/B of two selfattn builds, interleaved: is a change faster, slower, or the same?

    pip install --no-deps --target /tmp/old <old checkout>      # each build in its own folder
    pip install --no-deps --target /tmp/new .
    python bench/ab.py /tmp/old /tmp/new [--rounds 8] [--threads 2] [--calls 15]

Each round runs a fresh process per build, in turn (old, new, old, new, ...), and times the same
calls on the same arrays in each: fp32 SDPA B1 H8 L1024 E64 (plain and causal), B32 H8 L128 E64 and a
GQA decode step (B8 H32/8 S4096 E128). It prints per shape the min and the median over all rounds for
each build and their ratio. On a shared, noisy machine the min is the figure to quote; whole-report
ratios (bench/ratios.py --quick) move with the peer's noise too. Name the CPU with any figure.
"""

import argparse
import os
import statistics
import subprocess
import sys

SHAPES = {   # name: (B, Hq, Hkv, L, S, E, causal)
    "B1 H8 L1024 E64": (1, 8, 8, 1024, 1024, 64, False),
    "B1 H8 L1024 E64 causal": (1, 8, 8, 1024, 1024, 64, True),
    "B32 H8 L128 E64": (32, 8, 8, 128, 128, 64, False),
    "decode B8 H32/8 S4096 E128": (8, 32, 8, 1, 4096, 128, False),
}

CHILD = r"""
import json, sys, time
import numpy as np
import selfattn
shapes, threads, calls = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
out = {}
for name, (B, Hq, Hkv, L, S, E, causal) in shapes.items():
    q = rng.standard_normal((B, Hq, L, E), dtype=np.float32)
    k = rng.standard_normal((B, Hkv, S, E), dtype=np.float32)
    v = rng.standard_normal((B, Hkv, S, E), dtype=np.float32)
    def f():
        return selfattn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=Hq != Hkv,
                                                     num_threads=threads)
    f()
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    out[name] = ts
print(json.dumps({"file": selfattn.__file__, "times": out}))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", help="folder holding the first build (its selfattn package)")
    ap.add_argument("new", help="folder holding the second build")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=15)
    args = ap.parse_args(argv)
    import json
    times = {"old": {}, "new": {}}
    for r in range(args.rounds):
        for tag in ("old", "new"):
            env = dict(os.environ, PYTHONPATH=os.path.abspath(getattr(args, tag)))
            res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(SHAPES), str(args.threads),
                                  str(args.calls)], capture_output=True, text=True, env=env, cwd="/")
            if res.returncode:
                raise SystemExit(f"{tag} build failed:\n{res.stderr[-2000:]}")
            got = json.loads(res.stdout.strip().splitlines()[-1])
            if r == 0:
                print(f"{tag}: {got['file']}")
            for name, ts in got["times"].items():
                times[tag].setdefault(name, []).extend(ts)
    print(f"{args.rounds} rounds x {args.calls} calls, {args.threads} threads; ms")
    print(f"{'shape':28s} {'old min':>8s} {'new min':>8s} {'new/old':>7s} | {'old med':>8s} {'new med':>8s} {'new/old':>7s}")
    for name in SHAPES:
        o, n = times["old"][name], times["new"][name]
        om, nm, od, nd = min(o) * 1e3, min(n) * 1e3, statistics.median(o) * 1e3, statistics.median(n) * 1e3
        print(f"{name:28s} {om:8.3f} {nm:8.3f} {nm / om:7.3f} | {od:8.3f} {nd:8.3f} {nd / od:7.3f}")


if __name__ == "__main__":
    main()
