"""selfattn.transformers.new_cache(): a transformers Cache over selfattn's KVCache for generate().

The same tokens as transformers' own DynamicCache (left-padded batches, GQA, sliding windows, beam
search, a capacity that has to grow, bfloat16 bit for bit), the keys written in place into the
preallocated buffer (the layer's keys stay one view of it from the first step to the last), and
clear errors where it does not apply.
"""

import pytest

from sa_testutil import cache_kw, optional_import

torch = optional_import("torch")
transformers = optional_import("transformers")

import selfattn  # noqa: E402
import selfattn.transformers as sat  # noqa: E402

NAME = sat.register()


def _model(cls="LlamaForCausalLM", cfg="LlamaConfig", dtype=torch.float32, **kw):
    torch.manual_seed(0)
    config = getattr(transformers, cfg)(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=256, **kw)
    return getattr(transformers, cls)(config).to(dtype).eval()


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return ids, mask


def _generate(model, impl, cache=None, **kw):
    model.set_attn_implementation(impl)
    ids, mask = _batch()
    extra = {} if cache is None else cache_kw(model, cache)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, **kw, **extra)


@pytest.mark.parametrize("arch", ["llama", "mistral_window"])
def test_same_tokens_as_dynamic_cache_written_in_place(arch):
    kw = dict(cls="MistralForCausalLM", cfg="MistralConfig", sliding_window=5) if arch == "mistral_window" else {}
    model = _model(**kw)
    ref = _generate(model, "sdpa", max_new_tokens=20)
    cache = sat.new_cache(model.config, max_len=11 + 20)
    ptrs = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *a: ptrs.append(cache.layers[0].keys.data_ptr()))
    got = _generate(model, NAME, cache, max_new_tokens=20)
    assert torch.equal(got, ref)
    layer = cache.layers[0]
    assert isinstance(layer.kv, selfattn.KVCache) and layer.kv.max_len == 31       # never reallocated
    assert layer.kv.lengths.tolist() == [30, 30, 30]               # the last token is not fed back
    assert len(ptrs) == 20 and len(set(ptrs)) == 1                  # every step: a view of the same buffer
    assert layer.keys.shape == (3, 2, 30, 16) and layer.keys.data_ptr() == ptrs[0]


def test_capacity_grows_and_beam_search():
    model = _model()
    cache = sat.new_cache(model.config, max_len=4)                 # smaller than the prompt
    assert torch.equal(_generate(model, NAME, cache, max_new_tokens=12), _generate(model, "sdpa", max_new_tokens=12))
    assert cache.layers[0].kv.max_len >= 22
    ref = _generate(model, "sdpa", max_new_tokens=8, num_beams=3)
    got = _generate(model, NAME, sat.new_cache(model.config), max_new_tokens=8, num_beams=3)
    assert torch.equal(got, ref)


def test_without_a_config_and_in_bfloat16_bit_for_bit():
    """No config: layers made as transformers asks for them. bfloat16: the cache holds bfloat16 and the
    logits are DynamicCache's with selfattn's attention, bit for bit (the same numbers, other memory)."""
    optional_import("ml_dtypes")
    model = _model(dtype=torch.bfloat16)
    kw = dict(max_new_tokens=10, return_dict_in_generate=True, output_logits=True)
    ref = _generate(model, NAME, **kw)
    cache = sat.new_cache()
    got = _generate(model, NAME, cache, **kw)
    assert len(cache.layers) == 2 and cache.layers[0].kv.dtype.name == "bfloat16"
    assert torch.equal(got.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, ref.logits))


def test_clear_errors():
    model = _model().train()
    ids, mask = _batch()
    with pytest.raises(NotImplementedError, match="use_cache=False"):
        _ = model.set_attn_implementation(NAME) or model(input_ids=ids, attention_mask=mask, use_cache=True,
                                                          **cache_kw(model, sat.new_cache(model.config)))
    config = transformers.LlamaConfig(num_hidden_layers=2)
    config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(NotImplementedError, match="linear_attention"):
        sat.new_cache(config)


