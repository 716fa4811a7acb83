/*
 * attn_fwd_body.h -- the fused attention forward kernel, written once.
 *
 * Included by attn_<target>.c once per dtype, after defining:
 *   T     float | double           VP   vf | vd (the SIMD layer's prefix)
 *   VW    lanes of VP's vector      TSUF f32 | f64      ISUF the target name
 *   MR    rows of a micro-tile      NRV  key vectors of a Q.K^T micro-tile
 *   NVV   value vectors of a P.V micro-tile
 *   BQ    query rows per task       BK   keys per block
 * and it defines attn_fwd_<TSUF>_<ISUF> and sa_params_<TSUF>_<ISUF>.
 *
 * Shapes, per unit u (one batch x head):
 *   Q [L, E], K [S, E], V [S, Ev]  ->  O [L, Ev], lse [L]
 * Logits are kept in log2 units: Q is pre-multiplied by scale*log2(e), so the
 * softmax uses exp2 and lse = ln2 * (m + log2(l)).
 *
 * Passes:
 *   1. pack K^T into blocks of BK keys ([E][BK], then [BK][Evp] V unless V
 *      is read in place), once per distinct K/V, shared by every unit and
 *      query tile that reads it. Three schedules (dispatch.c picks, see
 *      sa_layout_compute and attn_internal.h):
 *        shared: all threads pack a group of K/V, then all compute its
 *                (unit, query tile) tasks -- few, long sequences;
 *        fused:  one task packs one K/V into its thread's buffer and computes
 *                all its query tiles at once -- many short sequences;
 *        banded: windows -- one task takes a run of query tiles of one K/V
 *                and packs the few blocks each tile sees into its thread's
 *                ring of blocks as it reaches them;
 *   2. per task (unit, query tile of BQ rows), per key block of BK keys that
 *      the tile can see (attn_mask.h: causal, window, lengths, alignment),
 *      each group of MR rows working on its own visible key range only:
 *      a. S = Qs.K^T in a register-blocked micro-kernel (MR x NRV*VW);
 *      b. softcap, ALiBi, attn_mask; keys outside the row's interval -> -inf;
 *         row max, new running max m;
 *      c. alpha = exp2(m_old - m_new) for all rows at once (vectorised);
 *      d. P = exp2(S - m_new) in place, row sums, l = l*alpha + sum;
 *      e. O = alpha*O + P.V in a register-blocked micro-kernel (MR x NVV*VW),
 *         the block's P.V summed from zero first (two-level summation);
 *   3. out = O / l, lse; a row with l == 0 (all keys masked) gives 0, -inf.
 * The score tile never leaves the thread's scratch: memory is
 * O(threads x tile + packed K/V), never O(L x S).
 */

#define FN(name) SA_CAT(name, SA_CAT(_, SA_CAT(TSUF, SA_CAT(_, ISUF))))
#define V(op) SA_CAT(VP, SA_CAT(_, op))
#define VT SA_CAT(VP, _t)
#define KEYS_PER_TILE (NRV * VW)

/* What the kernel below assumes of its tile sizes, checked when it is compiled:
 * whole micro-tiles per query tile and key block, and the row arrays (m, l,
 * msafe, alpha) are processed VW rows at a time up to BQ. */
_Static_assert(BQ % MR == 0, "BQ must be a multiple of MR");
_Static_assert(BQ % VW == 0, "BQ must be a multiple of VW (row arrays are read VW rows at a time)");
_Static_assert(BK % KEYS_PER_TILE == 0, "BK must be a multiple of NRV * VW");
_Static_assert(NVV >= 1 && NRV >= 1 && MR >= 1, "micro-tiles must be non-empty");

const sa_tile_params FN(sa_params) = {VW, MR, KEYS_PER_TILE, NVV * VW, BQ, BK};

