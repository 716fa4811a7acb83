"""Paged KV caches: paged_attention against the dense cache, a ragged batch against the machine's
bandwidth, and decode steps per second of PagedKVCache, in one run.

    python bench/paged.py            # the issue's shapes, S = 8192 .. 65536 (a few minutes)
    python bench/paged.py --quick    # S = 8192, a smaller ragged batch (seconds)

1. Dense vs paged (blocks of 16 positions, shuffled in the pool), the same decode step (one query
   row per head, grouped-query heads stacked) on the same K/V, float32, bfloat16 and int8, timed
   interleaved round by round, best of N: paged / dense (issue 20's target: <= 1.10), the pool
   stored head-major (PagedKVCache's order) and in FlashAttention's memory order.
2. A ragged batch of 16 sequences (lengths spread over 1k .. 32k), Hq32 Hkv8 E128 float32, in one
   paged call: the bytes it must read (each sequence's K and V once) over its time, against a C
   streaming read of as many bytes on as many threads (bench/_stream.py; target >= 0.8).
3. PagedKVCache decode steps (append one position to each sequence, attend; one layer,
   Hq32 Hkv8 E128 float32, context 4096) per second at batch 1 and 16, and the dense KVCache's.
The CPU, the kernel path and the threads are printed first: quote the ratios with them.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _attn_impls as impls  # noqa: E402
import _stream  # noqa: E402

import selfattn  # noqa: E402

SHAPES = [("B1 Hq32 Hkv8 E128", 32, 8, 128), ("B1 H8 E64", 8, 8, 64)]
TARGET_PAGED = 1.10
TARGET_RAGGED = 0.8
BLOCK = 16


def paged_copy(x, perm, head_major=True):
    """(B=1, H, S, ...) -> pages (num_blocks, BLOCK, H, ...), block b of the sequence in page perm[b]:
    stored head-major ((num_blocks, H, BLOCK, ...) in memory, PagedKVCache's order; a view of the
    FlashAttention shape), or in FlashAttention's memory order."""
    _, H, S = x.shape[:3]
    nb = S // BLOCK
    if head_major:
        pages = np.empty((nb, H, BLOCK) + x.shape[3:], x.dtype)
        pages[perm] = np.moveaxis(x[0].reshape((H, nb, BLOCK) + x.shape[3:]), 1, 0)
        return np.swapaxes(pages, 1, 2)
    pages = np.empty((nb, BLOCK, H) + x.shape[3:], x.dtype)
    pages[perm] = np.moveaxis(x[0], 0, 1).reshape((nb, BLOCK, H) + x.shape[3:])
    return pages


