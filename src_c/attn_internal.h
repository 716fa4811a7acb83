/*
 * attn_internal.h -- what the dispatcher (dispatch.c), merge.c and the
 * per-target kernels (attn_<target>.c, each including attn_kernels.h once per
 * dtype) share: the workspace layouts (computed once, in dispatch.c, and
 * handed to the kernels), the task runner, the kernels' declarations.
 * Not part of the public interface (that is selfattn.h).
 */
#ifndef SELFATTN_INTERNAL_H
#define SELFATTN_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include "selfattn.h"
#include "attn_mask.h"
#include "dropout.h"
#include "half.h"

/* log2(e) and ln(2): the kernels keep logits in log2 units (exp2 is cheaper
 * than exp); these convert scores, masks, slopes and softcap in, lse out. */
#define SA_LOG2E 1.4426950408889634
/* How K and V are read (sa_kv_read): an sa_storage value (SA_STORE_*: as q
 * and out, or a 16-bit cache under float32 queries), or quantized, each key
 * scaled apart: int8, float8 e4m3fn (read x 2^-8, half.h), float8 e5m2 */
#define SA_READ_I8 3
#define SA_READ_E4M3 4
#define SA_READ_E5M2 5
#define SA_LN2 0.6931471805599453

static inline int64_t sa_round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* The one place that maps sa_attn_args.kv_quant to how K and V are read */
static inline int sa_kv_read(const sa_attn_args *a)
{
    switch (a->kv_quant) {
    case SA_KV_INT8: return SA_READ_I8;
    case SA_KV_FP8_E4M3: return SA_READ_E4M3;
    case SA_KV_FP8_E5M2: return SA_READ_E5M2;
    case SA_KV_BF16: return SA_STORE_BF16;
    case SA_KV_F16: return SA_STORE_F16;
    default: return a->storage;
    }
}
/* K and V quantized: each key's scales (k_scale, v_scale) applied apart */
static inline int sa_read_scaled(int rd) { return rd >= SA_READ_I8; }
/* element i of quantized K/V (rd: SA_READ_I8, _E4M3, _E5M2), its value
 * before the key's scale: exact */
static inline float sa_kv_elem(const void *base, int64_t i, int rd)
{
    if (rd == SA_READ_I8) return (float)((const int8_t *)base)[i];
    uint8_t x = ((const uint8_t *)base)[i];
    return rd == SA_READ_E4M3 ? sa_e4m3_to_f32(x) : sa_e5m2_to_f32(x);
}
/* what a key's scale is multiplied by for the values the decode's vector
 * readers give (vload_st: e4m3fn's come x 2^-8) */
static inline float sa_read_unit(int rd) { return rd == SA_READ_E4M3 ? SA_E4M3_UNIT : 1.0f; }

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define SA_HAVE_X86_TARGETS 1
#else
#define SA_HAVE_X86_TARGETS 0
#endif
/* NEON is part of every aarch64 CPU: attn_neon.c needs no target flags */
#if defined(__aarch64__) || defined(_M_ARM64)
#define SA_HAVE_NEON_TARGET 1
#else
#define SA_HAVE_NEON_TARGET 0
#endif

/* Workspace layout of the forward (all sizes in elements of the compute dtype,
 * each piece rounded up to 64 bytes), computed by sa_layout_compute only:
 * [packed K/V, or the decode path's partial results: packed_elems]
 * [scratch of thread 0][scratch of thread 1]...
 * Packed K/V is a sequence of key blocks, each [E][BK] K^T then [BK][evp] V
 * (no V part when V is read in place), in one of three schedules:
 *   shared: `packed_kv` whole kv units, block kb of unit gi at gi*kv_elems + kb*blk_elems;
 *   fused:  one whole kv unit per thread;
 *   banded: a ring of `ring` block slots per thread (block kb in slot kb % ring),
 *           for windows: a tile sees at most ring-1 consecutive blocks, so only
 *           those are packed, while they are hot, by the thread that uses them.
 * The decode schedule packs nothing: its region holds n_kv x dec_chunks
 * partial results (split-KV), each O [dec_rows][evp], then m, l [dec_rows].
 * One thread's scratch, carved by the kernel with these offsets only (so the
 * size computed here and the carving cannot disagree):
 *   [Q tile bq x E][scores bq x bk][O accumulator bq x evp][SA_ROW_ARRAYS x bq]
 *   [16-bit storage only: K bk x E, V bk x evp]
 * (decode: its stacked rows' Q and scores, dec_rows <= bq, in the first two,
 * and a key block's K and V rows converted from 16 bits in the last; a gang
 * of dec_gang kv units keeps the other units' Q after all that, off_qgang). */
