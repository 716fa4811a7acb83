"""attend with biases, grouped-query heads, structured masks and RoPE against selfattn.reference.attend."""

import numpy as np
import pytest

import selfattn
from selfattn import reference
from sa_testutil import DTYPES, ISAS, assert_unchanged, snapshot


def _model(rng, dtype, d=24, H=4, Hkv=2, E=6, Ev=5, d_out=11):
    w = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    return dict(wq=w(d, H * E), wk=w(d, Hkv * E), wv=w(d, Hkv * Ev), wo=w(H * Ev, d_out),
                bq=w(H * E), bk=w(Hkv * E), bv=w(Hkv * Ev), bo=w(d_out)), H, Hkv


OPTION_SETS = [
    dict(),
    dict(biases=True),
    dict(gqa=True),
    dict(biases=True, gqa=True, is_causal=True),
    dict(window_size=(5, 2)),
    dict(key_lengths=True, is_causal=True),
    dict(rope_base=10000.0),
    dict(biases=True, gqa=True, is_causal=True, window_size=(9, None), key_lengths=True, rope_base=500.0, wo=False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "-".join(o) or "plain")
def test_attend_options_match_reference(isa, dtype, opts):
    rng = np.random.default_rng(len(opts))
    x = rng.standard_normal((3, 37, 24)).astype(dtype)
    m, H, Hkv = _model(rng, dtype)
    kw = dict(num_heads=H, wo=m["wo"], is_causal=opts.get("is_causal", False))
    wk, wv = m["wk"], m["wv"]
    if opts.get("gqa"):
        kw["num_kv_heads"] = Hkv
    else:   # as many kv heads as query heads
        wk, wv = np.concatenate([wk, wk], 1), np.concatenate([wv, wv], 1)
        m["bk"], m["bv"] = np.concatenate([m["bk"], m["bk"]]), np.concatenate([m["bv"], m["bv"]])
    if opts.get("biases"):
        kw.update(bq=m["bq"], bk=m["bk"], bv=m["bv"], bo=m["bo"] if opts.get("wo", True) else
                  rng.standard_normal(H * 5).astype(dtype))
    if opts.get("wo") is False:
        kw.pop("wo")
    for name in ("window_size", "rope_base"):
        if name in opts:
            kw[name] = opts[name]
    if opts.get("key_lengths"):
        kw["key_lengths"] = np.array([37, 20, 0])
    snaps = snapshot(x, m["wq"], wk, wv)
    got = selfattn.attend(x, m["wq"], wk, wv, **kw)
    ref = reference.attend(x, m["wq"], wk, wv, **kw)
    assert got.dtype == dtype and got.shape == ref.shape
    tol = 2e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol * max(1.0, float(np.abs(ref).max())), err_msg=str(opts))
    assert_unchanged((x, m["wq"], wk, wv), snaps)


def test_attend_threads_and_paths_agree_with_options():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 150, 24)).astype(np.float32)
    m, H, Hkv = _model(rng, np.float32)
    kw = dict(num_heads=H, num_kv_heads=Hkv, wo=m["wo"], bq=m["bq"], bk=m["bk"], bv=m["bv"], bo=m["bo"],
              is_causal=True, window_size=(40, 0), key_lengths=np.array([150, 77]), rope_base=10000.0)
    for isa in ISAS:
        with selfattn.use_isa(isa):
            runs = [selfattn.attend(x, m["wq"], m["wk"], m["wv"], num_threads=t, **kw) for t in (1, 2, 3)]
        for r in runs[1:]:
            assert np.array_equal(r, runs[0]), isa


_X = np.zeros((2, 5, 8))
_W = np.zeros((8, 8))

ATTEND_MISUSE = [
    (dict(bq=np.zeros(7)), ValueError, r"bq must have shape \(8,\), got \(7,\)"),
    (dict(bk=np.zeros((8, 1))), ValueError, r"bk must have shape \(8,\)"),
    (dict(bo=np.zeros(3)), ValueError, r"bo must have shape \(8,\)"),
    (dict(bv=np.zeros(8, complex)), TypeError, r"bv has dtype complex128"),
    (dict(num_kv_heads=3), ValueError, r"num_heads=2 must be a multiple of num_kv_heads=3"),
    (dict(num_kv_heads=0), ValueError, r"num_kv_heads must be >= 1, got 0"),
    (dict(num_kv_heads=1.0), TypeError, r"num_kv_heads must be an int, got float"),
    (dict(num_kv_heads=1), ValueError, r"wk \(8, 8\) must have num_kv_heads\*E = 1\*4 = 4 columns"),
    (dict(rope_base=0.0), ValueError, r"rope_base must be finite and > 0"),
    (dict(rope_base="1e4"), TypeError, r"rope_base must be a real number or None, got str"),
    (dict(window_size=-1), ValueError, r"window_size must be >= 0"),
    (dict(key_lengths=[9, 9]), ValueError, r"key_lengths must be in \[0, S=5\]"),
    (dict(key_lengths=[1, 2, 3]), ValueError, r"key_lengths of shape \(3,\) does not broadcast"),
]


@pytest.mark.parametrize("bad,exc,msg", ATTEND_MISUSE)
def test_attend_misuse(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        selfattn.attend(_X, _W, _W, _W, num_heads=2, **bad)


def test_attend_rope_needs_even_head_dim():
    with pytest.raises(ValueError, match=r"rope_base needs an even head dim E, got E=3"):
        selfattn.attend(np.zeros((4, 6)), np.zeros((6, 6)), np.zeros((6, 6)), np.zeros((6, 6)), num_heads=2,
                        rope_base=10000.0)
