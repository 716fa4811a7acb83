/*
 * attn_decode_body.h -- the decode path: few query rows against long K/V.
 * Included by attn_fwd_body.h (same T, VP, VW, BQ, BK, FN, V macros), so it
 * is compiled once per target and dtype like the forward kernel, and shares
 * its problem description (sa_attn_args), its mask machinery (attn_mask.h,
 * mask_row) and its workspace layout (sa_layout).
 *
 * Shapes, per kv unit g (one distinct K/V) with its units u (the GQA query
 * heads, or batch entries, that share it) stacked:
 *   Q [R = units x L, E] (R <= SA_DECODE_MAX_ROWS), K [S, E], V [S, Ev]
 *   -> O [R, Ev], lse [R]
 * A decode step is memory-bound: each K/V byte must be read once, at the
 * machine's bandwidth, by every core. So nothing is packed (packing one
 * query row's K/V costs more than attending to it), K and V rows are read
 * where they are, and the keys are split across threads (split-KV):
 *
 *   1. task (g, chunk): keys [chunk * CK, (chunk + 1) * CK) of kv unit g, in
 *      blocks of BK keys, for every stacked row:
 *        a. s = q.k for the row's visible keys of the block (attn_mask.h),
 *           K rows read in place, each once per block for all rows;
 *        b. softcap, ALiBi, attn_mask, -inf outside the row's interval
 *           (mask_row, as in the forward); online softmax (m, l);
 *        c. O = alpha O + P.V, V rows read in place;
 *      the chunk's (O, m, l) go to its own slot of the workspace;
 *   2. task g: merge the chunks of each row in chunk order (the
 *      log-sum-exp merge: M = max m_c, l = sum l_c 2^(m_c - M),
 *      O = sum O_c 2^(m_c - M)), then out = O / l, lse.
 * CK depends on the shapes only (sa_layout_compute), never on the thread
 * count, and the merge order is fixed: results are identical for every
 * number of threads.
 */

/* Row rr of kv unit g's stacked rows: its unit and its row in that unit. */
static inline void FN(decode_row)(const sa_attn_args *a, int64_t g, int64_t rr, int64_t *u, int64_t *i)
{
    *u = a->kv_units[a->kv_start[g] + rr / a->L];
    *i = rr % a->L;
}

