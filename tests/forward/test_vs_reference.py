"""Property tests: selfattn against the float64 NumPy reference, on every ISA."""

import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import selfattn
from selfattn import reference
from sa_testutil import (ISAS, L_EDGES, LAYOUTS, S_EDGES, assert_sdpa_close, assert_unchanged, edge, edges,
                         examples, logit_magnitude, snapshot, vmax_of, with_layout)

DTYPES = [np.float32, np.float64]
# sizes around every tile edge of every path under test (derived from the kernels' own tile sizes)
SIZES_L = sorted({0, 2, 3, 5, 7, 31, 200} | set(edges("L")))
SIZES_S = sorted({0, 2, 3, 5, 17} | set(edges("S")))
DIMS = sorted({3, 17, 64, 80, 128, 129} | set(edges("E")) | set(edges("Ev")))
WORK_LIMIT = 2.5e7          # units * L * S * (E + Ev): keeps every example a few ms


@st.composite
def sdpa_cases(draw):
    c = {}
    c["dtype"] = np.dtype(draw(st.sampled_from(DTYPES)))
    L = draw(st.sampled_from(SIZES_L))
    S = draw(st.sampled_from(SIZES_S))
    E = draw(st.sampled_from(DIMS))
    Ev = draw(st.sampled_from(DIMS))
    n_lead = draw(st.integers(0, 3))
    mode = "plain"
    if n_lead == 0:
        q_lead = k_lead = v_lead = ()
    else:
        mode = draw(st.sampled_from(["plain", "gqa", "bcast_kv", "bcast_q", "fewer_kv_dims",
                                               "fewer_q_dims"]))
        H = draw(st.integers(1, 3))
        batch = tuple(draw(st.lists(st.integers(1, 3), min_size=n_lead - 1, max_size=n_lead - 1)))
        if mode == "gqa":
            g = draw(st.integers(1, 3))
            q_lead, k_lead = batch + (H * g,), batch + (H,)
            v_lead = k_lead
        elif mode == "bcast_kv":      # kv batch/head dims of size 1 broadcast against q's
            q_lead = batch + (H,)
            ones = draw(st.lists(st.booleans(), min_size=n_lead, max_size=n_lead))
            k_lead = tuple(1 if o else n for o, n in zip(ones, q_lead))
            vones = draw(st.lists(st.booleans(), min_size=n_lead - 1, max_size=n_lead - 1))
            v_lead = tuple(1 if o else n for o, n in zip(vones, k_lead[:-1])) + k_lead[-1:]
        elif mode == "bcast_q":       # q of size 1 where kv are larger: the output grows
            k_lead = v_lead = batch + (H,)
            ones = draw(st.lists(st.booleans(), min_size=n_lead, max_size=n_lead))
            q_lead = tuple(1 if o else n for o, n in zip(ones, k_lead))
        elif mode == "fewer_kv_dims":  # kv with fewer leading dims (numpy broadcasting)
            q_lead = batch + (H,)
            drop = draw(st.integers(1, n_lead))
            k_lead = v_lead = q_lead[drop:]
        elif mode == "fewer_q_dims":   # q with fewer leading dims than k/v: the output takes theirs
            k_lead = v_lead = batch + (H,)
            drop = draw(st.integers(1, n_lead))
            q_lead = k_lead[drop:]
        else:
            q_lead = k_lead = v_lead = batch + (H,)
    c.update(L=L, S=S, E=E, Ev=Ev, mode=mode, enable_gqa=(mode == "gqa"))
    c["q_shape"] = q_lead + (L, E)
    c["k_shape"] = k_lead + (S, E)
    c["v_shape"] = v_lead + (S, Ev)
    out_lead = np.broadcast_shapes(q_lead, k_lead, v_lead) if mode != "gqa" else q_lead
    units = int(np.prod(out_lead, dtype=np.int64))
    if units * L * S * (E + Ev) > WORK_LIMIT:
        # keep the shapes interesting but the work small: shrink the feature dims
        c["q_shape"] = q_lead + (L, 3)
        c["k_shape"] = k_lead + (S, 3)
        c["v_shape"] = v_lead + (S, 5)
        c["E"], c["Ev"] = 3, 5
    c["out_lead"] = tuple(out_lead)

    c["mask_kind"] = draw(st.sampled_from(["none", "causal", "bool", "float32", "float64"]))
    if c["mask_kind"] in ("bool", "float32", "float64"):
        full = tuple(out_lead) + (L, S)
        nd = draw(st.integers(0, len(full)))
        dims = full[len(full) - nd:]
        ones = draw(st.lists(st.booleans(), min_size=nd, max_size=nd))
        c["mask_shape"] = tuple(1 if o else n for o, n in zip(ones, dims))
        c["mask_density"] = draw(st.sampled_from([0.5, 0.9, 0.05]))
        c["mask_layout"] = draw(st.sampled_from(LAYOUTS))
    c["layouts"] = tuple(draw(st.lists(st.sampled_from(LAYOUTS), min_size=3, max_size=3)))
    c["scale"] = draw(st.one_of(st.none(), st.sampled_from([1.0, 0.125, -0.7, 2.5]),
                                st.floats(-3, 3, allow_nan=False, allow_infinity=False)))
    c["amp"] = draw(st.sampled_from([1.0, 0.01, 4.0]))
    c["return_lse"] = draw(st.booleans())
    c["num_threads"] = draw(st.sampled_from([None, 1, 2]))
    c["seed"] = draw(st.integers(0, 2**32 - 1))
    return c


