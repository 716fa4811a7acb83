"""selfattn.inspection: attention_weights (the materialised softmax) and plot_attention.

attention_weights is checked against
* a scalar loop written from the documented rules (positions, visibility, bias), one
  logit at a time -- independent of the vectorised code under test;
* the fused kernel: weights @ value == scaled_dot_product_attention(...) for every option the
  installed kernel accepts (options it does not accept yet are left out, not faked);
* selfattn.reference.attention_weights, where it accepts the options.
"""

import inspect
import math
import sys
import warnings

import numpy as np
import pytest

import selfattn
from sa_testutil import optional_import
from selfattn import inspection

attention_weights = inspection.attention_weights

_SDPA_PARAMS = set(inspect.signature(selfattn.scaled_dot_product_attention).parameters)
_REF_PARAMS = set(inspect.signature(selfattn.reference.attention_weights).parameters)
_STRUCTURED = ("window_size", "alignment", "key_lengths", "alibi_slopes", "softcap")


# ---------------------------------------------------------------------------------------------
# an independent oracle: one logit at a time, straight from the documented rules

def _oracle(q, k, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, window_size=None,
            alignment="top_left", key_lengths=None, alibi_slopes=None, softcap=None):
    """q (B, Hq, L, E), k (B, H, S, E) -> P (B, Hq, L, S) in float64 by scalar loops."""
    B, Hq, L, E = q.shape
    H, S = k.shape[1], k.shape[2]
    group = Hq // H if enable_gqa else 1
    scale = 1 / math.sqrt(E) if scale is None else scale
    if window_size is None:
        left = right = None
    elif isinstance(window_size, int):
        left = right = window_size
    else:
        left, right = window_size
    kl = np.broadcast_to(S if key_lengths is None else np.asarray(key_lengths), (B,))
    slopes = None if alibi_slopes is None else np.broadcast_to(np.asarray(alibi_slopes, float), (B, Hq))
    mask = None if attn_mask is None else np.broadcast_to(attn_mask, (B, Hq, L, S))
    P = np.zeros((B, Hq, L, S))
    for b in range(B):
        Sb = int(kl[b])
        for h in range(Hq):
            kh = h // group if enable_gqa else (h if H > 1 else 0)
            for i in range(L):
                p = i if alignment == "top_left" else i + Sb - L
                logits = {}
                for j in range(S):
                    if j >= Sb or (is_causal and j > p):
                        continue
                    if (left is not None and j < p - left) or (right is not None and j > p + right):
                        continue
                    if mask is not None and mask.dtype == bool and not mask[b, h, i, j]:
                        continue
                    s = scale * sum(float(q[b, h, i, e]) * float(k[b, kh, j, e]) for e in range(E))
                    if softcap is not None:
                        s = softcap * math.tanh(s / softcap)
                    if slopes is not None:
                        s -= slopes[b, h] * abs(p - j)
                    if mask is not None and mask.dtype != bool:
                        s += float(mask[b, h, i, j])
                    logits[j] = s
                if not logits or max(logits.values()) == -math.inf:
                    continue
                m = max(logits.values())
                z = sum(math.exp(s - m) for s in logits.values())
                for j, s in logits.items():
                    P[b, h, i, j] = math.exp(s - m) / z
    return P


def _random_case(seed):
    rng = np.random.default_rng(seed)
    B, H = 2, int(rng.integers(1, 3))
    group = int(rng.integers(1, 3))
    Hq = H * group
    L, S, E = int(rng.integers(1, 7)), int(rng.integers(1, 8)), int(rng.integers(1, 5))
    q = rng.standard_normal((B, Hq, L, E))
    k = rng.standard_normal((B, H, S, E))
    kw = {"enable_gqa": group > 1, "is_causal": bool(rng.random() < 0.4)}
    if rng.random() < 0.3:
        kw["scale"] = float(rng.uniform(0.2, 2.0))
    if rng.random() < 0.5:
        kw["window_size"] = [1, 0, (0, 2), (None, 1), (2, None), (1, 3)][int(rng.integers(6))]
    if rng.random() < 0.5:
        kw["alignment"] = "bottom_right"
    if rng.random() < 0.5:
        kw["key_lengths"] = rng.integers(0, S + 1, size=(B,))
    if rng.random() < 0.4:
        kw["alibi_slopes"] = rng.uniform(0, 1, size=(Hq,))
    if rng.random() < 0.4:
        kw["softcap"] = float(rng.uniform(0.3, 3.0))
    r = rng.random()
    if r < 0.25:
        kw["attn_mask"] = rng.random((L, S)) < 0.7
    elif r < 0.5:
        kw["attn_mask"] = rng.standard_normal((Hq, 1, S))
    return q, k, kw


