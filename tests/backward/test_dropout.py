"""Attention dropout (dropout_p, seed): in the fused forward and backward, a Philox mask per
(seed, unit, row, key) -- src_c/dropout.h.

* The kernel draws exactly the reference's mask (selfattn.reference._philox_keep): the forward and
  the VJP's gradients equal the float64 reference with the same seed, every ISA, both dtypes,
  with masks, causal, windows, key lengths, ALiBi, softcap, sinks and GQA; 16-bit inputs.
* The same bits at any thread count; the same seed the same bits, another seed another mask.
* The mask's statistics: the dropped fraction is p (binomial bound), and the mean over seeds is
  attention without dropout.
* Few query rows (the decode schedule's shapes) take another schedule and still drop.
* The torch bridge (seed from torch's generator; gradients) and transformers in training.
"""

import numpy as np
import pytest

import selfattn
from selfattn import reference
from sa_testutil import ISAS, assert_bits, optional_import

sdpa = selfattn.scaled_dot_product_attention


def _qkv(rng, B=2, Hq=4, H=2, L=70, S=150, E=16, Ev=8, dtype=np.float64):
    return (rng.standard_normal((B, Hq, L, E)).astype(dtype), rng.standard_normal((B, H, S, E)).astype(dtype),
            rng.standard_normal((B, H, S, Ev)).astype(dtype))


OPTIONS = [
    dict(),
    dict(is_causal=True),
    dict(is_causal=True, alignment="bottom_right", window_size=(20, 0)),
    dict(key_lengths=[120, 37], alibi_slopes=[0.1, 0.2, 0.3, 0.4]),
    dict(softcap=5.0, sinks=[0.5, -1.0, 0.0, 2.0]),
    dict(attn_mask="bool"),
]


def _opts(o, rng, L, S):
    o = dict(o)
    if o.get("attn_mask") == "bool":
        o["attn_mask"] = rng.random((L, S)) < 0.7
    return o


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k", range(len(OPTIONS)))
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_forward_and_backward_equal_the_reference(isa, k, p):
    rng = np.random.default_rng(k)
    q, key, v = _qkv(rng)
    o = _opts(OPTIONS[k], rng, 70, 150)
    ref, rvjp = reference.scaled_dot_product_attention_vjp(q, key, v, enable_gqa=True, dropout_p=p, seed=11, **o)
    g = rng.standard_normal(ref.shape)
    want = rvjp(g)
    with selfattn.use_isa(isa):
        for dt, tol in ((np.float32, 3e-5), (np.float64, 1e-12)):
            out = sdpa(q.astype(dt), key.astype(dt), v.astype(dt), enable_gqa=True, dropout_p=p, seed=11, **o)
            assert np.abs(out - ref).max() < tol * 4, (isa, dt)
            out2, vjp = selfattn.scaled_dot_product_attention_vjp(q.astype(dt), key.astype(dt), v.astype(dt),
                                                                  enable_gqa=True, dropout_p=p, seed=11, **o)
            assert_bits(out2, out, f"{isa} vjp's forward")
            got = vjp(g.astype(dt))
            for a, b in zip(got, want):
                assert np.abs(a - b).max() < tol * 40 * max(1.0, np.abs(b).max()), (isa, dt)


def test_same_bits_at_any_thread_count_and_per_seed():
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, L=300, S=400, E=32, Ev=32, dtype=np.float32)
    for isa in ISAS:
        with selfattn.use_isa(isa):
            base = None
            for nt in (1, 2, 3, 4):
                out, vjp = selfattn.scaled_dot_product_attention_vjp(q, k, v, enable_gqa=True, is_causal=True,
                                                                     dropout_p=0.2, seed=99, num_threads=nt)
                res = (out,) + vjp(np.ones_like(out))
                base = base or res
                for a, b in zip(res, base):
                    assert_bits(a, b, f"{isa} threads {nt}")
            other = sdpa(q, k, v, enable_gqa=True, is_causal=True, dropout_p=0.2, seed=100)
            assert not np.array_equal(other, base[0])


def test_dropped_fraction_and_mean():
    z = reference._philox_keep(12345, 0.3, (3,), 200, 999)
    n = z.size
    dropped = float((z == 0).mean())
    assert abs(dropped - 0.3) < 5 * np.sqrt(0.3 * 0.7 / n)
    assert np.allclose(z[z != 0], 1 / 0.7)
    # the kernel's mask is that one: v = identity columns read the weights back
    rng = np.random.default_rng(2)
    L, S = 64, 96
    q = rng.standard_normal((1, 3, L, 8))
    k = rng.standard_normal((1, 3, S, 8))
    eye = np.broadcast_to(np.eye(S), (1, 3, S, S))
    w = selfattn.attention_weights(q, k)
    got = sdpa(q, k, eye, dropout_p=0.3, seed=12345)
    assert np.allclose(got, w * reference._philox_keep(12345, 0.3, (1, 3), L, S), atol=1e-12)
    # the mean over seeds is attention without dropout
    v = rng.standard_normal((1, 3, S, 4))
    mean = np.mean([sdpa(q, k, v, dropout_p=0.5, seed=s) for s in range(400)], axis=0)
    plain = sdpa(q, k, v)
    assert np.abs(mean - plain).max() < 0.15 and np.abs(mean - plain).mean() < 0.03


