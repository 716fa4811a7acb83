"""The README's and the user docs' Python examples run and their assertions hold."""

import re

import pytest
from sa_testutil import REPO_ROOT

README = REPO_ROOT / "README.md"


def _python_blocks():
    if not README.is_file():
        return []
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


@pytest.mark.parametrize("code", _python_blocks() or [pytest.param(None, marks=pytest.mark.skip("no README"))])
def test_readme_example_runs(code):
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})


DOCS = sorted((REPO_ROOT / "docs").glob("*.rst")) if (REPO_ROOT / "docs").is_dir() else []


def _docs_blocks():
    """The `.. code-block:: python` blocks of docs/*.rst (the guide's examples), dedented."""
    out = []
    for path in DOCS:
        for m in re.finditer(r"^\.\. code-block:: python\n\n((?:   .*\n|\n)+)", path.read_text(encoding="utf-8"), re.M):
            code = "\n".join(line[3:] for line in m.group(1).splitlines())
            out.append(pytest.param(code, id=f"{path.stem}-{len(out)}"))
    return out


@pytest.mark.parametrize("code", _docs_blocks() or [pytest.param(None, marks=pytest.mark.skip("no docs"))])
def test_docs_example_runs(code):
    exec(compile(code, "docs", "exec"), {"__name__": "docs_example"})


def test_docs_have_the_guide_examples():
    if not DOCS:
        pytest.skip("docs not found (tests run without the repository)")
    assert len(_docs_blocks()) >= 10


def test_readme_has_examples():
    if not README.is_file():
        pytest.skip("README not found (tests run without the repository)")
    assert len(_python_blocks()) >= 1


def _readme_text():
    if not README.is_file():
        pytest.skip("README not found (tests run without the repository)")
    return README.read_text(encoding="utf-8")


def test_readme_opens_with_the_two_commands():
    block = re.search(r"^```bash\n(.*?)^```", _readme_text(), re.S | re.M).group(1).splitlines()
    assert len(block) == 2
    install_and_demo, tests = block
    # a regular install: an editable one leaves a compiled module in the source tree
    assert "pip install" in install_and_demo and " -e " not in install_and_demo
    assert tests.startswith("pytest") and "pip install" not in tests   # no second build


def test_readme_has_no_internal_vocabulary():
    assert not re.search(r"issue[- #]?\d", _readme_text(), re.I)


def test_readme_documents_every_extra():
    pyproject = README.parent / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("pyproject.toml not found")
    section = re.search(r"^\[project\.optional-dependencies\]\n(.*?)^\[", pyproject.read_text(), re.S | re.M)
    extras = re.findall(r"^(\w+) = ", section.group(1), re.M)
    assert {"test", "bench", "plot", "dask", "all"} <= set(extras)
    for extra in extras:
        assert f"| `{extra}` |" in _readme_text(), extra
