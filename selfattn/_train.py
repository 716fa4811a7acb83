"""``python -m selfattn train``: learn W_q, W_k, W_v, W_o of an attention layer in plain NumPy.

The task is associative recall, where looking at the right token is the whole point. A
sequence lists PAIRS key -> value, one token per pair (the sum of a key embedding and a
value embedding), followed by QUERIES, each a key marked as a question:

    k5=v2  k17=v9  k3=v30  ...  k11=v4  |  k3?  k11?  k5?      ->  v30  v4  v2

For every query the model must output the value paired with its key. Keys are drawn without
replacement, values at random, so nothing but the content of the sequence tells the answer
(chance: 1/N_VALUES). One attention layer does it exactly when its query of "k3?" scores the
key of the pair "k3=v30" highest and its values/W_o read "v30" off that pair: the attention
heatmap written at the end shows the learned lookup.

Model (all learned, float32): embeddings of keys, values and the question marker; one
multi-head attention layer ``selfattn.attend_vjp(x, wq, wk, wv, num_heads=H, wo=wo, bo=bo,
key_lengths=N_PAIRS)`` whose output is the logits over the values (key_lengths keeps every
token's attention on the pairs: the questions carry no values). Loss: softmax cross-entropy
on the query tokens. Gradients: attend_vjp's ``vjp`` (the fused backward), then the embedding
gradient dx scattered back with np.add.at; updates: Adam, written out below.
"""

import contextlib
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

N_KEYS = 64         # key vocabulary
N_VALUES = 64       # value vocabulary = output classes
N_PAIRS = 32        # key -> value pairs per sequence
N_QUERIES = 16      # questions per sequence
D_MODEL = 48
HEADS = 2
HEAD_DIM = 24
BATCH = 32
LR = 3e-3
DEFAULT_STEPS = 600  # the target is reached after ~150 (seeds 0-1): a 4x margin
TARGET_ACCURACY = 0.99      # on fresh sequences, after the default number of steps
EVAL_SEQUENCES = 2048


def make_batch(rng: np.random.Generator, batch: int):
    """(keys (B, P), values (B, P), asked (B, Q) indices into the pairs)."""
    keys = np.argsort(rng.random((batch, N_KEYS)), axis=1)[:, :N_PAIRS]        # distinct keys per sequence
    values = rng.integers(0, N_VALUES, size=(batch, N_PAIRS))
    asked = np.argsort(rng.random((batch, N_PAIRS)), axis=1)[:, :N_QUERIES]    # distinct pairs asked about
    return keys, values, asked


def init_params(rng: np.random.Generator) -> Dict[str, np.ndarray]:
    f = np.float32
    d, hd = D_MODEL, HEADS * HEAD_DIM
    return {
        "key_emb": rng.standard_normal((N_KEYS, d)).astype(f),
        "val_emb": rng.standard_normal((N_VALUES, d)).astype(f),
        "marker": rng.standard_normal(d).astype(f),
        "wq": (rng.standard_normal((d, hd)) / math.sqrt(d)).astype(f),
        "wk": (rng.standard_normal((d, hd)) / math.sqrt(d)).astype(f),
        "wv": (rng.standard_normal((d, hd)) / math.sqrt(d)).astype(f),
        "wo": (rng.standard_normal((hd, N_VALUES)) / math.sqrt(hd)).astype(f),
        "bo": np.zeros(N_VALUES, f),
    }


def embed(p, keys, values, asked):
    """The token vectors (B, P + Q, d): pairs key_emb + val_emb, then questions key_emb + marker."""
    asked_keys = np.take_along_axis(keys, asked, axis=1)
    pairs = p["key_emb"][keys] + p["val_emb"][values]
    questions = p["key_emb"][asked_keys] + p["marker"]
    return np.concatenate([pairs, questions], axis=1), asked_keys


