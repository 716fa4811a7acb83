/*
 * attn_bwd_body.h -- the fused attention backward (FlashAttention-2's
 * algorithm). A template of attn_kernels.h (T, VW, MR, NVV, BQ, BK, FN, V):
 * it defines attn_bwd_<TSUF>_<ISUF>, which dispatch.c calls with the layout
 * sa_bwd_layout_compute made. Same problem description (sa_attn_args), mask
 * machinery (attn_mask.h; attn_rows.h's mask_row: softcap, ALiBi,
 * attn_mask), packing (attn_pack.h) and SIMD layer as the forward.
 *
 * Shapes, per unit u (one batch x head) of kv unit g:
 *   Q [L, E], K [S, E], V [S, Ev], O [L, Ev], lse [L], dO [L, Ev]
 *   -> dQ [L, E] per unit; dK [S, E], dV [S, Ev] per kv unit, summed over
 *      the units that share it (GQA heads, broadcast batch entries).
 * With x = scale q.k (natural units), x' = softcap(x) (or score_mod(x)) + ALiBi + float mask:
 *   P = exp(x' - lse), D = rowsum(dO o O), dP = dO V^T, dX' = P o (dP - D),
 *   dX = dX' (1 - tanh^2(x / softcap)) (or dX' score_mod'(x) where P > 0, or dX'),
 *   dQ = scale dX K,
 *   dK = scale dX^T Q, dV = P^T dO.
 *
 * Passes:
 *   1. task u: D = rowsum(dO o O) (float64 sums), and this unit's dQ
 *      partials zeroed;
 *   2. task (g, chunk c): key blocks [c cb, (c + 1) cb) of kv unit g. Per
 *      block: pack K^T [E][BK] (for S), K [BK][ep] (for dQ) and V^T [Ev][BK]
 *      (for dP); then for every unit of g and every query tile that sees the
 *      block (attn_mask.h: blocks and tiles outside every window skipped):
 *        a. S = Qs K^T in log2 units, masks (mask_row), P = exp2(S - lse2);
 *           (dropout, step b: dP = Z o dO V^T, dS from P, then P o Z for dV)
 *        b. dP = dO V^T; dS = scale P o (dP - D) (o softcap's or score_mod's
 *           derivative);
 *        c. dV_blk += P^T dO, dK_blk += dS^T Q  (the block's rows, in the
 *           thread's scratch: the block belongs to this task alone);
 *        d. dQ_part[u][c] += dS K  (this chunk's own partial of dQ);
 *      then dK, dV of the block are written out;
 *   3. task u: dQ = sum over c of dQ_part[u][c], in chunk order.
 * The chunking (cb, nc) depends on the shapes only (sa_bwd_layout_compute),
 * every sum has a fixed order and no two tasks write the same memory: no
 * atomics, and the results are bit for bit the same for every thread count.
 * Memory: the workspace holds D and the dQ partials (nc x L x E per unit, nc
 * <= 16) plus one thread's tiles; never anything of size L x S.
 */

/* the gradients as stored: bfloat16 (rounded to nearest even, once, here)
 * for BF16_DOT's bfloat16 storage, else T */
#if BF16_DOT
typedef uint16_t FN(grad_t);
#define SA_GRAD_OUT(x) sa_f32_to_bf16(x)
#else
typedef T FN(grad_t);
#define SA_GRAD_OUT(x) (x)
#endif

typedef struct {
    const sa_attn_args *a;
    const sa_bwd_layout *lay;
    T *dbuf;            /* D [n_units][lp]                       */
    T *part;            /* dQ partials [n_units][nc][lp][ep]     */
    T *scratch;         /* nt x thread_elems                     */
    T qscale;           /* scale * log2(e)                       */
    double last_poll;   /* thread 0's last Ctrl-C poll inside a task */
    int stop;           /* set by thread 0 when interrupted: every task returns early */
} FN(bctx_t);

