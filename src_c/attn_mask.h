/*
 * attn_mask.h -- the one mask machinery of every kernel (forward, decode
 * and backward): which keys a query row may see, as a
 * predicate on positions evaluated per row and per tile, never materialised.
 *
 * Every structured mask (causal, window, key_lengths / varlen lengths, and
 * the alignment of positions) leaves each query row a contiguous interval of
 * visible keys [lo(i), hi(i)], and both ends are non-decreasing in i. So a
 * tile of rows i0..i1 sees at most keys [lo(i0), hi(i1)]: key blocks outside
 * are skipped whole (not packed, not computed), and within a block a group
 * of rows computes only its own interval. The bool / float attn_mask, ALiBi
 * and softcap then act inside the interval (attn_rows.h, mask_row).
 *
 * Sink tokens (StreamingLLM: the first ns keys stay visible beside a
 * window) add a second interval before it: [0, shi(i)], the sink keys row i
 * sees and its interval does not hold, shi(i) = min(ns - 1, hi(i), lo(i) - 1)
 * (empty when < 0), non-decreasing in i as well. Loops over key blocks visit
 * the blocks of [0, shi] then those of [lo, hi] (the blocks between are not
 * computed; the banded schedule, whose ring holds consecutive blocks, is off
 * with sinks); within a block a row's keys are the hull of both
 * (sa_block_span), the gap -inf (mask_row).
 *
 * A block mask (SA_MASK_BLOCKS, FlexAttention's: a table of empty / full /
 * partial blocks and the partial ones' bits) is the third piece:
 * sa_bmask_empty says whether every block a tile meets is empty (the tile is
 * skipped, like a block outside the intervals); mask_row reads it per row,
 * block by block (full: nothing read, partial: the bits).
 */
#ifndef SELFATTN_ATTN_MASK_H
#define SELFATTN_ATTN_MASK_H

#include <stdint.h>
#include "selfattn.h"

/* What the predicate needs of one unit. */
typedef struct {
    int64_t L, S;           /* query rows and valid keys of the unit (L_u, S_u) */
    int64_t offset;         /* p(i) = i + offset: from q_pos, else the alignment */
    int64_t left, right;    /* window, < 0 = unbounded                           */
    int64_t ns;             /* sink tokens: keys j < ns escape the left bound     */
    int causal;
} sa_unit_mask;

static inline void sa_unit_mask_init(const sa_attn_args *a, int64_t u, sa_unit_mask *m)
{
    m->L = a->q_len ? a->q_len[u] : a->L;
    m->S = a->k_len ? a->k_len[u] : a->S;
    m->offset = a->q_pos ? a->q_pos[u] : a->alignment == SA_ALIGN_BOTTOM_RIGHT ? m->S - m->L : 0;
    m->left = a->window ? a->window_left : -1;
    m->right = a->window ? a->window_right : -1;
    m->ns = a->sink_tokens > 0 && a->window && a->window_left >= 0 ? a->sink_tokens : 0;
    m->causal = a->causal;
}

/* Visible keys of row i: [*lo, *hi], empty when *hi < *lo. */
static inline void sa_row_keys(const sa_unit_mask *m, int64_t i, int64_t *lo, int64_t *hi)
{
    int64_t p = i + m->offset, l = 0, h = m->S - 1;
    if (m->left >= 0 && p - m->left > l) l = p - m->left;
    if (m->right >= 0 && p + m->right < h) h = p + m->right;
    if (m->causal && p < h) h = p;
    *lo = l;
    *hi = h;
}

/* The sink keys of a row whose interval is [lo, hi]: [0, return value]
 * (empty when < 0) -- the keys j < ns it may see (j <= hi) before lo. */
static inline int64_t sa_sink_hi(const sa_unit_mask *m, int64_t lo, int64_t hi)
{
    int64_t s = m->ns - 1;
    if (hi < s) s = hi;
    if (lo - 1 < s) s = lo - 1;
    return s;
}

/* Keys rows i0..i1 (inclusive) can see at most: [*lo, *hi] (monotone ends),
 * and the sink keys [0, *shi] (row i1's: the most). */
static inline void sa_rows_keys2(const sa_unit_mask *m, int64_t i0, int64_t i1, int64_t *lo, int64_t *hi,
                                 int64_t *shi)
{
    int64_t l0, h0, l1, h1;
    sa_row_keys(m, i0, &l0, &h0);
    sa_row_keys(m, i1, &l1, &h1);
    *lo = l0;
    *hi = h1;
    *shi = sa_sink_hi(m, l1, h1);
}

