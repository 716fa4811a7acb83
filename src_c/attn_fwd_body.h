/*
 * attn_fwd_body.h -- the fused attention forward kernel, written once: the
 * shared, fused and banded schedules (the decode schedule is
 * attn_decode_body.h). A template of attn_kernels.h (T, VW, MR, NRV, NVV,
 * BQ, BK, FN, V): it defines attn_fwd_<TSUF>_<ISUF>, which dispatch.c calls
 * with the layout sa_layout_compute made.
 *
 * Shapes, per unit u (one batch x head):
 *   Q [L, E], K [S, E], V [S, Ev]  ->  O [L, Ev], lse [L]
 * Logits are kept in log2 units: Q is pre-multiplied by scale*log2(e), so the
 * softmax uses exp2 and lse = ln2 * (m + log2(l)).
 *
 * Passes:
 *   1. pack K^T into blocks of BK keys ([E][BK], then [BK][Evp] V unless V
 *      is read in place; attn_pack.h), once per distinct K/V, shared by every
 *      unit and query tile that reads it. Three schedules (dispatch.c picks,
 *      see sa_layout_compute and attn_internal.h):
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
 *      a. S = Qs.K^T in a register-blocked micro-kernel (MR x NRV*VW; attn_micro.h);
 *      b. softcap, ALiBi, attn_mask (attn_rows.h, mask_row); keys outside the
 *         row's interval -> -inf; row max, new running max m;
 *      c. alpha = exp2(m_old - m_new) for all rows at once (vectorised);
 *      d. P = exp2(S - m_new) in place, row sums, l = l*alpha + sum;
 *      e. O = alpha*O + P.V in a register-blocked micro-kernel (MR x NVV*VW),
 *         the block's P.V summed from zero first (two-level summation);
 *   3. out = O / l, lse; a row with l == 0 (all keys masked) gives 0, -inf
 *      (with a sink: l and lse count it, such a row gives 0, sink).
 * The score tile never leaves the thread's scratch: memory is
 * O(threads x tile + packed K/V), never O(L x S).
 */

typedef struct {
    const sa_attn_args *a;
    const sa_layout *lay;
    T *packed;          /* shared: packed_kv x kv_elems; fused: nt x kv_elems; banded: nt x ring x blk_elems */
    T *scratch;         /* nt x thread_elems                     */
    int64_t g0, g1;     /* kv units of the current group         */
    T qscale;           /* scale * log2(e)                       */
} FN(ctx_t);

/* ---- pass 1: packing -------------------------------------------------- */

/* Pack key block kb of kv unit g into `blk` ([E][BK] K^T, then [BK][evp] V
 * unless V is read in place): keys below `klim` (what the units of g can
 * see); the rest of the block, never read from K/V, is zero. */
static void FN(pack_block)(const FN(ctx_t) *c, int64_t g, int64_t kb, int64_t klim, T *blk)
{
    const sa_attn_args *a = c->a;
    int64_t j0 = kb * BK, nvalid = FN(block_keys)(klim, j0);
#if BF16_DOT
    /* bfloat16 pairs (attn_bf16dot.h): V always packed, after K's E x BK */
    FN(pack_k_pairs)(a->k, a->kv_k_off[g] + j0 * a->k_ss, a->k_ss, a->k_se, nvalid, a->E, (uint32_t *)(void *)blk);
    FN(pack_v_pairs)(a->v, a->kv_v_off[g] + j0 * a->v_ss, a->v_ss, a->v_se, nvalid, a->Ev, c->lay->evp,
                     (uint32_t *)(void *)(blk + a->E * BK));
    return;
#endif
    const int rd = sa_kv_read(a);
#if STORE16
    if (sa_read_scaled(rd)) {     /* quantized K and V, widened and scaled here (V always packed) */
        FN(pack_scaled)(a->k, rd, a->kv_k_off[g] + j0 * a->k_ss, a->k_ss, a->k_se,
                        a->k_scale + a->kv_ks_off[g] + j0 * a->ks_s, a->ks_s, nvalid, a->E, a->E, 1, blk);
        FN(pack_scaled)(a->v, rd, a->kv_v_off[g] + j0 * a->v_ss, a->v_ss, a->v_se,
                        a->v_scale + a->kv_vs_off[g] + j0 * a->vs_s, a->vs_s, nvalid, a->Ev, c->lay->evp, 0,
                        blk + a->E * BK);
        return;
    }
#endif
    /* rd: K and V as q (storage), or a 16-bit cache under float32 queries */
    FN(pack_t)(a->k, rd, a->kv_k_off[g] + j0 * a->k_ss, a->k_ss, a->k_se, nvalid, a->E, blk);
    if (!c->lay->v_direct)
        FN(pack_rows)(a->v, rd, a->kv_v_off[g] + j0 * a->v_ss, a->v_ss, a->v_se, nvalid, a->Ev, c->lay->evp,
                      blk + a->E * BK);
}