/* ---- pass 1: D = rowsum(dO o O); zero this unit's dQ partials ---------- */
static void FN(bwd_prep_task)(void *vctx, int64_t u, int tid)
{
    FN(bctx_t) *c = (FN(bctx_t) *)vctx;
    const sa_attn_args *a = c->a;
    const sa_bwd_layout *lay = c->lay;
    (void)tid;
    int64_t Lu = a->q_len ? a->q_len[u] : a->L;
    T *D = c->dbuf + u * lay->lp;
#if BF16_DOT
    /* out and dO stored in bfloat16, widened (exactly) */
    const uint16_t *o = (const uint16_t *)a->out + a->out_off[u];
    const uint16_t *d = (const uint16_t *)a->dout + a->out_off[u];
#define SA_BWD_ELEM(p, i) FN(bf16_at)(p, i)
#else
    const T *o = (const T *)a->out + a->out_off[u];
    const T *d = (const T *)a->dout + a->out_off[u];
#define SA_BWD_ELEM(p, i) (p)[i]
#endif
    for (int64_t i = 0; i < lay->lp; i++) {
        double s = 0;
        if (i < Lu)
            for (int64_t e = 0; e < a->Ev; e++)
                s += (double)SA_BWD_ELEM(o, i * a->out_sl + e * a->out_se) *
                     (double)SA_BWD_ELEM(d, i * a->dout_sl + e * a->dout_se);
        D[i] = (T)s;
    }
#undef SA_BWD_ELEM
    T *p = c->part + u * lay->nc * lay->part_elems;
    for (int64_t i = 0; i < lay->nc * lay->part_elems; i++) p[i] = 0;
}

