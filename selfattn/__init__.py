"""selfattn: fused self-attention for NumPy on the CPU.

    out = softmax(Q K^T * scale + mask) V

Architecture at a glance
------------------------

    selfattn.attend / scaled_dot_product_attention      _api.py     (Python: docs, attend's projections,
             / varlen_attention / KVCache / dask                     biases, GQA heads, RoPE)
        |
        v
    _core.describe / describe_varlen -> Problem          _core.pyx   (Cython: the one problem builder.
        .run / .backward / .schedule                                  Validates once, before any work (the
        |                                                             option checks in _spec.py, shared with
        |                                                             reference and inspection; an ArraySpec
        |                                                             stands in for data not there yet);
        |                                                             units (batch x head [x sequence]) with
        |                                                             element offsets, per-unit lengths,
        |                                                             positions, slopes; sa_attn_args filled
        |                                                             in one place; GIL released, status
        |                                                             codes -> exceptions, Ctrl-C)
        v
    sa_attn_fwd_* / sa_attn_bwd_* (f32, f64)             src_c/dispatch.c   (the one function table
        |                                                                   [ISA][dtype] -> forward, decode,
        |                                                                   backward; schedule, workspace
        |                                                                   layouts; OpenMP tasks)
        v
    attn_<fwd|decode|bwd>_<f32|f64>_<isa>                src_c/attn_<isa>.c compiles attn_kernels.h once per
                                                         dtype: the shared pieces (attn_pack.h packing,
                                                         attn_micro.h micro-kernels, attn_rows.h softcap,
                                                         ALiBi, attn_mask, online softmax; lse_merge.h),
                                                         then the bodies: attn_fwd_body.h (schedules
                                                         shared, fused, banded), attn_decode_body.h
                                                         (few rows per K/V: split-KV, merged by lse;
                                                         K/V beyond L2 prefetched a key block ahead),
                                                         attn_bwd_body.h (FlashAttention-2: P recomputed
                                                         from lse; dQ partials summed in a fixed order:
                                                         thread-count invariant). attn_mask.h: causal,
                                                         window, alignment / q_pos, query and key
                                                         lengths as one key interval per row (and
                                                         num_sink_tokens a second one, [0, shi]); tiles
                                                         outside both skipped; a block mask (flex) the
                                                         third piece: tiles meeting only its empty
                                                         blocks skipped, partial blocks' bits per row. Sinks (sa_attn_args.sink)
                                                         join each row's denominator where it is
                                                         normalised (forward step 3, decode merge);
                                                         lse includes them, so the backward reads them
                                                         from lse (dsinks: autograd). bfloat16 / float16 inputs
                                                         (sa_attn_args.storage) run the f32 kernels:
                                                         widened where loaded or packed (decode: in
                                                         registers), out rounded where written
                                                         (attn_pack.h; the conversions in simd_<isa>.h,
                                                         half.h); the avx512bf16 and neonbf16 paths'
                                                         bfloat16 forward multiplies bfloat16 pairs
                                                         (vdpbf16ps / BFDOT: attn_bf16dot.h on the
                                                         vbh_* primitives of simd_<target>bf16.h;
                                                         avx512bf16 the default on AMD, neonbf16 where
                                                         the CPU has BF16; avx512amx, the default where
                                                         the CPU has AMX-BF16 and the OS grants it, on
                                                         AMX tiles: attn_amx.h, 16 rows x 16 keys or
                                                         columns a tile), and so does their backward
                                                         (pairs along E, query rows or keys, BF16_DOT
                                                         in attn_bwd_body.h, AMX tiles on avx512amx),
                                                         and avx512bf16's decode (q.k and P.V);
                                                         elsewhere the 16-bit backward runs on float32
                                                         copies (Problem.backward). Attention dropout
                                                         (sa_attn_args.dropout_p): dropout.h's
                                                         Philox mask on (seed, unit, row, key),
                                                         applied after the row sums (forward) and
                                                         to dP and P (backward). score_mod
                                                         (sa_attn_args.score_mod): score_mod.h's
                                                         interpreter runs the traced program on a
                                                         tile row at a time (mask_row), its
                                                         derivative in the backward's dS

Beside the kernel, one module per concern:
    selfattn.autograd     scaled_dot_product_attention_vjp, varlen_attention_vjp: (out, vjp), the
                          fused backward through _core.sdpa_bwd / varlen_bwd (training in NumPy);
                          attend_vjp, the whole layer (its projections shared with attend: _api)
    selfattn.positional   sinusoidal_encoding, rope (NumPy)
    selfattn.inspection   attention_weights (materialised on purpose), plot_attention (matplotlib)
    selfattn.merge        merge_attention: (out, lse) over disjoint key sets -> attention over their union
                          (validation here, the arithmetic in src_c/merge.c via _core.merge)
    selfattn.kvcache      KVCache: preallocated K/V appended in place, attended in place (decoding);
                          ragged counts are one kernel call (the engine's query_lengths); kv_dtype (int8,
                          float8 e4m3fn / e5m2, bfloat16, float16) keeps them narrower than the float32
                          queries (selfattn.quant), converted on append
    selfattn.paged        paged_attention, PagedKVCache: K/V in a pool of fixed-size blocks with a block table
                          per sequence (vLLM / FlashAttention layout), one kernel call for a ragged batch:
                          the decode schedule reads the rows where the table says (sa_attn_args.block_table,
                          sa_kv_rows), the same bits as a dense cache; fork shares a prefix's blocks
    selfattn.flex         create_block_mask, BlockMask, flex_attention (FlexAttention's API): mask_mod evaluated
                          once in NumPy into empty / full / partial blocks and the partial ones' bits; the
                          kernels read it as one more mask kind (sa_attn_args SA_MASK_BLOCKS, attn_mask.h:
                          tiles meeting only empty blocks skipped); flex_attention_vjp in selfattn.autograd.
                          selfattn._scoremod traces a score_mod into an expression program (its derivative
                          from the same program; NumPy evaluation for the reference) and lowers it to the
                          kernels' typed nodes (sa_score_mod; T5-style bias reads strided along a row);
                          gradients of captured arrays (bias tables) computed blockwise in NumPy
    selfattn.quant        quantize_kv / dequantize_kv: int8 K/V (a float32 scale per key), float8 (one per
                          head); the caches' conversions. The kernels read K/V as stored under float32
                          queries (sa_attn_args.kv_quant, mapped once by attn_internal.h's sa_kv_read: the
                          decode widens in registers, float8 through float16's bits)
    selfattn.dask         scaled_dot_product_attention over Dask arrays: blocks along batch/heads/L/S,
                          key chunks merged by merge_attention (sequence parallelism); each block one
                          kernel call at its rows' positions (the engine's query_offsets). Not imported
                          by `import selfattn`: `import selfattn.dask` (needs selfattn[dask])
    selfattn.reference    the same math in plain float64 NumPy, every option: the tests' oracle.
    selfattn._spec        the options and per-batch arrays (window_size, alignment, softcap, scale, threads,
                          key_lengths, alibi_slopes, sinks, cu_seqlens) checked once, pure Python, for the
                          engine, the reference and inspection alike; ArraySpec (shape + dtype)
    selfattn.torch        scaled_dot_product_attention as a torch.autograd.Function (CPU tensors). Not
                          imported by `import selfattn`: `import selfattn.torch` (needs torch)
    selfattn.transformers register(): attn_implementation="selfattn" for Hugging Face transformers'
                          models, every layer through selfattn.torch (needs transformers >= 4.57)
    selfattn.llama        a Llama decoder in NumPy (GGUF weights read with gguf; RMSNorm, rope, SwiGLU
                          in NumPy; attention and the decode cache from KVCache) and its BPE tokenizer:
                          SmolLM2-135M-Instruct for `selfattn generate`. Not imported by `import selfattn`
SELFATTN_ISA=<avx2|generic|neon|...> (at import) and set_isa choose the path of the process; use_isa forces one for
a block in the calling thread or task only (a ContextVar); selfattn.show_config() prints what runs.

Documentation: help(selfattn.attend), help(selfattn.scaled_dot_product_attention), or the API
reference built from these docstrings (docs/, Sphinx). Command line: selfattn --help
(python -m selfattn --help) for the demo.
"""