@pytest.mark.parametrize("seed", range(40))
def test_matches_scalar_oracle(seed):
    q, k, kw = _random_case(seed)
    want = _oracle(q, k, **kw)
    got = attention_weights(q, k, **kw)
    assert got.dtype == np.float64 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    got32 = attention_weights(q.astype(np.float32), k.astype(np.float32), **kw)
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, want, rtol=0, atol=2e-6)
    if all(name in _REF_PARAMS for name in kw):
        np.testing.assert_allclose(got, selfattn.reference.attention_weights(q, k, **kw), rtol=0, atol=1e-12)


def _kernel_accepts(kw):
    return all(name in _SDPA_PARAMS for name in kw if name in _STRUCTURED)


@pytest.mark.parametrize("seed", range(40))
def test_weights_times_value_is_the_kernel_output(seed):
    q, k, kw = _random_case(seed)
    if "attn_mask" in kw and kw.get("is_causal") and not _kernel_accepts({"window_size": 1}):
        kw.pop("attn_mask")               # older kernels take attn_mask or is_causal, not both
    kw = {n: v for n, v in kw.items() if n not in _STRUCTURED or n in _SDPA_PARAMS}
    rng = np.random.default_rng(1000 + seed)
    v = rng.standard_normal(k.shape[:-1] + (3,))
    P = attention_weights(q, k, **kw)
    vv = np.repeat(v, q.shape[1] // k.shape[1], axis=1)
    out = selfattn.scaled_dot_product_attention(q, k, v, **kw)
    np.testing.assert_allclose(P @ vv, out, rtol=0, atol=1e-11)   # kernel exp/tanh may differ in the last bits
    P32 = attention_weights(q.astype(np.float32), k.astype(np.float32), **kw)
    out32 = selfattn.scaled_dot_product_attention(q.astype(np.float32), k.astype(np.float32),
                                                  v.astype(np.float32), **kw)
    np.testing.assert_allclose(P32 @ vv.astype(np.float32), out32, rtol=0, atol=1e-5)


def test_broadcasting_and_2d_inputs():
    rng = np.random.default_rng(7)
    q = rng.standard_normal((5, 4))            # (L, E)
    k = rng.standard_normal((3, 1, 6, 4))      # batch 3, one head: broadcasts
    v = rng.standard_normal((3, 1, 6, 2))
    P = attention_weights(q, k)
    assert P.shape == (3, 1, 5, 6)
    np.testing.assert_allclose(P @ v, selfattn.scaled_dot_product_attention(q, k, v), atol=1e-12)
    P2 = attention_weights(q, k[0, 0], is_causal=True)
    assert P2.shape == (5, 6)
    np.testing.assert_allclose(P2, _oracle(q[None, None], k[:1, :1], is_causal=True)[0, 0], atol=1e-12)


def test_rows_sum_to_one_and_fully_masked_rows_are_zero():
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((1, 2, 5, 4)), rng.standard_normal((1, 2, 6, 4))
    mask = np.ones((5, 6), dtype=bool)
    mask[2] = False                                         # row 2: no key
    fmask = np.where(mask, 0.0, -np.inf)
    for m in (mask, fmask):
        P = attention_weights(q, k, attn_mask=m)
        np.testing.assert_array_equal(P[..., 2, :], 0.0)
        np.testing.assert_allclose(P.sum(-1)[..., [0, 1, 3, 4]], 1.0, atol=1e-12)
    P = attention_weights(q, k, key_lengths=0)
    assert P.shape == (1, 2, 5, 6) and not P.any()
    # bottom_right with fewer keys than queries: the first rows see no key
    P = attention_weights(q, k[..., :3, :], is_causal=True, alignment="bottom_right")
    np.testing.assert_array_equal(P[..., :2, :], 0.0)
    np.testing.assert_allclose(P[..., 2:, :].sum(-1), 1.0, atol=1e-12)


def test_empty_shapes():
    assert attention_weights(np.zeros((2, 0, 3)), np.zeros((2, 4, 3))).shape == (2, 0, 4)
    P = attention_weights(np.zeros((2, 3, 3)), np.zeros((2, 0, 3)))
    assert P.shape == (2, 3, 0)


def test_padded_keys_are_never_read_and_inputs_are_not_modified():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 3, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 3, 6, 8)).astype(np.float32)
    k[0, :, 4:] = np.nan
    k[1, :, 2:] = np.inf
    q0, k0 = q.copy(), k.copy()
    P = attention_weights(q, k, key_lengths=[4, 2], alibi_slopes=[0.5, 0.25, 0.125], softcap=5.0)
    assert np.isfinite(P).all()
    np.testing.assert_array_equal(P[0, ..., 4:], 0.0)
    np.testing.assert_array_equal(P[1, ..., 2:], 0.0)
    np.testing.assert_array_equal(q, q0)
    np.testing.assert_array_equal(k, k0)
    k_ok = np.where(np.isfinite(k), k, 0).astype(np.float64)
    want = _oracle(q.astype(np.float64), k_ok, key_lengths=[4, 2], alibi_slopes=[0.5, 0.25, 0.125], softcap=5.0)
    np.testing.assert_allclose(P, want, atol=2e-6)


