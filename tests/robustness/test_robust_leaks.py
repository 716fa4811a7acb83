"""Leaks: thousands of calls of every entry point (successful ones, validation errors, and
MemoryError from the debug hook or an impossible workspace) leave memory flat; the backward
(scaled_dot_product_attention_vjp, varlen_attention_vjp and their vjp closures) too.

Two gauges after a warm-up: the resident set size (/proc/self/statm), and glibc's count of
malloc'ed bytes in use (mallinfo2), which sees even small per-call leaks. Both are compared
after N and after 3N rounds. Skipped under AddressSanitizer (its quarantine grows RSS by
design; the sanitizer run and .ci/valgrind.sh cover leaks there).
"""

import ctypes
import ctypes.util
import gc
import importlib.util
import os
import sys

import numpy as np
import pytest

import selfattn
from selfattn import _core
from sa_testutil import ISAS

sdpa = selfattn.scaled_dot_product_attention

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    "asan" in os.environ.get("LD_PRELOAD", "") or "ASAN_OPTIONS" in os.environ,
    reason="RSS is not meaningful under AddressSanitizer (quarantine)")]


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_in_use():
    """Bytes handed out by malloc right now (glibc), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        f = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    f.restype = _MallInfo2
    mi = f()
    return mi.uordblks + mi.hblkhd


def fail_alloc(fn):
    def call():
        _core._debug_fail_allocations(1)
        try:
            fn()
        except MemoryError:
            return
        finally:
            _core._debug_fail_allocations(0)
        raise AssertionError("the debug hook did not raise MemoryError")
    return call


def expect(exc, fn):
    def call():
        try:
            fn()
        except exc:
            return
        raise AssertionError(f"{exc.__name__} expected")
    return call


def _calls():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 33, 16)).astype(np.float32)
    k = rng.standard_normal((2, 4, 40, 16)).astype(np.float32)
    v = rng.standard_normal((2, 4, 40, 8)).astype(np.float32)
    k2, v2 = k[:, :2].astype(np.float64), v[:, :2].astype(np.float64)
    bmask = rng.random((33, 40)) < 0.6
    bmask[5] = False
    fmask = rng.standard_normal((4, 33, 40)).astype(np.float32)
    x = rng.standard_normal((2, 33, 24))
    wq, wk, wv, wo = (rng.standard_normal(s) for s in ((24, 16), (24, 16), (24, 8), (8, 5)))
    huge_q = np.broadcast_to(np.float32(0.5), (1, 1 << 40))    # workspace of ~2^49 bytes: MemoryError
    huge_k = np.broadcast_to(np.float32(0.5), (2, 1 << 40))
    huge_v = np.ones((2, 2), np.float32)
    (kq, ks), (vq, vs) = selfattn.quantize_kv(k), selfattn.quantize_kv(v)
    cache = selfattn.KVCache(2, 4, 64, 16, 8, kv_dtype="int8")
    cache.append(k, v)
    # a paged cache: 2 sequences of 40 in pages of 16 (shuffled blocks); k's heads as kv heads
    kp = np.ascontiguousarray(k.transpose(0, 2, 1, 3)).reshape(-1, 16, 4, 16)[:5]
    vp = np.ascontiguousarray(v.transpose(0, 2, 1, 3)).reshape(-1, 16, 4, 8)[:5]
    bt, sl = np.array([[3, 0, 4], [1, 2, -1]]), np.array([40, 30])
    pcache = selfattn.PagedKVCache(8, 16, 4, 16, value_dim=8, kv_dtype="int8")
    pids = [pcache.add_sequence(), pcache.add_sequence()]
    pcache.append(pids, k, v, counts=[40, 33])

    # float8 (one scale per head) and a float16 cache under float32 queries: read as stored
    narrow = {}
    if importlib.util.find_spec("ml_dtypes") is not None:
        (k8, ks8), (v8, vs8) = selfattn.quantize_kv(k, "float8_e4m3fn"), selfattn.quantize_kv(v, "float8_e4m3fn")
        fcache = selfattn.KVCache(2, 4, 64, 16, 8, kv_dtype="float8_e5m2")
        fcache.append(k, v)
        narrow = {
            "sdpa_float8_kv_decode": lambda: sdpa(q[:, :, :1], k8, v8, k_scale=ks8, v_scale=vs8),
            "sdpa_float8_kv_packed": lambda: sdpa(q, k8, v8, k_scale=ks8, v_scale=vs8, is_causal=True),
            "kvcache_float8_append_attend": lambda: (fcache.reset(), fcache.append(k, v), fcache.attend(q[:, :, :2])),
        }
    narrow["sdpa_float16_kv_decode"] = lambda: sdpa(q[:, :, :1], k.astype(np.float16), v.astype(np.float16))

    doc = np.repeat([0, 1, 2], [10, 20, 10])
    bm = selfattn.create_block_mask(lambda b, h, i, j: (doc[i + 7] == doc[j]) | (j < 2), None, None, 33, 40,
                                    BLOCK_SIZE=8)
    ok = {
        "sdpa_dropout_vjp": lambda: selfattn.scaled_dot_product_attention_vjp(
            q, k, v, is_causal=True, dropout_p=0.2, seed=3)[1](np.ones((2, 4, 33, 8))),
        "flex_attention_vjp": lambda: selfattn.flex_attention_vjp(q, k, v, block_mask=bm)[1](np.ones((2, 4, 33, 8))),
        "flex_attention_decode_lse": lambda: selfattn.flex_attention(
            q[:, :, :1], k, v, block_mask=selfattn.create_block_mask(lambda b, h, i, j: j % 3 == 0, 1, 1, 1, 40),
            return_lse=True),
        "sdpa_int8_kv_decode": lambda: sdpa(q[:, :, :1], kq, vq, k_scale=ks, v_scale=vs),
        "sdpa_int8_kv_packed": lambda: sdpa(q, kq, vq, k_scale=ks, v_scale=vs, is_causal=True),
        "kvcache_int8_attend": lambda: cache.attend(q[:, :, :2]),
        "paged_attention_decode": lambda: selfattn.paged_attention(q[:, :, :2], kp, vp, bt, sl, return_lse=True),
        "paged_attention_gathered": lambda: selfattn.paged_attention(q[:, :, :5], kp, vp, bt, sl),
        "paged_cache_int8_attend_fork": lambda: (pcache.attend(q[:, :, :1], pids),
                                                 pcache.free(pcache.fork(pids[0]))),
        "sdpa_sinks_sink_tokens": lambda: sdpa(q, k, v, sinks=[0.5, 1.0, -1.0, 0.0], window_size=(4, 0),
                                               num_sink_tokens=3, is_causal=True, return_lse=True),
        **narrow,
        "sdpa": lambda: sdpa(q, k, v),
        "sdpa_bool_mask": lambda: sdpa(q, k, v, attn_mask=bmask),
        "sdpa_float_mask_lse": lambda: sdpa(q, k, v, attn_mask=fmask, return_lse=True),
        "sdpa_causal": lambda: sdpa(q, k, v, is_causal=True, num_threads=1),
        "sdpa_gqa_f64": lambda: sdpa(q, k2, v2, enable_gqa=True, return_lse=True),
        "sdpa_lists": lambda: sdpa(q[0, 0, :3].tolist(), k[0, 0, :4].tolist(), v[0, 0, :4].tolist()),
        "attend": lambda: selfattn.attend(x, wq, wk, wv, num_heads=2),
        "attend_wo_causal": lambda: selfattn.attend(x, wq, wk, wv, num_heads=2, wo=wo, is_causal=True),
    }
    raising = {
        "sdpa_bad_E": expect(ValueError, lambda: sdpa(q, k[..., :5], v)),
        "sdpa_bad_mask": expect(ValueError, lambda: sdpa(q, k, v, attn_mask=bmask[:, :7])),
        "sdpa_bad_dtype": expect(TypeError, lambda: sdpa(q.astype(np.complex64), k, v)),
        "sdpa_bad_scale": expect(ValueError, lambda: sdpa(q, k, v, scale=float("nan"))),
        "sdpa_bad_gqa": expect(ValueError, lambda: sdpa(q, k[:, :3], v[:, :3], enable_gqa=True)),
        "sdpa_int8_bad_scale": expect(ValueError, lambda: sdpa(q, kq, vq, k_scale=ks[..., :3], v_scale=vs)),
        "sdpa_bad_sinks": expect(ValueError, lambda: sdpa(q, k, v, sinks=[np.nan, 0, 0, 0])),
        "flex_bad_block_mask": expect(ValueError, lambda: selfattn.flex_attention(q[:, :, :5], k, v, block_mask=bm)),
        "flex_memerror_hook": fail_alloc(lambda: selfattn.flex_attention(q, k, v, block_mask=bm)),
        "paged_bad_table": expect(ValueError, lambda: selfattn.paged_attention(q[:, :, :1], kp, vp, bt + 5, sl)),
        "paged_memerror_hook": fail_alloc(lambda: selfattn.paged_attention(q[:, :, :1], kp, vp, bt, sl)),
        "attend_bad_wo": expect(ValueError, lambda: selfattn.attend(x, wq, wk, wv, num_heads=2, wo=wo[:3])),
        "attend_bad_heads": expect(ValueError, lambda: selfattn.attend(x, wq, wk, wv, num_heads=3)),
        "sdpa_memerror_hook": fail_alloc(lambda: sdpa(q, k, v, attn_mask=fmask, return_lse=True)),
        "sdpa_memerror_hook_gqa": fail_alloc(lambda: sdpa(q, k2, v2, enable_gqa=True)),
        "attend_memerror_hook": fail_alloc(lambda: selfattn.attend(x, wq, wk, wv, num_heads=2, wo=wo)),
        "sdpa_memerror_workspace": expect(MemoryError, lambda: sdpa(huge_q, huge_k, huge_v)),
    }
    return {**ok, **raising}


def _backward_calls():
    """The backward's entry points. One thread each: the workspace does not depend on it, and
    tiny calls alternating with the threaded ones of _calls() would make OpenMP's workers sleep
    and wake between them (slow where the cores are shared); test_backward checks the threads."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 4, 33, 16)).astype(np.float32)
    k = rng.standard_normal((2, 4, 40, 16)).astype(np.float32)
    v = rng.standard_normal((2, 4, 40, 8)).astype(np.float32)
    k2, v2 = k[:, :2].astype(np.float64), v[:, :2].astype(np.float64)
    bmask = rng.random((33, 40)) < 0.6
    bmask[5] = False
    fmask = rng.standard_normal((4, 33, 40)).astype(np.float32)
    dout = rng.standard_normal((2, 4, 33, 8)).astype(np.float32)
    dout64 = dout.astype(np.float64)
    cu_q, cu_k = [0, 10, 10, 33], [0, 15, 22, 40]
    vjp = selfattn.scaled_dot_product_attention_vjp
    vl = selfattn.varlen_attention_vjp
    _, kept = vjp(q, k2, v2, enable_gqa=True, softcap=5.0, is_causal=True, num_threads=1)   # called many times
    return {
        "vjp_bool_mask_key_lengths": lambda: vjp(q, k, v, attn_mask=bmask, key_lengths=[40, 17], num_threads=1)[1](dout),
        "vjp_kept_gqa_f64": lambda: kept(dout64),
        "vjp_float_mask_window_alibi": lambda: vjp(q, k, v, attn_mask=fmask, window_size=(3, 5),
                                                   alibi_slopes=[0.1, 0.2, 0.3, 0.4], num_threads=1)[1](dout),
        "vjp_bcast_kv": lambda: vjp(q, k[:1], v[:1], num_threads=1)[1](dout),
        "vjp_varlen": lambda: vl(q[0], k[0], v[0], cu_q, cu_k, is_causal=True, num_threads=1)[1](dout[0]),
        "vjp_bad_grad_out": expect(ValueError, lambda: kept(dout64[..., :3])),
        "vjp_complex_grad_out": expect(TypeError, lambda: kept(dout64.astype(np.complex128))),
        "vjp_return_lse": expect(TypeError, lambda: vjp(q, k, v, return_lse=True)),
        "vjp_bad_window": expect(ValueError, lambda: vjp(q, k, v, window_size=-1)),
        "vjp_varlen_bad_grad_out": expect(ValueError, lambda: vl(q[0], k[0], v[0], cu_q, cu_k,
                                                                  num_threads=1)[1](dout[0, :3])),
        "vjp_memerror_hook": fail_alloc(lambda: kept(dout64)),
        "vjp_memerror_hook_varlen": fail_alloc(lambda: vl(q[0], k[0], v[0], cu_q, cu_k, num_threads=1)[1](dout[0])),
    }


