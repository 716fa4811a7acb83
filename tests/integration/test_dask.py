"""selfattn.dask.scaled_dot_product_attention: chunked along batch, heads, L and S (merged with
merge_attention), equal to the single call and the reference for every option; blocks nobody sees make
no task; lazy; every scheduler, a 2-worker LocalCluster among them; K/V larger than a worker's memory."""

import os
import sys
import time

import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import selfattn
from selfattn import reference
from sa_testutil import REPO_ROOT, assert_unchanged, examples, optional_import, snapshot

dask = optional_import("dask")
import dask.array as da  # noqa: E402

import selfattn.dask as sdask  # noqa: E402

sdpa = selfattn.scaled_dot_product_attention
TOL = {np.float64: 1e-12, np.float32: 1e-5}
SLOPES = np.array([0.5, 0.25, 0.125, 0.0625])


@pytest.fixture(scope="module")
def client():
    distributed = optional_import("distributed")
    # starting the workers leaves OMP_NUM_THREADS=1 (and more) in this process's environment, which
    # later tests' subprocesses would inherit: put it back
    environ = dict(os.environ)
    try:
        # no spilling to disk: what completes there fits in the workers' memory
        with dask.config.set({"distributed.worker.memory.target": False,
                              "distributed.worker.memory.spill": False}):
            cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                               memory_limit="256MiB", dashboard_address=None)
            c = distributed.Client(cluster)
        yield c
        c.close()
        cluster.close()
    finally:
        os.environ.clear()
        os.environ.update(environ)


def test_distributed_matches_the_installed_dask():
    """distributed pins the dask it works with (==, its own version); a pair that pip resolved apart
    (distributed 2021.4.1 beside dask 2026.11: "cannot import name 'collections_to_dsk'") fails here
    with the versions named, not later inside a cluster test. selfattn[dask] asks for
    dask[array,distributed], which keeps them together."""
    import importlib.metadata as md
    try:
        dist_version = md.version("distributed")
    except md.PackageNotFoundError:
        optional_import("distributed")      # skips, or fails where CI requires it
        return
    pins = [r for r in md.requires("distributed") or [] if r.replace(" ", "").startswith("dask")]
    assert pins, f"distributed {dist_version} declares no dask requirement"
    assert dist_version == dask.__version__, (
        f"distributed {dist_version} beside dask {dask.__version__} (distributed requires {pins}): "
        f"install them together, pip install \"dask[array,distributed]\"")
    optional_import("distributed")


def _data(dtype, B=2, Hq=4, H=2, L=37, S=45, E=8, Ev=6, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, Hq, L, E)).astype(dtype), rng.standard_normal((B, H, S, E)).astype(dtype),
            rng.standard_normal((B, H, S, Ev)).astype(dtype))


def _chunked(q, k, v, qc, kc):
    """Dask arrays: q chunked (batch, heads, L) as qc, k/v chunked along S as kc (heads 1 at a time)."""
    return (da.from_array(q, chunks=qc + (q.shape[-1],)),
            da.from_array(k, chunks=(1, 1, kc, k.shape[-1])),
            da.from_array(v, chunks=(1, 1, kc, v.shape[-1])))


def _compare(got, got_lse, want, want_lse, dtype):
    tol = TOL[dtype]
    assert got.dtype == want.dtype and got.shape == want.shape and got_lse.shape == want_lse.shape
    vmax = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * vmax)
    np.testing.assert_array_equal(np.isneginf(got_lse), np.isneginf(want_lse))
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(got_lse[fin], want_lse[fin], rtol=tol, atol=tol)


def _run(q, k, v, kw, scheduler="sync", **chunking):
    qd, kd, vd = _chunked(q, k, v, chunking.get("qc", (1, 2, 10)), chunking.get("kc", 12))
    kw = dict(kw)
    if isinstance(kw.get("attn_mask"), np.ndarray) and chunking.get("mask_dask", True):
        kw["attn_mask"] = da.from_array(kw["attn_mask"], chunks=7)    # any chunks: aligned by the function
    out, lse = sdask.scaled_dot_product_attention(qd, kd, vd, return_lse=True, **kw)
    assert isinstance(out, da.Array) and isinstance(lse, da.Array)
    return dask.compute(out, lse, scheduler=scheduler)