def test_compute_dtype():
    q32, k32 = np.ones((2, 3, 4), np.float32), np.ones((2, 5, 4), np.float32)
    assert attention_weights(q32, k32).dtype == np.float32
    assert attention_weights(q32.astype(np.float16), k32).dtype == np.float32
    assert attention_weights(q32.astype(np.int32), k32.astype(np.int64)).dtype == np.float32
    assert attention_weights(q32, k32.astype(np.float64)).dtype == np.float64
    assert attention_weights(q32.astype(np.float64), k32).dtype == np.float64
    assert attention_weights(q32.tolist(), k32.tolist()).shape == (2, 3, 5)


# ---------------------------------------------------------------------------------------------
# errors: clear, naming the argument, raised before any work

Q, K = np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 5, 4))


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"query": np.zeros(4)}, ValueError, "query"),
    ({"key": np.zeros(4)}, ValueError, "key"),
    ({"key": np.zeros((1, 2, 5, 3))}, ValueError, "same last dim E"),
    ({"key": np.zeros((1, 3, 5, 4))}, ValueError, "broadcast"),
    ({"key": np.zeros((1, 3, 5, 4)), "enable_gqa": True}, ValueError, "multiple"),
    ({"query": np.zeros((1, 2, 3, 4), complex)}, TypeError, "query"),
    ({"key": np.array([["a"]])}, TypeError, "key"),
    ({"attn_mask": np.zeros((3, 5), np.int32)}, TypeError, "attn_mask"),
    ({"attn_mask": np.zeros((4, 5), bool)}, ValueError, "attn_mask"),
    ({"scale": float("nan")}, ValueError, "scale"),
    ({"scale": "1"}, TypeError, "scale"),
    ({"window_size": -1}, ValueError, "window_size"),
    ({"window_size": (1, -2)}, ValueError, "window_size"),
    ({"window_size": (1, 2, 3)}, TypeError, "window_size"),      # the wrong kind: TypeError, as in the engine
    ({"window_size": 1.5}, TypeError, "window_size"),
    ({"alignment": "center"}, ValueError, "alignment"),
    ({"alignment": None}, ValueError, "alignment"),
    ({"key_lengths": 6}, ValueError, "key_lengths"),
    ({"key_lengths": -1}, ValueError, "key_lengths"),
    ({"key_lengths": [1, 2]}, ValueError, "key_lengths"),
    ({"key_lengths": 1.0}, TypeError, "key_lengths"),
    ({"alibi_slopes": [1.0, 2.0, 3.0]}, ValueError, "alibi_slopes"),
    ({"alibi_slopes": [np.nan, 1.0]}, ValueError, "alibi_slopes"),
    ({"alibi_slopes": ["a", "b"]}, TypeError, "alibi_slopes"),
    ({"softcap": 0.0}, ValueError, "softcap"),
    ({"softcap": -1.0}, ValueError, "softcap"),
    ({"softcap": float("nan")}, ValueError, "softcap"),
    ({"softcap": float("inf")}, ValueError, "softcap"),
    ({"softcap": "2"}, TypeError, "softcap"),
    ({"max_elements": -1}, ValueError, "max_elements"),
    ({"max_elements": 1.5}, ValueError, "max_elements"),
])
def test_errors_name_the_argument(kwargs, exc, words):
    args = {"query": Q, "key": K}
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        attention_weights(**args)


