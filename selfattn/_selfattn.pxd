# Mirror of src_c/selfattn.h: the C entry points the Cython layer calls.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.stddef cimport size_t

cdef extern from "selfattn.h" nogil:
    enum:
        SA_OK
        SA_ERR_ARG
        SA_ERR_WORKSPACE
        SA_ERR_INTERRUPTED
        SA_ERR_ISA

    ctypedef enum sa_isa:
        SA_ISA_GENERIC
        SA_ISA_AVX2
        SA_ISA_AVX512
        SA_ISA_NEON
        SA_ISA_AVX512BF16
        SA_ISA_NEONBF16
        SA_ISA_AVX512AMX
        SA_ISA_COUNT

    ctypedef enum sa_storage:
        SA_STORE_NATIVE
        SA_STORE_BF16
        SA_STORE_F16

    ctypedef enum sa_kv_quant:
        SA_KV_PLAIN
        SA_KV_INT8
        SA_KV_FP8_E4M3
        SA_KV_FP8_E5M2
        SA_KV_BF16
        SA_KV_F16

    ctypedef enum sa_mask_kind:
        SA_MASK_NONE
        SA_MASK_BOOL
        SA_MASK_F32
        SA_MASK_F64
        SA_MASK_BLOCKS

    enum:
        SA_BLOCK_EMPTY
        SA_BLOCK_FULL

    ctypedef enum sa_alignment:
        SA_ALIGN_TOP_LEFT
        SA_ALIGN_BOTTOM_RIGHT

    ctypedef enum sa_schedule_kind:
        SA_SCHEDULE_AUTO
        SA_SCHEDULE_SHARED
        SA_SCHEDULE_FUSED
        SA_SCHEDULE_BANDED
        SA_SCHEDULE_DECODE

    ctypedef struct sa_tile_params:
        int vw, mr, nr, nv, bq, bk

    ctypedef struct sa_schedule:
        int threads
        int fused
        int banded
        int decode
        int64_t compute_tasks
        int64_t packed_kv
        int64_t key_chunks
        int64_t ring_blocks
        int prefetch

    ctypedef int (*sa_interrupt_fn)(void *ctx) noexcept

    # score_mod programs (selfattn/_scoremod.py lowers them; score_mod.h runs them)
    ctypedef enum sa_sm_op:
        SA_SM_SCORE, SA_SM_FCONST, SA_SM_FADD, SA_SM_FSUB, SA_SM_FMUL, SA_SM_FDIV, SA_SM_FPOW
        SA_SM_FMIN, SA_SM_FMAX, SA_SM_FNEG, SA_SM_FABS, SA_SM_FEXP, SA_SM_FLOG, SA_SM_FTANH
        SA_SM_FSQRT, SA_SM_FFLOOR, SA_SM_FFLOORDIV, SA_SM_FMOD, SA_SM_FWHERE, SA_SM_FCAST, SA_SM_FLOAD
        SA_SM_B, SA_SM_H, SA_SM_Q, SA_SM_KV, SA_SM_ICONST, SA_SM_IADD, SA_SM_ISUB
        SA_SM_IMUL, SA_SM_IFLOORDIV, SA_SM_IMOD, SA_SM_IPOW, SA_SM_IMIN, SA_SM_IMAX, SA_SM_INEG
        SA_SM_IABS, SA_SM_IWHERE, SA_SM_ITRUNC, SA_SM_ILOAD, SA_SM_FLT, SA_SM_FLE, SA_SM_FGT
        SA_SM_FGE, SA_SM_FEQ, SA_SM_FNE, SA_SM_ILT, SA_SM_ILE, SA_SM_IGT, SA_SM_IGE
        SA_SM_IEQ, SA_SM_INE, SA_SM_AND, SA_SM_OR, SA_SM_XOR, SA_SM_NOT, SA_SM_OP_COUNT
    enum: SA_SM_MAX_NODES
    enum: SA_SM_MAX_DIMS
    ctypedef struct sa_sm_node:
        int32_t op
        int32_t arg[4]
        int32_t arr
        int32_t kv_axis
        double f
        int64_t i
    ctypedef struct sa_score_mod:
        const sa_sm_node *nodes
        int32_t n_nodes, n_fwd, out, dout
        int64_t n_heads
        int32_t n_arrays
        const void *const *arrays
        const int32_t *ndim
        const int32_t *is_int
        const int64_t *dims
        int32_t *oob

    ctypedef struct sa_attn_args:
        int64_t n_units, n_kv
        int64_t L, S, E, Ev
        const void *q
        const int64_t *q_off
        int64_t q_sl, q_se
        const void *k
        const int64_t *kv_k_off
        int64_t k_ss, k_se
        const void *v
        const int64_t *kv_v_off
        int64_t v_ss, v_se
        const int64_t *kv_start
        const int64_t *kv_units
        int storage
        int mask_kind
        const void *mask
        const int64_t *mask_off
        int64_t mask_sl, mask_ss
        const uint8_t *bm_bits
        int64_t bm_rows, bm_keys
        void *out
        const int64_t *out_off
        int64_t out_sl, out_se
        void *lse
        const int64_t *lse_off
        int64_t lse_sl
        double scale
        int causal
        int alignment
        int window
        int64_t window_left, window_right
        const int64_t *q_len
        const int64_t *k_len
        const int64_t *q_pos
        const double *alibi_slope
        double softcap
        const double *sink
        int64_t sink_tokens
        int kv_quant
        const float *k_scale
        const int64_t *kv_ks_off
        int64_t ks_s
        const float *v_scale
        const int64_t *kv_vs_off
        int64_t vs_s
        const int32_t *block_table
        const int64_t *kv_bt_off
        int64_t page_size, k_page_s, v_page_s, ks_page_s, vs_page_s
        double dropout_p
        uint64_t dropout_seed
        const sa_score_mod *score_mod
        int num_threads
        int schedule
        sa_interrupt_fn interrupt
        void *interrupt_ctx
        const void *dout
        int64_t dout_sl, dout_se
        void *dq
        const int64_t *dq_off
        int64_t dq_sl, dq_se
        void *dk
        const int64_t *dk_off
        int64_t dk_ss, dk_se
        void *dv
        const int64_t *dv_off
        int64_t dv_ss, dv_se

    int sa_isa_supported(int isa)
    int sa_isa_best()
    const char *sa_isa_name(int isa)
    const char *sa_storage_path(int isa, int storage)
    int sa_openmp_enabled()
    int sa_default_threads()
    int sa_in_forked_child()
    int sa_tile_params_get(int isa, int dtype_size, sa_tile_params *params)
    int sa_attn_schedule(const sa_attn_args *a, int isa, int dtype_size, sa_schedule *schedule)
    int sa_attn_workspace_size(const sa_attn_args *a, int isa, int dtype_size, size_t *bytes)
    size_t sa_merge_workspace_size(int64_t n, int64_t Ev, int num_threads)
    int sa_merge_f32(int64_t n, int64_t rows, int64_t Ev, const float *const *outs, const float *const *lses,
                     float *out, float *lse, void *ws, size_t ws_bytes, int num_threads) nogil
    int sa_merge_f64(int64_t n, int64_t rows, int64_t Ev, const double *const *outs, const double *const *lses,
                     double *out, double *lse, void *ws, size_t ws_bytes, int num_threads) nogil
    int sa_attn_fwd_f32(const sa_attn_args *a, int isa, void *workspace, size_t workspace_bytes)
    int sa_attn_fwd_f64(const sa_attn_args *a, int isa, void *workspace, size_t workspace_bytes)
    int sa_attn_bwd_workspace_size(const sa_attn_args *a, int isa, int dtype_size, size_t *bytes)
    int sa_attn_bwd_schedule(const sa_attn_args *a, int isa, int dtype_size, sa_schedule *schedule)
    int sa_attn_bwd_f32(const sa_attn_args *a, int isa, void *workspace, size_t workspace_bytes)
    int sa_attn_bwd_f64(const sa_attn_args *a, int isa, void *workspace, size_t workspace_bytes)
