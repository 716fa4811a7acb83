"""Plain NumPy reference: the math of selfattn, written to be read.

Everything here runs in float64 and materialises the full L x S score matrix,
so it is slow and memory hungry on purpose: it is the oracle the tests compare
the fused kernel against, and the documentation of what the kernel computes.

Layouts follow torch.nn.functional.scaled_dot_product_attention:
query (..., Hq, L, E), key (..., H, S, E), value (..., H, S, Ev) -> (..., Hq, L, Ev).
A "batch entry" is one index into out.shape[:-3] (a 2-D or 3-D query has exactly one).

Positions
---------
Query row i (0 <= i < L) sits at position p(i); key j (0 <= j < S) sits at position j::

    S_b  = key_lengths[b]   (the valid keys of batch entry b; S without key_lengths)
    p(i) = i                (alignment="top_left", the default: torch's is_causal)
    p(i) = i + S_b - L      (alignment="bottom_right": the last query sits on the last valid key,
                             as when decoding with a KV cache, and in flash-attn >= 2.1)

Visibility (key j takes part in query row i's softmax) is the conjunction of::

    attn_mask[i, j]                    if attn_mask is a bool array
    j <= p(i)                          if is_causal
    p(i) - left <= j <= p(i) + right   if window_size = (left, right)   (None = unbounded side;
                                                                         an int w means (w, w);
                                       j < num_sink_tokens escapes the left bound: StreamingLLM)
    j < S_b                            always (keys j >= S_b are never read: NaN there is harmless)

Logits, in this order::

    s = scale * q_i . k_j                        (scale defaults to 1/sqrt(E))
    s = softcap * tanh(s / softcap)              if softcap
    s = s - slope[h] * |p(i) - j|                if alibi_slopes (slope of query head h)
    s = s + attn_mask[i, j]                      if attn_mask is a float array
    s = -inf                                     where key j is not visible

Then::

    P   = softmax(s, axis=-1)           (a row whose logits are all -inf -> P = 0)
    out = P @ V
    lse = log(sum_j exp(s_j))           (-inf for a fully masked row)

With sinks (one logit per query head h: gpt-oss's attention sink), the sink is one more logit
of every row, with a value of zero::

    P   = exp(s_j) / (exp(sink[h]) + sum_j exp(s_j))      (rows sum to less than 1)
    lse = log(exp(sink[h]) + sum_j exp(s_j))              (= sink[h] for a fully masked row)

varlen_attention runs packed variable-length sequences one by one through the above;
attend adds the projections (with biases), grouped kv heads and rotary embeddings (RoPE).

Backward (vector-Jacobian products)
-----------------------------------
scaled_dot_product_attention_vjp, varlen_attention_vjp and attend_vjp return (out, vjp);
vjp(cotangent) gives the gradients of sum(out * cotangent). With dO the cotangent of out, and
the logits, P and out of the forward above (P materialised, float64)::

    dV = P^T dO
    dP = dO V^T
    D  = rowsum(dO * out)                (= rowsum(P * dP))
    dS = P * (dP - D)                    (zero where P is zero: masked keys, fully masked rows)
    dS = dS * (1 - tanh(s / softcap)^2)  if softcap (s the scaled logit before the cap)
    dQ = scale dS K
    dK = scale dS^T Q
    dsink[h] = -sum_i P_sink,i D_i       if sinks (P_sink = exp(sink[h] - lse_i)), summed over the
                                         rows and batch entries of head h

ALiBi and a float mask add constants to the logits: they change P but add no term. Keys at
j >= key_lengths are never read, so their dK and dV are zero; a row whose keys are all masked
contributes nothing. Where an input was broadcast (batch dims of size 1 or missing) or shared
by several query heads (GQA), its gradient is summed over everything that shared it, so each
gradient has its input's shape. The float attn_mask, alibi_slopes and key_lengths get none.
"""

import math

import numpy as np

from . import _spec
from ._spec import check_alignment as _check_alignment, check_softcap as _check_softcap
from ._spec import window_sides as _check_window

__all__ = ["scaled_dot_product_attention", "attend", "attention_weights", "varlen_attention",
           "scaled_dot_product_attention_vjp", "varlen_attention_vjp", "attend_vjp",
           "flex_attention", "flex_attention_vjp", "flex_mask"]

# the structured options' values are checked by _spec (the same exception types as the engine):
# _check_window, _check_alignment, _check_softcap above


def _as_f64(a):
    return np.asarray(a).astype(np.float64, copy=False)


# ---------------------------------------------------------------------------------------------
# GQA, positions, visibility and bias