CASES = [
    dict(),
    dict(is_causal=True),
    dict(is_causal=True, alignment="bottom_right"),
    dict(window_size=(5, 3)),
    dict(window_size=4, is_causal=True),
    dict(window_size=(9, 2), alignment="bottom_right"),
    dict(key_lengths=[40, 3]),
    dict(key_lengths=[45, 0], is_causal=True),
    dict(is_causal=True, alignment="bottom_right", key_lengths=[44, 20]),
    dict(window_size=(5, 3), alignment="bottom_right", key_lengths=[40, 17]),
    dict(alibi_slopes=SLOPES),
    dict(alibi_slopes=SLOPES, is_causal=True),
    dict(alibi_slopes=SLOPES, is_causal=True, alignment="bottom_right", key_lengths=[44, 20]),
    dict(alibi_slopes=np.array([[0.5, 0.3, 0.2, 0.1], [1.0, 0.0, 0.25, 0.125]]), window_size=(7, 2),
         alignment="bottom_right"),
    dict(softcap=3.0, scale=0.7, is_causal=True),
    dict(attn_mask="bool", is_causal=True, alignment="bottom_right"),
    dict(attn_mask="float", window_size=(6, 6)),
    dict(attn_mask="bool", alibi_slopes=SLOPES, softcap=5.0),
    dict(attn_mask="float", alibi_slopes=SLOPES, is_causal=True, key_lengths=[30, 45]),
]


def _with_mask(kw, L, S, dtype, seed=1):
    kw = dict(kw)
    rng = np.random.default_rng(seed)
    if kw.get("attn_mask") == "bool":
        kw["attn_mask"] = rng.random((2, 1, L, S)) < 0.7
    elif kw.get("attn_mask") == "float":
        kw["attn_mask"] = np.where(rng.random((L, S)) < 0.8, rng.standard_normal((L, S)), -np.inf).astype(dtype)
    return kw


def _ids(kw):
    return ",".join(f"{k}={v}" if isinstance(v, (str, bool)) else k for k, v in kw.items()) or "plain"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kw", CASES, ids=_ids)
def test_every_option_equals_the_single_call_and_the_reference(kw, dtype):
    q, k, v = _data(dtype)
    kw = _with_mask(dict(kw, enable_gqa=True), q.shape[-2], k.shape[-2], dtype)
    snaps = snapshot(q, k, v, kw.get("attn_mask"))
    want, want_lse = sdpa(q, k, v, return_lse=True, **kw)
    got, got_lse = _run(q, k, v, kw)
    assert_unchanged((q, k, v, kw.get("attn_mask")), snaps)
    _compare(got, got_lse, want, want_lse, dtype)
    if dtype == np.float64:
        ref, ref_lse = reference.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
        _compare(got, got_lse, ref, ref_lse, dtype)


@st.composite
def chunked_cases(draw):
    L, S = draw(st.integers(1, 40)), draw(st.integers(1, 40))

    def cuts(n):
        edges = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=4)))) if n > 1 else []
        return tuple(b - a for a, b in zip([0] + edges, edges + [n]))
    kw = dict(is_causal=draw(st.booleans()), alignment=draw(st.sampled_from(["top_left", "bottom_right"])))
    side = st.one_of(st.none(), st.integers(0, 12))
    if draw(st.booleans()):
        kw["window_size"] = draw(st.one_of(st.integers(0, 10), st.tuples(side, side)))
    if draw(st.booleans()):
        kw["key_lengths"] = draw(st.lists(st.integers(0, S), min_size=2, max_size=2))
    if draw(st.booleans()):
        kw["alibi_slopes"] = draw(st.sampled_from([0.0, 0.1, 1.0])) * np.arange(1, 5) / 4
    if draw(st.booleans()):
        kw["attn_mask"] = draw(st.sampled_from(["bool", "float"]))
    return dict(L=L, S=S, lc=cuts(L), sc=cuts(S), hc=draw(st.sampled_from([(2, 2), (4,), (2, 1, 1)])),
                dtype=draw(st.sampled_from([np.float64, np.float32])), kw=kw, seed=draw(st.integers(0, 1000)))


