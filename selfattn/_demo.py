"""``python -m selfattn``: the self-attention example of the seed notes, through the fused kernel.

The notes (a Chinese write-up of the Hung-yi Lee / Andrew Ng lectures) use the
sentence 猫 在 草地上 跑 ("the cat runs on the grass") with 3-dimensional inputs

    a1 = [0.1, 0.2, 0.3] (猫)   a2 = [0.4, 0.5, 0.6] (在)
    a3 = [0.7, 0.8, 0.9] (草地上) a4 = [1.0, 1.1, 1.2] (跑)

and illustrative value vectors with components [action, position, subject]

    v1 = [0,0,1]  v2 = [0,1,0]  v3 = [0,1,0]  v4 = [1,0,0]

and illustrative attention weights of 猫 on the four tokens 0.1, 0.2, 0.3, 0.4,
so that  b1 = 0.1 v1 + 0.2 v2 + 0.3 v3 + 0.4 v4 = [0.4, 0.5, 0.1].

Part 1 runs the full layer selfattn.attend(x, wq, wk, wv) on x = [a1; a2; a3; a4]
with small fixed weights (see _weights) and checks it against the float64 reference.
Part 2 reproduces the notes' own arithmetic for b1 exactly through the kernel.
Part 3 prints one speed comparison with NumPy on a realistic shape.
"""

import math
import sys
import time
import unicodedata

import numpy as np

TOKENS = ["猫", "在", "草地上", "跑"]
TOKENS_ASCII = ["cat", "on", "grass", "runs"]   # used when stdout cannot encode CJK
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
    print("   weights: wq = wk = 2*I (score = scaled embedding similarity), wv = I (v_i = a_i)")
    q, k = x @ wq, x @ wk
    P = ref.attention_weights(q, k)                      # float64 softmax(q k^T / sqrt(3))
    print("   attention weights softmax(q k^T / sqrt(3)); row = query token, column = key token:")
    print(_table(tokens, tokens, P, corner="q \\ k"))
    print("   (each row sums to 1; 猫 attends most to 跑, as in the notes)" if tokens is TOKENS
          else "   (each row sums to 1; 'cat' attends most to 'runs', as in the notes)")

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
    print("   v_j (value vectors, components = " + ", ".join(features) + "):")
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


def _best_ms(fn, repeats, budget_s):
    fn()  # warm-up (page faults, thread pools)
    best, t_end = math.inf, time.perf_counter() + budget_s
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if i >= 1 and time.perf_counter() > t_end:
            break
    return best * 1e3


def _part3(sa):
    print()
    B, H, L, E = 1, 8, 1024, 64
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, L, E), dtype=np.float32) for _ in range(3))
    scale = 1.0 / math.sqrt(E)
    t_sa = _best_ms(lambda: sa.scaled_dot_product_attention(q, k, v), 7, 2.0)
    t_np = _best_ms(lambda: _naive(q, k, v, scale), 5, 3.0)
    print(f"3) Speed, B{B} H{H} L{L} E{E} float32 (best of a few runs, same inputs):")
    r = t_np / t_sa
    verdict = f"{r:.1f}x faster" if r >= 1 else f"{1 / r:.1f}x slower"
    print(f"   selfattn {t_sa:.1f} ms vs NumPy naive {t_np:.1f} ms -> {verdict}")


def _config_line(sa):
    try:
        cfg = sa.config()
    except Exception as exc:  # pragma: no cover - a broken build
        return f"selfattn config unavailable: {exc!r}"
    avail = cfg.get("isas_available")
    if isinstance(avail, (list, tuple)):
        avail = ",".join(map(str, avail))
    return (f"selfattn {cfg.get('version', '?')}: isa={cfg.get('isa', '?')} (available: {avail}), "
            f"openmp={cfg.get('openmp', '?')}, threads={cfg.get('default_threads', '?')}")


def main(argv=None):
    import selfattn as sa
    from selfattn import reference as ref

    cjk = _can_print_cjk()
    tokens = TOKENS if cjk else TOKENS_ASCII
    features = FEATURES if cjk else FEATURES_ASCII

    title = "猫 在 草地上 跑" if cjk else "cat / on / grass / runs"
    print(f"selfattn demo: self-attention on the sentence  {title}")
    print()
    ok1 = _part1(sa, ref, tokens)
    ok2 = _part2(sa, ref, tokens, features)
    _part3(sa)
    print("   ran on: " + _config_line(sa))
    return 0 if (ok1 and ok2) else 1
