"""Attention shapes of real models: selfattn vs torch SDPA given the equivalent arguments (pytest-benchmark).

    pytest bench/test_bench_models.py --benchmark-only
    python bench/ratios.py --group models     # the same shapes against their targets

The shapes are _attn_impls.MODEL_CASES (BERT-base with key padding, Whisper-base encoder,
ViT-B/16, Llama prefill with GQA and causal, cross-attention L << S and L >> S, long causal,
fp64). Each is a benchmark group of the two implementations; extra_info holds the GFLOP of
the keys each query may see. With --benchmark-disable (the CI smoke run) every case runs once
on a tiny shape of the same structure and is checked against selfattn.reference (and torch
against selfattn), so the suite stays a few seconds.
"""

import numpy as np
import pytest

import _attn_impls as impls
from selfattn import reference

CASES = impls.MODEL_CASES


@pytest.mark.parametrize("impl", ["selfattn", "torch"])
@pytest.mark.parametrize("case", CASES, ids=[c["name"].replace(" ", "_") for c in CASES])
def test_model_shape(benchmark, threads, case, impl):
    c = impls.model_case(case, tiny=benchmark.disabled)
    q, k, v, sa_kw, torch_kw, flops = impls.model_problem(c)
    if impl == "selfattn":
        fn = impls.make_selfattn_call(q, k, v, sa_kw, num_threads=threads)
    else:
        pytest.importorskip("torch")
        fn = impls.make_torch_call(q, k, v, torch_kw)
    benchmark.group = f"{c['name']} {impls.model_label(c)} {c['dtype'].name}"
    benchmark.extra_info.update(gflop=round(flops / 1e9, 4), threads=threads)
    rounds = int(min(20, max(3, 20 / max(flops / 1e9, 1e-3))))
    out = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.min > 0:
        benchmark.extra_info["gflops"] = round(flops / 1e9 / stats.stats.min, 2)

    out = np.asarray(out)
    assert out.shape == q.shape and out.dtype == c["dtype"]
    if benchmark.disabled:     # tiny shapes: the check is cheap
        ref = reference.scaled_dot_product_attention(q, k, v, **sa_kw)
        tol = 1e-10 if c["dtype"] == np.float64 else 1e-5
        np.testing.assert_allclose(out, ref, rtol=tol, atol=tol, err_msg=f"{impl} on {benchmark.group}")
