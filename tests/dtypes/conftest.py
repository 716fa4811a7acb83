"""Fixtures of the 16-bit tests."""

import numpy as np
import pytest

from sa_testutil import optional_import


@pytest.fixture(scope="module")
def bf16():
    """ml_dtypes' bfloat16 (the tests that take it skip without ml_dtypes, or fail where CI requires it)"""
    return np.dtype(optional_import("ml_dtypes").bfloat16)
