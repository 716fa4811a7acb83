"""Decode steps: a few new queries against a long K/V, in one run, against torch SDPA and the machine's
streaming read bandwidth.

    python bench/decode.py            # the issue's shapes (about a minute)
    python bench/decode.py --quick    # smaller K/V (seconds), for a smoke run

A decode step is memory-bound: it should read each K/V byte once, at close to the machine's
bandwidth. For each shape the script times, interleaved round by round (best of N):
  * selfattn.scaled_dot_product_attention (the decode path: nothing packed, split-KV);
  * torch.nn.functional.scaled_dot_product_attention on the same arrays (zero-copy), with
    enable_gqa for grouped-query shapes;
  * the bandwidth yardstick: NumPy sums over the very K and V arrays (the same bytes), once on
    one thread and once split over the same number of threads as selfattn (NumPy releases the
    GIL in reductions); the faster of the two is the machine's streaming read bandwidth.
It prints the K/V bytes each call must read, the rate at which selfattn and torch read them,
and judges the targets: K/V read at >= 80% of the bandwidth, and >= 2x torch at S >= 4096.
"""

import argparse
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _attn_impls as impls  # noqa: E402

import selfattn  # noqa: E402

# (label, B, Hq, Hkv, L, S, E)
SHAPES = [
    ("B4 H16 L1 S2048 E64", 4, 16, 16, 1, 2048, 64),
    ("Hq32 Hkv8 L1 S4096 E128 (GQA)", 1, 32, 8, 1, 4096, 128),
    ("Hq32 Hkv8 L1 S32768 E128 (GQA)", 1, 32, 8, 1, 32768, 128),
    ("B1 H8 L1 S65536 E64", 1, 8, 8, 1, 65536, 64),
]


def best_of(fns, rounds):
    best = {n: float("inf") for n in fns}
    for r in range(rounds):
        names = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for n in names:
            time.sleep(0.01)
            t0 = time.perf_counter()
            fns[n]()
            best[n] = min(best[n], time.perf_counter() - t0)
    return best


def threaded_sum(arrays, nt):
    """Sum every array, each split into nt row ranges summed by nt threads at once."""
    parts = [a.reshape(-1)[i * (a.size // nt):(i + 1) * (a.size // nt) if i < nt - 1 else a.size]
             for a in arrays for i in range(nt)]
    groups = [parts[i::nt] for i in range(nt)]

    def work(g):
        for p in g:
            p.sum()

    def run():
        ts = [threading.Thread(target=work, args=(g,)) for g in groups]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)
    nt = impls.default_threads()
    impls.pin_threads(nt)
    torch = None if args.no_torch else impls.try_import_torch()
    if torch is not None:
        torch.set_num_threads(nt)
    c = selfattn.config()
    print(f"CPU: {impls.cpu_model()} | selfattn {c['version']} isa={c['isa']} threads={nt} | "
          f"torch {torch.__version__ if torch else 'not installed'}")
    results = []

    def report(name, value, target, unit="x"):
        ok = value >= target
        results.append(ok)
        print(f"    {name}: {value:.2f}{unit} (target >= {target}{unit}) {'PASS' if ok else 'FAIL'}")

    rng = np.random.default_rng(0)
    for label, B, Hq, Hkv, L, S, E in SHAPES:
        if args.quick:
            S = max(256, S // 16)
        q = rng.standard_normal((B, Hq, L, E), dtype=np.float32)
        k = rng.standard_normal((B, Hkv, S, E), dtype=np.float32)
        v = rng.standard_normal((B, Hkv, S, E), dtype=np.float32)
        gqa = Hq != Hkv
        kv_bytes = k.nbytes + v.nbytes
        fns = {"selfattn": lambda: selfattn.scaled_dot_product_attention(q, k, v, enable_gqa=gqa),
               "numpy sum (1 thread)": lambda: (k.sum(), v.sum()),
               f"numpy sum ({nt} threads)": threaded_sum((k, v), nt)}
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))

            def torch_sdpa():
                with torch.inference_mode():
                    return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, enable_gqa=gqa)
            fns["torch"] = torch_sdpa
            np.testing.assert_allclose(torch_sdpa().numpy(), fns["selfattn"](), rtol=0, atol=2e-5)
        for f in fns.values():
            f()
        t = best_of(fns, args.rounds)
        bw = kv_bytes / min(t["numpy sum (1 thread)"], t[f"numpy sum ({nt} threads)"])
        sa_rate = kv_bytes / t["selfattn"]
        print(f"{label}: K/V {kv_bytes / 2**20:.0f} MiB | selfattn {t['selfattn'] * 1e3:.3f} ms "
              f"({sa_rate / 1e9:.1f} GB/s)" + (f" | torch {t['torch'] * 1e3:.3f} ms "
                                               f"({kv_bytes / t['torch'] / 1e9:.1f} GB/s)" if torch else "")
              + f" | read bandwidth {bw / 1e9:.1f} GB/s (NumPy sum: 1 thread "
              f"{kv_bytes / t['numpy sum (1 thread)'] / 1e9:.1f}, {nt} threads "
              f"{kv_bytes / t[f'numpy sum ({nt} threads)'] / 1e9:.1f})")
        report("K/V read rate / bandwidth", sa_rate / bw, 0.8)
        if torch is not None and S >= 4096:
            report("speed-up vs torch", t["torch"] / t["selfattn"], 2.0)
    print(f"{sum(results)} passed, {len(results) - sum(results)} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
