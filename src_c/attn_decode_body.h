/*
 * attn_decode_body.h -- the decode schedule of the forward: few query rows
 * against long K/V. A template of attn_kernels.h (T, VP, VW, BQ, BK, FN, V):
 * it defines attn_decode_<TSUF>_<ISUF>, which dispatch.c calls instead of
 * attn_fwd_* when sa_layout_compute picks SA_SCHEDULE_DECODE. Same problem
 * description (sa_attn_args), mask machinery (attn_mask.h; attn_rows.h's
 * mask_row and online-softmax step) and workspace layout (sa_layout) as the
 * forward.
 *
 * Shapes, per kv unit g (one distinct K/V) with its units u (the GQA query
 * heads, or batch entries, that share it) stacked:
 *   Q [R = units x dec_l, E] (dec_l: L, or the most rows a unit has, max
 *   q_len; R <= SA_DECODE_MAX_ROWS), K [S, E], V [S, Ev]
 *   -> O [R, Ev], lse [R]
 * A decode step is memory-bound: each K/V byte must be read once, at the
 * machine's bandwidth, by every core. So nothing is packed (packing one
 * query row's K/V costs more than attending to it), K and V rows are read
 * where they are, and the keys are split across threads (split-KV):
 *
 *   1. task (g, chunk): keys [chunk * CK, (chunk + 1) * CK) of kv unit g, in
 *      blocks of BK keys, for every stacked row:
 *        a. s = q.k for the row's visible keys of the block (attn_mask.h),
 *           K rows read in place (dense or paged: sa_kv_runs gives the
 *           rows' addresses), each once per block for all rows
 *           (attn_micro.h, decode_dots); bfloat16 / float16 K and V are
 *           read as they are and widened in registers (decode_task_st);
 *           on avx512bf16 (BF16_DECODE_PAIRS), bfloat16 K rows (contiguous, E even)
 *           are not widened: q.k on vdpbf16ps from the stored pairs of q
 *           and k, 16 scores a tile reduced at once (decode_dots_pairs),
 *           times scale * log2(e) after, as the bfloat16 forward's;
 *        b. softcap, ALiBi, attn_mask, -inf outside the row's interval
 *           (mask_row, as in the forward); online softmax (m, l);
 *        c. O = alpha O + P.V, V rows read in place (decode_pv_rows; on
 *           avx512bf16, bfloat16 V: P rounded to bfloat16 as the forward's,
 *           two keys' V rows zipped in registers, decode_pv_pairs);
 *      K/V larger than a core's L2 (lay->dec_prefetch): the next block's
 *      K and V rows prefetched during step a (the hardware prefetchers alone
 *      left a step at about memory time + compute time);
 *      the chunk's (O, m, l) go to its own slot of the workspace;
 *   2. task g: merge the chunks of each row in chunk order (lse_merge.h, the
 *      log-sum-exp merge: M = max m_c, l = sum l_c 2^(m_c - M),
 *      O = sum O_c 2^(m_c - M)), then out = O / l, lse.
 * CK depends on the shapes only (sa_layout_compute), never on the thread
 * count, and the merge order is fixed: results are identical for every
 * number of threads.
 */

typedef struct {
    const sa_attn_args *a;
    const sa_layout *lay;
    T *parts;           /* n_kv x dec_chunks partial results, dec_part_elems each */
    T *scratch;         /* nt x thread_elems                     */
    T qscale;           /* scale * log2(e)                       */
} FN(dctx_t);

/* Row rr of kv unit g's stacked rows (dec_l per unit): its unit and its row in that unit. */
static inline void FN(decode_row)(const sa_attn_args *a, const sa_layout *lay, int64_t g, int64_t rr, int64_t *u,
                                  int64_t *i)
{
    *u = a->kv_units[a->kv_start[g] + rr / lay->dec_l];
    *i = rr % lay->dec_l;
}

/* One kv unit's stacked rows inside a decode task: where their queries and
 * partial result are, and what each row sees (attn_mask.h). */
