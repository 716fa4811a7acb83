"""Training speed: the fused backward against torch's, in one run.

    python bench/backward.py            # every case (several minutes on 2 cores)
    python bench/backward.py --quick    # L1024 only, fp32 (a minute), for a smoke run

The same cases run as the "backward" group of bench/ratios.py (``--group backward``, and in
its full run), which imports the case functions below and times them with its own
interleaved timer.

FLOPs (bench/_attn_impls.attn_flops: 4 * E per visible (query, key) pair, half the pairs
for causal): forward 4 BHLSE, backward 10 BHLSE (2.5x the forward's count). Each case is
timed best-of-N, the implementations interleaved round by round, on the threads selfattn
uses by default (torch pinned to the same count). The CPU, the kernel path and the threads
are printed first: quote the ratios with them.

Cases and their targets (bench/_targets.py):
  1. forward + backward (selfattn.scaled_dot_product_attention_vjp, then vjp(dO)) vs
     torch SDPA forward + backward (autograd, its CPU flash backward) at B1 H8 L{1024, 4096}
     E{64, 128}, causal and not, and B32 H8 L128 E64, fp32 and fp64 -- target >= 1.3x;
  2. the backward alone (vjp(dO)) at 10 BHLSE FLOPs vs the forward kernel's GFLOP/s on the
     same shape in the same run -- target >= 0.6x;
  3. selfattn.attend_vjp end to end (projections, attention, their backward) at x (4, 512,
     512), 8 heads, vs torch (nn.functional.linear + SDPA + autograd) -- target >= 1.2x.
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

F32, F64 = np.float32, np.float64
FULL = [(1, 8, 1024, 64, False), (1, 8, 1024, 64, True), (1, 8, 1024, 128, False), (1, 8, 1024, 128, True),
        (1, 8, 4096, 64, False), (1, 8, 4096, 64, True), (1, 8, 4096, 128, False), (1, 8, 4096, 128, True),
        (32, 8, 128, 64, False)]
QUICK = [(1, 8, 1024, 64, False), (1, 8, 1024, 64, True), (32, 8, 128, 64, False)]


def best_of(fns, min_rounds=None, rounds=3):
    """{name: best seconds}, the callables interleaved round by round."""
    best = {n: float("inf") for n in fns}
    for _ in range(min_rounds or rounds):
        for n, fn in fns.items():
            time.sleep(0.05)                       # let the other library's threads settle
            t0 = time.perf_counter()
            fn()
            best[n] = min(best[n], time.perf_counter() - t0)
    return best


def _label(B, H, L, E, causal, dt):
    return f"B{B} H{H} L{L} E{E}{' causal' if causal else ''} {np.dtype(dt).name}"


# ---------------------------------------------------------------------------- the cases
#
# Each case takes best(fns, min_rounds=None) -> {name: best seconds} (the caller's timer),
# torch (the module, or None), quick and threads, and returns (lines, values): the lines to
# print, and {target key: [(what, value), ...]} for the targets of bench/_targets.py.

def case_train_step(best, torch=None, quick=False, threads=None):
    lines, values = [], {"bwd_torch": [], "bwd_fwd": []}
    shapes = [(s, F32) for s in (QUICK if quick else FULL)] + ([] if quick else [(s, F64) for s in FULL])
    for (B, H, L, E, causal), dt in shapes:
        q, k, v, do = impls.make_qkv(B, H, L, E, dtype=dt) + (impls.make_qkv(B, H, L, E, dtype=dt, seed=7)[0],)
        vjp_fn = selfattn.scaled_dot_product_attention_vjp
        _, vjp = vjp_fn(q, k, v, is_causal=causal, num_threads=threads)
        fns = {"fwd": lambda: selfattn.scaled_dot_product_attention(q, k, v, is_causal=causal, num_threads=threads),
               "bwd": lambda: vjp(do),
               "fwd+bwd": lambda: vjp_fn(q, k, v, is_causal=causal, num_threads=threads)[1](do)}
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(a.copy()).requires_grad_() for a in (q, k, v))
            tdo = torch.from_numpy(do)

            def torch_step():
                tq.grad = tk.grad = tv.grad = None
                o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
                o.backward(tdo)
                return tq.grad
            fns["torch fwd+bwd"] = torch_step
        t = best(fns)
        fl = impls.attn_flops(B, H, L, L, E, causal=causal)
        g_f, g_b = fl / t["fwd"] / 1e9, 2.5 * fl / t["bwd"] / 1e9
        lab = _label(B, H, L, E, causal, dt)
        line = (f"{lab:<34} fwd {t['fwd'] * 1e3:8.1f} ms {g_f:5.0f} GF/s | bwd {t['bwd'] * 1e3:8.1f} ms "
                f"{g_b:5.0f} GF/s ({g_b / g_f:.2f}x fwd) | fwd+bwd {t['fwd+bwd'] * 1e3:8.1f} ms")
        values["bwd_fwd"].append((f"{lab}: backward GFLOP/s / forward GFLOP/s", g_b / g_f))
        if "torch fwd+bwd" in t:
            r = t["torch fwd+bwd"] / t["fwd+bwd"]
            line += f" | torch {t['torch fwd+bwd'] * 1e3:8.1f} ms -> {r:.2f}x"
            values["bwd_torch"].append((f"{lab}: fwd+bwd speed-up vs torch", r))
        lines.append(line)
    return lines, values


def case_attend_vjp(best, torch=None, quick=False, threads=None):
    attend_vjp = getattr(selfattn, "attend_vjp", None)
    if attend_vjp is None:
        return ["3. attend_vjp: not in this build"], {}
    B, L, d, H = (2, 256, 256, 8) if quick else (4, 512, 512, 8)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, L, d), dtype=np.float32)
    ws = [(rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32) for _ in range(4)]
    dy = rng.standard_normal((B, L, d), dtype=np.float32)

    def ours():
        _, vjp = attend_vjp(x, ws[0], ws[1], ws[2], num_heads=H, wo=ws[3], num_threads=threads)
        return vjp(dy)
    fns = {"selfattn attend_vjp": ours}
    if torch is not None:
        tx = torch.from_numpy(x.copy()).requires_grad_()
        tw = [torch.from_numpy(np.ascontiguousarray(w.T)).requires_grad_() for w in ws]   # (out, in)
        tdy = torch.from_numpy(dy)
        F = torch.nn.functional

        def torch_step():
            tx.grad = None
            for w in tw:
                w.grad = None
            heads = [F.linear(tx, w).view(B, L, H, d // H).transpose(1, 2) for w in tw[:3]]
            o = F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(B, L, d)
            F.linear(o, tw[3]).backward(tdy)
            return tx.grad
        fns["torch linear+SDPA+autograd"] = torch_step
    t = best(fns)
    lab = f"attend_vjp x ({B}, {L}, {d}), {H} heads, wo"
    line = f"3. {lab}: selfattn {t['selfattn attend_vjp'] * 1e3:.1f} ms"
    values = {}
    if "torch linear+SDPA+autograd" in t:
        r = t["torch linear+SDPA+autograd"] / t["selfattn attend_vjp"]
        line += f", torch {t['torch linear+SDPA+autograd'] * 1e3:.1f} ms -> {r:.2f}x"
        values["attend_vjp_torch"] = [(f"{lab}: speed-up vs torch", r)]
    return [line], values


CASES = (case_train_step, case_attend_vjp)


def run_cases(best, T, torch=None, quick=False, threads=None, out=print):
    """Every case, timed by best; their lines through out, their values into T (a
    _targets.Targets). Returns the values."""
    allv = {}
    for case in CASES:
        lines, values = case(best, torch=torch, quick=quick, threads=threads)
        for line in lines:
            out(line)
        for key, items in values.items():
            for what, value in items:
                T.add(key, what, value, judge=not quick)
            allv.setdefault(key, []).extend(items)
    return allv


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="L1024 fp32 only (targets reported, not judged)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per case (3)")
    p.add_argument("--threads", type=int, default=None, help="threads for selfattn and torch")
    args = p.parse_args(argv)
    threads = args.threads or impls.default_threads()
    limiter = impls.pin_threads(threads)  # noqa: F841 - keep the limit alive
    torch = impls.try_import_torch()
    print(f"cpu: {impls.cpu_model()}; selfattn isa {selfattn.config()['isa']}; threads {threads}; "
          f"torch {'not installed' if torch is None else torch.__version__}")
    T = _targets.Targets(selfattn.config()["isa"])
    run_cases(lambda fns, min_rounds=None: best_of(fns, min_rounds, args.rounds), T, torch=torch,
              quick=args.quick, threads=threads, out=lambda s: print(s, flush=True))
    T.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
