"""selfattn.reference's structured options (window, alignment, key_lengths, ALiBi, softcap, varlen,
attend with biases / GQA / RoPE), each checked against an independent construction: dense masks
built with loops, slicing, explicit float masks, and a scalar loop implementation."""

import math

import numpy as np
import pytest

import selfattn
from selfattn import reference

sdpa = reference.scaled_dot_product_attention


def _rng(seed):
    return np.random.default_rng(seed)


def _qkv(rng, lead_q, lead_kv, L, S, E, Ev):
    return (rng.standard_normal(lead_q + (L, E)), rng.standard_normal(lead_kv + (S, E)),
            rng.standard_normal(lead_kv + (S, Ev)))


def _sides(window_size):
    if window_size is None:
        return None, None
    if isinstance(window_size, int):
        return window_size, window_size
    return window_size


def _pos(i, L, S_b, alignment):
    return i if alignment == "top_left" else i + S_b - L


def _dense_mask(L, S, *, is_causal=False, window_size=None, alignment="top_left", S_b=None):
    """The structured mask as an explicit (L, S) bool array, built entry by entry."""
    S_b = S if S_b is None else S_b
    left, right = _sides(window_size)
    m = np.zeros((L, S), dtype=bool)
    for i in range(L):
        p = _pos(i, L, S_b, alignment)
        for j in range(S):
            ok = j < S_b
            if is_causal and j > p:
                ok = False
            if left is not None and j < p - left:
                ok = False
            if right is not None and j > p + right:
                ok = False
            m[i, j] = ok
    return m


def _naive_head(q, k, v, *, scale, is_causal, window_size, alignment, S_b, slope, bool_mask, float_mask,
                softcap):
    """One (batch, head) slice with scalar Python loops: q (L, E), k (S, E), v (S, Ev)."""
    L, S, Ev = q.shape[0], k.shape[0], v.shape[1]
    left, right = _sides(window_size)
    out, lse = np.zeros((L, Ev)), np.full(L, -np.inf)
    for i in range(L):
        p = _pos(i, L, S_b, alignment)
        logits = {}
        for j in range(S_b):            # keys j >= S_b are never even looked at
            if is_causal and j > p:
                continue
            if left is not None and j < p - left:
                continue
            if right is not None and j > p + right:
                continue
            if bool_mask is not None and not bool_mask[i, j]:
                continue
            s = scale * sum(float(q[i, e]) * float(k[j, e]) for e in range(q.shape[1]))
            if softcap is not None:
                s = softcap * math.tanh(s / softcap)
            s -= slope * abs(p - j)
            if float_mask is not None:
                s += float(float_mask[i, j])
            logits[j] = s
        if not logits or max(logits.values()) == -math.inf:
            continue
        mx = max(logits.values())
        w = {j: math.exp(s - mx) for j, s in logits.items()}
        z = sum(w.values())
        for e in range(Ev):
            out[i, e] = sum(w[j] * float(v[j, e]) for j in w) / z
        lse[i] = mx + math.log(z)
    return out, lse


def _naive(q, k, v, *, scale=None, is_causal=False, window_size=None, alignment="top_left",
           key_lengths=None, alibi_slopes=None, attn_mask=None, softcap=None):
    """Loop over every (batch..., head) of the output; q (..., Hq, L, E), k/v (..., H, S, .) with GQA."""
    Hq, H = q.shape[-3], k.shape[-3]
    L, E, S = q.shape[-2], q.shape[-1], k.shape[-2]
    scale = 1 / math.sqrt(E) if scale is None else scale
    lead = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3]) + (Hq,)
    qb = np.broadcast_to(q, lead + q.shape[-2:])
    kb = np.broadcast_to(k, lead[:-1] + k.shape[-3:])
    vb = np.broadcast_to(v, lead[:-1] + v.shape[-3:])
    kl = np.broadcast_to(S if key_lengths is None else np.asarray(key_lengths), lead[:-1])
    sl = np.broadcast_to(0.0 if alibi_slopes is None else np.asarray(alibi_slopes, float), lead)
    bm = fm = None
    if attn_mask is not None:
        m = np.broadcast_to(np.asarray(attn_mask), lead + (L, S))
        bm, fm = (m, None) if m.dtype == bool else (None, m)
    out, lse = np.zeros(lead + (L, v.shape[-1])), np.zeros(lead + (L,))
    for idx in np.ndindex(*lead):
        h = idx[-1]
        g = h // (Hq // H)
        out[idx], lse[idx] = _naive_head(
            qb[idx], kb[idx[:-1] + (g,)], vb[idx[:-1] + (g,)], scale=scale, is_causal=is_causal,
            window_size=window_size, alignment=alignment, S_b=int(kl[idx[:-1]]), slope=float(sl[idx]),
            bool_mask=None if bm is None else bm[idx], float_mask=None if fm is None else fm[idx],
            softcap=softcap)
    return out, lse


