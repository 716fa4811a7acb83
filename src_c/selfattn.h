/*
 * selfattn.h -- the public entry points of the selfattn C kernels.
 *
 * Plain C99 (no Python.h). Every function returns a status code (SA_OK on
 * success); nothing here prints, exits or allocates: the caller (the Cython
 * layer) validates arguments, allocates the output and the workspace, and
 * releases the GIL around sa_attn_fwd_*.
 *
 * One "unit" is one (batch..., head) pair of the broadcast output. Units are
 * described by element offsets into the base pointers, so any broadcasting of
 * the leading dimensions (zero strides, GQA head sharing, ...) costs nothing:
 * the kernel packs each distinct K/V pair once and every unit that reads it
 * shares the packed copy -- or, on the decode path (few query rows per
 * distinct K/V), packs nothing and reads K/V in place once for all of them.
 *
 * Entry points: sa_attn_fwd_* (attention, every option, one problem
 * description: sa_attn_args), sa_attn_bwd_* (its fused backward, same
 * description plus the gradient fields), sa_attn_schedule (how it would run),
 * sa_merge_* (the log-sum-exp merge of partial results), CPU/ISA queries.
 *
 * Files (src_c/):
 *   selfattn.h        this interface;  attn_internal.h: layouts, task runner
 *   dispatch.c        the one function table [ISA][dtype] -> forward, decode,
 *                     backward kernel; workspace layouts; threads
 *   attn_<isa>.c      generic | avx2 | avx512 | neon: tile sizes, then
 *                     attn_kernels.h once per dtype (float, double);
 *                     attn_avx512.c also holds the avx512bf16 target: the
 *                     bfloat16 forward, decode and backward on vdpbf16ps,
 *                     the rest avx512's; attn_neon.c the neonbf16 target:
 *                     bfloat16's forward and backward on BFDOT, the rest
 *                     neon's (attn_bf16dot.h: bfloat16 pairs packed and
 *                     multiplied, written once on simd_<target>bf16.h's
 *                     primitives; BF16_DOT in the bodies); attn_avx512.c
 *                     the avx512amx target too: bfloat16's forward and
 *                     backward with the same pairs multiplied on AMX tiles
 *                     (attn_amx.h, BF16_AMX), its decode avx512's
 *   attn_kernels.h    what is compiled per ISA and dtype, in order:
 *     shared:   attn_pack.h (K/V packing; 16-bit storage widened there,
 *               quantized K/V widened and scaled there, the output rounded
 *               there), attn_micro.h (micro-kernels; the decode's readers of
 *               K/V as stored: vload_st),
 *               attn_rows.h (softcap, ALiBi, attn_mask, online softmax),
 *               lse_merge.h (the log-sum-exp merge; merge.c's too)
 *     bodies:   attn_fwd_body.h (shared, fused, banded schedules),
 *               attn_decode_body.h (decode: split-KV), attn_bwd_body.h
 *   dropout.h         attention dropout's mask (Philox4x32-10 on seed, unit, row, key)
 *   attn_mask.h       causal / window / lengths / positions as key intervals;
 *                     a block mask (SA_MASK_BLOCKS: FlexAttention's) skips tiles
 *   simd_<isa>.h      the vector layer (simd_common.h: the names), with the
 *                     16-bit row conversions and the int8 / float8 loaders;
 *                     half.h: the same one value at a time, in plain C
 *   K/V narrower than q (kv_quant: int8, float8, 16-bit under float32 q):
 *                     attn_internal.h's sa_kv_read maps it once to a reader
 *                     kind (SA_READ_*); the bodies and micro-kernels take that
 *   merge.c           sa_merge_* (lse_merge.h in float64)
 */
#ifndef SELFATTN_H
#define SELFATTN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- status codes ------------------------------------------------------ */
enum {
    SA_OK = 0,
    SA_ERR_ARG = 1,          /* an argument is out of range (caller bug)        */
    SA_ERR_WORKSPACE = 2,    /* workspace smaller than sa_attn_workspace_size() */
    SA_ERR_INTERRUPTED = 3,  /* the interrupt callback asked to stop            */
    SA_ERR_ISA = 4           /* the requested instruction set is not available  */
};