def forward_backward(p, keys, values, asked, num_threads=1):
    """Loss, accuracy and gradients of every parameter on one batch."""
    import selfattn
    x, asked_keys = embed(p, keys, values, asked)
    y, vjp = selfattn.attend_vjp(x, p["wq"], p["wk"], p["wv"], num_heads=HEADS, wo=p["wo"], bo=p["bo"],
                                 key_lengths=N_PAIRS, num_threads=num_threads)
    logits = y[:, N_PAIRS:].astype(np.float64)                                   # (B, Q, N_VALUES)
    target = np.take_along_axis(values, asked, axis=1)                           # (B, Q)
    logits -= logits.max(axis=-1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(axis=-1, keepdims=True)
    picked = np.take_along_axis(prob, target[..., None], axis=-1)[..., 0]
    loss = float(-np.mean(np.log(np.maximum(picked, 1e-30))))
    acc = float(np.mean(prob.argmax(axis=-1) == target))
    dlogits = prob
    np.put_along_axis(dlogits, target[..., None], np.take_along_axis(dlogits, target[..., None], -1) - 1.0, -1)
    dy = np.zeros_like(y)
    dy[:, N_PAIRS:] = dlogits / target.size                                      # d mean(CE) / d logits
    dx, dwq, dwk, dwv, dwo, dbo = vjp(dy)
    g = {"wq": dwq, "wk": dwk, "wv": dwv, "wo": dwo, "bo": dbo,
         "key_emb": np.zeros_like(p["key_emb"]), "val_emb": np.zeros_like(p["val_emb"])}
    dpairs, dquestions = dx[:, :N_PAIRS], dx[:, N_PAIRS:]
    np.add.at(g["key_emb"], keys, dpairs)
    np.add.at(g["val_emb"], values, dpairs)
    np.add.at(g["key_emb"], asked_keys, dquestions)
    g["marker"] = dquestions.sum(axis=(0, 1))
    return loss, acc, g


class Adam:
    """Adam (Kingma & Ba), in place on a dict of arrays."""

    def __init__(self, params: Dict[str, np.ndarray], lr: float = LR, b1: float = 0.9, b2: float = 0.999,
                 eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t = lr, b1, b2, eps, 0
        self.m = {n: np.zeros_like(a) for n, a in params.items()}
        self.v = {n: np.zeros_like(a) for n, a in params.items()}

    def step(self, params: Dict[str, np.ndarray], grads: Dict[str, np.ndarray]) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for n, g in grads.items():
            m, v = self.m[n], self.v[n]
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * g * g
            params[n] -= (self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)).astype(params[n].dtype)


def evaluate(p, rng, n=EVAL_SEQUENCES, num_threads=None):
    """Accuracy and loss on n fresh sequences (the forward only: selfattn.attend)."""
    import selfattn
    keys, values, asked = make_batch(rng, n)
    x, _ = embed(p, keys, values, asked)
    y = selfattn.attend(x, p["wq"], p["wk"], p["wv"], num_heads=HEADS, wo=p["wo"], bo=p["bo"], key_lengths=N_PAIRS,
                        num_threads=num_threads)
    logits = y[:, N_PAIRS:].astype(np.float64)
    target = np.take_along_axis(values, asked, axis=1)
    logits -= logits.max(axis=-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    loss = float(-np.mean(np.take_along_axis(logp, target[..., None], axis=-1)))
    return float(np.mean(logits.argmax(axis=-1) == target)), loss


def attention_of_one(p, rng):
    """Weights (H, Q, P) of the questions of one fresh sequence on its pairs, with row and column labels."""
    import selfattn
    keys, values, asked = make_batch(rng, 1)
    x, asked_keys = embed(p, keys, values, asked)
    x = x[0]

    def heads(t):
        return np.swapaxes(t.reshape(t.shape[0], HEADS, HEAD_DIM), 0, 1)
    w = selfattn.attention_weights(heads(x @ p["wq"]), heads(x @ p["wk"]), key_lengths=N_PAIRS)
    cols = [f"k{k}=v{v}" for k, v in zip(keys[0], values[0])]
    rows = [f"k{k}?" for k in asked_keys[0]]
    return w[:, N_PAIRS:, :N_PAIRS], rows, cols


class _Progress:
    """A plain-text progress bar: redrawn in place on a terminal, a line every 10% otherwise."""

    def __init__(self, total: int, stream=None, width: int = 28):
        self.total, self.width = total, width
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.last_draw = -1.0
        self.last_decile = -1

    def update(self, step: int, loss: float, acc: float) -> None:
        now = time.perf_counter()
        decile = 10 * step // self.total
        final = step == self.total
        if self.tty:
            if not final and now - self.last_draw < 0.1:
                return
        elif decile == self.last_decile and not final:
            return
        self.last_draw, self.last_decile = now, decile
        fill = self.width * step // self.total
        bar = "#" * fill + "-" * (self.width - fill)
        line = (f"[{bar}] {step:>{len(str(self.total))}}/{self.total}  loss {loss:6.3f}  "
                f"acc {100 * acc:5.1f}%  {now - self.t0:5.1f}s")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def train(steps: int = DEFAULT_STEPS, seed: int = 0, quiet: bool = False, progress_stream=None,
          log_every: int = 1, num_threads: Optional[int] = 1, blas_threads: Optional[int] = 1) -> Dict[str, Any]:
    """Train from scratch; returns {'params', 'losses', 'accs', 'seconds', 'step_at_target',
    'seconds_at_target'}.

    losses[i] / accs[i]: of the batch of step i (fresh sequences every step, so they measure
    generalisation too). step_at_target: the first step whose accuracy, averaged over the last
    50 steps, reached TARGET_ACCURACY (None if none did).

    num_threads: of selfattn's attention kernels (None: selfattn's default). blas_threads: of
    NumPy's BLAS (the projections, the embedding and output matmuls), set with threadpoolctl when
    it is installed (None: the BLAS's default). Both 1 by default: a step is far too small to gain
    from threads, and threads that wait on each other lose a lot when another process shares the
    cores (5-8x slower steps measured on a busy 2-core machine).

    Determinism: for a given seed and blas_threads the results are the same bits whatever
    num_threads is, since selfattn's kernels do not depend on their thread count. The BLAS makes
    no such promise: OpenBLAS's GEMM gives different bits on 1 and 2 threads on some CPUs (losses
    differ at 1e-9 from the second step), so the two counts are set apart."""
    rng = np.random.default_rng(seed)
    params = init_params(rng)
    opt = Adam(params)
    bar = None if quiet else _Progress(steps, progress_stream)
    losses: List[float] = []
    accs: List[float] = []
    elapsed: List[float] = []
    t0 = time.perf_counter()
    with _blas_threads(blas_threads):
        _loop(params, opt, rng, steps, num_threads, bar, log_every, losses, accs, elapsed, t0)
    at_target = next((i + 1 for i in range(49, len(accs)) if np.mean(accs[i - 49:i + 1]) >= TARGET_ACCURACY), None)
    return {"params": params, "losses": losses, "accs": accs, "seconds": elapsed[-1], "step_at_target": at_target,
            "seconds_at_target": None if at_target is None else elapsed[at_target - 1]}


def _blas_threads(n):
    """Limit NumPy's BLAS to n threads in a block, when threadpoolctl is installed."""
    if n is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def _loop(params, opt, rng, steps, num_threads, bar, log_every, losses, accs, elapsed, t0):
    for step in range(1, steps + 1):
        keys, values, asked = make_batch(rng, BATCH)
        loss, acc, grads = forward_backward(params, keys, values, asked, num_threads=num_threads)
        opt.step(params, grads)
        losses.append(loss)
        accs.append(acc)
        elapsed.append(time.perf_counter() - t0)
        if bar is not None and (step % log_every == 0 or step == steps):
            bar.update(step, float(np.mean(losses[-20:])), float(np.mean(accs[-20:])))


def _plots(result, out_dir, seed):
    """Loss curve and attention heatmap as PNGs when matplotlib is installed; returns their paths."""
    try:
        import matplotlib
    except ImportError:
        print("(plots need matplotlib: pip install 'selfattn[plot]')")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import selfattn
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    losses = np.asarray(result["losses"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.6, alpha=0.4, label="batch loss")
    k = min(25, len(losses))
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax.plot(np.arange(k, len(losses) + 1), smooth, lw=1.5, label=f"mean of {k} steps")
    ax.axhline(math.log(N_VALUES), color="gray", ls=":", lw=1, label=f"chance: ln {N_VALUES}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title("selfattn train: associative recall")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "selfattn-train-loss.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    w, rows, cols = attention_of_one(result["params"], np.random.default_rng(seed + 1))
    fig, axes = plt.subplots(HEADS, 1, figsize=(9, 3.6 * HEADS))
    for h, ax in enumerate(np.atleast_1d(axes)):
        selfattn.plot_attention(w[h], rows, cols, ax=ax, title=f"head {h}: rows = questions, columns = pairs")
        ax.tick_params(labelsize=6)
    fig.suptitle("learned attention: each question k? looks at the pair with its key")
    fig.tight_layout()
    path = os.path.join(out_dir, "selfattn-train-attention.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def main(steps: int = DEFAULT_STEPS, seed: int = 0, quiet: bool = False, out: Optional[str] = ".",
         num_threads: Optional[int] = 1, blas_threads: Optional[int] = 1) -> int:
    """Run the command; exit status 0 when the accuracy on fresh sequences reaches TARGET_ACCURACY."""
    import selfattn
    if not quiet:
        print(f"selfattn train: associative recall with one attention layer, in NumPy (attend_vjp + Adam)\n"
              f"  each sequence: {N_PAIRS} pairs 'key=value' ({N_KEYS} keys, {N_VALUES} values), then "
              f"{N_QUERIES} questions 'key?'\n"
              f"  the answer to 'k?' is the value paired with k in this sequence (chance "
              f"{100 / N_VALUES:.1f}%)\n"
              f"  model: embeddings + attend(num_heads={HEADS}, head dim {HEAD_DIM}, d_model {D_MODEL}) "
              f"-> logits; {steps} Adam steps of {BATCH} sequences, seed {seed}\n"
              f"  target: {100 * TARGET_ACCURACY:.0f}% on {EVAL_SEQUENCES} fresh sequences")
    result = train(steps=steps, seed=seed, quiet=quiet, num_threads=num_threads, blas_threads=blas_threads)
    with _blas_threads(blas_threads):
        acc, loss = evaluate(result["params"], np.random.default_rng([seed, 12345]), num_threads=num_threads)
    ok = acc >= TARGET_ACCURACY
    at = result["step_at_target"]
    reached = (f"; the running accuracy (last 50 batches) reached {100 * TARGET_ACCURACY:.0f}% at step {at}, "
               f"after {result['seconds_at_target']:.1f}s" if at else "")
    print(f"accuracy on {EVAL_SEQUENCES} fresh sequences: {100 * acc:.2f}% (loss {loss:.4f}), target "
          f"{100 * TARGET_ACCURACY:.0f}%: {'reached' if ok else 'NOT reached'} after {len(result['losses'])} "
          f"steps in {result['seconds']:.1f}s{reached}")
    if out is not None:
        for path in _plots(result, out, seed):
            print(f"wrote {os.path.abspath(path)}")
    if not quiet:
        from ._demo import _config_line
        print("ran on: " + _config_line(selfattn))
    return 0 if ok else 1
