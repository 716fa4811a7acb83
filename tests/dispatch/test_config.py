"""config(), show_config(), use_isa/set_isa and the SELFATTN_ISA environment variable."""

import os
import subprocess
import sys

import numpy as np
import pytest

import selfattn
from sa_testutil import ALL_KNOWN_ISAS, AVAILABLE_ISAS, BF16_DOT_BASE, BF16_FWD_ISAS, ISAS, KNOWN_ISAS


def test_config_keys_and_types():
    cfg = selfattn.config()
    assert isinstance(cfg, dict)
    for key in ("version", "isa", "isas_available", "openmp", "default_threads"):
        assert key in cfg, f"config() lacks {key!r}: {cfg}"
    assert isinstance(cfg["version"], str) and cfg["version"]
    if hasattr(selfattn, "__version__"):
        assert cfg["version"] == selfattn.__version__
    assert isinstance(cfg["openmp"], bool)
    assert isinstance(cfg["default_threads"], int) and not isinstance(cfg["default_threads"], bool)
    assert cfg["default_threads"] >= 1
    if not cfg["openmp"]:
        assert cfg["default_threads"] == 1
    avail = cfg["isas_available"]
    assert isinstance(avail, list) and all(isinstance(n, str) for n in avail)
    assert avail and avail[-1] == "generic"
    assert len(set(avail)) == len(avail)
    assert set(avail) <= set(ALL_KNOWN_ISAS), avail
    # the best first (the default: test_default_isa_is_best_unless_forced), then the most capable
    # down (avx512bf16 where it is not the best: Intel's, where avx512amx or avx512 is); avx512amx,
    # where the CPU and the OS allow it, is always the best
    assert avail[1:] == [n for n in ALL_KNOWN_ISAS if n in avail[1:]]
    assert avail[0] in ("avx512bf16", "avx512", "avx512amx") or "avx512bf16" not in avail[1:]
    assert avail[0] == "avx512amx" or "avx512amx" not in avail
    assert cfg["isa"] in avail


def test_default_isa_is_best_unless_forced():
    forced = os.environ.get("SELFATTN_ISA")
    cfg = selfattn.config()
    if forced:
        assert cfg["isa"] == forced
    else:
        assert cfg["isa"] == cfg["isas_available"][0]


def test_config_returns_a_copy():
    cfg = selfattn.config()
    cfg["isas_available"].append("bogus")
    cfg["isa"] = "bogus"
    assert "bogus" not in selfattn.config()["isas_available"]
    assert selfattn.config()["isa"] != "bogus"


def test_show_config_prints(capsys):
    ret = selfattn.show_config()
    assert ret is None
    text = capsys.readouterr().out
    cfg = selfattn.config()
    assert cfg["version"] in text and cfg["isa"] in text
    for name in cfg["isas_available"]:
        assert name in text


@pytest.mark.parametrize("name", ISAS)
def test_use_isa_sets_and_restores(name):
    before = selfattn.config()["isa"]
    with selfattn.use_isa(name):
        assert selfattn.config()["isa"] == name
        # nested
        with selfattn.use_isa("generic"):
            assert selfattn.config()["isa"] == "generic"
        assert selfattn.config()["isa"] == name
    assert selfattn.config()["isa"] == before


def test_use_isa_restores_after_exception():
    before = selfattn.config()["isa"]
    with pytest.raises(RuntimeError):
        with selfattn.use_isa("generic"):
            raise RuntimeError("boom")
    assert selfattn.config()["isa"] == before


def test_use_isa_restores_after_failing_call():
    before = selfattn.config()["isa"]
    with pytest.raises(ValueError):
        with selfattn.use_isa("generic"):
            selfattn.scaled_dot_product_attention(np.ones((2, 3)), np.ones((2, 4)), np.ones((2, 4)))
    assert selfattn.config()["isa"] == before


@pytest.mark.parametrize("name", ISAS)
def test_set_isa_returns_previous(name):
    before = selfattn.config()["isa"]
    try:
        prev = selfattn.set_isa(name)
        assert prev == before
        assert selfattn.config()["isa"] == name
        prev2 = selfattn.set_isa("generic")
        assert prev2 == name
    finally:
        selfattn.set_isa(before)
    assert selfattn.config()["isa"] == before


