"""selfattn: fused self-attention for NumPy on the CPU.

    out = softmax(Q K^T * scale + mask) V

Architecture at a glance
------------------------

    selfattn.attend / scaled_dot_product_attention      _api.py     (Python: docs, attend's projections)
        |
        v
    selfattn._core.sdpa                                  _core.pyx   (Cython: validate every argument,
        |                                                             convert dtypes, describe the broadcast
        |                                                             problem as units with element offsets,
        |                                                             allocate out + workspace, release the GIL,
        |                                                             status codes -> exceptions, Ctrl-C)
        v
    sa_attn_fwd_f32 / _f64                               src_c/dispatch.c   (pick the kernel: AVX-512,
        |                                                                   AVX2+FMA or portable; size the
        |                                                                   workspace; run tasks on OpenMP
        |                                                                   threads; fork safety)
        v
    attn_fwd_<f32|f64>_<avx512|avx2|generic>             src_c/attn_fwd_body.h, written once and compiled
                                                         per target by attn_<target>.c (online softmax
                                                         over K/V blocks, register-blocked micro-kernels)

selfattn.reference holds the same math in plain float64 NumPy: the tests' oracle.
SELFATTN_ISA=<avx2|generic> forces a lower path; selfattn.show_config() prints what runs.

Documentation: help(selfattn.attend), help(selfattn.scaled_dot_product_attention), or the API
reference built from these docstrings (docs/, Sphinx). Command line: selfattn --help
(python -m selfattn --help) for the demo.
"""

__version__ = "0.1.0"

from . import reference
from ._api import (attend, available_isas, config, scaled_dot_product_attention, set_isa, show_config,
                   use_isa)

__all__ = ["attend", "scaled_dot_product_attention", "reference", "config", "show_config", "use_isa",
           "set_isa", "available_isas", "__version__"]