def _expand_gqa(query, key, value, enable_gqa):
    """Repeat kv heads so that query head h uses kv head h // (Hq // H)."""
    if not enable_gqa or query.ndim < 3 or key.ndim < 3 or value.ndim < 3:
        return key, value
    hq, h = query.shape[-3], key.shape[-3]
    if value.shape[-3] != h:
        raise ValueError(f"enable_gqa: key {key.shape} and value {value.shape} must have the same heads")
    if hq == h:
        return key, value
    if h == 0 or hq % h:
        raise ValueError(f"enable_gqa: query heads ({hq}) must be a multiple of key/value heads ({h})")
    group = hq // h
    return np.repeat(key, group, axis=-3), np.repeat(value, group, axis=-3)


def _valid_keys(key_lengths, lead, S):
    """S_b for every batch entry, shaped lead + (1, 1) so it broadcasts against (..., Hq, L, S).

    lead is out.shape[:-2] = (batch..., Hq); key_lengths broadcasts to the batch dims
    out.shape[:-3] (a scalar when the query is 2-D or 3-D).
    """
    if key_lengths is None:
        return np.full(lead + (1, 1), S, dtype=np.int64)
    batch = lead[:-1]
    heads_axis = (1,) * (len(lead) - len(batch))         # () for a 2-D query, else (1,) for Hq
    return _spec.batch_lengths(key_lengths, batch, S).reshape(batch + heads_axis + (1, 1))


def _structure(L, S, lead, *, is_causal=False, window_size=None, alignment="top_left",
               key_lengths=None, alibi_slopes=None, num_sink_tokens=None):
    """The structured part of the mask, written out with positions.

    Returns (visible, bias, S_b):
      visible : bool (lead + (L, S)): causal ∧ window ∧ (j < S_b)  (the bool attn_mask is added later)
      bias    : float64 broadcastable to lead + (L, S): -slope * |p - j| (0.0 without ALiBi)
      S_b     : int (lead + (1, 1)): valid keys per batch entry
    """
    _check_alignment(alignment)
    left, right = _check_window(window_size)
    S_b = _valid_keys(key_lengths, lead, S)

    i = np.arange(L).reshape(L, 1)                       # query row
    j = np.arange(S).reshape(1, S)                       # key index = key position
    offset = 0 if alignment == "top_left" else S_b - L   # bottom_right: last query on last valid key
    p = i + offset                                       # query position, (L, 1) or lead + (L, 1)

    visible = j < S_b
    if is_causal:
        visible = visible & (j <= p)
    if right is not None:
        visible = visible & (j <= p + right)
    if left is not None:
        ns = 0 if num_sink_tokens is None else _spec.check_sink_tokens(num_sink_tokens)
        visible = visible & ((j >= p - left) | (j < ns))    # the first ns keys escape the left bound
    visible = np.broadcast_to(visible, lead + (L, S))

    bias = 0.0
    if alibi_slopes is not None:
        slopes = _spec.head_slopes(alibi_slopes, lead)   # one slope per (batch..., query head)
        bias = -slopes.reshape(lead + (1, 1)) * np.abs(p - j)
    return visible, bias, S_b


def _masked(s, visible, attn_mask, lead, L, S):
    """The logits s with attn_mask applied (bool: AND into visible; float: added) and -inf
    wherever a key is not visible."""
    if attn_mask is not None:
        m = np.asarray(attn_mask)
        try:
            m = np.broadcast_to(m, lead + (L, S))
        except ValueError:
            raise ValueError(f"attn_mask of shape {m.shape} does not broadcast to (..., Hq, L, S) = "
                             f"{lead + (L, S)}") from None
        if m.dtype == np.bool_:
            visible = visible & m
        else:
            s = s + m.astype(np.float64)
    return np.where(visible, s, -np.inf)


def _logits(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
            window_size=None, alignment="top_left", key_lengths=None, alibi_slopes=None, softcap=None,
            num_sink_tokens=None):
    """Masked logits s (lead + (L, S), -inf where not visible) and the float64 value array."""
    q, k, v = _as_f64(query), _as_f64(key), _as_f64(value)
    for a, name in ((q, "query"), (k, "key"), (v, "value")):
        if a.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dims, got shape {a.shape}")
    k, v = _expand_gqa(q, k, v, enable_gqa)
    L, E, S = q.shape[-2], q.shape[-1], k.shape[-2]
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])  # out.shape[:-2]
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0
    softcap = _check_softcap(softcap)

    visible, bias, S_b = _structure(L, S, lead, is_causal=is_causal, window_size=window_size,
                                    alignment=alignment, key_lengths=key_lengths,
                                    alibi_slopes=alibi_slopes, num_sink_tokens=num_sink_tokens)
    if key_lengths is not None:
        # keys j >= S_b are never read: zero those K and V rows. (Their logits become -inf below
        # anyway; V must be zeroed because P = 0 there and 0 * NaN would still be NaN.)
        keep = np.arange(S).reshape(S, 1) < S_b                          # lead + (S, 1)
        k = np.where(keep, np.broadcast_to(k, lead + k.shape[-2:]), 0.0)
        v = np.where(keep, np.broadcast_to(v, lead + v.shape[-2:]), 0.0)

    s = scale * (q @ np.swapaxes(k, -1, -2))             # (..., L, S)
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    s = s + bias
    s = _masked(s, visible, attn_mask, lead, L, S)
    return s, v


