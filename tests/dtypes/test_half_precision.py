"""bfloat16 and float16: inputs and outputs stored in 16 bits, computed in float32.

The kernels read q, k and v as they are stored and convert each value exactly to float32 where
it is loaded or packed; the output is rounded to nearest even where it is written. So a 16-bit
call must give, bit for bit, the float32 call on the same (exactly widened) inputs with its output
rounded once: that is checked on every ISA, schedule and option. The rounding itself is checked
on every 16-bit pattern, and the accuracy against selfattn.reference (float64) and, where torch
is installed, against torch's own bfloat16 / float16 SDPA on the same inputs.

bfloat16 comes from ml_dtypes (the `bf16` extra); without it those cases skip. The avx512bf16
path's bfloat16 forward (vdpbf16ps on bfloat16 pairs, probabilities rounded to bfloat16) has its
own contract: test_bf16_dot.py.
"""

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import selfattn
from sa_testutil import ISAS, assert_bits, edge, examples, forced_schedule, run_isas


def _maybe_import(name):
    """The module, or None (float16 runs without either); CI's SELFATTN_REQUIRE_OPTIONAL makes a
    missing one a failure (sa_testutil.optional_import), not a skip."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if name in os.environ.get("SELFATTN_REQUIRE_OPTIONAL", "").split(","):
            raise
        return None


ml_dtypes = _maybe_import("ml_dtypes")
torch = _maybe_import("torch")

BF16 = np.dtype(ml_dtypes.bfloat16) if ml_dtypes is not None else None
HALF = [np.dtype(np.float16)] + ([BF16] if BF16 is not None else [])
HALF_IDS = [d.name for d in HALF]
# one ulp at 1.0
EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}

sdpa = selfattn.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def _widening_path():
    """This module's contract is the widening one: the process default set to the best path that
    widens (avx512bf16, the default on AMD's Zen 4 / Zen 5, multiplies bfloat16 pairs instead:
    test_bf16_dot.py). Process-wide, not use_isa: the Dask test's worker threads run it too."""
    previous = selfattn.set_isa(ISAS[0])
    try:
        yield
    finally:
        selfattn.set_isa(previous)


def randh(rng, shape, dt, amp=1.0):
    return (rng.standard_normal(shape) * amp).astype(dt)


def widened_call(fn, dt, *arrays, **kw):
    """fn on the float32 widening of the 16-bit arrays, its output rounded to dt (lse kept).
    The widened copies are C-contiguous: the decode schedule reads K and V rows in place, and a
    float32 call's sums there depend on their layout (contiguous rows: vector code) in the last
    bit; 16-bit K and V rows are always widened into contiguous rows first."""
    res = fn(*(np.ascontiguousarray(a, dtype=np.float32) if a is not None and a.dtype == dt else a
               for a in arrays), **kw)
    if isinstance(res, tuple):
        return (res[0].astype(dt),) + res[1:]
    return res.astype(dt)


CASES = [  # (name, q shape, k shape, v shape, options)
    ("plain", (2, 3, 37, 40), (2, 3, 150, 40), (2, 3, 150, 24), {}),
    ("causal", (1, 2, 130, 64), (1, 2, 130, 64), (1, 2, 130, 64), dict(is_causal=True)),
    ("causal_bottom_right", (1, 2, 50, 32), (1, 2, 300, 32), (1, 2, 300, 32),
     dict(is_causal=True, alignment="bottom_right")),
    ("gqa", (1, 8, 20, 64), (1, 2, 200, 64), (1, 2, 200, 64), dict(enable_gqa=True)),
    ("window", (1, 2, 300, 32), (1, 2, 300, 32), (1, 2, 300, 32), dict(window_size=(20, 5))),
    ("key_lengths", (3, 2, 17, 16), (3, 2, 90, 16), (3, 2, 90, 16), dict(key_lengths=np.array([90, 1, 45]))),
    ("alibi_softcap", (2, 4, 33, 32), (2, 4, 70, 32), (2, 4, 70, 32),
     dict(alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]), softcap=5.0)),
    ("broadcast_kv", (2, 3, 9, 8), (1, 3, 40, 8), (1, 1, 40, 8), {}),
    ("decode", (1, 4, 1, 64), (1, 4, 2000, 64), (1, 4, 2000, 64), {}),
    ("decode_gqa_ragged_e", (2, 8, 2, 72), (2, 2, 777, 72), (2, 2, 777, 40),
     dict(enable_gqa=True, is_causal=True, alignment="bottom_right")),
    # 3 and 7 rows a K/V (SmolLM2's 9 / 3 heads; 4 + 3): the rows left after whole fours read K and V together
    ("decode_gqa3", (2, 9, 1, 64), (2, 3, 600, 64), (2, 3, 600, 64), dict(enable_gqa=True)),
    ("decode_rows7", (1, 7, 1, 32), (1, 1, 300, 32), (1, 1, 300, 48),
     dict(enable_gqa=True, window_size=(100, 0), is_causal=True, alignment="bottom_right")),
    ("strided_e1", (2, 5, 3), (2, 300, 3), (2, 300, 5), {}),
]


