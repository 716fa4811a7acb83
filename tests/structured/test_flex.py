"""Block masks from mask_mod (FlexAttention's API): create_block_mask, flex_attention, its VJP.

* The BlockMask stands for exactly the mask mask_mod defines (to_bool against the mod evaluated
  on the whole grid, selfattn.reference.flex_mask), for 14 mods and block sizes square, not,
  1, larger than the problem, not dividing it.
* flex_attention and its backward against selfattn.reference (float64, the mod on every
  element), every ISA forced, both dtypes, every schedule, 16-bit inputs; the same bits at any
  thread count; rows that see nothing give zeros and lse -inf.
* The kernel skips what the block mask empties: NaN in the keys and values of other documents
  leaves a document's rows (and their dq) bit-identical.
* The errors, inputs untouched; torch's own flex_attention as an oracle where torch is installed.
"""

import numpy as np
import pytest

import selfattn
from selfattn import reference
from sa_testutil import (DTYPES, ISAS, assert_bits, assert_sdpa_close, assert_unchanged, check_flex_16_bit,
                         forced_schedule, logit_magnitude, optional_import, snapshot, tile_params, vmax_of)

RNG_TABLE = np.random.default_rng(7).random((400, 700)) < 0.3       # a captured table: partial blocks


def _doc_ids(n, sizes=(37, 90, 5, 120, 64)):
    return np.repeat(np.arange(len(sizes) * 20), np.tile(sizes, 20))[:n]


DOC = _doc_ids(2000)

MODS = {
    "causal": lambda b, h, q, k: q >= k,
    "sliding_window": lambda b, h, q, k: abs(q - k) <= 40,
    "document": lambda b, h, q, k: DOC[q] == DOC[k],
    "document_causal": lambda b, h, q, k: (DOC[q] == DOC[k]) & (q >= k),
    "prefix_lm": lambda b, h, q, k: (k < 50) | (q >= k),
    "dilated_window": lambda b, h, q, k: (abs(q - k) < 96) & ((q - k) % 3 == 0),
    "strided_causal": lambda b, h, q, k: (q >= k) & (((q - k) % 16 == 0) | (q - k < 8)),
    "per_head_window": lambda b, h, q, k: abs(q - k) <= 8 + 30 * h,
    "per_batch_length": lambda b, h, q, k: k < 37 + 101 * b,
    "random_table": lambda b, h, q, k: RNG_TABLE[q, k],
    "global_tokens": lambda b, h, q, k: (k < 4) | (q < 4) | (abs(q - k) < 16),
    "nothing": lambda b, h, q, k: (q < 0) & (k < 0),
    "everything": selfattn.noop_mask,
    "and_or": selfattn.or_masks(selfattn.and_masks(lambda b, h, q, k: q >= k, lambda b, h, q, k: q - k < 64),
                                lambda b, h, q, k: k == 0),
}


def _qkv(rng, B, Hq, H, L, S, E, Ev, dtype=np.float64):
    return (rng.standard_normal((B, Hq, L, E)).astype(dtype), rng.standard_normal((B, H, S, E)).astype(dtype),
            rng.standard_normal((B, H, S, Ev)).astype(dtype))


@pytest.mark.parametrize("name", sorted(MODS))
@pytest.mark.parametrize("L, S, bs", [(200, 333, 64), (97, 250, (16, 48)), (50, 60, 128), (130, 131, 1),
                                      (129, 257, (128, 32))])