typedef struct {
    int64_t g, R, c1;                        /* kv unit, its rows, the chunk's end for it */
    T *Qs, *Op, *mp, *lp;                    /* Q [R][E] scaled; O [R][evp], m [R], l [R] */
    int64_t lo[SA_DECODE_MAX_ROWS], hi[SA_DECODE_MAX_ROWS], shi[SA_DECODE_MAX_ROWS];
    sa_unit_mask um[SA_DECODE_MAX_ROWS];
} FN(dunit_t);

/* Start kv unit g's part of chunk ch: its rows' queries (scaled) into Qs,
 * their partial result (zeros, m = -inf) in the chunk's slot of parts.
 * pairs (decode_dots_pairs' scores): the queries as stored instead, E / 2
 * words of two bfloat16 a row, unscaled (qscale multiplies the scores). */
static void FN(decode_unit_init)(FN(dctx_t) *c, int64_t g, int64_t ch, T *Qs, FN(dunit_t) *d, const int pairs)
{
    const sa_attn_args *a = c->a;
    const sa_layout *lay = c->lay;
    const int64_t E = a->E, evp = lay->evp;
    d->g = g;
    d->R = (a->kv_start[g + 1] - a->kv_start[g]) * lay->dec_l;
    d->Qs = Qs;
    d->Op = c->parts + (g * lay->dec_chunks + ch) * lay->dec_part_elems;
    d->mp = d->Op + lay->dec_rows * evp;
    d->lp = d->mp + lay->dec_rows;
    int64_t klo, khi;
    sa_kv_keys(a, g, &klo, &khi);
    int64_t c0 = ch * lay->dec_ck;
    d->c1 = c0 + lay->dec_ck < a->S ? c0 + lay->dec_ck : a->S;
    if (d->c1 > khi + 1) d->c1 = khi + 1;                    /* keys >= every S_u: never read */
    for (int64_t rr = 0; rr < d->R; rr++) {
        int64_t u, i;
        FN(decode_row)(a, lay, g, rr, &u, &i);
        sa_unit_mask_init(a, u, &d->um[rr]);
        d->mp[rr] = -(T)INFINITY;
        d->lp[rr] = 0;
        for (int64_t col = 0; col < evp; col++) d->Op[rr * evp + col] = 0;
        d->lo[rr] = 0;
        d->hi[rr] = d->shi[rr] = -1;                          /* rows past L_u (varlen) see nothing */
        if (i >= d->um[rr].L) {
#if BF16_DECODE_PAIRS
            /* the pairs' tiles compute every row's scores (a row like this one's are
             * never read): zeros, not whatever the scratch held */
            if (pairs)
                for (int64_t e = 0; e < E / 2; e++) ((uint32_t *)(void *)Qs)[rr * (E / 2) + e] = 0;
#endif
            continue;
        }
        sa_row_keys(&d->um[rr], i, &d->lo[rr], &d->hi[rr]);
        d->shi[rr] = sa_sink_hi(&d->um[rr], d->lo[rr], d->hi[rr]);
#if BF16_DECODE_PAIRS
        if (pairs) {
            FN(load_q_pairs)(a->q, a->q_off[u] + i * a->q_sl, a->q_se, E, (uint32_t *)(void *)Qs + rr * (E / 2));
            continue;
        }
#endif
        (void)pairs;
        FN(load_row)(a->q, a->storage, a->q_off[u] + i * a->q_sl, a->q_se, E, Qs + rr * E);
        for (int64_t e = 0; e < E; e++) Qs[rr * E + e] *= c->qscale;
    }
}

/* bytes [0, n) from p into the caches, a line at a time */
/* the K and V rows of keys [j, j1) below npf (rows pfk[j], pfv[j] of kn,
 * vn bytes) into the caches, a line at a time */
