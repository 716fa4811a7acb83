"""Block masks from mask_mod (flex_attention) against the useful-work ideal and against torch, in one run.

    python bench/flex.py             # L = 8192, B1 H8 E64 float32 (a few minutes; torch.compile adds ~1 min)
    python bench/flex.py --quick     # L = 2048 (seconds)
    python bench/flex.py --no-compile   # without torch's compiled flex_attention

For each pattern (issue 22's: a document mask of 8 documents packed in L, a prefix-LM, dilated
windows -- element-dilated and block-dilated -- and causal for a yardstick):
* ``selfattn``: ``flex_attention`` under ``create_block_mask(mask_mod)`` (BLOCK_SIZE 128);
* ``ideal``: the visible fraction of the L x L scores times selfattn's dense forward without a mask,
  timed in the same rounds (the useful work at the dense kernel's speed); the target is
  selfattn / ideal <= 1.3;
* ``torch dense mask``: torch's ``scaled_dot_product_attention`` with the same pattern as a bool mask
  (target: selfattn >= 10x faster);
* ``torch flex (compiled)``: ``torch.compile(flex_attention)`` with torch's own block mask (compile
  time reported apart, not in the timing).
Timed interleaved round by round, best of N, on the same inputs. create_block_mask's own time is
printed beside (it is paid once per mask). The CPU, the kernel path and the threads come first:
quote the ratios with them.

Then score_mod (``--part score_mod`` alone), forward and forward + backward, each row timed
interleaved with the plain kernel (no score_mod; target: a T5 bias table >= 0.6x its speed):
a T5 bias table ``bias[h, q - kv + L]`` (read as a contiguous run per row), T5's log-bucketed
bias (a gather per key), ALiBi and softcap through score_mod beside their built-ins
(``alibi_slopes=``, ``softcap=``), torch's SDPA with the T5 bias as a dense float mask and
``torch.compile(flex_attention)`` with the same score_mod in torch.
"""

import argparse
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _attn_impls as impls  # noqa: E402

import selfattn  # noqa: E402

TARGET_IDEAL = 1.3
TARGET_TORCH = 10.0