@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("name,qs,ks,vs,kw", CASES, ids=[c[0] for c in CASES])
def test_equals_float32_path_rounded(dt, name, qs, ks, vs, kw):
    rng = np.random.default_rng(abs(hash(name)) % 2 ** 32)
    q, k, v = randh(rng, qs, dt, 2.0), randh(rng, ks, dt, 2.0), randh(rng, vs, dt)

    def check():
        out, lse = sdpa(q, k, v, return_lse=True, **kw)
        assert out.dtype == dt and lse.dtype == np.float32
        ref, ref_lse = widened_call(sdpa, dt, q, k, v, return_lse=True, **kw)
        assert_bits(out, ref, f"{name} {dt} {selfattn.config()['isa']}")
        assert_bits(lse, ref_lse, f"{name} lse")
    run_isas(check)


@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("schedule", ["shared", "fused", "banded", "decode"])
def test_every_schedule(dt, schedule):
    rng = np.random.default_rng(1)
    q, k, v = randh(rng, (2, 2, 12, 48), dt), randh(rng, (2, 2, 333, 48), dt), randh(rng, (2, 2, 333, 48), dt)
    kw = dict(window_size=(64, 0)) if schedule == "banded" else {}

    def check():
        with forced_schedule(schedule):
            out = sdpa(q, k, v, **kw)
            ref = widened_call(sdpa, dt, q, k, v, **kw)
        assert_bits(out, ref, schedule)
    run_isas(check)


@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
def test_layouts_masks_and_threads(dt):
    rng = np.random.default_rng(2)
    base = randh(rng, (2, 3, 64, 2 * 40), dt)
    q = base[..., ::2]                                     # strided last dim
    k = randh(rng, (2, 3, 40, 100), dt).swapaxes(-1, -2)   # (2, 3, 100, 40), column-major rows
    v = np.asfortranarray(randh(rng, (2, 3, 100, 24), dt))
    bool_mask = rng.random((64, 100)) < 0.7
    float_mask = (rng.standard_normal((3, 64, 100))).astype(dt)       # a 16-bit float mask: read as float32
    before = [a.copy() for a in (q, k, v, float_mask)]
    for m in (bool_mask, float_mask):
        out = sdpa(q, k, v, attn_mask=m)
        ref = widened_call(sdpa, dt, q, k, v, attn_mask=m.astype(np.float32) if m.dtype == dt else m)
        assert_bits(out, ref, "mask")
        assert_bits(sdpa(q, k, v, attn_mask=m, num_threads=1), sdpa(q, k, v, attn_mask=m, num_threads=2), "threads")
    for a, b in zip((q, k, v, float_mask), before):
        assert_bits(a, b, "input changed")


@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
def test_varlen(dt):
    rng = np.random.default_rng(3)
    cu = np.array([0, 5, 5, 70, 71])
    q, k, v = randh(rng, (4, 71, 32), dt), randh(rng, (2, 71, 32), dt), randh(rng, (2, 71, 16), dt)
    out, lse = selfattn.varlen_attention(q, k, v, cu, cu, is_causal=True, enable_gqa=True, return_lse=True)
    ref, ref_lse = widened_call(selfattn.varlen_attention, dt, q, k, v, cu, cu, is_causal=True, enable_gqa=True,
                                return_lse=True)
    assert_bits(out, ref, "varlen")
    assert_bits(lse, ref_lse, "varlen lse")


@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
def test_every_value_passes_through(dt):
    """One key: the weight is exactly 1, so out is v itself, every 16-bit pattern (NaN stays NaN;
    -0 becomes +0, as in float32: the accumulator starts at +0)."""
    bits = np.arange(65536, dtype=np.uint16)
    v = bits.view(dt).reshape(1, 1, 65536)
    q = np.zeros((1, 1, 4), dt)
    k = np.zeros((1, 1, 4), dt)

    def check():
        out = sdpa(q, k, v)
        vf = v.astype(np.float32)
        nan, zero = np.isnan(vf), vf == 0
        assert np.isnan(out.astype(np.float32)[nan]).all()
        assert (out.view(np.uint16)[zero] == 0).all()
        assert_bits(out[~nan & ~zero], v[~nan & ~zero], "pass-through")
    run_isas(check)