SA_INLINE void FN(prefetch_keys)(const char *const *pfk, const char *const *pfv, int64_t j, int64_t j1, int64_t npf,
                                 int64_t kn, int64_t vn)
{
    for (; j < j1 && j < npf; j++) {
        for (int64_t o = 0; o < kn; o += 64) __builtin_prefetch(pfk[j] + o, 0, 3);
        for (int64_t o = 0; o < vn; o += 64) __builtin_prefetch(pfv[j] + o, 0, 3);
    }
}

/* Key block j0 (keys below d->c1) for kv unit d->g's rows: steps a-c of the
 * overview. st: how K and V are read -- SA_STORE_NATIVE (T: the arrays, or
 * rows converted into scratch), or 16-bit storage or int8 (SA_READ_I8)
 * widened in registers (decode_task picks; one specialisation each, st being
 * a constant after inlining). pairs (avx512bf16, bfloat16 st, E even): the
 * scores by decode_dots_pairs on the stored values (d->Qs holds the query
 * words). St, Kc, Vc: the thread's scratch. */
SA_INLINE void FN(decode_block)(const sa_attn_args *a, const sa_layout *lay, FN(dunit_t) *d, int64_t j0, T *St,
                                T *Kc, T *Vc, const int st, const int pairs)
{
    const int64_t E = a->E, Ev = a->Ev, evp = lay->evp, R = d->R, g = d->g;
    const int64_t c1 = d->c1;
    const T *Qs = d->Qs;
    T *Op = d->Op, *mp = d->mp, *lp = d->lp;
    const int64_t *lo = d->lo, *hi = d->hi, *shi = d->shi;
    const sa_unit_mask *um = d->um;
    int64_t vs[SA_DECODE_MAX_ROWS], ve[SA_DECODE_MAX_ROWS];
    const int64_t kvalid = c1 - j0 < BK ? c1 - j0 : BK;  /* the block's keys in this chunk */
    int64_t jmin = BK, jmax = 0;
    for (int64_t rr = 0; rr < R; rr++) {
        sa_block_span(shi[rr], lo[rr], hi[rr], j0, kvalid, &vs[rr], &ve[rr]);
        if (ve[rr] <= vs[rr]) continue;
        if (vs[rr] < jmin) jmin = vs[rr];
        if (ve[rr] > jmax) jmax = ve[rr];
    }
    if (jmax <= jmin) return;                            /* no row sees a key of this block */

    /* K and V rows of the block, in place (st: T, or 16-bit widened in
     * registers), in runs of evenly spaced rows (sa_kv_runs: one run
     * dense, one per page paged; the same values in the same order);
     * 16-bit storage with strided columns is converted first, the rows
     * some row sees, once for all the rows (attn_pack.h) */
    sa_kv_run runs[BK + 1];
    int nrun = sa_kv_runs(a, g, j0, jmin, jmax, runs);
    const void *kb = a->k, *vb = a->v;
    int64_t kss = a->k_ss, kse = a->k_se, vss = a->v_ss, vse = a->v_se;
    const int kvst = sa_kv_read(a);                      /* 16-bit K/V: as q, or under float32 q */
    if (st == SA_STORE_NATIVE && kvst != SA_STORE_NATIVE) {
        for (int ir = 0; ir < nrun; ir++)
            for (int64_t j = runs[ir].j; j < runs[ir + 1].j; j++) {
                FN(load_row)(a->k, kvst, runs[ir].k + j * a->k_ss, a->k_se, E, Kc + j * E);
                FN(load_row)(a->v, kvst, runs[ir].v + j * a->v_ss, a->v_se, Ev, Vc + j * evp);
            }
        kb = Kc, kss = E, kse = 1, vb = Vc, vss = evp, vse = 1;
        nrun = 1;                                         /* one run: the converted rows */
        runs[0].k = runs[0].v = 0;
        runs[0].j = jmin;
        runs[1].j = jmax;
    }

    /* K and V read in place, larger than L2 (lay->dec_prefetch): the next
     * block's rows (in this chunk) are prefetched key by key while this
     * block's scores are computed. The hardware prefetchers alone ran too
     * little ahead: a step took about the time to read K/V plus the time to
     * compute, not the larger of the two (Zen 5, 2 threads, bfloat16 K/V
     * read at 20-25 GB/s before, 30-45 with it). Dense or paged: the rows
     * where sa_kv_runs puts them. The results do not change. */
    const char *pfk[BK], *pfv[BK];
    int64_t npf = 0, pfkn = 0, pfvn = 0;
    if (lay->dec_prefetch && kb == a->k && j0 + BK < c1) {
        const int64_t es = st == SA_STORE_NATIVE ? (int64_t)sizeof(T)
                           : st == SA_STORE_BF16 || st == SA_STORE_F16 ? 2 : 1;
        sa_kv_run nx[BK + 1];
        npf = c1 - j0 - BK < BK ? c1 - j0 - BK : BK;
        int nnx = sa_kv_runs(a, g, j0 + BK, 0, npf, nx);
        for (int ir = 0; ir < nnx; ir++)
            for (int64_t j = nx[ir].j; j < nx[ir + 1].j; j++) {
                pfk[j] = (const char *)kb + (nx[ir].k + j * kss) * es;
                pfv[j] = (const char *)vb + (nx[ir].v + j * vss) * es;
            }
        pfkn = E * es, pfvn = Ev * es;
    }

#if BF16_DECODE_PAIRS
    if (pairs) {
        /* a. scores on vdpbf16ps: 16 keys at a time (from a multiple of 16,
         * so St's rows stay within BK), every row, in tiles of up to 4 rows
         * x 16 / 4 keys (decode_dots_pairs); a key outside [jmin, jmax)
         * reads key jmin's row, its score never read (steps b and c set it
         * to zero or -inf first, as a key a row does not see). Each key's
         * score is the same whatever its tile, page or thread. */
        const uint16_t *kp[BK];
        const int64_t ja = jmin / VW * VW, jb = sa_round_up(jmax, VW), E2 = E / 2;
        for (int ir = 0; ir < nrun; ir++)
            for (int64_t j = runs[ir].j; j < runs[ir + 1].j; j++)
                kp[j] = (const uint16_t *)kb + runs[ir].k + j * kss;
        for (int64_t j = ja; j < jmin; j++) kp[j] = kp[jmin];
        for (int64_t j = jmax; j < jb; j++) kp[j] = kp[jmin];
        const uint32_t *Qw = (const uint32_t *)(const void *)Qs;
        const __m512 qs = _mm512_set1_ps(FN(log2_units)(a->scale));
        for (int64_t j = ja; j < jb; j += VW)
            for (int64_t r0 = 0; r0 < R;) {
                const uint32_t *qr = Qw + r0 * E2;
                T *sr = St + r0 * BK + j;
                /* nr rows x VW / nr keys a tile; the first rows' tiles
                 * prefetch the next block's rows of their keys */
                const int nr = R - r0 >= 4 ? 4 : R - r0 >= 2 ? 2 : 1;
                for (int t = 0; t < VW; t += VW / nr) {
                    if (r0 == 0) FN(prefetch_keys)(pfk, pfv, j + t, j + t + VW / nr, npf, pfkn, pfvn);
                    switch (nr) {       /* a constant in each call */
                    case 4: FN(decode_dots_pairs)(qr, E2, kp + j + t, sr + t, 4, qs); break;
                    case 2: FN(decode_dots_pairs)(qr, E2, kp + j + t, sr + t, 2, qs); break;
                    default: FN(decode_dots_pairs)(qr, E2, kp + j + t, sr + t, 1, qs); break;
                    }
                }
                r0 += nr;
            }
    } else
#endif
    /* a. scores: key by key, each K row read (and widened) once for all the
     * rows: four at a time sharing its loads, then the 1-3 rows left in one
     * call (GQA groups of 3, 5, 6, 7: SmolLM2, Qwen2); strided K or E not
     * whole vectors: row by row, the block in one call */
    if (kse != 1 || E % VW != 0) {
        FN(decode_dots_block_edge)(Qs, E, kb, runs, nrun, kss, kse, (int)R, vs, ve, St, st);
    } else {
        for (int ir = 0; ir < nrun; ir++)
            for (int64_t j = runs[ir].j; j < runs[ir + 1].j; j++) {
                int64_t kr = runs[ir].k + j * kss;
                int64_t r0 = 0;
                FN(prefetch_keys)(pfk, pfv, j, j + 1, npf, pfkn, pfvn);
                for (; r0 + 4 <= R; r0 += 4) FN(decode_dots)(Qs, E, kb, kr, kse, j, r0, 4, vs, ve, St, st);
                switch (R - r0) {           /* n a constant in each call: the loops unrolled */
                case 3: FN(decode_dots)(Qs, E, kb, kr, kse, j, r0, 3, vs, ve, St, st); break;
                case 2: FN(decode_dots)(Qs, E, kb, kr, kse, j, r0, 2, vs, ve, St, st); break;
                case 1: FN(decode_dots)(Qs, E, kb, kr, kse, j, r0, 1, vs, ve, St, st); break;
                default: break;
                }
            }
    }

    /* quantized: the block's key and value scales, gathered once for all the
     * rows (times what the reader leaves out: e4m3fn's 2^8, exact) */
    T ksv[BK], vsv[BK];
    if (sa_read_scaled(st)) {
        const T unit = (T)sa_read_unit(st);
        for (int ir = 0; ir < nrun; ir++)
            for (int64_t j = runs[ir].j; j < runs[ir + 1].j; j++) {
                ksv[j] = (T)a->k_scale[runs[ir].ks + j * a->ks_s] * unit;
                vsv[j] = (T)a->v_scale[runs[ir].vs + j * a->vs_s] * unit;
            }
    }

    /* b. masks and the online softmax, row by row */
    T alph[SA_DECODE_MAX_ROWS];
    for (int64_t rr = 0; rr < R; rr++) {
        alph[rr] = 1;                                 /* a row that sees no key here: O unchanged */
        if (ve[rr] <= vs[rr]) continue;
        int64_t u, i, rs, re;
        FN(decode_row)(a, lay, g, rr, &u, &i);
        T *s = St + rr * BK;
        int64_t cs = vs[rr] / VW * VW, ce = sa_round_up(ve[rr], VW);
        for (int64_t j = cs; j < vs[rr]; j++) s[j] = 0;
        for (int64_t j = ve[rr]; j < ce; j++) s[j] = 0;
        if (sa_read_scaled(st))                        /* quantized K: each key's dot times its scale */
            for (int64_t j = vs[rr]; j < ve[rr]; j++) s[j] *= ksv[j];
        FN(mask_row)(a, &um[rr], u, i, j0, cs, ce, kvalid, s, &rs, &re);
        /* as in compute_tile: a row with nothing seen yet rescales by
         * exp2(-inf) = 0; one row at a time, so exp2 of libm */
        T msafe, mnew = FN(running_max)(mp[rr], FN(row_max)(s, rs, re), &msafe);
        alph[rr] = (T)exp2((double)(mp[rr] - msafe));
        mp[rr] = mnew;
        T sum = FN(exp_row)(s, rs, re, msafe);
        lp[rr] = lp[rr] * alph[rr] + sum;
        if (sa_read_scaled(st))                        /* quantized V: P.V with P times v's scale */
            for (int64_t j = vs[rr]; j < ve[rr]; j++) s[j] *= vsv[j];
    }

#if BF16_DECODE_PAIRS
    if (pairs) {
        /* c. on vdpbf16ps: P rounded to bfloat16 (as the bfloat16 forward's),
         * V rows zipped in pairs of keys (decode_pv_pairs); up to four rows at
         * a time over the union [ulo, uhi) of their keys, as below, in pairs
         * from an even key (so that a key's partner is the same whatever the
         * rows, the chunk or the thread): P = 0 for the keys of the pairs that
         * a row does not see, and no V row read outside [ulo, uhi) */
        const uint16_t *vp[BK];
        for (int ir = 0; ir < nrun; ir++)
            for (int64_t j = runs[ir].j; j < runs[ir + 1].j; j++) vp[j] = (const uint16_t *)vb + runs[ir].v + j * vss;
        if (jmin % 2) vp[jmin - 1] = vp[jmin];                /* never read: a valid address */
        if (jmax % 2) vp[jmax] = vp[jmin];
        for (int64_t r0 = 0; r0 < R; r0 += 4) {
            int64_t n = R - r0 < 4 ? R - r0 : 4, ulo = BK, uhi = 0;
            for (int64_t rr = r0; rr < r0 + n; rr++)
                if (ve[rr] > vs[rr]) {
                    if (vs[rr] < ulo) ulo = vs[rr];
                    if (ve[rr] > uhi) uhi = ve[rr];
                }
            if (uhi <= ulo) continue;
            const int64_t ja = ulo / 2 * 2, jb = (uhi + 1) / 2 * 2;
            for (int64_t rr = r0; rr < r0 + n; rr++) {
                T *s = St + rr * BK;
                int64_t a0 = ve[rr] > vs[rr] ? vs[rr] : jb, b0 = ve[rr] > vs[rr] ? ve[rr] : jb;
                for (int64_t j = ja; j < a0; j++) s[j] = 0;
                for (int64_t j = b0; j < jb; j++) s[j] = 0;
                FN(p_to_bf16)(s, ja, jb);
            }
            T *P0 = St + r0 * BK, *O0 = Op + r0 * evp;
            const T *al0 = alph + r0;
            switch (n) {                /* n a constant in each call */
            case 4: FN(decode_pv_pairs)(P0, 4, ja, jb, ulo, uhi, vp, Ev, O0, evp, al0); break;
            case 3: FN(decode_pv_pairs)(P0, 3, ja, jb, ulo, uhi, vp, Ev, O0, evp, al0); break;
            case 2: FN(decode_pv_pairs)(P0, 2, ja, jb, ulo, uhi, vp, Ev, O0, evp, al0); break;
            default: FN(decode_pv_pairs)(P0, 1, ja, jb, ulo, uhi, vp, Ev, O0, evp, al0); break;
            }
        }
        return;
    }
#endif

    /* c. O = alpha O + P.V, up to four rows at a time over the union of their
     * keys (P = 0 on another row's keys), so that each V row is read once for
     * them (a row's sums are those it would have alone: zeros added exactly) */
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
        T *P0 = St + r0 * BK, *O0 = Op + r0 * evp;
        const T *al0 = alph + r0;
        switch (n) {                    /* n a constant in each call */
        case 4: FN(decode_pv_rows)(P0, 4, ulo, uhi, vb, runs, nrun, vss, vse, Ev, O0, evp, al0, st); break;
        case 3: FN(decode_pv_rows)(P0, 3, ulo, uhi, vb, runs, nrun, vss, vse, Ev, O0, evp, al0, st); break;
        case 2: FN(decode_pv_rows)(P0, 2, ulo, uhi, vb, runs, nrun, vss, vse, Ev, O0, evp, al0, st); break;
        default: FN(decode_pv_rows)(P0, 1, ulo, uhi, vb, runs, nrun, vss, vse, Ev, O0, evp, al0, st); break;
        }
    }
}

