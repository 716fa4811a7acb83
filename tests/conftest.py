"""Shared pytest configuration for the selfattn test suite.

The tests are filed by feature, one folder each:

    forward/      the forward kernel against selfattn.reference and closed forms; attend's options,
                  positions (RoPE, ALiBi), the CNN-as-attention example
    backward/     the fused backward and every VJP (against the reference, finite differences and
                  torch), the backward's schedules, `selfattn train`
    decode/       decoding (L << S, split-KV), KVCache, merge_attention
    structured/   windows (window_size, alignment), key_lengths, ALiBi, softcap, varlen: in the
                  kernel on every path and its schedules, and in the reference (independent forms)
    dtypes/       bfloat16 and float16 (read as stored, computed in float32): bit for bit the float32
                  path rounded, every 16-bit pattern, accuracy against float64 and torch
    dispatch/     ISA paths (forced), use_isa contexts, thread counts, config(), the C kernel tests
    robustness/   fuzzing, bad inputs and misuse, dtypes, sizes, concurrency, Ctrl-C, leaks
    integration/  torch, Dask, the MiniLM example, plots, the demo and CLI, the README, packaging

Shared by all: sa_testutil.py (the ISA list, tile edges, tolerances, comparison helpers, the C
program builder, optional imports) and this file. Each test file's basename is unique (pytest
imports them by basename: no __init__.py).

* makes sure the *installed* selfattn is under test, not the source tree
  (set SELFATTN_ALLOW_SOURCE_TREE=1 to override, e.g. for an in-place build);
* registers the hypothesis profiles ("ci" is the default; pick another one with
  SELFATTN_HYPOTHESIS_PROFILE=dev|thorough);
* exposes ISAS (every instruction set runnable here) as a fixture and a
  parametrisation helper. The comparison helpers live in sa_testutil.py;
* leaves out the tests marked `slow` (C programs compiled by the test, training runs, a Dask
  cluster, Ctrl-C children, memory growth over thousands of calls) unless --run-slow is given or
  SELFATTN_RUN_SLOW=1 is set: the README's `pytest tests` stays short for a newcomer; CI runs them
  all (its step "slow tests").
"""

import os
import sys
from pathlib import Path

import pytest

_TESTS_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _TESTS_DIR.parent

# Make the helper module importable whatever pytest import mode is in use.
if str(_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(_TESTS_DIR))

import selfattn  # noqa: E402

_ALLOW_SOURCE = os.environ.get("SELFATTN_ALLOW_SOURCE_TREE", "") == "1"
_selfattn_file = Path(getattr(selfattn, "__file__", None) or next(iter(selfattn.__path__))).resolve()
try:
    _selfattn_file.relative_to(_REPO_ROOT)
    _FROM_SOURCE_TREE = True
except ValueError:
    _FROM_SOURCE_TREE = False

if _FROM_SOURCE_TREE and not _ALLOW_SOURCE:
    pytest.exit(
        f"selfattn was imported from the source tree ({_selfattn_file}), not from the installed "
        f"package. Install it (pip install .) and run pytest from outside {_REPO_ROOT} "
        f"(e.g. `cd /tmp && python -m pytest {_TESTS_DIR}`), or set SELFATTN_ALLOW_SOURCE_TREE=1 "
        f"if you really mean to test an in-place build.",
        returncode=4,
    )

from hypothesis import HealthCheck, settings  # noqa: E402

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=_SUPPRESS, print_blob=True)
settings.register_profile("dev", max_examples=15, deadline=None, suppress_health_check=_SUPPRESS)
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=_SUPPRESS,
                          print_blob=True)
settings.load_profile(os.environ.get("SELFATTN_HYPOTHESIS_PROFILE", "ci"))

from sa_testutil import BF16_FWD_ISAS, ISAS, MISSING_ISAS, missing_isa_reason  # noqa: E402


def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (or set SELFATTN_RUN_SLOW=1)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes seconds (a compiled C program, a training run, a "
                                       "cluster, a child process); left out unless --run-slow")


def _run_slow(config):
    return config.getoption("--run-slow") or os.environ.get("SELFATTN_RUN_SLOW", "") == "1"


def pytest_collection_modifyitems(config, items):
    # `-m slow` asks for them by name: then they run too
    if _run_slow(config) or "slow" in (config.getoption("-m") or ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config._selfattn_slow_left_out = len(slow)


def pytest_report_header(config):
    try:
        cfg = selfattn.config()
    except Exception as exc:  # pragma: no cover - reported, not fatal here
        cfg = f"<config() failed: {exc!r}>"
    lines = [f"selfattn: {_selfattn_file}", f"selfattn config: {cfg}", f"CPU: {_cpu_model()}",
             f"kernel paths under test: {', '.join(ISAS)}"]
    return lines


def pytest_terminal_summary(terminalreporter, config):
    # said again at the end of the log, where a reader of CI's output looks first
    terminalreporter.write_line(f"selfattn kernel paths tested: {', '.join(ISAS)}"
                                + (f" (and the bfloat16 kernels of {', '.join(BF16_FWD_ISAS)}: "
                                   "tests/dtypes/test_bf16_dot*.py)" if BF16_FWD_ISAS else ""))
    for name in MISSING_ISAS:       # said once, here, where a reader of CI's log looks first
        terminalreporter.write_line(f"note: {missing_isa_reason(name)}")
    n_slow = getattr(config, "_selfattn_slow_left_out", 0)
    if n_slow:
        terminalreporter.write_line(f"{n_slow} slow tests left out (deselected): pytest --run-slow runs them "
                                    f"too, pytest -m slow only them")


@pytest.fixture(params=ISAS)
def isa(request):
    """Each runnable instruction set, forced for the duration of the test."""
    with selfattn.use_isa(request.param):
        yield request.param


@pytest.fixture(scope="session")
def isas():
    return list(ISAS)
