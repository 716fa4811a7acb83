"""``python -m selfattn``: the self-attention example of the seed notes, through the fused kernel.

The notes (a Chinese write-up of the Hung-yi Lee / Andrew Ng lectures) use the
sentence 猫 在 草地上 跑 (猫 cat, 在 at, 草地上 on the grass, 跑 runs: "the cat runs
on the grass") with 3-dimensional inputs

    a1 = [0.1, 0.2, 0.3] (猫)   a2 = [0.4, 0.5, 0.6] (在)
    a3 = [0.7, 0.8, 0.9] (草地上) a4 = [1.0, 1.1, 1.2] (跑)

and illustrative value vectors with components [action, position, subject]

    v1 = [0,0,1]  v2 = [0,1,0]  v3 = [0,1,0]  v4 = [1,0,0]

and illustrative attention weights of 猫 on the four tokens 0.1, 0.2, 0.3, 0.4,
so that  b1 = 0.1 v1 + 0.2 v2 + 0.3 v3 + 0.4 v4 = [0.4, 0.5, 0.1].

Part 1 runs the full layer selfattn.attend(x, wq, wk, wv) on x = [a1; a2; a3; a4]
with small fixed weights (see _weights) and checks it against the float64 reference.
Part 2 reproduces the notes' own arithmetic for b1 exactly through the kernel.
Part 3 times one realistic shape against NumPy (and torch when installed): the median
of interleaved rounds, with the spread of the per-round ratios.
"""

import io
import math
import statistics
import sys
import time
import unicodedata
from typing import List

import numpy as np

TOKENS = ["猫", "在", "草地上", "跑"]
TOKENS_ASCII = ["cat", "at", "grass", "runs"]   # used when stdout cannot encode CJK
MEANINGS = ["cat", "at", "on the grass", "runs"]
FEATURES = ["动作", "位置", "主体"]             # action, position, subject
FEATURES_ASCII = ["action", "position", "subject"]

A = np.array([[0.1, 0.2, 0.3],
              [0.4, 0.5, 0.6],
              [0.7, 0.8, 0.9],
              [1.0, 1.1, 1.2]])
V_SEED = np.array([[0.0, 0.0, 1.0],
                   [0.0, 1.0, 0.0],
                   [0.0, 1.0, 0.0],
                   [1.0, 0.0, 0.0]])
W_SEED = np.array([0.1, 0.2, 0.3, 0.4])


def _weights():
    """The fixed projection weights of part 1, in (in, out) layout: q = x @ wq.

    wq = wk = 2*I: query and key of a token are its embedding, doubled, so the score
    q_i . k_j / sqrt(3) is a scaled similarity of the embeddings. The factor 2 makes
    the softmax of 猫's row come out as 0.12, 0.18, 0.28, 0.42 -- close to the notes'
    illustrative 0.1, 0.2, 0.3, 0.4, with 猫 attending most to 跑.

    wv = I: v_i = a_i. The notes' v_i cannot come out of any linear wv: the a_i lie on
    a line with equal spacing (a_{i+1} - a_i = [0.3, 0.3, 0.3]), so any a_i @ wv are
    equally spaced on a line too, while v2 = v3 != v1, v4. Part 2 uses the notes'
    v_i directly instead.
    """
    eye = np.eye(3)
    return 2.0 * eye, 2.0 * eye, eye


# ---- printing helpers -------------------------------------------------------------

def _width(s):
    """Terminal display width: East Asian wide/fullwidth characters take two columns."""
    return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in s)


def _rjust(s, w):
    return " " * max(0, w - _width(s)) + s


def _ljust(s, w):
    return s + " " * max(0, w - _width(s))


def _table(rows, cols, data, fmt="{:.3f}", corner=""):
    """A right-aligned table with row/column labels (CJK-aware)."""
    cells = [[fmt.format(x) for x in row] for row in data]
    cw = max([_width(c) for c in cols] + [_width(c) for r in cells for c in r])
    rw = max([_width(r) for r in rows] + [_width(corner)])
    lines = [_ljust(corner, rw) + "  " + "  ".join(_rjust(c, cw) for c in cols)]
    for r, row in zip(rows, cells):
        lines.append(_ljust(r, rw) + "  " + "  ".join(_rjust(c, cw) for c in row))
    return "\n".join("    " + ln for ln in lines)


def _can_print_cjk():
    enc = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "猫草地上跑动作位置主体".encode(enc)
        return True
    except (UnicodeEncodeError, LookupError):
        return False


