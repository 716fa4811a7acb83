"""Small calls of every selfattn entry point, on every ISA this process can run, including calls
that raise; run under valgrind by .ci/valgrind.sh. Prints 'valgrind_script: OK' at the end.

Under valgrind the CPU reports no AVX-512 (valgrind does not emulate it), so available_isas()
is what valgrind can run: avx2 and generic.
"""
import numpy as np

import selfattn
from selfattn import _core, reference

sdpa = selfattn.scaled_dot_product_attention


def expect(exc, fn):
    try:
        fn()
    except exc:
        return
    raise AssertionError(f"{exc.__name__} expected from {fn}")


def check(got, want, tol):
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(1.0, float(np.abs(want).max(initial=0))))


def main():
    rng = np.random.default_rng(0)
    # L=67 and S=131 cross the query tile (64) and the key block (128)
    q = rng.standard_normal((2, 2, 67, 5))
    k = rng.standard_normal((2, 2, 131, 5))
    v = rng.standard_normal((2, 2, 131, 3))
    bmask = rng.random((67, 131)) < 0.6
    bmask[4] = False
    fmask = rng.standard_normal((2, 1, 67, 131)).astype(np.float32)
    fmask[..., 7, :] = -np.inf
    x = rng.standard_normal((2, 9, 12))
    wq, wk, wv, wo = (rng.standard_normal(s) for s in ((12, 8), (12, 8), (12, 6), (6, 4)))
    isas = selfattn.available_isas()
    print("valgrind_script: ISAs", isas, "config", selfattn.config(), flush=True)
    for isa in isas:
        with selfattn.use_isa(isa):
            for dt, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
                qd, kd, vd = q.astype(dt), k.astype(dt), v.astype(dt)
                for nt in (1, 2):
                    check(sdpa(qd, kd, vd, num_threads=nt), reference.scaled_dot_product_attention(q, k, v), tol)
                    o, lse = sdpa(qd, kd, vd, attn_mask=bmask, return_lse=True, num_threads=nt)
                    ro, rl = reference.scaled_dot_product_attention(q, k, v, attn_mask=bmask, return_lse=True)
                    check(o, ro, tol)
                    assert np.array_equal(np.isinf(lse), np.isinf(rl))
                    check(sdpa(qd, kd, vd, attn_mask=fmask, num_threads=nt),
                          reference.scaled_dot_product_attention(q, k, v, attn_mask=fmask), tol)
                    check(sdpa(qd, kd, vd, is_causal=True, num_threads=nt),
                          reference.scaled_dot_product_attention(q, k, v, is_causal=True), tol)
                    # structured masks, composed (key lengths, window, alignment, ALiBi, softcap, mask)
                    skw = dict(attn_mask=bmask, is_causal=True, window_size=(40, 3), alignment="bottom_right",
                               key_lengths=[131, 70], alibi_slopes=[0.5, 0.25], softcap=5.0)
                    check(sdpa(qd, kd, vd, num_threads=nt, **skw),
                          reference.scaled_dot_product_attention(q, k, v, **skw), tol)
                    cu = np.array([0, 30, 30, 67])
                    cuk = np.array([0, 50, 90, 131])
                    check(selfattn.varlen_attention(qd[0], kd[0], vd[0], cu, cuk, is_causal=True, num_threads=nt),
                          reference.varlen_attention(q[0], k[0], v[0], cu, cuk, is_causal=True), tol)
                    check(sdpa(qd, kd[:, :1], vd[:, :1], enable_gqa=True, num_threads=nt),
                          reference.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True), tol)
                    # non-contiguous and negative-stride views
                    check(sdpa(qd[..., ::-1, :], np.swapaxes(np.ascontiguousarray(np.swapaxes(kd, -1, -2)), -1, -2),
                               vd[:, :, ::-1], num_threads=nt),
                          reference.scaled_dot_product_attention(q[..., ::-1, :], k, v[:, :, ::-1]), tol)
                # the fused backward: structured masks composed, GQA, varlen, attend's layer
                dout = rng.standard_normal((2, 2, 67, 3))
                for bkw in (dict(is_causal=True), dict(skw, attn_mask=bmask)):
                    got = selfattn.scaled_dot_product_attention_vjp(qd, kd, vd, num_threads=2, **bkw)[1](dout)
                    want = reference.scaled_dot_product_attention_vjp(q, k, v, **bkw)[1](dout)
                    for g, w in zip(got, want):
                        check(g, w, 10 * tol)
                got = selfattn.scaled_dot_product_attention_vjp(qd, kd[:, :1], vd[:, :1], enable_gqa=True)[1](dout)
                want = reference.scaled_dot_product_attention_vjp(q, k[:, :1], v[:, :1], enable_gqa=True)[1](dout)
                for g, w in zip(got, want):
                    check(g, w, 10 * tol)
                got = selfattn.varlen_attention_vjp(qd[0], kd[0], vd[0], cu, cuk, is_causal=True)[1](dout[0])
                want = reference.varlen_attention_vjp(q[0], k[0], v[0], cu, cuk, is_causal=True)[1](dout[0])
                for g, w in zip(got, want):
                    check(g, w, 10 * tol)
                y, avjp = selfattn.attend_vjp(x.astype(dt), wq, wk, wv, num_heads=2, wo=wo, is_causal=True)
                ry, ravjp = reference.attend_vjp(x, wq, wk, wv, num_heads=2, wo=wo, is_causal=True)
                dy = rng.standard_normal(y.shape)
                for g, w in zip(avjp(dy), ravjp(dy)):
                    check(g, w, 10 * tol)
                check(selfattn.attend(x.astype(dt), wq, wk, wv, num_heads=2),
                      reference.attend(x, wq, wk, wv, num_heads=2), tol)
                check(selfattn.attend(x.astype(dt), wq, wk, wv, num_heads=2, wo=wo, is_causal=True),
                      reference.attend(x, wq, wk, wv, num_heads=2, wo=wo, is_causal=True), tol)
            # calls that raise
            expect(ValueError, lambda: sdpa(q, k[..., :4], v))
            expect(ValueError, lambda: sdpa(q, k, v, attn_mask=bmask[:, :5]))
            expect(ValueError, lambda: sdpa(q, k, v, window_size=-1))
            expect(ValueError, lambda: sdpa(q, k, v, key_lengths=[200, 1]))
            expect(ValueError, lambda: selfattn.varlen_attention(q[0], k[0], v[0], [0, 60], [0, 131]))
            expect(TypeError, lambda: sdpa(q.astype(np.complex128), k, v))
            expect(ValueError, lambda: selfattn.scaled_dot_product_attention_vjp(q, k, v)[1](np.ones((2, 3))))
            expect(TypeError, lambda: sdpa(q, k, v, attn_mask=bmask.astype(np.int8)))
            expect(ValueError, lambda: sdpa(q, k, v, scale=float("inf")))
            expect(ValueError, lambda: sdpa(q, k, v, num_threads=0))
            expect(ValueError, lambda: selfattn.attend(x, wq, wk, wv, num_heads=2, wo=wo[:3]))
            expect(TypeError, lambda: selfattn.attend(x, wq, wk, wv, num_heads=2.0))
            # quantized and paged K/V, sinks (decode schedule: one query row per head)
            q1 = q[:, :, :1].astype(np.float32)
            (kq, ks), (vq, vs) = selfattn.quantize_kv(k), selfattn.quantize_kv(v)
            check(sdpa(q1, kq, vq, k_scale=ks, v_scale=vs, sinks=[0.5, -1.0]),
                  reference.scaled_dot_product_attention(q1, kq, vq, k_scale=ks, v_scale=vs, sinks=[0.5, -1.0]), 1e-4)
            kp = np.ascontiguousarray(k.transpose(0, 2, 1, 3))[:, :128].reshape(16, 16, 2, 5)
            vp = np.ascontiguousarray(v.transpose(0, 2, 1, 3))[:, :128].reshape(16, 16, 2, 3)
            bt, sl = np.array([[9, 3, 0, 15, 4, 1, 2, -1], [7, 8, 5, -1, -1, -1, -1, -1]]), np.array([100, 37])
            for nt in (1, 2):
                dense = (kp[np.maximum(bt, 0)].reshape(2, 128, 2, 5).transpose(0, 2, 1, 3),
                         vp[np.maximum(bt, 0)].reshape(2, 128, 2, 3).transpose(0, 2, 1, 3))
                check(selfattn.paged_attention(q[:, :, :3], kp, vp, bt, sl, num_threads=nt),
                      reference.scaled_dot_product_attention(q[:, :, :3], *dense, is_causal=True,
                                                             alignment="bottom_right", key_lengths=sl), 1e-10)
            expect(ValueError, lambda: selfattn.paged_attention(q[:, :, :1], kp, vp, bt + 16, sl))
            # attention dropout: the Philox mask in the forward and the backward
            for nt in (1, 2):
                got = selfattn.scaled_dot_product_attention_vjp(q, k, v, is_causal=True, dropout_p=0.3, seed=5,
                                                                num_threads=nt)
                want = reference.scaled_dot_product_attention_vjp(q, k, v, is_causal=True, dropout_p=0.3, seed=5)
                check(got[0], want[0], 1e-10)
                gd = rng.standard_normal((2, 2, 67, 3))
                for g, w in zip(got[1](gd), want[1](gd)):
                    check(g, w, 1e-9)
            # a block mask (flex_attention): partial, full and empty blocks, forward and backward
            doc = np.repeat(np.arange(5), 27)[:131]
            bm = selfattn.create_block_mask(lambda b, h, i, j: (doc[i] == doc[j]) | (j < 3), None, None, 67, 131,
                                            BLOCK_SIZE=(16, 32))
            for nt in (1, 2):
                check(selfattn.flex_attention(q, k, v, block_mask=bm, num_threads=nt),
                      reference.flex_attention(q, k, v, block_mask=bm), 1e-10)
                gout = rng.standard_normal((2, 2, 67, 3))
                got = selfattn.flex_attention_vjp(q, k, v, block_mask=bm, num_threads=nt)[1](gout)
                for g, w in zip(got, reference.flex_attention_vjp(q, k, v, block_mask=bm)[1](gout)):
                    check(g, w, 1e-9)
            # score_mod: a strided bias read, a per-key one (buckets), an index out of range
            tab = rng.standard_normal((2, 300))
            mods = (lambda s, b, h, i, j: s + tab[h, i - j + 140],
                    lambda s, b, h, i, j: np.tanh(s) * 3 + tab[h, np.minimum(abs(i - j) // 3, 20)])
            for nt in (1, 2):
                for mod in mods:
                    got = selfattn.flex_attention_vjp(q, k, v, score_mod=mod, block_mask=bm, num_threads=nt)
                    want = reference.flex_attention_vjp(q, k, v, score_mod=mod, block_mask=bm)
                    check(got[0], want[0], 1e-10)
                    gout = rng.standard_normal((2, 2, 67, 3))
                    for g, w in zip(got[1](gout), want[1](gout)):
                        check(g, w, 1e-9)
            expect(IndexError, lambda: selfattn.flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + tab[h, i + 3 * j]))
            for fn in (lambda: sdpa(q, k, v, attn_mask=fmask, return_lse=True),
                       lambda: selfattn.attend(x, wq, wk, wv, num_heads=2, wo=wo)):
                _core._debug_fail_allocations(1)
                try:
                    expect(MemoryError, fn)
                finally:
                    _core._debug_fail_allocations(0)
                fn()
    # an impossible workspace (~2^49 bytes): the unit table was allocated, the workspace fails
    huge = np.broadcast_to(np.float32(1), (1, 1 << 40))
    expect(MemoryError, lambda: sdpa(huge, np.broadcast_to(np.float32(1), (3, 1 << 40)), np.ones((3, 2), np.float32)))
    print("valgrind_script: OK", flush=True)


if __name__ == "__main__":
    main()
