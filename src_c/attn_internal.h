/*
 * attn_internal.h -- what the dispatcher (dispatch.c) and the per-target
 * kernels (attn_<target>.c, each including attn_fwd_body.h twice) share.
 * Not part of the public interface (that is selfattn.h).
 */
#ifndef SELFATTN_INTERNAL_H
#define SELFATTN_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include "selfattn.h"
#include "attn_mask.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define SA_HAVE_X86_TARGETS 1
#else
#define SA_HAVE_X86_TARGETS 0
#endif

/* Workspace layout (all sizes in elements of the compute dtype, each piece
 * rounded up to 64 bytes). [packed K/V: `group` kv units (shared mode) or one
 * per thread (fused mode)][scratch of thread 0][scratch of thread 1]...
 * One thread's scratch, carved by the kernel with these offsets only (so the
 * size computed here and the carving cannot disagree):
 *   [Q tile bq x E][scores bq x bk][O accumulator bq x evp][SA_ROW_ARRAYS x bq] */
enum { SA_ROW_MAX, SA_ROW_SUM, SA_ROW_MSAFE, SA_ROW_ALPHA, SA_ROW_ARRAYS };
typedef struct {
    int64_t n_qt, n_kb;          /* query tiles, key blocks                  */
    int64_t s_pad, evp;          /* S and Ev padded to bk and vw             */
    int64_t kv_elems;            /* packed K then V of one kv unit           */
    int64_t group;               /* shared mode: kv units packed at once     */
    int fused;                   /* 1: each task packs one kv unit itself    */
    int64_t qp_elems, st_elems, oacc_elems, row_elems;  /* per-thread pieces */
    int64_t off_st, off_oacc, off_rows;  /* their offsets in a thread's scratch */
    int64_t thread_elems;
    int nt;                      /* threads the scratch is sized for         */
    size_t total_bytes;
} sa_layout;

int sa_layout_compute(const sa_attn_args *a, const sa_tile_params *p, int dtype_size, sa_layout *lay);

/* Run fn(ctx, t, tid) for t in [0, n) on nt threads (tasks claimed in order
 * from a shared counter, so scheduling is dynamic; results never depend on
 * which thread ran a task). Thread 0 polls a->interrupt every ~20 ms. */
typedef void (*sa_task_fn)(void *ctx, int64_t task, int tid);
int sa_run_tasks(int64_t n, int nt, sa_task_fn fn, void *ctx, const sa_attn_args *a);

/* Threads a call really uses: 1 in a forked child (libgomp's pool does not
 * survive fork), never more than there are tasks. */
int sa_effective_threads(int requested);

#define SA_DECLARE_TARGET(isuf)                                                              \
    int attn_fwd_f32_##isuf(const sa_attn_args *a, void *ws, size_t ws_bytes);               \
    int attn_fwd_f64_##isuf(const sa_attn_args *a, void *ws, size_t ws_bytes);               \
    extern const sa_tile_params sa_params_f32_##isuf, sa_params_f64_##isuf;

SA_DECLARE_TARGET(generic)
#if SA_HAVE_X86_TARGETS
SA_DECLARE_TARGET(avx2)
SA_DECLARE_TARGET(avx512)
#endif

#endif
