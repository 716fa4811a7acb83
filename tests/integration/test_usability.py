"""Small things a user meets first: SELFATTN_ISA warnings, the torch-layout hint, docstring examples."""

import doctest
import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import selfattn
import selfattn._api
from selfattn import _core


# ---- SELFATTN_ISA ---------------------------------------------------------------------------

def _import_with_env(tmp_path, value):
    script = tmp_path / "user_script.py"
    script.write_text("import numpy\nimport selfattn\nprint(selfattn.config()['isa'])\n")
    env = dict(os.environ, SELFATTN_ISA=value)
    return script, subprocess.run([sys.executable, "-W", "always", str(script)], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=60)


def test_bogus_isa_warns_at_the_users_import(tmp_path):
    script, r = _import_with_env(tmp_path, "bogus")
    assert r.returncode == 0, r.stderr
    # points at line 2 of the script (the import), not at importlib's frozen frames
    assert f"{script}:2: RuntimeWarning: SELFATTN_ISA" in r.stderr
    assert "<frozen" not in r.stderr
    assert "'bogus'" in r.stderr and "environment variable" in r.stderr
    assert r.stdout.strip() == selfattn.available_isas()[0]


@pytest.mark.parametrize("name", ["avx2", "generic", " Generic "])
def test_lower_isa_is_used_silently(tmp_path, name):
    want = name.strip().lower()
    if want not in selfattn.available_isas():
        pytest.skip(f"{want} not available here")
    _, r = _import_with_env(tmp_path, name)
    assert r.returncode == 0 and "Warning" not in r.stderr, r.stderr
    assert r.stdout.strip() == want


def test_unavailable_isa_warns_in_a_subprocess(tmp_path):
    missing = [n for n in _core.ISA_NAMES if n not in selfattn.available_isas()]
    if not missing:
        pytest.skip("every instruction set runs on this CPU (the unit test below covers the case)")
    script, r = _import_with_env(tmp_path, missing[-1])
    assert f"{script}:2: RuntimeWarning" in r.stderr and "does not support" in r.stderr
    assert r.stdout.strip() == selfattn.available_isas()[0]


def test_env_isa_choice():
    names = _core.ISA_NAMES                       # ("generic", "avx2", "avx512")
    gen, avx2, avx512 = (names.index(n) for n in ("generic", "avx2", "avx512"))
    on_avx2_cpu = ["avx2", "generic"]
    assert _core._env_isa_choice("", avx2, on_avx2_cpu) == (avx2, None)
    assert _core._env_isa_choice("generic", avx2, on_avx2_cpu) == (gen, None)
    assert _core._env_isa_choice(" AVX2 ", avx2, on_avx2_cpu) == (avx2, None)
    isa, msg = _core._env_isa_choice("avx512", avx2, on_avx2_cpu)   # asked for more than the CPU has
    assert isa == avx2 and "does not support" in msg and "'avx512'" in msg and "using 'avx2'" in msg
    isa, msg = _core._env_isa_choice("sse9", avx512, ["avx512", "avx2", "generic"])
    assert isa == avx512 and "'sse9'" in msg and "not one of" in msg


# ---- attend: torch-layout weights --------------------------------------------------------

X = np.arange(12.0).reshape(4, 3) / 10


@pytest.mark.parametrize("which", ["wq", "wk", "wv"])
def test_torch_layout_weight_gets_the_transpose_hint(which):
    w = {"wq": np.eye(3), "wk": np.eye(3), "wv": np.eye(3)}
    w[which] = np.ones((5, 3))                         # torch nn.Linear(3, 5).weight: (out, in)
    with pytest.raises(ValueError, match=rf"{which} must be 2-D.*\(5, 3\).*pass {which}\.T"):
        selfattn.attend(X, w["wq"], w["wk"], w["wv"])
    w[which] = w[which].T
    if which != "wv":
        w["wq" if which == "wk" else "wk"] = np.ones((3, 5))
    selfattn.attend(X, w["wq"], w["wk"], w["wv"])      # transposed, it fits


