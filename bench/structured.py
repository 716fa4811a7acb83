"""Structured attention: what skipping work buys (windows, key_lengths, varlen), in one run.

    python bench/structured.py            # every case (a few minutes, mostly torch's dense masks)
    python bench/structured.py --quick    # smaller shapes (seconds), for a smoke run

The same cases run as the "structured" group of bench/ratios.py (``--group structured``,
and in its full run), which imports the case functions below and times them with its own
interleaved timer.

FLOPs count only the keys each query may see (4 * E per visible (query, key) pair, as
bench/_attn_impls.attn_flops). Each case is timed best-of-N, the implementations
interleaved round by round, on the threads selfattn uses by default (torch and the
NumPy BLAS pinned to the same count). The CPU, the kernel path and the threads are
printed first: quote the ratios with them.

Cases and their targets (bench/_targets.py; the same for every instruction set that has
targets, none on the portable "generic" path):
  1. causal window w=256, B1 H8 L16384 E64: time vs (useful FLOPs / the dense kernel's
     GFLOP/s measured in this run) -- target <= 1.3x -- and vs torch SDPA given the same
     window as a dense bool mask -- target >= 20x faster;
  2. key_lengths with half the keys invalid vs all valid -- target >= 1.8x faster;
  3. varlen over 64 sequences of random lengths 16..1024 vs one dense batch of the same
     total work -- target >= 0.8x its GFLOP/s -- and vs torch on the padded equivalent
     -- target >= 1x.
  4. sinks: ``sinks=`` (a logit per head, B1 H8 L4096 E64 causal) vs the same call without --
     target <= 1.05x the time; ``num_sink_tokens=4`` beside a causal window of 4096 (StreamingLLM)
     decoding over S = 32768 cached keys (B1 Hq32 Hkv8 E128) vs the window alone -- target <=
     1.15x the time (the 4 sink keys and their block are the only extra work; the blocks
     between are skipped).
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _attn_impls as impls  # noqa: E402
import _targets  # noqa: E402

import selfattn  # noqa: E402

H, E = 8, 64


def best_of(fns, rounds, min_time=0.0):
    """{name: best seconds}, the callables interleaved round by round."""
    best = {n: float("inf") for n in fns}
    t_end = time.perf_counter() + min_time
    r = 0
    while r < rounds or time.perf_counter() < t_end:
        for n, fn in fns.items():
            time.sleep(0.02)                       # let the other library's threads settle
            t0 = time.perf_counter()
            fn()
            best[n] = min(best[n], time.perf_counter() - t0)
        r += 1
    return best


def visible_pairs_causal_window(L, w):
    """Sum over queries i of the keys j with i - w <= j <= i."""
    i = np.arange(L, dtype=np.int64)
    return int(np.minimum(i + 1, w + 1).sum())


# ---------------------------------------------------------------------------- the cases
#
# Each case takes best(fns, min_rounds=None) -> {name: best seconds} (the caller's timer),
# torch (the module, or None), quick (smaller shapes) and threads (selfattn's num_threads),
# and returns (lines, values): the lines to print, and {target key: (what, value)} for the
# targets of bench/_targets.py.

def case_causal_window(best, torch=None, quick=False, threads=None):
    w = 256
    L = 2048 if quick else 16384
    Ld = 1024 if quick else 4096
    q, k, v = impls.make_qkv(1, H, L, E)
    qd, kd, vd = impls.make_qkv(1, H, Ld, E)
    sdpa = selfattn.scaled_dot_product_attention
    fns = {"window": lambda: sdpa(q, k, v, is_causal=True, window_size=(w, 0), num_threads=threads),
           "dense": lambda: sdpa(qd, kd, vd, num_threads=threads)}
    if torch is not None:
        i, j = np.arange(L)[:, None], np.arange(L)[None, :]
        tmask = torch.from_numpy((j <= i) & (j >= i - w))
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))

        def torch_masked():
            with torch.inference_mode():
                return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask)
        fns["torch dense bool mask"] = torch_masked
    t = best(fns, min_rounds=2 if torch is not None else None)
    useful = 4.0 * H * E * visible_pairs_causal_window(L, w)
    dense_gflops = impls.attn_flops(1, H, Ld, Ld, E) / t["dense"] / 1e9
    ideal = useful / (dense_gflops * 1e9)
    lab = f"causal window {w} B1 H{H} L{L} E{E}"
    lines = [f"1. {lab}: {t['window'] * 1e3:.1f} ms, {useful / t['window'] / 1e9:.0f} useful GFLOP/s; "
             f"dense kernel (B1 H{H} L{Ld}) {dense_gflops:.0f} GFLOP/s -> ideal {ideal * 1e3:.1f} ms"]
    values = {"window_ideal": (f"{lab}: time / ideal", t["window"] / ideal)}
    if "torch dense bool mask" in t:
        lines.append(f"   torch SDPA with the window as a dense bool mask: {t['torch dense bool mask'] * 1e3:.0f} ms")
        values["window_torch"] = (f"{lab}: speed-up vs torch (dense mask)", t["torch dense bool mask"] / t["window"])
    return lines, values


# targets that a --quick shape cannot reach by construction: reported, not judged
# (the causal window's gain over a dense mask grows with L / w; the target is for L16384)
NOT_JUDGED_QUICK = {"window_torch": "quick: the target is for L16384 (the gain grows with L)"}


def case_key_lengths(best, torch=None, quick=False, threads=None):
    B, L = 4, (1024 if quick else 4096)
    q, k, v = impls.make_qkv(B, H, L, E)
    sdpa = selfattn.scaled_dot_product_attention
    t = best({"all valid": lambda: sdpa(q, k, v, num_threads=threads),
              "half valid": lambda: sdpa(q, k, v, key_lengths=L // 2, num_threads=threads)})
    lab = f"key_lengths B{B} H{H} L{L} E{E}"
    lines = [f"2. {lab}: all keys {t['all valid'] * 1e3:.1f} ms, half {t['half valid'] * 1e3:.1f} ms"]
    return lines, {"key_lengths": (f"{lab}: speed-up with half the keys", t["all valid"] / t["half valid"])}


def case_varlen(best, torch=None, quick=False, threads=None):
    rng = np.random.default_rng(0)
    nseq = 16 if quick else 64
    lens = rng.integers(16, 1025, nseq)
    cu = np.concatenate([[0], np.cumsum(lens)])
    tot = int(cu[-1])
    qv, kv, vv = (rng.standard_normal((H, tot, E), dtype=np.float32) for _ in range(3))
    work = 4.0 * H * E * float((lens.astype(np.float64) ** 2).sum())
    Lb = 512
    Bd = max(1, int(round(float((lens.astype(np.float64) ** 2).sum()) / Lb ** 2)))
    qb, kb, vb = impls.make_qkv(Bd, H, Lb, E)
    fns = {"varlen": lambda: selfattn.varlen_attention(qv, kv, vv, cu, cu, num_threads=threads),
           "dense batch": lambda: selfattn.scaled_dot_product_attention(qb, kb, vb, num_threads=threads)}
    if torch is not None:
        Lmax = int(lens.max())
        pad = np.zeros((nseq, H, Lmax, E), np.float32)
        tqp, tkp, tvp = (torch.from_numpy(pad.copy()) for _ in range(3))
        keep = torch.from_numpy(np.arange(Lmax)[None, None, None, :] < lens[:, None, None, None])

        def torch_padded():
            with torch.inference_mode():
                return torch.nn.functional.scaled_dot_product_attention(tqp, tkp, tvp, attn_mask=keep)
        fns["torch padded"] = torch_padded
    t = best(fns)
    g_var = work / t["varlen"] / 1e9
    g_dense = impls.attn_flops(Bd, H, Lb, Lb, E) / t["dense batch"] / 1e9
    lab = f"varlen {nseq} x 16..1024 H{H} E{E}"
    lines = [f"3. varlen, {nseq} sequences of 16..1024 (total {tot}), H{H} E{E}: {t['varlen'] * 1e3:.1f} ms, "
             f"{g_var:.0f} GFLOP/s; dense B{Bd} H{H} L{Lb}: {g_dense:.0f} GFLOP/s"]
    values = {"varlen_dense": (f"{lab}: GFLOP/s / dense GFLOP/s", g_var / g_dense)}
    if "torch padded" in t:
        lines.append(f"   torch SDPA on the padded batch (B{nseq} L{int(lens.max())}, key padding mask): "
                     f"{t['torch padded'] * 1e3:.1f} ms")
        values["varlen_torch"] = (f"{lab}: speed-up vs torch padded", t["torch padded"] / t["varlen"])
    return lines, values


def case_sinks(best, torch=None, quick=False, threads=None):
    sdpa = selfattn.scaled_dot_product_attention
    L = 1024 if quick else 4096
    q, k, v = impls.make_qkv(1, H, L, E)
    sinks = np.linspace(-1.0, 1.0, H)
    t = best({"plain": lambda: sdpa(q, k, v, is_causal=True, num_threads=threads),
              "sinks": lambda: sdpa(q, k, v, is_causal=True, sinks=sinks, num_threads=threads)})
    S, w = (8192, 1024) if quick else (32768, 4096)
    rng = np.random.default_rng(1)
    qd = rng.standard_normal((1, 32, 1, 128), dtype=np.float32)
    kd, vd = (rng.standard_normal((1, 8, S, 128), dtype=np.float32) for _ in range(2))
    kw = dict(enable_gqa=True, is_causal=True, alignment="bottom_right", window_size=(w, 0), num_threads=threads)
    td = best({"window": lambda: sdpa(qd, kd, vd, **kw),
               "window + 4 sink tokens": lambda: sdpa(qd, kd, vd, num_sink_tokens=4, **kw)})
    lab = f"sinks B1 H{H} L{L} E{E} causal"
    labd = f"decode B1 Hq32 Hkv8 S{S} E128, causal window {w}"
    lines = [f"4. {lab}: {t['plain'] * 1e3:.1f} ms without, {t['sinks'] * 1e3:.1f} ms with sinks=",
             f"   {labd}: {td['window'] * 1e3:.2f} ms, with 4 sink tokens {td['window + 4 sink tokens'] * 1e3:.2f} ms"]
    return lines, {"sinks_cost": (f"{lab}: time with sinks / without", t["sinks"] / t["plain"]),
                   "sink_tokens_window": (f"{labd}: time with 4 sink tokens / window alone",
                                          td["window + 4 sink tokens"] / td["window"])}


CASES = (case_causal_window, case_key_lengths, case_varlen, case_sinks)


def run_cases(best, T, torch=None, quick=False, threads=None, out=print):
    """Every case: print its lines, add its values to the Targets T."""
    for case in CASES:
        lines, values = case(best, torch=torch, quick=quick, threads=threads)
        for line in lines:
            out(line)
        for key, (what, value) in values.items():
            unjudged = quick and key in NOT_JUDGED_QUICK
            note = NOT_JUDGED_QUICK[key] if unjudged else ("quick: reduced shape" if quick else "")
            T.add(key, what, value, note=note, judge=not unjudged)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--strict", action="store_true", help="exit with status 1 if a target FAILs")
    args = ap.parse_args(argv)
    nt = impls.default_threads()
    impls.pin_threads(nt)
    torch = None
    if not args.no_torch:
        torch = impls.try_import_torch()
        if torch is not None:
            torch.set_num_threads(nt)
    c = selfattn.config()
    if torch is not None:
        torch_says = f"{torch.__version__} cpu capability {impls.torch_cpu_capability(torch)}"
    else:
        torch_says = "not used" if args.no_torch else "not installed"
    print(f"CPU: {impls.cpu_model()} | selfattn {c['version']} isa={c['isa']} threads={nt} | torch {torch_says} | "
          f"numpy BLAS: {impls.blas_info()}")
    T = _targets.Targets(c["isa"])
    run_cases(lambda fns, min_rounds=None: best_of(fns, min_rounds or args.rounds), T, torch=torch,
              quick=args.quick, threads=nt)
    print()
    counts = T.print(f"STRUCTURED-ATTENTION TARGETS for ISA {c['isa']} (bench/_targets.py)")
    return 1 if (args.strict and counts.get("FAIL")) else 0


if __name__ == "__main__":
    sys.exit(main())
