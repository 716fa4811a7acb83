"""Type-checked (mypy --strict) against the installed selfattn in CI: the annotations and py.typed
reach a user's type checker, and the overloads give the right return types."""

from typing import Tuple

import numpy as np
from numpy.typing import NDArray

import selfattn

x = np.ones((4, 3))
q = np.ones((2, 4, 8, 16), dtype=np.float32)
out: NDArray[np.float32] = selfattn.scaled_dot_product_attention(q, q, q, is_causal=True)
pair: Tuple[NDArray[np.float64], NDArray[np.float64]] = selfattn.scaled_dot_product_attention(
    q, q, q, return_lse=True)
y = selfattn.attend(x, np.eye(3), np.eye(3), np.eye(3), num_heads=1)
shape: Tuple[int, ...] = y.shape
isas: list[str] = selfattn.available_isas()
prev: str = selfattn.set_isa(isas[-1])
with selfattn.use_isa(prev):
    pass
threads: int = selfattn.config()["default_threads"]
selfattn.show_config()
cache = selfattn.PagedKVCache(8, 4, 1, 16)
sid: int = cache.add_sequence()
cache.append([sid], q[:1, :1], q[:1, :1])
paged_out = cache.attend(q[:1, :, :1], [sid])
table: Tuple[NDArray[np.int32], NDArray[np.int64]] = cache.block_table([sid])
free_blocks: int = cache.num_free_blocks
