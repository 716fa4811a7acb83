"""score_mod's tracer (selfattn._scoremod): the front end of score_mod (issue 22, point 2).

* The traced program equals the function called directly on NumPy arrays, for 12 mods
  (T5 bias tables, ALiBi, softcap, causal by score, relative-position buckets, gating, ...).
* Its derivative with respect to the score, and with respect to a loaded bias value, equal
  central finite differences of the function.
* Arrays are found however the function captures them (closure, global, default argument).
* What cannot be traced is an error naming the operation; an index out of range is an error.
* selfattn.reference.flex_attention(score_mod=...) and its VJP: ALiBi through score_mod equals the
  built-in alibi_slopes; gradients equal finite differences.
"""

import numpy as np
import pytest

from selfattn import reference
from selfattn._scoremod import ScoreModTraceError, trace

RNG = np.random.default_rng(0)
BIAS = RNG.standard_normal((4, 63))                 # T5-style: [head, relative position + 31]
SLOPES = np.array([0.5, 0.25, 0.125, 0.0625])
GATE = RNG.random((2, 4)) < 0.5
SCALE_PER_HEAD = np.array([1.0, 0.5, 2.0, 1.5])


def _closure_bias():
    table = RNG.standard_normal((4, 63))

    def mod(score, b, h, q, kv):
        return score + table[h, q - kv + 31]
    return mod


def _default_arg(score, b, h, q, kv, t=BIAS * 2):
    return score * 0.5 + t[h, kv - q + 31]


def _bucket(score, b, h, q, kv):
    d = abs(q - kv)
    big = 4 + np.log(np.maximum(d, 1) / 4.0) / np.log(8.0) * 4
    bucket = np.where(d < 4, d, np.minimum(big, 7.0).astype(np.int64))
    return score + BIAS[h, bucket]


