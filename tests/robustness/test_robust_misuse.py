"""Misuse: ONE table of every wrong call, with its exception type and message; plus the
input kinds that must be accepted (lists, memory-mapped arrays, torch CPU tensors)."""

import math

import numpy as np
import pytest

import selfattn
from selfattn import reference
from sa_testutil import assert_sdpa_close, logit_magnitude, optional_import, vmax_of

sdpa = selfattn.scaled_dot_product_attention
attend = selfattn.attend

_rng = np.random.default_rng(0)
Q = _rng.standard_normal((2, 4, 5, 8))        # B=2, H=4, L=5, E=8
K = _rng.standard_normal((2, 4, 7, 8))        # S=7
V = _rng.standard_normal((2, 4, 7, 6))        # Ev=6
X = _rng.standard_normal((3, 5, 12))          # d_model = 12
WQ = _rng.standard_normal((12, 8))            # H*E = 8
WK = _rng.standard_normal((12, 8))
WV = _rng.standard_normal((12, 6))            # H*Ev = 6
WO = _rng.standard_normal((6, 10))


PK = _rng.standard_normal((3, 4, 2, 8))       # pages: 3 blocks of 4 rows, 2 kv heads, E=8
PBT = np.array([[2, 0], [1, -1]])              # sequence 0 in blocks 2, 0; sequence 1 in block 1
PSL = np.array([6, 3])


def _one_seq_cache():
    c = selfattn.PagedKVCache(2, 4, 1, 8)
    c.append([c.add_sequence()], np.ones((1, 1, 1, 8), np.float32), np.ones((1, 1, 1, 8), np.float32))
    return c


def _full_paged_cache():
    c = selfattn.PagedKVCache(1, 4, 1, 8)
    s = c.add_sequence()
    c.append([s], np.ones((1, 1, 4, 8), np.float32), np.ones((1, 1, 4, 8), np.float32))
    c.append([s], np.ones((1, 1, 1, 8), np.float32), np.ones((1, 1, 1, 8), np.float32))


def S(*args, **kw):
    return lambda: sdpa(*args, **kw)


def A(*args, **kw):
    return lambda: attend(*args, **kw)


def q_(**kw):
    """sdpa(Q, K, V) with some arguments replaced."""
    args = dict(query=Q, key=K, value=V)
    args.update(kw)
    return S(**args)


def a_(**kw):
    """attend(X, WQ, WK, WV, num_heads=2) with some arguments replaced."""
    args = dict(x=X, wq=WQ, wk=WK, wv=WV, num_heads=2)
    args.update(kw)
    return A(**args)


def G(grad_out, **kw):
    """vjp(grad_out) of scaled_dot_product_attention_vjp(Q, K, V, **kw): errors of the backward."""
    def call():
        out, vjp = selfattn.scaled_dot_product_attention_vjp(Q, K, V, **kw)
        return vjp(grad_out(out) if callable(grad_out) else grad_out)
    return call


def GV(**kw):
    """scaled_dot_product_attention_vjp(Q, K, V, **kw): errors of its forward."""
    return lambda: selfattn.scaled_dot_product_attention_vjp(Q, K, V, **kw)


def VL(grad_out=None, cu_q=(0, 2, 5), cu_k=(0, 3, 7), **kw):
    """varlen_attention_vjp on the packed heads of Q[0], K[0], V[0]; with grad_out, its vjp."""
    def call():
        out, vjp = selfattn.varlen_attention_vjp(Q[0], K[0], V[0], list(cu_q), list(cu_k), **kw)
        return vjp(grad_out(out)) if grad_out is not None else out
    return call


