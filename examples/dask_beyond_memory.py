"""Attention whose keys and values do not fit in one worker's memory: sequence parallelism with Dask.

The keys and values (400 MiB by default, float32) are generated on the workers chunk by chunk along
the sequence (S) and never gathered anywhere: selfattn.dask.scaled_dot_product_attention computes each
(query, key chunk) block with the fused kernel -- its (out, lse) is a few hundred KiB -- and merges the
blocks with selfattn.merge_attention in a tree. The cluster's two workers are limited to 256 MiB each
(spilling to disk off), less than K/V, so the problem cannot be loaded whole into either of them:
with --chunk-mib 200 (K and V each in one chunk) the workers pass their limit and are restarted by
their nannies until Dask gives up (KilledWorker); with chunks of 16 MiB it completes.

The queries are the last L tokens of the sequence (bottom-right causal: a long-context prefill
step). With --check (the default) the result is compared with one call of
selfattn.scaled_dot_product_attention on the whole arrays, gathered here in this process.

Run:  python examples/dask_beyond_memory.py [--kv-mib 400] [--memory-limit 256MiB] [--chunk-mib 16]
                                            [--queries 256] [--no-check]
Needs: pip install "selfattn[dask]"   (dask[array,distributed]: dask and a matching distributed)
"""

import argparse
import time

import numpy as np

import selfattn

H, E = 4, 64          # kv heads and head dim: one key of one head is E * 4 = 256 bytes (float32)


def problem(kv_mib, chunk_mib, L, seed=0):
    """Lazy q (1, H, L, E) and k, v (1, H, S, E) with K + V = kv_mib MiB, chunked along S by chunk_mib."""
    import dask.array as da
    per_key = H * E * 4                                  # bytes of one position of K (or V)
    S = int(kv_mib * 2**20 // (2 * per_key))
    chunk = max(1, int(chunk_mib * 2**20 // per_key))
    rng = da.random.default_rng(seed)
    q = rng.standard_normal((1, H, L, E), chunks=(1, H, L, E), dtype=np.float32)
    k = rng.standard_normal((1, H, S, E), chunks=(1, H, chunk, E), dtype=np.float32)
    v = rng.standard_normal((1, H, S, E), chunks=(1, H, chunk, E), dtype=np.float32)
    return q, k, v


def run(client, kv_mib=400, chunk_mib=16, L=256, check=True):
    """Compute the problem on `client`'s cluster; returns figures (and the error against one call)."""
    import dask
    import selfattn.dask
    q, k, v = problem(kv_mib, chunk_mib, L)
    out = selfattn.dask.scaled_dot_product_attention(q, k, v, is_causal=True, alignment="bottom_right",
                                                     num_threads=1)
    t = time.perf_counter()
    got = client.compute(out, sync=True)
    seconds = time.perf_counter() - t
    res = {"kv_bytes": k.nbytes + v.nbytes, "S": k.shape[2], "rows": got.shape[2], "chunks": k.numblocks[2],
           "seconds": seconds, "max_abs_error": None}
    if check:
        qa, ka, va = dask.compute(q, k, v, scheduler="threads")      # here, in this process
        want = selfattn.scaled_dot_product_attention(qa, ka, va, is_causal=True, alignment="bottom_right")
        res["max_abs_error"] = float(np.abs(got - want).max())
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kv-mib", type=float, default=400, help="size of K + V in MiB (default 400)")
    ap.add_argument("--memory-limit", default="256MiB", help="memory limit of each worker (default 256MiB)")
    ap.add_argument("--chunk-mib", type=float, default=16, help="size of one K chunk along S (default 16)")
    ap.add_argument("--queries", type=int, default=256, help="L, the last L positions attend (default 256)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-check", action="store_true", help="skip the comparison with one local call")
    args = ap.parse_args(argv)
    import os

    import dask
    from dask.distributed import Client, LocalCluster
    environ = dict(os.environ)
    with dask.config.set({"distributed.worker.memory.target": False, "distributed.worker.memory.spill": False}):
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                          memory_limit=args.memory_limit, dashboard_address=None) as cluster, Client(cluster) as client:
            os.environ.clear()                  # starting the workers set OMP_NUM_THREADS=1 etc. here too
            os.environ.update(environ)
            limit = min(w["memory_limit"] for w in client.scheduler_info()["workers"].values())
            res = run(client, args.kv_mib, args.chunk_mib, args.queries, check=not args.no_check)
    print(f"K + V: {res['kv_bytes'] / 2**20:.0f} MiB (S = {res['S']}, {res['chunks']} chunks along S), "
          f"{args.workers} workers with a memory limit of {limit / 2**20:.0f} MiB each, no spilling")
    print(f"{res['rows']} queries attended in {res['seconds']:.2f} s on the cluster")
    if res["max_abs_error"] is not None:
        print(f"max |difference| to one selfattn.scaled_dot_product_attention call: {res['max_abs_error']:.2e}")
        if res["max_abs_error"] > 1e-4:
            raise SystemExit("MISMATCH")
    print(f"selfattn {selfattn.__version__}")


if __name__ == "__main__":
    main()
