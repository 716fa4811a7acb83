"""selfattn.transformers' masks as structure: transformers' boolean masks become is_causal /
window_size / alignment / key_lengths (and at most a (B, 1, 1, S) key mask), exactly.

Each case builds the mask transformers' SDPA builder makes (causal with and without a cache,
sliding windows, left and right padding, a static cache's empty slots, encoders), recognises it,
and checks that selfattn's kernel run on the structure gives what it gives on the dense mask
(and torch's SDPA on its rows that see any key): the structure is the same mask, and the model the
recogniser checks against (implied_mask) is the kernel's. Left padding also has a reversed form
(queries and keys read backwards, the padding at the end as key_lengths), checked the same way.
"""

import inspect

import pytest

from sa_testutil import optional_import

torch = optional_import("torch")
transformers = optional_import("transformers")

import selfattn  # noqa: E402
import selfattn.torch as st  # noqa: E402
import selfattn.transformers as sat  # noqa: E402
from transformers import masking_utils as mu  # noqa: E402

sat.register()

B = 3
# transformers' encoder mask function (its own from 4.58/5.0; the same function written out before)
BIDIRECTIONAL = getattr(mu, "bidirectional_mask_function", lambda batch_idx, head_idx, q_idx, kv_idx: q_idx >= 0)


def _padding(S, pad, left=True):
    m = torch.ones(B, S, dtype=torch.bool)
    for b, p in enumerate(pad):
        if p:
            if left:
                m[b, :p] = False
            else:
                m[b, S - p:] = False
    return m


def _build(**kw):
    kw.setdefault("allow_is_causal_skip", False)
    if "cache_position" in inspect.signature(mu.sdpa_mask).parameters:     # transformers before 5.2x
        q0 = kw.pop("q_offset", 0)
        kw["cache_position"] = torch.arange(q0, q0 + kw.pop("q_length"))
    return sat.mask_builder(batch_size=B, **kw)


W = 4
CASES = {
    # name: (builder kwargs, expected is_causal, expected options, key mask expected)
    "causal": (dict(q_length=10, kv_length=10), True, {"alignment": "top_left"}, False),
    "causal_left_pad": (dict(q_length=10, kv_length=10, attention_mask=_padding(10, (0, 3, 6))),
                        True, {"alignment": "top_left"}, True),
    "causal_right_pad": (dict(q_length=10, kv_length=10, attention_mask=_padding(10, (0, 2, 5), left=False)),
                         True, {"alignment": "top_left", "key_lengths": [10, 8, 5]}, False),
    "chunk_after_cache": (dict(q_length=4, kv_length=10, q_offset=6), True, {"alignment": "bottom_right"}, False),
    "decode_left_pad": (dict(q_length=1, kv_length=10, q_offset=9, attention_mask=_padding(10, (0, 3, 6))),
                        True, {"alignment": "bottom_right"}, True),
    "static_cache_slots": (dict(q_length=3, kv_length=16, q_offset=4, attention_mask=_padding(7, (0, 0, 0))),
                           True, {"alignment": "bottom_right", "key_lengths": 7}, False),
    "window": (dict(q_length=12, kv_length=12, local_size=W, mask_function=mu.sliding_window_causal_mask_function(W)),
               True, {"alignment": "top_left", "window_size": (W - 1, 0)}, False),
    "window_left_pad": (dict(q_length=12, kv_length=12, local_size=W, attention_mask=_padding(12, (0, 2, 7)),
                             mask_function=mu.sliding_window_causal_mask_function(W)),
                        True, {"alignment": "top_left", "window_size": (W - 1, 0)}, True),
    "window_decode_offset": (dict(q_length=1, kv_length=W, q_offset=20, kv_offset=20 - W + 1, local_size=W,
                                  mask_function=mu.sliding_window_causal_mask_function(W)),
                             True, {"alignment": "bottom_right", "window_size": (W - 1, 0)}, False),
    "encoder_right_pad": (dict(q_length=9, kv_length=9, attention_mask=_padding(9, (0, 4, 1), left=False),
                               mask_function=BIDIRECTIONAL),
                          False, {"key_lengths": [9, 5, 8]}, False),
    "encoder_left_pad": (dict(q_length=9, kv_length=9, attention_mask=_padding(9, (0, 4, 1)),
                              mask_function=BIDIRECTIONAL), False, {}, True),
}