MISUSE = [
    # ---- wrong ndim
    ("query_1d", q_(query=Q[0, 0, 0]), ValueError, r"query must have at least 2 dims .*got shape \(8,\)"),
    ("query_0d", q_(query=np.float64(1.0)), ValueError, r"query must have at least 2 dims .*got shape \(\)"),
    ("key_1d", q_(key=K[0, 0, 0]), ValueError, r"key must have at least 2 dims"),
    ("value_1d", q_(value=V[0, 0, :, 0]), ValueError, r"value must have at least 2 dims"),
    ("attend_x_1d", a_(x=X[0, 0]), ValueError, r"x must have at least 2 dims"),
    # ---- mismatched E, S, heads, batch
    ("E_mismatch", q_(key=K[..., :7]), ValueError, r"query and key must have the same last dim E.*E=8.*E=7"),
    ("S_mismatch", q_(value=V[..., :6, :]), ValueError, r"key and value must have the same number of keys S"),
    ("heads_mismatch", q_(key=K[:, :2], value=V[:, :2]), ValueError,
     r"do not broadcast \(for grouped-query attention .*enable_gqa=True\)"),
    ("batch_mismatch", q_(query=np.concatenate([Q, Q, Q])), ValueError, r"leading \(batch/head\) dims .* do not broadcast"),
    ("kv_heads_differ", q_(key=K[:, :3], value=V[:, :2]), ValueError, r"do not broadcast"),
    # ---- masks
    ("mask_not_broadcast", q_(attn_mask=np.ones((5, 6), bool)), ValueError,
     r"attn_mask of shape \(5, 6\) does not broadcast to \(\.\.\., Hq, L, S\) = \(2, 4, 5, 7\)"),
    ("mask_too_many_dims", q_(attn_mask=np.ones((1, 1, 1, 1, 5, 7), bool)), ValueError, r"attn_mask .* does not broadcast"),
    ("mask_wrong_heads", q_(attn_mask=np.zeros((3, 5, 7), np.float32)), ValueError, r"attn_mask .* does not broadcast"),
    ("mask_int", q_(attn_mask=np.ones((5, 7), np.int32)), TypeError, r"attn_mask must be bool .*or floating .*got dtype int32"),
    ("mask_uint8", q_(attn_mask=np.ones((5, 7), np.uint8)), TypeError, r"attn_mask must be bool .*got dtype uint8"),
    ("mask_complex", q_(attn_mask=np.ones((5, 7), np.complex64)), TypeError, r"attn_mask must be bool .*got dtype complex64"),
    ("mask_object", q_(attn_mask=np.ones((5, 7), object)), TypeError, r"attn_mask must be bool .*got dtype object"),
    ("mask_str", q_(attn_mask=np.full((5, 7), "a")), TypeError, r"attn_mask must be bool .*got dtype <U1"),
    ("mask_ragged_list", q_(attn_mask=[[True], [True, False]]), TypeError, r"attn_mask cannot be read as an array"),
    # ---- structured masks
    ("window_negative", q_(window_size=-1), ValueError, r"window_size must be >= 0 on each side .*got -1"),
    ("window_negative_right", q_(window_size=(3, -2)), ValueError, r"window_size must be >= 0 .*got \(3, -2\)"),
    ("window_float", q_(window_size=2.0), TypeError, r"window_size must be None, an int or a \(left, right\) pair"),
    ("window_bool", q_(window_size=True), TypeError, r"window_size must be None, an int"),
    ("window_triple", q_(window_size=(1, 2, 3)), TypeError, r"window_size must be None, an int or a \(left, right\)"),
    ("window_side_float", q_(window_size=(1, 2.5)), TypeError, r"window_size right side must be an int or None, got float"),
    ("window_side_str", q_(window_size=("1", None)), TypeError, r"window_size left side must be an int or None, got str"),
    ("alignment_unknown", q_(alignment="bottom-right"), ValueError,
     r"alignment must be 'top_left' or 'bottom_right', got 'bottom-right'"),
    ("alignment_none", q_(alignment=None), ValueError, r"alignment must be 'top_left' or 'bottom_right', got None"),
    ("key_lengths_above_S", q_(key_lengths=[3, 8]), ValueError, r"key_lengths must be in \[0, S=7\], got values in \[3, 8\]"),
    ("key_lengths_negative", q_(key_lengths=-1), ValueError, r"key_lengths must be in \[0, S=7\]"),
    ("key_lengths_float", q_(key_lengths=np.array([3.0, 4.0])), TypeError, r"key_lengths must be integers, got dtype float64"),
    ("key_lengths_bool", q_(key_lengths=True), TypeError, r"key_lengths must be integers, got dtype bool"),
    ("key_lengths_shape", q_(key_lengths=[1, 2, 3]), ValueError,
     r"key_lengths of shape \(3,\) does not broadcast to the batch dims \(2,\)"),
    ("key_lengths_per_head", q_(key_lengths=np.full((2, 4), 3)), ValueError, r"key_lengths of shape \(2, 4\) does not broadcast"),
    ("alibi_shape", q_(alibi_slopes=np.ones(3)), ValueError, r"alibi_slopes of shape \(3,\) does not broadcast to \(..., Hq\) = \(2, 4\)"),
    ("alibi_nan", q_(alibi_slopes=np.array([1.0, np.nan, 1.0, 1.0])), ValueError, r"alibi_slopes must be finite"),
    ("alibi_complex", q_(alibi_slopes=np.ones(4, complex)), TypeError, r"alibi_slopes must be real numbers, got dtype complex128"),
    ("softcap_zero", q_(softcap=0.0), ValueError, r"softcap must be finite and > 0, got 0.0"),
    ("softcap_negative", q_(softcap=-5), ValueError, r"softcap must be finite and > 0, got -5"),
    ("softcap_nan", q_(softcap=float("nan")), ValueError, r"softcap must be finite and > 0, got nan"),
    ("softcap_inf", q_(softcap=math.inf), ValueError, r"softcap must be finite and > 0"),
    ("softcap_str", q_(softcap="30"), TypeError, r"softcap must be a real number > 0 or None, got str"),
    ("softcap_bool", q_(softcap=True), TypeError, r"softcap must be a real number > 0 or None, got bool"),
    ("sinks_shape", q_(sinks=np.ones(3)), ValueError, r"sinks of shape \(3,\) does not broadcast to \(..., Hq\) = \(2, 4\)"),
    ("sinks_nan", q_(sinks=np.array([0.0, np.nan, 0.0, 0.0])), ValueError, r"sinks must be finite or -inf"),
    ("sinks_plus_inf", q_(sinks=math.inf), ValueError, r"sinks must be finite or -inf"),
    ("sinks_str", q_(sinks="1"), TypeError, r"sinks must be real numbers .*got dtype <U1"),
    ("sinks_complex", q_(sinks=np.ones(4, complex)), TypeError, r"sinks must be real numbers .*got dtype complex128"),
    ("sink_tokens_negative", q_(window_size=(2, 0), num_sink_tokens=-1), ValueError, r"num_sink_tokens must be >= 0, got -1"),
    ("sink_tokens_float", q_(window_size=(2, 0), num_sink_tokens=1.5), TypeError,
     r"num_sink_tokens must be an int >= 0, got float"),
    # ---- grouped-query attention
    ("gqa_not_divisible", q_(key=K[:, :3], value=V[:, :3], enable_gqa=True), ValueError,
     r"enable_gqa: query heads Hq=4 must be a multiple of key/value heads H=3"),
    ("gqa_kv_heads_differ", q_(key=K[:, :2], value=V[:, :1], enable_gqa=True), ValueError,
     r"enable_gqa: key .* and value .* must have the same number of heads"),
    ("gqa_zero_kv_heads", q_(key=K[:, :0], value=V[:, :0], enable_gqa=True), ValueError, r"must be a multiple"),
    # ---- num_threads
    ("threads_0", q_(num_threads=0), ValueError, r"num_threads must be >= 1, got 0"),
    ("threads_neg", q_(num_threads=-3), ValueError, r"num_threads must be >= 1, got -3"),
    ("threads_np_neg", q_(num_threads=np.int64(-1)), ValueError, r"num_threads must be >= 1"),
    ("threads_float", q_(num_threads=2.0), TypeError, r"num_threads must be an int, got float"),
    ("threads_str", q_(num_threads="2"), TypeError, r"num_threads must be an int, got str"),
    ("threads_bool", q_(num_threads=True), TypeError, r"num_threads must be an int, got bool"),
    ("threads_np_float", q_(num_threads=np.float32(2)), TypeError, r"num_threads must be an int, got float32"),
    ("threads_list", q_(num_threads=[2]), TypeError, r"num_threads must be an int, got list"),
    ("attend_threads_0", a_(num_threads=0), ValueError, r"num_threads must be >= 1"),
    ("attend_threads_str", a_(num_threads="1"), TypeError, r"num_threads must be an int"),
    # ---- scale
    ("scale_nan", q_(scale=float("nan")), ValueError, r"scale must be finite, got nan"),
    ("scale_inf", q_(scale=math.inf), ValueError, r"scale must be finite, got inf"),
    ("scale_neg_inf", q_(scale=-math.inf), ValueError, r"scale must be finite, got -inf"),
    ("scale_np_nan", q_(scale=np.float32("nan")), ValueError, r"scale must be finite"),
    # float32 cannot hold 1e300: every score would be NaN (the float64 reference stays finite)
    ("scale_over_float32", q_(query=Q.astype(np.float32), key=K.astype(np.float32), value=V.astype(np.float32),
                              scale=1e300), ValueError, r"scale=1e\+300 does not fit the compute dtype float32"),
    ("scale_str", q_(scale="1"), TypeError, r"scale must be a real number, got str"),
    ("scale_bytes", q_(scale=b"1"), TypeError, r"scale must be a real number, got bytes"),
    ("scale_complex", q_(scale=1 + 0j), TypeError, r"scale must be a real number, got complex"),
    ("scale_bool", q_(scale=True), TypeError, r"scale must be a real number, got bool"),
    ("scale_list", q_(scale=[1.0]), TypeError, r"scale must be a real number, got list"),
    ("scale_dict", q_(scale={}), TypeError, r"scale must be a real number, got dict"),
    ("attend_scale_nan", a_(scale=float("nan")), ValueError, r"scale must be finite"),
    ("attend_scale_str", a_(scale="0.5"), TypeError, r"scale must be a real number"),
    # ---- array dtypes that cannot be computed
    ("query_complex", q_(query=Q.astype(np.complex128)), TypeError, r"query has dtype complex128, which selfattn cannot compute"),
    ("key_complex64", q_(key=K.astype(np.complex64)), TypeError, r"key has dtype complex64, which selfattn cannot compute"),
    ("value_object", q_(value=V.astype(object)), TypeError, r"value has dtype object, which selfattn cannot compute"),
    ("query_str", q_(query=np.full((5, 8), "x")), TypeError, r"query has dtype <U1, which selfattn cannot compute"),
    ("key_bytes", q_(key=np.full((7, 8), b"x")), TypeError, r"key has dtype \|S1, which selfattn cannot compute"),
    ("value_datetime", q_(value=np.zeros((7, 6), "datetime64[s]")), TypeError, r"value has dtype datetime64\[s\]"),
    ("query_longdouble", q_(query=Q.astype(np.longdouble)), TypeError, r"query has dtype float128"),
    ("query_ragged_list", q_(query=[[1.0, 2.0], [3.0]]), TypeError, r"query cannot be read as an array"),
    ("query_dict", q_(query={"a": 1}), TypeError, r"query has dtype object"),
    ("query_none", q_(query=None), TypeError, r"query must be an array, got None"),
    ("attend_x_complex", a_(x=X.astype(np.complex64)), TypeError, r"x has dtype complex64"),
    ("attend_wq_object", a_(wq=WQ.astype(object)), TypeError, r"wq has dtype object"),
    ("attend_wo_str", a_(wo=np.full((6, 10), "s")), TypeError, r"wo has dtype <U1"),
    ("attend_x_ragged", a_(x=[[1.0], [1.0, 2.0]]), TypeError, r"x cannot be read as an array"),
    # ---- attend: weights that disagree with x or num_heads
    ("wq_wrong_dmodel", a_(wq=WQ[:11]), ValueError, r"wq must be 2-D \(d_model, H\*E\) with d_model=12 .*got shape \(11, 8\)"),
    ("wk_1d", a_(wk=WK[:, 0]), ValueError, r"wk must be 2-D .*got shape \(12,\)"),
    ("wv_3d", a_(wv=WV[None]), ValueError, r"wv must be 2-D .*got shape \(1, 12, 6\)"),
    ("wq_wk_columns", a_(wk=WK[:, :6]), ValueError, r"wq \(12, 8\) and wk \(12, 6\) must have the same number of columns"),
    ("wq_not_multiple_heads", a_(wq=WQ[:, :6], wk=WK[:, :6], num_heads=4), ValueError,
     r"wq has 6 columns, not a multiple of num_heads=4"),
    ("wv_not_multiple_heads", a_(wv=WV[:, :5]), ValueError, r"wv has 5 columns, not a multiple of num_heads=2"),
    ("wo_wrong_rows", a_(wo=WO[:5]), ValueError, r"wo must be 2-D \(H\*Ev, d_out\) = \(6, d_out\), got shape \(5, 10\)"),
    ("wo_1d", a_(wo=WO[:, 0]), ValueError, r"wo must be 2-D .*got shape \(6,\)"),
    ("num_heads_0", a_(num_heads=0), ValueError, r"num_heads must be >= 1, got 0"),
    ("num_heads_neg", a_(num_heads=-2), ValueError, r"num_heads must be >= 1, got -2"),
    ("num_heads_float", a_(num_heads=2.0), TypeError, r"num_heads must be an int, got float"),
    ("num_heads_bool", a_(num_heads=True), TypeError, r"num_heads must be an int, got bool"),
    ("num_heads_str", a_(num_heads="2"), TypeError, r"num_heads must be an int, got str"),
    ("num_heads_none", a_(num_heads=None), TypeError, r"num_heads must be an int, got NoneType"),
    # ---- positional-only misuse of keyword-only arguments
    ("sdpa_scale_positional", S(Q, K, V, None, 0.0, False, 0.5), TypeError, r"positional argument"),
    # torch's order (attn_mask, dropout_p, is_causal): a value in the wrong place is an error
    ("sdpa_is_causal_in_dropouts_place", S(Q, K, V, None, True), TypeError,
     r"dropout_p must be a real number in \[0, 1\), got bool True .*is_causal is the 6th positional argument"),
    ("sdpa_is_causal_not_bool", q_(is_causal="no"), TypeError, r"is_causal must be a bool, got str 'no'"),
    # ... and in every other entry point that takes is_causal (the one problem builder checks it)
    ("varlen_is_causal_not_bool", VL(is_causal="no"), TypeError, r"is_causal must be a bool, got str 'no'"),
    ("attend_is_causal_not_bool", a_(is_causal=0.1), TypeError, r"is_causal must be a bool, got float 0.1"),
    ("kvcache_is_causal_not_bool",
     lambda: selfattn.KVCache(batch=1, num_kv_heads=1, head_dim=6, max_len=4).attend(np.zeros((1, 1, 1, 6), np.float32),
                                                                                    is_causal="yes"),
     TypeError, r"is_causal must be a bool, got str 'yes'"),
    ("weights_is_causal_not_bool", lambda: selfattn.attention_weights(Q, K, is_causal="no"), TypeError,
     r"is_causal must be a bool, got str 'no'"),
    ("reference_weights_is_causal_not_bool", lambda: reference.attention_weights(Q, K, is_causal=1), TypeError,
     r"is_causal must be a bool, got int 1"),
    ("sdpa_dropout_seed_negative", q_(dropout_p=0.1, seed=-1), ValueError, r"seed must be in \[0, 2\*\*64\), got -1"),
    ("sdpa_dropout_seed_float", q_(dropout_p=0.1, seed=1.5), TypeError,
     r"seed must be an int in \[0, 2\*\*64\), a numpy.random.Generator or None, got float 1.5"),
    ("sdpa_dropout_out_of_range", q_(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
    ("attend_heads_positional", A(X, WQ, WK, WV, 2), TypeError, r"positional argument"),
    ("sdpa_unknown_kwarg", q_(dropout=0.1), TypeError, r"unexpected keyword argument 'dropout'"),
    # ---- the backward (selfattn.autograd): the cotangent, and the forward's arguments
    ("vjp_grad_out_wrong_shape", G(lambda o: np.ones(o.shape[:-1] + (5,))), ValueError,
     r"grad_out must have the shape of the forward's output \(2, 4, 5, 6\), got \(2, 4, 5, 5\)"),
    ("vjp_grad_out_not_broadcast", G(lambda o: np.ones(o.shape[-2:])), ValueError,
     r"grad_out must have the shape of the forward's output \(2, 4, 5, 6\), got \(5, 6\)"),
    ("vjp_grad_out_extra_dim", G(lambda o: np.ones((1,) + o.shape)), ValueError, r"grad_out must have the shape"),
    ("vjp_grad_out_scalar", G(1.0), ValueError, r"grad_out must have the shape .*got \(\)"),
    ("vjp_grad_out_complex", G(lambda o: np.ones(o.shape, np.complex128)), TypeError,
     r"grad_out must be a real array, got dtype complex128"),
    ("vjp_grad_out_str", G(lambda o: np.full(o.shape, "a")), TypeError, r"grad_out must be a real array, got dtype <U1"),
    ("vjp_grad_out_object", G(lambda o: np.ones(o.shape, object)), TypeError, r"grad_out must be a real array, got dtype object"),
    ("vjp_grad_out_ragged", G([[1.0], [1.0, 2.0]]), TypeError, r"grad_out cannot be read as an array"),
    ("vjp_return_lse", GV(return_lse=True), TypeError,
     r"scaled_dot_product_attention_vjp\(\) got an unexpected keyword argument 'return_lse'"),
    ("vjp_return_lse_false", GV(return_lse=False), TypeError, r"unexpected keyword argument 'return_lse'"),
    ("vjp_out_kwarg", GV(out=np.empty((2, 4, 5, 6))), TypeError, r"unexpected keyword argument 'out'"),
    ("vjp_unknown_kwarg", GV(dropout=0.1), TypeError,
     r"scaled_dot_product_attention_vjp\(\) got an unexpected keyword argument 'dropout'"),
    ("vjp_grad_out_none", G(None), TypeError, r"grad_out must be an array of the forward's output shape"),
    ("vjp_positional_scale", lambda: selfattn.scaled_dot_product_attention_vjp(Q, K, V, None, False, 0.5), TypeError,
     r"positional argument"),
    ("vjp_threads_str", GV(num_threads="2"), TypeError, r"num_threads must be an int, got str"),
    ("vjp_threads_0", GV(num_threads=0), ValueError, r"num_threads must be >= 1, got 0"),
    ("vjp_scale_nan", GV(scale=float("nan")), ValueError, r"scale must be finite, got nan"),
    ("vjp_window_float", GV(window_size=2.0), TypeError, r"window_size must be None, an int or a \(left, right\) pair"),
    ("vjp_alignment_unknown", GV(alignment="bottom"), ValueError, r"alignment must be 'top_left' or 'bottom_right'"),
    ("vjp_key_lengths_float", GV(key_lengths=np.array([3.0, 4.0])), TypeError, r"key_lengths must be integers"),
    ("vjp_key_lengths_above_S", GV(key_lengths=[3, 8]), ValueError, r"key_lengths must be in \[0, S=7\]"),
    ("vjp_alibi_shape", GV(alibi_slopes=np.ones(3)), ValueError, r"alibi_slopes of shape \(3,\) does not broadcast"),
    ("vjp_softcap_str", GV(softcap="30"), TypeError, r"softcap must be a real number > 0 or None, got str"),
    ("vjp_softcap_zero", GV(softcap=0.0), ValueError, r"softcap must be finite and > 0"),
    ("vjp_sinks_shape", GV(sinks=np.ones(3)), ValueError, r"sinks of shape \(3,\) does not broadcast"),
    ("vjp_sink_tokens_bool", GV(num_sink_tokens=True), TypeError, r"num_sink_tokens must be an int >= 0, got bool"),
    ("vjp_mask_int", GV(attn_mask=np.ones((5, 7), np.int32)), TypeError, r"attn_mask must be bool .*got dtype int32"),
    ("vjp_gqa_not_divisible", lambda: selfattn.scaled_dot_product_attention_vjp(Q, K[:, :3], V[:, :3], enable_gqa=True),
     ValueError,
     r"enable_gqa: query heads Hq=4 must be a multiple of key/value heads H=3"),
    ("vjp_query_complex", lambda: selfattn.scaled_dot_product_attention_vjp(Q.astype(complex), K, V), TypeError,
     r"query has dtype complex128, which selfattn cannot compute"),
    ("vjp_call_kwarg", lambda: selfattn.scaled_dot_product_attention_vjp(Q, K, V)[1](np.ones((2, 4, 5, 6)), num_threads=2),
     TypeError, r"unexpected keyword argument 'num_threads'"),
    ("varlen_vjp_return_lse", VL(return_lse=True), TypeError,
     r"varlen_attention_vjp\(\) got an unexpected keyword argument 'return_lse'"),
    ("varlen_vjp_grad_out_shape", VL(lambda o: np.ones(o.shape[:-1] + (5,))), ValueError,
     r"grad_out must have the shape of the forward's output \(4, 5, 6\), got \(4, 5, 5\)"),
    ("varlen_vjp_grad_out_complex", VL(lambda o: np.ones(o.shape, np.complex64)), TypeError,
     r"grad_out must be a real array, got dtype complex64"),
    ("varlen_vjp_cu_end", VL(cu_q=(0, 2, 4)), ValueError, r"cu_seqlens_q must end at the total number of rows 5"),
    ("varlen_vjp_threads_float", VL(num_threads=1.0), TypeError, r"num_threads must be an int, got float"),
    ("varlen_vjp_attn_mask", VL(attn_mask=np.ones((5, 7), bool)), TypeError,
     r"varlen_attention_vjp\(\) got an unexpected keyword argument 'attn_mask'"),
    # ---- quantized K/V (selfattn.quant) and their caches
    ("quantize_kv_nan", lambda: selfattn.quantize_kv(np.array([[1.0, np.nan]])), ValueError,
     r"quantize_kv needs finite values"),
    ("quantize_kv_complex", lambda: selfattn.quantize_kv(np.ones((2, 2), np.complex64)), TypeError,
     r"quantize_kv needs real numbers, got dtype complex64"),
    ("quantize_kv_kind", lambda: selfattn.quantize_kv(K, "int4"), ValueError, r"kv_dtype must be one of \('int8', 'float8_e4m3fn', 'float8_e5m2', 'bfloat16', 'float16'\)"),
    ("dequantize_kv_scales_shape", lambda: selfattn.dequantize_kv(np.zeros((2, 3), np.int8), np.ones(3)), ValueError,
     r"scales must broadcast to the shape of values without its last dim, \(2,\), got \(3,\)"),
    ("sdpa_int8_one_scale", q_(key=K.astype(np.int8), value=V.astype(np.int8), k_scale=np.ones(K.shape[:-1])),
     TypeError, r"k_scale and v_scale go together"),
    ("sdpa_int8_float64_query", q_(key=K.astype(np.int8), value=V.astype(np.int8), k_scale=np.ones(K.shape[:-1]),
                                   v_scale=np.ones(V.shape[:-1])), TypeError,
     r"with int8 key and value the query must be float32, got float64"),
    ("kvcache_int8_float64", lambda: selfattn.KVCache(1, 1, 4, 8, dtype=np.float64, kv_dtype="int8"), TypeError,
     r"an int8 cache \(kv_dtype='int8'\) takes float32 queries"),
    ("quantize_kv_float8_scale", lambda: selfattn.quantize_kv(K, "float8_e4m3fn", scale=0.0), ValueError,
     r"scale must be finite and > 0"),
    ("kvcache_float8_float64", lambda: selfattn.KVCache(1, 1, 4, 8, dtype=np.float64, kv_dtype="float8_e5m2"),
     TypeError, r"a float8_e5m2 cache \(kv_dtype='float8_e5m2'\) takes float32 queries"),
    ("kvcache_kv_scale_not_float8", lambda: selfattn.KVCache(1, 1, 4, 8, kv_dtype="float16", kv_scale=2.0),
     TypeError, r"kv_scale is for a float8 cache \(one scale per head\), got kv_dtype='float16'"),
    ("kvcache_float16_overflow", lambda: selfattn.KVCache(1, 1, 4, 8, kv_dtype="float16").append(
        np.full((1, 1, 1, 8), 1e6), np.zeros((1, 1, 1, 8))), ValueError, r"key has values past float16's range"),
    # ---- block masks (selfattn.flex)
    ("flex_mask_mod_not_callable", lambda: selfattn.create_block_mask(None, 1, 1, 8, 8), TypeError,
     r"mask_mod must be callable \(b, h, q_idx, kv_idx\) -> bool, got NoneType"),
    ("flex_mask_mod_int", lambda: selfattn.create_block_mask(lambda b, h, q, k: q - k, 1, 1, 8, 8), TypeError,
     r"mask_mod must return bool \(True = the query sees the key\), got dtype int64"),
    ("flex_mask_mod_python_and", lambda: selfattn.create_block_mask(lambda b, h, q, k: q > 0 and k > 0, 1, 1, 8, 8),
     TypeError, r"mask_mod raised ValueError: .*not Python's and / or / if"),
    ("flex_Q_LEN_negative", lambda: selfattn.create_block_mask(lambda b, h, q, k: q >= k, 1, 1, -2, 8), ValueError,
     r"Q_LEN must be an integer >= 0, got -2"),
    ("flex_block_size_zero", lambda: selfattn.create_block_mask(lambda b, h, q, k: q >= k, 1, 1, 8, 8, BLOCK_SIZE=0),
     ValueError, r"BLOCK_SIZE must be an integer >= 1, got 0"),
    ("flex_query_3d", lambda: selfattn.flex_attention(Q[0], Q[0], Q[0]), ValueError,
     r"flex_attention: query must be 4-D \(B, Hq, L, E\), got shape \(4, 5, 8\)"),
    ("flex_heads", lambda: selfattn.flex_attention(Q, Q[:, :2], Q[:, :2]), ValueError,
     r"they must be equal \(for grouped-query attention with fewer kv heads, pass enable_gqa=True\)"),
    ("flex_block_mask_array", lambda: selfattn.flex_attention(Q, Q, Q, block_mask=np.ones((5, 5), bool)), TypeError,
     r"flex_attention: block_mask must be a selfattn.BlockMask \(selfattn.create_block_mask\), got numpy.ndarray"),
    ("flex_block_mask_lengths", lambda: selfattn.flex_attention(Q, Q, Q, block_mask=selfattn.create_block_mask(
        lambda b, h, q, k: q >= k, 1, 1, 6, 5)), ValueError,
     r"block_mask was made for Q_LEN=6, KV_LEN=5, but query has L=5 rows and key S=5 keys"),
    ("flex_score_mod", lambda: selfattn.flex_attention(Q, Q, Q, score_mod=lambda s, b, h, q, k: float(s)),
     selfattn.ScoreModTraceError, r"score_mod converts a traced value to a Python float"),
    # ---- paged caches (selfattn.paged)
    ("paged_query_3d", lambda: selfattn.paged_attention(Q[0], PK, PK, PBT, PSL), ValueError,
     r"query must be 4-D \(batch, Hq, n, E\)"),
    ("paged_pages_3d", lambda: selfattn.paged_attention(Q[:, :, :1], PK[0], PK, PBT, PSL), ValueError,
     r"k_pages must be 4-D \(num_blocks, block_size, H, E\), got shape \(4, 2, 8\)"),
    ("paged_E", lambda: selfattn.paged_attention(Q[:, :, :1], PK[..., :5], PK[..., :5], PBT, PSL), ValueError,
     r"query \(2, 4, 1, 8\) and k_pages \(3, 4, 2, 5\) must have the same last dim E"),
    ("paged_dtypes", lambda: selfattn.paged_attention(Q[:, :, :1], PK.astype(np.float32), PK, PBT, PSL), TypeError,
     r"query, k_pages and v_pages must have one dtype .*got query float64, k_pages float32"),
    ("paged_table_float", lambda: selfattn.paged_attention(Q[:, :, :1], PK, PK, PBT.astype(float), PSL), TypeError,
     r"block_table must be a 2-D integer array \(batch, max_blocks\), got dtype float64"),
    ("paged_table_rows", lambda: selfattn.paged_attention(Q[:, :, :1], PK, PK, PBT[:1], PSL), ValueError,
     r"block_table has 1 rows, the query's batch is 2"),
    ("paged_seq_lens_2d", lambda: selfattn.paged_attention(Q[:, :, :1], PK, PK, PBT, PSL[None]), TypeError,
     r"seq_lens must be a 1-D integer array \(batch,\), got shape \(1, 2\)"),
    ("paged_seq_lens_range", lambda: selfattn.paged_attention(Q[:, :, :1], PK, PK, PBT, [9, 1]), ValueError,
     r"seq_lens must be in \[0, max_blocks \* block_size = 2 \* 4 = 8\], got values in \[1, 9\]"),
    ("paged_table_block", lambda: selfattn.paged_attention(Q[:, :, :1], PK, PK, [[0, 3], [1, -1]], PSL), ValueError,
     r"block_table row 0 names a block outside \[0, num_blocks=3\) among the 2 pages its seq_lens=6 uses: \[0, 3\]"),
    ("paged_gqa", lambda: selfattn.paged_attention(Q[:, :3, :1], PK, PK, PBT, PSL), ValueError,
     r"query heads Hq=3 must be a multiple of key/value heads H=2"),
    ("paged_window", lambda: selfattn.paged_attention(Q[:, :, :1], PK, PK, PBT, PSL, window_size=-1), ValueError,
     r"window_size must be >= 0 on each side"),
    ("paged_sinks", lambda: selfattn.paged_attention(Q[:, :, :1], PK, PK, PBT, PSL, sinks=[0, 0, np.nan, 0]),
     ValueError, r"sinks"),
    ("paged_cache_full", lambda: _full_paged_cache(), selfattn.CacheFullError,
     r"the append needs 1 free blocks and 0 are free \(num_blocks=1\).*Nothing was written"),
    ("paged_cache_unknown_seq", lambda: selfattn.PagedKVCache(2, 4, 1, 8).fork(3), KeyError, r"no sequence 3"),
    ("paged_cache_seq_bool", lambda: selfattn.PagedKVCache(2, 4, 1, 8).free(True), TypeError,
     r"a sequence id is an int \(from add_sequence or fork\), got bool"),
    ("paged_cache_block_size", lambda: selfattn.PagedKVCache(2, 0, 1, 8), ValueError, r"block_size must be >= 1, got 0"),
    ("paged_cache_query_dtype", lambda: _one_seq_cache().attend(np.zeros((1, 2, 1, 8)), [0]), TypeError,
     r"query is float64 but the cache computes in float32"),
]


@pytest.mark.parametrize("call,exc,match", [pytest.param(c, e, m, id=i) for i, c, e, m in MISUSE])
def test_misuse(call, exc, match):
    with pytest.raises(exc, match=match) as info:
        call()
    assert type(info.value) is exc, f"raised {type(info.value).__name__}, not exactly {exc.__name__}"


# the structured options' mistakes: the engine, the float64 reference and attention_weights (which
# share selfattn/_spec.py) raise the same exception type with the same message
OPTION_MISTAKES = {i: (exc, match) for i, _, exc, match in MISUSE
                   if i.startswith(("window_", "alignment_", "softcap_"))}
OPTION_KW = {
    "window_negative": dict(window_size=-1), "window_negative_right": dict(window_size=(3, -2)),
    "window_float": dict(window_size=2.0), "window_bool": dict(window_size=True),
    "window_triple": dict(window_size=(1, 2, 3)), "window_side_float": dict(window_size=(1, 2.5)),
    "window_side_str": dict(window_size=("1", None)), "alignment_unknown": dict(alignment="bottom-right"),
    "alignment_none": dict(alignment=None), "softcap_zero": dict(softcap=0.0), "softcap_negative": dict(softcap=-5),
    "softcap_nan": dict(softcap=float("nan")), "softcap_inf": dict(softcap=math.inf),
    "softcap_str": dict(softcap="30"), "softcap_bool": dict(softcap=True),
}


def test_option_mistakes_table_is_complete():
    assert sorted(OPTION_KW) == sorted(OPTION_MISTAKES)


@pytest.mark.parametrize("name", sorted(OPTION_KW))
@pytest.mark.parametrize("entry", ["engine", "reference", "attention_weights"])
def test_option_mistakes_raise_alike_everywhere(name, entry):
    exc, match = OPTION_MISTAKES[name]
    fn = {"engine": lambda **kw: sdpa(Q, K, V, **kw),
          "reference": lambda **kw: reference.scaled_dot_product_attention(Q, K, V, **kw),
          "attention_weights": lambda **kw: selfattn.attention_weights(Q, K, **kw)}[entry]
    with pytest.raises(exc, match=match) as info:
        fn(**OPTION_KW[name])
    assert type(info.value) is exc, f"{entry}: raised {type(info.value).__name__}, not {exc.__name__}"


def test_misuse_ids_unique():
    ids = [m[0] for m in MISUSE]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------- valid calls that look odd

def test_scale_none_is_the_default():
    np.testing.assert_array_equal(sdpa(Q, K, V, scale=None), sdpa(Q, K, V, scale=1 / math.sqrt(8)))


@pytest.mark.parametrize("scale", [0, 0.0, -1.5, 3, np.float32(0.25), np.int64(2), 1e-300])
def test_numeric_scales_accepted(scale):
    out = sdpa(Q, K, V, scale=scale)
    ref = reference.scaled_dot_product_attention(Q, K, V, scale=float(scale))
    assert_sdpa_close(out, ref, np.float64, vmax_of(V), logit_magnitude(Q, K, float(scale)))


@pytest.mark.parametrize("nt", [1, 2, np.int32(3), 10_000])
def test_int_num_threads_accepted(nt):
    np.testing.assert_array_equal(sdpa(Q, K, V, num_threads=nt), sdpa(Q, K, V, num_threads=1))


# ---------------------------------------------------------------- accepted input kinds

def _check_sdpa(make):
    """make(arr) converts a float32 array to the input kind under test."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 5, 8)).astype(np.float32)
    k = rng.standard_normal((2, 7, 8)).astype(np.float32)
    v = rng.standard_normal((2, 7, 3)).astype(np.float32)
    mask = rng.random((5, 7)) < 0.7
    out, lse = sdpa(make(q), make(k), make(v), attn_mask=make(mask), return_lse=True)
    ref, ref_lse = reference.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
    assert isinstance(out, np.ndarray) and isinstance(lse, np.ndarray)
    return out, ref, lse, ref_lse, v, q, k


def test_python_lists_accepted():
    out, ref, lse, ref_lse, v, q, k = _check_sdpa(lambda a: a.tolist())
    # lists of Python floats are float64
    assert_sdpa_close(out, ref, np.float64, vmax_of(v), logit_magnitude(q, k), lse, ref_lse)
    x = np.random.default_rng(6).standard_normal((4, 6))
    w = np.random.default_rng(7).standard_normal((6, 4))
    got = attend(x.tolist(), w.tolist(), w.tolist(), w.tolist(), num_heads=2, wo=w[:4].tolist())
    np.testing.assert_allclose(got, reference.attend(x, w, w, w, num_heads=2, wo=w[:4]), rtol=0, atol=1e-10)


def test_tuples_and_scalars_in_lists_accepted():
    out = sdpa(((1.0, 0.0),), ((1.0, 0.0), (0.0, 1.0)), ((2.0,), (4.0,)))
    ref = reference.scaled_dot_product_attention(np.array([[1.0, 0.0]]), np.eye(2), np.array([[2.0], [4.0]]))
    np.testing.assert_allclose(out, ref, rtol=1e-12)


def test_memmap_accepted(tmp_path):
    counter = iter(range(100))

    def to_memmap(a):
        mm = np.memmap(tmp_path / f"arr{next(counter)}.dat", dtype=a.dtype, mode="w+", shape=a.shape)
        mm[...] = a
        mm.flush()
        return np.memmap(mm.filename, dtype=a.dtype, mode="r", shape=a.shape)   # read-only mapping

    out, ref, lse, ref_lse, v, q, k = _check_sdpa(to_memmap)
    assert type(out) is np.ndarray
    assert_sdpa_close(out, ref, np.float32, vmax_of(v), logit_magnitude(q, k), lse, ref_lse)
    x = np.random.default_rng(8).standard_normal((4, 6)).astype(np.float32)
    w = np.random.default_rng(9).standard_normal((6, 4)).astype(np.float32)
    got = attend(to_memmap(x), to_memmap(w), to_memmap(w), to_memmap(w), num_heads=2)
    np.testing.assert_allclose(got, reference.attend(x, w, w, w, num_heads=2), rtol=0, atol=1e-5)


def test_torch_cpu_tensors_accepted():
    torch = optional_import("torch")
    out, ref, lse, ref_lse, v, q, k = _check_sdpa(lambda a: torch.from_numpy(np.ascontiguousarray(a)))
    assert_sdpa_close(out, ref, np.float32, vmax_of(v), logit_magnitude(q, k), lse, ref_lse)
    # a non-contiguous tensor view
    t = torch.from_numpy(np.random.default_rng(10).standard_normal((7, 2, 8)).astype(np.float32))
    kt = t.transpose(0, 1)
    got = sdpa(torch.from_numpy(q), kt, torch.from_numpy(v))
    ref2 = reference.scaled_dot_product_attention(q, kt.numpy(), v)
    assert_sdpa_close(got, ref2, np.float32, vmax_of(v), logit_magnitude(q, kt.numpy()))
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    w = torch.randn(6, 4, dtype=torch.float64)
    got = attend(x, w, w, w, num_heads=2, wo=w[:4])
    np.testing.assert_allclose(got, reference.attend(x.numpy(), w.numpy(), w.numpy(), w.numpy(), num_heads=2,
                                                     wo=w[:4].numpy()), rtol=0, atol=1e-10)


def test_vjp_accepts_lists_memmaps_and_torch_tensors(tmp_path):
    """The backward takes every input kind the forward takes (for q, k, v and the cotangent)."""
    rng = np.random.default_rng(11)
    q = rng.standard_normal((2, 5, 8)).astype(np.float32)
    k = rng.standard_normal((2, 7, 8)).astype(np.float32)
    v = rng.standard_normal((2, 7, 3)).astype(np.float32)
    out, vjp = selfattn.scaled_dot_product_attention_vjp(q, k, v, is_causal=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    expected = vjp(dout)
    mm = np.memmap(tmp_path / "dout.dat", dtype=np.float32, mode="w+", shape=dout.shape)
    mm[...] = dout
    kinds = {"list": lambda a: a.tolist(), "memmap": lambda a: mm if a is dout else a}
    torch = None
    try:
        torch = optional_import("torch")
    except pytest.skip.Exception:
        pass
    if torch is not None:
        kinds["torch"] = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    for name, make in kinds.items():
        o2, vjp2 = selfattn.scaled_dot_product_attention_vjp(make(q), make(k), make(v), is_causal=True)
        got = vjp2(make(dout))
        assert all(type(g) is np.ndarray for g in got), name
        dtype = np.float64 if name == "list" else np.float32      # lists of Python floats are float64
        for g, e in zip(got, expected):
            assert g.dtype == dtype, name
            np.testing.assert_allclose(g, e, rtol=0, atol=1e-5, err_msg=name)