def _close(a, b, atol=1e-12):
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)


# ------------------------------------------------------------------------ window / causal / alignment

@pytest.mark.parametrize("L,S", [(4, 6), (6, 4), (5, 5), (1, 7)])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("window_size", [None, 0, 1, (2, 0), (None, 1), (0, None), (1, 3), [3, None]])
def test_window_causal_alignment_equal_dense_bool_mask(L, S, alignment, is_causal, window_size):
    q, k, v = _qkv(_rng(L * 10 + S), (2,), (2,), L, S, 3, 2)
    dense = _dense_mask(L, S, is_causal=is_causal, window_size=window_size, alignment=alignment)
    got, lse = sdpa(q, k, v, is_causal=is_causal, window_size=window_size, alignment=alignment, return_lse=True)
    ref, ref_lse = sdpa(q, k, v, attn_mask=dense, return_lse=True)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(lse, ref_lse)
    P = reference.attention_weights(q, k, is_causal=is_causal, window_size=window_size, alignment=alignment)
    np.testing.assert_array_equal(P == 0, np.broadcast_to(~dense, P.shape))


def test_known_small_masks():
    # spelled out, so that the dense-mask builder above is itself checked
    m = _dense_mask(3, 5, is_causal=True, alignment="bottom_right")
    assert m.astype(int).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    m = _dense_mask(3, 3, window_size=(1, 0))
    assert m.astype(int).tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    q, k, v = _qkv(_rng(0), (), (), 3, 5, 2, 2)
    P = reference.attention_weights(q, k, is_causal=True, alignment="bottom_right", window_size=(1, None))
    assert (P > 0).astype(int).tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]


def test_top_left_causal_is_torch_tril():
    q, k, v = _qkv(_rng(1), (2,), (2,), 4, 6, 3, 3)
    _close(sdpa(q, k, v, is_causal=True), sdpa(q, k, v, attn_mask=np.tril(np.ones((4, 6), bool))), 0)


def test_attn_mask_and_is_causal_compose():
    q, k, v = _qkv(_rng(2), (2,), (2,), 5, 5, 3, 3)
    bm = _rng(3).random((5, 5)) < 0.7
    tril = np.tril(np.ones((5, 5), bool))
    _close(sdpa(q, k, v, attn_mask=bm, is_causal=True), sdpa(q, k, v, attn_mask=bm & tril), 0)
    fm = _rng(4).standard_normal((5, 5))
    _close(sdpa(q, k, v, attn_mask=fm, is_causal=True), sdpa(q, k, v, attn_mask=np.where(tril, fm, -np.inf)))


# ---------------------------------------------------------------------------------------- key_lengths

@pytest.mark.parametrize("opts", [{}, dict(is_causal=True), dict(is_causal=True, alignment="bottom_right"),
                                  dict(window_size=(1, 2), alignment="bottom_right"),
                                  dict(alibi_slopes=np.array([0.5, 0.25]), alignment="bottom_right"),
                                  dict(softcap=2.0, window_size=1)])
def test_key_lengths_equal_slicing(opts):
    B, H, L, S = 4, 2, 3, 5
    q, k, v = _qkv(_rng(5), (B, H), (B, H), L, S, 4, 3)
    kl = np.array([0, 2, 5, 3])
    got, lse = sdpa(q, k, v, key_lengths=kl, return_lse=True, **opts)
    for b in range(B):
        o, l = sdpa(q[b], k[b, :, :kl[b]], v[b, :, :kl[b]], return_lse=True, **opts)
        _close(got[b], o)
        _close(lse[b], l)


