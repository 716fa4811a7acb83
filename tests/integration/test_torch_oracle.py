"""selfattn against torch.nn.functional.scaled_dot_product_attention (a second, independent oracle)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import selfattn  # noqa: E402
from sa_testutil import ISAS, assert_sdpa_close, logit_magnitude, vmax_of  # noqa: E402

_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def _torch_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    kw = dict(attn_mask=t(attn_mask), is_causal=is_causal, scale=scale)
    if enable_gqa:
        kw["enable_gqa"] = True
    with torch.no_grad():
        return F.scaled_dot_product_attention(t(q), t(k), t(v), **kw).numpy()


def _mask(kind, shape, rng, dtype):
    """A mask in which every query row keeps at least one key (torch's fully-masked rows differ by version)."""
    if kind is None:
        return None
    keep = rng.random(shape) < 0.6
    keep[..., 0] = True
    if kind == "bool":
        return keep
    return np.where(keep, rng.standard_normal(shape), -np.inf).astype(dtype)


CASES = [
    # (name, q shape, k shape, v shape, mask kind, mask shape, causal, gqa, scale)
    ("plain", (2, 3, 17, 8), (2, 3, 17, 8), (2, 3, 17, 8), None, None, False, False, None),
    ("L!=S", (2, 3, 65, 16), (2, 3, 130, 16), (2, 3, 130, 5), None, None, False, False, None),
    ("causal_L<S", (2, 2, 63, 16), (2, 2, 129, 16), (2, 2, 129, 7), None, None, True, False, None),
    ("causal_L>S", (2, 2, 130, 16), (2, 2, 64, 16), (2, 2, 64, 7), None, None, True, False, None),
    ("causal_square", (1, 4, 129, 64), (1, 4, 129, 64), (1, 4, 129, 64), None, None, True, False, 0.3),
    ("bool_mask_LS", (2, 3, 65, 8), (2, 3, 257, 8), (2, 3, 257, 8), "bool", (65, 257), False, False, None),
    ("bool_mask_1S", (2, 3, 65, 8), (2, 3, 100, 8), (2, 3, 100, 8), "bool", (1, 100), False, False, None),
    ("bool_mask_H1S", (2, 3, 5, 8), (2, 3, 128, 8), (2, 3, 128, 3), "bool", (3, 1, 128), False, False, None),
    ("float_mask_full", (2, 3, 64, 8), (2, 3, 127, 8), (2, 3, 127, 9), "float", (2, 3, 64, 127), False, False, None),
    ("float_mask_LS", (3, 66, 80), (3, 131, 80), (3, 131, 80), "float", (66, 131), False, False, 2.0),
    ("gqa", (2, 6, 65, 16), (2, 2, 129, 16), (2, 2, 129, 4), None, None, False, True, None),
    ("gqa_causal", (1, 8, 70, 32), (1, 2, 70, 32), (1, 2, 70, 32), None, None, True, True, None),
    ("gqa_mask", (2, 4, 33, 8), (2, 1, 140, 8), (2, 1, 140, 8), "float", (33, 140), False, True, None),
    ("bcast_batch", (3, 2, 40, 8), (1, 2, 50, 8), (1, 2, 50, 6), None, None, False, False, None),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_torch(case, dtype):
    name, qs, ks, vs, mkind, mshape, causal, gqa, scale = case
    if gqa and not _HAS_GQA:
        pytest.skip("this torch has no enable_gqa")
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in (qs, ks, vs))
    mask = _mask(mkind, mshape, rng, dtype)
    expect = _torch_sdpa(q, k, v, mask, causal, scale, gqa).astype(np.float64)
    # torch's float32 path is itself only float32-accurate: widen the tolerance accordingly
    mag = logit_magnitude(q, k, scale, mask)
    for isa in ISAS:
        with selfattn.use_isa(isa):
            out = selfattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                                        enable_gqa=gqa)
        vm = vmax_of(v) * (2.0 if dtype == np.float32 else 1.0)
        if dtype == np.float64:
            vm *= 10.0   # torch's float64 path: a few ulps, not the reference's bit-near answer
        assert_sdpa_close(out, expect, dtype, vm, mag, ctx=f"[isa={isa} {name}] ")
