/*
 * lse_merge.h -- the log-sum-exp merge, written once: n partial results of
 * one query row over disjoint key sets -> the row over their union.
 *   part c: a log-weight m_c, a weight sum l_c, its row o_c [Ev];
 *   M = max_c m_c,  w_c = EXP(m_c - M),  l = sum_c w_c l_c,
 *   out = sum_c w_c o_c / l,  lse = LN_UNIT M + log(l)  (natural log).
 * Parts are summed in order c = 0, 1, ...: the result does not depend on
 * which thread computed which part.
 *
 * A template: included, after defining
 *   LM_FN(name)    the name of this instance's function
 *   LM_T           element type of the parts and the result
 *   LM_ACC         accumulation type (weights, l, the row's sums)
 *   LM_EXP         exp (m_c natural) or exp2 (m_c in log2 units)
 *   LM_LN_UNIT     1.0, or ln 2 for log2-unit m_c
 *   LM_NORMALISED  1: the parts are finished results (out_c, lse_c; l_c = 1,
 *                     no l given): the weights are divided by l first; a
 *                     row with M = -inf (no part saw a key) gives 0, -inf.
 *                  0: unnormalised partials (O_c, m_c = the running max, l_c:
 *                     a split-KV kernel's chunks): divided by l at the end;
 *                     a row with l = 0 gives 0, -inf (a NaN in l propagates).
 * by attn_kernels.h (the decode schedule's merge of its key chunks, in T)
 * and merge.c (sa_merge_*, merge_attention: float64 arithmetic). It
 * undefines them.
 *
 * Part c's row is o[c] + o_off, its m_c is m[c][m_off], its l_c l[c][l_off]
 * (unused when normalised). w: n scratch values; acc: Ev, may be part 0's
 * row (each element is read before it is written). The result goes to
 * dst[e * dst_se] and *lse (lse may be NULL). sink: one more part of
 * log-weight `sink` (m's units) and weight 1 whose row is zero (the decode's
 * attention sink); -inf for none, which leaves every bit as without it.
 */

static void LM_FN(lse_merge_row)(int64_t n, const LM_T *const *o, int64_t o_off, const LM_T *const *m, int64_t m_off,
                                 const LM_T *const *l, int64_t l_off, int64_t Ev, LM_ACC *w, LM_ACC *acc, LM_T *dst,
                                 int64_t dst_se, LM_T *lse, LM_ACC sink)
{
    LM_ACC M = sink;
    for (int64_t c = 0; c < n; c++) {
        LM_ACC x = (LM_ACC)m[c][m_off];
        if (x > M) M = x;
    }
#if LM_NORMALISED
    (void)l;
    (void)l_off;
    if (M == -(LM_ACC)INFINITY) goto empty;
#endif
    /* a part with nothing seen has m_c = -inf and weight 0 (not NaN, when M is -inf too) */
    LM_ACC Msafe = M == -(LM_ACC)INFINITY ? 0 : M;
    LM_ACC total = 0;
    for (int64_t c = 0; c < n; c++) {
        w[c] = (LM_ACC)LM_EXP((double)((LM_ACC)m[c][m_off] - Msafe));
#if LM_NORMALISED
        total += w[c];
#else
        total += w[c] * l[c][l_off];
#endif
    }
    total += (LM_ACC)LM_EXP((double)(sink - Msafe));     /* + 0 exactly without a sink */
#if !LM_NORMALISED
    if (total == 0) goto empty;
#endif
    for (int64_t c = 0; c < n; c++) {
#if LM_NORMALISED
        LM_ACC wc = w[c] / total;
#else
        LM_ACC wc = w[c];
#endif
        const LM_T *src = o[c] + o_off;
        if (c == 0)
            for (int64_t e = 0; e < Ev; e++) acc[e] = (LM_ACC)0 + wc * (LM_ACC)src[e];
        else
            for (int64_t e = 0; e < Ev; e++) acc[e] += wc * (LM_ACC)src[e];
    }
#if LM_NORMALISED
    for (int64_t e = 0; e < Ev; e++) dst[e * dst_se] = (LM_T)acc[e];
#else
    {
        LM_T inv = (LM_T)1 / total;
        for (int64_t e = 0; e < Ev; e++) dst[e * dst_se] = acc[e] * inv;
    }
#endif
    if (lse) *lse = (LM_T)(LM_LN_UNIT * (double)M + log((double)total));
    return;
empty:                                       /* every key masked: zeros, lse = -inf */
    for (int64_t e = 0; e < Ev; e++) dst[e * dst_se] = 0;
    if (lse) *lse = -(LM_T)INFINITY;
}

#undef LM_FN
#undef LM_T
#undef LM_ACC
#undef LM_EXP
#undef LM_LN_UNIT
#undef LM_NORMALISED