/* ---- pass 2: one (unit, query tile) against one packed key block ------- */
static void FN(bwd_tile)(const FN(bctx_t) *c, int64_t u, const sa_unit_mask *um, int64_t i0, int64_t rows,
                         int64_t tlo, int64_t thi, int64_t tshi, int64_t j0, T *ws, T *dqp)
{
    const sa_attn_args *a = c->a;
    const sa_bwd_layout *lay = c->lay;
    const int64_t E = a->E, Ev = a->Ev, ep = lay->ep, evp = lay->evp;
    const T NEG_INF = -(T)INFINITY;
    T *Kt = ws + lay->off_kt, *Kr = ws + lay->off_kr, *Vt = ws + lay->off_vt;
    T *dKa = ws + lay->off_dk, *dVa = ws + lay->off_dv;
    T *Qs = ws + lay->off_qs, *Qu = ws + lay->off_qu, *dOt = ws + lay->off_do;
    T *St = ws + lay->off_s, *dPt = ws + lay->off_dp, *Raw = ws + lay->off_raw;
    T *lse2 = ws + lay->off_rows, *Dr = lse2 + BQ;

    int64_t kvalid = um->S - j0 < BK ? um->S - j0 : BK;     /* this unit's valid keys of the block */
    int64_t ka, kz;                                         /* the tile's keys of the block (attn_mask.h) */
    sa_block_span(tshi, tlo, thi, j0, kvalid, &ka, &kz);
    if (kz <= ka) return;
    int64_t cs = ka / BWD_KEY_ALIGN * BWD_KEY_ALIGN, ce = sa_round_up(kz, BWD_KEY_ALIGN), nk = ce - cs;
    (void)nk;                                               /* BF16_AMX: the tiles take [cs, ce) */
    int64_t rows_eff = sa_round_up(rows, BWD_MR);

    const T *lse = (const T *)a->lse + a->lse_off[u];
    const T *D = c->dbuf + u * lay->lp;
#if BF16_DOT
    /* bfloat16 pairs (attn_bf16dot_avx512.h), in the float tiles' space:
     *   Qw  [rows][E2]   (q[2e], q[2e+1])            for S   (Qs's space)
     *   Qr  [rows/2][ep] (q[2r][e], q[2r+1][e])      for dK  (Qu's)
     *   dOw [rows][Ev2], dOr [rows/2][evp] likewise  for dP, dV (dOt's, halves)
     * P and dS stay float32 (St, dPt); their bfloat16 transposes (P^T, dS^T)
     * go to Pt, dSt for dV and dK, dS is paired in place for dQ. Padding rows
     * are zero. BF16_AMX (attn_amx.h): Qr and dOr transposed, [ep][BQ/2] and
     * [evp][BQ/2] words, the pairs padded to np16; Qw, dOw whole tiles of 16
     * rows. */
    const int64_t E2 = (E + 1) / 2, Ev2 = (Ev + 1) / 2, R2 = rows_eff / 2;
    uint32_t *Qw = (uint32_t *)(void *)Qs, *Qr = (uint32_t *)(void *)Qu;
    uint32_t *dOw = (uint32_t *)(void *)dOt, *dOr = (uint32_t *)(void *)(dOt + BQ / 2 * evp);
    uint32_t *Pt = (uint32_t *)(void *)(ws + lay->off_pairs), *dSt = Pt + BQ / 2 * BK;
#if BF16_AMX
    const int64_t rows_q = sa_round_up(rows, SA_AMX_ROWS), np16 = sa_round_up(R2, 16);
    const int b7 = E2 % 16 == 0;                /* amx_config(E2): tile 7 a second B */
#else
    const int64_t rows_q = rows_eff;
#endif
    for (int64_t r = 0; r < rows_q; r++) {
        if (r < rows) {
            FN(load_q_pairs)(a->q, a->q_off[u] + (i0 + r) * a->q_sl, a->q_se, E, Qw + r * E2);
            FN(load_q_pairs)(a->dout, a->out_off[u] + (i0 + r) * a->dout_sl, a->dout_se, Ev, dOw + r * Ev2);
            lse2[r] = lse[(i0 + r) * a->lse_sl] * (T)SA_LOG2E;
            Dr[r] = D[i0 + r];
        } else {
            for (int64_t e = 0; e < E2; e++) Qw[r * E2 + e] = 0;
            for (int64_t f = 0; f < Ev2; f++) dOw[r * Ev2 + f] = 0;
            lse2[r] = NEG_INF;
            Dr[r] = 0;
        }
    }
#if BF16_AMX
    FN(pack_pairs_t_amx)(a->q, a->q_off[u] + i0 * a->q_sl, a->q_sl, a->q_se, rows, np16, E, ep, Qr);
    FN(pack_pairs_t_amx)(a->dout, a->out_off[u] + i0 * a->dout_sl, a->dout_sl, a->dout_se, rows, np16, Ev, evp, dOr);

    /* a. scores on tiles of 16 rows (the forward's products: qk_rows_amx), then
     * times qscale; masks, probabilities */
    for (int64_t r0 = 0; r0 < rows_eff; r0 += SA_AMX_ROWS)
        FN(qk_rows_amx)(Qw + r0 * E2, E2, (const uint32_t *)(const void *)Kt, St + r0 * BK, cs, ce,
                        rows_eff - r0 < SA_AMX_ROWS ? rows_eff - r0 : SA_AMX_ROWS, c->qscale);
#else
    FN(pack_row_pairs)(a->q, a->q_off[u] + i0 * a->q_sl, a->q_sl, a->q_se, rows, R2, E, ep, Qr);
    FN(pack_row_pairs)(a->dout, a->out_off[u] + i0 * a->dout_sl, a->dout_sl, a->dout_se, rows, R2, Ev, evp, dOr);

    /* a. scores (the forward's bits: the same products summed in the same order,
     * then times qscale), masks, probabilities */
    for (int64_t r0 = 0; r0 < rows_eff; r0 += BWD_MR)
        FN(mm_pairs)(Qw + r0 * E2, E2, 1, E2, (const uint32_t *)(const void *)Kt + cs, BK, St + r0 * BK + cs, BK, nk, 0);
    {
        VT qs = V(set1)(c->qscale);
        for (int64_t r = 0; r < rows_eff; r++)
            for (int64_t j = cs; j < ce; j += VW) V(store)(St + r * BK + j, V(mul)(V(load)(St + r * BK + j), qs));
    }
#endif
#else
    /* the tile: Q scaled (for S) and as given (for dK), dO, lse in log2 units, D */
    const T *q = (const T *)a->q + a->q_off[u];
    const T *dout = (const T *)a->dout + a->out_off[u];
    for (int64_t r = 0; r < rows_eff; r++) {
        T *qs = Qs + r * ep, *qu = Qu + r * ep, *d = dOt + r * evp;
        int64_t e = 0;
        if (r < rows) {
            const T *src = q + (i0 + r) * a->q_sl;
            for (; e < E; e++) { qu[e] = src[e * a->q_se]; qs[e] = qu[e] * c->qscale; }
            const T *dsrc = dout + (i0 + r) * a->dout_sl;
            for (int64_t f = 0; f < Ev; f++) d[f] = dsrc[f * a->dout_se];
            for (int64_t f = Ev; f < evp; f++) d[f] = 0;
            lse2[r] = lse[(i0 + r) * a->lse_sl] * (T)SA_LOG2E;
            Dr[r] = D[i0 + r];
        } else {
            for (int64_t f = 0; f < evp; f++) d[f] = 0;
            lse2[r] = NEG_INF;
            Dr[r] = 0;
        }
        for (; e < ep; e++) qu[e] = qs[e] = 0;
    }

    /* a. scores, masks, probabilities */
    for (int64_t r0 = 0; r0 < rows_eff; r0 += BWD_MR)
        FN(bwd_mm)(Qs + r0 * ep, ep, 1, E, Kt + cs, BK, St + r0 * BK + cs, BK, nk, 0);
#endif
    if (a->softcap > 0 || a->score_mod)
        for (int64_t r = 0; r < rows_eff; r++)
            for (int64_t j = cs; j < ce; j += VW) V(store)(Raw + r * BK + j, V(load)(St + r * BK + j));
    for (int64_t r = 0; r < rows_eff; r++) {
        T *s = St + r * BK;
        if (lse2[r] == NEG_INF) {                /* padding row, or every key masked: P = 0 */
            FN(fill_zero)(s, cs, ce);
            continue;
        }
        int64_t rs, re;
        FN(mask_row)(a, um, u, i0 + r, j0, cs, ce, kvalid, s, &rs, &re);
        VT l2 = V(set1)(lse2[r]);
        for (int64_t j = rs; j < re; j += VW) V(store)(s + j, V(exp2)(V(sub)(V(load)(s + j), l2)));
    }

    /* b. dP = dO V^T, then dS = scale P o (dP - D) (o softcap's derivative) in place */
#if BF16_AMX
    if (Ev2 % 16 != E2 % 16) FN(amx_config)(Ev2);    /* tiles 6, 7 for Ev2's remainder */
    for (int64_t r0 = 0; r0 < rows_eff; r0 += SA_AMX_ROWS)
        FN(qk_rows_amx)(dOw + r0 * Ev2, Ev2, (const uint32_t *)(const void *)Vt, dPt + r0 * BK, cs, ce, 0, 1);
    if (Ev2 % 16 != E2 % 16) FN(amx_config)(E2);
#elif BF16_DOT
    for (int64_t r0 = 0; r0 < rows_eff; r0 += BWD_MR)
        FN(mm_pairs)(dOw + r0 * Ev2, Ev2, 1, Ev2, (const uint32_t *)(const void *)Vt + cs, BK, dPt + r0 * BK + cs, BK, nk,
                     0);
#else
    for (int64_t r0 = 0; r0 < rows_eff; r0 += BWD_MR)
        FN(bwd_mm)(dOt + r0 * evp, evp, 1, Ev, Vt + cs, BK, dPt + r0 * BK + cs, BK, nk, 0);
#endif
    {
        VT vscale = V(set1)((T)a->scale);
        VT kk = V(set1)(a->softcap > 0 ? FN(softcap_k)(FN(log2_units)(a->softcap)) : (T)0);
        VT one = V(set1)((T)1);
        const int drop = a->dropout_p > 0;
        T z[BK];                                 /* dropout: 1 / (1 - p) kept, 0 dropped */
        T gm[BK];                                /* score_mod: its derivative, 0 where P is */
        for (int64_t r = 0; r < rows_eff; r++) {
            VT dr = V(set1)(Dr[r]);
            if (a->score_mod) {                  /* from the raw score; P = 0 (masked) keeps dS 0 */
                if (r < rows) FN(score_mod_row)(a, u, i0 + r, j0, cs, ce, Raw + r * BK, gm, 1);
                for (int64_t j = cs; j < ce; j++)
                    if (r >= rows || St[r * BK + j] == 0) gm[j] = 0;
            }
            if (drop) {
                if (r < rows) FN(dropout_row)(a, u, i0 + r, j0, cs, ce, z);
                else FN(fill_zero)(z, cs, ce);
            }
            for (int64_t j = cs; j < ce; j += VW) {
                VT p = V(load)(St + r * BK + j), dp = V(load)(dPt + r * BK + j);
                if (drop) {                      /* dP through the kept ones; dV from P o Z */
                    VT zz = V(load)(z + j);
                    dp = V(mul)(dp, zz);
                    V(store)(St + r * BK + j, V(mul)(p, zz));
                }
                VT ds = V(mul)(p, V(sub)(dp, dr));
                if (a->softcap > 0) {          /* tanh(x / softcap) from the raw log2-unit score */
                    VT t = FN(softcap_tanh)(V(load)(Raw + r * BK + j), kk);
                    ds = V(mul)(ds, V(sub)(one, V(mul)(t, t)));
                }
                if (a->score_mod) ds = V(mul)(ds, V(load)(gm + j));
                V(store)(dPt + r * BK + j, V(mul)(ds, vscale));
            }
            /* keys of [cs, ce) outside the tile's [ka, kz): P is 0 there, but K and V may
             * not be finite (keys past this unit's length that another unit sharing
             * the K/V reads): 0 * NaN must not reach dK or dV */
            for (int64_t j = cs; j < ka; j++) dPt[r * BK + j] = 0;
            for (int64_t j = kz; j < ce; j++) dPt[r * BK + j] = 0;
        }
    }

#if BF16_DOT
    /* c. dV_blk += P^T dO, dK_blk += dS^T Q over the keys [cs, ce), on pairs of rows */
    FN(pair_rows_t)(St, R2, cs, ce, Pt);
    FN(pair_rows_t)(dPt, R2, cs, ce, dSt);
#if BF16_AMX
    /* transposed, dV^T += dO^T P and dK^T += Q^T dS: the pairs R2 .. np16 zero */
    for (int64_t p = R2; p < np16; p++)
        for (int64_t j = cs; j < ce; j++) Pt[p * BK + j] = dSt[p * BK + j] = 0;
    FN(mm_t_amx)(dOr, evp, np16, Pt, dVa, cs, ce, b7);
    FN(mm_t_amx)(Qr, ep, np16, dSt, dKa, cs, ce, b7);
#else
    for (int64_t jr = cs; jr < ce; jr += BWD_MR) {
        FN(mm_pairs)(Pt + jr, 1, BK, R2, dOr, evp, dVa + jr * evp, evp, evp, 1);
        FN(mm_pairs)(dSt + jr, 1, BK, R2, Qr, ep, dKa + jr * ep, ep, ep, 1);
    }
#endif
    /* d. this chunk's dQ partial += dS K over the tile's keys [ka, kz) only (K rows
     * outside may be another unit's keys, not finite for this one): the whole
     * key pairs inside on vdpbf16ps (dS rounded to bfloat16 and paired in
     * place), an unpaired key at either end in float32 (first: the pairing
     * overwrites dS) */
    {
        const uint32_t *Kw = (const uint32_t *)(const void *)Kr;      /* [BK/2][ep] key pairs */
        const int64_t pa = (ka + 1) / 2, pb = kz / 2;
        for (int64_t j = ka; j < kz; j++) {
            if (j >= 2 * pa && j < 2 * pb) continue;
            for (int64_t r = 0; r < rows; r++) {
                VT ds = V(set1)(dPt[r * BK + j]);
                T *dq = dqp + (i0 + r) * ep;
                for (int64_t e = 0; e < ep; e += VW)
                    V(store)(dq + e, V(fma)(ds, vbh_half(Kw + j / 2 * ep + e, (int)(j & 1)), V(load)(dq + e)));
            }
        }
        if (pb > pa) {
            for (int64_t r = 0; r < rows_eff; r++) FN(p_to_bf16)(dPt + r * BK, 2 * pa, 2 * pb);
            /* BF16_AMX: tiles of 16 rows on the whole 16-pair steps [wa, wb), the
             * pairs at the ends and rows past the last whole tile on vdpbf16ps */
            int64_t wa = pa, wb = pa, r16 = 0;
#if BF16_AMX
            wa = sa_round_up(pa, 16);
            wb = pb / 16 * 16;
            if (wb > wa) {
                r16 = rows_eff / SA_AMX_ROWS * SA_AMX_ROWS;
                for (int64_t r0 = 0; r0 < r16; r0 += SA_AMX_ROWS)
                    FN(dq_rows_amx)(dPt + r0 * BK, wa, wb, Kw, ep, dqp + (i0 + r0) * ep, b7);
            } else {
                wa = wb = pa;
            }
#endif
            for (int64_t r0 = 0; r0 < rows_eff; r0 += BWD_MR) {
                const uint32_t *dsw = (const uint32_t *)(const void *)(dPt + r0 * BK);
                T *dq = dqp + (i0 + r0) * ep;
                if (r0 >= r16) {
                    FN(mm_pairs)(dsw + pa, BK, 1, pb - pa, Kw + pa * ep, ep, dq, ep, ep, 1);
                    continue;
                }
                if (wa > pa) FN(mm_pairs)(dsw + pa, BK, 1, wa - pa, Kw + pa * ep, ep, dq, ep, ep, 1);
                if (pb > wb) FN(mm_pairs)(dsw + wb, BK, 1, pb - wb, Kw + wb * ep, ep, dq, ep, ep, 1);
            }
        }
    }
    (void)Qs;
#else
    /* c. dV_blk += P^T dO, dK_blk += dS^T Q over the keys [cs, ce) */
    for (int64_t jr = cs; jr < ce; jr += BWD_MR) {
        FN(bwd_mm)(St + jr, 1, BK, rows_eff, dOt, evp, dVa + jr * evp, evp, evp, 1);
        FN(bwd_mm)(dPt + jr, 1, BK, rows_eff, Qu, ep, dKa + jr * ep, ep, ep, 1);
    }
    /* d. this chunk's dQ partial += dS K, over the tile's keys [ka, kz) only (K rows
     * outside may be another unit's keys, not finite for this one) */
    for (int64_t r0 = 0; r0 < rows_eff; r0 += BWD_MR)
        FN(bwd_mm)(dPt + r0 * BK + ka, BK, 1, kz - ka, Kr + ka * ep, ep, dqp + (i0 + r0) * ep, ep, ep, 1);
#endif
}

