"""selfattn inside Hugging Face transformers: attn_implementation="selfattn" against "sdpa" / "eager".

Small randomly initialised models of the architectures the registration must serve (Llama with
grouped-query heads, Mistral's sliding window, Gemma 2's softcap), built from their configs: no
download. The same weights run with transformers' own attention and with selfattn's; logits agree to
float32 noise, greedy generation token for token, gradients of a training step to float32 noise.
"""

import numpy as np
import pytest

from sa_testutil import optional_import

torch = optional_import("torch")
transformers = optional_import("transformers")

import selfattn.transformers as sat  # noqa: E402

NAME = sat.register()


def _model(cls_name, cfg_name, dtype=torch.float32, **cfg):
    torch.manual_seed(0)
    config = getattr(transformers, cfg_name)(vocab_size=97, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                                             max_position_embeddings=256, **cfg)
    model = getattr(transformers, cls_name)(config).to(dtype).eval()
    return model


def _with(model, impl):
    model.set_attn_implementation(impl)
    return model


def _batch(B=3, L=21, pad=(0, 5, 11), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pad):
        mask[b, :p] = 0                        # left padding, as for batched generation
    return ids, mask


CASES = [
    ("llama_gqa", "LlamaForCausalLM", "LlamaConfig", dict(num_key_value_heads=2), "sdpa"),
    ("mistral_window", "MistralForCausalLM", "MistralConfig", dict(num_key_value_heads=2, sliding_window=6), "sdpa"),
    ("gemma2_softcap", "Gemma2ForCausalLM", "Gemma2Config",
     dict(num_key_value_heads=2, attn_logit_softcapping=5.0, final_logit_softcapping=None, sliding_window=8),
     "eager"),   # transformers' sdpa refuses softcap: eager is the peer
]


@pytest.mark.parametrize("name,cls,cfg_name,cfg,peer", CASES, ids=[c[0] for c in CASES])
def test_logits_match_transformers_attention(name, cls, cfg_name, cfg, peer, monkeypatch):
    model = _model(cls, cfg_name, **cfg)
    ids, mask = _batch()
    calls = []
    inner = sat._sdpa
    monkeypatch.setattr(sat, "_sdpa", lambda *a, **k: calls.append(k) or inner(*a, **k))
    with torch.no_grad():
        ref = _with(model, peer)(input_ids=ids, attention_mask=mask).logits
        assert not calls
        got = _with(model, NAME)(input_ids=ids, attention_mask=mask).logits
    assert len(calls) == model.config.num_hidden_layers            # every layer ran selfattn's kernel
    assert all(k["enable_gqa"] for k in calls)                     # 4 query heads over 2 kv heads, not repeated
    if name == "gemma2_softcap":
        assert all(k["softcap"] == 5.0 for k in calls)
    # the left-padded causal mask as structure, read backwards (no gradient here): the padding at the
    # end as key_lengths (never read), causality a window (0, w - 1) on the reversed axis; no mask at all
    assert all(k["reverse"] and not k["is_causal"] and k["attn_mask"] is None for k in calls)
    assert all(k["alignment"] == "top_left" and k["key_lengths"].tolist() == [21, 16, 10] for k in calls)
    windows = [k["window_size"] for k in calls]
    w = cfg.get("sliding_window")
    if name == "mistral_window":
        assert windows == [(0, w - 1)] * 2
    elif name == "gemma2_softcap":                                  # sliding and full layers alternate
        assert windows == [(0, w - 1), (0, None)]
    else:
        assert windows == [(0, None)] * 2
    valid = mask.bool()                         # padded positions' logits are garbage in both
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,cls,cfg_name,cfg,peer", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_greedy_generation_matches(name, cls, cfg_name, cfg, peer, monkeypatch):
    model = _model(cls, cfg_name, **cfg)
    ids, mask = _batch(L=9, pad=(0, 3, 6))
    kw = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    calls = []
    inner = sat._sdpa
    monkeypatch.setattr(sat, "_sdpa", lambda q, k, v, **o: calls.append((q.shape[2], k.shape[2], o)) or inner(q, k, v, **o))
    with torch.no_grad():
        ref = _with(model, peer).generate(ids, **kw)
        got = _with(model, NAME).generate(ids, **kw)
    assert torch.equal(got, ref)
    # every step, prefill and decoding: the left padding read backwards as key_lengths, causality a
    # window on the reversed axis (Mistral's window too); once Mistral's window has left the padding
    # behind, plain causal structure bottom_right on its sliding cache. Never a mask.
    assert len(calls) == 2 * 24
    for L, S, o in calls:
        assert o["attn_mask"] is None
        if o.get("reverse"):
            kl = o["key_lengths"].tolist()
            assert not o["is_causal"] and kl[0] == S and min(kl) < S          # the padded rows cut short
            if name == "llama_gqa":
                assert kl == [S, S - 3, S - 6]
            assert o["window_size"] == ((0, 5) if name == "mistral_window" else (0, None))
        else:
            assert name == "mistral_window" and L == 1 and o["is_causal"] and o["alignment"] == "bottom_right"
            assert o["window_size"] == (5, 0)
    reversed_ = [bool(o.get("reverse")) for L, S, o in calls]
    assert all(reversed_) if name == "llama_gqa" else (reversed_[0] and not reversed_[-1])