def dense_vs_paged(args, nt, bf16):
    sizes = [8192] if args.quick else [8192, 32768, 65536]
    sdpa = selfattn.scaled_dot_product_attention
    fails = 0
    print(f"\n1. decode step, dense cache vs paged (block {BLOCK}), best of {args.rounds}, ms")
    print("   paged: the pool stored head-major (PagedKVCache's order); FA order: FlashAttention's memory order")
    print(f"{'shape':<20}{'S':>7}  {'dtype':<6}{'dense':>9}{'paged':>9}{'FA order':>10}{'paged/dense':>13}"
          f"{'FA/dense':>10}")
    for label, Hq, Hkv, E in SHAPES:
        for S in sizes:
            rng = np.random.default_rng(S)
            q = rng.standard_normal((1, Hq, 1, E), dtype=np.float32)
            k, v = (rng.standard_normal((1, Hkv, S, E), dtype=np.float32) for _ in range(2))
            perm = rng.permutation(S // BLOCK)
            bt, sl = perm[None].astype(np.int32), np.array([S])
            kw = dict(is_causal=True, alignment="bottom_right", key_lengths=sl, enable_gqa=True, num_threads=nt)
            cases = {"fp32": (q, k, v, {})}
            if bf16 is not None:
                cases["bf16"] = (q.astype(bf16), k.astype(bf16), v.astype(bf16), {})
            (kq, ks), (vq, vs) = selfattn.quantize_kv(k), selfattn.quantize_kv(v)
            cases["int8"] = (q, kq, vq, {"k_scale": ks, "v_scale": vs})
            for name, (qq, kk, vv, sc) in cases.items():
                kp, vp = paged_copy(kk, perm), paged_copy(vv, perm)
                kf, vf = paged_copy(kk, perm, False), paged_copy(vv, perm, False)
                psc = {n: paged_copy(a, perm) for n, a in sc.items()}
                fsc = {n: paged_copy(a, perm, False) for n, a in sc.items()}
                fns = {"dense": lambda: sdpa(qq, kk, vv, **sc, **kw),
                       "paged": lambda: selfattn.paged_attention(qq, kp, vp, bt, sl, num_threads=nt, **psc),
                       "fa": lambda: selfattn.paged_attention(qq, kf, vf, bt, sl, num_threads=nt, **fsc)}
                t = impls.best_of(fns, args.rounds)
                r = t["paged"] / t["dense"]
                fails += r > TARGET_PAGED
                print(f"{label:<20}{S:>7}  {name:<6}{t['dense'] * 1e3:>9.3f}{t['paged'] * 1e3:>9.3f}"
                      f"{t['fa'] * 1e3:>10.3f}{r:>13.3f}{t['fa'] / t['dense']:>10.3f}")
    print(f"target (issue 20): paged within {TARGET_PAGED:.2f}x of dense at the same dtype: "
          f"{'all met' if not fails else f'{fails} not met'}")
    return fails


def ragged(args, nt):
    Hq, Hkv, E = 32, 8, 128
    n = 16
    hi = 8192 if args.quick else 32768
    lens = np.round(np.geomspace(1024, hi, n)).astype(np.int64)
    rng = np.random.default_rng(1)
    need = (lens + BLOCK - 1) // BLOCK
    nblocks = int(need.sum())
    kp = rng.standard_normal((nblocks, Hkv, BLOCK, E), dtype=np.float32).transpose(0, 2, 1, 3)   # head-major
    vp = rng.standard_normal((nblocks, Hkv, BLOCK, E), dtype=np.float32).transpose(0, 2, 1, 3)
    perm = rng.permutation(nblocks)
    bt = np.full((n, int(need.max())), -1, np.int32)
    at = 0
    for b, m in enumerate(need):
        bt[b, :m] = perm[at:at + m]
        at += m
    q = rng.standard_normal((n, Hq, 1, E), dtype=np.float32)
    nbytes = int(lens.sum()) * Hkv * E * 4 * 2
    t = impls.best_of({"paged": lambda: selfattn.paged_attention(q, kp, vp, bt, lens, num_threads=nt)}, args.rounds)
    gbs = nbytes / t["paged"] / 1e9
    print(f"\n2. ragged batch: {n} sequences, lengths {lens.min()} .. {lens.max()} (sum {lens.sum()}), "
          f"Hq{Hq} Hkv{Hkv} E{E} float32, one call")
    if _stream.available():
        yard, what = _stream.bandwidth(nbytes, nt), "C streaming read (bench/_stream.py)"
    else:
        buf = np.ones(nbytes // 4, np.float32)
        yard = nbytes / impls.best_of({"sum": lambda: buf.sum()}, args.rounds)["sum"] / 1e9
        what = f"NumPy sum, 1 thread ({_stream.why_not()})"
    r = gbs / yard
    print(f"   {nbytes / 1e6:.0f} MB of K/V in {t['paged'] * 1e3:.2f} ms: {gbs:.1f} GB/s; {what} of as many "
          f"bytes on {nt} threads: {yard:.1f} GB/s; ratio {r:.2f} (target >= {TARGET_RAGGED})")
    return int(r < TARGET_RAGGED)


def steps_per_second(args, nt):
    Hq, Hkv, E, ctx = 32, 8, 128, 1024 if args.quick else 4096
    steps = 16
    print(f"\n3. decode steps per second (append one position per sequence + attend; one layer, Hq{Hq} Hkv{Hkv} "
          f"E{E} float32, context {ctx}, {steps} steps, best of 3)")
    for batch in (1, 16):
        rng = np.random.default_rng(batch)
        prompt = rng.standard_normal((2, batch, Hkv, ctx, E), dtype=np.float32)
        new = rng.standard_normal((2, batch, Hkv, steps, E), dtype=np.float32)
        q = rng.standard_normal((batch, Hq, 1, E), dtype=np.float32)
        res = {}
        for name in ("dense KVCache", "PagedKVCache"):
            best = float("inf")
            for _ in range(3):
                if name == "PagedKVCache":
                    cache = selfattn.PagedKVCache(batch * ((ctx + steps) // BLOCK + 2), BLOCK, Hkv, E)
                    ids = [cache.add_sequence() for _ in range(batch)]
                    cache.append(ids, prompt[0], prompt[1])

                    def step(t, cache=cache, ids=ids):
                        cache.append(ids, new[0][:, :, t:t + 1], new[1][:, :, t:t + 1])
                        cache.attend(q, ids, num_threads=nt)
                else:
                    cache = selfattn.KVCache(batch, Hkv, ctx + steps, E)
                    cache.append(prompt[0], prompt[1])

                    def step(t, cache=cache):
                        cache.append(new[0][:, :, t:t + 1], new[1][:, :, t:t + 1])
                        cache.attend(q, num_threads=nt)
                t0 = time.perf_counter()
                for t in range(steps):
                    step(t)
                best = min(best, time.perf_counter() - t0)
            res[name] = steps / best
        print(f"   batch {batch:>2}: dense KVCache {res['dense KVCache']:8.1f} steps/s "
              f"({res['dense KVCache'] * batch:8.1f} tokens/s), PagedKVCache {res['PagedKVCache']:8.1f} steps/s "
              f"({res['PagedKVCache'] * batch:8.1f} tokens/s): paged/dense {res['PagedKVCache'] / res['dense KVCache']:.2f}")


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
    fails = dense_vs_paged(args, nt, bf16)
    fails += ragged(args, nt)
    steps_per_second(args, nt)
    print(f"\ntargets: {'all met' if not fails else f'{fails} not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