def test_max_elements_refuses_with_memory_and_advice():
    q, k = np.zeros((4, 8, 1000, 16), np.float32), np.zeros((4, 8, 1000, 16), np.float32)
    with pytest.raises(ValueError) as info:
        attention_weights(q, k, max_elements=10 ** 6)
    msg = str(info.value)
    assert "32000000 elements" in msg and "122.1 MiB" in msg and "float32" in msg
    assert "query[..., i0:i1, :]" in msg and "max_elements" in msg
    assert attention_weights(q[:1, :1, :10], k[:1, :1], max_elements=10 ** 4).shape == (1, 1, 10, 1000)
    assert attention_weights(q[:1, :1, :10], k[:1, :1], max_elements=None).shape == (1, 1, 10, 1000)
    # the default limit is the documented one, and a float64 result is counted at 8 bytes
    big_q = np.broadcast_to(np.zeros(1), (2 ** 12, 2 ** 4, 1))
    big_k = np.broadcast_to(np.zeros(1), (2 ** 12, 1))
    with pytest.raises(ValueError, match=r"2\.0 GiB of float64"):
        attention_weights(big_q, big_k)


# ---------------------------------------------------------------------------------------------
# plot_attention

@pytest.fixture
def plt():
    mpl = optional_import("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as pyplot
    yield pyplot
    pyplot.close("all")


SEED_TOKENS = ["猫", "在", "草地上", "跑"]


def _labels(texts):
    return [t.get_text() for t in texts]


def _draw_without_missing_glyphs(fig):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fig.canvas.draw()
    missing = [str(w.message) for w in rec if "missing from" in str(w.message) or "Glyph" in str(w.message)]
    assert not missing, missing


def test_plot_basic(plt):
    w = attention_weights(np.eye(4, 3), np.eye(5, 3) * 2)
    ax = plot_ax = inspection.plot_attention(w, ["a", "b", "c", "d"], ["k1", "k2", "k3", "k4", "k5"],
                                             annotate=True, title="t")
    import matplotlib.axes
    assert isinstance(ax, matplotlib.axes.Axes)
    np.testing.assert_array_equal(ax.images[0].get_array(), w)
    assert _labels(ax.get_yticklabels()) == ["a", "b", "c", "d"]
    assert _labels(ax.get_xticklabels()) == ["k1", "k2", "k3", "k4", "k5"]
    assert len(ax.figure.axes) == 2                 # the heatmap and its colorbar
    _draw_without_missing_glyphs(plot_ax.figure)
    # drawing into a given Axes, without labels or colorbar
    fig, ax2 = plt.subplots()
    assert inspection.plot_attention(w, ax=ax2, colorbar=False) is ax2
    assert len(fig.axes) == 1


def test_plot_rejects_other_shapes(plt):
    with pytest.raises(ValueError, match=r"weights\[0, h\]"):
        inspection.plot_attention(np.zeros((1, 2, 3, 3)))
    with pytest.raises(ValueError, match="one \\(L, S\\) matrix"):
        inspection.plot_attention(np.zeros(3))
    with pytest.raises(ValueError, match="query_labels"):
        inspection.plot_attention(np.zeros((2, 3)), ["a"])
    with pytest.raises(TypeError, match="key_labels"):
        inspection.plot_attention(np.zeros((2, 3)), None, "abc")
    with pytest.raises(TypeError, match="label_fallbacks"):
        inspection.plot_attention(np.zeros((2, 2)), ["a", "b"], label_fallbacks=3)


def test_cjk_labels_without_a_cjk_font_become_ascii(plt, monkeypatch):
    monkeypatch.setattr(inspection, "_find_font_for", lambda text: None)   # as on a machine without one
    w = np.full((4, 4), 0.25)
    with pytest.warns(UserWarning, match="font"):
        ax = inspection.plot_attention(w, SEED_TOKENS, SEED_TOKENS)
    assert _labels(ax.get_yticklabels()) == ["cat", "at", "on the grass", "runs"]
    assert _labels(ax.get_xticklabels()) == ["cat", "at", "on the grass", "runs"]
    assert "transliterated" in ax.get_xlabel() and ax.get_xlabel().isascii()
    _draw_without_missing_glyphs(ax.figure)


def test_label_fallbacks_dict_callable_and_escape(plt, monkeypatch):
    monkeypatch.setattr(inspection, "_find_font_for", lambda text: None)
    w = np.full((2, 2), 0.5)
    with pytest.warns(UserWarning):
        ax = inspection.plot_attention(w, ["狗", "猫"], ["狗", "x"], label_fallbacks={"狗": "dog"})
    assert _labels(ax.get_yticklabels()) == ["dog", "cat"]
    assert _labels(ax.get_xticklabels()) == ["dog", "x"]
    with pytest.warns(UserWarning):
        ax = inspection.plot_attention(w, ["狗", "鸟"], label_fallbacks=lambda s: f"tok{len(s)}")
    assert _labels(ax.get_yticklabels()) == ["tok1", "tok1"]
    with pytest.warns(UserWarning):
        ax = inspection.plot_attention(w, ["狗", "a鸟"])
    assert _labels(ax.get_yticklabels()) == ["\\u72d7", "a\\u9e1f"]
    _draw_without_missing_glyphs(ax.figure)


def test_cjk_labels_kept_with_a_font_that_has_them(plt, monkeypatch):
    from matplotlib import font_manager
    path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"))
    monkeypatch.setattr(inspection, "_find_font_for", lambda text: path)   # pretend it covers CJK
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ax = inspection.plot_attention(np.full((4, 4), 0.25), SEED_TOKENS, SEED_TOKENS)
    assert _labels(ax.get_yticklabels()) == SEED_TOKENS
    assert ax.get_yticklabels()[0].get_fontproperties().get_file() == path


def test_real_font_search_never_draws_boxes(plt):
    """Whatever fonts this machine has: labels are drawn as written with a covering font, or
    transliterated to ASCII -- and matplotlib reports no missing glyph."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ax = inspection.plot_attention(np.full((4, 4), 0.25), SEED_TOKENS, SEED_TOKENS)
    found = inspection._find_font_for("".join(SEED_TOKENS))
    got = _labels(ax.get_yticklabels())
    assert got == (SEED_TOKENS if found else ["cat", "at", "on the grass", "runs"])
    if found:
        assert "Last Resort" not in found
    _draw_without_missing_glyphs(ax.figure)


def test_plot_without_matplotlib_says_how_to_install(monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"selfattn\[plot\]"):
        inspection.plot_attention(np.zeros((2, 2)))


def test_module_imports_without_matplotlib():
    import subprocess
    code = "import sys, selfattn.inspection; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "False"