def _rounds(calls, n):
    for i in range(n):
        with selfattn.use_isa(ISAS[i % len(ISAS)]):
            for fn in calls.values():
                fn()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/statm")
@pytest.mark.parametrize("make_calls", [_calls, _backward_calls], ids=["forward", "backward"])
def test_memory_flat_over_thousands_of_calls(make_calls):
    calls = make_calls()
    N = 600
    _rounds(calls, 300)                  # warm-up: pools, caches, OpenMP threads, allocator arenas
    gc.collect()
    rss0, heap0 = _rss_bytes(), _malloc_in_use()
    _rounds(calls, N)
    gc.collect()
    rss1, heap1 = _rss_bytes(), _malloc_in_use()
    _rounds(calls, 2 * N)
    gc.collect()
    rss3, heap3 = _rss_bytes(), _malloc_in_use()
    n_calls = 2 * N * len(calls)
    msg = (f"{len(calls)} entry points x {3 * N} rounds: RSS {rss0 >> 10} -> {rss1 >> 10} -> {rss3 >> 10} KiB, "
           f"malloc in use {heap0} -> {heap1} -> {heap3} bytes")
    print(msg)
    # RSS: page granular and noisy; a leak of one workspace (>= 16 KiB) per call would be GBs
    assert rss3 - rss1 < 4 << 20, msg
    if heap1 is not None:
        # malloc'ed bytes: a leak of even ~16 bytes per call over the last 2N rounds shows up
        assert heap3 - heap1 < max(256 << 10, 16 * n_calls // 2), msg
