"""`python -m selfattn train` (selfattn._train): an attention layer learned in NumPy with attend_vjp + Adam."""

import contextlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest

import selfattn
from selfattn import _train

CHANCE_LOSS = np.log(_train.N_VALUES)        # ln 64 = 4.16: cross-entropy of a uniform guess
THRESHOLD = 0.5                              # the short run must end below this (seed 0)


@pytest.mark.slow
def test_short_run_learns_the_task():
    r = _train.train(steps=160, seed=0, quiet=True)
    losses = np.asarray(r["losses"])
    first, last = losses[:10].mean(), losses[-10:].mean()
    # it starts at chance (so passing is not a matter of the threshold being loose) ...
    assert first > 0.8 * CHANCE_LOSS > THRESHOLD, first
    # ... and learns: the lookup is found, not just the value frequencies (those give ~ln 64 too)
    assert last < THRESHOLD, (first, last)
    assert np.mean(r["accs"][-10:]) > 0.9
    acc, loss = _train.evaluate(r["params"], np.random.default_rng(1))
    assert acc > 0.9 and loss < THRESHOLD


def test_deterministic_for_a_seed_whatever_the_attention_threads():
    """What selfattn promises: its kernels give the same bits on 1, 2 and 3 threads, so a run is
    the same for a seed. NumPy's BLAS is held at one thread in all three runs (blas_threads=1, the
    default): OpenBLAS's GEMM itself may differ between thread counts, which is not selfattn's to
    promise (without threadpoolctl the BLAS runs its default count in all three, the same)."""
    a = _train.train(steps=12, seed=3, quiet=True, num_threads=1)
    for n_threads in (2, 3):
        b = _train.train(steps=12, seed=3, quiet=True, num_threads=n_threads, blas_threads=1)
        assert a["losses"] == b["losses"], n_threads
        for n in a["params"]:
            np.testing.assert_array_equal(a["params"][n], b["params"][n], err_msg=f"{n}, {n_threads} threads")
    c = _train.train(steps=12, seed=4, quiet=True)
    assert a["losses"] != c["losses"]


def test_blas_threads_are_set_apart_from_the_attention_threads(monkeypatch):
    """train() hands blas_threads, not num_threads, to the BLAS limit."""
    seen = []

    def limit(n):
        seen.append(n)
        return contextlib.nullcontext()

    monkeypatch.setattr(_train, "_blas_threads", limit)
    _train.train(steps=1, seed=0, quiet=True, num_threads=2, blas_threads=1)
    _train.train(steps=1, seed=0, quiet=True, num_threads=1, blas_threads=None)
    assert seen == [1, None]


def test_gradients_of_the_whole_model_match_finite_differences():
    """forward_backward's gradients (attend_vjp + the embedding scatter) against central differences
    of its loss, in float64, along a random direction per parameter."""
    rng = np.random.default_rng(0)
    p = {n: a.astype(np.float64) for n, a in _train.init_params(rng).items()}
    batch = _train.make_batch(rng, 3)
    _, _, g = _train.forward_backward(p, *batch)
    assert set(g) == set(p)
    h = 1e-6
    for n in p:
        u = rng.standard_normal(p[n].shape)
        plus, minus = dict(p), dict(p)
        plus[n], minus[n] = p[n] + h * u, p[n] - h * u
        fd = (_train.forward_backward(plus, *batch)[0] - _train.forward_backward(minus, *batch)[0]) / (2 * h)
        an = float(np.sum(g[n] * u))
        assert abs(an - fd) <= 1e-5 * (1 + abs(fd)), (n, an, fd)


def test_adam_first_step_and_convergence():
    p = {"w": np.array([1.0, -2.0, 3.0])}
    opt = _train.Adam(p, lr=0.1)
    opt.step(p, {"w": np.array([0.5, -4.0, 1e-3])})
    # bias-corrected first step: lr * sign(g) (up to eps)
    np.testing.assert_allclose(p["w"], [0.9, -1.9, 2.9], rtol=1e-6)
    target = np.array([0.3, 0.7, -1.1])
    for _ in range(500):
        opt.step(p, {"w": 2 * (p["w"] - target)})
    np.testing.assert_allclose(p["w"], target, atol=1e-2)


def test_progress_bar_plain_text():
    buf = io.StringIO()
    _train.train(steps=20, seed=0, progress_stream=buf)
    lines = buf.getvalue().splitlines()
    assert 2 <= len(lines) <= 12                       # a line per 10% when not a terminal
    assert lines[-1].startswith("[" + "#" * 28 + "]") and " 20/20 " in lines[-1]
    assert "loss" in lines[-1] and "acc" in lines[-1]


def _run(args, cwd, timeout=300):
    env = dict(os.environ)
    env.pop("SELFATTN_ISA", None)
    return subprocess.run([sys.executable, "-m", "selfattn", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_short_run_writes_the_plots(tmp_path):
    out = tmp_path / "plots"
    r = _run(["train", "--steps", "250", "--seed", "0", "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "associative recall" in r.stdout and "target 99%: reached" in r.stdout, r.stdout
    assert "accuracy on 2048 fresh sequences" in r.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots need matplotlib" in r.stdout
        return
    for name in ("selfattn-train-loss.png", "selfattn-train-attention.png"):
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(path) in r.stdout


def test_cli_quiet_no_plots_and_usage(tmp_path):
    r = _run(["train", "--steps", "5", "--quiet", "--no-plots"], tmp_path)
    assert r.returncode == 1                                   # 5 steps: target not reached, said so
    assert "NOT reached" in r.stdout and "[#" not in r.stdout and "wrote" not in r.stdout
    assert list(tmp_path.iterdir()) == []
    r = _run(["train", "--steps", "0"], tmp_path)
    assert r.returncode == 2 and "--steps" in r.stderr
    r = _run(["train", "--threads", "-1"], tmp_path)
    assert r.returncode == 2 and "--threads" in r.stderr
    r = _run(["train", "--blas-threads", "-1"], tmp_path)
    assert r.returncode == 2 and "--blas-threads" in r.stderr
    r = _run(["train", "--help"], tmp_path)
    assert r.returncode == 0 and all(o in r.stdout for o in ("--steps", "--seed", "--out", "--quiet", "--threads", "--blas-threads"))
    assert "train" in _run(["--help"], tmp_path).stdout


def test_the_target_is_reached_by_the_default_run_within_its_steps():
    """Documented numbers stay consistent: default steps well beyond where seed 0 reaches the target."""
    assert _train.DEFAULT_STEPS >= 3 * 160
    assert 0.5 < _train.TARGET_ACCURACY < 1
    assert selfattn.attend_vjp is not None
