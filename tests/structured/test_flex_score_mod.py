"""score_mod in the kernels (FlexAttention's score_mod, issue 22 point 2): flex_attention and its
backward with a traced program (selfattn._scoremod -> src_c/score_mod.h).

* Forward and backward (dq, dk, dv) against selfattn.reference (float64, score_mod called on the
  whole score array, its derivative from the trace) for 14 mods: T5 bias tables (strided reads,
  forward and backward along the row, per head, per batch), ALiBi, softcap, relative-position
  buckets, causal by score, gating, floor division / modulo, exp / log / sqrt, min / max, integer
  tables; every ISA forced, both dtypes, with block masks, GQA, every schedule, tile edges.
* The same bits at any thread count; inputs untouched; 16-bit inputs.
* An index outside a captured array is an IndexError (nothing outside is read); a program
  too long for the kernels, softcap beside score_mod, untraceable mods: clear errors.
* The interpreter's integer and float arithmetic is NumPy's (floor division and modulo of
  negatives, division by zero, NaN in minimum / maximum, int64 wrap-around).
* torch's own flex_attention (eager) as an oracle where torch is installed.
"""

import numpy as np
import pytest

import selfattn
from selfattn import _scoremod, reference
from sa_testutil import (DTYPES, ISAS, assert_bits, assert_unchanged, check_flex_16_bit, forced_schedule,
                         optional_import, snapshot, tile_params)

RNG = np.random.default_rng(22)
N = 1200                                                    # > L + S of every test
H_MAX = 8
BIAS = RNG.standard_normal((H_MAX, 2 * N))                  # T5: [head, relative position + N]
BIAS_B = RNG.standard_normal((3, H_MAX, 2 * N))             # per batch entry too
BUCKET_BIAS = RNG.standard_normal((H_MAX, 32))
SLOPES = 2.0 ** -np.arange(1, H_MAX + 1)
GATE = RNG.random((3, H_MAX)) < 0.5
POS = RNG.integers(-5, 5, N)                                # an integer table


def _t5_buckets(s, b, h, q, kv):
    """T5's relative_position_bucket (bidirectional, 32 buckets, max distance 128)."""
    rel = kv - q
    bucket = np.where(rel > 0, 16, 0)
    d = abs(rel)
    large = 8 + (np.log(np.maximum(d, 1) / 8.0) / np.log(128 / 8.0) * 8).astype(np.int64)
    bucket = bucket + np.where(d < 8, d, np.minimum(large, 15))
    return s + BUCKET_BIAS[h, bucket]


MODS = {
    "identity": lambda s, b, h, q, kv: s,
    "t5_bias": lambda s, b, h, q, kv: s + BIAS[h, q - kv + N],
    "t5_reversed": lambda s, b, h, q, kv: s + BIAS[h, kv - q + N],
    "t5_per_batch": lambda s, b, h, q, kv: s + BIAS_B[b, h, 2 * kv - q + 7],
    "t5_buckets": _t5_buckets,
    "alibi": lambda s, b, h, q, kv: s - SLOPES[h] * abs(q - kv),
    "softcap": lambda s, b, h, q, kv: 5 * np.tanh(s / 5),
    "causal_by_score": lambda s, b, h, q, kv: np.where(q >= kv, s, -np.inf),
    "gated_heads": lambda s, b, h, q, kv: np.where(GATE[b, h], s * 2, s - 1),
    "floordiv_mod": lambda s, b, h, q, kv: s * ((q - kv) // 7 % 3 + 1) + ((kv - 2 * q) % 5) * 0.25,
    "exp_log_sqrt": lambda s, b, h, q, kv: np.log(np.exp(s / 4) + 1) + np.sqrt(abs(s) + 1) - b * 0.5,
    "min_max": lambda s, b, h, q, kv: np.maximum(np.minimum(s, 1.5), -(q - kv) * 0.01),
    "integer_table": lambda s, b, h, q, kv: s + POS[kv] * 0.3 - POS[q] * (h + 1) * 0.1,
    "square_bias": lambda s, b, h, q, kv: s * BIAS[h, kv] ** 2 / 4 + BIAS[h, q],
}


def _qkv(rng, B, Hq, H, L, S, E, Ev, dtype=np.float64):
    return (rng.standard_normal((B, Hq, L, E)).astype(dtype), rng.standard_normal((B, H, S, E)).astype(dtype),
            rng.standard_normal((B, H, S, Ev)).astype(dtype))


def _err(a, b):
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


TOL = {np.float32: 3e-5, np.float64: 1e-12}
GTOL = {np.float32: 3e-4, np.float64: 1e-11}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", sorted(MODS))
def test_forward_and_backward_match_the_reference(isa, name):
    rng = np.random.default_rng(sorted(MODS).index(name))
    B, Hq, H, L, S = 2, 4, 2, 150, 290
    q, k, v = _qkv(rng, B, Hq, H, L, S, 24, 9)
    mod = MODS[name]
    ref, ref_vjp = reference.flex_attention_vjp(q, k, v, score_mod=mod, enable_gqa=True)
    g = rng.standard_normal(ref.shape)
    want = ref_vjp(g)
    with selfattn.use_isa(isa):
        for dtype in DTYPES:
            out, vjp = selfattn.flex_attention_vjp(q.astype(dtype), k.astype(dtype), v.astype(dtype), score_mod=mod,
                                                   enable_gqa=True)
            assert out.dtype == dtype and out.shape == ref.shape
            assert _err(out, ref) < TOL[dtype], f"{isa} {name} {np.dtype(dtype)} out: {_err(out, ref):.2e}"
            for nm, a, b in zip(("dq", "dk", "dv"), vjp(g.astype(dtype)), want):
                assert a.dtype == dtype and a.shape == b.shape
                assert _err(a, b) < GTOL[dtype], f"{isa} {name} {np.dtype(dtype)} {nm}: {_err(a, b):.2e}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", ["t5_bias", "t5_buckets", "softcap", "floordiv_mod"])