def test_key_lengths_never_read_nan_inf_beyond():
    rng = _rng(6)
    B, H, L, S = 3, 2, 4, 6
    q, k, v = _qkv(rng, (B, H), (B, H), L, S, 3, 3)
    kl = np.array([2, 6, 0])
    bad_k, bad_v = k.copy(), v.copy()
    for b in range(B):
        bad_k[b, :, kl[b]:] = np.nan
        bad_v[b, :, kl[b]:] = np.inf
        bad_v[b, 0, kl[b]:] = np.nan
    fm = rng.standard_normal((L, S))
    for kw in ({}, dict(is_causal=True, alignment="bottom_right"), dict(attn_mask=fm),
               dict(attn_mask=fm > 0, alibi_slopes=0.3, softcap=1.5)):
        clean, lse_c = sdpa(q, k, v, key_lengths=kl, return_lse=True, **kw)
        got, lse_g = sdpa(q, bad_k, bad_v, key_lengths=kl, return_lse=True, **kw)
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(got, clean)
        np.testing.assert_array_equal(lse_g, lse_c)


def test_key_lengths_scalar_for_3d_and_2d():
    q, k, v = _qkv(_rng(7), (2,), (2,), 3, 5, 2, 2)
    _close(sdpa(q, k, v, key_lengths=3), sdpa(q, k[:, :3], v[:, :3]))
    _close(sdpa(q[0], k[0], v[0], key_lengths=np.int32(2)), sdpa(q[0], k[0, :2], v[0, :2]))
    with pytest.raises(ValueError, match="key_lengths"):
        sdpa(q, k, v, key_lengths=[3, 3])          # a 3-D query has no batch dims


# ------------------------------------------------------------------------------------ ALiBi / softcap

@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("L,S", [(4, 6), (6, 3)])
def test_alibi_equals_explicit_float_mask(alignment, L, S):
    Hq = 3
    q, k, v = _qkv(_rng(8), (2, Hq), (2, Hq), L, S, 4, 2)
    slopes = np.array([0.5, 0.125, 2.0])
    fm = np.zeros((Hq, L, S))
    for h in range(Hq):
        for i in range(L):
            for j in range(S):
                fm[h, i, j] = -slopes[h] * abs(_pos(i, L, S, alignment) - j)
    got, lse = sdpa(q, k, v, alibi_slopes=slopes, alignment=alignment, return_lse=True)
    ref, ref_lse = sdpa(q, k, v, attn_mask=fm, return_lse=True)
    _close(got, ref)
    _close(lse, ref_lse)


def test_softcap_equals_explicit_tanh():
    q, k, v = _qkv(_rng(9), (2,), (2,), 4, 5, 3, 2)
    q *= 4.0                                          # logits large enough for the cap to matter
    cap, scale = 1.5, 0.8
    s = scale * q @ np.swapaxes(k, -1, -2)
    s = cap * np.tanh(s / cap)
    e = np.exp(s - s.max(-1, keepdims=True))
    ref = (e / e.sum(-1, keepdims=True)) @ v
    got, lse = sdpa(q, k, v, softcap=cap, scale=scale, return_lse=True)
    _close(got, ref)
    _close(lse, np.log(np.exp(s).sum(-1)))
    assert np.abs(got - sdpa(q, k, v, scale=scale)).max() > 1e-3


def test_softcap_before_alibi_and_mask():
    # order: scale -> softcap -> + ALiBi -> + float mask
    q, k, v = _qkv(_rng(10), (), (), 3, 4, 2, 2)
    fm = _rng(11).standard_normal((3, 4))
    cap, slope = 0.7, 0.4
    s = cap * np.tanh((q @ k.T / math.sqrt(2)) / cap)
    s = s - slope * np.abs(np.arange(3)[:, None] - np.arange(4)) + fm
    e = np.exp(s - s.max(-1, keepdims=True))
    _close(sdpa(q, k, v, attn_mask=fm, softcap=cap, alibi_slopes=slope), (e / e.sum(-1, keepdims=True)) @ v)


# -------------------------------------------------------------------------------- everything at once