/* decode task t: chunk t % dec_chunks of the kv units of gang t / dec_chunks
 * (lay->dec_gang consecutive kv units: 1, or paged, the kv heads of one
 * sequence, whose rows share the pages: a page's bytes are then read by one
 * task, block after block for its heads, not 1-8 KiB of it by each of
 * dec_gang tasks while the prefetchers fetch the rest for nothing). Each kv
 * unit's computation is the same whichever gang holds it: the bits too. */
SA_INLINE void FN(decode_task_st)(void *vctx, int64_t t, int tid, const int st, const int pairs)
{
    FN(dctx_t) *c = (FN(dctx_t) *)vctx;
    const sa_attn_args *a = c->a;
    const sa_layout *lay = c->lay;
    const int64_t E = a->E, ch = t % lay->dec_chunks, g0 = t / lay->dec_chunks * lay->dec_gang;
    const int64_t gn = a->n_kv - g0 < lay->dec_gang ? a->n_kv - g0 : lay->dec_gang;

    /* the carving of sa_layout_compute, as in compute_tile (R <= BQ rows) */
    T *ws = c->scratch + (int64_t)tid * lay->thread_elems;
    T *St = ws + lay->off_st;                                /* [R][BK] */
    T *Kc = ws + lay->off_conv, *Vc = Kc + BK * E;           /* 16-bit storage: [BK][E], [BK][evp] */
    FN(dunit_t) d[SA_DECODE_MAX_GANG];
    int64_t jend = 0;
    for (int64_t gi = 0; gi < gn; gi++) {                    /* Q: [R][E] per unit (gang: after the rest) */
        FN(decode_unit_init)(c, g0 + gi, ch, gi == 0 ? ws : ws + lay->off_qgang + (gi - 1) * lay->dec_rows * E,
                             &d[gi], pairs);
        if (d[gi].c1 > jend) jend = d[gi].c1;
    }
    for (int64_t j0 = ch * lay->dec_ck / BK * BK; j0 < jend; j0 += BK)
        for (int64_t gi = 0; gi < gn; gi++)
            if (j0 < d[gi].c1) FN(decode_block)(a, lay, &d[gi], j0, St, Kc, Vc, st, pairs);
}