@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
def test_output_rounds_to_nearest_even(dt):
    """Two keys with equal scores: out = (v1 + v2) / 2, exact in float32, rounded once to dt:
    ties (to even: neighbours' midpoints), subnormals, the sign of zero."""
    rng = np.random.default_rng(4)
    n = 1 << 15
    bits = rng.integers(0, 1 << 16, (2, n), dtype=np.uint16)
    bits[1, : n // 4] = bits[0, : n // 4] + 1                    # neighbours: the midpoint is a tie
    v = bits.view(dt).T.reshape(1, 2, n).copy()
    finite = np.isfinite(v.astype(np.float32)).all(axis=1)[0]
    q = np.zeros((1, 1, 8), dt)
    k = np.zeros((1, 2, 8), dt)
    with np.errstate(invalid="ignore"):          # inf + -inf where a pair is not finite (left out)
        expect = ((v[0, 0].astype(np.float32) + v[0, 1].astype(np.float32)) * np.float32(0.5)).astype(dt)

    def check():
        out = sdpa(q, k, v)[0, 0]
        assert_bits(out[finite], expect[finite], "rounding")
    run_isas(check)


@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
def test_nonfinite_and_fully_masked_rows(dt):
    rng = np.random.default_rng(5)
    q, k, v = randh(rng, (1, 1, 4, 16), dt), randh(rng, (1, 1, 50, 16), dt), randh(rng, (1, 1, 50, 8), dt)
    q[0, 0, 1, 3] = np.nan
    v[0, 0, 7, 2] = np.inf
    mask = np.ones((4, 50), bool)
    mask[2] = False
    out, lse = sdpa(q, k, v, attn_mask=mask, return_lse=True)
    ref, ref_lse = widened_call(sdpa, dt, q, k, v, attn_mask=mask, return_lse=True)
    assert_bits(out, ref, "nonfinite")
    assert np.isnan(out[0, 0, 1].astype(np.float32)).all()
    assert (out[0, 0, 2].astype(np.float32) == 0).all() and lse[0, 0, 2] == -np.inf


@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
def test_accuracy_against_float64_reference(dt):
    """Error within one ulp of the output's dtype, plus float32's own (the rounding dominates)."""
    rng = np.random.default_rng(6)
    for kw in ({}, dict(is_causal=True), dict(window_size=(30, 30), softcap=10.0)):
        q, k, v = randh(rng, (2, 4, 100, 64), dt, 2), randh(rng, (2, 4, 180, 64), dt, 2), randh(rng, (2, 4, 180, 64), dt)
        ref = selfattn.reference.scaled_dot_product_attention(*(a.astype(np.float64) for a in (q, k, v)), **kw)
        err = np.abs(sdpa(q, k, v, **kw).astype(np.float64) - ref)
        bound = EPS[dt.name] * np.abs(ref) + 1e-5 + (6.0e-8 if dt.name == "float16" else 0)
        assert (err <= bound).all(), f"{kw}: worst {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"


@pytest.mark.skipif(torch is None, reason="torch is not installed")
@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("kw", [{}, dict(is_causal=True)], ids=["plain", "causal"])
def test_error_no_larger_than_torch(dt, kw):
    """Against float64: selfattn's worst and mean error <= torch's own SDPA in the same dtype."""
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dt.name]
    rng = np.random.default_rng(7)
    q, k, v = randh(rng, (1, 4, 256, 64), dt, 2), randh(rng, (1, 4, 256, 64), dt, 2), randh(rng, (1, 4, 256, 64), dt)
    ref = selfattn.reference.scaled_dot_product_attention(*(a.astype(np.float64) for a in (q, k, v)), **kw)
    ours = np.abs(sdpa(q, k, v, **kw).astype(np.float64) - ref)
    tq, tk, tv = (torch.from_numpy(a.astype(np.float32)).to(tdt) for a in (q, k, v))
    theirs = np.abs(torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, **kw).float().numpy() - ref)
    assert ours.max() <= theirs.max() and ours.mean() <= theirs.mean(), (ours.max(), theirs.max(), ours.mean(),
                                                                            theirs.mean())