def test_block_mask_is_the_mod(name, L, S, bs):
    bm = selfattn.create_block_mask(MODS[name], 2, 3, L, S, BLOCK_SIZE=bs)
    want = reference.flex_mask(MODS[name], 2, 3, L, S)
    got = np.broadcast_to(bm.to_bool(), want.shape)
    assert (got == want).all(), f"{name}: {int((got != want).sum())} elements differ"
    dense = bm.to_dense()
    assert dense.dtype == np.int32 and dense.shape[-2:] == (-(-L // bm.BLOCK_SIZE[0]), -(-S // bm.BLOCK_SIZE[1]))
    # counts agree with the table: every block is empty, full or partial
    assert ((bm.kv_num_blocks + bm.full_kv_num_blocks) == dense.sum(-1)).all()
    assert 0.0 <= bm.sparsity() <= 100.0 and repr(bm).startswith("BlockMask(")


def test_block_mask_broadcasts_when_the_mod_ignores_batch_and_heads():
    assert selfattn.create_block_mask(MODS["causal"], 4, 8, 64, 64, BLOCK_SIZE=16).shape == (1, 1, 64, 64)
    assert selfattn.create_block_mask(MODS["per_head_window"], 4, 8, 64, 64).shape == (1, 8, 64, 64)
    assert selfattn.create_block_mask(MODS["per_batch_length"], 4, 8, 64, 64).shape == (4, 1, 64, 64)
    assert selfattn.create_block_mask(MODS["causal"], None, None, 64, 64).shape == (1, 1, 64, 64)

    def late_head(b, h, q, k):                  # uses h only from query row 100 on: the build starts over
        return np.where(q >= 100, k <= h * 10 + q % 7, k <= q)
    bm = selfattn.create_block_mask(late_head, 1, 3, 200, 150, BLOCK_SIZE=32)
    assert bm.shape == (1, 3, 200, 150)
    assert (bm.to_bool() == reference.flex_mask(late_head, 1, 3, 200, 150)).all()


def _check_forward(q, k, v, bm, dtype, gqa, ctx, **kw):
    out, lse = selfattn.flex_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), block_mask=bm,
                                       enable_gqa=gqa, return_lse=True, **kw)
    ref, ref_lse = reference.flex_attention(q, k, v, block_mask=bm, enable_gqa=gqa, return_lse=True)
    assert_sdpa_close(out, ref, dtype, vmax_of(v), logit_magnitude(q, k), lse, ref_lse, ctx=ctx)
    return out, lse


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", sorted(MODS))
def test_flex_forward_matches_reference(isa, name):
    rng = np.random.default_rng(abs(hash(name)) % 1000)
    B, Hq, H, L, S = 2, 4, 2, 150, 300
    q, k, v = _qkv(rng, B, Hq, H, L, S, 24, 9)
    for bs in (64, (32, 128), (48, 80)):
        bm = selfattn.create_block_mask(MODS[name], B, Hq, L, S, BLOCK_SIZE=bs)
        with selfattn.use_isa(isa):
            for dtype in DTYPES:
                _check_forward(q, k, v, bm, dtype, True, f"{isa} {name} {bs} {np.dtype(dtype)}: ")


@pytest.mark.parametrize("schedule", [None, "shared", "fused", "decode"])
@pytest.mark.parametrize("L", [1, 5, 16, 70])
def test_flex_every_schedule(schedule, L):
    rng = np.random.default_rng(L)
    S = 700
    q, k, v = _qkv(rng, 2, 8, 2, L, S, 32, 32)
    mod = lambda b, h, qi, ki: (DOC[qi + S - L] == DOC[ki]) | (ki < 3)      # noqa: E731 (bottom rows)
    bm = selfattn.create_block_mask(mod, None, None, L, S, BLOCK_SIZE=(16, 64))
    for isa in ISAS:
        with selfattn.use_isa(isa), forced_schedule(schedule):
            for dtype in DTYPES:
                _check_forward(q, k, v, bm, dtype, True, f"{isa} {schedule} L{L} {np.dtype(dtype)}: ")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", ["causal", "document_causal", "random_table", "per_head_window",
                                  "per_batch_length", "dilated_window", "nothing", "prefix_lm", "and_or",
                                  "global_tokens"])
def test_flex_backward_matches_reference(isa, name):
    rng = np.random.default_rng(3)
    B, Hq, H, L, S = 2, 4, 2, 140, 260
    q, k, v = _qkv(rng, B, Hq, H, L, S, 16, 8)
    bm = selfattn.create_block_mask(MODS[name], B, Hq, L, S, BLOCK_SIZE=(32, 64))
    ref, ref_vjp = reference.flex_attention_vjp(q, k, v, block_mask=bm, enable_gqa=True)
    g = rng.standard_normal(ref.shape)
    want = ref_vjp(g)
    with selfattn.use_isa(isa):
        for dtype, tol in ((np.float32, 2e-4), (np.float64, 1e-11)):
            out, vjp = selfattn.flex_attention_vjp(q.astype(dtype), k.astype(dtype), v.astype(dtype), block_mask=bm,
                                                   enable_gqa=True)
            got = vjp(g.astype(dtype))
            for nm, a, b in zip(("dq", "dk", "dv"), got, want):
                assert a.dtype == dtype and a.shape == b.shape
                err = np.abs(a - b).max() / max(1.0, np.abs(b).max())
                assert err < tol, f"{isa} {name} {np.dtype(dtype)} {nm}: {err:.2e}"