def test_torch_layout_wo_gets_the_transpose_hint():
    with pytest.raises(ValueError, match=r"wo must be 2-D.*\(7, 3\).*pass wo\.T"):
        selfattn.attend(X, np.eye(3), np.eye(3), np.eye(3), wo=np.ones((7, 3)))


def test_no_transpose_hint_when_the_transpose_would_not_fit_either():
    with pytest.raises(ValueError, match=r"got shape \(5, 6\)$"):
        selfattn.attend(X, np.ones((5, 6)), np.eye(3), np.eye(3))


# ---- the docstrings' examples ------------------------------------------------------------

def test_docstring_examples_run():
    result = doctest.testmod(selfattn._api, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted >= 10 and result.failed == 0


def test_gomp_spincount_default_and_the_users_choice(tmp_path):
    """selfattn shortens libgomp's idle spinning (GOMP_SPINCOUNT=30000, read by libgomp when _core
    loads it) without leaving the variable in the user's environment (subprocesses, torch's OpenMP);
    a value the user set stays and wins."""
    code = ("import os, selfattn, subprocess, sys; print(os.environ.get('GOMP_SPINCOUNT', 'unset')); "
            "print(subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get(\"GOMP_SPINCOUNT\", "
            "\"unset\"))'], capture_output=True, text=True).stdout.strip())")
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["unset", "unset"], (r.stdout, r.stderr)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(env, GOMP_SPINCOUNT="7"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["7", "7"], (r.stdout, r.stderr)
    # libgomp did read 30000 when _core loaded it: its own display of what it runs with
    if not selfattn.config()["openmp"]:
        return
    # the libgomp _core loaded (a wheel repaired by auditwheel carries its own copy), from the maps
    show = ("import ctypes, sys, selfattn\n"
            "try:\n"
            "    maps = open('/proc/self/maps').read().splitlines()\n"
            "except OSError:\n    raise SystemExit(3)\n"
            "libs = sorted({ln.split()[-1] for ln in maps if 'libgomp' in ln.split()[-1]})\n"
            "if not libs:\n    raise SystemExit(3)\n"
            "ctypes.CDLL(libs[0]).omp_display_env(1)\n")
    r = subprocess.run([sys.executable, "-c", show], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    if r.returncode == 3:
        pytest.skip("no libgomp loaded (another OpenMP runtime, or no /proc): GOMP_SPINCOUNT is libgomp's")
    assert r.returncode == 0 and "GOMP_SPINCOUNT = '30000'" in r.stderr, (r.stdout, r.stderr)


def test_import_from_an_unbuilt_source_folder_says_what_to_do(tmp_path):
    """python run where an uncompiled selfattn/ folder sits (the repository root) imports that folder:
    the error says so and what to do, not "partially initialized module (circular import)"."""
    import shutil
    src = Path(selfattn.__file__).resolve().parent
    dst = tmp_path / "selfattn"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_core*.so", "_core*.pyd", "__pycache__"))
    r = subprocess.run([sys.executable, "-c", "import selfattn"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert "source folder without the compiled extension" in r.stderr and "another directory" in r.stderr, r.stderr
    assert "circular import" not in r.stderr.splitlines()[-1], r.stderr


def test_autograd_docstring_examples_run():
    import selfattn.autograd
    result = doctest.testmod(selfattn.autograd, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted >= 4 and result.failed == 0


def test_public_functions_have_returns_and_examples():
    for fn in (selfattn.attend, selfattn.scaled_dot_product_attention, selfattn.config):
        # inspect.cleandoc: Python 3.13 strips the common indentation of docstrings at compile time,
        # older versions keep it; cleaned, both read the same
        doc = inspect.cleandoc(fn.__doc__)
        assert "\nReturns\n-------\n" in doc and "\nExamples\n--------\n" in doc, fn.__name__