__version__ = "0.1.0"

import os as _os

# libgomp's idle worker threads spin for GOMP_SPINCOUNT iterations (default 300000: milliseconds)
# after each parallel region, taking the cores from whatever runs next -- in a training step, NumPy's
# BLAS: x @ W right after an attention call ran up to 1.5x slower (2-core Zen 4). 30000 keeps
# back-to-back calls (a decode loop) on awake threads and lets them sleep soon after. libgomp reads it
# once, when it loads (with _core, below): the variable is set for that moment only and removed
# again, so subprocesses and OpenMP runtimes loaded later (torch's) see the user's environment as it
# was. A value the user set wins (and stays). If libgomp was loaded before selfattn, it keeps its own.
_SPINCOUNT_SET = "GOMP_SPINCOUNT" not in _os.environ
if _SPINCOUNT_SET:
    _os.environ["GOMP_SPINCOUNT"] = "30000"


def _import_core():
    """The compiled engine. Imported from a source checkout that was never built in place (python
    run in the repository root puts its uncompiled selfattn/ folder first on sys.path), it is
    missing: say so and what to do, instead of a circular-import message."""
    try:
        from . import _core
    except ImportError as exc:
        import glob
        here = _os.path.dirname(_os.path.abspath(__file__))
        if glob.glob(_os.path.join(here, "_core*.so")) or glob.glob(_os.path.join(here, "_core*.pyd")):
            raise      # the extension is there but does not load: its own message says why
        raise ImportError(
            f"selfattn was imported from {here}, a source folder without the compiled extension "
            f"(_core). Python looks in the current directory first: run from another directory to use "
            f"the installed selfattn (pip install . installs it), or build in place with "
            f"`python setup.py build_ext --inplace`.") from exc
    return _core