_COMPOSED = [
    # (lead_q, lead_kv, L, S, E, Ev, options)
    ((2, 4), (2, 2), 3, 5, 3, 2, dict(enable_gqa=True, is_causal=True, alignment="bottom_right",
                                      key_lengths=np.array([4, 1]), alibi_slopes=np.array([0.5, 0.3, 0.2, 0.1]),
                                      softcap=2.0, window_size=(2, None))),
    ((2, 3, 2), (1, 2), 4, 4, 2, 3, dict(key_lengths=np.array([[3], [0]]), alibi_slopes=np.array([1.0, 0.25]),
                                         window_size=1, mask="bool")),
    ((3, 2), (3, 1), 5, 3, 2, 2, dict(enable_gqa=True, is_causal=True, key_lengths=np.array([3, 2, 1]),
                                      mask="float", softcap=0.5, scale=1.3)),
    ((2,), (2,), 2, 6, 4, 1, dict(key_lengths=5, window_size=(None, 0), alignment="bottom_right",
                                  alibi_slopes=0.75, mask="bool", is_causal=True)),
    ((2, 2), (2, 2), 4, 6, 3, 3, dict(is_causal=True, alignment="bottom_right",
                                      key_lengths=np.array([2, 6]), window_size=(1, 1), mask="float",
                                      alibi_slopes=np.array([[0.1], [0.9]]))),
    ((), (), 4, 3, 2, 2, dict(is_causal=True, window_size=0, key_lengths=2, alignment="bottom_right")),
]


@pytest.mark.parametrize("case", range(len(_COMPOSED)))
def test_composed_against_scalar_loops(case):
    lead_q, lead_kv, L, S, E, Ev, opts = _COMPOSED[case]
    opts = dict(opts)
    rng = _rng(100 + case)
    q, k, v = _qkv(rng, lead_q, lead_kv, L, S, E, Ev)
    mask = opts.pop("mask", None)
    lead_out = np.broadcast_shapes(lead_q, lead_kv[:-1] + lead_q[-1:]) if lead_q else ()
    if mask == "bool":
        opts["attn_mask"] = rng.random(lead_out[-1:] + (L, S)) < 0.75
    elif mask == "float":
        fm = rng.standard_normal((L, S))
        fm[0, 1] = -np.inf
        opts["attn_mask"] = fm
    got, lse = sdpa(q, k, v, return_lse=True, **opts)
    enable_gqa = opts.pop("enable_gqa", False)
    assert enable_gqa or k.ndim < 3 or k.shape[-3] in (1, q.shape[-3])
    ref, ref_lse = (_naive(q, k, v, **opts) if q.ndim >= 3 else
                    (lambda o, l: (o[0], l[0]))(*_naive(q[None], k[None], v[None], **opts)))
    assert got.shape == ref.shape == lead_out + (L, Ev)
    _close(got, ref)
    _close(lse, ref_lse)
    P = reference.attention_weights(q, k, enable_gqa=enable_gqa, **opts)
    vv = np.repeat(v, q.shape[-3] // v.shape[-3], axis=-3) if enable_gqa else v
    _close(P @ vv, got)


def test_naive_agrees_with_plain_attention():
    # the loop oracle itself, against three lines of NumPy
    q, k, v = _qkv(_rng(12), (2,), (2,), 3, 4, 2, 3)
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(2)
    e = np.exp(s - s.max(-1, keepdims=True))
    _close(_naive(q, k, v)[0], (e / e.sum(-1, keepdims=True)) @ v)


# ----------------------------------------------------------------------------- fully masked rows

def test_fully_masked_rows_zero_and_minus_inf():
    q, k, v = _qkv(_rng(13), (3, 2), (3, 2), 4, 3, 2, 2)
    # bottom_right causal with L > S: rows 0 (p = -1) see nothing; key_lengths 0 hides everything
    out, lse = sdpa(q, k, v, is_causal=True, alignment="bottom_right", key_lengths=np.array([3, 0, 2]),
                    return_lse=True)
    assert np.all(out[0, :, 0] == 0) and np.all(lse[0, :, 0] == -np.inf)
    assert np.all(out[1] == 0) and np.all(lse[1] == -np.inf)
    assert np.all(out[2, :, :2] == 0) and np.all(lse[2, :, :2] == -np.inf)        # p = i - 2
    assert np.isfinite(lse[0, :, 1:]).all() and np.isfinite(lse[2, :, 2:]).all()
    # a window that excludes every key, a float mask of -inf, a false bool row
    out, lse = sdpa(q, k, v, window_size=(None, 0), alignment="bottom_right", key_lengths=0, return_lse=True)
    assert np.all(out == 0) and np.all(lse == -np.inf)
    fm = np.zeros((4, 3))
    fm[1] = -np.inf
    bm = np.ones((4, 3), bool)
    bm[2] = False
    for m, row in ((fm, 1), (bm, 2)):
        out, lse = sdpa(q, k, v, attn_mask=m, alibi_slopes=0.5, softcap=1.0, return_lse=True)
        assert np.all(out[..., row, :] == 0) and np.all(lse[..., row] == -np.inf)
        assert np.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- varlen

@pytest.mark.parametrize("opts", [{}, dict(is_causal=True), dict(is_causal=True, alignment="bottom_right"),
                                  dict(window_size=(1, 0), alibi_slopes=np.array([0.5, 0.25, 0.1, 0.05]),
                                       softcap=3.0, scale=0.6, alignment="bottom_right"),
                                  dict(enable_gqa=True, is_causal=True, window_size=2)])
def test_varlen_equals_per_sequence(opts):
    rng = _rng(14)
    Hq = 4
    H = 2 if opts.get("enable_gqa") else Hq
    cu_q = np.array([0, 3, 3, 4, 8, 8])       # includes empty query sequences
    cu_k = np.array([0, 5, 7, 7, 10, 12])     # and an empty key sequence (third: 1 query, 0 keys)
    q = rng.standard_normal((Hq, cu_q[-1], 3))
    k = rng.standard_normal((H, cu_k[-1], 3))
    v = rng.standard_normal((H, cu_k[-1], 2))
    out, lse = reference.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, **opts)
    assert out.shape == (Hq, 8, 2) and lse.shape == (Hq, 8)
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        o, l = sdpa(q[:, qs], k[:, ks], v[:, ks], return_lse=True, **opts)
        _close(out[:, qs], o)
        _close(lse[:, qs], l)
    assert np.all(out[:, 3] == 0) and np.all(lse[:, 3] == -np.inf)     # the query with no keys
    _close(reference.varlen_attention(q, k, v, cu_q, cu_k, **opts), out, 0)


