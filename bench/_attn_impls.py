"""Shared helpers of the selfattn benchmarks (bench/test_bench_attention.py and bench/ratios.py).

Not a test module and not part of the installed package: the benchmark files put
bench/ on sys.path (pytest does it for conftest-rooted test files, a script gets
its own directory) and import this as ``_attn_impls``.

The competitors, all taking the same (B, H, L, E) NumPy arrays:

* selfattn.scaled_dot_product_attention -- the fused kernel under test;
* numpy_naive -- the textbook formula in the input dtype (float32 stays float32):
  scores = q @ k^T * scale (+ causal mask), row softmax, @ v. It materialises the
  full (B, H, L, S) score matrix but does the softmax in place, so it is a fair
  "what you would write in NumPy", not a strawman;
* torch.nn.functional.scaled_dot_product_attention on torch.from_numpy views of the
  same arrays (no copy), under torch.inference_mode(), when torch is importable.
"""

import math
import os

import numpy as np


def attn_flops(B, H, L, S, E, causal=False, Ev=None):
    """FLOPs of one forward pass: 2*L*S*E for Q K^T plus 2*L*S*Ev for P V per head.

    With Ev == E this is the usual 4*B*H*L*S*E; causal counts half (the visible
    triangle), as FlashAttention and torch benchmarks do.
    """
    Ev = E if Ev is None else Ev
    f = 2.0 * B * H * L * S * (E + Ev)
    return f / 2.0 if causal else f


def shape_str(B, H, L, E, S=None):
    s = f"B{B} H{H} L{L}"
    if S is not None and S != L:
        s += f" S{S}"
    return s + f" E{E}"


def make_qkv(B, H, L, E, dtype=np.float32, seed=0, S=None):
    """Unit-normal q (B,H,L,E), k and v (B,H,S,E) in dtype, C-contiguous."""
    S = L if S is None else S
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    q = rng.standard_normal((B, H, L, E), dtype=dtype)
    k = rng.standard_normal((B, H, S, E), dtype=dtype)
    v = rng.standard_normal((B, H, S, E), dtype=dtype)
    return q, k, v


def causal_additive_mask(L, S, dtype):
    """(L, S) additive mask: 0 where query i sees key j <= i (top-left aligned), -inf elsewhere."""
    visible = np.tri(L, S, dtype=bool)
    return np.where(visible, np.asarray(0, dtype), np.asarray(-np.inf, dtype)).astype(dtype, copy=False)


def numpy_naive(q, k, v, scale=None, mask=None):
    """softmax(q @ k^T * scale + mask) @ v in the input dtype, full score matrix."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    s = np.matmul(q, np.swapaxes(k, -1, -2))
    s *= s.dtype.type(scale)
    if mask is not None:
        s += mask
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return np.matmul(s, v)


def make_numpy_naive(q, k, v, causal=False, scale=None):
    """A zero-argument callable running numpy_naive; the causal mask is built once, outside the timing."""
    mask = causal_additive_mask(q.shape[-2], k.shape[-2], q.dtype) if causal else None
    return lambda: numpy_naive(q, k, v, scale, mask)


def make_selfattn(q, k, v, causal=False, scale=None, num_threads=None):
    import selfattn

    sdpa = selfattn.scaled_dot_product_attention
    return lambda: sdpa(q, k, v, is_causal=causal, scale=scale, num_threads=num_threads)


def try_import_torch():
    try:
        import torch  # noqa: F401
        import torch.nn.functional  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return None
    return torch


def make_torch_sdpa(q, k, v, causal=False, scale=None):
    """Callable running torch SDPA on zero-copy views of q, k, v; None without torch."""
    torch = try_import_torch()
    if torch is None:
        return None
    F = torch.nn.functional
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(a)) for a in (q, k, v))

    def run():
        with torch.inference_mode():
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, scale=scale)

    return run


def cpu_model():
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows: say it with every figure."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def default_threads():
    """selfattn's default thread count, else the CPUs this process may run on."""
    try:
        import selfattn

        n = selfattn.config().get("default_threads")
        if n:
            return int(n)
    except Exception:
        pass
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pin_threads(n):
    """Pin torch and the NumPy BLAS to n threads; returns a handle to keep alive (threadpoolctl)."""
    torch = try_import_torch()
    if torch is not None:
        torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    # BLAS only: selfattn gets num_threads explicitly and torch has set_num_threads,
    # and limiting "openmp" would also touch whichever libgomp selfattn loaded.
    return threadpool_limits(limits=n, user_api="blas")
