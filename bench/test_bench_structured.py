"""Structured-attention benchmarks: windows, key_lengths and varlen skip work (pytest-benchmark).

    pytest bench/test_bench_structured.py --benchmark-only
    python bench/structured.py              # the same cases as ratios against their targets

Each case is a benchmark group of the structured call and what it saves against (the dense
call, or torch with the same mask materialised). extra_info holds the GFLOP of the keys each
query may see. With --benchmark-disable every case runs once on a shrunken shape and is
checked against the reference.
"""

import numpy as np
import pytest

import _attn_impls as impls
import selfattn
from selfattn import reference

H, E = 8, 64


def _window_case(L, w):
    q, k, v = impls.make_qkv(1, H, L, E)
    i = np.arange(L)
    gflop = 4.0 * H * E * float(np.minimum(i + 1, w + 1).sum()) / 1e9
    return q, k, v, gflop


@pytest.mark.parametrize("impl", ["selfattn window", "selfattn dense mask", "torch dense mask"])
def test_causal_window(benchmark, threads, impl):
    L, w = (256, 32) if benchmark.disabled else (16384 if impl == "selfattn window" else 4096, 256)
    q, k, v, gflop = _window_case(L, w)
    benchmark.group = f"causal window {w} B1 H{H} L{L} E{E} fp32"
    benchmark.extra_info.update(gflop=round(gflop, 3), L=L, window=w)
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    dense = (j <= i) & (j >= i - w)
    if impl == "selfattn window":
        fn = lambda: selfattn.scaled_dot_product_attention(q, k, v, is_causal=True, window_size=(w, 0),  # noqa: E731
                                                            num_threads=threads)
    elif impl == "selfattn dense mask":
        fn = lambda: selfattn.scaled_dot_product_attention(q, k, v, attn_mask=dense, num_threads=threads)  # noqa: E731
    else:
        torch = pytest.importorskip("torch")
        tq, tk, tv, tm = (torch.from_numpy(a) for a in (q, k, v, dense))

        def fn():
            with torch.inference_mode():
                return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm)
    out = benchmark.pedantic(fn, rounds=3, warmup_rounds=1, iterations=1)
    if benchmark.disabled and impl.startswith("selfattn"):
        ref = reference.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("valid", ["all keys", "half the keys"])
def test_key_lengths(benchmark, threads, valid):
    B, L = (2, 128) if benchmark.disabled else (4, 4096)
    q, k, v = impls.make_qkv(B, H, L, E)
    kl = L if valid == "all keys" else L // 2
    benchmark.group = f"key_lengths B{B} H{H} L{L} E{E} fp32"
    benchmark.extra_info.update(gflop=round(impls.attn_flops(B, H, L, kl, E) / 1e9, 3))
    out = benchmark.pedantic(lambda: selfattn.scaled_dot_product_attention(q, k, v, key_lengths=kl, num_threads=threads),
                             rounds=5, warmup_rounds=1, iterations=1)
    if benchmark.disabled:
        ref = reference.scaled_dot_product_attention(q, k, v, key_lengths=kl)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["selfattn varlen", "selfattn dense batch", "torch padded"])
def test_varlen(benchmark, threads, impl):
    rng = np.random.default_rng(0)
    n = 4 if benchmark.disabled else 64
    lens = rng.integers(16, 65 if benchmark.disabled else 1025, n)
    cu = np.concatenate([[0], np.cumsum(lens)])
    work = 4.0 * H * E * float((lens.astype(np.float64) ** 2).sum()) / 1e9
    benchmark.group = f"varlen {n} sequences of 16..{int(lens.max())} H{H} E{E} fp32"
    benchmark.extra_info.update(gflop=round(work, 3))
    qv, kv, vv = (rng.standard_normal((H, int(cu[-1]), E), dtype=np.float32) for _ in range(3))
    if impl == "selfattn varlen":
        fn = lambda: selfattn.varlen_attention(qv, kv, vv, cu, cu, num_threads=threads)  # noqa: E731
    elif impl == "selfattn dense batch":        # the same total work in one dense batch of L=512
        Lb = min(512, int(lens.max()))
        Bd = max(1, int(round(float((lens.astype(np.float64) ** 2).sum()) / Lb ** 2)))
        qb, kb, vb = impls.make_qkv(Bd, H, Lb, E)
        fn = lambda: selfattn.scaled_dot_product_attention(qb, kb, vb, num_threads=threads)  # noqa: E731
    else:
        torch = pytest.importorskip("torch")
        Lmax = int(lens.max())
        pad = [torch.zeros((n, H, Lmax, E)) for _ in range(3)]
        keep = torch.from_numpy(np.arange(Lmax)[None, None, None, :] < lens[:, None, None, None])

        def fn():
            with torch.inference_mode():
                return torch.nn.functional.scaled_dot_product_attention(*pad, attn_mask=keep)
    out = benchmark.pedantic(fn, rounds=3, warmup_rounds=1, iterations=1)
    if benchmark.disabled and impl == "selfattn varlen":
        ref = reference.varlen_attention(qv, kv, vv, cu, cu)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("impl", ["counts: one call", "no counts", "counts: a call per sequence (before)"])
def test_kvcache_ragged_counts(benchmark, threads, impl, n):
    """KVCache.attend over 32 sequences of 512..4095 cached positions: with ragged counts (each
    sequence 0..n new rows; one kernel call, the kernel taking query rows per sequence) against
    the same call without counts, and against a call per sequence, what it did before."""
    B, Hq, Hkv, Ev = (4, 4, 2, 64) if benchmark.disabled else (32, 32, 8, 128)
    rng = np.random.default_rng(1)
    max_len = 64 if benchmark.disabled else 4096
    lens = rng.integers(n, max_len, B)
    counts = rng.integers(0, n + 1, B)
    cache = selfattn.KVCache(B, Hkv, max_len, Ev, dtype=np.float32)
    cache.append(rng.standard_normal((B, Hkv, max_len, Ev), dtype=np.float32),
                 rng.standard_normal((B, Hkv, max_len, Ev), dtype=np.float32), counts=lens)
    q = rng.standard_normal((B, Hq, n, Ev), dtype=np.float32)
    benchmark.group = f"KVCache.attend B{B} Hq{Hq} Hkv{Hkv} n{n} S<={max_len} E{Ev}, ragged counts, fp32"
    if impl == "counts: one call":
        fn = lambda: cache.attend(q, counts=counts, num_threads=threads)  # noqa: E731
    elif impl == "no counts":
        fn = lambda: cache.attend(q, num_threads=threads)  # noqa: E731
    else:
        S = int(lens.max())

        def fn():
            return [selfattn.scaled_dot_product_attention(
                q[b:b + 1, :, :counts[b]], cache._k[b:b + 1, :, :S], cache._v[b:b + 1, :, :S], is_causal=True,
                alignment="bottom_right", key_lengths=lens[b:b + 1], enable_gqa=True, num_threads=threads)
                for b in range(B)]
    out = benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)
    if benchmark.disabled and impl == "counts: one call":
        for b in range(B):
            ref = reference.scaled_dot_product_attention(
                q[b:b + 1, :, :counts[b]], cache._k[b:b + 1, :, :lens[b]], cache._v[b:b + 1, :, :lens[b]],
                is_causal=True, alignment="bottom_right", enable_gqa=True)
            np.testing.assert_allclose(out[b:b + 1, :, :counts[b]], ref, rtol=1e-4, atol=1e-5)
