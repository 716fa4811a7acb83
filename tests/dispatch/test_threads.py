"""Results do not depend on the thread count: bit-for-bit, out and lse, on every ISA.

A thread-count test only means something if the "many threads" runs really use several
threads on several tasks: every case here has more tasks than the largest thread count,
and _assert_really_parallel checks the kernel's own schedule (selfattn._core.sdpa with
schedule_only=True) before the results are compared.
"""

import numpy as np
import pytest

import selfattn
from selfattn import _core, reference
from sa_testutil import ISAS, assert_sdpa_close, logit_magnitude, vmax_of

THREADS = [1, 2, 3, None]

# (q shape, k shape, v shape, extra kwargs); each has more than max(THREADS) = 3 tasks
CASES = {
    "multi_unit_odd": ((2, 3, 130, 17), (2, 3, 257, 17), (2, 3, 257, 33), {}),
    "one_unit_long_q": ((200, 64), (65, 64), (65, 64), {}),
    "one_row_many_keys": ((8, 1, 80), (8, 1000, 80), (8, 1000, 5), {}),
    "few_rows_many_keys": ((5, 3, 129), (5, 777, 129), (5, 777, 129), {}),
    "gqa": ((2, 6, 97, 16), (2, 2, 131, 16), (2, 2, 131, 8), {"enable_gqa": True}),
    "bcast_kv": ((3, 4, 66, 8), (1, 4, 300, 8), (3, 1, 300, 3), {}),
    "L_gt_S": ((5, 190, 3), (5, 70, 3), (5, 70, 7), {}),
}


def _expected_threads(requested):
    if not selfattn.config()["openmp"]:
        return 1
    return selfattn.config()["default_threads"] if requested is None else requested


def _assert_really_parallel(q, k, v, kw, ctx=""):
    """Each multi-thread run of THREADS runs that many threads, with more tasks than threads
    (the default, None, at least two tasks)."""
    for t in THREADS:
        sched = _core.sdpa(q, k, v, num_threads=t, schedule_only=True, **kw)
        want = _expected_threads(t)
        if t is None:    # the kernel never starts more threads than it has tasks
            want = min(want, sched["compute_tasks"])
        assert sched["threads"] == want, f"{ctx}num_threads={t}: the kernel would run {sched}, not {want} threads"
        if want > 1 and t is not None:
            assert sched["compute_tasks"] > sched["threads"], (
                f"{ctx}num_threads={t}: {sched['compute_tasks']} tasks for {sched['threads']} threads: "
                f"some threads would idle, the test would not compare a parallel run")
        elif want > 1:
            # the default is the machine's core count (16 on a lent machine: more than these
            # small cases have tasks); at least two of its threads must still get work
            assert sched["compute_tasks"] >= 2, (
                f"{ctx}default threads ({want}): {sched['compute_tasks']} task: not a parallel run")


