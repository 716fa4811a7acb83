/*
 * merge.c -- the log-sum-exp merge of partial attentions (plain C, every
 * architecture; the loops are simple enough for the compiler to vectorise).
 *
 * Shapes: n parts, each out_i [rows, Ev] and lse_i [rows] over disjoint key
 * sets of the same queries  ->  out [rows, Ev], lse [rows] over their union:
 *   m   = max_i lse_i            (a row with m = -inf: masked in every part)
 *   w_i = exp(lse_i - m)         (a part with lse_i = -inf: weight 0)
 *   lse = m + log(sum_i w_i),   out = sum_i w_i out_i / sum_i w_i
 * The arithmetic (lse_merge.h, shared with the decode schedule's split-KV
 * merge) runs in float64 (the row accumulates in the thread's scratch) and
 * is rounded once. Rows are split into tasks of SA_MERGE_ROWS;
 * each row is computed the same way whatever the thread count.
 */
#include <math.h>
#include <string.h>
#include "attn_internal.h"

#define SA_MERGE_ROWS 256

size_t sa_merge_workspace_size(int64_t n, int64_t Ev, int num_threads)
{
    int nt = sa_effective_threads(num_threads);
    return (size_t)nt * (size_t)(n + (Ev > 0 ? Ev : 0)) * sizeof(double);
}

/* The merge itself is lse_merge.h's, the one the decode schedule uses for its
 * key chunks: here on finished results (normalised, natural-log lse), in
 * float64. */
#define LM_FN(name) name##_f32
#define LM_T float
#define LM_ACC double
#define LM_EXP exp
#define LM_LN_UNIT 1.0
#define LM_NORMALISED 1
#include "lse_merge.h"
#define LM_FN(name) name##_f64
#define LM_T double
#define LM_ACC double
#define LM_EXP exp
#define LM_LN_UNIT 1.0
#define LM_NORMALISED 1
#include "lse_merge.h"

#define SA_MERGE_BODY(T, SUF)                                                                          \
    typedef struct {                                                                                   \
        int64_t n, rows, Ev;                                                                           \
        const T *const *outs;                                                                          \
        const T *const *lses;                                                                          \
        T *out, *lse;                                                                                  \
        double *ws;                                                                                    \
    } sa_merge_ctx_##SUF;                                                                              \
                                                                                                       \
    static void sa_merge_task_##SUF(void *vctx, int64_t t, int tid)                                    \
    {                                                                                                  \
        const sa_merge_ctx_##SUF *c = (const sa_merge_ctx_##SUF *)vctx;                                \
        const int64_t n = c->n, Ev = c->Ev;                                                            \
        double *w = c->ws + (int64_t)tid * (n + Ev), *acc = w + n;                                     \
        int64_t r1 = (t + 1) * SA_MERGE_ROWS < c->rows ? (t + 1) * SA_MERGE_ROWS : c->rows;            \
        for (int64_t r = t * SA_MERGE_ROWS; r < r1; r++)                                               \
            lse_merge_row_##SUF(n, c->outs, r * Ev, c->lses, r, NULL, 0, Ev, w, acc, c->out + r * Ev, 1, \
                                c->lse + r, -INFINITY);                                                \
    }                                                                                                  \
                                                                                                       \
    int sa_merge_##SUF(int64_t n, int64_t rows, int64_t Ev, const T *const *outs, const T *const *lses, \
                       T *out, T *lse, void *ws, size_t ws_bytes, int num_threads)                      \
    {                                                                                                  \
        if (n < 1 || rows < 0 || Ev < 0 || !outs || !lses || !out || !lse) return SA_ERR_ARG;         \
        if (rows == 0) return SA_OK;                                                                   \
        if (!ws || ws_bytes < sa_merge_workspace_size(n, Ev, num_threads)) return SA_ERR_WORKSPACE;    \
        sa_merge_ctx_##SUF c = {n, rows, Ev, outs, lses, out, lse, (double *)ws};                      \
        sa_attn_args none;                      /* no interrupt hook: a merge is short */              \
        memset(&none, 0, sizeof none);                                                                 \
        int64_t tasks = (rows + SA_MERGE_ROWS - 1) / SA_MERGE_ROWS;                                    \
        int nt = sa_effective_threads(num_threads);                                                    \
        if (nt > tasks) nt = (int)tasks;                                                               \
        return sa_run_tasks(tasks, nt, sa_merge_task_##SUF, &c, &none);                                \
    }

SA_MERGE_BODY(float, f32)
SA_MERGE_BODY(double, f64)
