#!/usr/bin/env python
"""selfattn against two ways of writing attention in NumPy, B1 H8 L4096 E64 float32, one run.

    python bench/naive_forms.py                                           # this machine's environment
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/naive_forms.py  # NumPy's best BLAS kernel

"plain" is the formula as written (every step a new array); "in-place" is bench/_attn_impls.numpy_naive
(one score buffer, in-place steps), the stronger baseline bench/ratios.py uses. Both materialise the
8 x 4096 x 4096 scores (512 MiB) and spend the same two GEMMs (34.4 GFLOP) as selfattn's whole call,
so the speedup over them is bounded by (GEMM time + softmax passes) / selfattn time.
"""
import math
import os
import time

import numpy as np

import selfattn

B, H, L, E = 1, 8, 4096, 64


def plain(q, k, v):
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(np.float32(E))
    w = np.exp(scores - scores.max(axis=-1, keepdims=True))
    w = w / w.sum(axis=-1, keepdims=True)
    return w @ v


def in_place(q, k, v):
    s = np.matmul(q, np.swapaxes(k, -1, -2))
    s *= np.float32(1 / math.sqrt(E))
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return np.matmul(s, v)


def main():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, L, E)).astype(np.float32) for _ in range(3))
    fns = {"selfattn": lambda: selfattn.scaled_dot_product_attention(q, k, v),
           "numpy in-place": lambda: in_place(q, k, v), "numpy plain": lambda: plain(q, k, v)}
    best = {n: math.inf for n in fns}
    for _ in range(3):                       # interleaved rounds, best of each
        for n, f in fns.items():
            time.sleep(0.25)                 # let the previous library's idle threads settle
            t = time.perf_counter()
            f()
            best[n] = min(best[n], time.perf_counter() - t)
    print(f"B{B} H{H} L{L} E{E} fp32, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    for n, t in best.items():
        print(f"  {n:15s} {t * 1e3:8.1f} ms  {4 * B * H * L * L * E / t / 1e9:7.1f} GFLOP/s")
    print(f"  selfattn speedup: {best['numpy plain'] / best['selfattn']:.2f}x over plain, "
          f"{best['numpy in-place'] / best['selfattn']:.2f}x over in-place")


if __name__ == "__main__":
    main()
