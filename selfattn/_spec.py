"""The structured options' values, validated in one place (pure Python, no NumPy arrays).

One exception type per mistake, the same wherever the option is taken: a value of the wrong kind
is a TypeError, a value of the right kind out of range a ValueError. The compiled engine
(``_core.pyx``: ``_check_window``, ``_check_alignment``, ``_check_softcap``) raises the same types
with the same words; :mod:`selfattn.reference` and :mod:`selfattn.inspection` call these functions,
and ``tests/robustness/test_robust_misuse.py`` holds all three to it.
"""

import math
import numbers
from typing import List, Optional, Tuple

import numpy as np

ALIGNMENTS = ("top_left", "bottom_right")


def is_int(x: object) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, (bool, np.bool_))


def window_sides(window_size: object) -> Tuple[Optional[int], Optional[int]]:
    """None | w | (left, right) -> (left, right), each None (unbounded on that side) or an int >= 0."""
    if window_size is None:
        return None, None
    sides = (window_size, window_size) if is_int(window_size) else window_size
    if not isinstance(sides, (tuple, list)) or len(sides) != 2:
        raise TypeError(f"window_size must be None, an int or a (left, right) pair of ints or None, "
                        f"got {window_size!r}")
    out: List[Optional[int]] = []
    for side, name in zip(sides, ("left", "right")):
        if side is None:
            out.append(None)
        elif not is_int(side):
            raise TypeError(f"window_size {name} side must be an int or None, got {type(side).__name__} "
                            f"({window_size!r})")
        elif side < 0:
            raise ValueError(f"window_size must be >= 0 on each side (None = unbounded), got {window_size!r}")
        else:
            out.append(int(side))
    return out[0], out[1]


def check_alignment(alignment: object) -> str:
    """'top_left' or 'bottom_right' (anything else, of any type, is a ValueError: a wrong choice)."""
    if not isinstance(alignment, str) or alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be 'top_left' or 'bottom_right', got {alignment!r}")
    return alignment


def check_softcap(softcap: object) -> Optional[float]:
    """None, or a finite float > 0."""
    if softcap is None:
        return None
    if isinstance(softcap, (str, bytes, bool, np.bool_)):
        raise TypeError(f"softcap must be a real number > 0 or None, got {type(softcap).__name__}")
    try:
        c = float(softcap)      # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"softcap must be a real number > 0 or None, got {softcap!r}") from None
    if not (c > 0 and math.isfinite(c)):       # also False for NaN
        raise ValueError(f"softcap must be finite and > 0, got {softcap!r}")
    return c