@settings(max_examples=examples(40), deadline=None)
@given(c=chunked_cases())
def test_random_chunks_and_options(c):
    note(repr(c))
    dtype = c["dtype"]
    q, k, v = _data(dtype, L=c["L"], S=c["S"], seed=c["seed"])
    kw = _with_mask(dict(c["kw"], enable_gqa=True), c["L"], c["S"], dtype, seed=c["seed"])
    want, want_lse = sdpa(q, k, v, return_lse=True, **kw)
    qd = da.from_array(q, chunks=((1, 1), c["hc"], c["lc"], (8,)))
    kd = da.from_array(k, chunks=((2,), (1, 1), c["sc"], (8,)))
    vd = da.from_array(v, chunks=((1, 1), (2,), (c["S"],), (3, 3)))   # rechunked to k's chunks
    out, lse = sdask.scaled_dot_product_attention(qd, kd, vd, return_lse=True, split_every=2, **kw)
    got, got_lse = dask.compute(out, lse, scheduler="sync")
    _compare(got, got_lse, want, want_lse, dtype)


@pytest.mark.parametrize("shape", [(23, 8), (3, 23, 8)])
def test_2d_and_3d_inputs_and_numpy_inputs(shape):
    rng = np.random.default_rng(4)
    q = rng.standard_normal(shape)
    k = rng.standard_normal(shape[:-2] + (31, 8))
    v = rng.standard_normal(shape[:-2] + (31, 5))
    kw = dict(is_causal=True, alignment="bottom_right", key_lengths=29, alibi_slopes=0.3)
    want = sdpa(q, k, v, **kw)
    qd = da.from_array(q, chunks=shape[:-2] + (6, 8))
    kd = da.from_array(k, chunks=shape[:-2] + (10, 8))
    np.testing.assert_allclose(sdask.scaled_dot_product_attention(qd, kd, v, **kw).compute(scheduler="sync"),
                               want, rtol=1e-12, atol=1e-12)
    # all NumPy: one block, still lazy
    out = sdask.scaled_dot_product_attention(q, k, v, **kw)
    assert isinstance(out, da.Array) and out.numblocks == (1,) * len(shape)
    np.testing.assert_allclose(out.compute(scheduler="sync"), want, rtol=1e-12, atol=1e-12)


def test_mixed_dtypes_and_int_query_promote_like_numpy():
    q, k, v = _data(np.float32)
    out = sdask.scaled_dot_product_attention(da.from_array(q), da.from_array(k.astype(np.float64)), v,
                                             enable_gqa=True)
    assert out.dtype == np.float64 and out.compute(scheduler="sync").dtype == np.float64
    qi = (q * 3).astype(np.int32)
    out = sdask.scaled_dot_product_attention(qi, k, v, enable_gqa=True)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.compute(scheduler="sync"), sdpa(qi, k, v, enable_gqa=True), rtol=1e-6)


# ---- the graph: skipped blocks, merge tree, laziness

def _parts(arr):
    return [key for key in dict(arr.__dask_graph__()) if isinstance(key, tuple)
            and str(key[0]).startswith("selfattn-sdpa-part")]


def _merges(arr):
    return [key for key in dict(arr.__dask_graph__()) if isinstance(key, tuple)
            and str(key[0]).startswith("selfattn-sdpa-merge")]


