"""Kernel paths against each other, and a loud record of the paths this machine cannot run.

Every path is compared with the float64 reference elsewhere; here every pair of paths is
compared with each other (to twice the shared tolerance: each is within one of the truth), at
sizes around both paths' tile edges, so a path that drifts from the others is caught even
where the reference comparison's tolerance is loose. A pair involving a path this CPU cannot
run is skipped with a reason that says so; `pytest -rs` (CI) prints every such reason, and the
report header and the end of the log name the missing paths.
"""

import itertools

import numpy as np
import pytest

import selfattn
from sa_testutil import (DTYPES, ISAS, KNOWN_ISAS, assert_close_scaled, assert_same_nonfinite, edge,
                         logit_magnitude, missing_isa_reason, tolerance, vmax_of)

PAIRS = list(itertools.combinations(KNOWN_ISAS, 2))

# (name, L, S, E, Ev as tile expressions, batch shape of q, of k/v, extra kwargs, masking)
CASES = [
    ("edges_plain", "bq+1", "bk+1", "vw+1", "nv+1", (2, 3), (2, 3), {}, None),
    ("edges_causal", "2*bq+1", "2*bk+1", "17", "vw-1", (1, 2), (1, 2), {"is_causal": True}, None),
    ("edges_bool", "bq-1", "bk-1", "2*vw+1", "nv", (2,), (2,), {}, "bool"),
    ("edges_float", "mr+1", "2*bk+3", "vw", "3", (3,), (1,), {}, "float"),
    ("gqa_L_gt_S", "2*bq+2", "nr+1", "64", "80", (2, 4), (2, 2), {"enable_gqa": True}, None),
    ("one_row", "1", "bk+nr-1", "64", "64", (4,), (4,), {}, "bool"),
]


def _inputs(case, a, b, dtype):
    """The case at sizes resolved for path a (so b sees a's edges; the pair (b, a) is not run,
    so each case also appears with sizes of b below)."""
    name, L_at, S_at, E_at, Ev_at, qb, kb, kw, masking = case
    out = []
    for isa in (a, b):
        L, S, E, Ev = (edge(isa, dtype, x) for x in (L_at, S_at, E_at, Ev_at))
        rng = np.random.default_rng([L, S, E, Ev, len(name)])
        q = rng.standard_normal(qb + (L, E)).astype(dtype)
        k = rng.standard_normal(kb + (S, E)).astype(dtype)
        v = rng.standard_normal(kb + (S, Ev)).astype(dtype)
        kw = dict(kw)
        if masking == "bool":
            kw["attn_mask"] = rng.random((L, S)) < 0.7
        elif masking == "float":
            kw["attn_mask"] = np.where(rng.random((L, S)) < 0.7, rng.standard_normal((L, S)), -np.inf).astype(dtype)
        out.append((q, k, v, kw))
    return out


@pytest.mark.parametrize("name", KNOWN_ISAS)
def test_path_runs_here(name):
    """One line per known path: passed (it ran, and every test ran it) or skipped with the reason."""
    if name not in ISAS:
        pytest.skip(missing_isa_reason(name))
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 5, 8)) for _ in range(3))
    with selfattn.use_isa(name):
        assert selfattn.config()["isa"] == name
        out = selfattn.scaled_dot_product_attention(q, k, v)
    assert out.shape == (2, 5, 8) and np.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("a,b", PAIRS, ids=[f"{a}-vs-{b}" for a, b in PAIRS])
def test_paths_agree(a, b, case, dtype):
    missing = [x for x in (a, b) if x not in ISAS]
    if missing:
        pytest.skip(missing_isa_reason(missing[0]))
    for q, k, v, kw in _inputs(case, a, b, dtype):
        res = {}
        for isa in (a, b):
            with selfattn.use_isa(isa):
                res[isa] = selfattn.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
        (out_a, lse_a), (out_b, lse_b) = res[a], res[b]
        ctx = f"[{a} vs {b}, {case[0]}, q{q.shape} k{k.shape} v{v.shape}] "
        mag = logit_magnitude(q, k, None, kw.get("attn_mask"))
        tol = 2 * tolerance(dtype, mag)
        assert out_a.dtype == out_b.dtype == np.dtype(dtype)
        assert_close_scaled(out_a, out_b, tol * vmax_of(v), "out", ctx)
        fin = np.where(np.isfinite(lse_b), np.abs(lse_b).astype(np.float64), 0.0)
        assert_same_nonfinite(lse_a, lse_b, "lse", ctx)
        assert_close_scaled(lse_a, lse_b, tol * (2.0 + fin + mag), "lse", ctx)
