"""Inputs are sacred: every entry point leaves the caller's arrays bit-identical (and their
flags unchanged), on writable and read-only inputs, masks and non-contiguous views, and the
results never alias an input."""

import numpy as np
import pytest

import selfattn
from sa_testutil import ISAS, LAYOUTS, with_layout

sdpa = selfattn.scaled_dot_product_attention


def _state(a):
    a = np.asarray(a) if not isinstance(a, np.ndarray) else a
    return (a.tobytes(), a.shape, a.strides, a.dtype, a.flags.writeable, a.flags.c_contiguous,
            a.__array_interface__["data"][0])


def _check_untouched(arrays, before, results):
    for name, a in arrays.items():
        assert _state(a) == before[name], f"{name} was modified (bytes, strides or flags) by the call"
    for r in results:
        for name, a in arrays.items():
            assert not np.shares_memory(r, a), f"a result aliases input {name}"


def _values(rng, shape, dtype):
    a = rng.standard_normal(shape)
    if np.dtype(dtype).kind == "i":
        a = np.round(3 * a)
    return a.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", ["plain", "bool_mask", "float_mask", "causal", "gqa_lse"])
def test_sdpa_leaves_inputs_untouched(isa, dtype, layout, variant):
    rng = np.random.default_rng(3)
    hk = 1 if variant == "gqa_lse" else 2
    arrays = {
        # special values too: NaN must not be "cleaned" in place, -0.0 must keep its sign bit
        "query": with_layout(_values(rng, (2, 2, 70, 5), dtype), layout, rng),
        "key": with_layout(_values(rng, (2, hk, 131, 5), dtype), layout, rng),
        "value": with_layout(_values(rng, (2, hk, 131, 3), dtype), layout, rng),
    }
    if np.dtype(dtype).kind == "f" and arrays["value"].flags.writeable:
        arrays["query"].flat[0] = -0.0
        arrays["key"].flat[1] = np.nan
    kw = {}
    if variant == "bool_mask":
        arrays["attn_mask"] = with_layout(rng.random((70, 131)) < 0.5, layout, rng)
        kw["attn_mask"] = arrays["attn_mask"]
    elif variant == "float_mask":
        m = rng.standard_normal((2, 1, 70, 131)).astype(np.float32)
        m[..., 3, :] = -np.inf
        arrays["attn_mask"] = with_layout(m, layout, rng)
        kw["attn_mask"] = arrays["attn_mask"]
    elif variant == "causal":
        kw["is_causal"] = True
    elif variant == "gqa_lse":
        kw.update(enable_gqa=True, return_lse=True)
    before = {n: _state(a) for n, a in arrays.items()}
    res = sdpa(arrays["query"], arrays["key"], arrays["value"], **kw)
    results = res if isinstance(res, tuple) else (res,)
    _check_untouched(arrays, before, results)
    # twice: nothing cached from the first call may write into the inputs either
    res2 = sdpa(arrays["query"], arrays["key"], arrays["value"], num_threads=1, **kw)
    _check_untouched(arrays, before, res2 if isinstance(res2, tuple) else (res2,))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_wo", [False, True])
def test_attend_leaves_inputs_untouched(dtype, layout, with_wo):
    rng = np.random.default_rng(4)
    arrays = {
        "x": with_layout(_values(rng, (2, 67, 12), dtype), layout, rng),
        "wq": with_layout(_values(rng, (12, 8), dtype), layout, rng),
        "wk": with_layout(_values(rng, (12, 8), dtype), layout, rng),
        "wv": with_layout(_values(rng, (12, 6), dtype), layout, rng),
    }
    kw = {}
    if with_wo:
        arrays["wo"] = with_layout(_values(rng, (6, 5), dtype), layout, rng)
        kw["wo"] = arrays["wo"]
    before = {n: _state(a) for n, a in arrays.items()}
    for isa in ISAS:
        with selfattn.use_isa(isa):
            out = selfattn.attend(arrays["x"], arrays["wq"], arrays["wk"], arrays["wv"], num_heads=2,
                                  is_causal=True, **kw)
            _check_untouched(arrays, before, (out,))


def test_broadcast_and_overlapping_views_untouched():
    """Zero-stride and overlapping (as_strided, read-only) views: the values seen through them
    and the buffers behind them are unchanged."""
    rng = np.random.default_rng(5)
    base_k = rng.standard_normal(200).astype(np.float32)
    k = np.lib.stride_tricks.as_strided(base_k, shape=(130, 8), strides=(4, 4), writeable=False)
    q = np.broadcast_to(rng.standard_normal((1, 9, 8)).astype(np.float32), (3, 9, 8))
    v = np.broadcast_to(rng.standard_normal((130, 1)).astype(np.float32), (130, 4))
    mask = np.broadcast_to(rng.random((1, 130)) < 0.5, (9, 130))
    arrays = {"q": q, "k": k, "v": v, "mask": mask, "base_k": base_k}
    before = {n: _state(a) for n, a in arrays.items()}
    for isa in ISAS:
        with selfattn.use_isa(isa):
            out = sdpa(q, k, v, attn_mask=mask)
            _check_untouched(arrays, before, (out,))


def test_memmap_readonly_inputs_untouched(tmp_path):
    rng = np.random.default_rng(6)
    arrays = {}
    for name, shape in (("q", (2, 9, 8)), ("k", (2, 11, 8)), ("v", (2, 11, 3))):
        path = tmp_path / f"{name}.dat"
        w = np.memmap(path, dtype=np.float64, mode="w+", shape=shape)
        w[...] = rng.standard_normal(shape)
        w.flush()
        del w
        arrays[name] = np.memmap(path, dtype=np.float64, mode="r", shape=shape)
    on_disk = {n: (tmp_path / f"{n}.dat").read_bytes() for n in arrays}
    before = {n: _state(a) for n, a in arrays.items()}
    out = sdpa(arrays["q"], arrays["k"], arrays["v"], is_causal=True)
    _check_untouched(arrays, before, (out,))
    assert on_disk == {n: (tmp_path / f"{n}.dat").read_bytes() for n in arrays}


def test_list_inputs_untouched():
    q = [[1.0, 2.0], [3.0, float("nan")]]
    k = [[0.5, -0.0], [1.0, 1.0], [2.0, 0.0]]
    v = [[1.0], [2.0], [3.0]]
    mask = [[True, False, True], [False, False, False]]
    snap = repr((q, k, v, mask))
    sdpa(q, k, v, attn_mask=mask, return_lse=True)
    assert repr((q, k, v, mask)) == snap