def test_crop_select_repeat_in_place_of_copies():
    """Cache.crop / batch_select_indices / batch_repeat_interleave / reorder_cache go to the KVCache
    (KVCache.crop, KVCache.reorder): the layer's keys afterwards are what DynamicLayer would hold."""
    model = _model()
    cache = sat.new_cache(model.config, max_len=40)
    _generate(model, NAME, cache, max_new_tokens=6)
    layer = cache.layers[0]
    before = layer.keys.clone()
    cache.crop(-2)                                                   # drop the last 2 positions
    assert layer.keys.shape[-2] == before.shape[-2] - 2 and torch.equal(layer.keys, before[..., :-2, :])
    cache.batch_select_indices(torch.tensor([2, 0]))
    assert layer.kv.batch == 2 and torch.equal(layer.keys, before[[2, 0], :, :-2])
    cache.batch_repeat_interleave(2)
    assert torch.equal(layer.keys, before[[2, 2, 0, 0], :, :-2])
    cache.reorder_cache(torch.tensor([3, 0, 1, 2]))
    assert torch.equal(layer.keys, before[[0, 2, 2, 0], :, :-2]) and isinstance(layer.kv, selfattn.KVCache)


def test_assisted_decoding_crops_like_dynamic_cache():
    """Assisted decoding rolls the cache back with crop(-rejected): crop(0) when every candidate is
    accepted (an assistant with the model's own weights), which removes nothing in transformers 5 (it
    emptied the cache here once: other tokens, silently). The tokens are sdpa's with DynamicCache."""
    model, assistant = _model(), _model()
    ids = _batch()[0][:1]                       # assisted decoding takes one sequence
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model.generate(ids, do_sample=False, max_new_tokens=16, pad_token_id=0)
        model.set_attn_implementation(NAME)
        cache = sat.new_cache(model.config, max_len=40)
        got = model.generate(ids, do_sample=False, max_new_tokens=16, pad_token_id=0, assistant_model=assistant,
                             **cache_kw(model, cache))
    assert torch.equal(got, ref)
    # crop(0) as transformers' own DynamicCache does it, whatever its version says 0 means
    dyn = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, use_cache=True, **cache_kw(model, dyn))
    n = cache.get_seq_length()
    dyn_n = dyn.get_seq_length()
    cache.crop(0)
    dyn.crop(0)
    assert cache.get_seq_length() == (n if dyn.get_seq_length() == dyn_n else 0)


def test_int8_cache():
    """kv_dtype="int8": the keys and values stored quantized (a quarter of the memory), the attention
    the kernels' int8 path -- equal to float attention over the dequantized K/V -- left padding and
    GQA included; the tokens those of the float cache here, the logits within int8's rounding."""
    model = _model()
    kw = dict(max_new_tokens=12, return_dict_in_generate=True, output_logits=True)
    ref = _generate(model, NAME, sat.new_cache(model.config, max_len=30), **kw)
    cache = sat.new_cache(model.config, max_len=30, kv_dtype="int8")
    got = _generate(model, NAME, cache, **kw)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        assert (a - b).abs().max().item() < 0.02 * b.abs().max().item()
    kv = cache.layers[0].kv
    assert kv.kv_dtype == "int8" and kv.keys.dtype.name == "int8" and kv.lengths.tolist() == [22, 22, 22]
    # one layer's attention on the int8 views against float attention on the dequantized K/V
    layer = cache.layers[0]
    q = torch.randn(3, 4, 1, 16)
    k8, v8 = layer.keys, layer.values
    kd = torch.from_numpy(selfattn.dequantize_kv(kv.keys, kv.key_scales))
    vd = torch.from_numpy(selfattn.dequantize_kv(kv.values, kv.value_scales))
    with torch.no_grad():
        out8, _ = sat.attention_forward(model.model.layers[0].self_attn, q, k8, v8, None, scaling=0.25)
        outf, _ = sat.attention_forward(model.model.layers[0].self_attn, q, kd, vd, None, scaling=0.25)
    assert (out8 - outf).abs().max().item() < 1e-5
    # beam search (reorders: the scales move with their positions) and a capacity that grows
    ref = _generate(model, NAME, sat.new_cache(model.config, max_len=4), max_new_tokens=8, num_beams=3)
    got = _generate(model, NAME, sat.new_cache(model.config, max_len=4, kv_dtype="int8"), max_new_tokens=8, num_beams=3)
    assert torch.equal(got, ref)


def test_int8_cache_errors():
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        sat.new_cache(None, kv_dtype="int4")
    model = _model(dtype=torch.float16)           # (float16: no ml_dtypes needed for its arrays)
    with pytest.raises(TypeError, match="holds a float32 model's keys"):
        _generate(model, NAME, sat.new_cache(model.config, kv_dtype="int8"), max_new_tokens=2)
    k8 = torch.zeros(1, 2, 5, 16, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8 keys reach attn_implementation='selfattn' only from"):
        sat.attention_forward(None, torch.zeros(1, 4, 1, 16), k8, k8, None)