static inline void sa_rows_keys(const sa_unit_mask *m, int64_t i0, int64_t i1, int64_t *lo, int64_t *hi)
{
    int64_t shi;
    sa_rows_keys2(m, i0, i1, lo, hi, &shi);
}

/* Within the block of keys [j0, j0 + n): the hull [*vs, *ve) (offsets from
 * j0) of its keys in [0, shi] or [lo, hi]; *vs = *ve = 0 when none. */
static inline void sa_block_span(int64_t shi, int64_t lo, int64_t hi, int64_t j0, int64_t n, int64_t *vs,
                                 int64_t *ve)
{
    int64_t a = lo - j0 > 0 ? lo - j0 : 0, b = hi - j0 + 1 < n ? hi - j0 + 1 : n;
    int64_t sb = shi - j0 + 1 < n ? shi - j0 + 1 : n;
    if (b <= a) a = b = 0;
    if (sb > 0) {
        if (sb > b) b = sb;
        a = 0;
    }
    *vs = a;
    *ve = b;
}

/* The key blocks (of bk keys) holding keys of [0, shi] or [lo, hi], in order:
 *   for (kb = sa_blocks_first(..); kb <= sa_blocks_last(..); kb = sa_blocks_next(.., kb))
 * (none when last is -1); the blocks between the two are stepped over. */
static inline int64_t sa_blocks_last(int64_t shi, int64_t lo, int64_t hi, int64_t bk)
{
    int64_t a = hi >= lo ? hi / bk : -1, b = shi >= 0 ? shi / bk : -1;
    return a > b ? a : b;
}
static inline int64_t sa_blocks_first(int64_t shi, int64_t lo, int64_t hi, int64_t bk)
{
    return shi >= 0 || hi < lo ? 0 : lo / bk;
}
static inline int64_t sa_blocks_next(int64_t shi, int64_t lo, int64_t hi, int64_t bk, int64_t kb)
{
    if (shi >= 0 && kb == shi / bk) {
        if (hi < lo) return INT64_MAX;                       /* no interval after the sinks */
        if (lo / bk > kb + 1) return lo / bk;                /* over the gap */
    }
    return kb + 1;
}

/* Block mask: 1 if every block of unit u's table covering query rows
 * [i0, i1] and keys [j0, j1] (inclusive) is SA_BLOCK_EMPTY (0 otherwise, and
 * for any other mask kind): the tile computes nothing there. */
static inline int sa_bmask_empty(const sa_attn_args *a, int64_t u, int64_t i0, int64_t i1, int64_t j0, int64_t j1)
{
    if (a->mask_kind != SA_MASK_BLOCKS) return 0;
    const int64_t *t = (const int64_t *)a->mask + a->mask_off[u];
    for (int64_t qb = i0 / a->bm_rows; qb <= i1 / a->bm_rows; qb++)
        for (int64_t kb = j0 / a->bm_keys; kb <= j1 / a->bm_keys; kb++)
            if (t[qb * a->mask_sl + kb * a->mask_ss] != SA_BLOCK_EMPTY) return 0;
    return 1;
}

/* Keys any unit of kv group g can see: the key range its K/V must be packed
 * for ([*lo, *hi], empty when *hi < *lo). Keys >= every S_u are never read. */
static inline void sa_kv_keys(const sa_attn_args *a, int64_t g, int64_t *lo, int64_t *hi)
{
    int64_t l = INT64_MAX, h = -1;
    for (int64_t idx = a->kv_start[g]; idx < a->kv_start[g + 1]; idx++) {
        sa_unit_mask m;
        sa_unit_mask_init(a, a->kv_units[idx], &m);
        if (m.L <= 0 || m.S <= 0) continue;
        int64_t ul, uh, ushi;
        sa_rows_keys2(&m, 0, m.L - 1, &ul, &uh, &ushi);
        if (ushi >= 0) {                    /* sink keys: [0, ...] */
            if (uh < ul) uh = ushi;
            ul = 0;
        }
        if (uh < ul) continue;
        if (ul < l) l = ul;
        if (uh > h) h = uh;
    }
    *lo = l == INT64_MAX ? 0 : l;
    *hi = h;
}

#endif
