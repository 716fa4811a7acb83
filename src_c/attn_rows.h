/*
 * attn_rows.h -- what the three bodies do to a row of scores (a template of
 * attn_kernels.h), written once: softcap, score_mod, ALiBi and the attn_mask on a row's
 * visible keys (mask_row; the structured masks are attn_mask.h's intervals),
 * and the online-softmax step (row max, new running max, exp2 and row sum).
 * Scores are in log2 units: Q is pre-multiplied by scale * log2(e), so the
 * softmax uses exp2, and everything added to a score is converted too.
 */

/* Zero s[from..to), both multiples of VW. */
static inline void FN(fill_zero)(T *s, int64_t from, int64_t to)
{
    for (int64_t j = from; j < to; j += VW) V(store)(s + j, V(zero)());
}

/* ---- softcap: s -> c2 tanh(s / c2), c2 = softcap * log2(e) ---------------- */

/* k = -2 log2(e) / c2, the factor softcap_tanh wants */
static inline T FN(softcap_k)(T c2) { return (T)(-2.0 * SA_LOG2E) / c2; }

/* tanh(x / c2) = 2 / (1 + 2^(x k)) - 1 (exp2 of a large argument is +inf,
 * giving -1; NaN stays NaN): the forward caps with it, the backward takes
 * its derivative 1 - tanh^2 from the raw score. */
SA_INLINE VT FN(softcap_tanh)(VT x, VT k)
{
    VT one = V(set1)((T)1), two = V(set1)((T)2);
    return V(sub)(V(div)(two, V(add)(one, V(exp2)(V(mul)(x, k)))), one);
}

/* softcap on s[from..to), whole vectors */
static inline void FN(softcap_row)(T *s, int64_t from, int64_t to, T c2)
{
    VT vc2 = V(set1)(c2), k = V(set1)(FN(softcap_k)(c2));
    for (int64_t j = from; j < to; j += VW) V(store)(s + j, V(mul)(vc2, FN(softcap_tanh)(V(load)(s + j), k)));
}

/* ---- score_mod: a traced program on keys [from, to) of row i (score_mod.h) -- */

/* a tile row's keys in one evaluation (the loop below makes one pass) */
typedef char FN(sm_chunk_holds_a_block)[BK <= SA_SM_CHUNK ? 1 : -1];

/* deriv 0: s[j] = score_mod(s[j]) in place (log2 units in and out; the program
 * sees natural-log scores). deriv 1: g[j] = d score_mod / d score at the raw
 * log2-unit scores s[j], for the backward. Keys j0 + j for j in [from, to).
 * Its registers (sa_sm_regs, 128 KiB) live on the stack of the calling thread. */
static void FN(score_mod_row)(const sa_attn_args *a, int64_t u, int64_t i, int64_t j0, int64_t from, int64_t to,
                              T *s, T *g, int deriv)
{
    const sa_score_mod *m = a->score_mod;
    sa_sm_regs R;
    double xbuf[SA_SM_CHUNK];
    double *x = m->nodes[0].op == SA_SM_SCORE ? R.v[0].f : xbuf;    /* node 0's own slot: no copy */
    for (int64_t c = from; c < to; c += SA_SM_CHUNK) {
        int n = (int)(to - c < SA_SM_CHUNK ? to - c : SA_SM_CHUNK);
        for (int j = 0; j < n; j++) x[j] = (double)s[c + j] * SA_LN2;
        sa_sm_eval(m, deriv ? m->n_nodes : m->n_fwd, u, i, j0 + c, n, x, &R);
        if (deriv)
            for (int j = 0; j < n; j++) g[c + j] = (T)R.v[m->dout].f[j];
        else
            for (int j = 0; j < n; j++) s[c + j] = (T)(R.v[m->out].f[j] * SA_LOG2E);
    }
}

/* ---- ALiBi and the attn_mask on keys [vs, ve) of a block at key j0 ------- */

/* s[j] -= slope |p - (j0 + j)|, slope in log2 units */
static inline void FN(alibi_row)(T *s, int64_t vs, int64_t ve, int64_t j0, int64_t p, T slope)
{
    T d0 = (T)(j0 - p);                                   /* j - p at j = 0 of the block */
    for (int64_t j = vs; j < ve; j++) {
        T d = d0 + (T)j;
        s[j] -= slope * (d < 0 ? -d : d);
    }
}

/* The attn_mask of query row i of unit u: every mask kind is here, once. */
static inline void FN(attn_mask_row)(const sa_attn_args *a, int64_t u, int64_t i, int64_t j0, int64_t vs, int64_t ve,
                                     T *s)
{
    const T NEG_INF = -(T)INFINITY;
    int64_t base = a->mask_off[u] + i * a->mask_sl + j0 * a->mask_ss, ss = a->mask_ss;
    if (a->mask_kind == SA_MASK_BOOL) {
        const uint8_t *m = (const uint8_t *)a->mask + base;
        for (int64_t j = vs; j < ve; j++)
            if (!m[j * ss]) s[j] = NEG_INF;
    } else if (a->mask_kind == SA_MASK_BLOCKS) {        /* block by block: empty, full, partial */
        const int64_t *t = (const int64_t *)a->mask + a->mask_off[u] + (i / a->bm_rows) * a->mask_sl;
        const int64_t bk = a->bm_keys;
        for (int64_t j = vs; j < ve;) {
            int64_t kb = (j0 + j) / bk, end = (kb + 1) * bk - j0, id = t[kb * a->mask_ss];
            if (end > ve) end = ve;
            if (id == SA_BLOCK_EMPTY) {
                for (; j < end; j++) s[j] = NEG_INF;
            } else if (id >= 0) {                          /* bits of row i, key j at m[j] */
                const uint8_t *m = a->bm_bits + (id * a->bm_rows + i % a->bm_rows) * bk - kb * bk + j0;
                for (; j < end; j++) s[j] = m[j] ? s[j] : NEG_INF;   /* no branch: patterns mispredict */
            } else {
                j = end;
            }
        }
    } else if (a->mask_kind == SA_MASK_F32) {
        const float *m = (const float *)a->mask + base;
        for (int64_t j = vs; j < ve; j++) s[j] += (T)m[j * ss] * (T)SA_LOG2E;
    } else {
        const double *m = (const double *)a->mask + base;
        for (int64_t j = vs; j < ve; j++) s[j] += (T)(m[j * ss] * SA_LOG2E);
    }
}