/* Pack key block j0 of kv unit g (keys below klim; the rest zero): K^T [E][BK],
 * K [BK][ep] and V^T [Ev][BK]. */
static void FN(bwd_pack)(const FN(bctx_t) *c, int64_t g, int64_t j0, int64_t klim, T *ws)
{
    const sa_attn_args *a = c->a;
    const sa_bwd_layout *lay = c->lay;
    int64_t koff = a->kv_k_off[g] + j0 * a->k_ss, voff = a->kv_v_off[g] + j0 * a->v_ss;
    int64_t nvalid = FN(block_keys)(klim, j0);
#if BF16_DOT
    /* bfloat16 pairs: K^T [E2][BK] and V^T [Ev2][BK] (paired along E), K [BK/2][ep] (paired along keys) */
    FN(pack_k_pairs)(a->k, koff, a->k_ss, a->k_se, nvalid, a->E, (uint32_t *)(void *)(ws + lay->off_kt));
    FN(pack_k_pairs)(a->v, voff, a->v_ss, a->v_se, nvalid, a->Ev, (uint32_t *)(void *)(ws + lay->off_vt));
    FN(pack_v_pairs)(a->k, koff, a->k_ss, a->k_se, nvalid, a->E, lay->ep, (uint32_t *)(void *)(ws + lay->off_kr));
    return;
#endif
    FN(pack_rows)(a->k, a->storage, koff, a->k_ss, a->k_se, nvalid, a->E, lay->ep, ws + lay->off_kr);
    FN(pack_t)(a->k, a->storage, koff, a->k_ss, a->k_se, nvalid, a->E, ws + lay->off_kt);
    FN(pack_t)(a->v, a->storage, voff, a->v_ss, a->v_se, nvalid, a->Ev, ws + lay->off_vt);
}