def _sink_column(s, sinks, lead):
    """s with the sinks appended as one more logit column (lead + (L, S + 1))."""
    sk = _spec.head_sinks(sinks, lead).reshape(lead + (1, 1))
    return np.concatenate([s, np.broadcast_to(sk, s.shape[:-1] + (1,))], axis=-1)


def _softmax_sinks(s, sinks, lead):
    """(P over the keys, P of the sink column or None, lse): the row softmax with the sinks."""
    if sinks is None:
        p, lse = _softmax_rows(s)
        return p, None, lse
    p, lse = _softmax_rows(_sink_column(s, sinks, lead))
    return p[..., :-1], p[..., -1], lse


def _softmax_rows(scores):
    """Row softmax; rows whose logits are all -inf give zeros (and lse = -inf)."""
    m = np.max(scores, axis=-1, keepdims=True) if scores.shape[-1] else np.full(scores.shape[:-1] + (1,), -np.inf)
    dead = m == -np.inf                       # every key masked out
    m_safe = np.where(dead, 0.0, m)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(scores - m_safe)
        s = np.sum(e, axis=-1, keepdims=True)
        p = np.where(dead, 0.0, e / np.where(dead, 1.0, s))
        lse = np.where(dead, -np.inf, m_safe + np.log(np.where(dead, 1.0, s)))[..., 0]
    return p, lse


def _philox_keep(seed, dropout_p, lead, L, S):
    """Attention dropout's mask, lead + (L, S) of 0 (dropped) or 1 / (1 - p) (kept): Philox4x32-10
    as src_c/dropout.h draws it, unit u = the C-order index of lead (the output's batch dims)."""
    M = 0xFFFFFFFF
    U = int(np.prod(lead, dtype=np.int64))
    G = (S + 3) // 4
    u = np.arange(U, dtype=np.uint64).reshape(U, 1, 1)
    i = np.arange(L, dtype=np.uint64).reshape(1, L, 1)
    g = np.arange(G, dtype=np.uint64).reshape(1, 1, G)
    shape = (U, L, G)
    hi = (i >> np.uint64(32)) ^ (((u >> np.uint64(32)) << np.uint64(16)) & np.uint64(M))
    c = [np.broadcast_to(x & np.uint64(M), shape).copy() for x in
         (g, i, u, hi ^ (((g >> np.uint64(32)) << np.uint64(8)) & np.uint64(M)))]
    k0, k1 = np.uint64(seed & M), np.uint64(seed >> 32)
    with np.errstate(over="ignore"):
        for _ in range(10):
            p0 = np.uint64(0xD2511F53) * c[0]
            p1 = np.uint64(0xCD9E8D57) * c[2]
            c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & np.uint64(M), (p0 >> np.uint64(32)) ^ c[3] ^ k1,
                 p0 & np.uint64(M)]
            k0 = (k0 + np.uint64(0x9E3779B9)) & np.uint64(M)
            k1 = (k1 + np.uint64(0xBB67AE85)) & np.uint64(M)
    r = np.stack(c, axis=-1).reshape(U, L, 4 * G)[..., :S]
    t = p_thr = dropout_p * 4294967296.0
    thr = 0 if t <= 0 else (4294967295 if t >= 4294967295.0 else int(p_thr))
    return np.where(r >= np.uint64(thr), 1.0 / (1.0 - dropout_p), 0.0).reshape(tuple(lead) + (L, S))


# ---------------------------------------------------------------------------------------------
# public functions