@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
def test_vjp_is_float32_vjp_rounded(dt):
    rng = np.random.default_rng(8)
    q, k, v = randh(rng, (2, 4, 20, 16), dt), randh(rng, (2, 2, 30, 16), dt), randh(rng, (2, 2, 30, 8), dt)
    g = randh(rng, (2, 4, 20, 8), dt)
    out, vjp = selfattn.scaled_dot_product_attention_vjp(q, k, v, is_causal=True, enable_gqa=True)
    grads = vjp(g)
    assert [x.dtype for x in grads] == [dt] * 3
    out32, vjp32 = selfattn.scaled_dot_product_attention_vjp(*(a.astype(np.float32) for a in (q, k, v)),
                                                             is_causal=True, enable_gqa=True)
    assert_bits(out, out32.astype(dt), "forward")
    # the backward reads the rounded forward output: the same as float32 on the rounded out
    p = selfattn._core.describe(*(a.astype(np.float32) for a in (q, k, v)), is_causal=True, enable_gqa=True)
    _, lse = p.run(return_lse=True)
    ref = p.backward(out.astype(np.float32), lse, g.astype(np.float32))
    for a, b, n in zip(grads, ref, "qkv"):
        assert_bits(a, b.astype(dt), f"d{n}")


@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
def test_mixed_dtypes_are_refused(dt):
    q = np.zeros((2, 4), dt)
    with pytest.raises(TypeError, match=f"query {dt.name}, key float32, value {dt.name}"):
        sdpa(q, q.astype(np.float32), q)
    with pytest.raises(ValueError, match=f"dtype {dt.name}"):
        selfattn._core.sdpa(q, q, q, out=np.empty((2, 4), np.float32))


def test_float16_without_ml_dtypes(tmp_path):
    """float16 needs nothing beyond NumPy: importing selfattn and running a float16 call never
    imports ml_dtypes."""
    code = ("import sys, numpy as np, selfattn\n"
            "q = np.ones((3, 4), np.float16)\n"
            "assert selfattn.scaled_dot_product_attention(q, q, q).dtype == np.float16\n"
            "assert 'ml_dtypes' not in sys.modules, 'ml_dtypes imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)     # not the source tree



@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
def test_kvcache_stores_and_reads_16_bits(dt):
    rng = np.random.default_rng(9)
    B, H, Hq, E = 3, 2, 4, 32
    cache = selfattn.KVCache(B, H, 64, E, dtype=dt)
    ref = selfattn.KVCache(B, H, 64, E, dtype=np.float32)
    assert cache.keys.dtype == dt and cache._k.nbytes * 2 == ref._k.nbytes          # half the bytes
    k, v = randh(rng, (B, H, 20, E), dt), randh(rng, (B, H, 20, E), dt)
    cache.append(k, v, counts=[20, 7, 13])
    ref.append(k, v, counts=[20, 7, 13])                        # 16 bits widen exactly into float32
    for counts in (None, [1, 0, 1]):
        q = randh(rng, (B, Hq, 1, E), dt)
        out, lse = cache.attend(q, counts=counts, return_lse=True)
        r, rl = ref.attend(q.astype(np.float32), counts=counts, return_lse=True)
        assert_bits(out, r.astype(dt), f"decode counts={counts}")
        assert_bits(lse, rl, "decode lse")
    with pytest.raises(TypeError, match="does not fit"):
        cache.append(k.astype(np.float32), v.astype(np.float32))
    with pytest.raises(TypeError, match=f"the cache holds {dt.name}"):
        cache.attend(randh(rng, (B, Hq, 1, E), np.float32))


@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
def test_merge_16_bit_outs(dt):
    rng = np.random.default_rng(10)
    q, k, v = randh(rng, (2, 3, 5, 16), dt), randh(rng, (2, 3, 40, 16), dt), randh(rng, (2, 3, 40, 8), dt)
    a = sdpa(q, k[..., :25, :], v[..., :25, :], return_lse=True)
    b = sdpa(q, k[..., 25:, :], v[..., 25:, :], return_lse=True)
    out, lse = selfattn.merge_attention([a[0], b[0]], [a[1], b[1]])
    assert out.dtype == dt and lse.dtype == np.float32
    full = sdpa(q, k, v).astype(np.float64)
    # the parts are rounded once (at their own magnitude), the merge once more
    parts = np.maximum(np.abs(a[0].astype(np.float64)), np.abs(b[0].astype(np.float64)))
    assert np.all(np.abs(out.astype(np.float64) - full) <= EPS[dt.name] * (parts + np.abs(full)) + 1e-6)
    with pytest.raises(TypeError, match="float32 lses"):
        selfattn.merge_attention([a[0], b[0]], [a[1].astype(np.float64), b[1].astype(np.float64)])


@pytest.mark.skipif(torch is None, reason="torch is not installed")
@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
def test_torch_16_bit_tensors(dt):
    import selfattn.torch as st
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dt.name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 32, generator=g).to(tdt).requires_grad_() for _ in range(3))
    out = st.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == tdt
    out.float().pow(2).sum().backward()
    assert q.grad.dtype == tdt and k.grad.dtype == tdt and v.grad.dtype == tdt
    qn, kn, vn = (t.detach().float().numpy().astype(dt) for t in (q, k, v))
    assert_bits(out.detach().float().numpy().astype(dt), sdpa(qn, kn, vn, is_causal=True), "torch forward")


