"""pytest-benchmark configuration for the selfattn benchmarks.

    pytest bench/ --benchmark-only            # measure (several minutes; NumPy naive is slow at L4096)
    pytest bench/ --benchmark-disable         # smoke run: every benchmark once, on shrunken shapes (seconds)
    pytest bench/ --benchmark-only -k "L1024" --benchmark-columns=min,mean,rounds

These live outside tests/ so that the default test run does not pick them up.
Thread count: SELFATTN_BENCH_THREADS (default: selfattn's default_threads); torch
and the NumPy BLAS are pinned to the same count for the whole session.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _attn_impls  # noqa: E402


def bench_threads():
    env = os.environ.get("SELFATTN_BENCH_THREADS")
    return int(env) if env else _attn_impls.default_threads()


@pytest.fixture(scope="session")
def threads():
    n = bench_threads()
    limiter = _attn_impls.pin_threads(n)
    yield n
    if limiter is not None:
        limiter.restore_original_limits()


def pytest_report_header(config):
    lines = [f"selfattn bench threads: {bench_threads()}"]
    try:
        import selfattn

        cfg = selfattn.config()
        lines.append("selfattn config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    except Exception as exc:  # report, do not fail collection here
        lines.append(f"selfattn config unavailable: {exc!r}")
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS"):
        if var in os.environ:
            lines.append(f"{var}={os.environ[var]}")
    return lines