def patterns(L):
    doc = np.repeat(np.arange(8), L // 8)
    w = L // 8
    return {
        "document (8 docs)": lambda b, h, q, k: doc[q] == doc[k],
        "prefix-LM (prefix L/8)": lambda b, h, q, k: (k < L // 8) | (q >= k),
        f"dilated window (|q-k| < {w}, stride 2)": lambda b, h, q, k: (abs(q - k) < w) & ((q - k) % 2 == 0),
        f"block-dilated window (|q-k| < {2 * w}, every 2nd 128-block)":
            lambda b, h, q, k: (abs(q - k) < 2 * w) & (((q // 128) - (k // 128)) % 2 == 0),
        "causal (mask_mod)": lambda b, h, q, k: q >= k,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile(flex_attention)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--part", choices=("all", "masks", "score_mod"), default="all")
    ap.add_argument("--shape", default=None, help="B,H,L,E (default 1,8,8192,64; --quick: L 2048), e.g. "
                                                  "4,12,512,64 for T5-base's encoder")
    args = ap.parse_args(argv)
    B, H, L, E = (int(x) for x in args.shape.split(",")) if args.shape else (1, 8, 2048 if args.quick else 8192, 64)
    rounds = args.rounds or (3 if args.quick else 3)
    nt = impls.default_threads()
    impls.pin_threads(nt)
    c = selfattn.config()
    print(f"CPU: {impls.cpu_model()} | selfattn {c['version']} isa={c['isa']} threads={nt}")
    torch = impls.try_import_torch()
    if torch is not None:
        torch.set_num_threads(nt)
        print(f"torch {torch.__version__} cpu capability {impls.torch_cpu_capability(torch)}")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, L, E), dtype=np.float32) for _ in range(3))
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v)) if torch is not None else (None, None, None)
    t_dense = impls.best_of({"dense": lambda: selfattn.scaled_dot_product_attention(q, k, v)}, rounds)["dense"]
    print(f"B{B} H{H} L{L} E{E} float32; selfattn dense forward, no mask: {t_dense * 1e3:.1f} ms "
          f"({impls.attn_flops(B, H, L, L, E) / t_dense / 1e9:.0f} GFLOP/s)\n")
    tflex = None
    if torch is not None and not args.no_compile:
        from torch.nn.attention import flex_attention as tfa
        tflex = torch.compile(tfa.flex_attention)
    if args.part in ("all", "masks"):
        masks(args, L, q, k, v, tq, tk, tv, t_dense, rounds, torch, tflex)
    if args.part in ("all", "score_mod"):
        score_mods(L, H, q, k, v, tq, tk, tv, rounds, torch, tflex)


def _t5_bucket(rel, num_buckets=32, max_distance=128, xp=np):
    """T5's bidirectional relative_position_bucket, NumPy or torch (xp)."""
    n = num_buckets // 2
    ret = (rel > 0) * n
    d = abs(rel)
    exact = n // 2
    large = exact + (xp.log(xp.maximum(d, 1) / exact) / np.log(max_distance / exact) * (n - exact))
    large = large.astype(np.int64) if xp is np else large.to(d.dtype)
    return ret + xp.where(d < exact, d, xp.minimum(large, n - 1))


def score_mods(L, H, q, k, v, tq, tk, tv, rounds, torch, tflex):
    rng = np.random.default_rng(1)
    bias = rng.standard_normal((H, 2 * L)).astype(np.float32)
    buckets = rng.standard_normal((H, 32)).astype(np.float32)
    slopes = 2.0 ** -np.arange(1, H + 1)
    mods = {
        "T5 bias table bias[h, q-kv+L]": (lambda s, b, h, qi, ki: s + bias[h, qi - ki + L], None),
        "T5 log-bucketed bias (32 buckets)": (lambda s, b, h, qi, ki: s + buckets[h, _t5_bucket(ki - qi)], None),
        "ALiBi": (lambda s, b, h, qi, ki: s - slopes[h] * abs(qi - ki), {"alibi_slopes": slopes}),
        "softcap 20": (lambda s, b, h, qi, ki: 20 * np.tanh(s / 20), {"softcap": 20.0}),
    }
    g = np.ones_like(q)
    print(f"\nscore_mod, B{q.shape[0]} H{H} L{L} E{q.shape[-1]} float32 (x: the plain kernel's time over this one's; "
          f"built-in: the same through scaled_dot_product_attention's option)")
    print(f"{'score_mod':<36} {'plain':>8} {'fwd':>8} {'x':>5} {'built-in':>8} {'x':>5} {'plain f+b':>9} "
          f"{'f+b':>8} {'x':>5} {'torch mask':>10} {'x':>6} {'t.flex':>8} {'x':>6} {'compile':>8}")
    for name, (mod, builtin) in mods.items():
        fns = {"plain": lambda: selfattn.flex_attention(q, k, v),
               "mod": lambda: selfattn.flex_attention(q, k, v, score_mod=mod),
               "plain_fb": lambda: selfattn.flex_attention_vjp(q, k, v)[1](g),
               "mod_fb": lambda: selfattn.flex_attention_vjp(q, k, v, score_mod=mod)[1](g)}
        if builtin is not None:
            fns["builtin"] = lambda: selfattn.scaled_dot_product_attention(q, k, v, **builtin)
        t_comp = None
        if torch is not None and name.startswith("T5 bias"):
            tbias = torch.from_numpy(bias)
            dense = torch.from_numpy(np.ascontiguousarray(
                bias[:, np.arange(L)[:, None] - np.arange(L)[None, :] + L][None]))       # (1, H, L, L)
            fns["torch_mask"] = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=dense)
            if tflex is not None:
                tmod = lambda s, b, h, qi, ki: s + tbias[h, qi - ki + L]          # noqa: E731
                t_comp = _compiled(torch, fns, lambda: tflex(tq, tk, tv, score_mod=tmod))
        with (torch.no_grad() if torch is not None else _null()):
            t = impls.best_of(fns, rounds)
        ms = lambda key: f"{t[key] * 1e3:8.1f}" if key in t else f"{'-':>8}"       # noqa: E731
        x = lambda a, b: f"{t[a] / t[b]:5.2f}" if a in t and b in t else f"{'-':>5}"  # noqa: E731
        tc = f"{t_comp:7.1f}s" if t_comp is not None else f"{'-':>8}"
        print(f"{name:<36} {ms('plain')} {ms('mod')} {x('plain', 'mod')} {ms('builtin')} {x('plain', 'builtin')} "
              f"{ms('plain_fb'):>9} {ms('mod_fb')} {x('plain_fb', 'mod_fb')} {ms('torch_mask'):>10} "
              f"{(t['torch_mask'] / t['mod']) if 'torch_mask' in t else float('nan'):6.1f} {ms('torch_flex')} "
              f"{(t['torch_flex'] / t['mod']) if 'torch_flex' in t else float('nan'):6.1f} {tc}")
    print("(ms; torch's columns: the T5 table only, its x = torch's time over selfattn's score_mod forward)")


