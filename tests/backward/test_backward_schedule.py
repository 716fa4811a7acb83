"""The backward's schedule and memory (src_c/attn_bwd_body.h, dispatch.c sa_bwd_layout_compute):
its workspace grows with L, never with L x S; both cores get work on B1 H1 shapes; the key
chunking follows the shapes only (so results cannot depend on the thread count)."""

import numpy as np
import pytest

from selfattn import _core


def _bwd_schedule(B, H, L, S, E, Ev=None, num_threads=2, dtype=np.float32, **kw):
    Ev = E if Ev is None else Ev
    q = np.zeros((B, H, L, E), dtype)
    k = np.zeros((B, H, S, E), dtype)
    v = np.zeros((B, H, S, Ev), dtype)
    out = np.zeros((B, H, L, Ev), dtype)
    lse = np.zeros((B, H, L), dtype)
    return _core.sdpa_bwd(q, k, v, out, lse, out, num_threads=num_threads, schedule_only=True, **kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_workspace_is_linear_in_L_never_L_times_S(dtype):
    E, isz = 64, np.dtype(dtype).itemsize
    sizes = {L: _bwd_schedule(1, 1, L, L, E, dtype=dtype)["workspace_bytes"] for L in (2048, 8192, 32768)}
    # 16x more (query, key) pairs from 8192 to 32768, 4x more rows: the workspace grows ~4x
    assert sizes[32768] <= 4.5 * sizes[8192], sizes
    # far below one L x S score matrix (what a non-fused backward would hold)
    assert sizes[32768] < 32768 * 32768 * isz / 20, sizes
    # bounded: D and at most 16 dQ partials (L x E each) per unit, plus a thread's tiles
    assert sizes[32768] <= (17 * 32768 * E + 32768) * isz + 4 * 2**20, sizes


def test_long_keys_short_queries_workspace_does_not_grow_with_S():
    a = _bwd_schedule(1, 2, 64, 4096, 64)["workspace_bytes"]
    b = _bwd_schedule(1, 2, 64, 65536, 64)["workspace_bytes"]
    assert b == a, (a, b)


def test_one_head_keeps_both_threads_busy():
    s = _bwd_schedule(1, 1, 4096, 4096, 64, num_threads=2)
    assert s["threads"] == 2 and s["compute_tasks"] >= 8, s


@pytest.mark.parametrize("shape", [(1, 1, 4096, 4096, 64), (1, 8, 1024, 1024, 64), (32, 8, 128, 128, 64)])
def test_chunking_depends_on_shapes_only(shape):
    plans = [_bwd_schedule(*shape, num_threads=nt) for nt in (1, 2, 3, 16)]
    assert len({(p["compute_tasks"], p["group"]) for p in plans}) == 1, plans