def test_right_padding_is_key_lengths_and_trains_alike(monkeypatch):
    """Right padding (a training batch): key_lengths in the kernel, no mask; the gradients are sdpa's."""
    model = _model("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2).train()
    ids, mask = _batch()
    mask = mask.flip(-1)                                            # the same lengths, padded on the right
    calls = []
    inner = sat._sdpa
    monkeypatch.setattr(sat, "_sdpa", lambda *a, **k: calls.append(k) or inner(*a, **k))
    grads = {}
    for impl in ("sdpa", NAME):
        model.zero_grad()
        out = _with(model, impl)(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(calls) == 2
    for k in calls:
        assert k["is_causal"] and k["attn_mask"] is None and k["key_lengths"].tolist() == [21, 16, 10]
    for n in grads["sdpa"]:
        torch.testing.assert_close(grads[NAME][n], grads["sdpa"][n], rtol=1e-3, atol=1e-5, msg=n)


def test_a_mask_given_as_4d_is_read_in_place(monkeypatch):
    """A (B, 1, L, S) mask the caller made (transformers passes it through): read as it is, no structure."""
    model = _with(_model("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2), NAME)
    ids, mask = _batch()
    L = ids.shape[1]
    full = (torch.ones(L, L, dtype=torch.bool).tril() & mask.bool()[:, None, :])[:, None]
    calls = []
    inner = sat._sdpa
    monkeypatch.setattr(sat, "_sdpa", lambda *a, **k: calls.append(k) or inner(*a, **k))
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=full).logits
        ref = model(input_ids=ids, attention_mask=mask).logits
    assert calls[0]["attn_mask"] is full and not calls[0]["is_causal"] and "alignment" not in calls[0]
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-5, atol=1e-5)


def test_training_gradients_match():
    model = _model("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2).train()
    ids, mask = _batch()
    grads = {}
    for impl in ("sdpa", NAME):
        model.zero_grad()
        out = _with(model, impl)(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[NAME].keys() == grads["sdpa"].keys() and grads[NAME]
    for n in grads["sdpa"]:
        torch.testing.assert_close(grads[NAME][n], grads["sdpa"][n], rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_models(dtype):
    if dtype == torch.bfloat16:
        optional_import("ml_dtypes")
    model = _model("LlamaForCausalLM", "LlamaConfig", dtype=dtype, num_key_value_heads=2)
    ids, mask = _batch()
    with torch.no_grad():
        ref = _with(model, "sdpa")(input_ids=ids, attention_mask=mask).logits.float()
        got = _with(model, NAME)(input_ids=ids, attention_mask=mask).logits.float()
    valid = mask.bool()
    assert got.dtype == ref.dtype
    # 16-bit activations: the two differ by their roundings; the top-1 tokens agree almost everywhere
    agree = (got[valid].argmax(-1) == ref[valid].argmax(-1)).float().mean().item()
    assert agree >= 0.95, agree
    scale = ref[valid].abs().max().item()
    assert (got[valid] - ref[valid]).abs().max().item() <= 0.05 * scale


def test_output_attentions_is_a_clear_error():
    model = _with(_model("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2), NAME)
    ids, mask = _batch()
    with pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)


def test_register_is_idempotent_and_named():
    assert sat.register() == "selfattn" and sat.register("selfattn") == "selfattn"
    from transformers import AttentionInterface
    assert AttentionInterface._global_mapping["selfattn"] is sat.attention_forward
    assert sat._version_tuple("4.56.2") < sat.MIN_VERSION <= sat._version_tuple(transformers.__version__)
    np.testing.assert_equal(sat._version_tuple("5.25.0.dev0"), (5, 25))


def test_inference_skips_autograd_with_the_same_bits(monkeypatch):
    """Without a gradient (no_grad, generation) the NumPy function runs on the tensors' memory; with one,
    selfattn.torch's autograd Function: the same kernel, the same logits bit for bit."""
    model = _with(_model("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2), NAME)
    ids, mask = _batch()
    mask = mask.flip(-1)                  # right padding: key_lengths on both paths (left is read backwards here)
    calls = []
    inner = sat._torch_sdpa
    monkeypatch.setattr(sat, "_torch_sdpa", lambda *a, **k: calls.append(k) or inner(*a, **k))
    with torch.no_grad():
        fast = model(input_ids=ids, attention_mask=mask).logits
    assert not calls
    graded = model(input_ids=ids, attention_mask=mask).logits          # parameters require grad
    assert len(calls) == model.config.num_hidden_layers and graded.requires_grad
    assert torch.equal(fast, graded.detach())


def test_static_cache_slots_are_key_lengths(monkeypatch):
    """generate() on transformers' StaticCache: the keys are the whole preallocated cache; the empty slots
    past the queries become key_lengths (bottom_right) and are never read; the tokens are sdpa's."""
    model = _model("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2)
    ids, mask = _batch(L=9, pad=(0, 3, 6))
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, cache_implementation="static")
    calls = []
    inner = sat._sdpa
    monkeypatch.setattr(sat, "_sdpa", lambda q, k, v, **o: calls.append((q.shape[2], k.shape[2], o)) or inner(q, k, v, **o))
    with torch.no_grad():
        ref = _with(model, "sdpa").generate(ids, **kw)
        got = _with(model, NAME).generate(ids, **kw)
    assert torch.equal(got, ref)
    assert len(calls) == 2 * 10
    S = calls[0][1]
    assert S == 9 + 10 - 1                                          # the static cache's whole length
    for step, (L, S_, o) in enumerate(calls):
        n = 9 + step // 2                                           # keys written so far, this step's included
        assert S_ == S
        if n == S:                                                   # the cache full: left padding read backwards
            assert o["reverse"] and o["key_lengths"].tolist() == [S, S - 3, S - 6]
            continue
        assert o["is_causal"] and tuple(o["attn_mask"].shape) == (3, 1, 1, S) and not o.get("reverse")
        assert o["alignment"] == ("top_left" if L == 9 else "bottom_right")
        if L == 1:                                                   # the empty slots past the query
            assert o["key_lengths"] == n, (step, o)
    assert any(L == 1 and "key_lengths" in o for L, _, o in calls)


def _gpt_oss(dtype=torch.float32):
    """A small randomly initialised gpt-oss: attention sinks (s_aux, one learnable logit per query head),
    alternating sliding (window 8) and full layers, grouped-query heads, mixture-of-experts MLPs."""
    torch.manual_seed(0)
    config = transformers.GptOssConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                                       sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    model = transformers.GptOssForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)         # sinks that matter
    return model


def test_gpt_oss_attention_sinks_match_eager(monkeypatch):
    model = _gpt_oss()
    ids, mask = _batch()
    calls = []
    inner = sat._sdpa
    monkeypatch.setattr(sat, "_sdpa", lambda *a, **k: calls.append(k) or inner(*a, **k))
    with torch.no_grad():
        ref = _with(model, "eager")(input_ids=ids, attention_mask=mask).logits
        got = _with(model, NAME)(input_ids=ids, attention_mask=mask).logits
    assert len(calls) == 2 and all(k.get("sinks") is not None for k in calls)   # the kernel took the sinks
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-4, atol=1e-4)
    # generation: the same greedy tokens
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(_with(model, NAME).generate(ids, **kw), _with(model, "eager").generate(ids, **kw))


def test_gpt_oss_sinks_get_their_gradient():
    model = _gpt_oss().train()
    ids, mask = _batch()
    grads = {}
    for impl in ("eager", NAME):
        model.zero_grad()
        out = _with(model, impl)(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        grads[impl] = [layer.self_attn.sinks.grad.clone() for layer in model.model.layers]
    for g, r in zip(grads[NAME], grads["eager"]):
        assert r.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-6)