/* shared mode, task t: key block t % n_kb of kv unit g0 + t / n_kb */
static void FN(pack_task)(void *vctx, int64_t t, int tid)
{
    FN(ctx_t) *c = (FN(ctx_t) *)vctx;
    (void)tid;
    int64_t gi = t / c->lay->n_kb, kb = t % c->lay->n_kb, lo, hi;
    sa_kv_keys(c->a, c->g0 + gi, &lo, &hi);
    if (kb * BK > hi || (kb + 1) * BK <= lo) return;      /* no unit sees this block */
    FN(pack_block)(c, c->g0 + gi, kb, hi + 1, c->packed + gi * c->lay->kv_elems + kb * c->lay->blk_elems);
}

/* ---- pass 2: one task = one unit x one query tile --------------------- */

/* Kp: the packed blocks of kv unit g_kv, block kb at Kp + kb * blk_elems, or
 * (ring > 0, banded schedule) at Kp + (kb % ring) * blk_elems. */
static void FN(compute_tile)(const FN(ctx_t) *c, int64_t u, int64_t g_kv, int64_t qt, const T *Kp, int64_t ring,
                             int tid)
{
    const sa_attn_args *a = c->a;
    const sa_layout *lay = c->lay;
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
    int64_t rows_eff = sa_round_up(rows, MR);

    /* Q tile, pre-scaled into log2 units; pad rows are zero (BF16_DOT: the
     * stored bfloat16 pairs, E2 words a row; the scores are scaled instead) */
#if BF16_DOT
    const int64_t E2 = (E + 1) / 2;
    uint32_t *Qw = (uint32_t *)(void *)Qp;
#if BF16_AMX
    const int64_t rows_q = sa_round_up(rows, SA_AMX_ROWS);     /* AMX reads whole tiles of 16 rows */
#else
    const int64_t rows_q = rows_eff;
#endif
    for (int64_t r = 0; r < rows_q; r++) {
        if (r < rows)
            FN(load_q_pairs)(a->q, a->q_off[u] + (i0 + r) * a->q_sl, a->q_se, E, Qw + r * E2);
        else
            for (int64_t e = 0; e < E2; e++) Qw[r * E2 + e] = 0;
        if (r < rows_eff)
            for (int64_t col = 0; col < evp; col++) Oacc[r * evp + col] = 0;
    }
#else
    for (int64_t r = 0; r < rows_eff; r++) {
        T *dst = Qp + r * E;
        if (r < rows) {
            FN(load_row)(a->q, a->storage, a->q_off[u] + (i0 + r) * a->q_sl, a->q_se, E, dst);
            for (int64_t e = 0; e < E; e++) dst[e] *= c->qscale;
        } else {
            for (int64_t e = 0; e < E; e++) dst[e] = 0;
        }
        for (int64_t col = 0; col < evp; col++) Oacc[r * evp + col] = 0;
    }
#endif
    for (int64_t r = 0; r < BQ; r++) { m[r] = NEG_INF; l[r] = 0; msafe[r] = 0; alpha[r] = 0; }

    /* keys the tile can see (attn_mask.h): [tlo, thi] and the sink keys
     * [0, tshi]; blocks outside both are skipped whole */
    int64_t tlo, thi, tshi;
    sa_rows_keys2(&um, i0, i0 + rows - 1, &tlo, &thi, &tshi);
    /* per group of MR rows: its visible keys [glo, ghi], [0, gshi] (padding rows see none) */
    int64_t glo[BQ / MR], ghi[BQ / MR], gshi[BQ / MR];
    for (int64_t r0 = 0; r0 < rows_eff; r0 += MR) {
        int64_t last = r0 + MR < rows ? r0 + MR : rows;
        sa_rows_keys2(&um, i0 + r0, i0 + last - 1, &glo[r0 / MR], &ghi[r0 / MR], &gshi[r0 / MR]);
    }

#if BF16_AMX
    FN(amx_config)(E2);                          /* this thread's tiles, until tile_release below */
#endif
    int64_t kb_last = sa_blocks_last(tshi, tlo, thi, BK);    /* -1: no row of the tile sees a key */
    for (int64_t kb = sa_blocks_first(tshi, tlo, thi, BK); kb <= kb_last;
         kb = sa_blocks_next(tshi, tlo, thi, BK, kb)) {
        int64_t j0 = kb * BK;
        int64_t kvalid = um.S - j0 < BK ? um.S - j0 : BK;
        if (sa_bmask_empty(a, u, i0, i0 + rows - 1, j0, j0 + kvalid - 1)) continue;   /* block mask: nothing here */
        const T *Kb = Kp + (ring ? kb % ring : kb) * lay->blk_elems;
        /* V: in place (rows v_ss apart), or its packed copy (rows evp apart) */
        const int64_t vstride = lay->v_direct ? a->v_ss : evp;
        const T *Vb = lay->v_direct ? (const T *)a->v + a->kv_v_off[g_kv] + j0 * a->v_ss : Kb + E * BK;
        /* the group's keys in this block: exact [ga, gb) for P.V, whole
         * vectors [cs, ce) for the scores */
        int64_t ga[BQ / MR], gb[BQ / MR], cs[BQ / MR], ce[BQ / MR];
        for (int64_t g = 0; g < rows_eff / MR; g++) {
            sa_block_span(gshi[g], glo[g], ghi[g], j0, kvalid, &ga[g], &gb[g]);
            if (gb[g] <= ga[g]) { ga[g] = gb[g] = cs[g] = ce[g] = 0; continue; }
            cs[g] = ga[g] / VW * VW;
            ce[g] = sa_round_up(gb[g], VW);
        }

        /* a. scores, each group over its own micro-tiles */
#if BF16_AMX
        FN(qk_groups_amx)(Qw, E2, (const uint32_t *)(const void *)Kb, St, cs, ce, rows_eff, c->qscale);
#else
        for (int64_t r0 = 0; r0 < rows_eff; r0 += MR)
#if BF16_DOT
            FN(qk_range_pairs)(Qw + r0 * E2, E2, (const uint32_t *)(const void *)Kb, St + r0 * BK, cs[r0 / MR],
                               ce[r0 / MR], c->qscale);
#else
            FN(qk_range)(Qp + r0 * E, E, Kb, St + r0 * BK, cs[r0 / MR], ce[r0 / MR]);
#endif
#endif

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
            T mnew = FN(running_max)(m[r], FN(row_max)(s, rs[r], re[r]), &msafe[r]);
            alpha[r] = m[r] - msafe[r];
            m[r] = mnew;
        }
        /* c. rescale factors, all rows at once */
        for (int64_t r = 0; r < rows_eff; r += VW) V(store)(alpha + r, V(exp2)(V(load)(alpha + r)));

        /* d. probabilities in place, row sums (of the undropped ones); dropout
         * then zeroes some and scales the rest, for P.V only */
        for (int64_t r = 0; r < rows_eff; r++) {
            T sum = FN(exp_row)(St + r * BK, rs[r], re[r], msafe[r]);
            l[r] = l[r] * alpha[r] + sum;        /* after the sum: the same FMA contraction as ever */
            if (a->dropout_p > 0 && r < rows && re[r] > rs[r]) {
                T z[BK];
                FN(dropout_row)(a, u, i0 + r, j0, rs[r], re[r], z);
                for (int64_t j = rs[r]; j < re[r]; j++) St[r * BK + j] *= z[j];
            }
        }

        /* e. O = alpha*O + P.V over the group's keys only: a key no row of the
         * group sees is never read from V (a group with none still rescales) */
#if BF16_AMX
        FN(pv_groups_amx)(St, ga, gb, rows_eff, (const uint32_t *)(const void *)(Kb + E * BK), evp, Oacc, alpha,
                          E2);
        (void)Vb;
        (void)vstride;
#else
        for (int64_t r0 = 0; r0 < rows_eff; r0 += MR) {
            int64_t g = r0 / MR;
#if BF16_DOT
            /* whole key pairs: [ga, gb) widened to even ends (inside [cs, ce):
             * probabilities 0 where no row of the group sees the key) */
            int64_t a0 = ga[g] & ~(int64_t)1, b0 = (gb[g] + 1) & ~(int64_t)1;
            for (int64_t r = r0; r < r0 + MR; r++) FN(p_to_bf16)(St + r * BK, a0, b0);
            FN(pv_rows_pairs)(St + r0 * BK, a0 / 2, b0 / 2, (const uint32_t *)(const void *)(Kb + E * BK), evp,
                              Oacc + r0 * evp, alpha + r0);
            (void)Vb;
            (void)vstride;
#else
            FN(pv_rows)(St + r0 * BK + ga[g], gb[g] - ga[g], Vb + ga[g] * vstride, vstride, evp, Oacc + r0 * evp,
                        alpha + r0);
#endif
        }
#endif
    }
