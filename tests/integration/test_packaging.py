"""The installed distribution: metadata, license, extras, console script, and no build inputs."""

import importlib.metadata as md
from pathlib import Path

import pytest

import selfattn

try:
    DIST = md.distribution("selfattn")
except md.PackageNotFoundError:   # an in-place build, imported without installing
    DIST = None

pytestmark = pytest.mark.skipif(DIST is None, reason="selfattn is not installed as a distribution")


def test_metadata():
    meta = DIST.metadata
    assert meta["Version"] == selfattn.__version__
    assert meta["License-Expression"] == "MIT"
    assert not [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert {"Source", "Documentation", "Issues"} <= set(urls)
    assert {"test", "bench", "plot", "dask", "all"} <= set(meta.get_all("Provides-Extra") or [])
    bench_reqs = [r for r in DIST.requires or [] if 'extra == "bench"' in r]
    assert any(r.startswith("torch") for r in bench_reqs) and any(r.startswith("threadpoolctl") for r in bench_reqs)


def test_dask_extra_keeps_dask_and_distributed_together():
    """The dask extra is dask's own [distributed] extra (which pins distributed to dask's version),
    with a floor: two separate requirements let pip pair a new dask with a 2021 distributed."""
    reqs = [r.split(";")[0].replace(" ", "") for r in DIST.requires or [] if 'extra == "dask"' in r]
    assert reqs, DIST.requires
    assert not [r for r in reqs if r.startswith("distributed")], reqs
    dask_req = [r for r in reqs if r.startswith("dask[")]
    assert len(dask_req) == 1 and "distributed" in dask_req[0].split("]")[0] and ">=" in dask_req[0], reqs


def test_license_file_installed():
    files = [str(f) for f in DIST.files or []]
    assert any(f.endswith("LICENSE") for f in files), files
    lic = next(f for f in DIST.files if str(f).endswith("LICENSE"))
    assert "MIT License" in Path(DIST.locate_file(lic)).read_text()


def test_installed_files_are_the_package_only():
    names = [str(f) for f in DIST.files or []]
    pkg = [n for n in names if n.startswith("selfattn/")]
    assert "selfattn/py.typed" in pkg
    assert not [n for n in pkg if n.endswith((".c", ".pyx", ".pxd", ".h"))], pkg


def test_console_script_entry_point():
    eps = [ep for ep in DIST.entry_points if ep.group == "console_scripts"]
    assert [(ep.name, ep.value) for ep in eps] == [("selfattn", "selfattn.__main__:main")]


def test_one_version_source():
    """The version is written once, in selfattn/__init__.py; pyproject.toml reads it (dynamic) and the
    CHANGELOG names it."""
    from sa_testutil import REPO_ROOT
    pyproject = REPO_ROOT / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("pyproject.toml not found (tests run without the repository)")
    text = pyproject.read_text()
    assert 'dynamic = ["version"]' in text and 'version = { attr = "selfattn.__version__" }' in text
    assert "\nversion = " not in text.split("[project]")[1].split("\n[")[0]
    assert f"## {selfattn.__version__} " in (REPO_ROOT / "CHANGELOG.md").read_text()
