"""selfattn.transformers.new_cache(paged=True): generate() on selfattn.PagedKVCache's pages.

Each layer's keys and values in a PagedKVCache, one sequence per batch row, appended in place; the
attention (attn_implementation="selfattn") reads the pages. The greedy tokens are those of the dense
new_cache and of sdpa (float32; bfloat16: the dense cache's and transformers' DynamicCache's under
selfattn), GQA, sliding windows, softcap and sinks included; with no left padding the logits are the
dense cache's bit for bit, float, int8, bfloat16 or float16 K/V (the kernels' contract: paged equals
dense at the same kv_dtype), and with it within float32's rounding (the dense path reads left-padded
rows backwards: its sums run in another order); float8 pages within float8's rounding. Crop, beam search's reorder, batch selection and repetition keep
the rows the dense cache keeps; blocks running out, masks the pages cannot take, a padding that
changes and another attention implementation are clear errors.
"""

import numpy as np
import pytest

from sa_testutil import cache_kw, optional_import

torch = optional_import("torch")
transformers = optional_import("transformers")

import selfattn  # noqa: E402
import selfattn.transformers as sat  # noqa: E402

NAME = sat.register()
PADS = [0, 4, 7]                        # _batch's left padding per row


def _model(cls="LlamaForCausalLM", cfg="LlamaConfig", dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    kw = dict(dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16), **kw)
    config = getattr(transformers, cfg)(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        max_position_embeddings=256, **kw)
    return getattr(transformers, cls)(config).to(dtype).eval()


def _gpt_oss():
    """gpt-oss: attention sinks (s_aux), alternating sliding (window 8) and full layers, GQA."""
    torch.manual_seed(0)
    config = transformers.GptOssConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                                       sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)         # sinks that matter
    return model


ARCHS = {
    "llama": lambda dtype=torch.float32: _model(dtype=dtype),
    "mistral_window": lambda dtype=torch.float32: _model("MistralForCausalLM", "MistralConfig", dtype, sliding_window=5),
    "gemma2_softcap": lambda dtype=torch.float32: _model(      # alternating sliding (window 8) and full layers
        "Gemma2ForCausalLM", "Gemma2Config", dtype, attn_logit_softcapping=2.0, final_logit_softcapping=None,
        query_pre_attn_scalar=1,                               # scale 1: logits the softcap bends
        sliding_window=8),
    "gpt_oss_sinks": lambda dtype=torch.float32: _gpt_oss(),
}


def _batch(rows):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    for b, pad in enumerate(PADS):
        mask[b, :pad] = 0
    return ids[:rows], mask[:rows]


def _generate(model, impl, cache=None, rows=3, **kw):
    model.set_attn_implementation(impl)
    ids, mask = _batch(rows)
    extra = {} if cache is None else cache_kw(model, cache)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                              output_logits=True, **kw, **extra)


def _paged_keys(layer):
    """A paged layer's keys as transformers counts positions, (B, H, length, E): each row's stored keys
    after its left padding (zeros there, where nothing is stored)."""
    p = layer.pages
    out = np.zeros((len(layer.seq_ids), p.num_kv_heads, layer.length, p.head_dim), p.k_pages.dtype)
    for b, (s, pad) in enumerate(zip(layer.seq_ids, layer.left_padding.tolist())):
        out[b, :, pad:] = p.keys(s)
    return out