def test_flex_same_bits_at_any_thread_count():
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, 2, 4, 2, 300, 400, 32, 16, np.float32)
    bm = selfattn.create_block_mask(MODS["document_causal"], None, None, 300, 400, BLOCK_SIZE=64)
    for isa in ISAS:
        with selfattn.use_isa(isa):
            base = None
            for nt in (1, 2, 3, 4):
                out, vjp = selfattn.flex_attention_vjp(q, k, v, block_mask=bm, enable_gqa=True, num_threads=nt)
                res = (out,) + vjp(np.ones_like(out))
                if base is None:
                    base = res
                for a, b in zip(res, base):
                    assert_bits(a, b, f"{isa} threads {nt}")


def test_rows_that_see_nothing():
    rng = np.random.default_rng(6)
    q, k, v = _qkv(rng, 1, 2, 2, 70, 90, 8, 8)
    mod = lambda b, h, qi, ki: (qi % 3 != 0) & (ki <= qi)       # noqa: E731 (every third row sees nothing)
    bm = selfattn.create_block_mask(mod, None, None, 70, 90, BLOCK_SIZE=16)
    for isa in ISAS:
        with selfattn.use_isa(isa):
            out, lse = selfattn.flex_attention(q, k, v, block_mask=bm, return_lse=True)
            assert (out[:, :, ::3] == 0).all() and np.isneginf(lse[:, :, ::3]).all()
            assert np.isfinite(out).all() and np.isfinite(lse[:, :, 1::3]).all()


def test_empty_blocks_are_never_read():
    """Documents of 512 tokens in blocks of 128 (a multiple of every kernel's key block): NaN in
    the keys and values of every other document leaves document 0's rows, and their dq, the same
    bits -- the rows of the kernel's query tiles that lie in document 0 (a tile that also holds
    rows of document 1 reads its keys, and a masked key's NaN value reaches P.V as 0 * NaN, as
    in any attention with a mask)."""
    L = 2048
    doc = np.repeat(np.arange(4), 512)
    rng = np.random.default_rng(8)
    q, k, v = _qkv(rng, 1, 2, 2, L, L, 32, 32, np.float32)
    bm = selfattn.create_block_mask(lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki), None, None, L, L)
    assert bm.sparsity() > 60
    kn, vn = k.copy(), v.copy()
    kn[:, :, 512:] = np.nan
    vn[:, :, 512:] = np.nan
    for isa in ISAS:
        n = 512 // tile_params(isa, np.float32)["bq"] * tile_params(isa, np.float32)["bq"]
        assert n >= 256
        with selfattn.use_isa(isa):
            out, vjp = selfattn.flex_attention_vjp(q, k, v, block_mask=bm)
            outn, vjpn = selfattn.flex_attention_vjp(q, kn, vn, block_mask=bm)
            assert_bits(outn[:, :, :n], out[:, :, :n], isa)
            g = np.ones_like(out)
            assert_bits(vjpn(g)[0][:, :, :n], vjp(g)[0][:, :, :n], isa + " dq")


DILATED = {   # mod, the stride its pairs share (every visible q_idx - kv_idx a multiple of it)
    "window_stride_2": (lambda b, h, q, k: (abs(q - k) < 120) & ((q - k) % 2 == 0), 2),
    "window_stride_3": (MODS["dilated_window"], 3),
    "causal_stride_4": (lambda b, h, q, k: (q >= k) & ((q - k) % 4 == 0), 4),
    "every_2nd_key": (lambda b, h, q, k: (q - k) % 2 == 0, 2),
    "per_head_2_and_4": (lambda b, h, q, k: (abs(q - k) < 100) & ((q - k) % (2 + 2 * (h % 2)) == 0), 2),
    "late_odd_pair": (lambda b, h, q, k: ((q - k) % 2 == 0) | ((q == 140) & (k == 3)), 1),
}