@pytest.mark.parametrize("bad", ["sse2", "AVX3", "", "sve", "avx512x"])
def test_unknown_isa_raises(bad):
    before = selfattn.config()["isa"]
    with pytest.raises(ValueError):
        with selfattn.use_isa(bad):
            pass
    with pytest.raises(ValueError):
        selfattn.set_isa(bad)
    assert selfattn.config()["isa"] == before


def test_unsupported_isa_raises():
    missing = [n for n in KNOWN_ISAS if n not in ISAS]
    if not missing:
        pytest.skip("every known ISA runs on this CPU")
    before = selfattn.config()["isa"]
    for name in missing:
        with pytest.raises(ValueError):
            selfattn.set_isa(name)
        with pytest.raises(ValueError):
            with selfattn.use_isa(name):
                pass
    assert selfattn.config()["isa"] == before


def test_isa_choice_changes_nothing_visible_but_works():
    # every ISA gives an answer close to the others for the same input
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 70, 20)).astype(np.float32)
    k = rng.standard_normal((2, 140, 20)).astype(np.float32)
    v = rng.standard_normal((2, 140, 20)).astype(np.float32)
    outs = []
    for name in ISAS:
        with selfattn.use_isa(name):
            outs.append(selfattn.scaled_dot_product_attention(q, k, v))
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=0, atol=1e-4)


def _child_env(**extra):
    """The environment of a child interpreter that imports the same selfattn as this process."""
    env = dict(os.environ, **extra)
    env.pop("PYTHONSAFEPATH", None)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(selfattn.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    return env


_CHILD = r"""
import sys, numpy as np, selfattn
print(selfattn.config()["isa"])
print(selfattn.__file__)
rng = np.random.default_rng(0)
q = rng.standard_normal((2, 70, 20)).astype(np.float32)
k = rng.standard_normal((2, 140, 20)).astype(np.float32)
v = rng.standard_normal((2, 140, 20)).astype(np.float32)
np.save(sys.argv[1], selfattn.scaled_dot_product_attention(q, k, v, num_threads=1))
"""


@pytest.mark.parametrize("name", ISAS)
def test_env_var_forces_isa(tmp_path, name):
    env = _child_env(SELFATTN_ISA=name)
    out_file = tmp_path / "out.npy"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(out_file)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == name, proc.stdout + proc.stderr
    assert os.path.samefile(lines[1], selfattn.__file__), "the child imported another selfattn"
    # the forced path computes exactly what use_isa(name) computes in this process
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 70, 20)).astype(np.float32)
    k = rng.standard_normal((2, 140, 20)).astype(np.float32)
    v = rng.standard_normal((2, 140, 20)).astype(np.float32)
    with selfattn.use_isa(name):
        here = selfattn.scaled_dot_product_attention(q, k, v, num_threads=1)
    assert np.array_equal(np.load(out_file), here)


def test_env_var_unset_gives_best(tmp_path):
    env = _child_env()
    env.pop("SELFATTN_ISA", None)
    proc = subprocess.run([sys.executable, "-c", "import selfattn; print(selfattn.config()['isa'])"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == AVAILABLE_ISAS[0]      # the best (avx512bf16 on AMD's Zen 4 / 5,
    # avx512amx on Intel's with AMX)


def test_omp_num_threads_sets_default(tmp_path):
    if not selfattn.config()["openmp"]:
        pytest.skip("built without OpenMP")
    env = _child_env(OMP_NUM_THREADS="3")
    proc = subprocess.run([sys.executable, "-c", "import selfattn; print(selfattn.config()['default_threads'])"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3"


@pytest.mark.parametrize("isa", BF16_FWD_ISAS or [None])
def test_bf16_dot_paths_have_their_base_paths_tiles(isa):
    """A bfloat16-dot path hands every other storage (and avx512amx its decode) to its
    base path's functions on the layout computed from its own tile sizes (dispatch.c's table): the
    two must be the same sizes, float32 and float64."""
    if isa is None:
        pytest.skip("no bfloat16-dot path on this CPU/build")
    for dt in (np.float32, np.float64):
        assert selfattn._core.tile_params(isa, dt) == selfattn._core.tile_params(BF16_DOT_BASE[isa], dt), (isa, dt)