def test_varlen_single_sequence_is_plain_call():
    q, k, v = _qkv(_rng(15), (2,), (2,), 5, 6, 3, 3)
    _close(reference.varlen_attention(q, k, v, [0, 5], [0, 6], is_causal=True), sdpa(q, k, v, is_causal=True), 0)


@pytest.mark.parametrize("cu_q,cu_k,exc,match", [
    ([1, 5], [0, 6], ValueError, "cu_seqlens_q"), ([0, 4], [0, 6], ValueError, "cu_seqlens_q"),
    ([0, 3, 2, 5], [0, 2, 4, 6], ValueError, "cu_seqlens_q"), ([0, 5], [0, 2, 6], ValueError, "same number"),
    # not integers: a TypeError, as in the engine (selfattn/_spec.py validates both)
    ([0.0, 5.0], [0, 6], TypeError, "cu_seqlens_q")])
def test_varlen_bad_cu_seqlens(cu_q, cu_k, exc, match):
    q, k, v = _qkv(_rng(16), (2,), (2,), 5, 6, 3, 3)
    with pytest.raises(exc, match=match) as info:
        reference.varlen_attention(q, k, v, cu_q, cu_k)
    assert type(info.value) is exc
    with pytest.raises(exc, match=match):
        selfattn.varlen_attention(q, k, v, cu_q, cu_k)


# ---------------------------------------------------------------------------------------------- attend

