"""Paged KV caches: selfattn.paged_attention and selfattn.PagedKVCache.

The contract: a paged call is the dense call on the gathered pages, bit for bit (the decode
schedule reads the same values in the same order, only from other addresses), on every path and
dtype, with every option; the dense call is itself checked against the float64 reference here too.
Rows of pages no sequence uses are NaN in these tests, and the block table's unused entries -1 or
out of range: a read of either would show.
"""

import numpy as np
import pytest

import selfattn
from selfattn import reference
from sa_testutil import (AVAILABLE_ISAS, ISAS, assert_bits, assert_sdpa_close, assert_unchanged, forced_schedule,
                         logit_magnitude, optional_import, snapshot, vmax_of)

sdpa = selfattn.scaled_dot_product_attention


def _pool(rng, seq_lens, ps, H, E, Ev, dtype, spare=3, max_blocks=None):
    """Pages for these sequences in shuffled blocks, spare blocks NaN; (k_pages, v_pages, block_table)
    with unused table entries -1 (and one huge)."""
    need = [-(-int(n) // ps) for n in seq_lens]
    nb = sum(need) + spare
    width = max(need + [0]) + 1 if max_blocks is None else max_blocks
    perm = rng.permutation(nb)
    kp = rng.standard_normal((nb, ps, H, E)).astype(dtype)
    vp = rng.standard_normal((nb, ps, H, Ev)).astype(dtype)
    bt = np.full((len(seq_lens), width), -1, np.int64)
    at = 0
    for b, m in enumerate(need):
        bt[b, :m] = perm[at:at + m]
        at += m
        if m < width:
            bt[b, -1] = 1 << 40                     # never read (past the sequence's pages)
    unused = perm[at:]
    if np.issubdtype(np.dtype(dtype), np.floating) or np.dtype(dtype).name == "bfloat16":
        kp[unused] = np.nan
        vp[unused] = np.nan
        for b, n in enumerate(seq_lens):            # the rows of a last page past the sequence's end
            if n % ps:
                kp[bt[b, need[b] - 1], n % ps:] = np.nan
                vp[bt[b, need[b] - 1], n % ps:] = np.nan
    return kp, vp, bt


def _dense(pages, bt, seq_lens):
    """(B, H, max(seq_lens), width): what a dense cache holds."""
    S = int(max(seq_lens, default=0))
    ps = pages.shape[1]
    nb = -(-S // ps)
    idx = np.where(bt[:, :nb] >= 0, bt[:, :nb], 0) % pages.shape[0]
    g = pages[idx].reshape((bt.shape[0], nb * ps) + pages.shape[2:])[:, :S]
    return np.ascontiguousarray(np.moveaxis(g, 2, 1))


OPTIONS = [
    {},
    {"scale": 0.3},
    {"window_size": 37},
    {"window_size": (50, None), "num_sink_tokens": 4},
    {"alibi_slopes": np.linspace(0.01, 0.2, 8)},
    {"softcap": 3.0},
    {"sinks": np.linspace(-1, 2, 8)},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("ps", [1, 5, 16, 128, 200])
def test_paged_equals_dense_bits_every_isa(opts, ps):
    rng = np.random.default_rng(ps)
    B, Hq, H, n, E = 4, 8, 2, 2, 64
    seq_lens = [1, 300, 129, 77]
    kp, vp, bt = _pool(rng, seq_lens, ps, H, E, E, np.float32)
    q = rng.standard_normal((B, Hq, n, E)).astype(np.float32)
    sl = np.array(seq_lens)
    kd, vd = _dense(kp, bt, sl), _dense(vp, bt, sl)
    snaps = snapshot(q, kp, vp, bt, sl)
    for isa in ISAS:
        with selfattn.use_isa(isa):
            out, lse = selfattn.paged_attention(q, kp, vp, bt, sl, return_lse=True, **opts)
            ref, ref_lse = sdpa(q, kd, vd, is_causal=True, alignment="bottom_right", key_lengths=sl,
                                enable_gqa=True, return_lse=True, **opts)
        assert_bits(out, ref, f"[{isa}] out")
        assert_bits(lse, ref_lse, f"[{isa}] lse")
    assert_unchanged((q, kp, vp, bt, sl), snaps)
    # and the dense call (so the paged one) against the float64 reference
    r, rl = reference.scaled_dot_product_attention(q.astype(np.float64), kd.astype(np.float64), vd.astype(np.float64),
                                                   is_causal=True, alignment="bottom_right", key_lengths=sl,
                                                   enable_gqa=True, return_lse=True, **opts)
    assert_sdpa_close(out, r, np.float32, vmax_of(vd), logit_magnitude(q, np.nan_to_num(kd)), lse, rl)


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
def test_paged_other_dtypes_bits(dtype):
    if dtype == "bfloat16":
        dt = optional_import("ml_dtypes").bfloat16
    else:
        dt = np.dtype(dtype)
    rng = np.random.default_rng(3)
    seq_lens = [40, 7, 260]
    kp, vp, bt = _pool(rng, seq_lens, 16, 2, 48, 40, dt)
    q = rng.standard_normal((3, 4, 1, 48)).astype(dt)
    sl = np.array(seq_lens)
    kd, vd = _dense(kp, bt, sl), _dense(vp, bt, sl)
    for isa in ISAS:
        with selfattn.use_isa(isa):
            out = selfattn.paged_attention(q, kp, vp, bt, sl, window_size=100)
            ref = sdpa(q, kd, vd, is_causal=True, alignment="bottom_right", key_lengths=sl, enable_gqa=True,
                       window_size=100)
        assert out.dtype == q.dtype
        assert_bits(out, ref, f"[{isa}] {dtype}") if out.itemsize <= 4 else np.testing.assert_array_equal(out, ref)


def test_paged_int8_bits_and_reference():
    rng = np.random.default_rng(4)
    seq_lens = [33, 500, 1]
    ps, H, E = 16, 2, 64
    kf, vf, bt = _pool(rng, seq_lens, ps, H, E, E, np.float32, spare=0)
    kq, ks = selfattn.quantize_kv(np.nan_to_num(kf))
    vq, vs = selfattn.quantize_kv(np.nan_to_num(vf))
    ks[np.isnan(kf).any(-1)] = np.nan                  # rows past the sequences: NaN scales, never read
    vs[np.isnan(vf).any(-1)] = np.nan
    q = rng.standard_normal((3, 8, 1, E)).astype(np.float32)
    sl = np.array(seq_lens)
    kd, vd, ksd, vsd = _dense(kq, bt, sl), _dense(vq, bt, sl), _dense(ks, bt, sl), _dense(vs, bt, sl)
    for isa in ISAS:
        with selfattn.use_isa(isa):
            out, lse = selfattn.paged_attention(q, kq, vq, bt, sl, k_scale=ks, v_scale=vs, return_lse=True)
            ref, rl = sdpa(q, kd, vd, k_scale=ksd, v_scale=vsd, is_causal=True, alignment="bottom_right",
                           key_lengths=sl, enable_gqa=True, return_lse=True)
        assert_bits(out, ref, f"[{isa}] int8")
        assert_bits(lse, rl, f"[{isa}] int8 lse")
    kdd = kd.astype(np.float64) * ksd[..., None]
    vdd = vd.astype(np.float64) * vsd[..., None]
    r, rlse = reference.scaled_dot_product_attention(q.astype(np.float64), kdd, vdd, is_causal=True,
                                                     alignment="bottom_right", key_lengths=sl, enable_gqa=True,
                                                     return_lse=True)
    assert_sdpa_close(out, r, np.float32, vmax_of(vdd), logit_magnitude(q, kdd), lse, rlse)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
def test_paged_equals_dense_bits_when_prefetched(kind):
    """K/V larger than a core's L2: the decode prefetches the next key block's K and V rows while
    it computes one (dense: the rows that follow; paged: found through the block table, in the
    task's own chunk). The plan says so, and the bits are the dense call's, on every path, with
    several blocks per chunk and a last partial one."""
    rng = np.random.default_rng(12)
    seq_lens = [2100, 1, 700, 1500]
    ps, H, E = 16, 2, 64
    dt = optional_import("ml_dtypes").bfloat16 if kind == "bfloat16" else np.float32
    kp, vp, bt = _pool(rng, seq_lens, ps, H, E, E, dt, spare=0 if kind == "int8" else 3)
    extra = {}
    if kind == "int8":
        kp, ks = selfattn.quantize_kv(np.nan_to_num(kp))
        vp, vs = selfattn.quantize_kv(np.nan_to_num(vp))
        extra = dict(k_scale=ks, v_scale=vs)
    q = rng.standard_normal((4, 8, 1, E)).astype(dt)
    sl = np.array(seq_lens)
    kd, vd = _dense(kp, bt, sl), _dense(vp, bt, sl)
    dense_extra = {n: _dense(a, bt, sl) for n, a in extra.items()}
    dense_kw = dict(is_causal=True, alignment="bottom_right", key_lengths=sl, enable_gqa=True, **dense_extra)
    plan = selfattn._core.paged(selfattn._core.describe_paged(q, kp, vp, bt, sl, **extra), schedule_only=True)
    assert plan["decode"] and plan["prefetch"]
    assert selfattn._core.sdpa(q, kd, vd, schedule_only=True, **dense_kw)["prefetch"]
    small = selfattn._core.sdpa(q[:1], kd[:1, :, :100], vd[:1, :, :100], enable_gqa=True, schedule_only=True)
    assert small["decode"] and not small["prefetch"]          # 100 keys: K/V stay in L2
    for isa in ISAS + [i for i in ("avx512bf16",) if i in AVAILABLE_ISAS and kind == "bfloat16"]:
        for opts in ({}, dict(window_size=300)):
            with selfattn.use_isa(isa):
                out, lse = selfattn.paged_attention(q, kp, vp, bt, sl, return_lse=True, **extra, **opts)
                ref, rl = sdpa(q, kd, vd, return_lse=True, **dense_kw, **opts)
            assert_bits(out, ref, f"[{isa}] {kind} {opts}")
            assert_bits(lse, rl, f"[{isa}] {kind} lse {opts}")


def test_paged_threads_bit_identical_and_split():
    rng = np.random.default_rng(5)
    seq_lens = [4000, 17, 2500, 9000]
    kp, vp, bt = _pool(rng, seq_lens, 16, 4, 64, 64, np.float32)
    q = rng.standard_normal((4, 16, 1, 64)).astype(np.float32)
    sl = np.array(seq_lens)
    plans = {t: selfattn._core.paged(selfattn._core.describe_paged(q, kp, vp, bt, sl, num_threads=t),
                                     schedule_only=True) for t in (1, 2, 3, 5, 64)}
    assert all(p["decode"] for p in plans.values()) and plans[3]["compute_tasks"] > 3   # keys split: several tasks
    # a sequence's kv heads in one task (a gang) when there are tasks enough, one head per task else: the
    # same bits either way
    assert plans[1]["compute_tasks"] < plans[64]["compute_tasks"]
    outs = [selfattn.paged_attention(q, kp, vp, bt, sl, num_threads=t, return_lse=True) for t in (1, 2, 3, 5, 64)]
    for o, lse in outs[1:]:
        assert_bits(o, outs[0][0], "threads out")
        assert_bits(lse, outs[0][1], "threads lse")


@pytest.mark.parametrize("n,Hq", [(5, 4), (20, 2), (3, 8)])
def test_paged_many_rows_gather_equals_dense(n, Hq):
    """Hq / H x n > 16 rows per kv head: the pages gathered, the dense kernel; same bits."""
    rng = np.random.default_rng(6)
    seq_lens = [64, 21, 150]
    kp, vp, bt = _pool(rng, seq_lens, 8, 1, 32, 32, np.float64)
    q = rng.standard_normal((3, Hq, n, 32))
    sl = np.array(seq_lens)
    p = selfattn._core.describe_paged(q, kp, vp, bt, sl)
    assert selfattn._core.paged_decodes(p) == (Hq * n <= 16)
    out, lse = selfattn.paged_attention(q, kp, vp, bt, sl, return_lse=True, sinks=np.zeros(Hq))
    kd, vd = _dense(kp, bt, sl), _dense(vp, bt, sl)
    ref, rl = sdpa(q, kd, vd, is_causal=True, alignment="bottom_right", key_lengths=sl, enable_gqa=True,
                   return_lse=True, sinks=np.zeros(Hq))
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(lse, rl)


def test_paged_empty_sequences_and_rows():
    rng = np.random.default_rng(7)
    kp = rng.standard_normal((4, 4, 1, 8))
    vp = rng.standard_normal((4, 4, 1, 8))
    bt = np.array([[2, 1], [3, -1]])
    q = rng.standard_normal((2, 2, 3, 8))
    out, lse = selfattn.paged_attention(q, kp, vp, np.array([[2, 1], [-1, -1]]), np.array([5, 0]), return_lse=True)
    assert (out[1] == 0).all() and np.isneginf(lse[1]).all()
    assert (out[0, :, 0] != 0).all()
    allzero = selfattn.paged_attention(q, kp, vp, bt, np.array([0, 0]))
    assert (allzero == 0).all()
    # a query row before the sequence's first position: zeros
    out1 = selfattn.paged_attention(q, kp, vp, bt, np.array([2, 1]))
    assert (out1[0, :, 0] == 0).all() and (out1[1, :, :2] == 0).all() and (out1[1, :, 2] != 0).all()


@pytest.mark.parametrize("call,exc,msg", [
    (lambda a: selfattn.paged_attention(a["q"][0], a["kp"], a["vp"], a["bt"], a["sl"]), ValueError, "query must be 4-D"),
    (lambda a: selfattn.paged_attention(a["q"], a["kp"][0], a["vp"], a["bt"], a["sl"]), ValueError, "k_pages must be 4-D"),
    (lambda a: selfattn.paged_attention(a["q"], a["kp"], a["vp"][:, :2], a["bt"], a["sl"]), ValueError,
     "must have the same \\(num_blocks"),
    (lambda a: selfattn.paged_attention(a["q"], a["kp"], a["vp"], a["bt"].astype(float), a["sl"]), TypeError,
     "block_table must be a 2-D integer"),
    (lambda a: selfattn.paged_attention(a["q"], a["kp"], a["vp"], a["bt"][:1], a["sl"]), ValueError,
     "block_table has 1 rows"),
    (lambda a: selfattn.paged_attention(a["q"], a["kp"], a["vp"], a["bt"], [3]), ValueError, "seq_lens has 1"),
    (lambda a: selfattn.paged_attention(a["q"], a["kp"], a["vp"], a["bt"], [3, 99]), ValueError,
     "seq_lens must be in \\[0, max_blocks"),
    (lambda a: selfattn.paged_attention(a["q"], a["kp"], a["vp"], np.array([[0, 9], [1, 2]]), [5, 3]), ValueError,
     "block_table row 0 names a block outside"),
    (lambda a: selfattn.paged_attention(a["q"].astype(np.float64), a["kp"], a["vp"], a["bt"], a["sl"]), TypeError,
     "one dtype"),
    (lambda a: selfattn.paged_attention(a["q"][:, :3], a["kp"], a["vp"], a["bt"], a["sl"]), ValueError,
     "multiple of key/value heads"),
    (lambda a: selfattn.paged_attention(a["q"], a["kp"].astype(np.int8), a["vp"].astype(np.int8), a["bt"], a["sl"],
                                        k_scale=np.ones((4, 4, 2), np.float32)), TypeError, "go together"),
    (lambda a: selfattn.paged_attention(a["q"], a["kp"].astype(np.int8), a["vp"].astype(np.int8), a["bt"], a["sl"],
                                        k_scale=np.ones((4, 4), np.float32), v_scale=np.ones((4, 4), np.float32)),
     ValueError, "k_scale must broadcast to the shape of k_pages"),
])
def test_paged_misuse(call, exc, msg):
    rng = np.random.default_rng(8)
    a = {"q": rng.standard_normal((2, 4, 1, 8)).astype(np.float32),
         "kp": rng.standard_normal((4, 4, 2, 8)).astype(np.float32),
         "vp": rng.standard_normal((4, 4, 2, 8)).astype(np.float32),
         "bt": np.array([[0, 1], [2, 3]]), "sl": np.array([5, 3])}
    with pytest.raises(exc, match=msg):
        call(a)


def test_paged_no_backward():
    rng = np.random.default_rng(9)
    q = rng.standard_normal((1, 1, 1, 8))
    kp = rng.standard_normal((2, 4, 1, 8))
    p = selfattn._core.describe_paged(q, kp, kp, np.array([[0, 1]]), np.array([6]))
    out, lse = selfattn._core.paged(p, return_lse=True)
    with pytest.raises(TypeError, match="no backward through a paged KV cache"):
        p.backward(out, lse, out)


def test_paged_forced_other_schedule_gathers():
    """A forced non-decode schedule (test hook) takes the gathered path: same bits as dense."""
    rng = np.random.default_rng(10)
    seq_lens = [30, 70]
    kp, vp, bt = _pool(rng, seq_lens, 16, 1, 16, 16, np.float32)
    q = rng.standard_normal((2, 2, 1, 16)).astype(np.float32)
    sl = np.array(seq_lens)
    kd, vd = _dense(kp, bt, sl), _dense(vp, bt, sl)
    with forced_schedule("shared"):
        out = selfattn.paged_attention(q, kp, vp, bt, sl)
        ref = sdpa(q, kd, vd, is_causal=True, alignment="bottom_right", key_lengths=sl, enable_gqa=True)
    assert_bits(out, ref)


# ------------------------------------------------------------------ PagedKVCache

def _decode_both(rng, dense, paged, ids, H, E, steps, Hq, dtype):
    for _ in range(steps):
        k = rng.standard_normal((len(ids), H, 1, E)).astype(dtype)
        v = rng.standard_normal((len(ids), H, 1, E)).astype(dtype)
        dense.append(k, v)
        paged.append(ids, k, v)
        q = rng.standard_normal((len(ids), Hq, 1, E)).astype(dtype)
        a = dense.attend(q, return_lse=True)
        b = paged.attend(q, ids, return_lse=True)
        assert_bits(a[0], b[0], "cache out")
        assert_bits(a[1], b[1], "cache lse")


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_cache_equals_kvcache_bits(kv_dtype):
    rng = np.random.default_rng(11)
    B, H, Hq, E = 3, 2, 8, 32
    dense = selfattn.KVCache(B, H, 600, E, dtype=np.float32, kv_dtype=kv_dtype)
    paged = selfattn.PagedKVCache(200, 16, H, E, dtype=np.float32, kv_dtype=kv_dtype)
    ids = [paged.add_sequence() for _ in range(B)]
    lens = [37, 290, 5]
    T = max(lens)
    k = rng.standard_normal((B, H, T, E)).astype(np.float32)
    v = rng.standard_normal((B, H, T, E)).astype(np.float32)
    dense.append(k, v, counts=lens)
    paged.append(ids, k, v, counts=lens)
    assert [paged.seq_len(s) for s in ids] == lens
    for b, s in enumerate(ids):
        np.testing.assert_array_equal(paged.keys(s), dense.keys[b, :, :lens[b]])
    _decode_both(rng, dense, paged, ids, H, E, 20, Hq, np.float32)
    assert paged.num_free_blocks == 200 - sum(-(-(n + 20) // 16) for n in lens)


def test_cache_fork_copy_on_write_and_free():
    rng = np.random.default_rng(12)
    H, E, bs = 1, 8, 4
    c = selfattn.PagedKVCache(10, bs, H, E, dtype=np.float64)
    a = c.add_sequence()
    k = rng.standard_normal((1, H, 6, E))
    c.append([a], k, k)                         # 6 positions: 2 blocks, the last half full
    before = (c.keys(a).copy(), c.num_free_blocks)
    b = c.fork(a)
    assert c.num_free_blocks == before[1]      # nothing copied yet
    kb = rng.standard_normal((1, H, 1, E))
    c.append([b], kb, kb)                       # b writes: its shared last block is copied first
    np.testing.assert_array_equal(c.keys(a), before[0])     # a unchanged
    np.testing.assert_array_equal(c.keys(b)[:, :6], before[0])
    np.testing.assert_array_equal(c.keys(b)[:, 6], kb[0, :, 0])
    assert c.num_free_blocks == before[1] - 1
    ta, tb = c.block_table([a, b])[0], None
    tb = c.block_table([b])[0]
    assert ta[0, 0] == tb[0, 0] and ta[0, 1] != tb[0, 1]   # first block shared, last one not
    # attention on the fork equals attention on a sequence built from scratch with the same rows
    fresh = c.add_sequence()
    c.append([fresh], c.keys(b)[None], c.values(b)[None])
    q = np.repeat(rng.standard_normal((1, 2, 1, E)), 2, axis=0)
    o = c.attend(q, [b, fresh])
    np.testing.assert_array_equal(o[0], o[1])
    c.free(a)
    assert c.num_free_blocks == 10 - 2 - 2      # b holds 2 blocks (one shared with a, now its own), fresh 2
    c.free(b)
    c.free(fresh)
    assert c.num_free_blocks == 10 and (c._ref == 0).all()
    with pytest.raises(KeyError, match="no sequence"):
        c.attend(q[:1], [a])


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_cache_crop_releases_blocks_and_keeps_forks_apart(kv_dtype):
    """crop(seq, n): the first n positions stay (negative n: that many dropped from the end), blocks
    past them go back to the pool unless another sequence holds them; a fork sharing the cropped
    sequence's last block keeps its rows when either appends (copy on write), and attention on the
    cropped sequence equals attention on one built from scratch with the same rows."""
    rng = np.random.default_rng(14)
    H, E, bs = 2, 8, 4
    c = selfattn.PagedKVCache(12, bs, H, E, dtype=np.float32, kv_dtype=kv_dtype)
    a = c.add_sequence()
    k = rng.standard_normal((1, H, 10, E)).astype(np.float32)
    v = rng.standard_normal((1, H, 10, E)).astype(np.float32)
    c.append([a], k, v)                                     # 3 blocks, the last half full
    full = c.keys(a)
    b = c.fork(a)
    c.crop(a, -3)                                           # 7 positions: 2 blocks, the second shared
    assert c.seq_len(a) == 7 and c.seq_len(b) == 10 and c.num_free_blocks == 12 - 3
    np.testing.assert_array_equal(c.keys(a), full[:, :7])
    new = rng.standard_normal((1, H, 2, E)).astype(np.float32)
    c.append([a], new, new)                                 # copies the shared block before writing
    np.testing.assert_array_equal(c.keys(b), full)          # the fork's rows 7..9 untouched
    fresh = c.add_sequence()
    c.append([fresh], np.concatenate([k[:, :, :7], new], 2), np.concatenate([v[:, :, :7], new], 2))
    np.testing.assert_array_equal(c.keys(a), c.keys(fresh))
    q = np.repeat(rng.standard_normal((1, 2 * H, 1, E)).astype(np.float32), 2, axis=0)
    o = c.attend(q, [a, fresh])
    np.testing.assert_array_equal(o[0], o[1])
    c.free(fresh)
    c.free(b)                                               # b's last block only b held
    assert c.num_free_blocks == 12 - 3
    c.crop(a, 4)                                            # exactly one block
    assert c.seq_len(a) == 4 and c.num_free_blocks == 12 - 1
    c.crop(a, 100)                                          # never longer
    c.crop(a, -100)                                         # never negative
    assert c.seq_len(a) == 0 and c.num_free_blocks == 12 and c.block_table([a])[0].shape == (1, 0)
    with pytest.raises(TypeError, match="max_length must be an int"):
        c.crop(a, 2.0)
    with pytest.raises(KeyError, match="no sequence"):
        c.crop(fresh, 1)


def test_cache_full_changes_nothing():
    rng = np.random.default_rng(13)
    c = selfattn.PagedKVCache(4, 4, 1, 8, dtype=np.float32)
    a, b = c.add_sequence(), c.add_sequence()
    k = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    c.append([a, b], k, k, counts=[6, 2])      # a: 2 blocks, b: 1 block; 1 free
    pages = c.k_pages.copy()
    state = (c.num_free_blocks, c.seq_len(a), c.seq_len(b), c.block_table([a, b])[0].copy())
    with pytest.raises(selfattn.CacheFullError, match="needs 2 free blocks and 1 are free"):
        c.append([a, b], k, k, counts=[3, 3])  # a needs 1, b needs 1 (2 + 3 > 4): 2 > 1
    assert (c.num_free_blocks, c.seq_len(a), c.seq_len(b)) == state[:3]
    np.testing.assert_array_equal(c.block_table([a, b])[0], state[3])
    np.testing.assert_array_equal(c.k_pages, pages)
    f = c.fork(a)
    with pytest.raises(selfattn.CacheFullError):
        c.append([a, f], k[:, :, :3], k[:, :, :3])    # both copy-on-write + growth: more than 1
    np.testing.assert_array_equal(c.k_pages, pages)


def test_shared_last_block_all_holders_append_needs_holders_minus_one_copies():
    """Every holder of a shared, partly filled last block appends in one call: all but the last
    copy it, the last one writes in place; a pool with exactly that many free blocks suffices."""
    rng = np.random.default_rng(14)
    c = selfattn.PagedKVCache(3, 4, 1, 8, dtype=np.float32)
    a, b = c.add_sequence(), c.add_sequence()
    k = rng.standard_normal((2, 1, 4, 8)).astype(np.float32)
    c.append([a, b], k, k, counts=[2, 4])             # a: 1 block (2 rows), b: 1 block; 1 free
    f = c.fork(a)
    new = rng.standard_normal((2, 1, 1, 8)).astype(np.float32)
    c.append([a, f], new, new)                        # one copy (a's), f in place: needs 1, 1 free
    assert c.num_free_blocks == 0
    np.testing.assert_array_equal(c.keys(a)[0], np.concatenate([k[0, 0, :2], new[0, 0]]))
    np.testing.assert_array_equal(c.keys(f)[0], np.concatenate([k[0, 0, :2], new[1, 0]]))
    np.testing.assert_array_equal(c.keys(b)[0], k[1, 0])


def Z(shape):
    return np.zeros(shape, np.float32)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda c, s: c.append([s, s], Z((2, 1, 1, 8)), Z((2, 1, 1, 8))), ValueError, "distinct"),
    (lambda c, s: c.append([s], Z((1, 2, 1, 8)), Z((1, 1, 1, 8))), ValueError, "key must have shape"),
    (lambda c, s: c.append([s], Z((1, 1, 1, 8)), Z((1, 1, 2, 8))), ValueError, "same number of new"),
    (lambda c, s: c.append([s], np.zeros((1, 1, 1, 8), int), np.zeros((1, 1, 1, 8))), TypeError, "pass floats"),
    (lambda c, s: c.append([s], np.zeros((1, 1, 1, 8)), np.zeros((1, 1, 1, 8))), TypeError, "does not fit"),
    (lambda c, s: c.append([s], np.zeros((1, 1, 2, 8), np.float32), np.zeros((1, 1, 2, 8), np.float32),
                           counts=[3]), ValueError, "counts must be in"),
    (lambda c, s: c.append([99], Z((1, 1, 1, 8)), Z((1, 1, 1, 8))), KeyError, "no sequence 99"),
    (lambda c, s: c.append(s, Z((1, 1, 1, 8)), Z((1, 1, 1, 8))), TypeError, "a single int"),
    (lambda c, s: c.attend(np.zeros((1, 2, 1, 8)), [s]), TypeError, "query is float64"),
    (lambda c, s: c.attend(np.zeros((2, 2, 1, 8), np.float32), [s]), ValueError, "query must have shape"),
    (lambda c, s: c.attend(np.zeros((1, 2, 1, 8), np.float32), [s], k_scale=1), TypeError, "sets k_scale"),
    (lambda c, s: selfattn.PagedKVCache(0, 4, 1, 8), ValueError, "num_blocks must be >= 1"),
    (lambda c, s: selfattn.PagedKVCache(4, 4, 1, 8, dtype=np.int32), TypeError, "dtype must be float32"),
    (lambda c, s: selfattn.PagedKVCache(4, 4, 1, 8, dtype=np.float64, kv_dtype="int8"), TypeError, "takes float32"),
    (lambda c, s: selfattn.PagedKVCache(4, 4, 1, 8, kv_dtype="int4"), ValueError, "kv_dtype must be one of"),
])
def test_cache_misuse(call, exc, msg):
    c = selfattn.PagedKVCache(4, 4, 1, 8, dtype=np.float32)
    s = c.add_sequence()
    c.append([s], np.ones((1, 1, 2, 8), np.float32), np.ones((1, 1, 2, 8), np.float32))
    snap = (c.k_pages.copy(), c.num_free_blocks, c.seq_len(s))
    with pytest.raises(exc, match=msg):
        call(c, s)
    assert (c.num_free_blocks, c.seq_len(s)) == snap[1:]
    np.testing.assert_array_equal(c.k_pages, snap[0])


def test_docstring_examples():
    import doctest
    import selfattn.paged
    result = doctest.testmod(selfattn.paged, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_example_paged_serving():
    """examples/paged_serving.py, small and with a pool too small for every prompt at once: requests
    wait for blocks, a fork shares a prompt, every step equals dense attention, and every block is back
    in the pool at the end."""
    import importlib.util
    from sa_testutil import REPO_ROOT
    path = REPO_ROOT / "examples" / "paged_serving.py"
    if not path.is_file():
        pytest.skip("examples/ not found (tests run without the repository)")
    spec = importlib.util.spec_from_file_location("selfattn_example_paged_serving", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    s = ex.run(num_requests=8, max_prompt=100, new_tokens=6, num_blocks=30, block_size=8, max_running=6)
    assert s["max_diff"] == 0.0 and s["forks"] == 1
    assert s["tokens"] == (8 + 1) * 6 and s["free_at_end"] == 30 and s["peak_blocks"] <= 30