def _make_inputs(c):
    rng = np.random.default_rng(c["seed"])
    dt = c["dtype"]
    q = (c["amp"] * rng.standard_normal(c["q_shape"])).astype(dt)
    k = (c["amp"] * rng.standard_normal(c["k_shape"])).astype(dt)
    v = rng.standard_normal(c["v_shape"]).astype(dt)
    q, k, v = (with_layout(a, lay, rng) for a, lay in zip((q, k, v), c["layouts"]))
    mask = None
    kind = c["mask_kind"]
    if kind == "bool":
        mask = np.asarray(rng.random(c["mask_shape"]) < c["mask_density"])
    elif kind in ("float32", "float64"):
        mask = np.asarray(3.0 * rng.standard_normal(c["mask_shape"]))
        mask = np.where(rng.random(c["mask_shape"]) > c["mask_density"], -np.inf, mask).astype(kind)
    if mask is not None:
        mask = with_layout(mask, c["mask_layout"], rng)
    return q, k, v, mask


def _check_case(c):
    q, k, v, mask = _make_inputs(c)
    kw = dict(attn_mask=mask, is_causal=c["mask_kind"] == "causal", scale=c["scale"],
              enable_gqa=c["enable_gqa"], return_lse=True)
    ref, ref_lse = reference.scaled_dot_product_attention(q, k, v, **kw)
    mag = logit_magnitude(q, k, c["scale"], mask)
    vmax = vmax_of(v)
    snaps = snapshot(q, k, v, mask)
    kw["return_lse"] = c["return_lse"]
    for isa in ISAS:
        ctx = f"[isa={isa}] "
        with selfattn.use_isa(isa):
            res = selfattn.scaled_dot_product_attention(q, k, v, num_threads=c["num_threads"], **kw)
        if c["return_lse"]:
            assert isinstance(res, tuple) and len(res) == 2, ctx + "return_lse=True must give (out, lse)"
            out, lse = res
            assert_sdpa_close(out, ref, c["dtype"], vmax, mag, lse, ref_lse, ctx=ctx)
        else:
            assert isinstance(res, np.ndarray), ctx + f"expected an ndarray, got {type(res)}"
            assert_sdpa_close(res, ref, c["dtype"], vmax, mag, ctx=ctx)
        assert_unchanged((q, k, v, mask), snaps, ctx)


@settings(max_examples=examples(120))
@given(sdpa_cases())
def test_sdpa_matches_reference(c):
    note(repr(c))
    _check_case(c)


@st.composite
def attend_cases(draw):
    c = dict(
        dtype=np.dtype(draw(st.sampled_from(DTYPES))),
        lead=draw(st.sampled_from([(), (2,), (2, 1), (1, 3)])),
        L=draw(st.sampled_from([1, 4, 0, 63, 65, 130])),
        d_model=draw(st.sampled_from([1, 3, 17, 64])),
        num_heads=draw(st.integers(1, 4)),
        E=draw(st.sampled_from([1, 3, 17, 64])),
        Ev=draw(st.sampled_from([1, 5, 16])),
        d_out=draw(st.sampled_from([None, 1, 7])),
        is_causal=draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.5, -1.0])),
        layout=draw(st.sampled_from(LAYOUTS)),
        num_threads=draw(st.sampled_from([None, 1, 2])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )
    return c


