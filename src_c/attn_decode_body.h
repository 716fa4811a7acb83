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

/* P.V micro-tile width in vectors: 4 rows x DEC_NV accumulators plus DEC_NV
 * loaded V vectors fit in the register file (32 zmm; 16 ymm) */
#define DEC_NV (VW * (int)sizeof(T) >= 64 ? 4 : 2)

/* O[i][0 .. nv*VW) = alpha[i] O[i] + sum_{j in [j0, j1)} P[i][j] V[j][0 .. nv*VW) for the
 * n rows i of a group (P rows BK apart, O rows evp apart, V rows vs apart): each V
 * vector loaded once for all the rows. n and nv are constants after inlining. */
SA_INLINE void FN(decode_pv)(const T *SA_RESTRICT P, const int n, int64_t j0, int64_t j1, const T *SA_RESTRICT vblk,
                             int64_t vs, T *SA_RESTRICT O, int64_t evp, const T *alpha, const int nv)
{
    VT acc[4][4];
    for (int i = 0; i < n; i++)
        for (int c = 0; c < nv; c++) acc[i][c] = V(zero)();
    for (int64_t j = j0; j < j1; j++) {
        const T *vr = vblk + j * vs;
        VT vv[4];
        for (int c = 0; c < nv; c++) vv[c] = V(load)(vr + c * VW);
        for (int i = 0; i < n; i++) {
            VT pb = V(set1)(P[i * BK + j]);
            for (int c = 0; c < nv; c++) acc[i][c] = V(fma)(pb, vv[c], acc[i][c]);
        }
    }
    for (int i = 0; i < n; i++) {
        VT va = V(set1)(alpha[i]);
        for (int c = 0; c < nv; c++)
            V(store)(O + i * evp + c * VW, V(fma)(V(load)(O + i * evp + c * VW), va, acc[i][c]));
    }
}

/* The same for rows r0 .. r0+n-1 over every column: whole micro-tiles, single
 * vectors, then scalar columns (Ev not whole vectors, or strided V). */
SA_INLINE void FN(decode_pv_rows)(const T *P, const int n, int64_t j0, int64_t j1, const T *vblk, int64_t vs,
                                  int64_t vse, int64_t Ev, T *O, int64_t evp, const T *alpha)
{
    int64_t col = 0;
    if (vse == 1) {
        for (; col + DEC_NV * VW <= Ev; col += DEC_NV * VW)
            FN(decode_pv)(P, n, j0, j1, vblk + col, vs, O + col, evp, alpha, DEC_NV);
        for (; col + VW <= Ev; col += VW) FN(decode_pv)(P, n, j0, j1, vblk + col, vs, O + col, evp, alpha, 1);
    }
    for (; col < Ev; col++)
        for (int i = 0; i < n; i++) {
            T acc = 0;
            for (int64_t j = j0; j < j1; j++) acc += P[i * BK + j] * vblk[j * vs + col * vse];
            O[i * evp + col] = O[i * evp + col] * alpha[i] + acc;
        }
}

/* St[r][j] = Qs[r] . K[j] for the rows r of [r0, r0 + n) (n <= 4) that see key j
 * (vs[r] <= j < ve[r]); kr is K row j. The rows share each load of K (read
 * from memory once for all of them) and sum independently. */
