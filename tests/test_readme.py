"""The README's Python examples run and their assertions hold."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks():
    if not README.is_file():
        return []
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


@pytest.mark.parametrize("code", _python_blocks() or [pytest.param(None, marks=pytest.mark.skip("no README"))])
def test_readme_example_runs(code):
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})


def test_readme_has_examples():
    if not README.is_file():
        pytest.skip("README not found (tests run without the repository)")
    assert len(_python_blocks()) >= 1