/* ---- instruction sets (sa_isa_best: the highest value the CPU runs) ------ */
typedef enum {
    SA_ISA_GENERIC = 0,      /* portable C, builds everywhere                   */
    SA_ISA_AVX2 = 1,         /* x86-64 AVX2 + FMA + F16C                        */
    SA_ISA_AVX512 = 2,       /* x86-64 AVX-512 F/DQ/BW/VL                       */
    SA_ISA_NEON = 3,         /* aarch64 Advanced SIMD (every aarch64 CPU)       */
    SA_ISA_AVX512BF16 = 4,   /* AVX-512 above + AVX512_BF16: bfloat16's kernels on
                                vdpbf16ps; every other dtype avx512's         */
    SA_ISA_NEONBF16 = 5,     /* NEON + the Armv8.6 BF16 extension (HWCAP2_BF16):
                                bfloat16's forward and backward on BFDOT;
                                everything else neon's                        */
    SA_ISA_AVX512AMX = 6,    /* avx512bf16 + AMX-TILE/AMX-BF16, the OS granting
                                the tile data: bfloat16's forward on AMX tiles;
                                everything else avx512's                      */
    SA_ISA_COUNT = 7
} sa_isa;

/* ---- mask element types ------------------------------------------------ */
typedef enum {
    SA_MASK_NONE = 0,
    SA_MASK_BOOL = 1,        /* uint8: nonzero = the key takes part             */
    SA_MASK_F32 = 2,         /* float32, added to the logits                    */
    SA_MASK_F64 = 3,         /* float64, added to the logits                    */
    SA_MASK_BLOCKS = 4       /* a block mask (FlexAttention's): int64 block table,
                                the partial blocks' bits (sa_attn_args.bm_bits)   */
} sa_mask_kind;

/* Entries of a block mask's table (SA_MASK_BLOCKS); >= 0: a partial block,
 * the index of its bits. */
enum {
    SA_BLOCK_EMPTY = -1,     /* no key of the block visible: skipped whole      */
    SA_BLOCK_FULL = -2       /* every key visible: no mask read                  */
};

/* ---- storage of q, k, v and out (and the backward's dout, dq, dk, dv) ------ */
typedef enum {
    SA_STORE_NATIVE = 0,     /* the compute dtype (float32 / float64 kernels)    */
    SA_STORE_BF16 = 1,       /* bfloat16 (uint16 bits), computed in float32      */
    SA_STORE_F16 = 2         /* IEEE float16 (uint16 bits), computed in float32  */
} sa_storage;

/* ---- K and V stored apart from q: quantized or 16-bit (sa_attn_args.kv_quant) */
typedef enum {
    SA_KV_PLAIN = 0,         /* K and V stored as `storage` says                  */
    SA_KV_INT8 = 1,          /* K and V int8, key j's row worth k_scale_j * its values
                                (V alike): symmetric, one float32 scale per key    */
    SA_KV_FP8_E4M3 = 2,      /* K and V float8 e4m3fn (OCP; ml_dtypes.float8_e4m3fn:
                                no inf, NaN = S.1111.111, max 448), scaled as int8;
                                one scale per kv head is a scale stride ks_s = 0 */
    SA_KV_FP8_E5M2 = 3,      /* K and V float8 e5m2 (IEEE-like: the top byte of a
                                float16), scaled as int8                          */
    SA_KV_BF16 = 4,          /* K and V bfloat16, no scales (q and out as `storage`,
                                native float32: a float32 model's 16-bit cache)    */
    SA_KV_F16 = 5            /* K and V IEEE float16, no scales, as SA_KV_BF16     */
} sa_kv_quant;

/* ---- structured masks ---------------------------------------------------- */
typedef enum {
    SA_ALIGN_TOP_LEFT = 0,      /* query row i is at position p = i                  */
    SA_ALIGN_BOTTOM_RIGHT = 1   /* p = i + S_u - L_u: the last query on the last key */
} sa_alignment;

