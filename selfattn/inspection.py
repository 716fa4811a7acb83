"""Looking inside attention: the weights matrix, and a heatmap of it.

``scaled_dot_product_attention`` never forms the L x S matrix of attention probabilities:
that is the point of a fused kernel. To *look* at them, ``attention_weights`` computes them
the plain way, in NumPy, with the same options and semantics:

    P = attention_weights(q, k, ...)         # (..., Hq, L, S), rows sum to 1 (or are all 0)
    P @ v  ==  scaled_dot_product_attention(q, k, v, ...)   (to rounding)

It materialises L x S per head on purpose, so it refuses (ValueError) to build a result of
more than ``max_elements`` elements (2**27 by default: 512 MiB in float32, 1 GiB in float64).
For bigger problems, look at a few heads or batch entries at a time (``query[..., h:h+1, :, :]``),
or at a slice of query rows: rows are independent, but the positional options (is_causal,
window_size, alibi_slopes) place row i at position i, so slice rows only without those.

``plot_attention`` draws one (L, S) weights matrix as a matplotlib heatmap with token labels.
matplotlib is optional (``pip install "selfattn[plot]"``) and imported only when plotting.
Labels in scripts the default font lacks (the notes' 猫 / 在 / 草地上 / 跑) are drawn with an
installed font that has the glyphs (Noto Sans CJK, WenQuanYi, Droid Sans Fallback, AR PL, ...);
when there is none they are replaced by readable ASCII (cat / at / on the grass / runs, or a
``\\uXXXX`` escape) with a warning -- never drawn as empty boxes.
"""

import math
import warnings

import numpy as np

from . import _spec
from ._spec import check_alignment as _check_alignment, check_softcap as _check_softcap
from ._spec import check_scale as _check_scale, is_int as _is_int, window_sides as _check_window

__all__ = ["attention_weights", "plot_attention", "DEFAULT_MAX_ELEMENTS", "DEFAULT_LABEL_FALLBACKS"]

DEFAULT_MAX_ELEMENTS = 2 ** 27


# ---------------------------------------------------------------------------------------------
# validation (every error names its argument and comes before any work)

def _as_array(x, name):
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} cannot be read as an array: {exc}") from None


def _compute_dtype(a, name):
    """float64 for float64 input; float32 for float32/float16/bfloat16/integer/bool (as the kernel)."""
    dt = a.dtype
    if dt == np.float64:
        return np.dtype(np.float64)
    if (dt in (np.float32, np.float16) or dt == np.bool_ or np.issubdtype(dt, np.integer)
            or (dt.name == "bfloat16" and dt.itemsize == 2)):
        return np.dtype(np.float32)
    raise TypeError(f"{name} has dtype {dt}, which selfattn cannot compute (supported: float32, "
                    f"float64, bfloat16 and float16; integer and bool compute in float32)")


def _broadcast_shapes(*shapes):
    try:
        return np.broadcast_shapes(*shapes)
    except ValueError:
        return None


def _check_max_elements(max_elements):
    if max_elements is None:
        return None
    if not _is_int(max_elements) or max_elements < 0:
        raise ValueError(f"max_elements must be None (no limit) or an int >= 0, got {max_elements!r}")
    return int(max_elements)


def _fmt_bytes(n):
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024.0


# ---------------------------------------------------------------------------------------------
# the structure of the mask, written out with positions

def _structure(L, S, lead, batch, *, is_causal, window, alignment, key_lengths, slopes, sink_tokens=0):
    """Visibility and bias of key j for query row i, as arrays broadcastable to lead + (L, S).

    Query row i sits at position p(i) = i (top_left) or i + S_b - L (bottom_right), where
    S_b = key_lengths[b] (S without key_lengths); key j sits at position j. Key j is visible iff

        j < S_b                                    (always)
        j <= p(i)                                  (is_causal)
        p(i) - left <= j <= p(i) + right           (window_size; a None side is unbounded;
                                                    j < sink_tokens escapes the left side)

    and ALiBi adds  -slope[..., h] * |p(i) - j|  to its logit.
    Returns (visible: bool or None for "all visible", bias: float64 array or None).
    """
    left, right = window
    nh = len(lead) - len(batch)                          # 1 when there is a head dim, else 0
    if key_lengths is not None:
        S_b = key_lengths.reshape(batch + (1,) * nh + (1, 1))
    else:
        S_b = S
    i = np.arange(L, dtype=np.int64).reshape(L, 1)
    j = np.arange(S, dtype=np.int64).reshape(1, S)
    p = i if alignment == "top_left" else i + (S_b - L)  # (L, 1) or batch + (.., L, 1)

    visible = None

    def both(a, b):
        return b if a is None else a & b

    if key_lengths is not None:
        visible = both(visible, j < S_b)
    if is_causal:
        visible = both(visible, j <= p)
    if left is not None:
        visible = both(visible, (j >= p - left) | (j < sink_tokens))
    if right is not None:
        visible = both(visible, j <= p + right)

    bias = None
    if slopes is not None:
        bias = -slopes.reshape(lead + (1, 1)) * np.abs(p - j).astype(np.float64)
    return visible, bias