@pytest.mark.parametrize("name", sorted(DILATED))
def test_dilated_masks_run_as_strided_classes(name):
    """Key compaction: a mask whose visible pairs all have q_idx = kv_idx (mod D) runs as D strided
    classes (rows r, r + D, ... against keys r, r + D, ...), each under its own block mask. The gcd
    is found over every block row (late_odd_pair: one pair at row 140 breaks stride 2: one call).
    Forward and backward against the float64 reference on every ISA, uneven class lengths (L, S
    not multiples of D), GQA; the same bits at any thread count; close to the one-call run."""
    mod, D = DILATED[name]
    rng = np.random.default_rng(21)
    B, Hq, H, L, S = 2, 4, 2, 151, 262
    q, k, v = _qkv(rng, B, Hq, H, L, S, 16, 8)
    bm = selfattn.create_block_mask(mod, B, Hq, L, S, BLOCK_SIZE=(16, 32))
    assert bm._dilation == D
    assert (bm._classes is not None) == (D > 1) and (D == 1 or bm._classes.D == D), repr(bm)
    want_mask = reference.flex_mask(mod, B, Hq, L, S)
    assert (np.broadcast_to(bm.to_bool(), want_mask.shape) == want_mask).all()
    plain = selfattn.create_block_mask(mod, B, Hq, L, S, BLOCK_SIZE=(16, 32))
    plain._classes = None
    ref, ref_vjp = reference.flex_attention_vjp(q, k, v, block_mask=bm, enable_gqa=True)
    g = rng.standard_normal(ref.shape)
    want = (ref,) + ref_vjp(g)
    for isa in ISAS:
        with selfattn.use_isa(isa):
            for dtype, tol in ((np.float32, 2e-4), (np.float64, 1e-11)):
                a = [x.astype(dtype) for x in (q, k, v)]
                base = None
                for nt in (1, 2, 3):
                    out, vjp = selfattn.flex_attention_vjp(*a, block_mask=bm, enable_gqa=True, num_threads=nt)
                    res = (out,) + vjp(g.astype(dtype))
                    if base is None:
                        base = res
                        for nm, x, y in zip(("out", "dq", "dk", "dv"), res, want):
                            assert x.dtype == dtype and x.shape == y.shape
                            err = np.abs(x - y).max() / max(1.0, np.abs(y).max())
                            assert err < tol, f"{isa} {name} {np.dtype(dtype)} {nm}: {err:.2e}"
                        out1, vjp1 = selfattn.flex_attention_vjp(*a, block_mask=plain, enable_gqa=True)
                        for x, y in zip(res, (out1,) + vjp1(g.astype(dtype))):
                            assert np.abs(x - y).max() <= 4 * tol * max(1.0, np.abs(y).max())
                    for x, y in zip(res, base):
                        assert_bits(x, y, f"{isa} {name} threads {nt}")
            out, lse = selfattn.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True)
            ref_out, ref_lse = reference.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True)
            assert np.abs(lse - ref_lse).max() < 1e-11 and np.abs(out - ref_out).max() < 1e-11


def test_dilated_mask_with_score_mod_and_in_16_bit():
    """score_mod reads the true q_idx / kv_idx, so with one the mask runs as one call; 16-bit
    inputs go through the strided classes too."""
    mod, D = DILATED["window_stride_2"]
    bm = selfattn.create_block_mask(mod, None, None, 100, 200, BLOCK_SIZE=16)
    assert bm._classes is not None and bm._classes.D == 2 and "2 strided classes" in repr(bm)
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, 1, 2, 2, 100, 200, 16, 16)
    sm = lambda s, b, h, qi, ki: s + 0.05 * (qi - ki)            # noqa: E731
    out = selfattn.flex_attention(q, k, v, sm, block_mask=bm)
    assert np.abs(out - reference.flex_attention(q, k, v, sm, block_mask=bm)).max() < 1e-11
    for dtname in ("float16", "bfloat16"):
        check_flex_16_bit(dtname, block_mask=bm)