/* ---- schedules (how packing and computing are split into tasks) ---------- */
typedef enum {
    SA_SCHEDULE_AUTO = 0,       /* chosen from the shapes (sa_attn_schedule says which) */
    SA_SCHEDULE_SHARED = 1,     /* all threads pack a group of K/V, then compute it      */
    SA_SCHEDULE_FUSED = 2,      /* each task packs one K/V and computes all its tiles    */
    SA_SCHEDULE_BANDED = 3,     /* windows: each task packs the few blocks its tiles see */
    SA_SCHEDULE_DECODE = 4      /* few query rows per K/V (decoding): nothing packed, K/V
                                   read once, keys split across threads, then merged   */
} sa_schedule_kind;

/* Tile sizes of one (instruction set, dtype) kernel. Tests derive their
 * tile-edge cases from these, so a target that changes its tiles keeps being
 * tested at its own edges. */
typedef struct {
    int vw;   /* SIMD lanes                                              */
    int mr;   /* query rows of a register micro-tile                     */
    int nr;   /* keys of a Q.K^T micro-tile (a multiple of vw)           */
    int nv;   /* value columns of a P.V micro-tile (a multiple of vw)    */
    int bq;   /* query rows per task (a multiple of mr and vw)           */
    int bk;   /* keys per packed K/V block (a multiple of nr)            */
} sa_tile_params;

/* How a call will be scheduled (what sa_attn_fwd_* would do with these
 * arguments): tests use it to prove that a thread-count test really runs
 * several threads over several tasks. */
typedef struct {
    int threads;              /* threads the call runs on                    */
    int fused;                /* 1: fused pack+compute schedule              */
    int banded;               /* 1: banded schedule (windows)                */
    int decode;               /* 1: decode path (few query rows, split-KV)   */
    int64_t compute_tasks;    /* fused: distinct K/V; banded: distinct K/V x runs
                                 of query tiles; decode: distinct K/V x key chunks;
                                 shared: units x query tiles; backward: distinct
                                 K/V x key chunks                            */
    int64_t packed_kv;        /* forward, shared: distinct K/V packed at once
                                 (given for every forward schedule; 0 backward) */
    int64_t key_chunks;       /* backward: key chunks per distinct K/V (each
                                 keeps a partial dQ); 0 forward              */
    int64_t ring_blocks;      /* banded: key blocks packed per thread        */
    int prefetch;             /* decode: the next key block's K/V rows
                                 prefetched (K/V larger than a core's L2)    */
} sa_schedule;

/* ---- score_mod programs (FlexAttention's score_mod; score_mod.h runs them) --
 * selfattn/_scoremod.py traces score_mod(score, b, h, q_idx, kv_idx) once into
 * nodes in evaluation order (SSA: a node's operands are earlier nodes); the
 * kernels run them on a row's keys at a time. Every node is float (double) or
 * integer (int64; comparisons and logic give 0 / 1): the opcode says which. */