/* One function per way of reading K and V, each decode_task_st with st a
 * constant: inlined into one decode_task they made a 300 KB function, and
 * the int8 decode ran 10 % slower in cache (4 rows a K/V, E128, Sapphire
 * Rapids) than with half that code beside it; apart, each is its own. */
#define SA_DECODE_TASK(name, st, pairs)                                   \
    SA_NOINLINE void FN(name)(void *vctx, int64_t t, int tid)            \
    {                                                                      \
        FN(decode_task_st)(vctx, t, tid, st, pairs);                       \
    }
#if BF16_DECODE_PAIRS
/* avx512bf16: bfloat16 q and K rows of pairs (contiguous, E even), scores on
 * vdpbf16ps; every other decode is the base target's (attn_decode) */
static int FN(decode_reads_pairs)(const sa_attn_args *a)
{
    return a->storage == SA_STORE_BF16 && sa_kv_read(a) == SA_STORE_BF16 && a->k_se == 1 && a->v_se == 1 &&
           a->E % 2 == 0;
}
SA_DECODE_TASK(decode_task, SA_STORE_BF16, 1)
#else
SA_DECODE_TASK(decode_task_native, SA_STORE_NATIVE, 0)
#if STORE16
SA_DECODE_TASK(decode_task_i8, SA_READ_I8, 0)
SA_DECODE_TASK(decode_task_e4m3, SA_READ_E4M3, 0)
SA_DECODE_TASK(decode_task_e5m2, SA_READ_E5M2, 0)
SA_DECODE_TASK(decode_task_bf16, SA_STORE_BF16, 0)
SA_DECODE_TASK(decode_task_f16, SA_STORE_F16, 0)
#endif

