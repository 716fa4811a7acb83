"""The backward against torch autograd in float64 (an optional oracle: skipped without torch):
every option case of tests/backward/test_backward.py, on every ISA.

torch's SDPA has no window, ALiBi, softcap or key_lengths, so the oracle writes attention out in
torch ops -- logits, softcap's tanh, the ALiBi bias, the masks, softmax, P·V -- and lets autograd
differentiate it (broadcast and GQA-shared inputs summed by autograd itself). Which keys each
query sees comes from selfattn.reference's structure (positions, alignment, windows, lengths), the
part the forward tests pin down; the math of the gradients is torch's."""

import math

import numpy as np
import pytest

from selfattn import reference
from sa_testutil import optional_import
from test_backward import CASES, NAMES, assert_grads_close, build, logit_magnitude, vjp_k

torch = optional_import("torch")


def torch_vjp(q, k, v, dout, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, window_size=None,
              alignment="top_left", key_lengths=None, alibi_slopes=None, softcap=None):
    tq, tk, tv = (torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (q, k, v))
    kk, vv = tk, tv
    if enable_gqa and tq.ndim >= 3 and tq.shape[-3] != tk.shape[-3]:
        g = tq.shape[-3] // tk.shape[-3]
        kk, vv = tk.repeat_interleave(g, dim=-3), tv.repeat_interleave(g, dim=-3)
    L, S, E = tq.shape[-2], kk.shape[-2], tq.shape[-1]
    lead = np.broadcast_shapes(tq.shape[:-2], kk.shape[:-2], vv.shape[:-2])
    visible, bias, S_b = reference._structure(L, S, lead, is_causal=is_causal, window_size=window_size,
                                              alignment=alignment, key_lengths=key_lengths,
                                              alibi_slopes=alibi_slopes)
    sc = 1.0 / math.sqrt(E) if scale is None else scale
    s = sc * (tq @ kk.transpose(-1, -2))
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s + torch.as_tensor(np.broadcast_to(bias, lead + (L, S)).copy())
    vis = np.broadcast_to(visible, lead + (L, S))
    if attn_mask is not None:
        m = np.broadcast_to(attn_mask, lead + (L, S))
        if m.dtype == np.bool_:
            vis = vis & m
        else:
            s = s + torch.as_tensor(m.astype(np.float64))
    # a float mask of -inf hides a key too (a row may end up seeing none)
    tvis = torch.from_numpy(np.array(vis)) & (s.detach() != -math.inf)
    dead = ~tvis.any(dim=-1, keepdim=True)                  # rows that see no key: zero output and gradients
    s = torch.where(tvis, s, torch.where(dead, torch.zeros_like(s), torch.full_like(s, -math.inf)))
    p = torch.softmax(s, dim=-1) * (~dead)
    # keys past key_lengths are never read (the reference zeroes them): not part of the graph
    keep = torch.as_tensor(np.arange(S).reshape(S, 1) < S_b)
    out = p @ torch.where(keep, vv, torch.zeros_like(vv))
    out.backward(torch.as_tensor(np.asarray(dout, np.float64)))
    return out.detach().numpy(), tuple(t.grad.numpy() for t in (tq, tk, tv))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_vjp_matches_torch_autograd_float64(isa, case):
    q, k, v, kw, dout = build(case, np.float64, seed=3)
    out, vjp = vjp_k(q, k, v, **kw)
    t_out, t_grads = torch_vjp(q, k, v, dout, **kw)
    np.testing.assert_allclose(out, t_out, rtol=1e-10, atol=1e-12)
    assert_grads_close(vjp(dout), t_grads, np.float64, logit_magnitude(q, k), ctx=f"{isa} {case[0]}: ",
                       names=NAMES)