/* Score row of query row i (unit u, position p = i + um->offset) over the
 * block's computed keys [cs, ce) (whole vectors; block keys j0 + j): softcap,
 * ALiBi and the attn_mask on the row's visible keys. Returns in [*rs, *re)
 * the whole vectors that hold them (the only ones the max and exp passes
 * touch): -inf there outside the visible keys, and 0 -- a probability already
 * -- on the rest of [cs, ce) (other rows' keys, past the valid keys). */
static void FN(mask_row)(const sa_attn_args *a, const sa_unit_mask *um, int64_t u, int64_t i, int64_t j0,
                         int64_t cs, int64_t ce, int64_t kvalid, T *s, int64_t *rs, int64_t *re)
{
    const T NEG_INF = -(T)INFINITY;
    int64_t lo, hi, vs, ve;
    sa_row_keys(um, i, &lo, &hi);
    const int64_t shi = sa_sink_hi(um, lo, hi);              /* sink keys [0, shi] (attn_mask.h) */
    sa_block_span(shi, lo, hi, j0, kvalid, &vs, &ve);       /* visible: [vs, ve), */
    if (vs < cs) vs = cs;                                    /* within the computed [cs, ce) */
    if (ve > ce) ve = ce;
    if (ve <= vs) {
        FN(fill_zero)(s, cs, ce);
        *rs = *re = cs;
        return;
    }
    *rs = vs / VW * VW;
    *re = sa_round_up(ve, VW);
    if (a->softcap > 0) FN(softcap_row)(s, *rs, *re, FN(log2_units)(a->softcap));
    if (a->score_mod) FN(score_mod_row)(a, u, i, j0, vs, ve, s, NULL, 0);
    if (a->alibi_slope) FN(alibi_row)(s, vs, ve, j0, i + um->offset, FN(log2_units)(a->alibi_slope[u]));
    if (a->mask_kind != SA_MASK_NONE) FN(attn_mask_row)(a, u, i, j0, vs, ve, s);
    if (shi >= 0)                                            /* the keys between sinks and interval */
        for (int64_t j = shi + 1 - j0 > vs ? shi + 1 - j0 : vs; j < lo - j0 && j < ve; j++) s[j] = NEG_INF;
    for (int64_t j = *rs; j < vs; j++) s[j] = NEG_INF;
    for (int64_t j = ve; j < *re; j++) s[j] = NEG_INF;
    FN(fill_zero)(s, cs, *rs);
    FN(fill_zero)(s, *re, ce);
}

/* ---- dropout ---------------------------------------------------------------- */

/* z[j] = 1 / (1 - p) where key j0 + j of row i (unit u) is kept, 0 where it
 * is dropped, for j in [from, to) (dropout.h: the same in every body). */
static void FN(dropout_row)(const sa_attn_args *a, int64_t u, int64_t i, int64_t j0, int64_t from, int64_t to, T *z)
{
    uint8_t keep[BK];
    const T kept = (T)(1.0 / (1.0 - a->dropout_p));
    sa_dropout_keep(a->dropout_seed, sa_dropout_threshold(a->dropout_p), u, i, j0 + from, to - from, keep);
    for (int64_t j = from; j < to; j++) z[j] = keep[j - from] ? kept : (T)0;
}

/* ---- the online-softmax step ----------------------------------------------- */

/* Max of s[rs..re) (whole vectors); -inf when empty. */
static inline T FN(row_max)(const T *s, int64_t rs, int64_t re)
{
    VT mx = V(set1)(-(T)INFINITY);
    for (int64_t j = rs; j < re; j += VW) mx = V(max)(mx, V(load)(s + j));
    return V(hmax)(mx);
}

/* The new running max of a row whose max was m and whose block max is tmax;
 * *msafe: the max exp2 subtracts -- 0 while the row has seen nothing, so that
 * exp2 gives 0, not NaN (a NaN score, which the max may skip, still reaches
 * l through exp2). The rescale factor of O and l is 2^(m - *msafe). */
static inline T FN(running_max)(T m, T tmax, T *msafe)
{
    T mnew = tmax > m ? tmax : m;
    *msafe = mnew == -(T)INFINITY ? 0 : mnew;
    return mnew;
}

/* P = 2^(s - msafe) in place on s[rs..re) (whole vectors); returns its sum. */
static inline T FN(exp_row)(T *s, int64_t rs, int64_t re, T msafe)
{
    VT ms = V(set1)(msafe), sum = V(zero)();
    for (int64_t j = rs; j < re; j += VW) {
        VT p = V(exp2)(V(sub)(V(load)(s + j), ms));
        V(store)(s + j, p);
        sum = V(add)(sum, p);
    }
    return V(hsum)(sum);
}