#if BF16_AMX
    _tile_release();
#endif

    /* 3. normalise and write out (attn_pack.h's store_row: in out's storage);
     * a sink (log2 units here) joins the denominator as one more weight */
    T *lse = a->lse ? (T *)a->lse + a->lse_off[u] : NULL;
    const double sink2 = a->sink ? a->sink[u] * SA_LOG2E : -INFINITY;
    for (int64_t r = 0; r < rows; r++) {
        int64_t off = a->out_off[u] + (i0 + r) * a->out_sl;
        if (sink2 > -INFINITY) {                 /* w = 2^(m - M): the keys' share */
            double mr = l[r] == 0 ? -INFINITY : (double)m[r], M = mr > sink2 ? mr : sink2;
            double w = l[r] == 0 ? 0.0 : exp2(mr - M), tot = (double)l[r] * w + exp2(sink2 - M);
            if (l[r] == 0)
                FN(store_zero_row)(a->out, a->storage, off, a->out_se, Ev);
            else
                FN(store_row)(a->out, a->storage, off, a->out_se, Ev, Oacc + r * evp, (T)(w / tot));
            if (lse) lse[(i0 + r) * a->lse_sl] = (T)(SA_LN2 * M + log(tot));
        } else if (l[r] == 0) {                         /* every key masked: zeros, lse = -inf */
            FN(store_zero_row)(a->out, a->storage, off, a->out_se, Ev);
            if (lse) lse[(i0 + r) * a->lse_sl] = NEG_INF;
        } else {
            FN(store_row)(a->out, a->storage, off, a->out_se, Ev, Oacc + r * evp, (T)1 / l[r]);
            if (lse) lse[(i0 + r) * a->lse_sl] = (T)(SA_LN2 * (double)m[r] + log((double)l[r]));
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
        idx = ustart + t / c->lay->n_qt;
        qt = t % c->lay->n_qt;
    } else {
        qt = c->lay->n_qt - 1 - t / nu;
        idx = ustart + t % nu;
    }
    int64_t lo = c->g0, hi = c->g1 - 1;          /* kv unit of idx: binary search */
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (a->kv_start[mid] <= idx) lo = mid; else hi = mid - 1;
    }
    FN(compute_tile)(c, a->kv_units[idx], lo, qt, c->packed + (lo - c->g0) * c->lay->kv_elems, 0, tid);
}