@settings(max_examples=examples(40))
@given(attend_cases())
def test_attend_matches_reference(c):
    note(repr(c))
    rng = np.random.default_rng(c["seed"])
    dt, H = c["dtype"], c["num_heads"]
    x = with_layout(rng.standard_normal(c["lead"] + (c["L"], c["d_model"])).astype(dt), c["layout"], rng)
    wq = (rng.standard_normal((c["d_model"], H * c["E"])) / np.sqrt(c["d_model"])).astype(dt)
    wk = (rng.standard_normal((c["d_model"], H * c["E"])) / np.sqrt(c["d_model"])).astype(dt)
    wv = rng.standard_normal((c["d_model"], H * c["Ev"])).astype(dt)
    wo = None if c["d_out"] is None else rng.standard_normal((H * c["Ev"], c["d_out"])).astype(dt)
    kw = dict(num_heads=H, wo=wo, is_causal=c["is_causal"], scale=c["scale"])
    ref = reference.attend(x, wq, wk, wv, **kw)
    # error scale: |x wv| (and |wo| if any); logits from the projected q, k
    xv = np.abs(x.astype(np.float64)) @ np.abs(wv.astype(np.float64))
    vmax = float(xv.max(initial=0.0)) or 1.0
    if wo is not None:
        vmax *= float(np.abs(wo).sum(axis=0).max(initial=0.0)) or 1.0
    qq = x.astype(np.float64) @ wq.astype(np.float64)
    kk = x.astype(np.float64) @ wk.astype(np.float64)
    mag = logit_magnitude(qq, kk, c["scale"] if c["scale"] is not None else 1.0 / np.sqrt(c["E"]))
    # the projections themselves round in the working dtype: allow for d_model-long dots
    mag += c["d_model"]
    snaps = snapshot(x, wq, wk, wv, wo)
    for isa in ISAS:
        with selfattn.use_isa(isa):
            out = selfattn.attend(x, wq, wk, wv, num_threads=c["num_threads"], **kw)
        assert_sdpa_close(out, ref, dt, vmax, mag, ctx=f"[isa={isa}] ")
        assert_unchanged((x, wq, wk, wv, wo), snaps, f"[isa={isa}] ")


# ------------------------------------------------------------------ tile edges, deterministic

@pytest.mark.parametrize("L_at", L_EDGES)
@pytest.mark.parametrize("S_at", S_EDGES)
@pytest.mark.parametrize("masking", ["none", "causal", "bool", "float"])
def test_tile_edges(L_at, S_at, masking):
    """L and S at each path's own tile edges (query micro-tile and task tile, key micro-tile and block)."""
    for dt in DTYPES:
        for isa in ISAS:
            L, S = edge(isa, dt, L_at), edge(isa, dt, S_at)
            rng = np.random.default_rng(L * 1000 + S)
            E, Ev = 17, 9
            q = rng.standard_normal((2, L, E)).astype(dt)
            k = rng.standard_normal((2, S, E)).astype(dt)
            v = rng.standard_normal((2, S, Ev)).astype(dt)
            m = None
            if masking == "bool":
                m = rng.random((L, S)) < 0.7
            elif masking == "float":
                m = np.where(rng.random((L, S)) < 0.7, rng.standard_normal((L, S)), -np.inf).astype(dt)
            kw = dict(attn_mask=m, is_causal=masking == "causal", return_lse=True)
            ref, ref_lse = reference.scaled_dot_product_attention(q, k, v, **kw)
            with selfattn.use_isa(isa):
                out, lse = selfattn.scaled_dot_product_attention(q, k, v, **kw)
            assert_sdpa_close(out, ref, dt, vmax_of(v), logit_magnitude(q, k, None, m), lse, ref_lse,
                              ctx=f"[isa={isa} {np.dtype(dt)} L={L} S={S}] ")


@pytest.mark.parametrize("E_at,Ev_at", [("1", "1"), ("vw-1", "nv+1"), ("vw", "nv"), ("vw+1", "vw-1"),
                                        ("2*vw+1", "2*nv+1"), ("128", "128"), ("129", "3"), ("200", "1")])