/* decode task t: chunk t % dec_chunks of kv unit t / dec_chunks */
static void FN(decode_task)(void *vctx, int64_t t, int tid)
{
    FN(ctx_t) *c = (FN(ctx_t) *)vctx;
    const sa_attn_args *a = c->a;
    const sa_layout *lay = &c->lay;
    const int64_t E = a->E, Ev = a->Ev, evp = lay->evp;
    const T NEG_INF = -(T)INFINITY;
    const int64_t g = t / lay->dec_chunks, ch = t % lay->dec_chunks;
    const int64_t R = (a->kv_start[g + 1] - a->kv_start[g]) * a->L;

    /* this chunk's partial result: O [R][evp], then m [R], l [R] */
    T *Op = c->packed + t * lay->dec_part_elems;
    T *mp = Op + lay->dec_rows * evp, *lp = mp + lay->dec_rows;

    /* the carving of sa_layout_compute, as in compute_tile (R <= BQ rows) */
    T *ws = c->scratch + (int64_t)tid * lay->thread_elems;
    T *Qs = ws;                                              /* [R][E]  */
    T *St = ws + lay->off_st;                                /* [R][BK] */
    int64_t lo[SA_DECODE_MAX_ROWS], hi[SA_DECODE_MAX_ROWS], vs[SA_DECODE_MAX_ROWS], ve[SA_DECODE_MAX_ROWS];
    sa_unit_mask um[SA_DECODE_MAX_ROWS];

    int64_t klo, khi;
    sa_kv_keys(a, g, &klo, &khi);
    int64_t c0 = ch * lay->dec_ck, c1 = c0 + lay->dec_ck < a->S ? c0 + lay->dec_ck : a->S;
    if (c1 > khi + 1) c1 = khi + 1;                          /* keys >= every S_u: never read */

    for (int64_t rr = 0; rr < R; rr++) {
        int64_t u, i;
        FN(decode_row)(a, g, rr, &u, &i);
        sa_unit_mask_init(a, u, &um[rr]);
        mp[rr] = NEG_INF;
        lp[rr] = 0;
        for (int64_t col = 0; col < evp; col++) Op[rr * evp + col] = 0;
        lo[rr] = 0;
        hi[rr] = -1;                                          /* rows past L_u (varlen) see nothing */
        if (i >= um[rr].L) continue;
        sa_row_keys(&um[rr], i, &lo[rr], &hi[rr]);
        const T *q = (const T *)a->q + a->q_off[u] + i * a->q_sl;
        for (int64_t e = 0; e < E; e++) Qs[rr * E + e] = q[e * a->q_se] * c->qscale;
    }

    for (int64_t j0 = c0 / BK * BK; j0 < c1; j0 += BK) {
        const int64_t kvalid = c1 - j0 < BK ? c1 - j0 : BK;  /* the block's keys in this chunk */
        int64_t jmin = BK, jmax = 0;
        for (int64_t rr = 0; rr < R; rr++) {
            vs[rr] = lo[rr] - j0 > 0 ? lo[rr] - j0 : 0;
            ve[rr] = hi[rr] - j0 + 1 < kvalid ? hi[rr] - j0 + 1 : kvalid;
            if (ve[rr] <= vs[rr]) { vs[rr] = ve[rr] = 0; continue; }
            if (vs[rr] < jmin) jmin = vs[rr];
            if (ve[rr] > jmax) jmax = ve[rr];
        }
        if (jmax <= jmin) continue;                          /* no row sees a key of this block */

        /* a. scores: each K row read once for every row that sees it */
        const T *kblk = (const T *)a->k + a->kv_k_off[g] + j0 * a->k_ss;
        for (int64_t j = jmin; j < jmax; j++) {
            const T *kr = kblk + j * a->k_ss;
            for (int64_t rr = 0; rr < R; rr++) {
                if (j < vs[rr] || j >= ve[rr]) continue;
                const T *qr = Qs + rr * E;
                T dot = 0;
                int64_t e = 0;
                if (a->k_se == 1 && E >= VW) {
                    VT acc = V(zero)();
                    for (; e + VW <= E; e += VW) acc = V(fma)(V(load)(qr + e), V(load)(kr + e), acc);
                    dot = V(hsum)(acc);
                }
                for (; e < E; e++) dot += qr[e] * kr[e * a->k_se];
                St[rr * BK + j] = dot;
            }
        }

        /* b. masks and the online softmax, row by row; c. O += P.V */
        const T *vblk = (const T *)a->v + a->kv_v_off[g] + j0 * a->v_ss;
        for (int64_t rr = 0; rr < R; rr++) {
            if (ve[rr] <= vs[rr]) continue;
            int64_t u, i, rs, re;
            FN(decode_row)(a, g, rr, &u, &i);
            T *s = St + rr * BK;
            int64_t cs = vs[rr] / VW * VW, ce = FN(round_up)(ve[rr], VW);
            for (int64_t j = cs; j < vs[rr]; j++) s[j] = 0;
            for (int64_t j = ve[rr]; j < ce; j++) s[j] = 0;
            FN(mask_row)(a, &um[rr], u, i, j0, cs, ce, kvalid, s, &rs, &re);
            VT mx = V(set1)(NEG_INF);
            for (int64_t j = rs; j < re; j += VW) mx = V(max)(mx, V(load)(s + j));
            T tmax = V(hmax)(mx);
            /* as in compute_tile: a row with nothing seen yet rescales by
             * exp2(-inf) = 0, and a NaN score (which the max may skip) still
             * reaches l through exp2 */
            T mnew = tmax > mp[rr] ? tmax : mp[rr];
            T msafe = mnew == NEG_INF ? 0 : mnew;
            T alpha = (T)exp2((double)(mp[rr] - msafe));
            mp[rr] = mnew;
            VT ms = V(set1)(msafe), sum = V(zero)();
            for (int64_t j = rs; j < re; j += VW) {
                VT p = V(exp2)(V(sub)(V(load)(s + j), ms));
                V(store)(s + j, p);
                sum = V(add)(sum, p);
            }
            lp[rr] = lp[rr] * alpha + V(hsum)(sum);
            /* O = alpha O + sum_j p_j v_j over the row's keys, 4 vectors of columns at a time */
            T *o = Op + rr * evp;
            int64_t col = 0;
            if (a->v_se == 1) {
                VT va = V(set1)(alpha);
                for (; col + 4 * VW <= Ev; col += 4 * VW) {
                    VT acc0 = V(zero)(), acc1 = V(zero)(), acc2 = V(zero)(), acc3 = V(zero)();
                    for (int64_t j = vs[rr]; j < ve[rr]; j++) {
                        const T *vr = vblk + j * a->v_ss + col;
                        VT pb = V(set1)(s[j]);
                        acc0 = V(fma)(pb, V(load)(vr), acc0);
                        acc1 = V(fma)(pb, V(load)(vr + VW), acc1);
                        acc2 = V(fma)(pb, V(load)(vr + 2 * VW), acc2);
                        acc3 = V(fma)(pb, V(load)(vr + 3 * VW), acc3);
                    }
                    V(store)(o + col, V(fma)(V(load)(o + col), va, acc0));
                    V(store)(o + col + VW, V(fma)(V(load)(o + col + VW), va, acc1));
                    V(store)(o + col + 2 * VW, V(fma)(V(load)(o + col + 2 * VW), va, acc2));
                    V(store)(o + col + 3 * VW, V(fma)(V(load)(o + col + 3 * VW), va, acc3));
                }
                for (; col + VW <= Ev; col += VW) {
                    VT acc = V(zero)();
                    for (int64_t j = vs[rr]; j < ve[rr]; j++)
                        acc = V(fma)(V(set1)(s[j]), V(load)(vblk + j * a->v_ss + col), acc);
                    V(store)(o + col, V(fma)(V(load)(o + col), va, acc));
                }
            }
            for (; col < Ev; col++) {
                T acc = 0;
                for (int64_t j = vs[rr]; j < ve[rr]; j++) acc += s[j] * vblk[j * a->v_ss + col * a->v_se];
                o[col] = o[col] * alpha + acc;
            }
        }
    }
}