try:
    _import_core()
finally:
    if _SPINCOUNT_SET:
        _os.environ.pop("GOMP_SPINCOUNT", None)

from . import autograd, flex, inspection, paged, positional, quant, reference
from ._api import (attend, available_isas, config, scaled_dot_product_attention, set_isa, show_config,
                   use_isa, varlen_attention)
from .autograd import attend_vjp, flex_attention_vjp, scaled_dot_product_attention_vjp, varlen_attention_vjp
from ._scoremod import ScoreModTraceError
from .flex import BlockMask, and_masks, create_block_mask, flex_attention, noop_mask, or_masks
from .inspection import attention_weights, plot_attention
from .kvcache import KVCache
from .paged import CacheFullError, PagedKVCache, paged_attention
from .merge import merge_attention
from .positional import rope, sinusoidal_encoding
from .quant import dequantize_kv, quantize_kv

__all__ = ["attend", "scaled_dot_product_attention", "varlen_attention", "merge_attention", "KVCache",
           "scaled_dot_product_attention_vjp", "varlen_attention_vjp", "attend_vjp", "autograd",
           "attention_weights", "plot_attention", "rope", "sinusoidal_encoding", "inspection", "positional",
           "reference", "config", "show_config", "use_isa", "set_isa", "available_isas", "quantize_kv",
           "dequantize_kv", "quant", "paged", "paged_attention", "PagedKVCache", "CacheFullError", "flex",
           "flex_attention", "flex_attention_vjp", "create_block_mask", "BlockMask", "noop_mask", "and_masks",
           "or_masks", "ScoreModTraceError", "__version__"]