def _inputs(shapes, dtype, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _run_all_threads(q, k, v, kw):
    res = {}
    for t in THREADS:
        res[t] = selfattn.scaled_dot_product_attention(q, k, v, return_lse=True, num_threads=t, **kw)
    return res


def _assert_bitwise(res, ctx):
    out1, lse1 = res[1]
    for t, (out, lse) in res.items():
        assert out.dtype == out1.dtype and out.shape == out1.shape, f"{ctx}threads={t}"
        assert np.array_equal(out, out1, equal_nan=True), (
            f"{ctx}out with num_threads={t} differs from num_threads=1: max |diff| = "
            f"{np.nanmax(np.abs(out.astype(np.float64) - out1)) if out.size else 0:.3e}")
        assert np.array_equal(lse, lse1, equal_nan=True), f"{ctx}lse with num_threads={t} differs from 1 thread"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("masking", ["none", "causal", "bool", "float"])
@pytest.mark.parametrize("case", list(CASES))
def test_threads_bitwise_identical(isa, case, masking, dtype):
    qs, ks, vs, kw = CASES[case]
    q, k, v = _inputs((qs, ks, vs), dtype, seed=len(case))
    kw = dict(kw)
    L, S = qs[-2], ks[-2]
    rng = np.random.default_rng(1)
    if masking == "causal":
        kw["is_causal"] = True
    elif masking == "bool":
        kw["attn_mask"] = rng.random((L, S)) < 0.6
    elif masking == "float":
        kw["attn_mask"] = np.where(rng.random((L, S)) < 0.6, rng.standard_normal((L, S)), -np.inf).astype(dtype)
    _assert_really_parallel(q, k, v, kw, f"[isa={isa} {case} {masking}] ")
    res = _run_all_threads(q, k, v, kw)
    _assert_bitwise(res, f"[isa={isa} {case} {masking}] ")
    # and the common answer is the right one
    ref, ref_lse = reference.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    out, lse = res[1]
    assert_sdpa_close(out, ref, dtype, vmax_of(v), logit_magnitude(q, k, None, kw.get("attn_mask")), lse, ref_lse,
                      ctx=f"[isa={isa} {case} {masking}] ")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_repeated_calls_identical(isa, dtype):
    q, k, v = _inputs(((2, 2, 150, 24), (2, 2, 260, 24), (2, 2, 260, 24)), dtype, seed=9)
    assert _core.sdpa(q, k, v, num_threads=2, schedule_only=True)["compute_tasks"] > 2
    first = selfattn.scaled_dot_product_attention(q, k, v, num_threads=2, return_lse=True)
    for _ in range(3):
        again = selfattn.scaled_dot_product_attention(q, k, v, num_threads=2, return_lse=True)
        assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])


def test_more_threads_than_work():
    # more threads than units / rows must still work and give the same bits
    q, k, v = _inputs(((1, 3, 2), (5, 2), (5, 4)), np.float32, seed=2)
    for isa in ISAS:
        with selfattn.use_isa(isa):
            a = selfattn.scaled_dot_product_attention(q, k, v, num_threads=1)
            b = selfattn.scaled_dot_product_attention(q, k, v, num_threads=16)
        assert np.array_equal(a, b), f"[isa={isa}]"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attend_threads_bitwise_identical(isa, dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 131, 48)).astype(dtype)
    wq, wk = (rng.standard_normal((48, 4 * 12)).astype(dtype) for _ in range(2))
    wv = rng.standard_normal((48, 4 * 8)).astype(dtype)
    wo = rng.standard_normal((32, 10)).astype(dtype)
    heads = np.zeros((2, 4, 131, 12), dtype)   # the heads attend() hands the kernel
    _assert_really_parallel(heads, heads, heads[..., :8], {"is_causal": True}, f"[isa={isa}] attend: ")
    outs = [selfattn.attend(x, wq, wk, wv, num_heads=4, wo=wo, is_causal=True, num_threads=t) for t in THREADS]
    for t, o in zip(THREADS, outs):
        assert np.array_equal(o, outs[0]), f"[isa={isa}] attend with num_threads={t} differs from 1 thread"


def test_concurrent_python_threads():
    # the GIL is released around the kernel: concurrent calls must not share scratch state
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(12)
    jobs = []
    for i in range(8):
        dt = np.float32 if i % 2 else np.float64
        L, S = 60 + 7 * i, 120 + 13 * i
        q = rng.standard_normal((2, L, 16 + i)).astype(dt)
        k = rng.standard_normal((2, S, 16 + i)).astype(dt)
        v = rng.standard_normal((2, S, 5 + i)).astype(dt)
        jobs.append((q, k, v, dict(is_causal=bool(i % 3 == 0), num_threads=1 + i % 2, return_lse=True)))
    serial = [selfattn.scaled_dot_product_attention(q, k, v, **kw) for q, k, v, kw in jobs]
    with ThreadPoolExecutor(max_workers=4) as ex:
        for _ in range(3):
            futs = [ex.submit(selfattn.scaled_dot_product_attention, q, k, v, **kw) for q, k, v, kw in jobs]
            for i, (f, (out, lse)) in enumerate(zip(futs, serial)):
                o, l = f.result(timeout=60)
                assert np.array_equal(o, out) and np.array_equal(l, lse), f"job {i} differs when run concurrently"