def _qkv(L, S, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, L, 8, generator=g, dtype=dtype), torch.randn(B, 2, S, 8, generator=g, dtype=dtype),
            torch.randn(B, 2, S, 8, generator=g, dtype=dtype))


@pytest.mark.parametrize("name", list(CASES))
def test_mask_becomes_structure(name):
    kw, causal, options, key_mask = CASES[name]
    mask = _build(**kw)
    s = getattr(mask, sat._ATTR)
    assert s.is_causal is causal
    got = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in s.options.items()}
    assert got == options
    L, S = kw["q_length"], kw["kv_length"]
    if key_mask:
        assert s.attn_mask is not None and tuple(s.attn_mask.shape) == (B, 1, 1, S)
    else:
        assert s.attn_mask is None
    assert torch.equal(sat.implied_mask(s, B, L, S), mask)
    q, k, v = _qkv(L, S)
    dense = st.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)
    structured = st.scaled_dot_product_attention(q, k, v, s.attn_mask, is_causal=s.is_causal, enable_gqa=True,
                                                 **s.options)
    torch.testing.assert_close(structured, dense, rtol=1e-12, atol=1e-12)
    rows = mask.any(-1, keepdim=True).expand(B, 4, L, 1)          # torch gives NaN for a row without keys
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)
    torch.testing.assert_close(structured[rows.expand_as(ref)], ref[rows.expand_as(ref)], rtol=1e-10, atol=1e-10)
    # left padding after the cache's keys: also the reversed structure, the padding as key_lengths
    if name in ("causal_left_pad", "decode_left_pad", "window_left_pad"):
        f = s.flipped
        assert f is not None and not f.is_causal and f.attn_mask is None
        assert f.options["key_lengths"].tolist() == (S - (~kw["attention_mask"]).sum(-1)).tolist()
        assert f.options["window_size"] == (0, W - 1 if "window" in name else None)
        assert torch.equal(sat.implied_mask(f, B, L, S).flip(-1).flip(-2), mask)
        for isa in selfattn.available_isas():                     # negative strides on every path
            with torch.no_grad(), selfattn.use_isa(isa):
                rev = sat._sdpa(q, k, v, None, is_causal=False, reverse=True, enable_gqa=True, **f.options)
                rev32 = sat._sdpa(q.float(), k.float(), v.float(), None, is_causal=False, reverse=True,
                                  enable_gqa=True, **f.options)
            torch.testing.assert_close(rev, dense, rtol=1e-12, atol=1e-12, msg=isa)
            torch.testing.assert_close(rev32, dense.float(), rtol=1e-5, atol=1e-5, msg=isa)
    else:
        assert s.flipped is None


def test_other_masks_stay_dense():
    """Chunked attention (Llama 4) is not a structure selfattn has: no Structure, the mask read as is."""
    left = torch.zeros(B, dtype=torch.long)
    mask = _build(q_length=12, kv_length=12, mask_function=mu.chunked_causal_mask_function(4, left))
    assert not hasattr(mask, sat._ATTR)
    assert sat.recognise(mask, 0) is None
    # a mask that is not transformers' boolean (B, 1, L, S): nothing to recognise
    assert sat.recognise(torch.zeros(B, 1, 4, 4), 0) is None
    assert sat.recognise(mask[:, 0], 0) is None


def test_the_check_refuses_a_near_miss():
    """One entry flipped in a causal mask: the proposed structure no longer gives it, so None."""
    mask = _build(q_length=10, kv_length=10).clone()
    assert sat.recognise(mask, 0) is not None
    mask[1, 0, 7, 8] = True                       # a future key let in
    assert sat.recognise(mask, 0) is None
    mask = _build(q_length=10, kv_length=10, attention_mask=_padding(10, (0, 3, 6))).clone()
    mask[2, 0, 9, 7] = False                      # a hole: key 7 seen by query 8, not 9
    assert sat.recognise(mask, 0) is None