typedef enum {
    /* float results */
    SA_SM_SCORE = 0,         /* the score, natural-log units (scale q.k)         */
    SA_SM_FCONST, SA_SM_FADD, SA_SM_FSUB, SA_SM_FMUL, SA_SM_FDIV, SA_SM_FPOW,
    SA_SM_FMIN, SA_SM_FMAX,  /* NaN-propagating (NumPy's minimum / maximum)      */
    SA_SM_FNEG, SA_SM_FABS, SA_SM_FEXP, SA_SM_FLOG, SA_SM_FTANH, SA_SM_FSQRT,
    SA_SM_FFLOOR, SA_SM_FFLOORDIV, SA_SM_FMOD,  /* NumPy's floor_divide, remainder */
    SA_SM_FWHERE,            /* a ? b : c, a integer                               */
    SA_SM_FCAST,             /* integer a as float                                 */
    SA_SM_FLOAD,             /* float array `arr` at the integer nodes arg[0..ndim)
                                (and kv_axis, below) */
    /* integer results */
    SA_SM_B, SA_SM_H, SA_SM_Q, SA_SM_KV,  /* batch, head, query row, key index      */
    SA_SM_ICONST, SA_SM_IADD, SA_SM_ISUB, SA_SM_IMUL, SA_SM_IFLOORDIV, SA_SM_IMOD,
    SA_SM_IPOW, SA_SM_IMIN, SA_SM_IMAX, SA_SM_INEG, SA_SM_IABS, SA_SM_IWHERE,
    SA_SM_ITRUNC,            /* float a toward zero                                */
    SA_SM_ILOAD,             /* integer array `arr` at the integer nodes arg[0..ndim) */
    SA_SM_FLT, SA_SM_FLE, SA_SM_FGT, SA_SM_FGE, SA_SM_FEQ, SA_SM_FNE,   /* floats a, b */
    SA_SM_ILT, SA_SM_ILE, SA_SM_IGT, SA_SM_IGE, SA_SM_IEQ, SA_SM_INE,   /* integers   */
    SA_SM_AND, SA_SM_OR, SA_SM_XOR, SA_SM_NOT,                         /* 0 / 1      */
    SA_SM_OP_COUNT
} sa_sm_op;

#define SA_SM_MAX_NODES 128      /* nodes of a program (its derivative's included) */
#define SA_SM_MAX_DIMS 4         /* dims of a captured array                       */

typedef struct {
    int32_t op;                  /* sa_sm_op                                       */
    int32_t arg[SA_SM_MAX_DIMS]; /* operand nodes (a load: its index nodes)        */
    int32_t arr;                 /* a load: which captured array                   */
    int32_t kv_axis;             /* a load: -1, or the axis whose index is arg[kv_axis]
                                    + i * kv_idx (the other axes': arg[d]). Where the
                                    args do not vary along a row, the read is strided:
                                    no index computed per key (T5's bias[h, q - kv]) */
    double f;                    /* SA_SM_FCONST's value                           */
    int64_t i;                   /* SA_SM_ICONST's value; a load's kv coefficient   */
} sa_sm_node;

/* A score_mod (sa_attn_args.score_mod). Unit u is batch u / n_heads, head
 * u % n_heads; query row i of the unit is q_idx = i, key j is kv_idx = j. The
 * forward runs nodes [0, n_fwd) and uses node `out` as the score; the backward
 * runs all n_nodes and multiplies dS by node `dout` (d out / d score) where the
 * probability is nonzero. Captured array a: C order, dims[a][0..ndim[a]), float64
 * (is_int[a] = 0) or int64; an index below 0 wraps once (NumPy's), one still
 * outside is clamped and sets oob[a] = 1 (the caller raises; nothing outside
 * is read). Not with softcap. */
typedef struct {
    const sa_sm_node *nodes;
    int32_t n_nodes, n_fwd, out, dout;
    int64_t n_heads;
    int32_t n_arrays;
    const void *const *arrays;
    const int32_t *ndim, *is_int;
    const int64_t *dims;         /* [n_arrays][SA_SM_MAX_DIMS]                     */
    int32_t *oob;                /* [n_arrays], written by the kernels              */
} sa_score_mod;

/* Return nonzero to stop the computation (SA_ERR_INTERRUPTED). */
typedef int (*sa_interrupt_fn)(void *ctx);

