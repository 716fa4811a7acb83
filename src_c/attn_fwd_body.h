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
 *   1. pack K^T into blocks [n_kb][E][BK] and V into [S_pad][Evp], once per
 *      distinct K/V, shared by every unit and query tile that reads it. Two
 *      schedules (dispatch.c picks, see sa_layout_compute):
 *        shared: all threads pack a group of K/V, then all compute its
 *                (unit, query tile) tasks -- few, long sequences;
 *        fused:  one task packs one K/V into its thread's buffer and computes
 *                all its query tiles at once -- many short sequences;
 *   2. per task (unit, query tile of BQ rows), per key block of BK keys:
 *      a. S = Qs.K^T in a register-blocked micro-kernel (MR x NRV*VW);
 *      b. mask / causal / tail -> -inf, row max, new running max m;
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
    T *packed;          /* shared: group x kv_elems; fused: nt x kv_elems */
    T *scratch;         /* nt x thread_elems                     */
    int64_t g0, g1;     /* kv units of the current group         */
    T qscale;           /* scale * log2(e)                       */
} FN(ctx_t);

static inline int64_t FN(round_up)(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* ---- pass 1: packing -------------------------------------------------- */

/* Pack key block kb of kv unit g into `packed` (one unit's K^T then V). */
static void FN(pack_block)(const FN(ctx_t) *c, int64_t g, int64_t kb, T *packed)
{
    const sa_attn_args *a = c->a;
    const sa_layout *lay = &c->lay;
    int64_t E = a->E, Ev = a->Ev, S = a->S, evp = lay->evp;
    T *Kp = packed + kb * E * BK;                /* [E][BK]       */
    T *Vp = packed + lay->s_pad * E;             /* [S_pad][Evp]  */
    const T *k = (const T *)a->k + a->kv_k_off[g];
    const T *v = (const T *)a->v + a->kv_v_off[g];
    int64_t j0 = kb * BK;
    int64_t nvalid = S - j0 < BK ? S - j0 : BK;
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
    for (int64_t jj = 0; jj < BK; jj++) {
        T *vrow = Vp + (j0 + jj) * evp;
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
    int64_t gi = t / c->lay.n_kb;
    FN(pack_block)(c, c->g0 + gi, t % c->lay.n_kb, c->packed + gi * c->lay.kv_elems);
}

/* ---- pass 2: micro-kernels -------------------------------------------- */

/* St[MR][KEYS_PER_TILE] = Q[MR][E] . Kb[E][..]; rows of St are BK apart. */
SA_INLINE void FN(qk_tile)(const T *SA_RESTRICT Q, int64_t E, const T *SA_RESTRICT Kb, T *SA_RESTRICT St)
{
    VT acc[MR][NRV];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NRV; c++) acc[r][c] = V(zero)();
    for (int64_t e = 0; e < E; e++) {
        VT kv[NRV];
        for (int c = 0; c < NRV; c++) kv[c] = V(load)(Kb + e * BK + c * VW);
        for (int r = 0; r < MR; r++) {
            VT qb = V(bcast)(Q + r * E + e);
            for (int c = 0; c < NRV; c++) acc[r][c] = V(fma)(qb, kv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NRV; c++) V(store)(St + r * BK + c * VW, acc[r][c]);
}

/* O[MR][nv*VW] = alpha[r] * O + P[MR][nk] . Vb[nk][..]; P rows are BK apart,
 * O and V rows evp apart. nv is a compile-time constant after inlining. */
SA_INLINE void FN(pv_tile)(const T *SA_RESTRICT P, int64_t nk, const T *SA_RESTRICT Vb, int64_t evp,
                           T *SA_RESTRICT O, const T *SA_RESTRICT alpha, const int nv)
{
    /* the block's sum starts from zero and is added to O once: a two-level
     * summation (BK keys, then blocks) keeps fp32 error near torch's */
    VT acc[MR][NVV];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < nv; c++) acc[r][c] = V(zero)();
    for (int64_t j = 0; j < nk; j++) {
        VT vv[NVV];
        for (int c = 0; c < nv; c++) vv[c] = V(load)(Vb + j * evp + c * VW);
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

static void FN(pv_rows)(const T *P, int64_t nk, const T *Vb, int64_t evp, T *O, const T *alpha)
{
    int64_t c0 = 0;
    for (; c0 + NVV * VW <= evp; c0 += NVV * VW) FN(pv_tile)(P, nk, Vb + c0, evp, O + c0, alpha, NVV);
    for (; c0 < evp; c0 += VW) FN(pv_tile)(P, nk, Vb + c0, evp, O + c0, alpha, 1);
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

/* Add the mask / causal limit / key tail to one score row (row i, keys j0..). */
static void FN(mask_row)(const sa_attn_args *a, int64_t u, int64_t i, int64_t j0, int64_t kvalid,
                         int64_t keff, T *s)
{
    const T NEG_INF = -(T)INFINITY;
    if (a->mask_kind != SA_MASK_NONE) {
        int64_t base = a->mask_off[u] + i * a->mask_sl + j0 * a->mask_ss, ss = a->mask_ss;
        if (a->mask_kind == SA_MASK_BOOL) {
            const uint8_t *m = (const uint8_t *)a->mask + base;
            for (int64_t j = 0; j < kvalid; j++)
                if (!m[j * ss]) s[j] = NEG_INF;
        } else if (a->mask_kind == SA_MASK_F32) {
            const float *m = (const float *)a->mask + base;
            for (int64_t j = 0; j < kvalid; j++) s[j] += (T)m[j * ss] * (T)1.4426950408889634;
        } else {
            const double *m = (const double *)a->mask + base;
            for (int64_t j = 0; j < kvalid; j++) s[j] += (T)(m[j * ss] * 1.4426950408889634);
        }
    }
    if (a->causal && j0 + kvalid - 1 > i)
        FN(fill_neg_inf)(s, i + 1 - j0, keff);   /* keys j0 + (i+1-j0).. are in the future */
    else
        FN(fill_neg_inf)(s, kvalid, keff);       /* tail of the last block */
}

/* Keys of a block a group of MR rows computes, rounded up to whole
 * micro-tiles: all kvalid, or under causal only up to the group's last row
 * (`needed` = keys from the block's start that row can see). */
static inline int64_t FN(group_keys)(int causal, int64_t needed, int64_t kvalid)
{
    int64_t k = causal && needed < kvalid ? needed : kvalid;
    return k <= 0 ? 0 : FN(round_up)(k, KEYS_PER_TILE);
}

/* ---- pass 2: one task = one unit x one query tile --------------------- */

static void FN(compute_tile)(const FN(ctx_t) *c, int64_t u, int64_t qt, const T *Kp, int tid)
{
    const sa_attn_args *a = c->a;
    const sa_layout *lay = &c->lay;
    const int64_t E = a->E, Ev = a->Ev, L = a->L, S = a->S, evp = lay->evp;
    const T NEG_INF = -(T)INFINITY;
    const T *Vp = Kp + lay->s_pad * E;

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

    int64_t i0 = qt * BQ;
    int64_t rows = L - i0 < BQ ? L - i0 : BQ;
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

    int64_t kb_end = lay->n_kb;
    if (a->causal) {                             /* blocks wholly above the diagonal are skipped */
        int64_t last_key = i0 + rows - 1;
        int64_t nb = last_key / BK + 1;
        if (nb < kb_end) kb_end = nb;
    }

    for (int64_t kb = 0; kb < kb_end; kb++) {
        int64_t j0 = kb * BK;
        int64_t kvalid = S - j0 < BK ? S - j0 : BK;
        if (a->causal && i0 + rows - j0 < kvalid)
            kvalid = i0 + rows - j0;             /* later keys are in every row's future */
        int64_t keff = FN(round_up)(kvalid, KEYS_PER_TILE);
        const T *Kb = Kp + kb * E * BK;
        const T *Vb = Vp + j0 * evp;

        /* a. scores; under causal a group of MR rows stops at its last row's key
         * (the mask pass below writes -inf over what is skipped) */
        for (int64_t r0 = 0; r0 < rows_eff; r0 += MR) {
            int64_t kg = FN(group_keys)(a->causal, i0 + r0 + MR - j0, kvalid);
            for (int64_t c0 = 0; c0 < kg; c0 += KEYS_PER_TILE)
                FN(qk_tile)(Qp + r0 * E, E, Kb + c0, St + r0 * BK + c0);
        }

        /* b. mask, row max, new running max */
        for (int64_t r = 0; r < rows_eff; r++) {
            T *s = St + r * BK;
            if (r < rows) FN(mask_row)(a, u, i0 + r, j0, kvalid, keff, s);
            else FN(fill_neg_inf)(s, 0, keff);   /* padding row: weight 0 */
            VT mx = V(set1)(NEG_INF);
            for (int64_t j = 0; j < keff; j += VW) mx = V(max)(mx, V(load)(s + j));
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
            for (int64_t j = 0; j < keff; j += VW) {
                VT p = V(exp2)(V(sub)(V(load)(s + j), ms));
                V(store)(s + j, p);
                sum = V(add)(sum, p);
            }
            l[r] = l[r] * alpha[r] + V(hsum)(sum);
        }

        /* e. O = alpha*O + P.V (causal: P is 0 past the group's last row) */
        for (int64_t r0 = 0; r0 < rows_eff; r0 += MR) {
            int64_t kg = a->causal && i0 + r0 + MR - j0 < kvalid ? i0 + r0 + MR - j0 : kvalid;
            FN(pv_rows)(St + r0 * BK, kg < 0 ? 0 : kg, Vb, evp, Oacc + r0 * evp, alpha + r0);
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
 * causal) query tiles first, across all units of the group */
static void FN(compute_task)(void *vctx, int64_t t, int tid)
{
    FN(ctx_t) *c = (FN(ctx_t) *)vctx;
    const sa_attn_args *a = c->a;
    int64_t ustart = a->kv_start[c->g0], nu = a->kv_start[c->g1] - ustart;
    int64_t qt = c->lay.n_qt - 1 - t / nu;
    int64_t idx = ustart + t % nu;
    int64_t lo = c->g0, hi = c->g1 - 1;          /* kv unit of idx: binary search */
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (a->kv_start[mid] <= idx) lo = mid; else hi = mid - 1;
    }
    FN(compute_tile)(c, a->kv_units[idx], qt, c->packed + (lo - c->g0) * c->lay.kv_elems, tid);
}

/* fused mode, task g: pack kv unit g into this thread's buffer while it is
 * about to be used (it stays in L2), then every query tile of its units */
static void FN(fused_task)(void *vctx, int64_t g, int tid)
{
    FN(ctx_t) *c = (FN(ctx_t) *)vctx;
    const sa_attn_args *a = c->a;
    T *Kp = c->packed + (int64_t)tid * c->lay.kv_elems;
    for (int64_t kb = 0; kb < c->lay.n_kb; kb++) FN(pack_block)(c, g, kb, Kp);
    for (int64_t idx = a->kv_start[g]; idx < a->kv_start[g + 1]; idx++)
        for (int64_t qt = c->lay.n_qt - 1; qt >= 0; qt--) FN(compute_tile)(c, a->kv_units[idx], qt, Kp, tid);
}

/* ---- driver ------------------------------------------------------------ */

int FN(attn_fwd)(const sa_attn_args *a, void *ws, size_t ws_bytes)
{
    FN(ctx_t) c;
    c.a = a;
    if (sa_layout_compute(a, &FN(sa_params), (int)sizeof(T), &c.lay) != SA_OK) return SA_ERR_ARG;
    if (ws_bytes < c.lay.total_bytes || ws == NULL) return SA_ERR_WORKSPACE;
    c.packed = (T *)ws;
    c.scratch = c.packed + (c.lay.fused ? (int64_t)c.lay.nt : c.lay.group) * c.lay.kv_elems;
    c.qscale = (T)(a->scale * 1.4426950408889634);
    int nt = c.lay.nt;

    if (c.lay.fused) {
        c.g0 = 0;
        c.g1 = a->n_kv;
        return sa_run_tasks(a->n_kv, nt, FN(fused_task), &c, a);
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