def test_few_rows_take_another_schedule():
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, L=1, S=700)
    assert selfattn._core.sdpa(q, k, v, enable_gqa=True, schedule_only=True)["decode"]
    assert not selfattn._core.sdpa(q, k, v, enable_gqa=True, schedule_only=True, dropout_p=0.3,
                                   dropout_seed=1)["decode"]
    for isa in ISAS:
        with selfattn.use_isa(isa):
            out = sdpa(q, k, v, enable_gqa=True, dropout_p=0.3, seed=5)
            assert np.abs(out - reference.scaled_dot_product_attention(q, k, v, enable_gqa=True, dropout_p=0.3,
                                                                       seed=5)).max() < 1e-12


@pytest.mark.parametrize("dtname", ["float16", "bfloat16"])
def test_16_bit(dtname):
    dt = optional_import("ml_dtypes").bfloat16 if dtname == "bfloat16" else np.float16
    rng = np.random.default_rng(4)
    q, k, v = (a.astype(dt) for a in _qkv(rng))
    ref, rvjp = reference.scaled_dot_product_attention_vjp(q, k, v, enable_gqa=True, dropout_p=0.2, seed=8)
    for isa in selfattn.available_isas():
        with selfattn.use_isa(isa):
            out, vjp = selfattn.scaled_dot_product_attention_vjp(q, k, v, enable_gqa=True, dropout_p=0.2, seed=8)
            assert out.dtype == dt
            assert np.abs(out.astype(np.float64) - ref).max() < 0.05, isa
            g = np.ones(out.shape, dtype=dt)
            for a, b in zip(vjp(g), rvjp(g.astype(np.float64))):
                assert a.dtype == dt and np.abs(a.astype(np.float64) - b).max() < 0.1 * max(1.0, np.abs(b).max())


def test_seeds():
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, dtype=np.float32)
    a = sdpa(q, k, v, enable_gqa=True, dropout_p=0.1, seed=np.random.default_rng(7))
    b = sdpa(q, k, v, enable_gqa=True, dropout_p=0.1, seed=np.random.default_rng(7))
    assert_bits(a, b)
    assert not np.array_equal(sdpa(q, k, v, enable_gqa=True, dropout_p=0.1),
                              sdpa(q, k, v, enable_gqa=True, dropout_p=0.1))        # None: fresh each call
    assert_bits(sdpa(q, k, v, enable_gqa=True, dropout_p=0.1, seed=2 ** 64 - 1),
                sdpa(q, k, v, enable_gqa=True, dropout_p=0.1, seed=np.uint64(2 ** 64 - 1)))
    assert_bits(sdpa(q, k, v, enable_gqa=True, dropout_p=0.0, seed=3), sdpa(q, k, v, enable_gqa=True))
    with pytest.raises(TypeError, match="int8"):
        kq, ks = selfattn.quantize_kv(k)
        sdpa(q[:, :, :1], kq, kq, k_scale=ks, v_scale=ks, enable_gqa=True, dropout_p=0.1, seed=1)


def test_torch_bridge():
    torch = optional_import("torch")
    import selfattn.torch as st
    rng = np.random.default_rng(6)
    q, k, v = _qkv(rng)
    tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
    torch.manual_seed(0)
    out = st.scaled_dot_product_attention(tq, tk, tv, None, 0.25, True, enable_gqa=True)
    torch.manual_seed(0)
    again = st.scaled_dot_product_attention(tq, tk, tv, None, 0.25, True, enable_gqa=True)
    assert torch.equal(out, again)                        # the seed came from torch's generator
    out = st.scaled_dot_product_attention(tq, tk, tv, None, 0.25, True, enable_gqa=True, seed=21)
    g = rng.standard_normal(out.shape)
    grads = torch.autograd.grad(out, (tq, tk, tv), torch.from_numpy(g))
    ref, rvjp = reference.scaled_dot_product_attention_vjp(q, k, v, is_causal=True, enable_gqa=True, dropout_p=0.25,
                                                           seed=21)
    assert np.abs(out.detach().numpy() - ref).max() < 1e-12
    for a, b in zip(grads, rvjp(g)):
        assert np.abs(a.numpy() - b).max() < 1e-10


def test_transformers_training_with_attention_dropout():
    torch = optional_import("torch")
    transformers = optional_import("transformers")
    import selfattn.transformers as stf
    stf.register()
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.3)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.config._attn_implementation = "selfattn"
    ids = torch.randint(0, 64, (2, 12))
    model.train()
    losses = []
    for _ in range(2):
        torch.manual_seed(1)
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append((loss.item(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    assert losses[0][0] == losses[1][0] and torch.equal(losses[0][1], losses[1][1])   # seeded by torch
    torch.manual_seed(2)
    assert model(input_ids=ids, labels=ids).loss.item() != losses[0][0]                # another mask
    model.eval()
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = model(input_ids=ids).logits
    assert torch.equal(a, b)                                                          # no dropout in eval