/*
 * Problem description. Strides and offsets are in ELEMENTS of each array's
 * own type. Shapes: per unit u,
 *   q   [L,  E ] at q   + q_off[u],   strides (q_sl, q_se)
 *   k   [S,  E ] at k   + kv_k_off[unit_kv[u]], strides (k_ss, k_se)
 *   v   [S,  Ev] at v   + kv_v_off[unit_kv[u]], strides (v_ss, v_se)
 *   mask[L,  S ] at mask+ mask_off[u], strides (mask_sl, mask_ss)   (optional)
 *   out [L,  Ev] at out + out_off[u], strides (out_sl, out_se)
 *   lse [L]      at lse + lse_off[u], stride lse_sl                  (optional)
 * The units of kv group g are kv_units[kv_start[g] .. kv_start[g+1]).
 *
 * Structured masks, evaluated per tile from these parameters (never
 * materialised; key blocks no query of a tile can see are neither packed nor
 * computed). Unit u has L_u = q_len[u] query rows (varlen; else L) and
 * S_u = k_len[u] valid keys (key_lengths, varlen; else S): keys j >= S_u are
 * never read. Query row i sits at position p = i (top-left),
 * p = i + S_u - L_u (bottom-right), or p = i + q_pos[u] when q_pos is given
 * (it replaces the alignment: a block of a longer problem, its first query
 * row at position q_pos[u] of the unit's keys, any value) and sees key j < S_u when
 *     bool mask true  and  (not causal or j <= p)
 *     and (not window or window_left < 0 or j >= p - window_left
 *          or j < sink_tokens)
 *     and (not window or window_right < 0 or j <= p + window_right):
 * the first sink_tokens keys stay visible beside a window (StreamingLLM's
 * attention sinks), the keys between are skipped.
 * A zero-initialised sa_attn_args has none of these (plain attention).
 * Its logit is s = scale q.k, then score_mod's program (sa_score_mod) if given,
 * or softcap * tanh(s / softcap) if softcap > 0,
 * then - alibi_slope[u] * |p - j| if alibi_slope, then + the float mask.
 * A sink (sink[u], natural-log units like s; gpt-oss's and FlashAttention's
 * learnable sink) is one more logit in every row's softmax denominator, with
 * a value of zero: out = sum_j e^(s_j) v_j / (e^sink + sum_j e^(s_j)), and
 * lse includes it (so the backward, which reads lse, needs nothing else; a
 * row that sees no key gives zeros and lse = sink).
 */