/* task (g, c): key blocks of chunk c of kv unit g, every unit and tile that sees them */
static void FN(bwd_kv_blocks)(void *vctx, int64_t t, int tid)
{
    FN(bctx_t) *c = (FN(bctx_t) *)vctx;
    const sa_attn_args *a = c->a;
    const sa_bwd_layout *lay = c->lay;
    const int64_t E = a->E, Ev = a->Ev, ep = lay->ep, evp = lay->evp;
    T *ws = c->scratch + (int64_t)tid * lay->thread_elems;
    T *dKa = ws + lay->off_dk, *dVa = ws + lay->off_dv;
    int64_t g = t / lay->nc, ch = t % lay->nc;
    int64_t kb0 = ch * lay->cb, kb1 = kb0 + lay->cb < lay->n_kb ? kb0 + lay->cb : lay->n_kb;
    int64_t klo, khi, smax = 0;
    sa_kv_keys(a, g, &klo, &khi);
    for (int64_t idx = a->kv_start[g]; idx < a->kv_start[g + 1]; idx++) {
        int64_t su = a->k_len ? a->k_len[a->kv_units[idx]] : a->S;
        if (su > smax) smax = su;
    }
    FN(grad_t) *dk = (FN(grad_t) *)a->dk + a->dk_off[g];
    FN(grad_t) *dv = (FN(grad_t) *)a->dv + a->dv_off[g];
    for (int64_t kb = kb0; kb < kb1; kb++) {
        int64_t j0 = kb * BK, nrows = smax - j0 < BK ? smax - j0 : BK;
        if (nrows <= 0) break;
        /* a task covers up to L x cb x BK pairs: Ctrl-C is polled between its blocks too */
        int halt;
#ifdef _OPENMP
#pragma omp atomic read
#endif
        halt = c->stop;
        if (halt) return;
        if (tid == 0 && sa_poll_interrupt(a, &c->last_poll)) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            c->stop = 1;
            return;
        }
        int seen = khi >= klo && j0 <= khi && j0 + BK > klo;
        for (int64_t i = 0; i < BK * ep; i++) dKa[i] = 0;
        for (int64_t i = 0; i < BK * evp; i++) dVa[i] = 0;
        if (seen) {
            FN(bwd_pack)(c, g, j0, khi + 1, ws);
            for (int64_t idx = a->kv_start[g]; idx < a->kv_start[g + 1]; idx++) {
                int64_t u = a->kv_units[idx];
                sa_unit_mask um;
                sa_unit_mask_init(a, u, &um);
                T *dqp = c->part + (u * lay->nc + ch) * lay->part_elems;
                for (int64_t i0 = 0; i0 < um.L; i0 += BQ) {
                    int64_t rows = um.L - i0 < BQ ? um.L - i0 : BQ, tlo, thi, tshi, ka, kz;
                    sa_rows_keys2(&um, i0, i0 + rows - 1, &tlo, &thi, &tshi);
                    sa_block_span(tshi, tlo, thi, j0, BK, &ka, &kz);
                    if (kz <= ka) continue;                  /* the tile sees no key of this block */
                    if (sa_bmask_empty(a, u, i0, i0 + rows - 1, j0 + ka, j0 + kz - 1)) continue;
                    FN(bwd_tile)(c, u, &um, i0, rows, tlo, thi, tshi, j0, ws, dqp);
                }
            }
        }
        for (int64_t jj = 0; jj < nrows; jj++) {
#if BF16_AMX           /* dK^T [ep][BK], dV^T [evp][BK] (attn_amx.h's mm_t_amx) */
            for (int64_t e = 0; e < E; e++) dk[(j0 + jj) * a->dk_ss + e * a->dk_se] = SA_GRAD_OUT(dKa[e * BK + jj]);
            for (int64_t e = 0; e < Ev; e++) dv[(j0 + jj) * a->dv_ss + e * a->dv_se] = SA_GRAD_OUT(dVa[e * BK + jj]);
#else
            for (int64_t e = 0; e < E; e++) dk[(j0 + jj) * a->dk_ss + e * a->dk_se] = SA_GRAD_OUT(dKa[jj * ep + e]);
            for (int64_t e = 0; e < Ev; e++) dv[(j0 + jj) * a->dv_ss + e * a->dv_se] = SA_GRAD_OUT(dVa[jj * evp + e]);
#endif
        }
    }
}