/* fused mode, task g: pack kv unit g into this thread's buffer while it is
 * about to be used (it stays in L2), then every query tile of its units */
static void FN(fused_task)(void *vctx, int64_t g, int tid)
{
    FN(ctx_t) *c = (FN(ctx_t) *)vctx;
    const sa_attn_args *a = c->a;
    T *Kp = c->packed + (int64_t)tid * c->lay->kv_elems;
    int64_t lo, hi;
    sa_kv_keys(a, g, &lo, &hi);
    for (int64_t kb = lo / BK; kb * BK <= hi; kb++) FN(pack_block)(c, g, kb, hi + 1, Kp + kb * c->lay->blk_elems);
    for (int64_t idx = a->kv_start[g]; idx < a->kv_start[g + 1]; idx++)
        for (int64_t qt = c->lay->n_qt - 1; qt >= 0; qt--) FN(compute_tile)(c, a->kv_units[idx], g, qt, Kp, 0, tid);
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
    const sa_layout *lay = c->lay;
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

/* ---- driver: the shared, fused or banded schedule of lay ------------------ */

int FN(attn_fwd)(const sa_attn_args *a, const sa_layout *lay, void *ws)
{
#if BF16_DOT
    /* this target's own forward is bfloat16's; the rest runs its base target's */
    if (a->storage != SA_STORE_BF16) return BF16_BASE(attn_fwd)(a, lay, ws);
#endif
    FN(ctx_t) c;
    c.a = a;
    c.lay = lay;
    c.packed = (T *)ws;
    c.scratch = c.packed + lay->packed_elems;
    c.qscale = FN(log2_units)(a->scale);
    int nt = lay->nt;

    c.g0 = 0;
    c.g1 = a->n_kv;
    if (lay->sched == SA_SCHEDULE_FUSED) return sa_run_tasks(lay->tasks, nt, FN(fused_task), &c, a);
    if (lay->sched == SA_SCHEDULE_BANDED) return sa_run_tasks(lay->tasks, nt, FN(banded_task), &c, a);
    for (int64_t g0 = 0; g0 < a->n_kv; g0 += lay->packed_kv) {
        c.g0 = g0;
        c.g1 = g0 + lay->packed_kv < a->n_kv ? g0 + lay->packed_kv : a->n_kv;
        int st = sa_run_tasks((c.g1 - c.g0) * lay->n_kb, nt, FN(pack_task), &c, a);
        if (st != SA_OK) return st;
        int64_t nu = a->kv_start[c.g1] - a->kv_start[c.g0];
        st = sa_run_tasks(nu * lay->n_qt, nt, FN(compute_task), &c, a);
        if (st != SA_OK) return st;
    }
    return SA_OK;
}