typedef struct {
    int64_t n_units, n_kv;
    int64_t L, S, E, Ev;

    const void *q;    const int64_t *q_off;   int64_t q_sl, q_se;
    const void *k;    const int64_t *kv_k_off; int64_t k_ss, k_se;
    const void *v;    const int64_t *kv_v_off; int64_t v_ss, v_se;
    const int64_t *kv_start;                   /* [n_kv + 1]                  */
    const int64_t *kv_units;                   /* [n_units], grouped by kv    */

    int storage;      /* sa_storage: how q, k, v and out are stored. 16-bit storage
                         runs the float32 kernels (dtype_size 4): each value is
                         converted to float32 where it is loaded or packed, out
                         rounded (to nearest even) where it is written; lse and a
                         float mask stay float32. The backward takes bfloat16
                         storage on avx512bf16 only (q, k, v, out, dout
                         and dq, dk, dv all bfloat16); elsewhere it refuses
                         16-bit storage (SA_ERR_ARG) */
    int mask_kind;    const void *mask; const int64_t *mask_off; int64_t mask_sl, mask_ss;
    /* Block mask (mask_kind = SA_MASK_BLOCKS; FlexAttention's BlockMask): query
     * rows and keys in blocks of bm_rows x bm_keys; block (qb, kb) of unit u is
     *     t = ((const int64_t *)mask)[mask_off[u] + qb * mask_sl + kb * mask_ss]
     * SA_BLOCK_EMPTY: none of its keys visible (tiles that see only empty
     * blocks are skipped whole: nothing computed), SA_BLOCK_FULL: all visible
     * (nothing read per key), t >= 0: partial, row r of the block at
     * bm_bits + (t * bm_rows + r) * bm_keys, uint8 per key, nonzero = visible.
     * It combines with every structured mask like the bool mask does. */
    const uint8_t *bm_bits; int64_t bm_rows, bm_keys;

    void *out;        const int64_t *out_off; int64_t out_sl, out_se;
    void *lse;        const int64_t *lse_off; int64_t lse_sl;   /* lse may be NULL */

    double scale;     /* multiplies Q K^T (natural-log units)                  */
    int causal;       /* query at position p sees keys j <= p                  */
    int alignment;    /* sa_alignment: positions of the query rows             */
    int window;                                /* 0: no window (zero-init safe) */
    int64_t window_left, window_right;         /* with window: < 0 = unbounded  */
    const int64_t *q_len;                      /* [n_units] or NULL (= L)       */
    const int64_t *k_len;                      /* [n_units] or NULL (= S)       */
    const int64_t *q_pos;                      /* [n_units] or NULL: p of row 0 */
    const double *alibi_slope;                 /* [n_units] or NULL (no ALiBi)  */
    double softcap;                            /* > 0: cap the logits; 0: none  */
    const double *sink;                        /* [n_units] or NULL: a logit in every
                                                  denominator (-inf: none)       */
    int64_t sink_tokens;                       /* >= 0: keys j < sink_tokens escape
                                                  window_left (0: none)          */
    /* K/V stored apart from q and out (kv_quant != SA_KV_PLAIN; q and out
     * float32, storage native, the forward only). Quantized (int8, float8
     * e4m3fn / e5m2): key j of kv unit g is worth k_scale[kv_ks_off[g] + j *
     * ks_s] times its row (v alike; ks_s = 0: one scale for the unit's keys,
     * as a per-head float8 scale). bfloat16 / float16 K/V: no scales. The
     * decode schedule reads them in place, widened in registers (the dots
     * scaled per key, the probabilities by v's scale); the others widen them
     * where they pack. */
    int kv_quant;
    const float *k_scale; const int64_t *kv_ks_off; int64_t ks_s;
    const float *v_scale; const int64_t *kv_vs_off; int64_t vs_s;
    /* Paged K/V (block_table != NULL; vLLM's and FlashAttention's layout; the
     * decode schedule only: SA_ERR_ARG where the problem cannot take it, and
     * from the backward): key j of kv unit g is row j % page_size of page
     *     pg = block_table[kv_bt_off[g] + j / page_size]
     * at element kv_k_off[g] + pg * k_page_s + (j % page_size) * k_ss of k (v
     * alike with kv_v_off, v_page_s, v_ss; int8 scales at kv_ks_off[g] +
     * pg * ks_page_s + (j % page_size) * ks_s, v's alike). kv_k_off then
     * points at the kv head inside a page. Only the entries of keys some unit
     * sees are read (the rest of block_table may hold anything); the values
     * read and their order are those of dense K/V holding the same rows, so
     * the results are the same bits. */
    const int32_t *block_table; const int64_t *kv_bt_off;
    int64_t page_size, k_page_s, v_page_s, ks_page_s, vs_page_s;
    /* Attention dropout (the forward and the backward; not the decode schedule,
     * which is then not taken): each probability of the softmax is kept with
     * probability 1 - dropout_p and scaled by 1 / (1 - dropout_p), or zeroed;
     * the normaliser l (and lse) is the undropped one. Which are kept is a pure
     * function of (dropout_seed, unit u, query row i, key j): dropout.h. */
    double dropout_p;                          /* [0, 1); 0: none                */
    uint64_t dropout_seed;
    const sa_score_mod *score_mod;             /* NULL: none (see sa_score_mod)  */
    int num_threads;  /* >= 1; 1 never enters an OpenMP region                 */
    int schedule;     /* sa_schedule_kind: AUTO, or one forced (tests); BANDED and
                         DECODE are only taken where the problem allows them
                         (a bounded window; <= 16 stacked query rows), else AUTO decides */

    sa_interrupt_fn interrupt; void *interrupt_ctx;   /* may be NULL; polled on thread 0 */

    /* The backward only (sa_attn_bwd_*; the forward ignores these). Inputs:
     * out and lse above are the forward's results (lse required), dout is the
     * cotangent, laid out like out: [L, Ev] at dout + out_off[u], strides
     * (dout_sl, dout_se). Results: dq [L, E] per unit at dq + dq_off[u];
     * dk [S, E] and dv [S, Ev] per kv unit g at dk + dk_off[g], dv + dv_off[g],
     * summed over the units of g. Written: rows i < L_u of dq, rows j < max
     * S_u (over the units of g) of dk and dv; the caller zero-fills the rest. */
    const void *dout;  int64_t dout_sl, dout_se;
    void *dq;          const int64_t *dq_off; int64_t dq_sl, dq_se;
    void *dk;          const int64_t *dk_off; int64_t dk_ss, dk_se;
    void *dv;          const int64_t *dv_off; int64_t dv_ss, dv_se;
} sa_attn_args;

