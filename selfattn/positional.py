"""Positional encodings: the absolute sinusoidal table and rotary embeddings (RoPE).

Attention itself is blind to order (permuting the keys permutes nothing in the output), so
positions are put into the vectors:

* ``sinusoidal_encoding(length, dim)`` ("Attention Is All You Need") is a table added to the
  token embeddings: row p, column c holds sin(p * w_i) for even c and cos(p * w_i) for odd c,
  with i = c // 2 and w_i = base^(-2i/dim).

* ``rope(x)`` (RoFormer) rotates each pair of coordinates of a query or key at position p by
  the angle p * theta_i, theta_i = base^(-2i/E). A rotation keeps norms, and the dot product of
  a query rotated at m with a key rotated at n depends only on m - n: attention logits become
  relative. Two pairings are in use: rotate-half (x_i, x_{i+E/2}), the default, as Llama and
  GPT-NeoX checkpoints expect; and interleaved (x_{2i}, x_{2i+1}), as GPT-J and RoFormer.

Angles are computed in float64 (so large positions keep their precision), the rotation in the
input's dtype.
"""

import math
import numbers

import numpy as np

__all__ = ["sinusoidal_encoding", "rope"]


def _check_base(base):
    if isinstance(base, (bool, np.bool_)) or not isinstance(base, (numbers.Real, np.integer, np.floating)):
        raise TypeError(f"base must be a real number, got {type(base).__name__}")
    b = float(base)
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"base must be finite and > 0, got {base!r}")
    return b


def _check_int(value, name, minimum):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        what = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be {what}, got {value}")
    return int(value)


def sinusoidal_encoding(length, dim, *, base=10000.0, dtype=np.float32):
    """Sinusoidal absolute position table ("Attention Is All You Need").

    Parameters
    ----------
    length : int >= 0
        Number of positions p = 0 .. length-1 (rows).
    dim : int > 0
        Model dimension (columns); odd values are allowed (the last column is then a sin).
    base : float > 0, finite
        Wavelength base, 10000 in the paper.
    dtype : floating dtype
        Of the result (computed in float64, then cast).

    Returns
    -------
    ndarray, (length, dim)
        Column c uses i = c // 2 and the angle p * base^(-2i/dim): sin for even c, cos for odd c.

    Raises
    ------
    TypeError
        length or dim not an int, base not a real number, dtype not floating.
    ValueError
        length < 0, dim < 1, base <= 0 or not finite.

    Examples
    --------
    >>> import numpy as np, selfattn.positional as P
    >>> print(np.round(P.sinusoidal_encoding(3, 4, dtype=np.float64), 3))
    [[ 0.     1.     0.     1.   ]
     [ 0.841  0.54   0.01   1.   ]
     [ 0.909 -0.416  0.02   1.   ]]
    """
    length = _check_int(length, "length", 0)
    dim = _check_int(dim, "dim", 1)
    base = _check_base(base)
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a floating dtype, got {dtype!r}") from None
    if dt.kind != "f":
        raise TypeError(f"dtype must be a floating dtype, got {dt}")
    i = np.arange(dim) // 2
    freq = base ** (-2.0 * i / dim)                          # (dim,)
    angle = np.arange(length, dtype=np.float64)[:, None] * freq   # (length, dim)
    table = np.where(np.arange(dim) % 2 == 0, np.sin(angle), np.cos(angle))
    return table.astype(dt, copy=False)


def rope(x, *, positions=None, base=10000.0, interleaved=False):
    """Rotary position embedding (RoPE) of x.

    Parameters
    ----------
    x : array_like, (..., L, E), E even
        Queries or keys (one head per trailing (L, E) slice). Not modified.
    positions : array_like, optional
        Position of each row, broadcastable to x.shape[:-1] = (..., L); default 0 .. L-1.
        Integers or floats (fractional positions are allowed, e.g. for position interpolation);
        they must be finite.
    base : float > 0, finite
        theta_i = base^(-2i/E), i = 0 .. E/2-1.
    interleaved : bool
        False (default): rotate-half pairs (x_i, x_{i+E/2}) (Llama, GPT-NeoX).
        True: pairs (x_{2i}, x_{2i+1}) (GPT-J, RoFormer).

    Returns
    -------
    ndarray, same shape as x
        Each pair (a, b) becomes (a cos - b sin, b cos + a sin) at the angle p * theta_i.
        float32 and float64 are kept; float16 is computed in and returned as float32; other
        array-likes (lists) become float64.

    Raises
    ------
    TypeError
        x not floating (integers, bool, complex), positions not real numbers, base not a real
        number, interleaved not a bool.
    ValueError
        x with fewer than 2 dims or odd E; positions not broadcastable to (..., L) or not
        finite; base <= 0 or not finite.

    Examples
    --------
    >>> import numpy as np, selfattn.positional as P
    >>> x = np.ones((3, 2))
    >>> print(np.round(P.rope(x), 3))                   # angle p * 1 for p = 0, 1, 2
    [[ 1.     1.   ]
     [-0.301  1.382]
     [-1.325  0.493]]
    >>> print(np.round(P.rope(x, positions=[0, 0, 1]), 3))
    [[ 1.     1.   ]
     [ 1.     1.   ]
     [-0.301  1.382]]
    """
    if isinstance(interleaved, (bool, np.bool_)):
        interleaved = bool(interleaved)
    else:
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    base = _check_base(base)
    xa = np.asarray(x)
    if xa.dtype.kind != "f":
        raise TypeError(f"x must be a floating array (float16/32/64), got dtype {xa.dtype}")
    if xa.ndim < 2:
        raise ValueError(f"x must have at least 2 dims (..., L, E), got shape {xa.shape}")
    L, E = xa.shape[-2], xa.shape[-1]
    if E % 2:
        raise ValueError(f"x must have an even last dim E (coordinates are rotated in pairs), got E={E}")
    ct = {2: np.float32, 4: np.float32, 8: np.float64}.get(xa.dtype.itemsize, np.float64)  # f16 -> f32

    if positions is None:
        pos = np.arange(L, dtype=np.float64)
    else:
        pa = np.asarray(positions)
        if pa.dtype.kind not in "iuf":
            raise TypeError(f"positions must be real numbers (int or float), got dtype {pa.dtype}")
        try:
            ok = np.broadcast_shapes(pa.shape, xa.shape[:-1]) == xa.shape[:-1]
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"positions of shape {pa.shape} does not broadcast to x.shape[:-1] = "
                             f"{xa.shape[:-1]} (..., L)")
        pos = pa.astype(np.float64)
        if not np.all(np.isfinite(pos)):
            raise ValueError("positions must be finite")

    half = E // 2
    theta = base ** (-2.0 * np.arange(half) / E)             # (E/2,)
    angle = pos[..., None] * theta                           # (..., L, E/2), float64
    cos, sin = np.cos(angle).astype(ct), np.sin(angle).astype(ct)
    xc = xa.astype(ct, copy=False)
    if interleaved:
        a, b = xc[..., 0::2], xc[..., 1::2]
    else:
        a, b = xc[..., :half], xc[..., half:]
    ra, rb = a * cos - b * sin, b * cos + a * sin
    out = np.empty(xa.shape, dtype=ct)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., :half], out[..., half:] = ra, rb
    return out
