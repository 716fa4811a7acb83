"""selfattn.torch.scaled_dot_product_attention: a torch.autograd.Function over selfattn's forward and VJP.

gradcheck in float64 (plain, causal, GQA, masks, windows, broadcasting); forward and backward
against torch's own SDPA in float32; zero-copy; needs_input_grad; clear errors; a training step.
"""

import numpy as np
import pytest

from sa_testutil import optional_import

torch = optional_import("torch")
F = torch.nn.functional

import selfattn.torch as st  # noqa: E402

_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def _t(shape, dtype=torch.float64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


GRADCHECK = {
    "plain": dict(shapes=((2, 2, 5, 4), (2, 2, 6, 4), (2, 2, 6, 3)), kw={}),
    "causal": dict(shapes=((1, 2, 6, 4), (1, 2, 6, 4), (1, 2, 6, 4)), kw=dict(is_causal=True)),
    "gqa": dict(shapes=((1, 4, 5, 4), (1, 2, 5, 4), (1, 2, 5, 2)), kw=dict(enable_gqa=True, is_causal=True)),
    "bool_mask": dict(shapes=((2, 2, 4, 3), (2, 2, 5, 3), (2, 2, 5, 3)), kw=dict(mask="bool")),
    "float_mask": dict(shapes=((2, 1, 4, 3), (2, 1, 5, 3), (2, 1, 5, 3)), kw=dict(mask="float")),
    "window": dict(shapes=((1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 8, 4)), kw=dict(window_size=2)),
    "window_causal_bottom_right": dict(shapes=((1, 1, 4, 4), (1, 1, 7, 4), (1, 1, 7, 4)),
                                       kw=dict(window_size=(2, 0), is_causal=True, alignment="bottom_right")),
    "broadcast_kv": dict(shapes=((3, 2, 4, 4), (1, 2, 5, 4), (2, 5, 4)), kw=dict(scale=0.7)),
    "key_lengths": dict(shapes=((3, 2, 4, 4), (3, 2, 6, 4), (3, 2, 6, 4)), kw=dict(key_lengths=[6, 2, 4])),
}


def _mask(kind, L, S, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "bool":
        m = torch.rand(L, S, generator=g) < 0.7
        m[:, 0] = True
        return m
    return torch.randn(L, S, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("case", sorted(GRADCHECK))
def test_gradcheck_float64(case):
    c = GRADCHECK[case]
    q, k, v = (_t(s, seed=i) for i, s in enumerate(c["shapes"]))
    kw = dict(c["kw"])
    mask = _mask(kw.pop("mask"), q.shape[-2], k.shape[-2]) if "mask" in kw else None
    # one thread: gradcheck makes hundreds of tiny calls, where threads only wait on each other
    fn = lambda q, k, v: st.scaled_dot_product_attention(q, k, v, attn_mask=mask, num_threads=1, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("gqa", [False, True])
def test_matches_torch_sdpa_forward_and_backward_float32(causal, mask, gqa):
    if gqa and not _HAS_GQA:
        pytest.skip("this torch has no enable_gqa")
    if causal and mask is not None:
        pytest.skip("torch's SDPA does not take a mask with is_causal")
    B, H, Hkv, L, E = 2, 4, (2 if gqa else 4), 33, 16
    q, k, v = _t((B, H, L, E), torch.float32, 0), _t((B, Hkv, L, E), torch.float32, 1), _t((B, Hkv, L, E), torch.float32, 2)
    m = None if mask is None else _mask(mask, L, L)
    if m is not None and m.dtype == torch.float64:
        m = m.float()
    kw = dict(enable_gqa=True) if gqa else {}
    out = st.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, **kw)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=m, is_causal=causal, **kw)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = _t(out.shape, torch.float32, 9, grad=False)
    out.backward(g)
    ref.backward(g)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert a.grad.dtype == torch.float32 and a.grad.shape == a.shape
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


def test_zero_copy_and_no_grad_path():
    q, k, v = (_t((2, 3, 8), torch.float32, i, grad=False) for i in range(3))
    captured = {}
    real = st.scaled_dot_product_attention_vjp

    def spy(qa, ka, va, **kw):
        captured.update(q=qa, k=ka)
        return real(qa, ka, va, **kw)
    st.scaled_dot_product_attention_vjp = spy
    try:
        out = st.scaled_dot_product_attention(q, k, v)
    finally:
        st.scaled_dot_product_attention_vjp = real
    assert np.shares_memory(captured["q"], q.numpy()) and np.shares_memory(captured["k"], k.numpy())
    assert isinstance(out, torch.Tensor) and out.grad_fn is None and out.dtype == torch.float32
    with torch.no_grad():
        out2 = st.scaled_dot_product_attention(q.requires_grad_(), k, v)
    assert out2.grad_fn is None
    torch.testing.assert_close(out, out2)


def test_needs_input_grad_respected():
    q = _t((1, 2, 4, 4), seed=0)
    k = _t((1, 2, 5, 4), seed=1, grad=False)
    v = _t((1, 2, 5, 4), seed=2)
    st.scaled_dot_product_attention(q, k, v).sum().backward()
    assert q.grad is not None and v.grad is not None and k.grad is None
    # gradients of only some inputs, through torch.autograd.grad
    q.grad = v.grad = None
    out = st.scaled_dot_product_attention(q, k, v, is_causal=True)
    (gv,) = torch.autograd.grad(out.sum(), (v,))
    assert gv.shape == v.shape and q.grad is None


def test_non_contiguous_inputs():
    base = _t((2, 6, 3, 8), seed=0, grad=False)
    q = base.transpose(1, 2).requires_grad_()                 # (2, 3, 6, 8), strided view
    k, v = _t((2, 3, 6, 8), seed=1), _t((2, 3, 6, 8), seed=2)
    out = st.scaled_dot_product_attention(q, k, v, is_causal=True)
    q2, k2, v2 = (t.detach().clone().contiguous().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True)
    torch.testing.assert_close(out, ref)
    out.backward(torch.ones_like(out))
    ref.backward(torch.ones_like(ref))
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad)


def test_errors():
    q = _t((1, 2, 4, 4))
    with pytest.raises(TypeError, match=f"query float16, key {str(q.dtype)[6:]}"):    # 16 bits: all three
        st.scaled_dot_product_attention(q.half(), q, q)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        st.scaled_dot_product_attention(torch.ones(1, 4, 4, dtype=torch.int64), q, q)
    with pytest.raises(TypeError, match="attn_mask requires grad"):
        st.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(4, 4, dtype=torch.float64, requires_grad=True))
    with pytest.raises(ValueError, match="on the CPU|meta"):
        st.scaled_dot_product_attention(torch.empty(1, 4, 4, device="meta"), q, q)
    with pytest.raises(TypeError, match="torch.Tensor"):
        st.scaled_dot_product_attention(np.ones((1, 4, 4)), q, q)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        st.scaled_dot_product_attention(q, q, q, dropout_p=1.0)
    st.scaled_dot_product_attention(q, q, q, dropout_p=0.0)           # torch's default spelled out: fine
    with pytest.raises(TypeError, match="return_lse"):
        st.scaled_dot_product_attention(q, q, q, return_lse=True)
    with pytest.raises(ValueError):                                      # selfattn's own validation
        st.scaled_dot_product_attention(q, _t((1, 2, 5, 3)), _t((1, 2, 5, 3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_tensor_is_a_clear_error():
    q = torch.zeros(1, 4, 4, device="cuda")
    with pytest.raises(ValueError, match=r"\.cpu\(\)"):
        st.scaled_dot_product_attention(q, q, q)


def test_in_place_change_before_backward_is_caught():
    q, k, v = (_t((1, 4, 4), seed=i) for i in range(3))
    leaf_v = v.detach().clone().requires_grad_()
    vv = leaf_v * 1.0
    out = st.scaled_dot_product_attention(q, k, vv)
    with torch.no_grad():
        vv.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


class _TinyAttention(torch.nn.Module):
    def __init__(self, d=16, heads=2, attn=None):
        super().__init__()
        self.h = heads
        self.qkv = torch.nn.Linear(d, 3 * d, dtype=torch.float64)
        self.o = torch.nn.Linear(d, d, dtype=torch.float64)
        self.attn = attn

    def forward(self, x):
        B, L, d = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        y = self.attn(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, L, d))


def test_a_training_step_matches_torch():
    torch.manual_seed(0)
    ours = _TinyAttention(attn=st.scaled_dot_product_attention)
    theirs = _TinyAttention(attn=F.scaled_dot_product_attention)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    target = torch.randn(3, 7, 16, dtype=torch.float64)
    losses = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        seq = []
        for _ in range(5):
            opt.zero_grad()
            loss = F.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            seq.append(loss.item())
        losses[name] = seq
    assert losses["ours"][-1] < losses["ours"][0]
    np.testing.assert_allclose(losses["ours"], losses["theirs"], rtol=1e-10)
    for p1, p2 in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-10, atol=1e-10)


def test_not_imported_by_selfattn():
    import subprocess
    import sys
    code = "import sys, selfattn; print('selfattn.torch' in sys.modules, 'torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "False"


def test_docstring_examples_run():
    import doctest
    result = doctest.testmod(st, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0