def test_with_block_masks(isa, name):
    rng = np.random.default_rng(4)
    B, Hq, L, S = 2, 3, 140, 260
    q, k, v = _qkv(rng, B, Hq, Hq, L, S, 16, 16)
    doc = np.repeat(np.arange(20), 37)
    masks = {"document_causal": lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki),
             "prefix_lm": lambda b, h, qi, ki: (ki < 40) | (qi >= ki)}
    for mname, mm in masks.items():
        bm = selfattn.create_block_mask(mm, None, None, L, S, BLOCK_SIZE=(32, 64))
        ref, ref_vjp = reference.flex_attention_vjp(q, k, v, score_mod=MODS[name], block_mask=bm)
        g = rng.standard_normal(ref.shape)
        want = ref_vjp(g)
        with selfattn.use_isa(isa):
            for dtype in DTYPES:
                out, vjp = selfattn.flex_attention_vjp(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                                       score_mod=MODS[name], block_mask=bm)
                assert _err(out, ref) < TOL[dtype], (isa, name, mname, dtype)
                for a, b in zip(vjp(g.astype(dtype)), want):
                    assert _err(a, b) < GTOL[dtype], (isa, name, mname, dtype)


@pytest.mark.parametrize("schedule", [None, "shared", "fused", "decode"])
@pytest.mark.parametrize("L", [1, 5, 16, 70])
def test_every_schedule(schedule, L):
    rng = np.random.default_rng(L)
    S = 300
    q, k, v = _qkv(rng, 1, 8, 2, L, S, 32, 32)
    for name in ("t5_bias", "t5_buckets", "integer_table"):
        ref = reference.flex_attention(q, k, v, score_mod=MODS[name], enable_gqa=True)
        for isa in ISAS:
            with selfattn.use_isa(isa), forced_schedule(schedule):
                for dtype in DTYPES:
                    out = selfattn.flex_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                                  score_mod=MODS[name], enable_gqa=True)
                    assert _err(out, ref) < TOL[dtype], (isa, schedule, L, name, dtype)


