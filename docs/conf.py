"""Sphinx configuration: the API reference is generated from the installed selfattn's docstrings.

Build (CI does this with warnings as errors), from outside the source tree's import path:
    pip install ".[docs]" && sphinx-build -W -b html docs build/docs
"""

import selfattn

project = "selfattn"
author = "the selfattn maintainers"
copyright = "2026, the selfattn maintainers"
release = version = selfattn.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.doctest", "numpydoc"]
# signatures show the type annotations; the numpydoc sections describe shapes and dtypes
autodoc_typehints = "signature"
numpydoc_show_class_members = False
numpydoc_xref_param_type = False
nitpicky = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