@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
def test_dask_16_bit(dt):
    da = _maybe_import("dask.array")
    if da is None:
        pytest.skip("dask is not installed")
    import selfattn.dask as sd
    rng = np.random.default_rng(11)
    q, k, v = randh(rng, (2, 40, 16), dt), randh(rng, (2, 90, 16), dt), randh(rng, (2, 90, 8), dt)
    out, lse = sd.scaled_dot_product_attention(da.from_array(q, chunks=(1, 20, 16)), da.from_array(k, chunks=(1, 30, 16)),
                                               da.from_array(v, chunks=(1, 30, 8)), is_causal=True, return_lse=True)
    assert out.dtype == dt and lse.dtype == np.float32
    o, l_ = out.compute(scheduler="sync"), lse.compute(scheduler="sync")
    full, full_lse = sdpa(q, k, v, is_causal=True, return_lse=True)
    assert o.dtype == dt and l_.dtype == np.float32
    # key chunks merged from their rounded outputs: each part's rounding at its magnitude (at most
    # max |v| of the column: a part is a weighted mean of v's rows), a rounding per merge level
    vmax = np.abs(v.astype(np.float64)).max(axis=-2, keepdims=True)
    assert np.all(np.abs(o.astype(np.float64) - full) <= 3 * EPS[dt.name] * vmax + 1e-6)
    np.testing.assert_allclose(l_, full_lse, rtol=1e-6, atol=1e-6)


@settings(max_examples=examples(60), deadline=None)
@given(data=st.data())
def test_fuzz_equals_float32_path_rounded(data):
    """Random shapes around the tile edges, layouts and options: always the float32 call on the
    widened inputs, rounded once."""
    dt = data.draw(st.sampled_from(HALF), label="dtype")
    isa = data.draw(st.sampled_from(ISAS), label="isa")
    dim = lambda kind, around: data.draw(st.one_of(st.integers(1, 9), st.sampled_from(  # noqa: E731
        [edge(isa, np.float32, a) for a in around])), label=kind)
    L = dim("L", ("mr+1", "bq-1", "bq+1"))
    S = dim("S", ("nr-1", "bk", "bk+1", "2*bk+1"))
    E, Ev = dim("E", ("vw-1", "vw+1")), dim("Ev", ("vw+1", "nv"))
    H = data.draw(st.integers(1, 3), label="H")
    group = data.draw(st.integers(1, 3), label="group")
    kw = data.draw(st.fixed_dictionaries({}, optional={
        "is_causal": st.booleans(), "alignment": st.sampled_from(["top_left", "bottom_right"]),
        "window_size": st.tuples(st.integers(0, 40), st.integers(0, 40)),
        "softcap": st.sampled_from([2.0, 30.0]), "scale": st.sampled_from([0.05, 0.5])}), label="options")
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1), label="seed"))
    q = randh(rng, (H * group, L, E), dt, 2.0)
    k = randh(rng, (H, S, E), dt, 2.0)
    v = randh(rng, (H, S, Ev + 3), dt)[..., 1:Ev + 1]                       # strided rows
    if data.draw(st.booleans(), label="transposed key"):
        k = np.ascontiguousarray(k.swapaxes(-1, -2)).swapaxes(-1, -2)
    with selfattn.use_isa(isa):
        out, lse = sdpa(q, k, v, enable_gqa=True, return_lse=True, **kw)
        ref, ref_lse = widened_call(sdpa, dt, q, k, v, enable_gqa=True, return_lse=True, **kw)
    assert_bits(out, ref, f"{dt} {isa} {(L, S, E, Ev, H, group)} {kw}")
    assert_bits(lse, ref_lse, "lse")