static void FN(decode_task)(void *vctx, int64_t t, int tid)
{
#if STORE16
    /* 16-bit K and V with unit column strides: read as they are, widened in
     * registers (half the bytes of float32: decode is bound by them); the
     * same values, and so the same bits, as converting them first; a 16-bit
     * cache under float32 queries alike. Quantized K and V (int8, float8; any
     * strides): read in place too, their scales applied apart */
    const sa_attn_args *a = ((const FN(dctx_t) *)vctx)->a;
    const int rd = sa_kv_read(a);
    switch (rd) {
    case SA_READ_I8: FN(decode_task_i8)(vctx, t, tid); return;
    case SA_READ_E4M3: FN(decode_task_e4m3)(vctx, t, tid); return;
    case SA_READ_E5M2: FN(decode_task_e5m2)(vctx, t, tid); return;
    default: break;
    }
    if (rd != SA_STORE_NATIVE && a->k_se == 1 && a->v_se == 1) {
        if (rd == SA_STORE_BF16)
            FN(decode_task_bf16)(vctx, t, tid);
        else
            FN(decode_task_f16)(vctx, t, tid);
        return;
    }
#endif
    FN(decode_task_native)(vctx, t, tid);
}
#endif
#undef SA_DECODE_TASK

/* merge task g: every stacked row of kv unit g, its chunks in order, summed
 * into the first chunk's slot (this task owns them all) */
