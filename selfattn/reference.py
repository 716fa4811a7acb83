"""Plain NumPy reference: the math of selfattn, written to be read.

Everything here runs in float64 and materialises the full L x S score matrix,
so it is slow and memory hungry on purpose: it is the oracle the tests compare
the fused kernel against, and the documentation of what the kernel computes.

    scores = scale * Q @ K^T + mask          (mask: 0 / -inf for bool masks)
    P      = softmax(scores, axis=-1)        (a row whose scores are all -inf -> P = 0)
    out    = P @ V
    lse    = log(sum_j exp(scores_j))        (-inf for a fully masked row)

Layouts follow torch.nn.functional.scaled_dot_product_attention:
query (..., Hq, L, E), key (..., H, S, E), value (..., H, S, Ev) -> (..., Hq, L, Ev).
"""

import math

import numpy as np

__all__ = ["scaled_dot_product_attention", "attend", "attention_weights"]


def _as_f64(a):
    return np.asarray(a).astype(np.float64, copy=False)


def _expand_gqa(query, key, value, enable_gqa):
    """Repeat kv heads so that query head h uses kv head h // (Hq // H)."""
    if not enable_gqa or query.ndim < 3:
        return key, value
    hq, h = query.shape[-3], key.shape[-3]
    if hq == h:
        return key, value
    if h == 0 or hq % h:
        raise ValueError(f"enable_gqa: query heads ({hq}) must be a multiple of key/value heads ({h})")
    group = hq // h
    return np.repeat(key, group, axis=-3), np.repeat(value, group, axis=-3)


def _logits(query, key, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, value=None):
    """scale * Q K^T (+ mask), float64, with all the broadcasting spelled out."""
    q, k = _as_f64(query), _as_f64(key)
    v = None if value is None else _as_f64(value)
    k, v = _expand_gqa(q, k, v if v is not None else k, enable_gqa)
    L, E = q.shape[-2], q.shape[-1]
    S = k.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0
    scores = scale * (q @ np.swapaxes(k, -1, -2))  # (..., L, S)
    if is_causal:
        # top-left aligned, as torch: query i sees keys j <= i, also when L != S
        visible = np.tril(np.ones((L, S), dtype=bool))
        scores = np.where(visible, scores, -np.inf)
    if attn_mask is not None:
        m = np.asarray(attn_mask)
        if m.dtype == np.bool_:
            scores = np.where(m, scores, -np.inf)
        else:
            scores = scores + m.astype(np.float64)
    return scores, v


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


def attention_weights(query, key, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """The softmax matrix P, shape (..., Hq, L, S), float64."""
    scores, _ = _logits(query, key, attn_mask, is_causal, scale, enable_gqa)
    return _softmax_rows(scores)[0]


def scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=False, *, scale=None,
                                 enable_gqa=False, return_lse=False):
    """softmax(scale * Q K^T + mask) V in float64. Returns out, or (out, lse) with return_lse."""
    if attn_mask is not None and is_causal:
        raise ValueError("pass either attn_mask or is_causal, not both")
    scores, v = _logits(query, key, attn_mask, is_causal, scale, enable_gqa, value=value)
    p, lse = _softmax_rows(scores)
    out = p @ v
    return (out, lse) if return_lse else out


def attend(x, wq, wk, wv, *, num_heads=1, wo=None, is_causal=False, scale=None):
    """Multi-head self-attention of x (..., L, d_model) with (in, out)-layout weights.

    q = x @ wq, k = x @ wk, v = x @ wv; head h takes columns h*E:(h+1)*E of q and k
    and h*Ev:(h+1)*Ev of v; heads are concatenated back to (..., L, H*Ev), then @ wo.
    """
    x = _as_f64(x)
    q, k, v = x @ _as_f64(wq), x @ _as_f64(wk), x @ _as_f64(wv)
    H = num_heads
    E, Ev = q.shape[-1] // H, v.shape[-1] // H

    def heads(t, d):  # (..., L, H*d) -> (..., H, L, d)
        return np.swapaxes(t.reshape(t.shape[:-1] + (H, d)), -2, -3)

    o = scaled_dot_product_attention(heads(q, E), heads(k, E), heads(v, Ev), is_causal=is_causal, scale=scale)
    o = np.swapaxes(o, -2, -3)
    o = o.reshape(o.shape[:-2] + (H * Ev,))
    return o if wo is None else o @ _as_f64(wo)