@pytest.mark.parametrize("kw,L,n_parts", [
    (dict(), 64, 16),                                                   # 4 x 4 blocks
    (dict(is_causal=True), 64, 10),                                     # lower triangle with the diagonal
    (dict(is_causal=True, window_size=(16, 0)), 64, 7),                 # diagonal and one below
    (dict(is_causal=True, window_size=(15, 0)), 64, 7),
    (dict(is_causal=True, window_size=(0, 0)), 64, 4),                  # the diagonal only
    (dict(key_lengths=[20]), 64, 8),                                    # key chunks 0 and 1 only
    (dict(key_lengths=[0]), 64, 4),                                     # nothing: one zeros task per query chunk
    (dict(is_causal=True, alignment="bottom_right"), 16, 4),            # 16 queries on the last 16 keys, causal:
    (dict(is_causal=True, alignment="bottom_right", window_size=(10, 0)), 16, 2),   # ... within 10 of them
    (dict(is_causal=True, alignment="bottom_right", key_lengths=[40]), 16, 3),
])
def test_blocks_nobody_sees_make_no_task(kw, L, n_parts):
    rng = np.random.default_rng(0)
    q = da.from_array(rng.standard_normal((1, 2, L, 8)), chunks=(1, 2, 16, 8))
    k = da.from_array(rng.standard_normal((1, 2, 64, 8)), chunks=(1, 2, 16, 8))
    v = da.from_array(rng.standard_normal((1, 2, 64, 8)), chunks=(1, 2, 16, 8))
    out = sdask.scaled_dot_product_attention(q, k, v, **kw)
    assert len(_parts(out)) == n_parts
    np.testing.assert_allclose(out.compute(scheduler="sync"), sdpa(*(a.compute() for a in (q, k, v)), **kw),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("split_every,n_merges", [(2, 7), (3, 4), (8, 1), (9, 1)])
def test_merge_tree_fan_in(split_every, n_merges):
    q, k, v = _data(np.float64, B=1, Hq=2, H=2, L=5, S=64)
    qd, kd, vd = _chunked(q, k, v, (1, 2, 5), 8)                       # 8 key chunks, 2 kv head chunks
    out, lse = sdask.scaled_dot_product_attention(qd, kd, vd, return_lse=True, split_every=split_every)
    assert len(_parts(out)) == 8 and len(_merges(out)) == n_merges
    want, want_lse = sdpa(q, k, v, return_lse=True)
    _compare(*dask.compute(out, lse, scheduler="sync"), want, want_lse, np.float64)


def test_building_the_graph_computes_nothing():
    def boom(x):
        raise RuntimeError("computed")
    q = da.map_blocks(boom, da.zeros((1, 1, 4, 8), chunks=2), dtype=np.float64)
    out = sdask.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert isinstance(out, da.Array) and out.shape == (1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="computed"):
        out.compute(scheduler="sync")


# ---- schedulers

@pytest.mark.parametrize("scheduler", ["sync", "threads", "processes"])
def test_local_schedulers(scheduler):
    q, k, v = _data(np.float32, seed=5)
    kw = dict(is_causal=True, alignment="bottom_right", alibi_slopes=SLOPES, enable_gqa=True, num_threads=1)
    got, got_lse = _run(q, k, v, kw, scheduler=scheduler)
    _compare(got, got_lse, *sdpa(q, k, v, return_lse=True, **kw), np.float32)


@pytest.mark.slow
def test_distributed_local_cluster(client):
    q, k, v = _data(np.float64, seed=6)
    kw = _with_mask(dict(is_causal=True, window_size=(9, 0), enable_gqa=True, key_lengths=[41, 30],
                         attn_mask="bool", alibi_slopes=SLOPES), 37, 45, np.float64)
    qd, kd, vd = _chunked(q, k, v, (1, 2, 10), 12)
    out, lse = sdask.scaled_dot_product_attention(qd, kd, vd, return_lse=True, num_threads=1, **kw)
    got, got_lse = client.compute([out, lse], sync=True)
    _compare(got, got_lse, *sdpa(q, k, v, return_lse=True, **kw), np.float64)
    # and through the default get of a dask collection (the client is the default scheduler now)
    np.testing.assert_allclose(out.compute(), got, rtol=0, atol=0)


@pytest.mark.slow
def test_kv_larger_than_a_worker_memory_limit(client):
    """The example's small version: K/V of 288 MiB, generated on the workers, attended by 128 queries
    on 2 workers limited to 256 MiB each (no spilling), chunked along S; no worker was restarted."""
    import importlib.util
    path = REPO_ROOT / "examples" / "dask_beyond_memory.py"
    if not path.is_file():
        pytest.skip("examples/ not found (tests run without the repository)")
    spec = importlib.util.spec_from_file_location("selfattn_example_dask_beyond_memory", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    workers = set(client.scheduler_info()["workers"])
    limit = min(w["memory_limit"] for w in client.scheduler_info()["workers"].values())
    t = time.perf_counter()
    res = ex.run(client, kv_mib=288, chunk_mib=8, L=128, check=True)
    assert res["kv_bytes"] > limit == 256 * 2**20
    assert res["max_abs_error"] < 1e-4 and res["rows"] == 128
    assert set(client.scheduler_info()["workers"]) == workers, "a worker was restarted (memory limit)"
    print(f"K/V {res['kv_bytes'] / 2**20:.0f} MiB on workers of {limit / 2**20:.0f} MiB: "
          f"{time.perf_counter() - t:.1f} s with the check")


# ---- errors, before anything is built

def test_errors_name_the_argument():
    q, k, v = _data(np.float64)
    qd, kd, vd = _chunked(q, k, v, (1, 2, 10), 12)
    with pytest.raises(ValueError, match="query and key must have the same last dim E"):
        sdask.scaled_dot_product_attention(qd, kd[..., :4], vd, enable_gqa=True)
    with pytest.raises(ValueError, match="key and value must have the same number of keys S"):
        sdask.scaled_dot_product_attention(qd, kd, vd[..., :40, :], enable_gqa=True)
    with pytest.raises(ValueError, match="pass enable_gqa=True"):
        sdask.scaled_dot_product_attention(qd, kd, vd)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(37, 44\) does not broadcast"):
        sdask.scaled_dot_product_attention(qd, kd, vd, attn_mask=np.ones((37, 44), bool), enable_gqa=True)
    with pytest.raises(ValueError, match=r"key_lengths must be in \[0, S=45\]"):
        sdask.scaled_dot_product_attention(qd, kd, vd, key_lengths=[46, 1], enable_gqa=True)
    with pytest.raises(TypeError, match="query has dtype complex128"):
        sdask.scaled_dot_product_attention(qd.astype(complex), kd, vd, enable_gqa=True)
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        sdask.scaled_dot_product_attention(qd, kd, vd, attn_mask=da.ones((37, 45), dtype=np.int8), enable_gqa=True)
    with pytest.raises(ValueError, match="window_size must be >= 0"):
        sdask.scaled_dot_product_attention(qd, kd, vd, window_size=(-1, 2), enable_gqa=True)
    with pytest.raises(ValueError, match="alignment must be"):
        sdask.scaled_dot_product_attention(qd, kd, vd, alignment="center", enable_gqa=True)
    with pytest.raises(ValueError, match="same number of dims and the same leading"):
        sdask.scaled_dot_product_attention(qd, kd[:1], vd[:1], enable_gqa=True)
    with pytest.raises(ValueError, match="same number of dims"):
        sdask.scaled_dot_product_attention(qd[0], kd, vd, enable_gqa=True)
    with pytest.raises(ValueError, match="split_every must be >= 2"):
        sdask.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True, split_every=1)
    with pytest.raises(TypeError, match="split_every must be an int"):
        sdask.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True, split_every=2.0)
    unknown = da.from_array(q, chunks=(1, 2, 10, 8))[da.from_array(np.array([True, True]))]
    with pytest.raises(ValueError, match="query has unknown chunk sizes"):
        sdask.scaled_dot_product_attention(unknown, kd, vd, enable_gqa=True)


def test_a_huge_problem_is_validated_without_memory():
    # 2**40 elements per array: the validation uses zero-memory stand-ins of the full shapes
    q = da.zeros((1, 1, 2**20, 2**20), chunks=(1, 1, 2**16, 2**20), dtype=np.float32)
    out = sdask.scaled_dot_product_attention(q, q, q, is_causal=True, window_size=(2**16, 0))
    assert out.shape == q.shape and out.dtype == np.float32


def test_missing_dask_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask.array", None)
    with pytest.raises(ImportError, match=r'pip install "selfattn\[dask\]"'):
        sdask.scaled_dot_product_attention(np.ones((2, 4)), np.ones((2, 4)), np.ones((2, 4)))