static void FN(decode_merge_task)(void *vctx, int64_t g, int tid)
{
    FN(dctx_t) *c = (FN(dctx_t) *)vctx;
    const sa_attn_args *a = c->a;
    const sa_layout *lay = c->lay;
    const int64_t evp = lay->evp, nch = lay->dec_chunks, rows = lay->dec_rows;
    const int64_t R = (a->kv_start[g + 1] - a->kv_start[g]) * lay->dec_l;
    const T *parts[SA_DECODE_MAX_CHUNKS];       /* chunk ch: O [rows][evp], m [rows], l [rows] */
    T w[SA_DECODE_MAX_CHUNKS];
    (void)tid;
    for (int64_t ch = 0; ch < nch; ch++) parts[ch] = c->parts + (g * nch + ch) * lay->dec_part_elems;
    for (int64_t rr = 0; rr < R; rr++) {
        int64_t u, i;
        FN(decode_row)(a, lay, g, rr, &u, &i);
        int64_t Lu = a->q_len ? a->q_len[u] : a->L;
        if (i >= Lu) continue;
        int64_t off = a->out_off[u] + i * a->out_sl;
        T *lse = a->lse ? (T *)a->lse + a->lse_off[u] + i * a->lse_sl : NULL;
        T *acc = c->parts + g * nch * lay->dec_part_elems + rr * evp;   /* chunk 0's row: summed into */
        T sink2 = a->sink ? (T)(a->sink[u] * SA_LOG2E) : -(T)INFINITY;   /* the sink joins here */
        if (a->storage == SA_STORE_NATIVE) {
            FN(lse_merge_row)(nch, parts, rr * evp, parts, rows * evp + rr, parts, rows * evp + rows + rr, a->Ev, w,
                              acc, (T *)a->out + off, a->out_se, lse, sink2);
        } else {        /* the merged row finished in place, then rounded into out (attn_pack.h) */
            FN(lse_merge_row)(nch, parts, rr * evp, parts, rows * evp + rr, parts, rows * evp + rows + rr, a->Ev, w,
                              acc, acc, 1, lse, sink2);
            FN(store_row)(a->out, a->storage, off, a->out_se, a->Ev, acc, (T)1);
        }
    }
}

int FN(attn_decode)(const sa_attn_args *a, const sa_layout *lay, void *ws)
{
#if BF16_DOT
    /* this target's own decode is bfloat16's scores on pairs (avx512bf16); the
     * rest (odd E, strided or quantized K/V, float32 queries over a bfloat16
     * cache: the same source, the same bits), and every decode where the
     * target has none (neonbf16), runs its base target's */
#if BF16_DECODE_PAIRS
    if (!FN(decode_reads_pairs)(a)) return BF16_BASE(attn_decode)(a, lay, ws);
#else
    return BF16_BASE(attn_decode)(a, lay, ws);
#endif
#endif
    FN(dctx_t) c;
    c.a = a;
    c.lay = lay;
    c.parts = (T *)ws;
    c.scratch = c.parts + lay->packed_elems;
    c.qscale = FN(log2_units)(a->scale);
    int st = sa_run_tasks(lay->tasks, lay->nt, FN(decode_task), &c, a);
    return st != SA_OK ? st : sa_run_tasks(a->n_kv, lay->nt, FN(decode_merge_task), &c, a);
}
