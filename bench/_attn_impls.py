"""Shared helpers of the selfattn benchmarks (bench/test_bench_*.py, bench/ratios.py, bench/structured.py).

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

import time

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


# ---------------------------------------------------------------------------- model shapes

# Attention shapes of real models, each against torch SDPA given the equivalent arguments
# (ratios.py --group models, bench/test_bench_models.py). H is the query heads, Hkv the key/value
# heads (grouped-query attention when fewer), S the keys (cross-attention when != L),
# key_lengths the valid keys of each batch entry (padding: selfattn's key_lengths, torch's
# bool key-padding mask). "quick" replaces some sizes for ratios.py --quick.
MODEL_CASES = [
    dict(name="BERT-base", B=8, H=12, L=512, E=64,
         key_lengths=(512, 512, 448, 384, 320, 256, 200, 128), quick=dict(B=2, key_lengths=(512, 300))),
    dict(name="Whisper-base encoder", B=1, H=8, L=1500, E=64),           # d_model 512 = 8 heads x 64
    dict(name="ViT-B/16", B=32, H=12, L=197, E=64, quick=dict(B=4)),      # 196 patches + [CLS]
    dict(name="Llama prefill GQA", B=1, H=32, Hkv=8, L=2048, E=128, causal=True, quick=dict(L=512)),
    dict(name="cross-attn L<<S", B=4, H=8, L=64, S=4096, E=64, quick=dict(S=1024)),
    dict(name="cross-attn L>>S", B=4, H=8, L=4096, S=64, E=64, quick=dict(L=1024)),
    dict(name="long context", B=1, H=8, L=8192, E=64, causal=True, quick=dict(L=2048)),
    dict(name="fp64", B=1, H=8, L=1024, E=64, dtype="float64", quick=dict(L=512)),
]


def model_case(case, quick=False, tiny=False):
    """The case's sizes as a flat dict (B, H, Hkv, L, S, E, dtype, causal, key_lengths or None):
    as listed, with its "quick" sizes, or tiny (a smoke run: every size <= 128, 2 batch entries,
    the same structure)."""
    c = dict(case)
    quick_sizes = c.pop("quick", {})
    if quick or tiny:
        c.update(quick_sizes)
    c.setdefault("Hkv", c["H"])
    c.setdefault("S", c["L"])
    c.setdefault("causal", False)
    c.setdefault("key_lengths", None)
    c["dtype"] = np.dtype(c.get("dtype", "float32"))
    if tiny:
        group = c["H"] // c["Hkv"]
        c["Hkv"] = min(c["Hkv"], 2)
        c["H"] = c["Hkv"] * min(group, 2)
        c["L"], c["S"], c["B"] = min(c["L"], 96 if c["L"] >= c["S"] else 16), min(c["S"], 96), min(c["B"], 2)
        if c["key_lengths"] is not None:
            c["key_lengths"] = tuple(max(1, kl * c["S"] // case["L"]) for kl in c["key_lengths"][:c["B"]])
    if c["key_lengths"] is not None:
        assert len(c["key_lengths"]) == c["B"], c
    return c


def model_label(c):
    lab = f"B{c['B']} H{c['H']}" + (f"/{c['Hkv']}kv" if c["Hkv"] != c["H"] else "") + f" L{c['L']}"
    lab += (f" S{c['S']}" if c["S"] != c["L"] else "") + f" E{c['E']}"
    return lab + (" causal" if c["causal"] else "") + (" padded" if c["key_lengths"] is not None else "")


def model_problem(c, seed=0):
    """(q, k, v, selfattn kwargs, torch kwargs as NumPy, useful FLOPs) for model_case(...) c.

    torch's kwargs hold NumPy arrays (the bool mask); make_torch_call wraps them. FLOPs count
    the keys each query may see: the valid keys of its batch entry, half the square if causal."""
    rng = np.random.default_rng(seed)
    B, H, Hkv, L, S, E, dt = c["B"], c["H"], c["Hkv"], c["L"], c["S"], c["E"], c["dtype"]
    q = rng.standard_normal((B, H, L, E), dtype=dt)
    k = rng.standard_normal((B, Hkv, S, E), dtype=dt)
    v = rng.standard_normal((B, Hkv, S, E), dtype=dt)
    sa_kw, torch_kw = {"is_causal": c["causal"]}, {"is_causal": c["causal"]}
    if Hkv != H:
        sa_kw["enable_gqa"] = torch_kw["enable_gqa"] = True
    if c["key_lengths"] is not None:
        kl = np.asarray(c["key_lengths"], dtype=np.int64)
        sa_kw["key_lengths"] = kl                                                    # (B,)
        torch_kw["attn_mask"] = (np.arange(S)[None, :] < kl[:, None])[:, None, None, :]   # (B, 1, 1, S) bool
        flops = 2.0 * H * L * (2 * E) * float(kl.sum())
    else:
        flops = attn_flops(B, H, L, S, E, c["causal"])
    return q, k, v, sa_kw, torch_kw, flops


def make_selfattn_call(q, k, v, kw, num_threads=None):
    import selfattn

    sdpa = selfattn.scaled_dot_product_attention
    return lambda: sdpa(q, k, v, num_threads=num_threads, **kw)


def make_torch_call(q, k, v, kw):
    """torch SDPA on zero-copy views of q, k, v (and of a NumPy mask in kw); None without torch."""
    torch = try_import_torch()
    if torch is None:
        return None
    F = torch.nn.functional
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(a)) for a in (q, k, v))
    tkw = {n: torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x for n, x in kw.items()}

    def run():
        with torch.inference_mode():
            return F.scaled_dot_product_attention(tq, tk, tv, **tkw)

    return run


# ---------------------------------------------------------------------------- the machine

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


def blas_info():
    """NumPy's BLAS as threadpoolctl sees it: one line per library (internal_api, version,
    architecture or core name, threads), or why it cannot tell."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "(threadpoolctl not installed: BLAS unknown, its threads not pinned)"
    parts = []
    for d in threadpool_info():
        if d.get("user_api") == "blas":
            arch = d.get("architecture") or d.get("corename") or d.get("threading_layer") or "?"
            parts.append(f"{d.get('internal_api')} {d.get('version')} arch={arch} threads={d.get('num_threads')}")
    return "; ".join(parts) or "?"


def torch_cpu_capability(torch):
    """The vector ISA torch's CPU kernels dispatch to (AVX512, AVX2, DEFAULT...), '?' if unknown."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # old torch
        return "?"


def torch_blas(torch):
    """BLAS_INFO of torch's build (mkl, openblas...), '?' if unknown."""
    try:
        import re

        m = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
        return m.group(1) if m else "?"
    except Exception:
        return "?"


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


def best_of(fns, rounds):
    """Best time of each of fns (name -> call) over `rounds` rounds, interleaved (the order reversed
    every other round, a short pause before each call)."""
    best = {n: float("inf") for n in fns}
    for r in range(rounds):
        for n in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            time.sleep(0.005)
            t0 = time.perf_counter()
            fns[n]()
            best[n] = min(best[n], time.perf_counter() - t0)
    return best