MODS = {
    "t5_bias": lambda s, b, h, q, kv: s + BIAS[h, q - kv + 31],
    "t5_closure": _closure_bias(),
    "t5_default_arg": _default_arg,
    "alibi": lambda s, b, h, q, kv: s - SLOPES[h] * abs(q - kv),
    "softcap": lambda s, b, h, q, kv: 30 * np.tanh(s / 30),
    "causal_by_score": lambda s, b, h, q, kv: np.where(q >= kv, s, -np.inf),
    "buckets": _bucket,
    "gated_heads": lambda s, b, h, q, kv: np.where(GATE[b, h], s * 2, s),
    "per_head_scale": lambda s, b, h, q, kv: s * SCALE_PER_HEAD[h] + (q % 3) * 0.1,
    "clip_square": lambda s, b, h, q, kv: np.clip(s, -4, 4) ** 2 / (1 + kv // 4),
    "exp_sqrt": lambda s, b, h, q, kv: np.log(np.exp(s / 4) + 1) + np.sqrt(abs(s) + 1) - b,
    "min_max": lambda s, b, h, q, kv: np.maximum(np.minimum(s, 3.0), -(q - kv) * 0.01),
}

B, H, L, S = 2, 4, 13, 17
IDX = (np.arange(B).reshape(B, 1, 1, 1), np.arange(H).reshape(1, H, 1, 1), np.arange(L).reshape(1, 1, L, 1),
       np.arange(S).reshape(1, 1, 1, S))


@pytest.mark.parametrize("name", sorted(MODS))
def test_program_equals_the_function(name):
    s = 3 * RNG.standard_normal((B, H, L, S))
    prog = trace(MODS[name])
    want = MODS[name](s, *IDX)
    got = np.broadcast_to(prog.evaluate(s, *IDX), want.shape)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.allclose(got, want, rtol=1e-14, atol=1e-14, equal_nan=True), name
    assert "Program(" in repr(prog)


@pytest.mark.parametrize("name", sorted(MODS))
def test_derivative_by_the_score(name):
    s = 3 * RNG.standard_normal((B, H, L, S))
    s = np.where(np.abs(np.abs(s) - 4) < 1e-3, 1.0, s)          # away from clip's kinks
    g = np.broadcast_to(trace(MODS[name]).grad_score().evaluate(s, *IDX), s.shape)
    eps = 1e-6
    with np.errstate(invalid="ignore"):
        fd = (MODS[name](s + eps, *IDX) - MODS[name](s - eps, *IDX)) / (2 * eps)
    fin = np.isfinite(fd)
    assert np.abs(g[fin] - fd[fin]).max(initial=0.0) < 1e-6, name


@pytest.mark.parametrize("name", ["t5_bias", "t5_closure", "t5_default_arg", "alibi", "buckets", "per_head_scale"])
def test_derivative_by_a_loaded_value(name):
    """d mod / d (the value loaded): the factor a backward scatters into the captured array."""
    prog = trace(MODS[name])
    assert len(prog.loads()) == 1 and len(prog.arrays) == 1
    arr = prog.arrays[0]
    s = RNG.standard_normal((B, H, L, S))
    d = np.broadcast_to(prog.grad_load(prog.loads()[0]).evaluate(s, *IDX), s.shape)
    # finite differences on the whole array at once: mod(arr + eps) - mod(arr - eps) = 2 eps d (linear in it)
    eps = 1e-6
    plus = prog.evaluate(s, *IDX, arrays=[arr + eps])
    minus = prog.evaluate(s, *IDX, arrays=[arr - eps])
    assert np.allclose(d, (plus - minus) / (2 * eps), atol=1e-6), name


def test_what_the_program_depends_on():
    assert not trace(MODS["alibi"]).depends_on("b") and trace(MODS["alibi"]).depends_on("h")
    assert trace(MODS["gated_heads"]).depends_on("b")
    assert not trace(MODS["softcap"]).depends_on("q_idx")
    assert trace(lambda s, b, h, q, kv: 1.0).evaluate(0.0, 0, 0, 0, 0) == 1.0


@pytest.mark.parametrize("mod, match", [
    (lambda s, b, h, q, kv: s if q > kv else 0.0, "branches on a traced value"),
    (lambda s, b, h, q, kv: s * (q > kv and kv > 0), "branches on a traced value"),
    (lambda s, b, h, q, kv: float(s), "Python float"),
    (lambda s, b, h, q, kv: np.sin(s), "np.sin"),
    (lambda s, b, h, q, kv: np.sum(s), "np.sum"),
    (lambda s, b, h, q, kv: [1.0, 2.0][q], "Python index"),
    (lambda s, b, h, q, kv: s + BIAS[h], "one index per axis"),
    (lambda s, b, h, q, kv: s + BIAS[h, (q - kv) / 2], "float value"),
    (lambda s, b, h, q, kv: s + (q & kv), "non-bool"),
    (lambda s, b, h, q, kv: s + "x", "str"),
    (lambda s, b, h, q, kv: s + {}["missing"], "raised KeyError"),
])
def test_untraceable_mods_are_clear_errors(mod, match):
    with pytest.raises(ScoreModTraceError, match=match):
        trace(mod)


def test_index_out_of_range_is_an_error_and_negative_wraps_once():
    prog = trace(lambda s, b, h, q, kv: s + BIAS[h, q - kv])          # q - kv in (-17, 13): wraps
    want = np.zeros((B, H, L, S)) + BIAS[np.arange(H)[:, None, None], (np.arange(L)[:, None] - np.arange(S))]
    assert np.allclose(np.broadcast_to(prog.evaluate(np.zeros((B, H, L, S)), *IDX), want.shape), want)
    far = trace(lambda s, b, h, q, kv: s + BIAS[h, q * 10])
    with pytest.raises(IndexError, match="out of range"):
        far.evaluate(np.zeros((B, H, L, S)), *IDX)
    with pytest.raises(TypeError, match="callable"):
        trace("softcap")


def test_reference_flex_attention_with_score_mod():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 4, 6, 5))
    k = rng.standard_normal((2, 2, 9, 5))
    v = rng.standard_normal((2, 2, 9, 3))
    alibi = reference.flex_attention(q, k, v, score_mod=MODS["alibi"], enable_gqa=True)
    assert np.allclose(alibi, reference.scaled_dot_product_attention(q, k, v, alibi_slopes=SLOPES, enable_gqa=True),
                       rtol=0, atol=1e-14)
    mod = MODS["t5_bias"]
    out, vjp = reference.flex_attention_vjp(q, k, v, score_mod=mod, enable_gqa=True)
    g = rng.standard_normal(out.shape)
    grads = vjp(g)

    def f(args):
        return float((reference.flex_attention(*args, score_mod=mod, enable_gqa=True) * g).sum())
    eps = 1e-6
    for which in range(3):
        args = [q, k, v]
        fd = np.zeros_like(args[which])
        for i in np.ndindex(fd.shape):
            up = [a.copy() for a in args]
            dn = [a.copy() for a in args]
            up[which][i] += eps
            dn[which][i] -= eps
            fd[i] = (f(up) - f(dn)) / (2 * eps)
        assert np.abs(fd - grads[which]).max() < 1e-7, which