enum { SA_ROW_MAX, SA_ROW_SUM, SA_ROW_MSAFE, SA_ROW_ALPHA, SA_ROW_ARRAYS };
#define SA_RING_MAX 64           /* banded: most block slots per thread      */
#define SA_DECODE_MAX_ROWS 16    /* decode: most stacked query rows per K/V   */
#define SA_DECODE_MAX_CHUNKS 64  /* decode: most key chunks per K/V (sa_layout_compute) */
#define SA_DECODE_MAX_GANG 16    /* decode, paged: most kv units (heads of a sequence) per task */
typedef struct {
    int64_t n_qt, n_kb;          /* query tiles, key blocks                  */
    int64_t evp;                 /* Ev padded to vw                          */
    int v_direct;                /* V read in place (rows back to back, Ev a multiple of vw): not packed */
    int64_t blk_elems;           /* one packed key block: K^T, then V unless v_direct */
    int64_t kv_elems;            /* one kv unit's blocks                     */
    int sched;                   /* SA_SCHEDULE_SHARED, _FUSED, _BANDED or _DECODE */
    int64_t packed_kv;           /* shared mode: kv units packed at once (reported for every schedule) */
    int64_t ring;                /* banded mode: block slots per thread      */
    int64_t chunk, n_chunks;     /* banded mode: query tiles per task, tasks per kv unit */
    int64_t dec_l;               /* decode: rows stacked per unit: max q_len (or L) */
    int64_t dec_rows;            /* decode: stacked query rows of the largest kv group */
    int64_t dec_ck, dec_chunks;  /* decode: keys per chunk (a multiple of bk), chunks per kv unit */
    int64_t dec_part_elems;      /* decode: one chunk's partial result, O [dec_rows][evp], m, l */
    int64_t dec_gang;            /* decode: consecutive kv units per task (paged: a sequence's heads) */
    int dec_prefetch;            /* decode: the next block's K/V rows prefetched (K/V beyond a core's L2) */
    int64_t off_qgang;           /* decode, dec_gang > 1: the other units' Q [dec_rows][E] each */
    int64_t packed_elems;        /* the packed K/V (or decode partials) region: the scratch follows */
    int64_t tasks;               /* compute tasks (per group in shared mode: units x tiles) */
    int64_t qp_elems, st_elems, oacc_elems, row_elems;  /* per-thread pieces */
    int64_t off_st, off_oacc, off_rows;  /* their offsets in a thread's scratch */
    int64_t off_conv;            /* decode, 16-bit storage: a block's K [bk][E], V [bk][evp] as T */
    int64_t thread_elems;
    int nt;                      /* threads the scratch is sized for         */
    size_t total_bytes;
} sa_layout;

int sa_layout_compute(const sa_attn_args *a, const sa_tile_params *p, int dtype_size, sa_layout *lay);

/* Where the keys of one key block are, as runs of rows evenly spaced (dense:
 * one run; paged: one per page the block crosses). Key j of the block (block
 * coordinates: key j0 + j of the kv unit) in run r, runs[r].j <= j <
 * runs[r + 1].j, has its K row at element runs[r].k + j * k_ss, its V row at
 * runs[r].v + j * v_ss (int8 scales: runs[r].ks + j * ks_s, runs[r].vs + j *
 * vs_s): the bases are per run, the arithmetic per key that of dense K/V. The
 * decode schedule reads K/V through these only, so paging is this one
 * function, and the order of every sum is that of dense K/V. */
typedef struct {
    int64_t j, k, v, ks, vs;
} sa_kv_run;

/* The runs covering keys [jmin, jmax) of the block at j0 of kv unit g: n runs,
 * runs[n].j = jmax (so at most jmax - jmin + 1 entries are written). */
static inline int sa_kv_runs(const sa_attn_args *a, int64_t g, int64_t j0, int64_t jmin, int64_t jmax, sa_kv_run *runs)
{
    const int scaled = sa_read_scaled(sa_kv_read(a));
    int n = 0;
    if (!a->block_table) {
        runs[0].j = jmin;
        runs[0].k = a->kv_k_off[g] + j0 * a->k_ss;
        runs[0].v = a->kv_v_off[g] + j0 * a->v_ss;
        runs[0].ks = scaled ? a->kv_ks_off[g] + j0 * a->ks_s : 0;
        runs[0].vs = scaled ? a->kv_vs_off[g] + j0 * a->vs_s : 0;
        n = 1;
    } else {
        const int32_t *bt = a->block_table + a->kv_bt_off[g];
        const int64_t ps = a->page_size;
        for (int64_t j = jmin; j < jmax; n++) {
            int64_t key = j0 + j, pg = bt[key / ps], r = key % ps, end = j + (ps - r);
            /* row r of page pg is key j: the base is where key 0 of the block would be */
            runs[n].j = j;
            runs[n].k = a->kv_k_off[g] + pg * a->k_page_s + (r - j) * a->k_ss;
            runs[n].v = a->kv_v_off[g] + pg * a->v_page_s + (r - j) * a->v_ss;
            runs[n].ks = scaled ? a->kv_ks_off[g] + pg * a->ks_page_s + (r - j) * a->ks_s : 0;
            runs[n].vs = scaled ? a->kv_vs_off[g] + pg * a->vs_page_s + (r - j) * a->vs_s : 0;
            j = end;
        }
    }
    runs[n].j = jmax;
    return n;
}