@pytest.mark.parametrize("isa", ISAS)
def test_tile_edges(isa):
    """L and S one below, at and one past the kernel's tiles; the strided read's row crossing
    the ends of its table (the per-key path takes over) and a key block longer than 128."""
    rng = np.random.default_rng(6)
    for dtype in DTYPES:
        tp = tile_params(isa, dtype)
        for L in (tp["bq"] - 1, tp["bq"], tp["bq"] + 1):
            for S in (tp["bk"] - 1, tp["bk"] + 1, 2 * tp["bk"] + 3):
                q, k, v = _qkv(rng, 1, 2, 2, L, S, 8, 8)
                wrap = lambda s, b, h, qi, ki: s + BIAS[h, qi - ki]       # noqa: E731 (negative: NumPy's wrap)
                for mod in (MODS["t5_bias"], wrap):
                    ref, ref_vjp = reference.flex_attention_vjp(q, k, v, score_mod=mod)
                    with selfattn.use_isa(isa):
                        out, vjp = selfattn.flex_attention_vjp(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                                               score_mod=mod)
                        assert _err(out, ref) < TOL[dtype], (isa, dtype, L, S)
                        g = np.ones(ref.shape)
                        for a, b in zip(vjp(g.astype(dtype)), ref_vjp(g)):
                            assert _err(a, b) < GTOL[dtype], (isa, dtype, L, S)


def test_same_bits_at_any_thread_count():
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, 2, 4, 2, 300, 400, 32, 16, np.float32)
    bm = selfattn.create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 300, 400, BLOCK_SIZE=64)
    for isa in ISAS:
        with selfattn.use_isa(isa):
            for mod in (MODS["t5_buckets"], MODS["exp_log_sqrt"]):
                base = None
                for nt in (1, 2, 3, 4):
                    out, vjp = selfattn.flex_attention_vjp(q, k, v, score_mod=mod, block_mask=bm, enable_gqa=True,
                                                           num_threads=nt)
                    res = (out,) + vjp(np.ones_like(out))
                    if base is None:
                        base = res
                    for a, b in zip(res, base):
                        assert_bits(a, b, f"{isa} threads {nt}")


@pytest.mark.parametrize("dtname", ["float16", "bfloat16"])
def test_16_bit(dtname):
    check_flex_16_bit(dtname, score_mod=MODS["t5_bias"])


def test_identity_mod_is_plain_attention_and_inputs_untouched():
    rng = np.random.default_rng(10)
    q, k, v = _qkv(rng, 2, 2, 2, 33, 45, 8, 8, np.float32)
    snaps = snapshot(q, k, v, BIAS)
    plain = selfattn.flex_attention(q, k, v)
    assert np.abs(selfattn.flex_attention(q, k, v, score_mod=MODS["identity"]) - plain).max() < 1e-6
    out, vjp = selfattn.flex_attention_vjp(q, k, v, score_mod=MODS["t5_bias"])
    vjp(np.ones_like(out))
    assert_unchanged((q, k, v, BIAS), snaps)