# ---------------------------------------------------------------------------------------------
# attention_weights

def _softmax_rows(s, sinks=None):
    """Softmax over the last axis, in place; a row with no visible key (all -inf) gives zeros.
    sinks (broadcastable to s.shape[:-2] + (1, 1)): one more logit per row, of value zero."""
    if s.shape[-1] == 0:
        return s
    m = np.max(s, axis=-1, keepdims=True)
    if sinks is not None:
        m = np.maximum(m, sinks)
    dead = m == -np.inf
    m[dead] = 0
    with np.errstate(invalid="ignore", over="ignore"):
        s -= m
        np.exp(s, out=s)
        tot = np.sum(s, axis=-1, keepdims=True)
        if sinks is not None:
            tot += np.exp(sinks - m)
        tot[dead] = 1
        s /= tot
    return s


def attention_weights(query, key, attn_mask=None, is_causal=False, *, scale=None, enable_gqa=False,
                      window_size=None, alignment="top_left", key_lengths=None, alibi_slopes=None,
                      softcap=None, sinks=None, num_sink_tokens=None, max_elements=DEFAULT_MAX_ELEMENTS):
    """The attention probabilities softmax(logits), shape (..., Hq, L, S), materialised.

    Same arguments and semantics as ``selfattn.scaled_dot_product_attention`` (without value),
    so that ``attention_weights(q, k, ...) @ v`` equals ``scaled_dot_product_attention(q, k, v, ...)``
    to rounding. Unlike that function, this one builds the full L x S matrix per head (that is
    what it is for: looking at the weights), in plain NumPy.

    Parameters
    ----------
    query : array_like, (..., Hq, L, E)
    key : array_like, (..., H, S, E)
        Leading dims broadcast (NumPy rules); with ``enable_gqa``, Hq must be a multiple of H
        and query head h uses key head h // (Hq // H).
    attn_mask : array_like, optional
        bool (True = the key takes part) or float (added to the logits), broadcastable to
        (..., Hq, L, S). Composes with is_causal and the structured options: a key must pass all.
    is_causal : bool
        Key j is visible to query row i only if j <= p(i).
    scale : float, optional
        Defaults to 1/sqrt(E).
    window_size : None, int or (left, right)
        Query at position p sees keys j with p - left <= j <= p + right; an int w means (w, w);
        None (for the whole or one side) = unbounded.
    alignment : "top_left" or "bottom_right"
        Query row i sits at p(i) = i, or at p(i) = i + S_b - L (the last query on the last
        valid key, as when decoding with a KV cache).
    key_lengths : int array_like, optional
        Broadcastable to out.shape[:-3] (a scalar for a 2-D or 3-D query): S_b, the number of
        valid keys of each batch entry, 0 <= S_b <= S. Keys j >= S_b are masked and never read
        (NaN there is harmless).
    alibi_slopes : float array_like, optional
        Broadcastable to out.shape[:-2] = (..., Hq): adds ``-slope * |p(i) - j|`` to the logits.
    softcap : float > 0, optional
        The scaled logit s becomes softcap * tanh(s / softcap), before ALiBi and the mask are added.
    sinks : float array_like, optional
        Broadcastable to (..., Hq): one more logit in each row's denominator (an attention sink);
        the rows then sum to less than 1 (the sink's share is what they lack).
    num_sink_tokens : int >= 0, optional
        With a window bounded on the left, the first n keys stay visible beside it (StreamingLLM).
    max_elements : int or None
        Refuse (ValueError) to build a result of more elements than this (default 2**27).
        None = no limit.

    Returns
    -------
    ndarray (..., Hq, L, S), float64 if query or key is float64, else float32. Each row sums
    to 1 (less with sinks), except rows whose keys are all masked: those are all zeros (as the
    kernel's output).

    Raises
    ------
    TypeError / ValueError naming the offending argument, before any work is done.
    """
    # -- scalars and options
    _check_alignment(alignment)
    window = _check_window(window_size)
    softcap = _check_softcap(softcap)
    max_elements = _check_max_elements(max_elements)
    causal = _spec.check_is_causal(is_causal)
    gqa = bool(enable_gqa)

    # -- arrays, dtypes, shapes
    q = _as_array(query, "query")
    k = _as_array(key, "key")
    dt = np.result_type(_compute_dtype(q, "query"), _compute_dtype(k, "key"))
    for a, name, rows in ((q, "query", "L"), (k, "key", "S")):
        if a.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., {rows}, E), got shape {a.shape}")
    L, E, S = q.shape[-2], q.shape[-1], k.shape[-2]
    if k.shape[-1] != E:
        raise ValueError(f"query and key must have the same last dim E: query {q.shape} has E={E}, "
                         f"key {k.shape} has E={k.shape[-1]}")
    scale = _check_scale(scale, E)

    qb, kb = q.shape[:-2], k.shape[:-2]
    group = 1
    if gqa and len(qb) >= 1 and len(kb) >= 1 and qb[-1] != kb[-1]:
        hq, hk = qb[-1], kb[-1]
        if hk == 0 or hq % hk:
            raise ValueError(f"enable_gqa: query heads Hq={hq} must be a multiple of key heads H={hk}: "
                             f"query {q.shape}, key {k.shape}")
        group = hq // hk
        batch_shape = _broadcast_shapes(qb[:-1], kb[:-1])
        lead = None if batch_shape is None else batch_shape + (hq,)
    else:
        lead = _broadcast_shapes(qb, kb)
    if lead is None:
        raise ValueError(f"the leading (batch, head) dims of query {q.shape} and key {k.shape} do not "
                         f"broadcast" + ("" if gqa else "; for grouped-query heads pass enable_gqa=True"))
    batch = lead[:-1] if len(lead) >= 1 else ()
    out_shape = lead + (L, S)

    mask = None
    if attn_mask is not None:
        mask = _as_array(attn_mask, "attn_mask")
        if not (mask.dtype == np.bool_ or (mask.dtype.kind == "f" and mask.dtype.itemsize <= 8)):
            raise TypeError(f"attn_mask must be bool (True = takes part) or floating (added to the "
                            f"logits), got dtype {mask.dtype}")
        if _broadcast_shapes(mask.shape, out_shape) != out_shape:
            raise ValueError(f"attn_mask of shape {mask.shape} does not broadcast to (..., Hq, L, S) = "
                             f"{out_shape}")
    kl = None if key_lengths is None else _spec.batch_lengths(key_lengths, batch, S)
    slopes = None if alibi_slopes is None else _spec.head_slopes(alibi_slopes, lead)
    ns = 0 if num_sink_tokens is None else _spec.check_sink_tokens(num_sink_tokens)
    sk = None if sinks is None else _spec.head_sinks(sinks, lead).astype(dt)[..., None, None]

    n = math.prod(out_shape)
    if max_elements is not None and n > max_elements:
        raise ValueError(
            f"attention_weights materialises the full (..., Hq, L, S) = {out_shape} matrix: {n} elements, "
            f"{_fmt_bytes(n * dt.itemsize)} of {dt} (plus temporaries of about the same size), over "
            f"max_elements={max_elements}. Call it on fewer heads or batch entries at a time "
            f"(query[..., h:h+1, :, :]) or on a slice of query rows (query[..., i0:i1, :], without "
            f"positional options), or raise max_elements (None = no limit). "
            f"scaled_dot_product_attention needs none of this memory.")

    # -- the work: logits in the compute dtype (fresh arrays only: the inputs are never written)
    qc = q.astype(dt, copy=False)
    kc = k.astype(dt, copy=False)
    if kl is not None:
        # keys j >= S_b are never read: zero them so that a NaN or inf there cannot leak
        nh = len(lead) - len(batch)                      # 1 with a head dim, 0 for a 2-D query
        keep = np.arange(S).reshape(S, 1) < kl.reshape(batch + (1,) * nh + (1, 1))
        kc = np.where(keep, kc, dt.type(0))
    kt = np.swapaxes(kc, -1, -2)
    if group > 1:
        # query head h reads key head h // group: (..., H, group, L, E) @ (..., H, 1, E, S)
        qg = qc.reshape(qc.shape[:-3] + (qc.shape[-3] // group, group, L, E))
        s = np.matmul(qg, kt[..., None, :, :])
        s = s.reshape(s.shape[:-4] + (s.shape[-4] * group, L, S))
    else:
        s = np.matmul(qc, kt)
    if s.shape != out_shape or s.dtype != dt:            # (matmul already broadcasts: a safeguard)
        s = np.array(np.broadcast_to(s, out_shape), dtype=dt)
    s *= dt.type(scale)
    if softcap is not None:
        s /= dt.type(softcap)
        np.tanh(s, out=s)
        s *= dt.type(softcap)

    visible, bias = _structure(L, S, lead, batch, is_causal=causal, window=window, alignment=alignment,
                               key_lengths=kl, slopes=slopes, sink_tokens=ns)
    if bias is not None:
        s += bias.astype(dt)
    if mask is not None:
        if mask.dtype == np.bool_:
            visible = mask if visible is None else visible & mask
        else:
            with np.errstate(invalid="ignore"):
                s += mask.astype(dt, copy=False)
    if visible is not None:
        np.copyto(s, dt.type(-np.inf), where=~np.asarray(visible))

    return _softmax_rows(s, sk)


# ---------------------------------------------------------------------------------------------
# plot_attention

DEFAULT_LABEL_FALLBACKS = {"猫": "cat", "在": "at", "草地上": "on the grass", "跑": "runs"}

# font families known to cover CJK; any installed font whose name contains one of these is tried
_CJK_FONT_HINTS = ("Noto Sans CJK", "Noto Serif CJK", "Noto Sans SC", "Noto Sans TC", "Noto Sans JP",
                   "Noto Sans KR", "Noto Sans HK", "Source Han", "WenQuanYi", "Droid Sans Fallback",
                   "AR PL", "SimHei", "SimSun", "Microsoft YaHei", "PingFang", "Hiragino", "Heiti",
                   "Songti", "STHeiti", "Sarasa", "IPAGothic", "IPAexGothic", "TakaoGothic",
                   "Unifont", "HanaMin", "Arial Unicode")
# fonts that claim every code point but draw boxes: never a fallback
_TOFU_FONTS = ("Last Resort",)

_charmaps: dict = {}   # font path -> set of code points


def _charmap(path):
    """The set of code points a font file has glyphs for (cached)."""
    if path not in _charmaps:
        try:
            from matplotlib.ft2font import FT2Font
            _charmaps[path] = frozenset(FT2Font(path).get_charmap())
        except Exception:                       # unreadable font file: covers nothing
            _charmaps[path] = frozenset()
    return _charmaps[path]


def _covers(path, text):
    cm = _charmap(path)
    return all(ord(c) in cm or c.isspace() for c in text)


def _default_font_path():
    from matplotlib import font_manager, rcParams
    fam = rcParams["font.family"]
    try:
        return font_manager.findfont(font_manager.FontProperties(family=fam))
    except Exception:
        return None


def _find_font_for(text):
    """Path of an installed font with glyphs for every character of `text`, or None.

    Fonts whose family names look like CJK fonts are tried first (each must be found by
    ``font_manager.findfont(..., fallback_to_default=False)``), then every other installed font.
    """
    from matplotlib import font_manager
    entries = [f for f in font_manager.fontManager.ttflist
               if not any(t.lower() in f.name.lower() for t in _TOFU_FONTS)]
    hinted = [f for f in entries if any(h.lower() in f.name.lower() for h in _CJK_FONT_HINTS)]
    for f in hinted:
        try:
            path = font_manager.findfont(font_manager.FontProperties(family=f.name), fallback_to_default=False)
        except Exception:
            continue
        if _covers(path, text):
            return path
    for f in entries:
        if f not in hinted and _covers(f.fname, text):
            return f.fname
    return None


def _ascii_fallback(label, fallbacks):
    if callable(fallbacks):
        out = fallbacks(label)
    else:
        table = DEFAULT_LABEL_FALLBACKS if fallbacks is None else fallbacks
        out = table.get(label)
        if out is None and fallbacks is not None:
            out = DEFAULT_LABEL_FALLBACKS.get(label)
    if out is None:
        out = label.encode("ascii", "backslashreplace").decode("ascii")
    out = str(out)
    if not out.isascii():
        out = out.encode("ascii", "backslashreplace").decode("ascii")
    return out


def _check_labels(labels, n, name):
    if labels is None:
        return None
    if isinstance(labels, str):
        raise TypeError(f"{name} must be a sequence of {n} strings, not a single string")
    labels = [str(x) for x in labels]
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} labels for {n} {'rows' if name == 'query_labels' else 'columns'}")
    return labels


def _resolve_labels(labels, default_path, fallbacks):
    """For each label: (text, font path or None = default font). Returns (resolved, replaced)."""
    resolved, replaced = [], []
    for lab in labels:
        if default_path is not None and _covers(default_path, lab):
            resolved.append((lab, None))
            continue
        path = _find_font_for(lab)
        if path is not None:
            resolved.append((lab, path))
        else:
            fb = _ascii_fallback(lab, fallbacks)
            resolved.append((fb, None))
            replaced.append((lab, fb))
    return resolved, replaced


def plot_attention(weights, query_labels=None, key_labels=None, *, ax=None, label_fallbacks=None,
                   cmap="viridis", colorbar=True, annotate=False, title=None):
    """Heatmap of one attention weights matrix (L, S): rows = queries, columns = keys.

    Parameters
    ----------
    weights : array_like, (L, S)
        One head of ``attention_weights(...)``, e.g. ``weights[0, h]`` (any other ndim is an error).
    query_labels, key_labels : sequence of str, optional
        Tick labels of the rows (length L) and columns (length S), e.g. the tokens.
    ax : matplotlib Axes, optional
        Where to draw; a new figure is made when omitted.
    label_fallbacks : dict or callable, optional
        Used for a label when no installed font has its glyphs (e.g. CJK without a CJK font):
        a dict label -> ASCII text, or a callable label -> ASCII text. Defaults to
        DEFAULT_LABEL_FALLBACKS (猫/在/草地上/跑 -> cat/at/on the grass/runs), else the label's
        ``\\uXXXX`` escapes. A warning says which labels were replaced and why.
    cmap : str
        Colormap name.
    colorbar : bool
        Add a colorbar.
    annotate : bool
        Write each weight in its cell (for small matrices).
    title : str, optional

    Returns
    -------
    matplotlib.axes.Axes

    Needs matplotlib: ``pip install "selfattn[plot]"``.
    """
    w = _as_array(weights, "weights")
    if w.ndim != 2:
        hint = ""
        if w.ndim > 2:
            idx = ", ".join(["0"] * (w.ndim - 3) + ["h"])
            hint = f"; pick one head, e.g. weights[{idx}] for head h"
        raise ValueError(f"plot_attention draws one (L, S) matrix, got weights of shape {w.shape}{hint}")
    if w.dtype == np.bool_ or not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise TypeError(f"weights must be a real array, got dtype {w.dtype}")
    L, S = w.shape
    qlab = _check_labels(query_labels, L, "query_labels")
    klab = _check_labels(key_labels, S, "key_labels")
    if label_fallbacks is not None and not (callable(label_fallbacks) or isinstance(label_fallbacks, dict)):
        raise TypeError(f"label_fallbacks must be a dict or a callable, got {type(label_fallbacks).__name__}")

    try:
        from matplotlib.font_manager import FontProperties
    except ImportError as exc:
        raise ImportError("plot_attention needs matplotlib, an optional dependency of selfattn: "
                          "pip install 'selfattn[plot]'  (or pip install matplotlib)") from exc

    if ax is None:
        import matplotlib.pyplot as plt
        size = (min(2.5 + 0.6 * max(S, 4), 16.0), min(1.5 + 0.5 * max(L, 4), 12.0))
        _, ax = plt.subplots(figsize=size, constrained_layout=True)

    im = ax.imshow(w, cmap=cmap, aspect="auto", interpolation="nearest")
    if colorbar:
        ax.figure.colorbar(im, ax=ax, label="attention weight")
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title is not None:
        ax.set_title(title)

    default_path = _default_font_path()
    replaced = []
    for labels, n, set_ticks, set_labels, axis in (
            (qlab, L, ax.set_yticks, ax.set_yticklabels, "y"),
            (klab, S, ax.set_xticks, ax.set_xticklabels, "x")):
        if labels is None:
            continue
        resolved, rep = _resolve_labels(labels, default_path, label_fallbacks)
        replaced += rep
        set_ticks(np.arange(n))
        texts = set_labels([t for t, _ in resolved],
                           **({"rotation": 45, "ha": "right", "rotation_mode": "anchor"} if axis == "x" else {}))
        for txt, (_, path) in zip(texts, resolved):
            if path is not None:
                txt.set_fontproperties(FontProperties(fname=path))

    if annotate:
        lo, hi = (float(np.nanmin(w)), float(np.nanmax(w))) if w.size else (0.0, 1.0)
        mid = (lo + hi) / 2
        for i in range(L):
            for j in range(S):
                ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if w[i, j] > mid else "white")

    if replaced:
        seen = dict(replaced)
        pairs = ", ".join(f"{a!r} -> {b!r}" for a, b in seen.items())
        note = "no installed font has these labels' glyphs: labels transliterated"
        warnings.warn(f"plot_attention: {note} ({pairs}). Install a CJK font (e.g. fonts-noto-cjk "
                      f"or fonts-wqy-microhei) to draw them as written.", UserWarning, stacklevel=2)
        ax.set_xlabel(f"{ax.get_xlabel()}\n(labels transliterated: no installed font has their glyphs)")
    return ax
