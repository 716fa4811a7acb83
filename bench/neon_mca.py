#!/usr/bin/env python3
"""llvm-mca estimate of the NEON micro-kernels (no ARM hardware needed).

Compiles src_c/attn_neon.c for aarch64 to assembly (the same file the
extension builds; -O3 as setup.py), takes the innermost loops that carry the
Q.K^T and P.V micro-tiles (the loops with MR*NRV resp. MR*NVV fmla, or bfdot
for neonbf16's bfloat16 kernels), and runs llvm-mca on each for the CPUs asked
for. Prints, per loop: fmla (bfdot) per iteration, predicted cycles per
iteration, fmla (bfdot) per cycle, that as a fraction of the CPU model's issue
width for the instruction (the pipes llvm-mca lets it use), and multiply-adds
per cycle (fmla .4s: 4, .2d: 2; bfdot: 8), which compares the two.

    python3 bench/neon_mca.py [--cc clang-19|aarch64-linux-gnu-gcc] [--mca llvm-mca-19]
                              [--cpu neoverse-v1 --cpu apple-m1] [-D SA_NEON_MR=8 ...]

Which loop is which: Q.K^T steps the packed K block by BK*sizeof(T) bytes a
step (512 for fp32, 1024 for fp64), P.V steps V by its row stride (a register).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABEL = re.compile(r"^(\.?L\w+|LBB\w+):$")
BRANCH = re.compile(r"\s+(b\.?[a-z]*|cbnz|cbz|tbnz|tbz)\s+(?:.*?,\s*)?(\.?L\w+|LBB\w+)\s*$")


def compile_asm(cc, defines, out):
    cmd = [cc, "-O3", "-fno-math-errno", "-S", "-I", os.path.join(ROOT, "src_c"),
           os.path.join(ROOT, "src_c", "attn_neon.c"), "-o", out] + [f"-D{d}" for d in defines]
    if "clang" in os.path.basename(cc):
        cmd[1:1] = ["--target=aarch64-linux-gnu"]
    subprocess.run(cmd, check=True)
    return cmd


def inner_loops(asm, min_fmla):
    lines = [l.split("//")[0].rstrip() for l in asm.split("\n")]
    labels = {l[:-1]: i for i, l in enumerate(lines) if LABEL.match(l)}
    for i, l in enumerate(lines):
        m = BRANCH.match(l)
        if not m or m.group(2) not in labels or labels[m.group(2)] >= i:
            continue
        body = lines[labels[m.group(2)] + 1:i + 1]
        if any(LABEL.match(x) for x in body):
            continue
        ins = [x.split("//")[0].strip() for x in body]
        ins = [x for x in ins if x and not x.startswith((".", ";", "#"))]
        n = sum(x.startswith(("fmla", "bfdot")) for x in ins)
        # not exp2 (frint/fcvt), not a rescale-only pass (accumulators zeroed inside)
        if n >= min_fmla and not any(x.startswith(("frint", "fcvt", "movi")) for x in ins):
            yield m.group(2), ins, n


def classify(ins):
    dtype = ("bf16" if any(x.startswith("bfdot") for x in ins)
             else "f64" if any(".2d" in x for x in ins if x.startswith("fmla")) else "f32")
    step = 1024 if dtype == "f64" else 512
    # the Q.K^T loop moves its K pointer by one packed row a step (post-index or add)
    qk = any(re.search(rf"\],\s*#?{step}$|#?{step}\]!$", x) or re.match(rf"add\s+(\w+),\s*\1,\s*#?{step}$", x)
             for x in ins)
    spills = sum("[sp" in x for x in ins)
    return dtype, ("qk" if qk else "pv"), spills


def mca(tool, cpu, ins, iterations=200):
    text = "\n".join(ins) + "\n"
    r = subprocess.run([tool, "-mtriple=aarch64", f"-mcpu={cpu}", "-mattr=+bf16", f"-iterations={iterations}",
                        "-resource-pressure=1", "-instruction-info=1"],
                       input=text, capture_output=True, text=True, check=True)
    cycles = int(re.search(r"Total Cycles:\s+(\d+)", r.stdout).group(1))
    return cycles / iterations, r.stdout


def peak_fmla(tool, cpu, dtype):
    """The model's best fmla (bf16: bfdot) rate: a block of 24 independent ones of this dtype
    (what the FP/ASIMD pipes can issue when nothing else limits them)."""
    if dtype == "bf16":
        cyc, _ = mca(tool, cpu, [f"bfdot v{i}.4s, v30.8h, v31.8h" for i in range(24)])
        return 24 / cyc
    arr, lane = ("4s", "s") if dtype == "f32" else ("2d", "d")
    best = 0.0
    for src in (f"v31.{arr}", f"v31.{lane}[0]"):          # vector and by-element forms
        cyc, _ = mca(tool, cpu, [f"fmla v{i}.{arr}, v30.{arr}, {src}" for i in range(24)])
        best = max(best, 24 / cyc)
    return best


MACS = {"f32": 4, "f64": 2, "bf16": 8}     # multiply-adds per fmla .4s / .2d, per bfdot


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cc", default="clang-19")
    ap.add_argument("--mca", default=shutil.which("llvm-mca-19") and "llvm-mca-19" or "llvm-mca")
    ap.add_argument("--cpu", action="append")
    ap.add_argument("-D", dest="defines", action="append", default=[])
    ap.add_argument("--show", action="store_true", help="print each loop's assembly")
    args = ap.parse_args()
    cpus = args.cpu or ["neoverse-v1", "apple-m1"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "attn_neon.s")
        cmd = compile_asm(args.cc, args.defines, out)
        print("$", " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd))
        asm = open(out).read()
    seen = set()
    for label, ins, n in inner_loops(asm, 8):
        key = "\n".join(re.sub(r"\b[xvqsd]\d+\b", "r", x) for x in ins)
        if key in seen:
            continue
        seen.add(key)
        dtype, kind, spills = classify(ins)
        op = "bfdot" if dtype == "bf16" else "fmla"
        row = [f"{kind} {dtype} {label}: {len(ins)} instr, {n} {op}, {spills} stack accesses"]
        for cpu in cpus:
            cyc, _ = mca(args.mca, cpu, ins)
            peak = peak_fmla(args.mca, cpu, dtype)
            row.append(f"{cpu}: {cyc:.2f} cyc/iter, {n / cyc:.2f} of {peak:.2f} {op}/cyc = {100 * n / cyc / peak:.0f}%, "
                       f"{MACS[dtype] * n / cyc:.1f} multiply-adds/cyc")
        print(" | ".join(row))
        if args.show:
            print("    " + "\n    ".join(ins))


if __name__ == "__main__":
    sys.exit(main())