/* Workspace of the backward (attn_bwd_body.h; sa_bwd_layout_compute), in elements of the compute
 * dtype, each piece rounded up to 64 bytes:
 *   [D: n_units x lp][dQ partials: n_units x nc x lp x ep][scratch of thread 0]...
 * One thread's scratch: [K^T E x BK][K BK x ep][V^T Ev x BK][dK BK x ep]
 * [dV BK x evp][Q scaled BQ x ep][Q BQ x ep][dO BQ x evp][P BQ x BK][dS BQ x BK]
 * [raw scores BQ x BK (softcap)][lse2, D: 2 x BQ][bfloat16 storage: P^T, dS^T in
 * pairs, BQ/2 x BK words each]. */
#define SA_BWD_MAX_CHUNKS 16     /* backward: most key chunks per kv unit (dQ partials) */
typedef struct {
    int64_t n_qt, n_kb, lp, ep, evp;   /* query tiles, key blocks; L, E, Ev padded  */
    int64_t cb, nc;                    /* key blocks per chunk, chunks per kv unit  */
    int64_t tasks;                     /* n_kv x nc                                 */
    int64_t part_elems;                /* one unit's dQ partial of one chunk: lp x ep */
    int64_t part_off, shared_elems;
    int64_t off_kt, off_kr, off_vt, off_dk, off_dv, off_qs, off_qu, off_do, off_s, off_dp, off_raw, off_rows,
        off_pairs;
    int64_t thread_elems;
    int nt;
    size_t total_bytes;
} sa_bwd_layout;

int sa_bwd_layout_compute(const sa_attn_args *a, const sa_tile_params *p, int dtype_size, sa_bwd_layout *lay);

/* Run fn(ctx, t, tid) for t in [0, n) on nt threads (tasks claimed in order
 * from a shared counter, so scheduling is dynamic; results never depend on
 * which thread ran a task). Thread 0 polls a->interrupt every ~20 ms. */
typedef void (*sa_task_fn)(void *ctx, int64_t task, int tid);
int sa_run_tasks(int64_t n, int nt, sa_task_fn fn, void *ctx, const sa_attn_args *a);

/* Inside a long task, on thread 0 only (the caller's thread, the one that may
 * call back into Python): 1 if a->interrupt asks to stop, polled at most every
 * ~20 ms (*last_poll: the time of the last poll, kept by the caller). A task
 * that sees 1 tells the others through its context and every task returns
 * early; the kernel then returns SA_ERR_INTERRUPTED. */
int sa_poll_interrupt(const sa_attn_args *a, double *last_poll);

/* Threads a call really uses: 1 in a forked child (libgomp's pool does not
 * survive fork), never more than there are tasks. */
int sa_effective_threads(int requested);

/* The kernels of one (instruction set, dtype): attn_kernels.h defines them,
 * dispatch.c's function table lists them. Each gets the layout dispatch.c
 * computed (sa_layout_compute / sa_bwd_layout_compute with sa_params_*) and a
 * workspace of at least its total_bytes, 64-byte aligned. */
typedef int (*sa_fwd_fn)(const sa_attn_args *a, const sa_layout *lay, void *ws);
typedef int (*sa_bwd_fn)(const sa_attn_args *a, const sa_bwd_layout *lay, void *ws);
#define SA_DECLARE_KERNELS(tsuf, isuf)                                                        \
    int attn_fwd_##tsuf##_##isuf(const sa_attn_args *a, const sa_layout *lay, void *ws);      \
    int attn_decode_##tsuf##_##isuf(const sa_attn_args *a, const sa_layout *lay, void *ws);   \
    int attn_bwd_##tsuf##_##isuf(const sa_attn_args *a, const sa_bwd_layout *lay, void *ws);  \
    extern const sa_tile_params sa_params_##tsuf##_##isuf;
/* one line per dtype */
#define SA_DECLARE_TARGET(isuf) SA_DECLARE_KERNELS(f32, isuf) SA_DECLARE_KERNELS(f64, isuf)

SA_DECLARE_TARGET(generic)
#if SA_HAVE_X86_TARGETS
SA_DECLARE_TARGET(avx2)
SA_DECLARE_TARGET(avx512)
/* avx512bf16: its own forward, decode and backward for bfloat16 storage
 * (attn_avx512.c; any other storage handed to avx512's) */
SA_DECLARE_KERNELS(f32, avx512bf16)
/* avx512amx: its own forward and backward for bfloat16 storage on AMX tiles
 * (attn_avx512.c; any other storage handed to avx512's); the decode is avx512's */
int attn_fwd_f32_avx512amx(const sa_attn_args *a, const sa_layout *lay, void *ws);
int attn_bwd_f32_avx512amx(const sa_attn_args *a, const sa_bwd_layout *lay, void *ws);
extern const sa_tile_params sa_params_f32_avx512amx;
#endif
#if SA_HAVE_NEON_TARGET
SA_DECLARE_TARGET(neon)
/* neonbf16: its own forward and backward for bfloat16 storage (attn_neon.c;
 * any other storage, and the decode, handed to neon's) */
SA_DECLARE_KERNELS(f32, neonbf16)
#endif

#endif
