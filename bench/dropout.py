"""Attention dropout's cost: selfattn with dropout_p against itself without, and against torch's SDPA
with the same dropout_p (which on the CPU falls back to its math path: the L x S weights materialised),
forward and forward + backward, in one run.

    python bench/dropout.py            # B1 H8 L1024 / L4096 E64 float32, causal and not
    python bench/dropout.py --quick    # L1024 only

Timed interleaved round by round, best of N, same arrays. The CPU, the kernel path and the threads
are printed first: quote the ratios with them.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _attn_impls as impls  # noqa: E402

import selfattn  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    nt = impls.default_threads()
    impls.pin_threads(nt)
    c = selfattn.config()
    print(f"CPU: {impls.cpu_model()} | selfattn {c['version']} isa={c['isa']} threads={nt} | dropout_p={args.p}")
    torch = impls.try_import_torch()
    if torch is not None:
        torch.set_num_threads(nt)
        print(f"torch {torch.__version__} cpu capability {impls.torch_cpu_capability(torch)}")
    p = args.p
    print(f"{'shape':<28} {'fwd':>8} {'fwd+drop':>9} {'x':>5} {'f+b':>8} {'f+b+drop':>9} {'x':>5} "
          f"{'torch f+b+drop':>15} {'torch/ours':>10}")
    for L in ([1024] if args.quick else [1024, 4096]):
        for causal in (False, True):
            rng = np.random.default_rng(0)
            q, k, v = (rng.standard_normal((1, 8, L, 64), dtype=np.float32) for _ in range(3))
            g = np.ones_like(q)

            def fb(dp):
                out, vjp = selfattn.scaled_dot_product_attention_vjp(q, k, v, is_causal=causal, dropout_p=dp, seed=1)
                vjp(g)
            fns = {
                "fwd": lambda: selfattn.scaled_dot_product_attention(q, k, v, is_causal=causal),
                "fwd_drop": lambda: selfattn.scaled_dot_product_attention(q, k, v, None, p, causal, seed=1),
                "fb": lambda: fb(0.0),
                "fb_drop": lambda: fb(p),
            }
            if torch is not None:
                tq, tk, tv = (torch.from_numpy(a.copy()).requires_grad_() for a in (q, k, v))
                tg = torch.from_numpy(g)

                def torch_fb():
                    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, dropout_p=p, is_causal=causal)
                    out.backward(tg)
                fns["torch_fb_drop"] = torch_fb
            t = impls.best_of(fns, args.rounds)
            tt = t.get("torch_fb_drop", float("nan"))
            name = f"B1 H8 L{L} E64{' causal' if causal else ''}"
            print(f"{name:<28} {t['fwd'] * 1e3:7.1f}m {t['fwd_drop'] * 1e3:8.1f}m {t['fwd_drop'] / t['fwd']:5.2f} "
                  f"{t['fb'] * 1e3:7.1f}m {t['fb_drop'] * 1e3:8.1f}m {t['fb_drop'] / t['fb']:5.2f} "
                  f"{tt * 1e3:14.1f}m {tt / t['fb_drop']:10.2f}")
    print("(ms; x: with dropout over without; torch/ours: torch's fwd+bwd with dropout over selfattn's)")


if __name__ == "__main__":
    main()
