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
    int causal;
} sa_unit_mask;

static inline void sa_unit_mask_init(const sa_attn_args *a, int64_t u, sa_unit_mask *m)
{
    m->L = a->q_len ? a->q_len[u] : a->L;
    m->S = a->k_len ? a->k_len[u] : a->S;
    m->offset = a->q_pos ? a->q_pos[u] : a->alignment == SA_ALIGN_BOTTOM_RIGHT ? m->S - m->L : 0;
    m->left = a->window ? a->window_left : -1;
    m->right = a->window ? a->window_right : -1;
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

/* Keys rows i0..i1 (inclusive) can see at most: [*lo, *hi] (monotone ends). */
static inline void sa_rows_keys(const sa_unit_mask *m, int64_t i0, int64_t i1, int64_t *lo, int64_t *hi)
{
    int64_t l0, h0, l1, h1;
    sa_row_keys(m, i0, &l0, &h0);
    sa_row_keys(m, i1, &l1, &h1);
    *lo = l0;
    *hi = h1;
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
        int64_t ul, uh;
        sa_rows_keys(&m, 0, m.L - 1, &ul, &uh);
        if (uh < ul) continue;
        if (ul < l) l = ul;
        if (uh > h) h = uh;
    }
    *lo = l == INT64_MAX ? 0 : l;
    *hi = h;
}

#endif