SA_INLINE void FN(decode_dots)(const T *SA_RESTRICT Qs, int64_t E, const T *SA_RESTRICT kr, int64_t kse, int64_t j,
                               int64_t r0, const int n, const int64_t *vs, const int64_t *ve, T *SA_RESTRICT St)
{
    int all = 1;
    for (int i = 0; i < n; i++) all &= vs[r0 + i] <= j && j < ve[r0 + i];
    if (all && kse == 1 && E % VW == 0) {
        VT acc[4];
        for (int i = 0; i < n; i++) acc[i] = V(zero)();
        for (int64_t e = 0; e < E; e += VW) {
            VT kv = V(load)(kr + e);
            for (int i = 0; i < n; i++) acc[i] = V(fma)(V(load)(Qs + (r0 + i) * E + e), kv, acc[i]);
        }
        for (int i = 0; i < n; i++) St[(r0 + i) * BK + j] = V(hsum)(acc[i]);
        return;
    }
    for (int i = 0; i < n; i++) {               /* rows that do not all see j, E not whole vectors */
        int64_t r = r0 + i;
        if (j < vs[r] || j >= ve[r]) continue;
        const T *qr = Qs + r * E;
        T dot = 0;
        int64_t e = 0;
        if (kse == 1 && E >= VW) {
            VT acc = V(zero)();
            for (; e + VW <= E; e += VW) acc = V(fma)(V(load)(qr + e), V(load)(kr + e), acc);
            dot = V(hsum)(acc);
        }
        for (; e < E; e++) dot += qr[e] * kr[e * kse];
        St[r * BK + j] = dot;
    }
}

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

        /* a. scores: key by key, each K row read once for all the rows (four
         * at a time, sharing its loads) */
        const T *kblk = (const T *)a->k + a->kv_k_off[g] + j0 * a->k_ss;
        const T *vblk = (const T *)a->v + a->kv_v_off[g] + j0 * a->v_ss;
        for (int64_t j = jmin; j < jmax; j++) {
            const T *kr = kblk + j * a->k_ss;
            int64_t r0 = 0;
            for (; r0 + 4 <= R; r0 += 4) FN(decode_dots)(Qs, E, kr, a->k_se, j, r0, 4, vs, ve, St);
            for (; r0 < R; r0++) FN(decode_dots)(Qs, E, kr, a->k_se, j, r0, 1, vs, ve, St);
        }

        /* b. masks and the online softmax, row by row */
        T alph[SA_DECODE_MAX_ROWS];
        for (int64_t rr = 0; rr < R; rr++) {
            alph[rr] = 1;                                 /* a row that sees no key here: O unchanged */
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
            alph[rr] = (T)exp2((double)(mp[rr] - msafe));
            mp[rr] = mnew;
            VT ms = V(set1)(msafe), sum = V(zero)();
            for (int64_t j = rs; j < re; j += VW) {
                VT p = V(exp2)(V(sub)(V(load)(s + j), ms));
                V(store)(s + j, p);
                sum = V(add)(sum, p);
            }
            lp[rr] = lp[rr] * alph[rr] + V(hsum)(sum);
        }

        /* c. O = alpha O + P.V, four rows at a time over the union of their keys
         * (P = 0 on another row's keys), so that each V row is read once for them */
        for (int64_t r0 = 0; r0 < R; r0 += 4) {
            int64_t n = R - r0 < 4 ? R - r0 : 4, ulo = BK, uhi = 0;
            for (int64_t rr = r0; rr < r0 + n; rr++)
                if (ve[rr] > vs[rr]) {
                    if (vs[rr] < ulo) ulo = vs[rr];
                    if (ve[rr] > uhi) uhi = ve[rr];
                }
            if (uhi <= ulo) continue;
            for (int64_t rr = r0; rr < r0 + n; rr++) {
                T *s = St + rr * BK;
                int64_t a0 = ve[rr] > vs[rr] ? vs[rr] : uhi, b0 = ve[rr] > vs[rr] ? ve[rr] : uhi;
                for (int64_t j = ulo; j < a0; j++) s[j] = 0;
                for (int64_t j = b0; j < uhi; j++) s[j] = 0;
            }
            if (n == 4) {
                FN(decode_pv_rows)(St + r0 * BK, 4, ulo, uhi, vblk, a->v_ss, a->v_se, Ev, Op + r0 * evp, evp, alph + r0);
            } else {
                for (int64_t rr = r0; rr < r0 + n; rr++)
                    if (ve[rr] > vs[rr])
                        FN(decode_pv_rows)(St + rr * BK, 1, vs[rr], ve[rr], vblk, a->v_ss, a->v_se, Ev, Op + rr * evp,
                                           evp, alph + rr);
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

#undef DEC_NV
