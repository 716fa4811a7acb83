"""bfloat16 and float16 against float32 and against torch, in one interleaved run.

    python bench/half.py                     # dense, models, decode; 2 threads by default
    python bench/half.py --quick             # fewer, smaller shapes (about a minute)
    python bench/half.py --backward          # forward + backward (training): bf16 against fp32, torch
    SELFATTN_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/half.py
                                             # the AVX2 path on both sides, on an AVX-512 machine

For each shape: GFLOP/s of selfattn in fp32, bf16 and fp16 and of torch's SDPA in the same three
dtypes (inputs made once in float32 and rounded, so every implementation sees the same values),
timed interleaved (ratios.Timer: best of the rounds), and the ratios the issue asks for:
bf16 / own fp32 and bf16 / torch bf16 (fp16 likewise); where the CPU has AVX512_BF16, bfloat16's
other path too (bf16@avx512bf16: vdpbf16ps, forced where not the default; bf16@avx512: widening,
where vdpbf16ps or AMX is the default; other_path). Decode rows time one query row per head
against S keys (memory-bound: GB/s of K and V read are printed too). FLOPs count only the keys a
query may see (4 B H L S E, half for causal). The CPU and the path taken are printed first.

--backward times a training step's attention instead: the forward with its VJP, then the VJP of a
cotangent (selfattn.scaled_dot_product_attention_vjp; torch: autograd through its SDPA), at
14 B H L S E FLOPs (forward 4, backward 10; half for causal), in fp32 and bf16 (and bf16's other
path where the CPU has both), with the ratios bf16 / own fp32 and bf16 / torch bf16.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import _attn_impls as impls  # noqa: E402
from ratios import Timer  # noqa: E402

DENSE = [dict(B=1, H=8, L=L, S=L, E=E, causal=c) for L in (1024, 4096) for E in (64, 128) for c in (False, True)]
MODELS = [
    dict(name="BERT-base", B=8, H=12, L=512, S=512, E=64, causal=False),
    dict(name="ViT-B/16", B=32, H=12, L=197, S=197, E=64, causal=False),
    dict(name="Llama prefill GQA", B=1, H=32, Hkv=8, L=2048, S=2048, E=128, causal=True),
    dict(name="Whisper-base enc", B=1, H=8, L=1500, S=1500, E=64, causal=False),
]
DECODE = [dict(name="decode", B=1, H=32, Hkv=8, L=1, S=S, E=128, causal=False) for S in (8192, 32768)]
QUICK = [dict(B=1, H=8, L=1024, S=1024, E=64, causal=c) for c in (False, True)] + [
    dict(name="decode", B=1, H=32, Hkv=8, L=1, S=8192, E=128, causal=False)]


def other_path(cfg, backward):
    """bfloat16's other path, timed beside the default where this CPU has one: the widening one
    (avx512) where the default multiplies bfloat16 itself (avx512bf16: AMD's; avx512amx: Intel's
    with AMX, forward and backward); vdpbf16ps (avx512bf16, forced) where the default widens
    (Intel's without AMX)."""
    isa, avail = cfg["isa"], cfg["isas_available"]
    if isa in ("avx512amx", "avx512bf16"):
        return "avx512"
    return "avx512bf16" if "avx512bf16" in avail else None


def label(s):
    name = s.get("name")
    base = impls.shape_str(s["B"], s["H"], s["L"], s["E"], s["S"]) + (" causal" if s["causal"] else "")
    return f"{name}: {base}" if name else base


def problem(s, seed=0):
    rng = np.random.default_rng(seed)
    hkv = s.get("Hkv", s["H"])
    q = rng.standard_normal((s["B"], s["H"], s["L"], s["E"]), dtype=np.float32)
    k = rng.standard_normal((s["B"], hkv, s["S"], s["E"]), dtype=np.float32)
    v = rng.standard_normal((s["B"], hkv, s["S"], s["E"]), dtype=np.float32)
    return q, k, v


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--min-rounds", type=int, default=5)
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--backward", action="store_true", help="forward + backward (training) instead")
    args = p.parse_args(argv)

    import ml_dtypes
    import selfattn
    torch = impls.try_import_torch()
    if torch is not None and args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {impls.cpu_model()}")
    selfattn.show_config()
    if torch is not None:
        print(f"torch {torch.__version__}, capability {impls.torch_cpu_capability(torch)}, "
              f"{torch.get_num_threads()} threads")
    dts = {"fp32": np.float32, "bf16": ml_dtypes.bfloat16, "fp16": np.float16}
    tdts = {} if torch is None else {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    timer = Timer(args.min_rounds, args.min_time, 60.0)
    shapes = QUICK if args.quick else DENSE + MODELS + DECODE
    if args.backward:
        return backward(args, torch, timer, [s for s in shapes if s["L"] > 1])
    cfg = selfattn.config()
    alt = other_path(cfg, backward=False)
    cols = [f"sa {d}" for d in dts] + ([f"bf16@{alt}"] if alt else []) + [f"torch {d}" for d in tdts]
    print(f"\nGFLOP/s (best of >= {args.min_rounds} interleaved rounds)")
    print(f"{'shape':<44}" + "".join(f"{c:>11}" for c in cols)
          + f"{'bf16/fp32':>10}{'bf16/tch':>9}{'fp16/fp32':>10}{'fp16/tch':>9}")
    for s in shapes:
        q, k, v = problem(s)
        gqa = s.get("Hkv", s["H"]) != s["H"]
        fns = {}
        for d, dt in dts.items():
            a = tuple(np.ascontiguousarray(x.astype(dt)) for x in (q, k, v))
            fns[f"sa {d}"] = (lambda a=a: selfattn.scaled_dot_product_attention(
                *a, is_causal=s["causal"], enable_gqa=gqa, num_threads=args.threads))
            if d == "bf16" and alt:
                def run_alt(a=a):
                    with selfattn.use_isa(alt):
                        return selfattn.scaled_dot_product_attention(*a, is_causal=s["causal"], enable_gqa=gqa,
                                                                     num_threads=args.threads)
                fns[f"bf16@{alt}"] = run_alt
        for d, tdt in tdts.items():
            t = tuple(torch.from_numpy(x).to(tdt) for x in (q, k, v))

            def run(t=t):
                with torch.inference_mode():
                    return torch.nn.functional.scaled_dot_product_attention(*t, is_causal=s["causal"],
                                                                            enable_gqa=gqa)
            try:
                run()
            except RuntimeError as exc:     # e.g. torch bf16 forced to AVX2 on an AMX CPU: pack_vnni2
                print(f"  ({label(s)}: torch {d} fails here: {str(exc).splitlines()[0]})")
                continue
            fns[f"torch {d}"] = run
        best = timer.best(fns)
        flops = impls.attn_flops(s["B"], s["H"], s["L"], s["S"], s["E"], s["causal"])
        gf = {n: flops / t / 1e9 for n, t in best.items()}
        r = lambda a, b: (f"{gf[a] / gf[b]:.2f}x" if a in gf and b in gf else "-")  # noqa: E731
        line = f"{label(s):<44}" + "".join(f"{gf.get(c, float('nan')):>11.1f}" for c in cols)
        line += f"{r('sa bf16', 'sa fp32'):>10}{r('sa bf16', 'torch bf16'):>9}"
        line += f"{r('sa fp16', 'sa fp32'):>10}{r('sa fp16', 'torch fp16'):>9}"
        if s["L"] == 1:         # decode: bytes of K and V read per call
            kv = 2 * s["B"] * s.get("Hkv", s["H"]) * s["S"] * s["E"]
            line += "   GB/s: " + ", ".join(f"{d} {kv * np.dtype(dt).itemsize / best[f'sa {d}'] / 1e9:.1f}"
                                          for d, dt in dts.items())
        print(line, flush=True)


def backward(args, torch, timer, shapes):
    """forward + backward: GFLOP/s at 14 B H L S E (half for causal)"""
    import ml_dtypes
    import selfattn
    dts = {"fp32": np.float32, "bf16": ml_dtypes.bfloat16}
    cfg = selfattn.config()
    alt = other_path(cfg, backward=True)
    cols = ["sa fp32", "sa bf16"] + ([f"bf16@{alt}"] if alt else []) + (["torch fp32", "torch bf16"] if torch else [])
    print(f"\nforward + backward, GFLOP/s (best of >= {args.min_rounds} interleaved rounds)")
    print(f"{'shape':<44}" + "".join(f"{c:>12}" for c in cols) + f"{'bf16/fp32':>10}{'bf16/tch':>9}")
    for s in shapes:
        q, k, v = problem(s)
        do = problem(s, seed=1)[0]
        gqa = s.get("Hkv", s["H"]) != s["H"]
        kw = dict(is_causal=s["causal"], enable_gqa=gqa, num_threads=args.threads)
        fns = {}
        for d, dt in dts.items():
            a = tuple(np.ascontiguousarray(x.astype(dt)) for x in (q, k, v, do))

            def step(a=a, isa=None):
                with selfattn.use_isa(isa or selfattn.config()["isa"]):
                    out, vjp = selfattn.scaled_dot_product_attention_vjp(*a[:3], **kw)
                    return vjp(a[3])
            fns[f"sa {d}"] = step
            if d == "bf16" and alt:
                fns[f"bf16@{alt}"] = lambda a=a: step(a, alt)
        if torch is not None:
            for d, tdt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                t = [torch.from_numpy(x).to(tdt) for x in (q, k, v, do)]

                def tstep(t=t):
                    qq, kk, vv = (x.detach().requires_grad_() for x in t[:3])
                    out = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=s["causal"],
                                                                           enable_gqa=gqa)
                    out.backward(t[3])
                    return qq.grad
                fns[f"torch {d}"] = tstep
        best = timer.best(fns)
        flops = 3.5 * impls.attn_flops(s["B"], s["H"], s["L"], s["S"], s["E"], s["causal"])
        gf = {n: flops / t / 1e9 for n, t in best.items()}
        r = lambda a, b: (f"{gf[a] / gf[b]:.2f}x" if a in gf and b in gf else "-")  # noqa: E731
        print(f"{label(s):<44}" + "".join(f"{gf.get(c, float('nan')):>12.1f}" for c in cols)
              + f"{r('sa bf16', 'sa fp32'):>10}{r('sa bf16', 'torch bf16'):>9}", flush=True)


if __name__ == "__main__":
    main()
