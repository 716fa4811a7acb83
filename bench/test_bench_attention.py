"""Forward-pass benchmarks: selfattn vs NumPy naive vs torch SDPA, float32.

Run with ``pytest bench/ --benchmark-only``. Each shape is a benchmark group, so
pytest-benchmark prints the three implementations side by side; extra_info holds
the shape, the GFLOP of one call and the GFLOP/s at the best (min) time.

With ``--benchmark-disable`` (the CI smoke run) every case runs once on a shrunken
shape and the selfattn result is checked against NumPy, so the suite cannot rot
and takes seconds.
"""

import numpy as np
import pytest

import _attn_impls as impls

# (B, H, L, E, causal)
GRID = [(1, 8, L, E, causal) for L in (1024, 4096) for E in (64, 128) for causal in (False, True)]
GRID.append((32, 8, 128, 64, False))

IMPLS = ["selfattn", "numpy", "torch"]


def _case_id(case):
    B, H, L, E, causal = case
    return impls.shape_str(B, H, L, E).replace(" ", "") + ("-causal" if causal else "")


def _shrink(case):
    """The smoke-run shape: same structure, tiny sizes (every call well under 0.1 s)."""
    B, H, L, E, causal = case
    return (min(B, 2), min(H, 2), min(L, 128), E, causal)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", GRID, ids=_case_id)
def test_sdpa_forward(benchmark, threads, case, impl):
    if benchmark.disabled:
        case = _shrink(case)
    B, H, L, E, causal = case
    q, k, v = impls.make_qkv(B, H, L, E, np.float32)

    if impl == "selfattn":
        fn = impls.make_selfattn(q, k, v, causal, num_threads=threads)
    elif impl == "numpy":
        fn = impls.make_numpy_naive(q, k, v, causal)
    else:
        pytest.importorskip("torch")
        fn = impls.make_torch_sdpa(q, k, v, causal)

    gflop = impls.attn_flops(B, H, L, L, E, causal) / 1e9
    benchmark.group = impls.shape_str(B, H, L, E) + (" causal" if causal else "") + " fp32"
    benchmark.extra_info.update(shape=[B, H, L, E], causal=causal, dtype="float32",
                                threads=threads, gflop=round(gflop, 4))

    # Fewer rounds for the multi-second NumPy cases, more for the fast ones.
    rounds = int(min(20, max(3, 20 / max(gflop, 1e-3))))
    out = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)

    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        best = stats.stats.min
        if best > 0:
            benchmark.extra_info["gflops"] = round(gflop / best, 2)

    out = np.asarray(out)
    assert out.shape == (B, H, L, E)
    if impl == "selfattn":
        assert out.dtype == np.float32
        if benchmark.disabled:  # cheap on the shrunken shapes
            expect = impls.make_numpy_naive(q.astype(np.float64), k.astype(np.float64),
                                            v.astype(np.float64), causal)()
            np.testing.assert_allclose(out, expect, rtol=1e-4, atol=1e-5)