def test_index_out_of_range_is_an_error():
    rng = np.random.default_rng(11)
    q, k, v = _qkv(rng, 1, 2, 2, 40, 50, 8, 8)
    small = np.zeros((2, 60))
    for isa in ISAS:
        with selfattn.use_isa(isa):
            for mod in (lambda s, b, h, qi, ki: s + small[h, qi + ki],            # past the end (strided)
                        lambda s, b, h, qi, ki: s + small[h, qi * ki % 97],       # per key
                        lambda s, b, h, qi, ki: s + small[h, qi - ki - 61]):      # below -60: no second wrap
                with pytest.raises(IndexError, match=r"array 0 \(shape \(2, 60\)\) out of range"):
                    selfattn.flex_attention(q, k, v, score_mod=mod)
                with pytest.raises(IndexError, match="out of bounds"):       # NumPy's own
                    reference.flex_attention(q, k, v, score_mod=mod)
            # in range again: the flag does not stick
            selfattn.flex_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s + small[h, qi])


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_numpy_arithmetic():
    """The interpreter's arithmetic on the values NumPy's edge cases come from: floor division
    and modulo of negatives and by zero, NaN through minimum / maximum and comparisons, int64
    wrap-around, integer powers, float floor division (NumPy's divmod), casts toward zero."""
    rng = np.random.default_rng(12)
    q, k, v = _qkv(rng, 1, 1, 1, 20, 33, 4, 4)
    big = np.int64(2 ** 62)
    mods = [
        lambda s, b, h, qi, ki: s + ((qi - ki) // 3) * 0.1 + ((qi - 2 * ki) % 4) * 0.01 + (ki // (qi % 3)) * 1e-3,
        lambda s, b, h, qi, ki: s + (ki % (qi % 4 - 2)) * 0.05,
        lambda s, b, h, qi, ki: s + np.where((s - s.astype(np.int64) != 0) | (s > 0), 0.1, -0.1),
        lambda s, b, h, qi, ki: s + ((ki * big + big * 2) // big) * 0.01,
        lambda s, b, h, qi, ki: s + (((qi - ki) * 1.5) // 2.5) * 0.1 + (((qi - ki) * 1.5) % -2.5) * 0.1,
        lambda s, b, h, qi, ki: s + ((ki - 10) ** 3 % 7) * 0.1 + np.floor(s) * 0.01 + (s * 3).astype(np.int64) * 0.01,
        lambda s, b, h, qi, ki: np.where(np.minimum(np.log(s), 0.5) != np.minimum(np.log(s), 0.5), 0.0, s),
        lambda s, b, h, qi, ki: s + (((ki > 3) ^ (qi > 5)) & ~(ki == 7)) * 1.0 - (qi / (ki + 1)) * 0.1,
    ]
    for isa in ISAS:
        with selfattn.use_isa(isa):
            for t, mod in enumerate(mods):
                ref = reference.flex_attention(q, k, v, score_mod=mod)
                out = selfattn.flex_attention(q, k, v, score_mod=mod)
                assert np.isfinite(ref).all()
                assert _err(out, ref) < 1e-12, (isa, t)


def test_strided_reads_are_chosen():
    """T5's bias reads one contiguous run per row (no index per key); a table read at an index
    that is not affine in kv_idx keeps the per-key path."""
    def plan(mod):
        lw = _scoremod.lower(_scoremod.trace(mod))
        return [(int(n["kv_axis"]), int(n["i"])) for n in lw.nodes if n["op"] == selfattn._core.SCORE_MOD_OPS["fload"]]
    assert plan(MODS["t5_bias"]) == [(1, -1)]
    assert plan(MODS["t5_reversed"]) == [(1, 1)]
    assert plan(MODS["t5_per_batch"]) == [(2, 2)]
    assert plan(MODS["t5_buckets"]) == [(-1, 0)]
    assert plan(lambda s, b, h, qi, ki: s + BIAS[h, 3 * (qi - ki) + N]) == [(1, -3)]


def test_errors():
    q = np.zeros((1, 2, 8, 4))
    with pytest.raises(TypeError, match="while being traced"):
        selfattn.flex_attention(q, q, q, score_mod=abs)
    with pytest.raises(TypeError, match="branches on a traced value"):
        selfattn.flex_attention(q, q, q, score_mod=lambda s, b, h, qi, ki: s if qi > ki else -s)

    def long_mod(s, b, h, qi, ki):
        for _ in range(70):
            s = np.tanh(s) * 1.01
        return s
    with pytest.raises(ValueError, match="nodes with its derivative; the kernels take 1 to 128"):
        selfattn.flex_attention(q, q, q, score_mod=long_mod)
    sm = _scoremod.lower(_scoremod.trace(MODS["softcap"]))
    with pytest.raises(TypeError, match="softcap and score_mod exclude each other"):
        selfattn._core.sdpa(q, q, q, softcap=5.0, score_mod=sm)
    bad = _scoremod.Lowered(sm.nodes.copy(), sm.n_fwd, sm.out, sm.dout, [])
    bad.nodes["arg"][3] = [50, 0, 0, 0]                 # an operand that is not an earlier node
    with pytest.raises(ValueError, match="score_mod: node 3 reads node 50"):
        selfattn._core.sdpa(q, q, q, score_mod=bad)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_torch_flex_attention_is_the_oracle():
    torch = optional_import("torch")
    from torch.nn.attention.flex_attention import flex_attention as tflex
    rng = np.random.default_rng(13)
    B, Hq, L, S, E = 1, 2, 48, 70, 16
    q, k, v = _qkv(rng, B, Hq, Hq, L, S, E, E)
    tb = torch.from_numpy(BIAS)
    pairs = {
        "t5_bias": (MODS["t5_bias"], lambda s, b, h, qi, ki: s + tb[h, qi - ki + N]),
        "softcap": (MODS["softcap"], lambda s, b, h, qi, ki: 5 * torch.tanh(s / 5)),
        "alibi": (MODS["alibi"], lambda s, b, h, qi, ki: s - torch.from_numpy(SLOPES)[h] * (qi - ki).abs()),
    }
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))      # (torch's CPU flex has no backward)
    for name, (mod, tmod) in pairs.items():
        with torch.no_grad():
            want = tflex(tq, tk, tv, score_mod=tmod).numpy()
        assert _err(selfattn.flex_attention(q, k, v, score_mod=mod), want) < 1e-12, name


def _fd_grad(f, arr, eps=1e-6):
    fd = np.zeros_like(arr)
    for i in np.ndindex(arr.shape):
        keep = arr[i]
        arr[i] = keep + eps
        up = f()
        arr[i] = keep - eps
        dn = f()
        arr[i] = keep
        fd[i] = (up - dn) / (2 * eps)
    return fd


def test_captured_array_gradients():
    """grad_arrays: the gradients of the bias table and the per-head scales a score_mod reads
    equal central finite differences of the float64 reference (with a block mask, GQA, two
    loads of one table); float32 arrays get float32 gradients; the caller's arrays untouched."""
    rng = np.random.default_rng(14)
    B, Hq, H, L, S = 2, 4, 2, 24, 31
    q, k, v = _qkv(rng, B, Hq, H, L, S, 6, 5)
    bias = rng.standard_normal((Hq, L + S))
    scale_h = rng.standard_normal(Hq)

    def mod(s, b, h, qi, ki):
        return s * scale_h[h] + bias[h, qi - ki + S] ** 2 * 0.3 - bias[h, ki] * 0.1
    bm = selfattn.create_block_mask(lambda b, h, qi, ki: qi + 9 >= ki, None, None, L, S, BLOCK_SIZE=8)
    snaps = snapshot(bias, scale_h)
    out, vjp = selfattn.flex_attention_vjp(q, k, v, score_mod=mod, block_mask=bm, enable_gqa=True,
                                           grad_arrays=(bias, scale_h))
    g = rng.standard_normal(out.shape)
    res = vjp(g)
    assert len(res) == 5 and res[3].shape == bias.shape and res[4].shape == scale_h.shape
    assert_unchanged((bias, scale_h), snaps)

    def f():
        return float((reference.flex_attention(q, k, v, score_mod=mod, block_mask=bm, enable_gqa=True) * g).sum())
    assert np.abs(_fd_grad(f, bias) - res[3]).max() < 1e-7
    assert np.abs(_fd_grad(f, scale_h) - res[4]).max() < 1e-7
    # float32 inputs and table: float32 gradients, close to the float64 ones
    b32 = bias.astype(np.float32)
    mod32 = lambda s, b, h, qi, ki: s + b32[h, qi - ki + S]        # noqa: E731
    mod64 = lambda s, b, h, qi, ki: s + bias[h, qi - ki + S]       # noqa: E731
    o32, vjp32 = selfattn.flex_attention_vjp(*(a.astype(np.float32) for a in (q, k, v)), score_mod=mod32,
                                             enable_gqa=True, grad_arrays=[b32])
    o64, vjp64 = selfattn.flex_attention_vjp(q, k, v, score_mod=mod64, enable_gqa=True, grad_arrays=[bias])
    d32, d64 = vjp32(g.astype(np.float32))[3], vjp64(g)[3]
    assert d32.dtype == np.float32 and _err(d32, d64) < 1e-4


def test_grad_arrays_errors():
    q = np.zeros((1, 2, 8, 4))
    tab, idx = np.zeros((2, 20)), np.arange(20)
    with pytest.raises(ValueError, match=r"grad_arrays\[0\] \(shape \(2, 20\)\) is not an array score_mod captures"):
        selfattn.flex_attention_vjp(q, q, q, score_mod=lambda s, b, h, qi, ki: s + tab[h, idx[ki]],
                                    grad_arrays=[tab.copy()])
    with pytest.raises(ValueError, match="does not read it as a float array"):
        selfattn.flex_attention_vjp(q, q, q, score_mod=lambda s, b, h, qi, ki: s + tab[h, idx[ki]], grad_arrays=[idx])
    with pytest.raises(ValueError, match="no score_mod"):
        selfattn.flex_attention_vjp(q, q, q, grad_arrays=[tab])


def test_torch_bridge():
    """selfattn.torch.flex_attention with a score_mod written in torch (torch.tanh, torch.where,
    Tensor methods, a captured bias Parameter): out and every gradient, the bias table's
    included, the same bits as the NumPy VJP of the same mod."""
    torch = optional_import("torch")
    import selfattn.torch as st
    rng = np.random.default_rng(15)
    B, Hq, H, L, S, E = 2, 4, 2, 30, 41, 8
    q, k, v = _qkv(rng, B, Hq, H, L, S, E, E)
    tb = torch.nn.Parameter(torch.from_numpy(rng.standard_normal((Hq, L + S))))
    nb = tb.detach().numpy().copy()
    tmod = lambda s, b, h, qi, ki: (5 * torch.tanh(s / 5) + tb[h, qi - ki + S]            # noqa: E731
                                    - torch.where(qi >= ki, 0.0, 0.5) + s.clamp(min=-1).abs() * 0.1)
    nmod = lambda s, b, h, qi, ki: (5 * np.tanh(s / 5) + nb[h, qi - ki + S]               # noqa: E731
                                    - np.where(qi >= ki, 0.0, 0.5) + abs(np.maximum(s, -1)) * 0.1)
    tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
    out = st.flex_attention(tq, tk, tv, tmod, enable_gqa=True)
    g = rng.standard_normal(tuple(out.shape))
    (out * torch.from_numpy(g)).sum().backward()
    want, vjp = selfattn.flex_attention_vjp(q, k, v, score_mod=nmod, enable_gqa=True, grad_arrays=[nb])
    assert np.array_equal(out.detach().numpy(), want)
    for t, w in zip((tq, tk, tv, tb), vjp(g)):
        assert t.grad is not None and np.array_equal(t.grad.numpy(), w)
    # no gradient wanted for the table: none computed, none returned
    tb.requires_grad_(False)
    out = st.flex_attention(tq, tk, tv, tmod, enable_gqa=True)
    out.sum().backward()
    with pytest.raises(Exception, match="score_mod calls torch's"):
        st.flex_attention(tq, tk, tv, lambda s, b, h, qi, ki: torch.sigmoid(s), enable_gqa=True)


# ---- score_mod.h's own exp / log / tanh (vectorisable, not libm's) -------------------------------------------------

_SM_MATH_FLAGS = {"generic": [], "avx2": ["-mavx2", "-mfma"], "avx512": ["-mavx512f", "-mavx512dq"]}


def _run_sm_math(cmd_build, cmd_run):
    import re
    import subprocess

    from sa_testutil import env_without_sanitizer
    r = subprocess.run(cmd_build, capture_output=True, text=True, timeout=300, env=env_without_sanitizer())
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr[-3000:]
    r = subprocess.run(cmd_run, capture_output=True, text=True, timeout=600, env=env_without_sanitizer())
    m = re.search(r"^(\d+) passed, (\d+) failed$", r.stdout, re.M)
    assert r.returncode == 0 and m and int(m.group(2)) == 0 and int(m.group(1)) == 14, r.stdout[-4000:] + r.stderr
    return r.stdout


@pytest.mark.parametrize("isa", ISAS)
def test_sm_math_within_3_ulp_of_libm(tmp_path, isa):
    """tests/c/test_sm_math.c: sa_sm_exp / log / tanh within 3 ulp of libm on 4M arguments per range, libm's
    special values; built with the kernels' flags and this ISA's instructions, so the vectorised loops
    (blends instead of branches, FMA contraction) are what is checked."""
    from sa_testutil import SRC_C, c_compiler
    cc, src = c_compiler(), SRC_C.parent / "tests" / "c" / "test_sm_math.c"
    if cc is None or not src.is_file():
        pytest.skip("no C compiler, or the C sources are not beside the package")
    exe = tmp_path / "test_sm_math"
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wno-unused-function"]
    _run_sm_math(cc + flags + _SM_MATH_FLAGS.get(isa, []) + [f"-I{SRC_C}", str(src), "-lm", "-o", str(exe)],
                 [str(exe)])


@pytest.mark.slow      # ~15 s under emulation: run once (CI step 3), not in every suite run
def test_sm_math_aarch64_under_qemu(tmp_path):
    import shutil

    from sa_testutil import SRC_C
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    src = SRC_C.parent / "tests" / "c" / "test_sm_math.c"
    if cc is None or qemu is None or not src.is_file():
        pytest.skip("no aarch64 cross compiler / qemu-aarch64, or no C sources")
    exe = tmp_path / "test_sm_math_aarch64"
    _run_sm_math([cc, "-O3", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wno-unused-function",
                  f"-I{SRC_C}", str(src), "-lm", "-static", "-o", str(exe)], [qemu, str(exe)])