def _check_blocks(layer):
    """Every block is free or held by a sequence of the layer (no leak), each sequence holding exactly
    the blocks its positions need."""
    p = layer.pages
    bt, lens = p.block_table(layer.seq_ids)
    held = set(bt[bt >= 0].tolist())
    assert p.num_free_blocks + len(held) == p.num_blocks
    assert ((bt >= 0).sum(1) == -(-lens // p.block_size)).all()
    assert (lens + layer.left_padding == layer.length).all()


def _same_rows(dense, paged):
    """The paged cache holds what the dense one does, row by row past each row's left padding: layer 0's
    keys (from the embeddings) bit for bit, the next layer's within float32's rounding (left-padded,
    the dense cache's attention sums in another order)."""
    assert paged.get_seq_length() == dense.get_seq_length()
    for i, (ld, lp) in enumerate(zip(dense.layers, paged.layers)):
        got, want = _paged_keys(lp), ld.kv.keys
        assert got.shape == want.shape
        for b, pad in enumerate(lp.left_padding.tolist()):
            if i == 0:
                np.testing.assert_array_equal(got[b, :, pad:], want[b, :, pad:])
            else:
                np.testing.assert_allclose(got[b, :, pad:], want[b, :, pad:], rtol=1e-5, atol=1e-6)
        _check_blocks(lp)


def _logits_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


def _logits_close(a, b, rtol=1e-5):
    return all((x - y).abs().max().item() <= rtol * y.abs().max().item() for x, y in zip(a.logits, b.logits))


@pytest.mark.parametrize("rows", [1, 3], ids=["batch1", "left_padded"])
@pytest.mark.parametrize("arch", ["llama", "mistral_window"])
def test_same_tokens_as_dense_cache_and_sdpa_appended_in_place(arch, rows):
    model = ARCHS[arch]()
    ref = _generate(model, "sdpa", rows=rows, max_new_tokens=20)
    dense = _generate(model, NAME, sat.new_cache(model.config, max_len=31), rows=rows, max_new_tokens=20)
    cache = sat.new_cache(model.config, max_len=31, paged=True, block_size=4)
    layer = cache.layers[0]
    seen = []                                   # every step: the same pool, the same memory
    model.model.layers[0].self_attn.register_forward_hook(
        lambda *a: seen.append((id(layer.pages), layer.pages.k_pages.ctypes.data, layer.length)))
    got = _generate(model, NAME, cache, rows=rows, max_new_tokens=20)
    assert torch.equal(got.sequences, ref.sequences) and torch.equal(got.sequences, dense.sequences)
    if rows == 1:
        assert _logits_equal(got, dense)         # the same kernel's bits from pages as from the dense cache
    else:
        assert _logits_close(got, dense)
    assert len(seen) == 20 and len({s[:2] for s in seen}) == 1 and [s[2] for s in seen] == list(range(11, 31))
    assert isinstance(layer.pages, selfattn.PagedKVCache) and layer.keys is None
    pads = np.array(PADS[:rows])
    assert layer.left_padding.tolist() == pads.tolist()                 # left padding is not stored
    assert [layer.pages.seq_len(s) for s in layer.seq_ids] == (30 - pads).tolist()
    assert layer.pages.num_blocks == rows * 8                           # batch x ceil(31 / 4)
    _check_blocks(layer)


@pytest.mark.parametrize("rows", [1, 3], ids=["batch1", "left_padded"])
@pytest.mark.parametrize("arch", ["gemma2_softcap", "gpt_oss_sinks"])
def test_softcap_and_sinks(arch, rows):
    """Gemma 2's softcap and gpt-oss's sinks in the paged kernel, over alternating sliding and full layers:
    the tokens of eager attention (transformers' sdpa takes neither) and of the dense cache."""
    model = ARCHS[arch]()
    ref = _generate(model, "eager", rows=rows, max_new_tokens=16)
    dense = _generate(model, NAME, sat.new_cache(model.config, max_len=27), rows=rows, max_new_tokens=16)
    got = _generate(model, NAME, sat.new_cache(model.config, max_len=27, paged=True), rows=rows, max_new_tokens=16)
    assert torch.equal(got.sequences, ref.sequences) and torch.equal(got.sequences, dense.sequences)
    assert _logits_equal(got, dense) if rows == 1 else _logits_close(got, dense)


@pytest.mark.parametrize("rows", [1, 3], ids=["batch1", "left_padded"])
def test_bfloat16(rows):
    """bfloat16 pages: the tokens of the dense cache and of transformers' DynamicCache under selfattn
    (sdpa's own bfloat16 rounding picks other near-ties on this random model); no padding: the dense
    cache's logits bit for bit."""
    optional_import("ml_dtypes")
    model = _model(dtype=torch.bfloat16)
    dynamic = _generate(model, NAME, rows=rows, max_new_tokens=12)
    dense = _generate(model, NAME, sat.new_cache(model.config, max_len=23), rows=rows, max_new_tokens=12)
    cache = sat.new_cache(model.config, max_len=23, paged=True)
    got = _generate(model, NAME, cache, rows=rows, max_new_tokens=12)
    assert cache.layers[0].pages.k_pages.dtype.name == "bfloat16"
    assert torch.equal(got.sequences, dense.sequences) and torch.equal(got.sequences, dynamic.sequences)
    if rows == 1:
        assert _logits_equal(got, dense)
    else:
        assert _logits_close(got, dense, rtol=2 ** -7)


@pytest.mark.parametrize("rows", [1, 3], ids=["batch1", "left_padded"])
def test_int8_pages(rows):
    """kv_dtype="int8" paged: quantized as appended (one scale per position and kv head), read as stored;
    the dense int8 cache's tokens, and its logits bit for bit without padding."""
    model = _model()
    dense = _generate(model, NAME, sat.new_cache(model.config, max_len=23, kv_dtype="int8"), rows=rows,
                      max_new_tokens=12)
    cache = sat.new_cache(model.config, max_len=23, kv_dtype="int8", paged=True, block_size=8)
    got = _generate(model, NAME, cache, rows=rows, max_new_tokens=12)
    pages = cache.layers[0].pages
    assert pages.kv_dtype == "int8" and pages.k_pages.dtype == np.int8 and pages.k_scales is not None
    assert torch.equal(got.sequences, dense.sequences)
    assert _logits_equal(got, dense) if rows == 1 else _logits_close(got, dense)


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
def test_16_bit_pages_under_a_float32_model(kv_dtype):
    """kv_dtype bfloat16 / float16 (a float32 model's K/V stored in half the bytes): the dense cache's
    tokens and logits, bit for bit."""
    optional_import("ml_dtypes")
    model = _model()
    dense = _generate(model, NAME, sat.new_cache(model.config, max_len=23, kv_dtype=kv_dtype), rows=1,
                      max_new_tokens=12)
    cache = sat.new_cache(model.config, max_len=23, kv_dtype=kv_dtype, paged=True)
    got = _generate(model, NAME, cache, rows=1, max_new_tokens=12)
    assert cache.layers[0].pages.k_pages.dtype.name == kv_dtype
    assert torch.equal(got.sequences, dense.sequences) and _logits_equal(got, dense)


@pytest.mark.parametrize("kv_dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_float8_pages(kv_dtype):
    """float8 pages, one scale per kv head set by the batch's first rows (and set again by the next
    batch's, after reset): fed the float cache's tokens, the logits stay within float8's rounding of
    the float cache's (3 mantissa bits: a few % of the largest; this random model's near-ties flip
    free-running greedy tokens)."""
    optional_import("ml_dtypes")
    model = _model()
    ref = _generate(model, NAME, sat.new_cache(model.config, max_len=23, paged=True), max_new_tokens=12)
    cache = sat.new_cache(model.config, max_len=23, kv_dtype=kv_dtype, paged=True)
    ids, mask = _batch(3)
    tokens, err = ref.sequences, []
    with torch.no_grad():
        for t in range(12):                     # the prompt, then one token at a time, teacher-forced
            n = 11 + t
            step = tokens[:, :n] if t == 0 else tokens[:, n - 1:n]
            m = torch.cat([mask, torch.ones(3, t, dtype=mask.dtype)], 1)
            pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 1)[:, -step.shape[1]:]      # as generate() numbers them
            logits = model(step, attention_mask=m, position_ids=pos, use_cache=True,
                           **cache_kw(model, cache)).logits[:, -1]
            want = ref.logits[t]
            err.append((logits - want).abs().max().item() / want.abs().max().item())
    print(f"{kv_dtype} pages: the logits' largest error per step, relative to the largest logit: {err}")
    assert max(err) <= (0.05 if kv_dtype == "float8_e4m3fn" else 0.1)        # measured 0.023 and 0.067
    pages = cache.layers[0].pages
    assert pages.k_pages.dtype.name == kv_dtype and pages.k_scales.shape == (2,)       # one per kv head
    # a new batch after reset: its own scales, as a new cache's
    scales = pages.k_scales.copy()
    cache.reset()
    fresh = sat.new_cache(model.config, max_len=23, kv_dtype=kv_dtype, paged=True)
    other = torch.tensor([[1, 2, 3, 4, 5]] * 3)              # the same batch size: the same pool
    with torch.no_grad():
        model(other, use_cache=True, **cache_kw(model, cache))
        model(other, use_cache=True, **cache_kw(model, fresh))
    assert np.array_equal(cache.layers[0].pages.k_scales, fresh.layers[0].pages.k_scales)
    assert not np.array_equal(cache.layers[0].pages.k_scales, scales)


@pytest.mark.parametrize("kv_dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_float8_dense_cache(kv_dtype):
    """The dense new_cache(kv_dtype=float8): one scale per sequence and kv head (set by its first
    rows); the float8 views reach the attention with their scales. Fed the float cache's tokens,
    the logits stay within float8's rounding of the float cache's (as the pages' test)."""
    optional_import("ml_dtypes")
    model = _model()
    ref = _generate(model, NAME, sat.new_cache(model.config, max_len=23), max_new_tokens=12)
    cache = sat.new_cache(model.config, max_len=23, kv_dtype=kv_dtype)
    ids, mask = _batch(3)
    tokens, err = ref.sequences, []
    with torch.no_grad():
        for t in range(12):
            n = 11 + t
            step = tokens[:, :n] if t == 0 else tokens[:, n - 1:n]
            m = torch.cat([mask, torch.ones(3, t, dtype=mask.dtype)], 1)
            pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 1)[:, -step.shape[1]:]
            logits = model(step, attention_mask=m, position_ids=pos, use_cache=True,
                           **cache_kw(model, cache)).logits[:, -1]
            want = ref.logits[t]
            err.append((logits - want).abs().max().item() / want.abs().max().item())
    print(f"{kv_dtype} dense cache: the logits' largest error per step, relative to the largest logit: {err}")
    assert max(err) <= (0.05 if kv_dtype == "float8_e4m3fn" else 0.1)
    kv = cache.layers[0].kv
    assert kv.keys.dtype.name == kv_dtype and kv.key_scales.shape == (3, 2, 1)
    assert cache.layers[0].keys.dtype == getattr(torch, kv_dtype)


def test_beam_search_forks_and_frees():
    """Beam search's reorder every step: forks of the beams kept (blocks shared, copied when written), the
    old sequences freed; the tokens are sdpa's, and no block leaks."""
    model = _model()
    ref = _generate(model, "sdpa", max_new_tokens=8, num_beams=3)
    cache = sat.new_cache(model.config, max_len=19, paged=True, block_size=4)
    got = _generate(model, NAME, cache, max_new_tokens=8, num_beams=3)
    assert torch.equal(got.sequences, ref.sequences)
    layer = cache.layers[0]
    assert len(layer.seq_ids) == 9 and layer.pages.num_blocks == 9 * 5
    assert layer.left_padding.tolist() == np.repeat(PADS, 3).tolist()
    _check_blocks(layer)


@pytest.mark.parametrize("assistant_seed", [0, 1], ids=["accepts_all", "rejects"])
def test_assisted_decoding_crops(assistant_seed):
    """Assisted decoding rolls the cache back with crop(-rejected) (crop(0) when all are accepted: an
    assistant with the model's weights); greedy, it gives the model's own tokens."""
    model, assistant = _model(), _model(seed=assistant_seed)
    ref = _generate(model, "sdpa", rows=1, max_new_tokens=16)
    cache = sat.new_cache(model.config, max_len=40, paged=True, block_size=4)
    got = _generate(model, NAME, cache, rows=1, max_new_tokens=16, assistant_model=assistant)
    assert torch.equal(got.sequences, ref.sequences)
    _check_blocks(cache.layers[0])


def test_crop_select_repeat_reorder_then_decode():
    """Cache.crop / batch_select_indices / batch_repeat_interleave / reorder_cache on the pages keep
    the rows the dense cache keeps (crop: PagedKVCache.crop; the others: forks); a step after them
    attends to the same keys (forks sharing a block copy it when they append: apart again)."""
    model = _model()
    dense = sat.new_cache(model.config, max_len=40)
    paged = sat.new_cache(model.config, max_len=40, paged=True, block_size=4)
    _generate(model, NAME, dense, max_new_tokens=6)
    _generate(model, NAME, paged, max_new_tokens=6)
    _same_rows(dense, paged)
    ops = [(lambda c: c.crop(-2), [0, 1, 2]),
           (lambda c: c.crop(0), [0, 1, 2]),              # nothing, as transformers' own crop(0)
           (lambda c: c.batch_select_indices(torch.tensor([2, 0])), [2, 0]),
           (lambda c: c.batch_repeat_interleave(2), [2, 2, 0, 0]),
           (lambda c: c.reorder_cache(torch.tensor([3, 0, 1, 2])), [0, 2, 2, 0])]
    for op, rows in ops:
        op(dense)
        op(paged)
        _same_rows(dense, paged)
        assert paged.layers[1].left_padding.tolist() == [PADS[r] for r in rows]
    assert paged.get_seq_length() == 14
    shared = paged.layers[0].pages.block_table(paged.layers[0].seq_ids)[0]
    assert shared[0, -1] == shared[3, -1]       # rows 0 and 3: forks of one row, its last block shared

    def step(cache, tokens):
        S = cache.get_seq_length()
        mask = torch.ones(4, S + 1, dtype=torch.long)
        for b, pad in enumerate(paged.layers[0].left_padding.tolist()):
            mask[b, :pad] = 0
        with torch.no_grad():
            return model(tokens, attention_mask=mask, use_cache=True, **cache_kw(model, cache)).logits

    tokens = torch.tensor([[5], [6], [7], [8]])
    a, b = step(dense, tokens), step(paged, tokens)
    assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()
    _same_rows(dense, paged)
    # cropped into the padding: rows left with padding only, which the next mask still shows
    dense.crop(-10)
    paged.crop(-10)
    assert paged.layers[0].left_padding.tolist() == [0, 5, 5, 0]
    _same_rows(dense, paged)
    a, b = step(dense, tokens), step(paged, tokens)
    assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()
    # reset: every block back in the pool, the next generate a new batch
    paged.reset()
    assert paged.get_seq_length() == 0 and paged.layers[0].pages.num_free_blocks == paged.layers[0].pages.num_blocks
    assert torch.equal(_generate(model, NAME, paged, rows=1, max_new_tokens=4).sequences,
                       _generate(model, "sdpa", rows=1, max_new_tokens=4).sequences)


def test_blocks_running_out():
    """The pool never grows: too few blocks is selfattn.CacheFullError naming max_len / num_blocks, with
    nothing written (at the first step: the layer as new; later: the layer as it was)."""
    model = _model()
    cache = sat.new_cache(model.config, max_len=40, paged=True, block_size=4, num_blocks=5)
    with pytest.raises(selfattn.CacheFullError, match=r"num_blocks=5\): a layer's pool of 5 blocks is full"):
        _generate(model, NAME, cache, max_new_tokens=2)
    layer = cache.layers[0]
    assert layer.length == 0 and layer.seq_ids == [] and layer.pages.num_free_blocks == 5
    # sized from max_len (batch x ceil(max_len / block_size)): a max_len too small runs out while decoding
    cache = sat.new_cache(model.config, max_len=12, paged=True, block_size=4)       # 3 x 3 blocks
    with pytest.raises(selfattn.CacheFullError, match="larger max_len"):
        _generate(model, NAME, cache, max_new_tokens=8)
    layer = cache.layers[0]
    before = (layer.length, [layer.pages.seq_len(s) for s in layer.seq_ids], layer.pages.k_pages.copy())
    with pytest.raises(selfattn.CacheFullError):
        layer.update(torch.zeros(3, 2, 1, 16), torch.zeros(3, 2, 1, 16))
    assert (layer.length, [layer.pages.seq_len(s) for s in layer.seq_ids]) == tuple(before[:2])
    np.testing.assert_array_equal(layer.pages.k_pages, before[2])
    # exactly enough: every block used
    cache = sat.new_cache(model.config, max_len=15, paged=True, block_size=5)
    _generate(model, NAME, cache, rows=1, max_new_tokens=5)
    assert cache.layers[1].pages.num_free_blocks == 0


def test_inputs_untouched():
    """Neither generate()'s inputs nor the states handed to the cache and to the attention are written."""
    model = _model()
    ids, mask = _batch(3)
    ids0, mask0 = ids.clone(), mask.clone()
    model.set_attn_implementation(NAME)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, max_new_tokens=4,
                       **cache_kw(model, sat.new_cache(model.config, max_len=15, paged=True)))
    assert torch.equal(ids, ids0) and torch.equal(mask, mask0)
    cache = sat.new_cache(model.config, max_len=8, paged=True)
    g = torch.Generator().manual_seed(5)
    k, v, q = (torch.randn(2, 2, 6, 16, generator=g), torch.randn(2, 2, 6, 16, generator=g),
               torch.randn(2, 4, 6, 16, generator=g))
    k0, v0, q0 = k.clone(), v.clone(), q.clone()
    with torch.no_grad():
        keys, values = cache.update(k, v, 0)
        assert keys.device.type == "meta" and tuple(keys.shape) == (2, 2, 6, 16)
        out, _ = sat.attention_forward(model.model.layers[0].self_attn, q, keys, values, None, scaling=0.25)
        want, _ = sat.attention_forward(model.model.layers[0].self_attn, q, k, v, None, scaling=0.25)
    assert torch.equal(k, k0) and torch.equal(v, v0) and torch.equal(q, q0)
    assert torch.equal(out, want)               # causal prefill from the pages: the dense call's bits


def test_clear_errors():
    model = _model()
    for kw, exc, msg in [(dict(paged=1), TypeError, "paged must be a bool"),
                         (dict(block_size=8), ValueError, "pass paged=True"),
                         (dict(num_blocks=8), ValueError, "pass paged=True"),
                         (dict(paged=True), ValueError, "sizes its pool from max_len"),
                         (dict(paged=True, max_len=8, block_size=0), ValueError, "block_size must be >= 1"),
                         (dict(paged=True, num_blocks=0), ValueError, "num_blocks must be >= 1"),
                         (dict(paged=True, max_len=8.0), TypeError, "max_len must be an int"),
                         (dict(paged=True, max_len=8, kv_dtype="int4"), ValueError, "kv_dtype must be one of")]:
        with pytest.raises(exc, match=msg):
            sat.new_cache(model.config, **kw)
    # another attention implementation cannot read the pages: refused before anything is stored
    cache = sat.new_cache(model.config, max_len=30, paged=True)
    with pytest.raises(ValueError, match="this model runs 'sdpa'"):
        _generate(model, "sdpa", cache, max_new_tokens=2)
    assert cache.get_seq_length() == 0 and cache.layers[0].pages is None
    # training: no autograd history in the cache
    model.train()
    ids, mask = _batch(3)
    with pytest.raises(NotImplementedError, match="use_cache=False"):
        model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kw(model, cache))
    model.eval()
    # int8 pages take a float32 model's K/V
    f16 = _model(dtype=torch.float16)             # (float16: no ml_dtypes needed for its arrays)
    with pytest.raises(TypeError, match="holds a float32 model's keys"):
        _generate(f16, NAME, sat.new_cache(f16.config, max_len=30, kv_dtype="int8", paged=True), max_new_tokens=2)
    # masks the pages cannot take: padding not on the left, right padding, a caller's 4-D mask
    model.set_attn_implementation(NAME)
    hole = torch.ones(3, 11, dtype=torch.long)
    hole[1, 5] = 0
    right = torch.ones(3, 11, dtype=torch.long)
    right[1, 8:] = 0
    four_d = torch.ones(3, 1, 11, 11, dtype=torch.bool).tril()
    for m, msg in [(hole, "padding other than on the left"), (right, "right padding"), (four_d, "4-D mask")]:
        with pytest.raises(NotImplementedError, match=msg), torch.no_grad():
            model(input_ids=ids, attention_mask=m, use_cache=True,
                  **cache_kw(model, sat.new_cache(model.config, max_len=30, paged=True)))
    # a later mask whose left padding is not the first one's (the padded positions were never stored)
    cache = sat.new_cache(model.config, max_len=30, paged=True)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kw(model, cache))
        later = torch.ones(3, 12, dtype=torch.long)
        later[2, :9] = 0
        with pytest.raises(NotImplementedError, match=r"left padding \[0, 0, 9\] is not the one"):
            model(input_ids=ids[:, :1], attention_mask=later, use_cache=True, **cache_kw(model, cache))
    # keys changed on their way to the attention (a placeholder without its cache), or kept from a past step
    layer = cache.layers[0]
    q = torch.zeros(3, 4, 1, 16)
    with torch.no_grad():
        keys, values = cache.update(torch.zeros(3, 2, 1, 16), torch.zeros(3, 2, 1, 16), 0)
        with pytest.raises(TypeError, match="placeholder on the meta device"):
            sat.attention_forward(None, q, keys[:, :, 1:], values, None)
        layer.crop(-1)
        with pytest.raises(ValueError, match="from an earlier state of their paged cache"):
            sat.attention_forward(None, q, keys, values, None)