def test_feature_dims(E_at, Ev_at):
    """E at the K-packing transposes' edges (vw), Ev at the P.V micro-tile's (vw, nv), per path."""
    for dt in DTYPES:
        for isa in ISAS:
            E, Ev = edge(isa, dt, E_at), edge(isa, dt, Ev_at)
            rng = np.random.default_rng(E * 7 + Ev)
            q = rng.standard_normal((3, edge(isa, dt, "bq+1"), E)).astype(dt)
            k = rng.standard_normal((3, edge(isa, dt, "bk+2"), E)).astype(dt)
            v = rng.standard_normal((3, k.shape[1], Ev)).astype(dt)
            ref, ref_lse = reference.scaled_dot_product_attention(q, k, v, return_lse=True)
            with selfattn.use_isa(isa):
                out, lse = selfattn.scaled_dot_product_attention(q, k, v, return_lse=True)
            assert_sdpa_close(out, ref, dt, vmax_of(v), logit_magnitude(q, k), lse, ref_lse,
                              ctx=f"[isa={isa} {np.dtype(dt)}] ")


def test_zero_stride_broadcast_inputs():
    # np.broadcast_to views (zero strides, read-only) in every position, incl. the mask
    rng = np.random.default_rng(3)
    for dt in DTYPES:
        q = np.broadcast_to(rng.standard_normal((1, 1, 70, 8)).astype(dt), (2, 3, 70, 8))
        k = np.broadcast_to(rng.standard_normal((2, 1, 130, 8)).astype(dt), (2, 3, 130, 8))
        v = np.broadcast_to(rng.standard_normal((130, 1)).astype(dt), (2, 3, 130, 5))   # zero last stride
        mask = np.broadcast_to(rng.random((1, 130)) < 0.8, (2, 3, 70, 130))
        ref = reference.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        for isa in ISAS:
            with selfattn.use_isa(isa):
                out = selfattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            assert_sdpa_close(out, ref, dt, vmax_of(v), logit_magnitude(q, k), ctx=f"[isa={isa}] ")


def test_same_array_as_query_key_value():
    rng = np.random.default_rng(5)
    for dt in DTYPES:
        x = rng.standard_normal((2, 2, 67, 16)).astype(dt)
        ref = reference.scaled_dot_product_attention(x, x, x, is_causal=True)
        for isa in ISAS:
            with selfattn.use_isa(isa):
                out = selfattn.scaled_dot_product_attention(x, x, x, is_causal=True)
            assert out is not x and not np.shares_memory(out, x)
            assert_sdpa_close(out, ref, dt, vmax_of(x), logit_magnitude(x, x), ctx=f"[isa={isa}] ")


def test_isas_agree_with_each_other():
    # different code paths, same answer within the float32 tolerance of the reference
    rng = np.random.default_rng(11)
    q = rng.standard_normal((2, 4, 130, 80)).astype(np.float32)
    k = rng.standard_normal((2, 2, 257, 80)).astype(np.float32)
    v = rng.standard_normal((2, 2, 257, 64)).astype(np.float32)
    ref = reference.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    outs = {}
    for isa in ISAS:
        with selfattn.use_isa(isa):
            outs[isa] = selfattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    for isa, out in outs.items():
        assert_sdpa_close(out, ref, np.float32, vmax_of(v), logit_magnitude(q, k), ctx=f"[isa={isa}] ")


def test_one_large_problem():
    # many query tiles and key blocks, default thread count
    rng = np.random.default_rng(21)
    for dt in DTYPES:
        q = rng.standard_normal((2, 1000, 64)).astype(dt)
        k = rng.standard_normal((1, 1100, 64)).astype(dt)
        v = rng.standard_normal((2, 1100, 48)).astype(dt)
        for causal in (False, True):
            ref, ref_lse = reference.scaled_dot_product_attention(q, k, v, is_causal=causal, return_lse=True)
            for isa in ISAS:
                with selfattn.use_isa(isa):
                    out, lse = selfattn.scaled_dot_product_attention(q, k, v, is_causal=causal, return_lse=True)
                assert_sdpa_close(out, ref, dt, vmax_of(v), logit_magnitude(q, k), lse, ref_lse,
                                  ctx=f"[isa={isa} {np.dtype(dt)} causal={causal}] ")