def _vec(x):
    return "[" + ", ".join(f"{v:.4f}" for v in x) + "]"


# ---- the three parts --------------------------------------------------------------

def _part1(sa, ref, tokens):
    wq, wk, wv = _weights()
    x = A
    print("1) Self-attention layer on x = [a1; a2; a3; a4]  (L=4 tokens, d_model=3)")
    print("   input vectors (one row per token, a made-up 3-d embedding):")
    print(_table([f"a{i + 1} {t}" for i, t in enumerate(tokens)], ["x[0]", "x[1]", "x[2]"], x,
                 fmt="{:.1f}", corner="token"))
    print("   weights: wq = wk = 2*I (score = scaled embedding similarity), wv = I (v_i = a_i)")
    q, k = x @ wq, x @ wk
    P = ref.attention_weights(q, k)                      # float64 softmax(q k^T / sqrt(3))
    print("   attention weights softmax(q k^T / sqrt(3)); row = query token, column = key token:")
    print(_table(tokens, tokens, P, corner="q \\ k"))
    last = tokens[-1]
    print(f"   Each row sums to 1. With these untrained weights the score of a pair is just the dot\n"
          f"   product of the two input vectors, so EVERY token attends most to the largest vector,\n"
          f"   a4 ({last}): the notes' 'the cat attends to runs' holds, but for a dull reason. This is\n"
          f"   exactly why W_q and W_k are learned: training makes them score the pairs that matter.")

    out = np.asarray(sa.attend(x, wq, wk, wv, num_heads=1))
    expect = ref.attend(x, wq, wk, wv, num_heads=1)
    err = float(np.max(np.abs(out - expect)))
    print("   output b_i = sum_j P_ij v_j  from selfattn.attend (fused kernel):")
    print(_table(tokens, ["b[0]", "b[1]", "b[2]"], out, fmt="{:.6f}", corner="token"))
    ok = np.allclose(out, expect, rtol=1e-12, atol=1e-12)
    print(f"   vs selfattn.reference.attend (float64 NumPy): max |diff| = {err:.1e}  "
          f"{'OK' if ok else 'MISMATCH'}")
    return ok


def _part2(sa, ref, tokens, features):
    print()
    print("2) The notes' own numbers: weights 0.1, 0.2, 0.3, 0.4 of the first token on v1..v4")
    # softmax(log w) = w / sum(w) = w because the w_j sum to 1. So one query q = [1],
    # keys k_j = [log w_j] and scale = 1 make the kernel's softmax exactly the notes' w.
    q = np.array([[1.0]])
    k = np.log(W_SEED)[:, None]
    P = ref.attention_weights(q, k, scale=1.0)
    print("   E=1, scale=1, q = [[1]], k_j = [log(0.1 j)]  ->  softmax = w_j / sum(w) = w_j:")
    print(_table([tokens[0]], tokens, P, corner="q \\ k"))
    b1 = np.asarray(sa.scaled_dot_product_attention(q, k, V_SEED, scale=1.0))[0]
    hand = W_SEED @ V_SEED
    names = (", ".join(f"{f} {e}" for f, e in zip(features, FEATURES_ASCII)) if features is FEATURES
             else ", ".join(features))
    print(f"   v_j (value vectors, components = {names}):")
    print(_table(tokens, features, V_SEED, fmt="{:.0f}", corner="token"))
    print(f"   by hand : 0.1*v1 + 0.2*v2 + 0.3*v3 + 0.4*v4 = {_vec(hand)}")
    print(f"   selfattn.scaled_dot_product_attention       = {_vec(b1)}")
    ok = np.allclose(b1, [0.4, 0.5, 0.1], rtol=0, atol=1e-12)
    print(f"   b1 = [0.4, 0.5, 0.1]: {'OK' if ok else 'MISMATCH'}")
    return ok


def _naive(q, k, v, scale):
    s = np.matmul(q, np.swapaxes(k, -1, -2))
    s *= s.dtype.type(scale)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return np.matmul(s, v)


def _round_robin_ms(fns, rounds, budget_s):
    """Time each function `rounds` times, interleaved (one call of each per round, so drift and
    noise from other processes hit all of them alike); stop early after `budget_s` seconds.
    Returns one list of per-call times (ms) per function."""
    for fn in fns:
        fn()  # warm-up (page faults, thread pools)
    times: List[List[float]] = [[] for _ in fns]
    t_end = time.perf_counter() + budget_s
    for r in range(rounds):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        if r >= 2 and time.perf_counter() > t_end:
            break
    return times