static void FN(bwd_kv_task)(void *vctx, int64_t t, int tid)
{
#if BF16_AMX
    FN(amx_config)((((FN(bctx_t) *)vctx)->a->E + 1) / 2);    /* this thread's tiles, released below */
#endif
    FN(bwd_kv_blocks)(vctx, t, tid);
#if BF16_AMX
    _tile_release();
#endif
}

/* ---- pass 3: dQ = sum of the chunks' partials, in chunk order ----------- */
static void FN(bwd_dq_task)(void *vctx, int64_t u, int tid)
{
    FN(bctx_t) *c = (FN(bctx_t) *)vctx;
    const sa_attn_args *a = c->a;
    const sa_bwd_layout *lay = c->lay;
    (void)tid;
    int64_t Lu = a->q_len ? a->q_len[u] : a->L;
    const T *p = c->part + u * lay->nc * lay->part_elems;
    FN(grad_t) *dq = (FN(grad_t) *)a->dq + a->dq_off[u];
    for (int64_t i = 0; i < Lu; i++)
        for (int64_t e = 0; e < a->E; e++) {
            T s = p[i * lay->ep + e];
            for (int64_t ch = 1; ch < lay->nc; ch++) s += p[ch * lay->part_elems + i * lay->ep + e];
            dq[i * a->dq_sl + e * a->dq_se] = SA_GRAD_OUT(s);
        }
}

int FN(attn_bwd)(const sa_attn_args *a, const sa_bwd_layout *lay, void *ws)
{
#if BF16_DOT
    /* this target's own backward is bfloat16's; the rest runs its base target's */
    if (a->storage != SA_STORE_BF16) return BF16_BASE(attn_bwd)(a, lay, ws);
#endif
    FN(bctx_t) c;
    c.a = a;
    c.lay = lay;
    c.dbuf = (T *)ws;
    c.part = c.dbuf + lay->part_off;
    c.scratch = c.dbuf + lay->shared_elems;
    c.qscale = FN(log2_units)(a->scale);
    c.last_poll = 0;
    c.stop = 0;
    int st = sa_run_tasks(a->n_units, lay->nt, FN(bwd_prep_task), &c, a);
    if (st == SA_OK) st = sa_run_tasks(lay->tasks, lay->nt, FN(bwd_kv_task), &c, a);
    if (st == SA_OK && c.stop) st = SA_ERR_INTERRUPTED;
    if (st == SA_OK) st = sa_run_tasks(a->n_units, lay->nt, FN(bwd_dq_task), &c, a);
    return st;
}

#undef SA_GRAD_OUT