@pytest.mark.parametrize("dtname", ["float16", "bfloat16"])
def test_flex_16_bit(dtname):
    check_flex_16_bit(dtname, block_mask=selfattn.create_block_mask(MODS["document_causal"], None, None, 100, 200,
                                                                    BLOCK_SIZE=32))


def test_no_block_mask_is_plain_attention_and_inputs_untouched():
    rng = np.random.default_rng(10)
    q, k, v = _qkv(rng, 2, 2, 2, 33, 45, 8, 8, np.float32)
    bm = selfattn.create_block_mask(MODS["causal"], None, None, 33, 45, BLOCK_SIZE=16)
    snaps = snapshot(q, k, v)
    assert_bits(selfattn.flex_attention(q, k, v), selfattn.scaled_dot_product_attention(q, k, v))
    out = selfattn.flex_attention(q, k, v, block_mask=bm, scale=0.3)
    assert_sdpa_close(out, reference.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3),
                      np.float32, vmax_of(v), logit_magnitude(q, k, 0.3))
    assert_unchanged((q, k, v), snaps)
    table = bm._table.copy()
    selfattn.flex_attention_vjp(q, k, v, block_mask=bm)[1](np.ones((2, 2, 33, 8), np.float32))
    assert (bm._table == table).all()


def test_empty_sizes():
    bm = selfattn.create_block_mask(MODS["causal"], None, None, 0, 10)
    assert selfattn.flex_attention(np.zeros((1, 1, 0, 4)), np.zeros((1, 1, 10, 4)), np.zeros((1, 1, 10, 4)),
                                   block_mask=bm).shape == (1, 1, 0, 4)
    bm = selfattn.create_block_mask(MODS["causal"], None, None, 3, 0)
    out, lse = selfattn.flex_attention(np.ones((1, 1, 3, 4)), np.zeros((1, 1, 0, 4)), np.zeros((1, 1, 0, 4)),
                                       block_mask=bm, return_lse=True)
    assert (out == 0).all() and np.isneginf(lse).all()