def masks(args, L, q, k, v, tq, tk, tv, t_dense, rounds, torch, tflex):
    if torch is not None and tflex is not None:
        from torch.nn.attention import flex_attention as tfa
    hdr = (f"{'pattern':<52} {'visible':>7} {'build':>7} {'selfattn':>9} {'ideal':>8} {'/ideal':>6} "
           f"{'torch mask':>10} {'x':>6} {'t.flex':>8} {'x':>6} {'compile':>8}")
    print(hdr)
    rows = []
    for name, mod in patterns(L).items():
        t0 = time.perf_counter()
        bm = selfattn.create_block_mask(mod, None, None, L, L)
        t_build = time.perf_counter() - t0
        dense_mask = selfattn.reference.flex_mask(mod, 1, 1, L, L)[0, 0]
        frac = float(dense_mask.mean())
        # the dense kernel timed in the same rounds: the ideal is a ratio measured interleaved
        fns = {"selfattn": lambda: selfattn.flex_attention(q, k, v, block_mask=bm),
               "dense": lambda: selfattn.scaled_dot_product_attention(q, k, v)}
        t_comp = None
        if torch is not None:
            tmask = torch.from_numpy(np.ascontiguousarray(dense_mask))
            fns["torch_mask"] = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask)
            if tflex is not None:
                tm = torch.from_numpy(np.ascontiguousarray(dense_mask))
                tbm = tfa.create_block_mask(lambda b, h, qi, ki: tm[qi, ki], None, None, L, L, device="cpu")
                t_comp = _compiled(torch, fns, lambda: tflex(tq, tk, tv, block_mask=tbm))
        with (torch.no_grad() if torch is not None else _null()):
            t = impls.best_of(fns, rounds)
        ideal = frac * t["dense"]
        r_ideal = t["selfattn"] / ideal
        r_mask = t["torch_mask"] / t["selfattn"] if "torch_mask" in t else float("nan")
        r_flex = t["torch_flex"] / t["selfattn"] if "torch_flex" in t else float("nan")
        rows.append((name, r_ideal, r_mask, r_flex))
        tf = f"{t['torch_flex'] * 1e3:8.1f}" if "torch_flex" in t else f"{'-':>8}"
        tc = f"{t_comp:7.1f}s" if t_comp is not None else f"{'-':>8}"
        tmk = f"{t['torch_mask'] * 1e3:10.1f}" if "torch_mask" in t else f"{'-':>10}"
        print(f"{name:<52} {frac:7.3f} {t_build * 1e3:6.0f}m {t['selfattn'] * 1e3:8.1f}m {ideal * 1e3:7.1f}m "
              f"{r_ideal:6.2f} {tmk} {r_mask:6.1f} {tf} {r_flex:6.1f} {tc}")
    print(f"\n(times in ms; /ideal: selfattn over the useful work at its dense speed, target <= {TARGET_IDEAL}; "
          f"x: torch's time over selfattn's, target vs the dense mask >= {TARGET_TORCH})")
    for name, r_ideal, r_mask, r_flex in rows:
        ok = "meets" if r_ideal <= TARGET_IDEAL else "MISSES"
        print(f"  {name}: {ok} the ideal target ({r_ideal:.2f}); vs torch's dense mask {r_mask:.1f}x; "
              f"vs torch flex compiled {r_flex:.1f}x")


def _compiled(torch, fns, call):
    """The first call of torch's compiled flex_attention (its compile time, returned), then
    fns["torch_flex"] = call; a compiler that fails on this machine is said, not fatal (None)."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad():
                call()
        except Exception as exc:
            print(f"  torch.compile(flex_attention) failed: {type(exc).__name__}: {exc}"[:300])
            return None
    fns["torch_flex"] = call
    return time.perf_counter() - t0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    main()
