"""Thread scaling: forward, backward and decode at 1, 2, 4, ... threads, and the results' bits.

    python bench/thread_scaling.py                  # up to os.cpu_count() threads (about a minute on 16)
    python bench/thread_scaling.py --max-threads 4  # 1, 2, 4
    python bench/thread_scaling.py --quick          # smaller shapes, a smoke run

For each case and thread count t (powers of two up to the CPUs, and the CPU count itself) the
script times selfattn with num_threads=t (best of N, the thread counts interleaved round by
round), prints GFLOP/s (decode: K/V GB/s), the speed-up over 1 thread and the parallel
efficiency (speed-up / t), and checks that every thread count gives the 1-thread result bit for
bit (the kernels' schedules depend on the shapes only). torch SDPA at the same thread count
(torch.set_num_threads) is printed beside it when torch is importable.

The development machines have 2 cores; this is the check for the wider ones (16-core lent
machines). FLOPs: forward 4*B*H*L*S*E, backward 10*B*H*L*S*E, half for causal.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _attn_impls as impls  # noqa: E402

import selfattn  # noqa: E402

# (label, kind, B, Hq, Hkv, L, S, E, causal)
FULL = [
    ("fwd B1 H8 L4096 E64", "fwd", 1, 8, 8, 4096, 4096, 64, False),
    ("fwd B1 H32/8 L2048 E128 causal (Llama prefill)", "fwd", 1, 32, 8, 2048, 2048, 128, True),
    ("fwd B32 H12 L197 E64 (ViT-B)", "fwd", 32, 12, 12, 197, 197, 64, False),
    ("bwd B1 H8 L2048 E64", "bwd", 1, 8, 8, 2048, 2048, 64, False),
    ("bwd B1 H8 L2048 E64 causal", "bwd", 1, 8, 8, 2048, 2048, 64, True),
    ("decode B1 H32/8 L1 S32768 E128", "dec", 1, 32, 8, 1, 32768, 128, True),
    ("decode B4 H16 L1 S2048 E64", "dec", 4, 16, 16, 1, 2048, 64, True),
]
QUICK = [
    ("fwd B1 H8 L1024 E64", "fwd", 1, 8, 8, 1024, 1024, 64, False),
    ("bwd B1 H4 L512 E64", "bwd", 1, 4, 4, 512, 512, 64, False),
    ("decode B1 H32/8 L1 S4096 E128", "dec", 1, 32, 8, 1, 4096, 128, True),
]


def thread_counts(max_t):
    ts, t = [], 1
    while t <= max_t:
        ts.append(t)
        t *= 2
    if ts[-1] != max_t:
        ts.append(max_t)
    return ts


def make_case(kind, B, Hq, Hkv, L, S, E, causal, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, L, E), dtype=np.float32)
    k = rng.standard_normal((B, Hkv, S, E), dtype=np.float32)
    v = rng.standard_normal((B, Hkv, S, E), dtype=np.float32)
    kw = dict(is_causal=causal, enable_gqa=Hq != Hkv)
    if kind == "dec":
        kw["alignment"] = "bottom_right"
    if kind == "bwd":
        dout = rng.standard_normal((B, Hq, L, E), dtype=np.float32)

        def run(t):
            _, vjp = selfattn.scaled_dot_product_attention_vjp(q, k, v, num_threads=t, **kw)
            return vjp(dout)
        work = 10.0 * B * Hq * L * S * E / (2 if causal else 1)
    else:
        def run(t):
            return (selfattn.scaled_dot_product_attention(q, k, v, num_threads=t, **kw),)
        work = impls.attn_flops(B, Hq, L, S, E, causal=causal and kind == "fwd")
        if kind == "dec":
            work = float(k.nbytes + v.nbytes)     # bytes read: the decode step is memory-bound
    return q, k, v, kw, run, work


def torch_fn(q, k, v, kw, kind):
    try:
        import torch
    except ImportError:
        return None
    if kind == "bwd":
        return None
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    causal = kw["is_causal"]
    gqa = kw["enable_gqa"]
    F = torch.nn.functional

    def run(t):
        torch.set_num_threads(t)
        with torch.inference_mode():
            if kind == "dec" and causal:    # one query row, bottom-right causal: it sees every key
                return F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=gqa)
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, enable_gqa=gqa)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)
    ts = thread_counts(args.max_threads)
    cfg = selfattn.config()
    print(f"CPU: {impls.cpu_model()} | {os.cpu_count()} CPUs | "
          f"selfattn {selfattn.__version__} isa={cfg['isa']} | thread counts {ts}")
    bad = 0
    for label, kind, B, Hq, Hkv, L, S, E, causal in (QUICK if args.quick else FULL):
        q, k, v, kw, run, work = make_case(kind, B, Hq, Hkv, L, S, E, causal)
        tor = None if args.no_torch else torch_fn(q, k, v, kw, kind)
        ref = run(1)
        same = {}
        for t in ts:
            got = run(t)
            same[t] = all(np.array_equal(a, b) and a.tobytes() == b.tobytes() for a, b in zip(got, ref))
        best = {(n, t): float("inf") for t in ts for n in (("sa", "torch") if tor else ("sa",))}
        for r in range(args.rounds):
            order = list(best) if r % 2 == 0 else list(best)[::-1]
            for n, t in order:
                f = run if n == "sa" else tor
                t0 = time.perf_counter()
                f(t)
                best[(n, t)] = min(best[(n, t)], time.perf_counter() - t0)
        unit = "GB/s" if kind == "dec" else "GFLOP/s"
        print(f"\n{label}   ({unit}; speed-up and efficiency vs 1 thread; bits vs 1 thread)")
        for t in ts:
            rate = work / best[("sa", t)] / 1e9
            sp = best[("sa", 1)] / best[("sa", t)]
            line = (f"  {t:3d} threads: selfattn {best[('sa', t)] * 1e3:9.2f} ms {rate:8.1f} {unit} "
                    f"x{sp:5.2f} eff {sp / t:4.0%}  bits {'same' if same[t] else 'DIFFER'}")
            if tor:
                tt = best[("torch", t)]
                line += f" | torch {tt * 1e3:9.2f} ms {work / tt / 1e9:8.1f} {unit}  sa/torch {tt / best[('sa', t)]:5.2f}x"
            print(line)
            bad += not same[t]
    print(f"\n{'every thread count gave the 1-thread bits' if not bad else f'{bad} thread counts DIFFER'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
