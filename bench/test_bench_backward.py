"""Training benchmarks: forward + backward, selfattn's VJP vs torch SDPA + autograd.

Run with ``pytest bench/ --benchmark-only -k backward``. Each shape and dtype is a
benchmark group: selfattn's forward + backward, its backward alone, and torch's forward +
backward side by side; extra_info holds the shape and the GFLOP/s (forward 4 BHLSE,
backward 10 BHLSE, half for causal). bench/backward.py (and ``bench/ratios.py --group
backward``) gives the same cases as interleaved ratios with their targets.

With ``--benchmark-disable`` (the CI smoke run) every case runs once on a shrunken shape
and selfattn's gradients are checked against torch's (or the float64 reference).
"""

import numpy as np
import pytest

import _attn_impls as impls
import selfattn

# (B, H, L, E, causal) as in issue 10's section 6
GRID = [(1, 8, L, E, causal) for L in (1024, 4096) for E in (64, 128) for causal in (False, True)]
GRID.append((32, 8, 128, 64, False))
IMPLS = ["selfattn fwd+bwd", "selfattn bwd", "torch fwd+bwd"]


def _case_id(case):
    B, H, L, E, causal = case
    return impls.shape_str(B, H, L, E).replace(" ", "") + ("-causal" if causal else "")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", GRID, ids=_case_id)
def test_sdpa_backward(benchmark, threads, case, impl, dtype):
    if benchmark.disabled:
        B, H, L, E, causal = case
        case = (min(B, 2), min(H, 2), min(L, 160), E, causal)
    B, H, L, E, causal = case
    dt = np.dtype(dtype)
    q, k, v = impls.make_qkv(B, H, L, E, dt)
    do = impls.make_qkv(B, H, L, E, dt, seed=5)[0]
    if impl.startswith("selfattn"):
        _, vjp = selfattn.scaled_dot_product_attention_vjp(q, k, v, is_causal=causal, num_threads=threads)
        if impl == "selfattn bwd":
            fn = lambda: vjp(do)   # noqa: E731
        else:
            def fn():
                return selfattn.scaled_dot_product_attention_vjp(q, k, v, is_causal=causal,
                                                                 num_threads=threads)[1](do)
    else:
        torch = pytest.importorskip("torch")
        tq, tk, tv = (torch.from_numpy(a.copy()).requires_grad_() for a in (q, k, v))
        tdo = torch.from_numpy(do)

        def fn():
            tq.grad = tk.grad = tv.grad = None
            torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal).backward(tdo)
            return tq.grad.numpy(), tk.grad.numpy(), tv.grad.numpy()

    fwd = impls.attn_flops(B, H, L, L, E, causal) / 1e9
    gflop = 2.5 * fwd if impl == "selfattn bwd" else 3.5 * fwd
    benchmark.group = impls.shape_str(B, H, L, E) + (" causal" if causal else "") + f" {dtype} training"
    benchmark.extra_info.update(shape=[B, H, L, E], causal=causal, dtype=dtype, threads=threads,
                                gflop=round(gflop, 4))
    rounds = int(min(10, max(2, 10 / max(gflop, 1e-3))))
    grads = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.min > 0:
        benchmark.extra_info["gflops"] = round(gflop / stats.stats.min, 2)
    assert [g.shape for g in grads] == [(B, H, L, E)] * 3
    if benchmark.disabled and impl.startswith("selfattn"):
        _, ref = selfattn.reference.scaled_dot_product_attention_vjp(q, k, v, is_causal=causal) \
            if hasattr(selfattn.reference, "scaled_dot_product_attention_vjp") else (None, None)
        if ref is not None:
            tol = 1e-9 if dt == np.float64 else 2e-4
            for g, r in zip(grads, ref(do)):
                np.testing.assert_allclose(g, r, rtol=tol, atol=tol * np.abs(r).max())