typedef struct {
    const sa_attn_args *a;
    sa_layout lay;
    T *packed;          /* shared: group x kv_elems; fused: nt x kv_elems; banded: nt x ring x blk_elems */
    T *scratch;         /* nt x thread_elems                     */
    int64_t g0, g1;     /* kv units of the current group         */
    T qscale;           /* scale * log2(e)                       */
} FN(ctx_t);

static inline int64_t FN(round_up)(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* ---- pass 1: packing -------------------------------------------------- */

/* Pack key block kb of kv unit g into `blk` ([E][BK] K^T, then [BK][evp] V
 * unless V is read in place): keys below `klim` (what the units of g can
 * see); the rest of the block, never read from K/V, is zero. */
static void FN(pack_block)(const FN(ctx_t) *c, int64_t g, int64_t kb, int64_t klim, T *blk)
{
    const sa_attn_args *a = c->a;
    const sa_layout *lay = &c->lay;
    int64_t E = a->E, Ev = a->Ev, S = klim, evp = lay->evp;
    T *Kp = blk;                                 /* [E][BK]   */
    T *Vp = blk + E * BK;                        /* [BK][evp] */
    const T *k = (const T *)a->k + a->kv_k_off[g];
    const T *v = (const T *)a->v + a->kv_v_off[g];
    int64_t j0 = kb * BK;
    int64_t nvalid = S - j0 < BK ? S - j0 : BK;
    if (nvalid < 0) nvalid = 0;
    /* K^T: VW x VW register transposes where K rows are contiguous, then the
     * leftover keys / features one by one (e outer: contiguous writes) */
    int64_t jv = 0, ev = 0;
    if (a->k_se == 1) {
        jv = nvalid / VW * VW;
        ev = E / VW * VW;
        for (int64_t jj = 0; jj < jv; jj += VW)
            for (int64_t e = 0; e < ev; e += VW)
                V(transpose)(k + (j0 + jj) * a->k_ss + e, a->k_ss, Kp + e * BK + jj, BK);
    }
    for (int64_t e = 0; e < E; e++) {
        const T *kcol = k + j0 * a->k_ss + e * a->k_se;
        T *dst = Kp + e * BK;
        for (int64_t jj = e < ev ? jv : 0; jj < nvalid; jj++) dst[jj] = kcol[jj * a->k_ss];
        for (int64_t jj = nvalid; jj < BK; jj++) dst[jj] = 0;
    }
    for (int64_t jj = 0; jj < BK && !lay->v_direct; jj++) {
        T *vrow = Vp + jj * evp;
        int64_t col = 0;
        if (jj < nvalid) {
            const T *vsrc = v + (j0 + jj) * a->v_ss;
            if (a->v_se == 1)
                for (; col < Ev; col++) vrow[col] = vsrc[col];
            else
                for (; col < Ev; col++) vrow[col] = vsrc[col * a->v_se];
        }
        for (; col < evp; col++) vrow[col] = 0;
    }
}

/* shared mode, task t: key block t % n_kb of kv unit g0 + t / n_kb */
static void FN(pack_task)(void *vctx, int64_t t, int tid)
{
    FN(ctx_t) *c = (FN(ctx_t) *)vctx;
    (void)tid;
    int64_t gi = t / c->lay.n_kb, kb = t % c->lay.n_kb, lo, hi;
    sa_kv_keys(c->a, c->g0 + gi, &lo, &hi);
    if (kb * BK > hi || (kb + 1) * BK <= lo) return;      /* no unit sees this block */
    FN(pack_block)(c, c->g0 + gi, kb, hi + 1, c->packed + gi * c->lay.kv_elems + kb * c->lay.blk_elems);
}

/* ---- pass 2: micro-kernels -------------------------------------------- */

/* St[MR][nr*VW] = Q[MR][E] . Kb[E][..]; rows of St are BK apart. nr is NRV,
 * or 1 at the ends of a group's key range; a constant after inlining. */
SA_INLINE void FN(qk_tile)(const T *SA_RESTRICT Q, int64_t E, const T *SA_RESTRICT Kb, T *SA_RESTRICT St,
                           const int nr)
{
    VT acc[MR][NRV];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < nr; c++) acc[r][c] = V(zero)();
    for (int64_t e = 0; e < E; e++) {
        VT kv[NRV];
        for (int c = 0; c < nr; c++) kv[c] = V(load)(Kb + e * BK + c * VW);
        for (int r = 0; r < MR; r++) {
            VT qb = V(bcast)(Q + r * E + e);
            for (int c = 0; c < nr; c++) acc[r][c] = V(fma)(qb, kv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < nr; c++) V(store)(St + r * BK + c * VW, acc[r][c]);
}

/* Scores of a group of MR rows over block keys [c0, c1), whole vectors: full
 * micro-tiles where they fit, single-vector ones at the ends. */
static inline void FN(qk_range)(const T *Q, int64_t E, const T *Kb, T *St, int64_t c0, int64_t c1)
{
    while (c0 < c1) {
        if (c0 % KEYS_PER_TILE == 0 && c0 + KEYS_PER_TILE <= c1) {
            FN(qk_tile)(Q, E, Kb + c0, St + c0, NRV);
            c0 += KEYS_PER_TILE;
        } else {
            FN(qk_tile)(Q, E, Kb + c0, St + c0, 1);
            c0 += VW;
        }
    }
}

/* O[MR][nv*VW] = alpha[r] * O + P[MR][nk] . Vb[nk][..]; P rows are BK apart,
 * V rows vs apart, O rows evp apart. nv is a compile-time constant after inlining. */
SA_INLINE void FN(pv_tile)(const T *SA_RESTRICT P, int64_t nk, const T *SA_RESTRICT Vb, int64_t vs, int64_t evp,
                           T *SA_RESTRICT O, const T *SA_RESTRICT alpha, const int nv)
{
    /* the block's sum starts from zero and is added to O once: a two-level
     * summation (BK keys, then blocks) keeps fp32 error near torch's */
    VT acc[MR][NVV];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < nv; c++) acc[r][c] = V(zero)();
    for (int64_t j = 0; j < nk; j++) {
        VT vv[NVV];
        for (int c = 0; c < nv; c++) vv[c] = V(load)(Vb + j * vs + c * VW);
        for (int r = 0; r < MR; r++) {
            VT pb = V(bcast)(P + r * BK + j);
            for (int c = 0; c < nv; c++) acc[r][c] = V(fma)(pb, vv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < MR; r++) {
        VT al = V(bcast)(alpha + r);
        for (int c = 0; c < nv; c++)
            V(store)(O + r * evp + c * VW, V(fma)(V(load)(O + r * evp + c * VW), al, acc[r][c]));
    }
}

static void FN(pv_rows)(const T *P, int64_t nk, const T *Vb, int64_t vs, int64_t evp, T *O, const T *alpha)
{
    int64_t c0 = 0;
    for (; c0 + NVV * VW <= evp; c0 += NVV * VW) FN(pv_tile)(P, nk, Vb + c0, vs, evp, O + c0, alpha, NVV);
    for (; c0 < evp; c0 += VW) FN(pv_tile)(P, nk, Vb + c0, vs, evp, O + c0, alpha, 1);
}

/* s[from..to) = -inf: scalar up to a vector boundary, then whole vectors
 * (to is a multiple of VW or the row's end). */
static inline void FN(fill_neg_inf)(T *s, int64_t from, int64_t to)
{
    const T NEG_INF = -(T)INFINITY;
    int64_t j = from < 0 ? 0 : from;
    for (; j < to && j % VW; j++) s[j] = NEG_INF;
    VT ninf = V(set1)(NEG_INF);
    for (; j + VW <= to; j += VW) V(store)(s + j, ninf);
    for (; j < to; j++) s[j] = NEG_INF;
}

/* softcap in log2 units: s -> c2 tanh(s / c2), c2 = softcap * log2(e), with
 * tanh(x) = 2 / (1 + 2^(-2 x log2 e)) - 1 (exp2 of a large argument is +inf,
 * giving -1; NaN stays NaN). [from, to) is whole vectors. */
static inline void FN(softcap_row)(T *s, int64_t from, int64_t to, T c2)
{
    VT vc2 = V(set1)(c2), k = V(set1)((T)(-2.0 * 1.4426950408889634) / c2);
    VT one = V(set1)((T)1), two = V(set1)((T)2);
    for (int64_t j = from; j < to; j += VW) {
        VT e = V(exp2)(V(mul)(V(load)(s + j), k));
        V(store)(s + j, V(mul)(vc2, V(sub)(V(div)(two, V(add)(one, e)), one)));
    }
}

/* Zero s[from..to), both multiples of VW. */
static inline void FN(fill_zero)(T *s, int64_t from, int64_t to)
{
    for (int64_t j = from; j < to; j += VW) V(store)(s + j, V(zero)());
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
    const T LOG2E = (T)1.4426950408889634;
    int64_t lo, hi;
    sa_row_keys(um, i, &lo, &hi);
    int64_t vs = lo - j0 > cs ? lo - j0 : cs;              /* visible: [vs, ve) */
    int64_t ve = hi - j0 + 1 < kvalid ? hi - j0 + 1 : kvalid;
    if (ve > ce) ve = ce;
    if (ve <= vs) {
        FN(fill_zero)(s, cs, ce);
        *rs = *re = cs;
        return;
    }
    *rs = vs / VW * VW;
    *re = FN(round_up)(ve, VW);
    if (a->softcap > 0)
        FN(softcap_row)(s, *rs, *re, (T)(a->softcap * 1.4426950408889634));
    if (a->alibi_slope) {
        T slope = (T)(a->alibi_slope[u] * 1.4426950408889634);
        T d0 = (T)(j0 - (i + um->offset));                 /* j - p at j = 0 of the block */
        for (int64_t j = vs; j < ve; j++) {
            T d = d0 + (T)j;
            s[j] -= slope * (d < 0 ? -d : d);
        }
    }
    if (a->mask_kind != SA_MASK_NONE) {
        int64_t base = a->mask_off[u] + i * a->mask_sl + j0 * a->mask_ss, ss = a->mask_ss;
        if (a->mask_kind == SA_MASK_BOOL) {
            const uint8_t *m = (const uint8_t *)a->mask + base;
            for (int64_t j = vs; j < ve; j++)
                if (!m[j * ss]) s[j] = NEG_INF;
        } else if (a->mask_kind == SA_MASK_F32) {
            const float *m = (const float *)a->mask + base;
            for (int64_t j = vs; j < ve; j++) s[j] += (T)m[j * ss] * LOG2E;
        } else {
            const double *m = (const double *)a->mask + base;
            for (int64_t j = vs; j < ve; j++) s[j] += (T)(m[j * ss] * 1.4426950408889634);
        }
    }
    for (int64_t j = *rs; j < vs; j++) s[j] = NEG_INF;
    for (int64_t j = ve; j < *re; j++) s[j] = NEG_INF;
    FN(fill_zero)(s, cs, *rs);
    FN(fill_zero)(s, *re, ce);
}

/* ---- pass 2: one task = one unit x one query tile --------------------- */

/* Kp: the packed blocks of kv unit g_kv, block kb at Kp + kb * blk_elems, or
 * (ring > 0, banded schedule) at Kp + (kb % ring) * blk_elems. */
static void FN(compute_tile)(const FN(ctx_t) *c, int64_t u, int64_t g_kv, int64_t qt, const T *Kp, int64_t ring,
                             int tid)
{
    const sa_attn_args *a = c->a;
    const sa_layout *lay = &c->lay;
    const int64_t E = a->E, Ev = a->Ev, evp = lay->evp;
    const T NEG_INF = -(T)INFINITY;

    /* the carving of sa_layout_compute (attn_internal.h), nothing else */
    T *ws = c->scratch + (int64_t)tid * lay->thread_elems;
    T *Qp = ws;                                              /* [BQ][E]   */
    T *St = ws + lay->off_st;                                /* [BQ][BK]  */
    T *Oacc = ws + lay->off_oacc;                            /* [BQ][evp] */
    T *rows_base = ws + lay->off_rows;
    T *m = rows_base + SA_ROW_MAX * lay->row_elems;          /* [BQ] running max (log2 units) */
    T *l = rows_base + SA_ROW_SUM * lay->row_elems;          /* [BQ] running sum              */
    T *msafe = rows_base + SA_ROW_MSAFE * lay->row_elems;    /* [BQ] max used for exp2        */
    T *alpha = rows_base + SA_ROW_ALPHA * lay->row_elems;    /* [BQ] rescale factors          */

    sa_unit_mask um;
    sa_unit_mask_init(a, u, &um);
    int64_t i0 = qt * BQ;
    if (i0 >= um.L) return;                      /* varlen: this unit has fewer query tiles */
    int64_t rows = um.L - i0 < BQ ? um.L - i0 : BQ;
    int64_t rows_eff = FN(round_up)(rows, MR);

    /* Q tile, pre-scaled into log2 units; pad rows are zero */
    const T *q = (const T *)a->q + a->q_off[u];
    for (int64_t r = 0; r < rows_eff; r++) {
        T *dst = Qp + r * E;
        if (r < rows) {
            const T *src = q + (i0 + r) * a->q_sl;
            for (int64_t e = 0; e < E; e++) dst[e] = src[e * a->q_se] * c->qscale;
        } else {
            for (int64_t e = 0; e < E; e++) dst[e] = 0;
        }
        for (int64_t col = 0; col < evp; col++) Oacc[r * evp + col] = 0;
    }
    for (int64_t r = 0; r < BQ; r++) { m[r] = NEG_INF; l[r] = 0; msafe[r] = 0; alpha[r] = 0; }

    /* keys the tile can see (attn_mask.h): blocks outside are skipped whole */
    int64_t tlo, thi;
    sa_rows_keys(&um, i0, i0 + rows - 1, &tlo, &thi);
    /* per group of MR rows: its visible keys [glo, ghi] (padding rows see none) */
    int64_t glo[BQ / MR], ghi[BQ / MR];
    for (int64_t r0 = 0; r0 < rows_eff; r0 += MR) {
        int64_t last = r0 + MR < rows ? r0 + MR : rows;
        sa_rows_keys(&um, i0 + r0, i0 + last - 1, &glo[r0 / MR], &ghi[r0 / MR]);
    }

    int64_t kb_last = thi < tlo ? -1 : thi / BK;    /* -1: no row of the tile sees a key */
    for (int64_t kb = tlo / BK; kb <= kb_last; kb++) {
        int64_t j0 = kb * BK;
        int64_t kvalid = um.S - j0 < BK ? um.S - j0 : BK;
        const T *Kb = Kp + (ring ? kb % ring : kb) * lay->blk_elems;
        /* V: in place (rows v_ss apart), or its packed copy (rows evp apart) */
        const int64_t vstride = lay->v_direct ? a->v_ss : evp;
        const T *Vb = lay->v_direct ? (const T *)a->v + a->kv_v_off[g_kv] + j0 * a->v_ss : Kb + E * BK;
        /* the group's keys in this block: exact [ga, gb) for P.V, whole
         * vectors [cs, ce) for the scores */
        int64_t ga[BQ / MR], gb[BQ / MR], cs[BQ / MR], ce[BQ / MR];
        for (int64_t g = 0; g < rows_eff / MR; g++) {
            ga[g] = glo[g] - j0 > 0 ? glo[g] - j0 : 0;
            gb[g] = ghi[g] - j0 + 1 < kvalid ? ghi[g] - j0 + 1 : kvalid;
            if (gb[g] <= ga[g]) { ga[g] = gb[g] = cs[g] = ce[g] = 0; continue; }
            cs[g] = ga[g] / VW * VW;
            ce[g] = FN(round_up)(gb[g], VW);
        }

        /* a. scores, each group over its own micro-tiles */
        for (int64_t r0 = 0; r0 < rows_eff; r0 += MR)
            FN(qk_range)(Qp + r0 * E, E, Kb, St + r0 * BK, cs[r0 / MR], ce[r0 / MR]);

        /* b. masks, row max (over the row's own keys), new running max */
        int64_t rs[BQ], re[BQ];
        for (int64_t r = 0; r < rows_eff; r++) {
            T *s = St + r * BK;
            int64_t c0 = cs[r / MR], c1 = ce[r / MR];
            if (r < rows) {
                FN(mask_row)(a, &um, u, i0 + r, j0, c0, c1, kvalid, s, &rs[r], &re[r]);
            } else {                             /* padding row: weight 0 */
                FN(fill_zero)(s, c0, c1);
                rs[r] = re[r] = c0;
            }
            VT mx = V(set1)(NEG_INF);
            for (int64_t j = rs[r]; j < re[r]; j += VW) mx = V(max)(mx, V(load)(s + j));
            T tmax = V(hmax)(mx);
            T mnew = tmax > m[r] ? tmax : m[r];
            msafe[r] = mnew == NEG_INF ? 0 : mnew;   /* all masked so far: exp2 gives 0, not NaN */
            alpha[r] = m[r] - msafe[r];
            m[r] = mnew;
        }
        /* c. rescale factors, all rows at once */
        for (int64_t r = 0; r < rows_eff; r += VW) V(store)(alpha + r, V(exp2)(V(load)(alpha + r)));

        /* d. probabilities in place, row sums */
        for (int64_t r = 0; r < rows_eff; r++) {
            T *s = St + r * BK;
            VT ms = V(set1)(msafe[r]), sum = V(zero)();
            for (int64_t j = rs[r]; j < re[r]; j += VW) {
                VT p = V(exp2)(V(sub)(V(load)(s + j), ms));
                V(store)(s + j, p);
                sum = V(add)(sum, p);
            }
            l[r] = l[r] * alpha[r] + V(hsum)(sum);
        }

        /* e. O = alpha*O + P.V over the group's keys only: a key no row of the
         * group sees is never read from V (a group with none still rescales) */
        for (int64_t r0 = 0; r0 < rows_eff; r0 += MR) {
            int64_t g = r0 / MR;
            FN(pv_rows)(St + r0 * BK + ga[g], gb[g] - ga[g], Vb + ga[g] * vstride, vstride, evp, Oacc + r0 * evp,
                        alpha + r0);
        }
    }

    /* 3. normalise and write out */
    T *out = (T *)a->out + a->out_off[u];
    T *lse = a->lse ? (T *)a->lse + a->lse_off[u] : NULL;
    for (int64_t r = 0; r < rows; r++) {
        T *dst = out + (i0 + r) * a->out_sl;
        const T *o = Oacc + r * evp;
        if (l[r] == 0) {                         /* every key masked: zeros, lse = -inf */
            for (int64_t col = 0; col < Ev; col++) dst[col * a->out_se] = 0;
            if (lse) lse[(i0 + r) * a->lse_sl] = NEG_INF;
        } else {
            T inv = (T)1 / l[r];
            if (a->out_se == 1) {
                int64_t col = 0;
                VT vi = V(set1)(inv);
                for (; col + VW <= Ev; col += VW) V(store)(dst + col, V(mul)(V(load)(o + col), vi));
                for (; col < Ev; col++) dst[col] = o[col] * inv;
            } else {
                for (int64_t col = 0; col < Ev; col++) dst[col * a->out_se] = o[col] * inv;
            }
            if (lse) lse[(i0 + r) * a->lse_sl] = (T)(0.6931471805599453 * (double)m[r] + log((double)l[r]));
        }
    }
}

/* shared mode, task t: one unit x one query tile; the heaviest (last, under
 * causal) query tiles first, across all units of the group. Under a window
 * every tile costs about the same and neighbouring tiles share most of their
 * keys: tiles of one unit in order, so the packed blocks are still in cache. */
static void FN(compute_task)(void *vctx, int64_t t, int tid)
{
    FN(ctx_t) *c = (FN(ctx_t) *)vctx;
    const sa_attn_args *a = c->a;
    int64_t ustart = a->kv_start[c->g0], nu = a->kv_start[c->g1] - ustart;
    int64_t qt, idx;
    if (a->window) {
        idx = ustart + t / c->lay.n_qt;
        qt = t % c->lay.n_qt;
    } else {
        qt = c->lay.n_qt - 1 - t / nu;
        idx = ustart + t % nu;
    }
    int64_t lo = c->g0, hi = c->g1 - 1;          /* kv unit of idx: binary search */
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (a->kv_start[mid] <= idx) lo = mid; else hi = mid - 1;
    }
    FN(compute_tile)(c, a->kv_units[idx], lo, qt, c->packed + (lo - c->g0) * c->lay.kv_elems, 0, tid);
}

/* fused mode, task g: pack kv unit g into this thread's buffer while it is
 * about to be used (it stays in L2), then every query tile of its units */
static void FN(fused_task)(void *vctx, int64_t g, int tid)
{
    FN(ctx_t) *c = (FN(ctx_t) *)vctx;
    const sa_attn_args *a = c->a;
    T *Kp = c->packed + (int64_t)tid * c->lay.kv_elems;
    int64_t lo, hi;
    sa_kv_keys(a, g, &lo, &hi);
    for (int64_t kb = lo / BK; kb * BK <= hi; kb++) FN(pack_block)(c, g, kb, hi + 1, Kp + kb * c->lay.blk_elems);
    for (int64_t idx = a->kv_start[g]; idx < a->kv_start[g + 1]; idx++)
        for (int64_t qt = c->lay.n_qt - 1; qt >= 0; qt--) FN(compute_tile)(c, a->kv_units[idx], g, qt, Kp, 0, tid);
}

/* banded mode, task t: query tiles [chunk * (t % n_chunks), ...) of every
 * unit of kv unit t / n_chunks, in order. The blocks a tile sees are packed
 * into this thread's ring when first reached (block kb in slot kb % ring):
 * a tile sees at most `ring` consecutive blocks (sa_layout_compute), so it
 * never evicts its own, and consecutive tiles share most of theirs. */
static void FN(banded_task)(void *vctx, int64_t t, int tid)
{
    FN(ctx_t) *c = (FN(ctx_t) *)vctx;
    const sa_attn_args *a = c->a;
    const sa_layout *lay = &c->lay;
    const int64_t ring = lay->ring;
    T *Kr = c->packed + (int64_t)tid * ring * lay->blk_elems;
    int64_t slot_kb[SA_RING_MAX];
    for (int64_t s = 0; s < ring; s++) slot_kb[s] = -1;    /* nothing packed yet by this task */
    int64_t g = t / lay->n_chunks, qt0 = (t % lay->n_chunks) * lay->chunk;
    int64_t qt1 = qt0 + lay->chunk < lay->n_qt ? qt0 + lay->chunk : lay->n_qt;
    int64_t klo, khi;
    sa_kv_keys(a, g, &klo, &khi);
    for (int64_t qt = qt0; qt < qt1; qt++) {
        for (int64_t idx = a->kv_start[g]; idx < a->kv_start[g + 1]; idx++) {
            int64_t u = a->kv_units[idx];
            sa_unit_mask um;
            sa_unit_mask_init(a, u, &um);
            int64_t i0 = qt * BQ, i1 = i0 + BQ - 1 < um.L - 1 ? i0 + BQ - 1 : um.L - 1, tlo, thi;
            if (i0 < um.L) {
                sa_rows_keys(&um, i0, i1, &tlo, &thi);
                for (int64_t kb = tlo / BK; thi >= tlo && kb <= thi / BK; kb++) {
                    if (slot_kb[kb % ring] == kb) continue;
                    FN(pack_block)(c, g, kb, khi + 1, Kr + (kb % ring) * lay->blk_elems);
                    slot_kb[kb % ring] = kb;
                }
            }
            FN(compute_tile)(c, u, g, qt, Kr, ring, tid);
        }
    }
}

/* ---- the decode path: few query rows per K/V ---------------------------- */
#include "attn_decode_body.h"

/* ---- the backward ------------------------------------------------------- */
#include "attn_bwd_body.h"

/* ---- driver ------------------------------------------------------------ */

int FN(attn_fwd)(const sa_attn_args *a, void *ws, size_t ws_bytes)
{
    FN(ctx_t) c;
    c.a = a;
    if (sa_layout_compute(a, &FN(sa_params), (int)sizeof(T), &c.lay) != SA_OK) return SA_ERR_ARG;
    if (ws_bytes < c.lay.total_bytes || ws == NULL) return SA_ERR_WORKSPACE;
    c.packed = (T *)ws;
    c.scratch = c.packed + (c.lay.sched == SA_SCHEDULE_FUSED ? (int64_t)c.lay.nt * c.lay.kv_elems
                            : c.lay.sched == SA_SCHEDULE_BANDED ? (int64_t)c.lay.nt * c.lay.ring * c.lay.blk_elems
                            : c.lay.sched == SA_SCHEDULE_DECODE ? a->n_kv * c.lay.dec_chunks * c.lay.dec_part_elems
                            : c.lay.group * c.lay.kv_elems);
    c.qscale = (T)(a->scale * 1.4426950408889634);
    int nt = c.lay.nt;

    c.g0 = 0;
    c.g1 = a->n_kv;
    if (c.lay.sched == SA_SCHEDULE_FUSED) return sa_run_tasks(c.lay.tasks, nt, FN(fused_task), &c, a);
    if (c.lay.sched == SA_SCHEDULE_BANDED) return sa_run_tasks(c.lay.tasks, nt, FN(banded_task), &c, a);
    if (c.lay.sched == SA_SCHEDULE_DECODE) {
        int st = sa_run_tasks(c.lay.tasks, nt, FN(decode_task), &c, a);
        return st != SA_OK ? st : sa_run_tasks(a->n_kv, nt, FN(decode_merge_task), &c, a);
    }
    for (int64_t g0 = 0; g0 < a->n_kv; g0 += c.lay.group) {
        c.g0 = g0;
        c.g1 = g0 + c.lay.group < a->n_kv ? g0 + c.lay.group : a->n_kv;
        int st = sa_run_tasks((c.g1 - c.g0) * c.lay.n_kb, nt, FN(pack_task), &c, a);
        if (st != SA_OK) return st;
        int64_t nu = a->kv_start[c.g1] - a->kv_start[c.g0];
        st = sa_run_tasks(nu * c.lay.n_qt, nt, FN(compute_task), &c, a);
        if (st != SA_OK) return st;
    }
    return SA_OK;
}

#undef FN
#undef V
#undef VT
#undef KEYS_PER_TILE
#undef T
#undef VP
#undef VW
#undef TSUF
#undef MR
#undef NRV
#undef NVV
#undef BQ
#undef BK