/* merge task g: every stacked row of kv unit g, its chunks in order */
static void FN(decode_merge_task)(void *vctx, int64_t g, int tid)
{
    FN(ctx_t) *c = (FN(ctx_t) *)vctx;
    const sa_attn_args *a = c->a;
    const sa_layout *lay = &c->lay;
    const int64_t Ev = a->Ev, evp = lay->evp, nch = lay->dec_chunks;
    const T NEG_INF = -(T)INFINITY;
    const int64_t R = (a->kv_start[g + 1] - a->kv_start[g]) * a->L;
    (void)tid;
    for (int64_t rr = 0; rr < R; rr++) {
        int64_t u, i;
        FN(decode_row)(a, g, rr, &u, &i);
        int64_t Lu = a->q_len ? a->q_len[u] : a->L;
        if (i >= Lu) continue;
        T M = NEG_INF;
        for (int64_t ch = 0; ch < nch; ch++) {
            const T *part = c->packed + (g * nch + ch) * lay->dec_part_elems;
            T m = part[lay->dec_rows * evp + rr];
            if (m > M) M = m;
        }
        T *dst = (T *)a->out + a->out_off[u] + i * a->out_sl;
        T *lse = a->lse ? (T *)a->lse + a->lse_off[u] + i * a->lse_sl : NULL;
        /* sum the chunks into the first chunk's slot (this task owns them all);
         * as in compute_tile, a chunk with nothing seen has m = -inf and weight
         * exp2(-inf) = 0, and a NaN (in l) propagates */
        T Msafe = M == NEG_INF ? 0 : M;
        T *acc = c->packed + g * nch * lay->dec_part_elems + rr * evp;
        T l = 0;
        for (int64_t ch = 0; ch < nch; ch++) {
            const T *part = c->packed + (g * nch + ch) * lay->dec_part_elems;
            T w = (T)exp2((double)(part[lay->dec_rows * evp + rr] - Msafe));
            l += w * part[lay->dec_rows * evp + lay->dec_rows + rr];
            const T *o = part + rr * evp;
            if (ch == 0)
                for (int64_t col = 0; col < Ev; col++) acc[col] = w * o[col];
            else
                for (int64_t col = 0; col < Ev; col++) acc[col] += w * o[col];
        }
        if (l == 0) {                                         /* every key masked: zeros, lse = -inf */
            for (int64_t col = 0; col < Ev; col++) dst[col * a->out_se] = 0;
            if (lse) *lse = NEG_INF;
            continue;
        }
        T inv = (T)1 / l;
        for (int64_t col = 0; col < Ev; col++) dst[col * a->out_se] = acc[col] * inv;
        if (lse) *lse = (T)(0.6931471805599453 * (double)M + log((double)l));
    }
}
