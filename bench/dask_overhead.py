#!/usr/bin/env python
"""What sequence parallelism with Dask costs on one machine: selfattn.dask against the local call.

    python bench/dask_overhead.py                        # B1 H8 L8192 E64 float32, 4 key chunks
    python bench/dask_overhead.py --causal --chunks 8
    python bench/dask_overhead.py --quick                # L1024, one round: a smoke run

Rows (best of --rounds, interleaved):

  local            selfattn.scaled_dot_product_attention on the NumPy arrays (all cores)
  dask threads     selfattn.dask over K/V in --chunks chunks along S, Dask's threaded scheduler
  dask cluster     the same on a LocalCluster (--workers processes x 1 thread), K/V already
                   persisted on the workers: compute + merge tree + gathering the output
  dask cluster+io  the same from NumPy arrays in this process: K/V are shipped to the workers too

Each block call runs with --block-threads threads (default 1: the schedulers run one task per
core). The bytes each merge moves and the FLOPs each block computes are printed with the cost model
of bench/README.md ("Sequence parallelism with Dask: cost model").
"""
import argparse
import math
import os
import sys
import time

import numpy as np

import selfattn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _attn_impls import cpu_model  # noqa: E402


def best_of(fns, rounds, pause=0.1):
    best = {n: math.inf for n in fns}
    for _ in range(rounds):
        for n, f in fns.items():
            time.sleep(pause)
            t = time.perf_counter()
            f()
            best[n] = min(best[n], time.perf_counter() - t)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--L", type=int, default=8192, help="queries = keys (default 8192)")
    ap.add_argument("--E", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=4, help="key/value chunks along S (default 4)")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--block-threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="L=1024, one round")
    args = ap.parse_args(argv)
    if args.quick:
        args.L, args.rounds = 1024, 1

    import dask
    import dask.array as da
    from dask.distributed import Client, LocalCluster, wait

    import selfattn.dask as sdask

    B, H, L, E, n = args.batch, args.heads, args.L, args.E, args.chunks
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, L, E), dtype=np.float32) for _ in range(3))
    S_c = math.ceil(L / n)

    def lazy(qa, ka, va):
        return sdask.scaled_dot_product_attention(qa, ka, va, is_causal=args.causal,
                                                  num_threads=args.block_threads)

    qd = da.from_array(q, chunks=(B, H, L, E))
    kd, vd = (da.from_array(a, chunks=(B, H, S_c, E)) for a in (k, v))
    want = selfattn.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
    got = lazy(qd, kd, vd).compute(scheduler="threads")
    err = float(np.abs(got - want).max())

    fns = {"local": lambda: selfattn.scaled_dot_product_attention(q, k, v, is_causal=args.causal),
           "dask threads": lambda: lazy(qd, kd, vd).compute(scheduler="threads")}
    environ = dict(os.environ)
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        os.environ.clear()                      # starting the workers set OMP_NUM_THREADS=1 etc. here too
        os.environ.update(environ)
        qp, kp, vp = client.persist([qd, kd, vd])
        wait([qp, kp, vp])
        fns["dask cluster"] = lambda: client.compute(lazy(qp, kp, vp), sync=True)
        fns["dask cluster+io"] = lambda: client.compute(lazy(qd, kd, vd), sync=True)
        best = best_of(fns, args.rounds)

    flops = 4 * B * H * L * L * E / (2 if args.causal else 1)
    n_blocks = len([key for key in dict(lazy(qd, kd, vd).__dask_graph__())
                    if isinstance(key, tuple) and str(key[0]).startswith("selfattn-sdpa-part")])
    merge_bytes = B * H * L * (E + 1) * 4
    print(f"B{B} H{H} L{L} S{L} E{E} fp32{' causal' if args.causal else ''}, {n} key chunks of {S_c} "
          f"({n_blocks} blocks), {args.workers} workers x 1 thread, block calls with "
          f"{args.block_threads} thread(s); {cpu_model()}, {os.cpu_count()} cores")
    print(f"  per block: {4 * B * H * L * S_c * E / 1e9:.2f} GFLOP (dense); per merged part: "
          f"{merge_bytes / 2**20:.2f} MiB (out L x Ev + lse L, float32); max |dask - local| = {err:.1e}")
    for name, t in best.items():
        print(f"  {name:16s} {t * 1e3:9.1f} ms  {flops / t / 1e9:7.1f} GFLOP/s  "
              f"{t / best['local']:5.2f}x local")


if __name__ == "__main__":
    main()