_FORK_CHILD_TIMEOUT = 60


def _fork_child_job(args):
    q, k, v, t = args
    return selfattn.scaled_dot_product_attention(q, k, v, num_threads=t, return_lse=True)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork()")
def test_after_fork_child_works():
    # the parent has used its thread pool; a forked child must neither hang nor compute garbage
    import multiprocessing as mp
    import warnings

    rng = np.random.default_rng(13)
    q = rng.standard_normal((2, 3, 130, 32)).astype(np.float32)
    k = rng.standard_normal((2, 3, 260, 32)).astype(np.float32)
    v = rng.standard_normal((2, 3, 260, 16)).astype(np.float32)
    parent = selfattn.scaled_dot_product_attention(q, k, v, num_threads=2, return_lse=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # fork with threads alive
        ctx = mp.get_context("fork")
        with ctx.Pool(1) as pool:
            res = pool.map_async(_fork_child_job, [(q, k, v, None), (q, k, v, 2)])
            children = res.get(timeout=_FORK_CHILD_TIMEOUT)
    for out, lse in children:
        assert np.array_equal(out, parent[0]) and np.array_equal(lse, parent[1])


@pytest.mark.parametrize("shape", [(6, 1, 200, 40), (3, 2, 129, 17), (1, 1, 300, 64)])
def test_schedule_switch_is_bitwise_invisible(shape):
    """The kernel packs K/V either per task (many units) or shared across threads (few);
    which one depends on the thread count (6 units: fused at 1 thread, shared at 2).
    Both must give the same bits."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    if shape == (6, 1, 200, 40) and selfattn.config()["openmp"]:
        fused = {n: _core.sdpa(q, k, v, is_causal=True, num_threads=n, schedule_only=True)["fused"] for n in (1, 2)}
        assert fused == {1: True, 2: False}, f"the thread count no longer switches the schedule: {fused}"
    for isa in ISAS:
        with selfattn.use_isa(isa):
            runs = [selfattn.scaled_dot_product_attention(q, k, v, is_causal=True, return_lse=True, num_threads=n)
                    for n in (1, 2, 3, 5)]
        for out, lse in runs[1:]:
            assert np.array_equal(out, runs[0][0]) and np.array_equal(lse, runs[0][1]), isa


def test_small_problems_run_on_one_thread():
    """Below about 5e5 multiply-adds (units * L * S * (E + Ev)) a call runs on one thread whatever
    num_threads asks (a second thread costs more than it saves, and milliseconds on a loaded
    machine); above it the threads asked for are used. The results are the same either way."""
    if not selfattn.config()["openmp"]:
        pytest.skip("built without OpenMP: always one thread")
    rng = np.random.default_rng(5)
    small = [rng.standard_normal(s) for s in ((2, 32, 32), (2, 32, 32), (2, 32, 32))]       # 2*32*32*64 = 1.3e5
    large = [rng.standard_normal(s) for s in ((8, 64, 64), (8, 64, 64), (8, 64, 64))]       # 8*64*64*128 = 4.2e6
    assert _core.sdpa(*small, num_threads=2, schedule_only=True)["threads"] == 1
    assert _core.sdpa(*large, num_threads=2, schedule_only=True)["threads"] == 2
    for q, k, v in (small, large):
        a = selfattn.scaled_dot_product_attention(q, k, v, num_threads=1)
        b = selfattn.scaled_dot_product_attention(q, k, v, num_threads=2)
        assert np.array_equal(a, b)