def _ratio_line(name, t_other, t_sa):
    """'NumPy naive  40.1 ms  -> selfattn 2.7x faster (per-round range 2.3-3.2x, 9 rounds)':
    the median of the per-round ratios, and their smallest and largest."""
    ratios = sorted(o / s for o, s in zip(t_other, t_sa))
    med = statistics.median(ratios)
    if med >= 1:
        verdict = f"{med:.1f}x faster"
        spread = f"{ratios[0]:.1f}-{ratios[-1]:.1f}x"
    else:
        verdict = f"{1 / med:.1f}x slower"
        spread = f"{1 / ratios[-1]:.1f}-{1 / ratios[0]:.1f}x"
    return (f"   {name:<12} {statistics.median(t_other):7.1f} ms  -> selfattn {verdict} "
            f"(per-round range {spread}, {len(ratios)} rounds)")


def _try_torch():
    try:
        import torch
        import torch.nn.functional  # noqa: F401
        return torch
    except Exception:   # not installed, or a broken install: the demo runs without it
        return None


def _part3(sa, rounds=9, budget_s=6.0):
    print()
    B, H, L, E = 1, 8, 1024, 64
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, L, E), dtype=np.float32) for _ in range(3))
    scale = 1.0 / math.sqrt(E)
    threads = sa.config()["default_threads"]
    names = ["selfattn", "NumPy naive"]
    fns = [lambda: sa.scaled_dot_product_attention(q, k, v), lambda: _naive(q, k, v, scale)]
    torch = _try_torch()
    if torch is not None:
        torch.set_num_threads(threads)
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))   # zero-copy views of the same arrays

        def torch_sdpa():
            with torch.inference_mode():
                torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
        names.append("torch SDPA")
        fns.append(torch_sdpa)
    times = _round_robin_ms(fns, rounds, budget_s)
    print(f"3) Speed, B{B} H{H} L{L} E{E} float32: median time per call over interleaved rounds\n"
          f"   (selfattn and torch at {threads} thread{'s' if threads != 1 else ''}, NumPy at its BLAS default)")
    print(f"   {'selfattn':<12} {statistics.median(times[0]):7.1f} ms")
    for name, ts in zip(names[1:], times[1:]):
        print(_ratio_line(name, ts, times[0]))
    if torch is None:
        print("   (torch not installed: pip install 'selfattn[bench]' adds it to this comparison)")
    print("   Timings on a busy or small machine vary from run to run; the range shows by how much.")


def _heatmap(sa, path):
    """Write the part-1 weights as a heatmap PNG when matplotlib is installed; say where."""
    try:
        import matplotlib
    except ImportError:
        print("   (a heatmap of these weights needs matplotlib: pip install 'selfattn[plot]')")
        return
    import os
    import warnings
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    wq, wk, _ = _weights()
    P = sa.attention_weights(A @ wq, A @ wk)
    fig, ax = plt.subplots(figsize=(4.6, 3.8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)      # no CJK font: labels transliterated, noted
        sa.plot_attention(P, TOKENS, TOKENS, ax=ax, annotate=True, title="selfattn demo: who attends to whom")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"   heatmap of these weights written to {os.path.abspath(path)}")


def _config_line(sa):
    """Exactly what selfattn.show_config() prints."""
    buf = io.StringIO()
    sa.show_config(file=buf)
    return buf.getvalue().strip()


def main(timing=True, rounds=9, heatmap="selfattn-demo-attention.png"):
    """Run the demo; returns the exit status (0 when the kernel's numbers match the reference).
    heatmap: where to write the part-1 weights as a PNG (when matplotlib is installed), or None."""
    import selfattn as sa
    from selfattn import reference as ref

    cjk = _can_print_cjk()
    tokens = TOKENS if cjk else TOKENS_ASCII
    features = FEATURES if cjk else FEATURES_ASCII

    print("selfattn demo: self-attention on the sentence  " + ("猫 在 草地上 跑" if cjk else "cat at grass runs"))
    gloss = ", ".join(f"{t} {m}" for t, m in zip(TOKENS, MEANINGS)) if cjk else ", ".join(MEANINGS)
    print(f"  ({gloss}: 'the cat runs on the grass')")
    print()
    ok1 = _part1(sa, ref, tokens)
    if heatmap:
        _heatmap(sa, heatmap)
    ok2 = _part2(sa, ref, tokens, features)
    if timing:
        _part3(sa, rounds=rounds)
    print("   ran on: " + _config_line(sa))
    return 0 if (ok1 and ok2) else 1