/* What this build and this CPU can do. */
int sa_isa_supported(int isa);       /* 1 if compiled in and the CPU runs it      */
int sa_isa_best(void);               /* the best supported sa_isa                 */
const char *sa_isa_name(int isa);    /* "generic", "avx2", "avx512", "neon", "avx512bf16", "neonbf16",
                                        "avx512amx" */
const char *sa_storage_path(int isa, int storage);  /* 16-bit storage on isa: the float32
                                        kernels, values widened by this ("shifts", "F16C ...") */
int sa_openmp_enabled(void);         /* 1 if built with OpenMP                    */
int sa_default_threads(void);        /* omp_get_max_threads(), or 1              */
int sa_in_forked_child(void);        /* 1 after fork() in a child: runs 1 thread  */

/* Tile sizes of the kernel for (isa, dtype_size 4 or 8). SA_ERR_ISA if that
 * instruction set is not compiled in (it may still be unsupported by the CPU). */
int sa_tile_params_get(int isa, int dtype_size, sa_tile_params *params);

/* The log-sum-exp merge of n partial attentions over disjoint key sets of
 * the same queries (merge.c): part i is out_i [rows][Ev] and lse_i [rows],
 * contiguous, natural-log lse as sa_attn_fwd_* returns it; the result is
 * out [rows][Ev], lse [rows] over the union of the key sets. A row masked in
 * every part (all lse_i = -inf) gives zeros and -inf. float64 arithmetic.
 * ws: sa_merge_workspace_size(n, Ev, num_threads) bytes. */
size_t sa_merge_workspace_size(int64_t n, int64_t Ev, int num_threads);
int sa_merge_f32(int64_t n, int64_t rows, int64_t Ev, const float *const *outs, const float *const *lses,
                 float *out, float *lse, void *ws, size_t ws_bytes, int num_threads);
int sa_merge_f64(int64_t n, int64_t rows, int64_t Ev, const double *const *outs, const double *const *lses,
                 double *out, double *lse, void *ws, size_t ws_bytes, int num_threads);

/* The schedule sa_attn_fwd_* would use for these arguments. */
int sa_attn_schedule(const sa_attn_args *a, int isa, int dtype_size, sa_schedule *schedule);

/* Bytes of workspace sa_attn_fwd_* needs for these arguments and dtype size
 * (4 or 8). Depends on L, S, E, Ev, n_kv, num_threads and isa only. */
int sa_attn_workspace_size(const sa_attn_args *a, int isa, int dtype_size, size_t *bytes);

/* The fused forward pass. workspace must be 64-byte aligned. */
int sa_attn_fwd_f32(const sa_attn_args *a, int isa, void *workspace, size_t workspace_bytes);
int sa_attn_fwd_f64(const sa_attn_args *a, int isa, void *workspace, size_t workspace_bytes);

/* The fused backward pass (the gradient fields of sa_attn_args): bytes of
 * workspace, how it would be scheduled (threads, compute_tasks = kv units x
 * key chunks), and the pass itself. Same masks and options as the forward;
 * results do not depend on num_threads. workspace must be 64-byte aligned. */
int sa_attn_bwd_workspace_size(const sa_attn_args *a, int isa, int dtype_size, size_t *bytes);
int sa_attn_bwd_schedule(const sa_attn_args *a, int isa, int dtype_size, sa_schedule *schedule);
int sa_attn_bwd_f32(const sa_attn_args *a, int isa, void *workspace, size_t workspace_bytes);
int sa_attn_bwd_f64(const sa_attn_args *a, int isa, void *workspace, size_t workspace_bytes);

#ifdef __cplusplus
}
#endif
#endif /* SELFATTN_H */