def attention_weights(query, key, attn_mask=None, is_causal=False, *, scale=None, enable_gqa=False,
                      window_size=None, alignment="top_left", key_lengths=None, alibi_slopes=None,
                      softcap=None, sinks=None, num_sink_tokens=None):
    """The softmax matrix P, shape (..., Hq, L, S), float64 (options as in scaled_dot_product_attention)."""
    is_causal = _spec.check_is_causal(is_causal)
    k = np.asarray(key)
    dummy_v = np.zeros(k.shape[:-1] + (0,))            # P does not depend on V
    s, _ = _logits(query, key, dummy_v, attn_mask, is_causal, scale, enable_gqa, window_size,
                   alignment, key_lengths, alibi_slopes, softcap, num_sink_tokens)
    return _softmax_sinks(s, sinks, s.shape[:-2])[0]


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                                 enable_gqa=False, return_lse=False, window_size=None,
                                 alignment="top_left", key_lengths=None, alibi_slopes=None,
                                 softcap=None, sinks=None, num_sink_tokens=None, k_scale=None, v_scale=None,
                                 seed=None):
    """softmax(logits) V in float64 (see the module docstring). Returns out, or (out, lse).

    torch's signature: (query, key, value, attn_mask, dropout_p, is_causal) positional, the rest
    keyword-only; is_causal a bool (selfattn._spec). dropout_p > 0 needs an int seed: the mask
    selfattn's kernels draw for it (_philox_keep), applied to P for P V (lse undropped).

    attn_mask (bool: True = takes part, or float: added) and is_causal compose: a key must pass both.
    window_size: None | int w | (left, right), None = unbounded side. alignment: "top_left" |
    "bottom_right" (applies to is_causal, window_size and alibi_slopes). key_lengths: ints
    broadcastable to out.shape[:-3], 0 <= S_b <= S. alibi_slopes: floats broadcastable to
    out.shape[:-2] = (..., Hq). softcap: float > 0. sinks: floats (or -inf: none) broadcastable
    to out.shape[:-2] = (..., Hq), one more logit in each row's denominator. num_sink_tokens:
    with a window bounded on the left, the first n keys stay visible beside it (StreamingLLM).
    k_scale, v_scale: int8 key and value, worth key * k_scale[..., None] (value alike).
    """
    is_causal = _spec.check_is_causal(is_causal)
    dropout_p = _spec.check_dropout_p(dropout_p)
    if k_scale is not None or v_scale is not None:
        if k_scale is None or v_scale is None:
            raise TypeError("k_scale and v_scale go together")
        key = np.asarray(key, dtype=np.float64) * np.asarray(k_scale, dtype=np.float64)[..., None]
        value = np.asarray(value, dtype=np.float64) * np.asarray(v_scale, dtype=np.float64)[..., None]
    s, v = _logits(query, key, value, attn_mask, is_causal, scale, enable_gqa, window_size,
                   alignment, key_lengths, alibi_slopes, softcap, num_sink_tokens)
    p, _, lse = _softmax_sinks(s, sinks, s.shape[:-2])
    if dropout_p:
        p = p * _dropout_mask(seed, dropout_p, s.shape)
    out = p @ v
    return (out, lse) if return_lse else out


def _dropout_mask(seed, dropout_p, shape):
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError("the reference's dropout needs an int seed (the engine's mask for that seed)")
    return _philox_keep(int(seed), dropout_p, shape[:-2], shape[-2], shape[-1])


def _varlen_inputs(query, key, value, cu_seqlens_q, cu_seqlens_k):
    """The packed layouts as float64 (heads, total, dim) arrays and both offset arrays, checked."""
    q, k, v = _as_f64(query), _as_f64(key), _as_f64(value)
    for a, name in ((q, "query"), (k, "key"), (v, "value")):
        if a.ndim != 3:
            raise ValueError(f"{name} must be 3-D (heads, total, dim), got shape {a.shape}")
    cq = _spec.cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[1])
    ck = _spec.cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[1])
    if cq.size != ck.size:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
                         f"got {cq.size - 1} and {ck.size - 1}")
    return q, k, v, cq, ck


def varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, *, scale=None, is_causal=False,
                     window_size=None, alignment="top_left", alibi_slopes=None, softcap=None,
                     enable_gqa=False, return_lse=False, sinks=None, num_sink_tokens=None):
    """Packed variable-length batch: sequence b is rows cu_seqlens[b]:cu_seqlens[b+1].

    query (Hq, total_q, E), key (H, total_k, E), value (H, total_k, Ev) -> (Hq, total_q, Ev)
    (and lse (Hq, total_q)). Each sequence attends only within itself: the result is
    scaled_dot_product_attention on each sequence's slices. alibi_slopes, sinks: (Hq,) or a scalar.
    """
    q, k, v, cq, ck = _varlen_inputs(query, key, value, cu_seqlens_q, cu_seqlens_k)
    Hq, total_q = q.shape[0], q.shape[1]
    out = np.zeros((Hq, total_q, v.shape[-1]))
    lse = np.full((Hq, total_q), -np.inf)
    for b in range(cq.size - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        o, l = scaled_dot_product_attention(q[:, qs], k[:, ks], v[:, ks], is_causal=is_causal, scale=scale,
                                            enable_gqa=enable_gqa, return_lse=True, window_size=window_size,
                                            alignment=alignment, alibi_slopes=alibi_slopes, softcap=softcap,
                                            sinks=sinks, num_sink_tokens=num_sink_tokens)
        out[:, qs], lse[:, qs] = o, l
    return (out, lse) if return_lse else out


def _rope_rotate_half(x, base):
    """Rotary embedding of x (..., L, E) at positions 0..L-1, pairs (x_i, x_{i+E/2}).

    theta_i = base^(-2i/E); pair (a, b) at position p becomes (a cos - b sin, b cos + a sin),
    angle p * theta_i.
    """
    L, E = x.shape[-2], x.shape[-1]
    if E % 2:
        raise ValueError(f"rope needs an even head dim, got E={E}")
    half = E // 2
    out = x.copy()
    p = np.arange(L, dtype=np.float64)
    for i in range(half):
        theta = base ** (-2.0 * i / E)
        cos, sin = np.cos(p * theta), np.sin(p * theta)      # (L,)
        a, b = x[..., :, i], x[..., :, i + half]
        out[..., :, i] = a * cos - b * sin
        out[..., :, i + half] = b * cos + a * sin
    return out


def _attend_heads(x, wq, wk, wv, given, num_heads, num_kv_heads, rope_base):
    """attend's input side in float64, for attend and attend_vjp: the projections (plus the biases
    in `given`), split into heads (..., n, L, d), RoPE'd when rope_base is set.
    Returns (H, Hkv, Ev, qh, kh, vh)."""
    H = int(num_heads)
    Hkv = H if num_kv_heads is None else int(num_kv_heads)
    if H < 1 or Hkv < 1 or H % Hkv:
        raise ValueError(f"num_kv_heads ({Hkv}) must be >= 1 and divide num_heads ({H})")

    def proj(w, name):
        t = x @ w
        return t + given[name] if name in given else t

    q, k, v = proj(wq, "bq"), proj(wk, "bk"), proj(wv, "bv")
    E, Ev = q.shape[-1] // H, v.shape[-1] // Hkv
    if q.shape[-1] != H * E or k.shape[-1] != Hkv * E or v.shape[-1] != Hkv * Ev:
        raise ValueError(f"wq/wk/wv columns ({q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}) do not fit "
                         f"num_heads={H}, num_kv_heads={Hkv}")

    def heads(t, n, d):  # (..., L, n*d) -> (..., n, L, d)
        return np.swapaxes(t.reshape(t.shape[:-1] + (n, d)), -2, -3)

    qh, kh, vh = heads(q, H, E), heads(k, Hkv, E), heads(v, Hkv, Ev)
    if rope_base is not None:
        qh, kh = _rope_rotate_half(qh, float(rope_base)), _rope_rotate_half(kh, float(rope_base))
    return H, Hkv, Ev, qh, kh, vh


def attend(x, wq, wk, wv, *, num_heads=1, wo=None, is_causal=False, scale=None, bq=None, bk=None, bv=None,
           bo=None, num_kv_heads=None, window_size=None, key_lengths=None, rope_base=None):
    """Multi-head self-attention of x (..., L, d_model) with (in, out)-layout weights.

    q = x @ wq + bq, k = x @ wk + bk, v = x @ wv + bv. With H = num_heads query heads and
    Hkv = num_kv_heads (default H, must divide H) kv heads: wq has H*E columns, wk Hkv*E,
    wv Hkv*Ev. Query head h takes columns h*E:(h+1)*E of q and uses kv head g = h // (H/Hkv),
    columns g*E:(g+1)*E of k and g*Ev:(g+1)*Ev of v. With rope_base, each head's q and k are
    rotated (rotate-half RoPE, positions 0..L-1). Heads are concatenated back to
    (..., L, H*Ev), then (@ wo if given) + bo if given. key_lengths broadcasts to x.shape[:-2].
    """
    x = _as_f64(x)
    given = {n: _as_f64(b) for n, b in (("bq", bq), ("bk", bk), ("bv", bv), ("bo", bo)) if b is not None}
    H, Hkv, Ev, qh, kh, vh = _attend_heads(x, _as_f64(wq), _as_f64(wk), _as_f64(wv), given, num_heads,
                                           num_kv_heads, rope_base)
    o = scaled_dot_product_attention(qh, kh, vh, is_causal=is_causal, scale=scale, enable_gqa=Hkv != H,
                                     window_size=window_size, key_lengths=key_lengths)
    o = np.swapaxes(o, -2, -3)
    o = o.reshape(o.shape[:-2] + (H * Ev,))
    if wo is not None:
        o = o @ _as_f64(wo)
    return o if bo is None else o + given["bo"]


# ---------------------------------------------------------------------------------------------
# backward: vector-Jacobian products (P materialised, float64)

def _sum_to(g, shape):
    """Sum g (an array that `shape` was broadcast to) back to `shape`."""
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def _fold_gqa(g, shape, group):
    """Undo np.repeat(x, group, axis=-3): sum the gradient of each repeated head back to its
    kv head, then over the broadcast batch dims, to `shape` (the input's)."""
    if group > 1:
        lead = shape[:-3]
        g = _sum_to(g, lead + (shape[-3] * group,) + shape[-2:])
        g = g.reshape(lead + (shape[-3], group) + shape[-2:]).sum(axis=-3)
    return _sum_to(g, shape)


def scaled_dot_product_attention_vjp(query, key, value, attn_mask=None, is_causal=False, *, scale=None,
                                     enable_gqa=False, window_size=None, alignment="top_left",
                                     key_lengths=None, alibi_slopes=None, softcap=None, sinks=None,
                                     num_sink_tokens=None, dropout_p=0.0, seed=None):
    """(out, vjp) with vjp(dout) -> (dq, dk, dv), float64, shaped like query, key and value;
    with sinks, (dq, dk, dv, dsinks), dsinks shaped like sinks.

    Options as in scaled_dot_product_attention (see the module docstring for the math). The
    forward materialises the logits and P; vjp can be called any number of times.
    """
    q, k, v = _as_f64(query), _as_f64(key), _as_f64(value)
    for a, name in ((q, "query"), (k, "key"), (v, "value")):
        if a.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dims, got shape {a.shape}")
    k_rep, v_rep = _expand_gqa(q, k, v, enable_gqa)
    group = k_rep.shape[-3] // k.shape[-3] if k_rep is not k else 1
    L, E, S, Ev = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
    if k.shape[-1] != E or v.shape[-2] != S:
        raise ValueError(f"shapes do not fit: query {q.shape}, key {k.shape}, value {v.shape}")
    lead = np.broadcast_shapes(q.shape[:-2], k_rep.shape[:-2], v_rep.shape[:-2])     # out.shape[:-2]
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0
    scale = float(scale)
    softcap = _check_softcap(softcap)
    visible, bias, S_b = _structure(L, S, lead, is_causal=is_causal, window_size=window_size,
                                    alignment=alignment, key_lengths=key_lengths, alibi_slopes=alibi_slopes,
                                    num_sink_tokens=num_sink_tokens)

    # every unit (batch entry, query head) gets its own copy of q, k, v: the gradients are
    # computed on these, then summed back over whatever was shared
    qb = np.broadcast_to(q, lead + (L, E))
    keep = np.arange(S).reshape(S, 1) < S_b                                  # lead + (S, 1)
    kb = np.where(keep, np.broadcast_to(k_rep, lead + (S, E)), 0.0)         # keys >= S_b never read
    vb = np.where(keep, np.broadcast_to(v_rep, lead + (S, Ev)), 0.0)

    raw = scale * (qb @ np.swapaxes(kb, -1, -2))                             # lead + (L, S)
    s = raw
    tanh_c = None
    if softcap is not None:
        tanh_c = np.tanh(raw / softcap)
        s = softcap * tanh_c
    s = s + bias
    s = _masked(s, visible, attn_mask, lead, L, S)
    P, P_sink, _ = _softmax_sinks(s, sinks, lead)
    Z = _dropout_mask(seed, _spec.check_dropout_p(dropout_p), P.shape) if dropout_p else None
    out = (P if Z is None else P * Z) @ vb                                   # lead + (L, Ev)

    def vjp(dout):
        dO = _as_f64(dout)
        if dO.shape != out.shape:
            raise ValueError(f"dout must have the shape of out {out.shape}, got {dO.shape}")
        dV = np.swapaxes(P if Z is None else P * Z, -1, -2) @ dO             # lead + (S, Ev)
        dP = dO @ np.swapaxes(vb, -1, -2)                                    # lead + (L, S)
        if Z is not None:
            dP = dP * Z
        D = np.sum(dO * out, axis=-1, keepdims=True)                         # lead + (L, 1)
        dS = P * (dP - D)
        if tanh_c is not None:
            dS = dS * (1.0 - tanh_c * tanh_c)
        dQ = scale * (dS @ kb)                                               # lead + (L, E)
        dK = scale * (np.swapaxes(dS, -1, -2) @ qb)                          # lead + (S, E)
        dK = np.where(keep, dK, 0.0)
        dV = np.where(keep, dV, 0.0)
        grads = (_sum_to(dQ, q.shape), _fold_gqa(dK, k.shape, group), _fold_gqa(dV, v.shape, group))
        if P_sink is None:
            return grads
        dsink = -np.sum(P_sink * D[..., 0], axis=-1)                        # lead
        return grads + (_sum_to(dsink, np.shape(sinks)),)

    return out, vjp


def varlen_attention_vjp(query, key, value, cu_seqlens_q, cu_seqlens_k, *, scale=None, is_causal=False,
                         window_size=None, alignment="top_left", alibi_slopes=None, softcap=None,
                         enable_gqa=False, sinks=None, num_sink_tokens=None):
    """(out, vjp) of varlen_attention, vjp(dout) -> (dq, dk, dv) in the packed layouts of query
    (Hq, total_q, E), key (H, total_k, E) and value (H, total_k, Ev) (and dsinks shaped like
    sinks, when given): each sequence through scaled_dot_product_attention_vjp."""
    q, k, v, cq, ck = _varlen_inputs(query, key, value, cu_seqlens_q, cu_seqlens_k)
    out = np.zeros((q.shape[0], q.shape[1], v.shape[-1]))
    seqs = []
    for b in range(cq.size - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        o, f = scaled_dot_product_attention_vjp(q[:, qs], k[:, ks], v[:, ks], is_causal=is_causal, scale=scale,
                                                enable_gqa=enable_gqa, window_size=window_size,
                                                alignment=alignment, alibi_slopes=alibi_slopes, softcap=softcap,
                                                sinks=sinks, num_sink_tokens=num_sink_tokens)
        out[:, qs] = o
        seqs.append((qs, ks, f))

    def vjp(dout):
        dO = _as_f64(dout)
        if dO.shape != out.shape:
            raise ValueError(f"dout must have the shape of out {out.shape}, got {dO.shape}")
        dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
        dsinks = np.zeros(np.shape(sinks))
        for qs, ks, f in seqs:
            g = f(dO[:, qs])
            dq[:, qs], dk[:, ks], dv[:, ks] = g[:3]
            if sinks is not None:
                dsinks = dsinks + g[3]
        return (dq, dk, dv) if sinks is None else (dq, dk, dv, dsinks)

    return out, vjp


def _rope_rotate_half_vjp(g, base):
    """The transpose of _rope_rotate_half (a rotation per pair): rotate g by the opposite angle."""
    L, E = g.shape[-2], g.shape[-1]
    half = E // 2
    out = g.copy()
    p = np.arange(L, dtype=np.float64)
    for i in range(half):
        theta = base ** (-2.0 * i / E)
        cos, sin = np.cos(p * theta), np.sin(p * theta)
        ga, gb = g[..., :, i], g[..., :, i + half]
        out[..., :, i] = ga * cos + gb * sin
        out[..., :, i + half] = gb * cos - ga * sin
    return out


def attend_vjp(x, wq, wk, wv, *, num_heads=1, wo=None, is_causal=False, scale=None, bq=None, bk=None, bv=None,
               bo=None, num_kv_heads=None, window_size=None, key_lengths=None, rope_base=None):
    """(y, vjp) of attend (same arguments); vjp(dy) returns, in this order,
    (dx, dwq, dwk, dwv[, dwo][, dbq][, dbk][, dbv][, dbo]): the optional ones only for the
    arguments given (not None). Every gradient is float64 with its argument's shape."""
    x = _as_f64(x)
    wq, wk, wv = _as_f64(wq), _as_f64(wk), _as_f64(wv)
    given = {n: _as_f64(b) for n, b in (("bq", bq), ("bk", bk), ("bv", bv), ("bo", bo)) if b is not None}
    H, Hkv, Ev, qh, kh, vh = _attend_heads(x, wq, wk, wv, given, num_heads, num_kv_heads, rope_base)

    def unheads(t):          # (..., n, L, d) -> (..., L, n*d)
        t = np.swapaxes(t, -2, -3)
        return t.reshape(t.shape[:-2] + (t.shape[-2] * t.shape[-1],))

    oh, sdpa_vjp = scaled_dot_product_attention_vjp(qh, kh, vh, is_causal=is_causal, scale=scale,
                                                    enable_gqa=Hkv != H, window_size=window_size,
                                                    key_lengths=key_lengths)
    o = unheads(oh)                                                          # (..., L, H*Ev)
    wo64 = None if wo is None else _as_f64(wo)
    y = o if wo64 is None else o @ wo64
    if "bo" in given:
        y = y + given["bo"]

    def flat(t):             # (..., n, c) -> (N, c): every row of every batch entry
        return t.reshape(-1, t.shape[-1])

    def vjp(dy):
        dy = _as_f64(dy)
        if dy.shape != y.shape:
            raise ValueError(f"dy must have the shape of y {y.shape}, got {dy.shape}")
        grads = {}
        if "bo" in given:
            grads["bo"] = flat(dy).sum(axis=0)
        if wo64 is not None:
            grads["wo"] = flat(o).T @ flat(dy)
            do = dy @ wo64.T
        else:
            do = dy
        dqh, dkh, dvh = sdpa_vjp(np.swapaxes(do.reshape(do.shape[:-1] + (H, Ev)), -2, -3))   # the heads
        if rope_base is not None:
            dqh, dkh = _rope_rotate_half_vjp(dqh, float(rope_base)), _rope_rotate_half_vjp(dkh, float(rope_base))
        dq, dk, dv = unheads(dqh), unheads(dkh), unheads(dvh)
        for name, d in (("bq", dq), ("bk", dk), ("bv", dv)):
            if name in given:
                grads[name] = flat(d).sum(axis=0)
        dx = dq @ wq.T + dk @ wk.T + dv @ wv.T
        xf = flat(x)
        result = [dx, xf.T @ flat(dq), xf.T @ flat(dk), xf.T @ flat(dv)]
        if wo64 is not None:
            result.append(grads["wo"])
        result += [grads[n] for n in ("bq", "bk", "bv", "bo") if n in given]
        return tuple(result)

    return y, vjp


def flex_mask(mask_mod, B, H, L, S):
    """mask_mod evaluated on the whole (B, H, L, S) index grid, one call (the block mask's
    independent check: no blocks involved)."""
    b = np.arange(B).reshape(B, 1, 1, 1)
    h = np.arange(H).reshape(1, H, 1, 1)
    q = np.arange(L).reshape(1, 1, L, 1)
    kv = np.arange(S).reshape(1, 1, 1, S)
    return np.broadcast_to(np.asarray(mask_mod(b, h, q, kv), dtype=bool), (B, H, L, S))


def _flex_scores(query, key, value, score_mod, block_mask, scale, enable_gqa):
    """float64 logits of flex_attention: scale q k^T, then score_mod called on NumPy arrays
    (score, b, h, q_idx, kv_idx broadcasting), then -inf where mask_mod says no. Returns (logits
    after the mask, raw logits, v expanded to the query heads)."""
    q = _as_f64(query)
    k_rep, v_rep = _expand_gqa(q, _as_f64(key), _as_f64(value), enable_gqa)
    B, H, L, E = q.shape
    S = k_rep.shape[-2]
    sc = (1.0 / math.sqrt(E) if E > 0 else 1.0) if scale is None else float(scale)
    raw = sc * (q @ np.swapaxes(k_rep, -1, -2))
    s = raw
    if score_mod is not None:
        b = np.arange(B).reshape(B, 1, 1, 1)
        h = np.arange(H).reshape(1, H, 1, 1)
        with np.errstate(all="ignore"):
            s = np.broadcast_to(np.asarray(score_mod(raw, b, h, np.arange(L).reshape(1, 1, L, 1),
                                                     np.arange(S).reshape(1, 1, 1, S)), dtype=np.float64),
                                raw.shape)
    if block_mask is not None:
        s = np.where(flex_mask(block_mask.mask_mod, B, H, L, S), s, -np.inf)
    return s, raw, v_rep


def flex_attention(query, key, value, score_mod=None, block_mask=None, *, scale=None, enable_gqa=False,
                   return_lse=False):
    """selfattn.flex_attention in float64: score_mod called on the whole score array (NumPy), the
    block mask's mask_mod evaluated on every element (flex_mask), a row that sees nothing gives
    zeros and lse -inf."""
    s, _, v = _flex_scores(query, key, value, score_mod, block_mask, scale, enable_gqa)
    p, _, lse = _softmax_sinks(s, None, s.shape[:-2])
    out = p @ v
    return (out, lse) if return_lse else out


def flex_attention_vjp(query, key, value, score_mod=None, block_mask=None, *, scale=None, enable_gqa=False):
    """(out, vjp) of flex_attention in float64, vjp(dout) -> (dq, dk, dv); with a score_mod its
    derivative with respect to the score comes from selfattn._scoremod's trace of it."""
    if score_mod is None:
        q = _as_f64(query)
        mask = None
        if block_mask is not None:
            mask = flex_mask(block_mask.mask_mod, q.shape[0], q.shape[1], q.shape[2], np.shape(key)[2])
        return scaled_dot_product_attention_vjp(query, key, value, attn_mask=mask, scale=scale,
                                                enable_gqa=enable_gqa)
    from ._scoremod import trace
    q, k, v0 = _as_f64(query), _as_f64(key), _as_f64(value)
    s, raw, v = _flex_scores(q, k, v0, score_mod, block_mask, scale, enable_gqa)
    B, H, L, E = q.shape
    S = k.shape[-2]
    sc = (1.0 / math.sqrt(E) if E > 0 else 1.0) if scale is None else float(scale)
    P, _, _ = _softmax_sinks(s, None, s.shape[:-2])
    out = P @ v
    dmod = np.broadcast_to(trace(score_mod).grad_score().evaluate(
        raw, np.arange(B).reshape(B, 1, 1, 1), np.arange(H).reshape(1, H, 1, 1),
        np.arange(L).reshape(1, 1, L, 1), np.arange(S).reshape(1, 1, 1, S)), raw.shape)
    k_rep, _ = _expand_gqa(q, k, v0, enable_gqa)
    group = H // k.shape[1]

    def vjp(dout):
        dO = _as_f64(dout)
        dV = np.swapaxes(P, -1, -2) @ dO
        dP = dO @ np.swapaxes(v, -1, -2)
        dS = P * (dP - np.sum(dP * P, axis=-1, keepdims=True))
        dR = np.where(P > 0, dS * dmod, 0.0) * sc
        dq = dR @ k_rep
        dk = np.swapaxes(dR, -1, -2) @ q
        fold = lambda g: g.reshape(B, k.shape[1], group, *g.shape[2:]).sum(axis=2)  # noqa: E731
        return dq, fold(dk), fold(dV)
    return out, vjp