Q4 = np.zeros((1, 2, 8, 4), np.float32)
BM8 = selfattn.create_block_mask(MODS["causal"], None, None, 8, 8, BLOCK_SIZE=4)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: selfattn.create_block_mask("causal", 1, 1, 8, 8), TypeError, "mask_mod must be callable"),
    (lambda: selfattn.create_block_mask(lambda b, h, q, k: q - k, 1, 1, 8, 8), TypeError, "must return bool"),
    (lambda: selfattn.create_block_mask(lambda b, h, q, k: (q > 1) and (k > 1), 1, 1, 8, 8), TypeError,
     "elementwise operations"),
    (lambda: selfattn.create_block_mask(lambda b, h, q, k: np.ones((2, 2, 2, 2, 2), bool), 1, 1, 8, 8),
     ValueError, "broadcast"),
    (lambda: selfattn.create_block_mask(lambda b, h, q, k: np.ones((3, 1, 1, 1), bool), 2, 1, 8, 8),
     ValueError, "broadcast"),
    (lambda: selfattn.create_block_mask(MODS["causal"], 0, 1, 8, 8), ValueError, "B must be"),
    (lambda: selfattn.create_block_mask(MODS["causal"], 1, 1.5, 8, 8), TypeError, "H must be"),
    (lambda: selfattn.create_block_mask(MODS["causal"], 1, 1, -1, 8), ValueError, "Q_LEN"),
    (lambda: selfattn.create_block_mask(MODS["causal"], 1, 1, 8, 8, BLOCK_SIZE=0), ValueError, "BLOCK_SIZE"),
    (lambda: selfattn.create_block_mask(MODS["causal"], 1, 1, 8, 8, BLOCK_SIZE=(4, 4, 4)), ValueError,
     "BLOCK_SIZE"),
    (lambda: selfattn.create_block_mask(MODS["causal"], 1, 1, 8, 8, device="cuda"), ValueError, "device"),
    (lambda: selfattn.flex_attention(Q4, Q4, Q4, score_mod="alibi"), TypeError, "score_mod must be callable"),
    (lambda: selfattn.flex_attention(Q4[0], Q4[0], Q4[0]), ValueError, "4-D"),
    (lambda: selfattn.flex_attention(Q4, Q4, Q4, block_mask=np.ones((8, 8), bool)), TypeError, "BlockMask"),
    (lambda: selfattn.flex_attention(Q4[:, :, :7], Q4, Q4, block_mask=BM8), ValueError, "Q_LEN=8"),
    (lambda: selfattn.flex_attention(Q4, Q4, Q4, block_mask=selfattn.create_block_mask(
        MODS["per_head_window"], 1, 3, 8, 8)), ValueError, "H=3"),
    (lambda: selfattn.flex_attention(Q4, Q4[:, :1], Q4[:, :1], block_mask=BM8), ValueError, "enable_gqa"),
    (lambda: selfattn.flex_attention_vjp(Q4, Q4, Q4, score_mod=abs), TypeError, "raised TypeError while being traced"),
    (lambda: selfattn._core.sdpa(Q4, Q4, Q4, attn_mask=np.ones((8, 8), bool), block_mask=BM8._kernel_mask()),
     TypeError, "exclude each other"),
    (lambda: selfattn._core.sdpa(Q4, Q4, Q4, block_mask=(BM8._table, BM8._bits, 4, 2)), TypeError, "bits uint8"),
    (lambda: selfattn._core.sdpa(Q4, Q4, Q4, block_mask=(BM8._table + 7, BM8._bits, 4, 4)), ValueError,
     "neither empty, full"),
])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_torch_flex_attention_is_the_oracle():
    torch = optional_import("torch")
    from torch.nn.attention import flex_attention as tfa
    import selfattn.torch as st
    torch.manual_seed(0)
    B, Hq, H, L, S, E = 2, 4, 2, 150, 200, 16
    rng = np.random.default_rng(11)
    q, k, v = _qkv(rng, B, Hq, H, L, S, E, E)
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    tables = {n: torch.from_numpy(np.ascontiguousarray(reference.flex_mask(m, B, Hq, L, S))) for n, m in MODS.items()}
    for name, mod in MODS.items():
        tab = tables[name]
        tmod = lambda b, h, qi, ki, tab=tab: tab[b, h, qi, ki]        # noqa: E731 (the same mask, in torch)
        tbm = tfa.create_block_mask(tmod, B, Hq, L, S, device="cpu")
        bm = selfattn.create_block_mask(mod, B, Hq, L, S)
        assert (np.broadcast_to(bm.to_dense(), tuple(tbm.to_dense().shape)) == tbm.to_dense().numpy()).all(), name
        with torch.no_grad():
            tout, aux = tfa.flex_attention(tq, tk, tv, block_mask=tbm, enable_gqa=True,
                                           return_aux=tfa.AuxRequest(lse=True))
            tlse = aux.lse
        out, lse = selfattn.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True)
        seen = np.isfinite(lse)
        assert np.abs(out[seen] - tout.numpy()[seen]).max(initial=0.0) < 1e-12, name
        assert (np.abs(lse[seen] - tlse.numpy()[seen]) < 1e-12).all(), name
        assert (out[~seen] == 0).all() and (tout.numpy()[~seen] == 0).all(), name
        # the bridge's gradients against torch's own SDPA with the same dense mask
        tq2, tk2, tv2 = (t.clone().requires_grad_() for t in (tq, tk, tv))
        o = st.flex_attention(tq2, tk2, tv2, block_mask=bm, enable_gqa=True)
        g = torch.from_numpy(rng.standard_normal(o.shape))
        got = torch.autograd.grad(o, (tq2, tk2, tv2), g)
        tq3, tk3, tv3 = (t.clone().requires_grad_() for t in (tq, tk, tv))
        so = torch.nn.functional.scaled_dot_product_attention(tq3, tk3, tv3, attn_mask=tab, enable_gqa=True)
        want = torch.autograd.grad(so, (tq3, tk3, tv3), g)
        for a, b in zip(got, want):
            fin = torch.isfinite(b)
            assert (a[fin] - b[fin]).abs().max() < 1e-10, name