def _rope_half(t, base):
    """Rotate-half RoPE of t (L, E) at positions 0..L-1, element by element."""
    L, E = t.shape
    out = t.copy()
    for p in range(L):
        for i in range(E // 2):
            ang = p * base ** (-2 * i / E)
            a, b = t[p, i], t[p, i + E // 2]
            out[p, i] = a * math.cos(ang) - b * math.sin(ang)
            out[p, i + E // 2] = b * math.cos(ang) + a * math.sin(ang)
    return out


@pytest.mark.parametrize("H,Hkv,rope_base,is_causal,window,key_lengths,with_wo", [
    (4, 2, 10000.0, True, None, None, True),
    (4, 1, 100.0, False, (1, 1), np.array([5, 2]), False),
    (2, 2, None, True, 2, 3, True),
    (3, None, 500.0, False, None, None, False),
])
def test_attend_biases_gqa_rope_against_per_head(H, Hkv, rope_base, is_causal, window, key_lengths, with_wo):
    rng = _rng(17)
    B, L, d, E, Ev, d_out = 2, 5, 6, 4, 3, 5
    Hk = H if Hkv is None else Hkv
    x = rng.standard_normal((B, L, d))
    wq, wk, wv = (rng.standard_normal((d, H * E)), rng.standard_normal((d, Hk * E)),
                  rng.standard_normal((d, Hk * Ev)))
    bq, bk, bv = rng.standard_normal(H * E), rng.standard_normal(Hk * E), rng.standard_normal(Hk * Ev)
    wo = rng.standard_normal((H * Ev, d_out)) if with_wo else None
    bo = rng.standard_normal(d_out if with_wo else H * Ev)
    got = reference.attend(x, wq, wk, wv, num_heads=H, num_kv_heads=Hkv, bq=bq, bk=bk, bv=bv, wo=wo, bo=bo,
                           is_causal=is_causal, window_size=window, key_lengths=key_lengths,
                           rope_base=rope_base, scale=0.7)
    kl = np.broadcast_to(L if key_lengths is None else key_lengths, (B,))
    cols = []
    for h in range(H):
        g = h // (H // Hk)
        heads = []
        for b in range(B):
            q = x[b] @ wq[:, h * E:(h + 1) * E] + bq[h * E:(h + 1) * E]
            k = x[b] @ wk[:, g * E:(g + 1) * E] + bk[g * E:(g + 1) * E]
            v = x[b] @ wv[:, g * Ev:(g + 1) * Ev] + bv[g * Ev:(g + 1) * Ev]
            if rope_base is not None:
                q, k = _rope_half(q, rope_base), _rope_half(k, rope_base)
            s = 0.7 * q @ k.T
            allowed = _dense_mask(L, L, is_causal=is_causal, window_size=window, S_b=int(kl[b]))
            s = np.where(allowed, s, -np.inf)
            mx = np.max(s, -1, keepdims=True)
            e = np.where(allowed, np.exp(s - np.where(np.isfinite(mx), mx, 0.0)), 0.0)
            z = e.sum(-1, keepdims=True)
            heads.append(np.where(z > 0, e / np.where(z > 0, z, 1.0), 0.0) @ v)   # rows seeing no key: 0
        cols.append(np.stack(heads))
    o = np.concatenate(cols, axis=-1)                 # (B, L, H*Ev)
    ref = (o @ wo if with_wo else o) + bo
    assert got.shape == ref.shape
    _close(got, ref, 1e-10)


def test_attend_defaults_unchanged():
    rng = _rng(18)
    x, w = rng.standard_normal((3, 4)), rng.standard_normal((4, 4))
    s = (x @ w) @ (x @ w).T / 2.0
    e = np.exp(s - s.max(-1, keepdims=True))
    _close(reference.attend(x, w, w, w), (e / e.sum(-1, keepdims=True)) @ (x @ w))


# ----------------------------------------------------------------------------------- light validation

@pytest.mark.parametrize("kw,exc,match", [
    (dict(alignment="center"), ValueError, "alignment"), (dict(window_size=-1), ValueError, "window_size"),
    # a window of the wrong kind is a TypeError, as in the engine (selfattn/_spec.py)
    (dict(window_size=(1, 2, 3)), TypeError, "window_size"), (dict(window_size=(1.5, 0)), TypeError, "window_size"),
    (dict(key_lengths=7), ValueError, "key_lengths"), (dict(key_lengths=-1), ValueError, "key_lengths"),
    (dict(key_lengths=2.0), TypeError, "key_lengths"),          # not integers: TypeError, as in the engine
    (dict(key_lengths=np.array([1, 2, 3])), ValueError, "key_lengths"),
    (dict(softcap=0.0), ValueError, "softcap"), (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=np.inf), ValueError, "softcap"), (dict(alibi_slopes=np.ones(5)), ValueError, "alibi_slopes"),
])
def test_reference_rejects_clearly_wrong_values(kw, exc, match):
    q, k, v = _qkv(_rng(19), (2, 3), (2, 3), 4, 6, 2, 2)
    for fn in (sdpa, selfattn.scaled_dot_product_attention):     # the same mistake, the same exception
        with pytest.raises(exc, match=match) as info:
            fn(q, k, v, **kw)
        assert type(info.value) is exc
