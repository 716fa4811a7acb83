/*
 * attn_micro.h -- the register-blocked micro-kernels of the three bodies (a
 * template of attn_kernels.h): each keeps a small block of results in
 * vector registers while it streams one operand.
 *   forward:  qk_range (S = Q.K^T over a group's keys, MR x NRV*VW tiles),
 *             pv_rows  (O = alpha O + P.V, MR x NVV*VW tiles);
 *   decode:   decode_dots (q.k of up to 4 rows sharing each K load; on
 *             avx512bf16, bfloat16 K: decode_dots_pairs, vdpbf16ps),
 *             decode_pv_rows (O = alpha O + P.V, each V load shared; on
 *             avx512bf16, bfloat16 V: decode_pv_pairs, two keys' V rows
 *             zipped in registers, vdpbf16ps);
 *   backward: bwd_mm (C = or += A.B, A possibly transposed, BWD_MR rows).
 */

/* ---- forward ------------------------------------------------------------ */

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

#if !BF16_DOT      /* a bfloat16-dot target multiplies P.V on pairs (attn_bf16dot.h) */
static void FN(pv_rows)(const T *P, int64_t nk, const T *Vb, int64_t vs, int64_t evp, T *O, const T *alpha)
{
    int64_t c0 = 0;
    for (; c0 + NVV * VW <= evp; c0 += NVV * VW) FN(pv_tile)(P, nk, Vb + c0, vs, evp, O + c0, alpha, NVV);
    for (; c0 < evp; c0 += VW) FN(pv_tile)(P, nk, Vb + c0, vs, evp, O + c0, alpha, 1);
}
#endif

/* ---- decode ------------------------------------------------------------- */

/* K and V as the decode schedule reads them, in place: element i of base,
 * read as st (sa_kv_read) -- T, or (float kernels, STORE16) bfloat16 /
 * float16 / int8 / float8 (SA_READ_*: unscaled, e4m3fn x 2^-8) widened in
 * registers, so the bytes read from memory are the narrow ones. st is a
 * constant after inlining: one specialisation per storage. */
SA_INLINE VT FN(vload_st)(const void *base, int64_t i, const int st)
{
#if STORE16
    if (st == SA_STORE_BF16) return V(load_bf16)((const uint16_t *)base + i);
    if (st == SA_STORE_F16) return V(load_f16)((const uint16_t *)base + i);
    if (st == SA_READ_I8) return V(load_i8)((const int8_t *)base + i);
    if (st == SA_READ_E4M3) return V(load_e4m3)((const uint8_t *)base + i);
    if (st == SA_READ_E5M2) return V(load_e5m2)((const uint8_t *)base + i);
#endif
    (void)st;
    return V(load)((const T *)base + i);
}

/* one element as vload_st reads it */
SA_INLINE T FN(elem_st)(const void *base, int64_t i, const int st)
{
    if (st == SA_STORE_NATIVE) return ((const T *)base)[i];
    if (st == SA_READ_I8) return (T)((const int8_t *)base)[i];
    if (st == SA_READ_E4M3) return (T)sa_f16_to_f32(sa_e4m3_f16_bits(((const uint8_t *)base)[i]));
    if (st == SA_READ_E5M2) return (T)sa_e5m2_to_f32(((const uint8_t *)base)[i]);
    uint16_t h = ((const uint16_t *)base)[i];
    return (T)(st == SA_STORE_BF16 ? sa_bf16_to_f32(h) : sa_f16_to_f32(h));
}

/* O[i][0 .. nv*VW) = alpha[i] O[i] + sum_{j in [j0, j1)} P[i][j] V[j][0 .. nv*VW) for the
 * n rows i of a group (P rows BK apart, O rows evp apart; V row j at element
 * runs[r].v + j * vs + col of vb for the run r holding j (sa_kv_runs), stored
 * as st): each V vector loaded once for all the rows, the keys summed in
 * order whatever the runs. n, nv and st are constants after inlining. */
SA_INLINE void FN(decode_pv)(const T *SA_RESTRICT P, const int n, int64_t j0, int64_t j1, const void *vb,
                             const sa_kv_run *runs, int nrun, int64_t vs, int64_t col, T *SA_RESTRICT O,
                             int64_t evp, const T *alpha, const int nv, const int st)
{
    VT acc[4][4];
    for (int i = 0; i < n; i++)
        for (int c = 0; c < nv; c++) acc[i][c] = V(zero)();
    for (int ir = 0; ir < nrun; ir++) {
        int64_t ja = runs[ir].j > j0 ? runs[ir].j : j0, jb = runs[ir + 1].j < j1 ? runs[ir + 1].j : j1;
        const int64_t vo = runs[ir].v + col;
        for (int64_t j = ja; j < jb; j++) {
            int64_t vr = vo + j * vs;
            VT vv[4];
            for (int c = 0; c < nv; c++) vv[c] = FN(vload_st)(vb, vr + c * VW, st);
            for (int i = 0; i < n; i++) {
                VT pb = V(set1)(P[i * BK + j]);
                for (int c = 0; c < nv; c++) acc[i][c] = V(fma)(pb, vv[c], acc[i][c]);
            }
        }
    }
    for (int i = 0; i < n; i++) {
        VT va = V(set1)(alpha[i]);
        for (int c = 0; c < nv; c++)
            V(store)(O + i * evp + c * VW, V(fma)(V(load)(O + i * evp + c * VW), va, acc[i][c]));
    }
}

/* decode_pv_rows' scalar columns from col on (Ev not whole vectors, or
 * strided V), one row at a time: one function per storage whatever n. The
 * column is gathered into T first, so that the sums are the same code for
 * every storage (the compiler may vectorise them; alike, then). */
SA_INLINE void FN(decode_pv_cols_st)(const T *P, int n, int64_t j0, int64_t j1, const void *vb, const sa_kv_run *runs,
                                     int nrun, int64_t vs, int64_t vse, int64_t Ev, int64_t col, T *O, int64_t evp,
                                     const T *alpha, const int st)
{
    T vcol[BK];
    for (; col < Ev; col++) {
        for (int ir = 0; ir < nrun; ir++) {
            int64_t ja = runs[ir].j > j0 ? runs[ir].j : j0, jb = runs[ir + 1].j < j1 ? runs[ir + 1].j : j1;
            for (int64_t j = ja; j < jb; j++) vcol[j] = FN(elem_st)(vb, runs[ir].v + j * vs + col * vse, st);
        }
        for (int i = 0; i < n; i++) {
            T acc = 0;
            for (int64_t j = j0; j < j1; j++) acc += P[i * BK + j] * vcol[j];
            O[i * evp + col] = O[i * evp + col] * alpha[i] + acc;
        }
    }
}

#define SA_PV_COLS(name, st)                                                                                        \
    SA_NOINLINE void FN(name)(const T *P, int n, int64_t j0, int64_t j1, const void *vb, const sa_kv_run *runs,      \
                              int nrun, int64_t vs, int64_t vse, int64_t Ev, int64_t col, T *O, int64_t evp,          \
                              const T *alpha)                                                                         \
    {                                                                                                                 \
        FN(decode_pv_cols_st)(P, n, j0, j1, vb, runs, nrun, vs, vse, Ev, col, O, evp, alpha, st);                    \
    }
SA_PV_COLS(pv_cols_native, SA_STORE_NATIVE)
#if STORE16
SA_PV_COLS(pv_cols_bf16, SA_STORE_BF16)
SA_PV_COLS(pv_cols_f16, SA_STORE_F16)
SA_PV_COLS(pv_cols_i8, SA_READ_I8)
SA_PV_COLS(pv_cols_e4m3, SA_READ_E4M3)
SA_PV_COLS(pv_cols_e5m2, SA_READ_E5M2)
#endif
#undef SA_PV_COLS

/* The same for rows r0 .. r0+n-1 over every column (V columns vse apart):
 * whole micro-tiles, single vectors, then scalar columns (Ev not whole
 * vectors, or strided V: decode_pv_cols_st). */
SA_INLINE void FN(decode_pv_rows)(const T *P, const int n, int64_t j0, int64_t j1, const void *vb,
                                  const sa_kv_run *runs, int nrun, int64_t vs, int64_t vse, int64_t Ev, T *O,
                                  int64_t evp, const T *alpha, const int st)
{
    int64_t col = 0;
    if (vse == 1) {
        for (; col + DEC_NV * VW <= Ev; col += DEC_NV * VW)
            FN(decode_pv)(P, n, j0, j1, vb, runs, nrun, vs, col, O + col, evp, alpha, DEC_NV, st);
        for (; col + VW <= Ev; col += VW)
            FN(decode_pv)(P, n, j0, j1, vb, runs, nrun, vs, col, O + col, evp, alpha, 1, st);
    }
    if (col == Ev) return;
    switch (st) {                                    /* a constant: one call */
#if STORE16
    case SA_STORE_BF16: FN(pv_cols_bf16)(P, n, j0, j1, vb, runs, nrun, vs, vse, Ev, col, O, evp, alpha); return;
    case SA_STORE_F16: FN(pv_cols_f16)(P, n, j0, j1, vb, runs, nrun, vs, vse, Ev, col, O, evp, alpha); return;
    case SA_READ_I8: FN(pv_cols_i8)(P, n, j0, j1, vb, runs, nrun, vs, vse, Ev, col, O, evp, alpha); return;
    case SA_READ_E4M3: FN(pv_cols_e4m3)(P, n, j0, j1, vb, runs, nrun, vs, vse, Ev, col, O, evp, alpha); return;
    case SA_READ_E5M2: FN(pv_cols_e5m2)(P, n, j0, j1, vb, runs, nrun, vs, vse, Ev, col, O, evp, alpha); return;
#endif
    default: FN(pv_cols_native)(P, n, j0, j1, vb, runs, nrun, vs, vse, Ev, col, O, evp, alpha); return;
    }
}

/* decode_dots' other case -- rows that do not all see key j, E not whole
 * vectors: whole vectors, then the elements left (fewer than VW), gathered
 * into T first, so that their sums are the same code for every storage
 * (16-bit K comes here with kse 1). Row by row: one function per storage
 * whatever n (below), not a copy in each of decode_dots' 1-4 row versions. */
SA_INLINE void FN(decode_dots_edge_st)(const T *SA_RESTRICT Qs, int64_t E, const void *kb, int64_t ko, int64_t kse,
                                       int64_t j, int64_t r0, int n, const int64_t *vs, const int64_t *ve,
                                       T *SA_RESTRICT St, const int st)
{
    const int64_t ev = kse == 1 ? E / VW * VW : 0;
    T kt[VW];
    if (kse == 1)
        for (int64_t e = ev; e < E; e++) kt[e - ev] = FN(elem_st)(kb, ko + e, st);
    for (int i = 0; i < n; i++) {
        int64_t r = r0 + i;
        if (j < vs[r] || j >= ve[r]) continue;
        const T *qr = Qs + r * E;
        T dot = 0;
        if (ev > 0) {
            VT acc = V(zero)();
            for (int64_t e = 0; e < ev; e += VW) acc = V(fma)(V(load)(qr + e), FN(vload_st)(kb, ko + e, st), acc);
            dot = V(hsum)(acc);
        }
        if (kse == 1)
            for (int64_t e = ev; e < E; e++) dot += qr[e] * kt[e - ev];
        else
            for (int64_t e = 0; e < E; e++) dot += qr[e] * FN(elem_st)(kb, ko + e * kse, st);
        St[r * BK + j] = dot;
    }
}

/* per storage: one key's rows [r0, r0 + n) (name), or (name_block) every key
 * of the block's runs for all R rows: K with strided columns or E not whole
 * vectors takes this case for every key, one call a block */
#define SA_DOTS_EDGE(name, st)                                                                                     \
    SA_NOINLINE void FN(name)(const T *Qs, int64_t E, const void *kb, int64_t ko, int64_t kse, int64_t j, int64_t r0, \
                              int n, const int64_t *vs, const int64_t *ve, T *St)                                    \
    {                                                                                                                \
        FN(decode_dots_edge_st)(Qs, E, kb, ko, kse, j, r0, n, vs, ve, St, st);                                     \
    }                                                                                                                \
    SA_NOINLINE void FN(name##_block)(const T *Qs, int64_t E, const void *kb, const sa_kv_run *runs, int nrun,      \
                                      int64_t kss, int64_t kse, int R, const int64_t *vs, const int64_t *ve, T *St) \
    {                                                                                                                \
        for (int ir = 0; ir < nrun; ir++)                                                                            \
            for (int64_t j = runs[ir].j; j < runs[ir + 1].j; j++)                                                   \
                FN(decode_dots_edge_st)(Qs, E, kb, runs[ir].k + j * kss, kse, j, 0, R, vs, ve, St, st);             \
    }
SA_DOTS_EDGE(dots_edge_native, SA_STORE_NATIVE)
#if STORE16
SA_DOTS_EDGE(dots_edge_bf16, SA_STORE_BF16)
SA_DOTS_EDGE(dots_edge_f16, SA_STORE_F16)
SA_DOTS_EDGE(dots_edge_i8, SA_READ_I8)
SA_DOTS_EDGE(dots_edge_e4m3, SA_READ_E4M3)
SA_DOTS_EDGE(dots_edge_e5m2, SA_READ_E5M2)
#endif
#undef SA_DOTS_EDGE

/* St[r][j] = Qs[r] . K[j] for the rows r of [r0, r0 + n) (n <= 4) that see key j
 * (vs[r] <= j < ve[r]); K row j at element ko of kb, columns kse apart, stored
 * as st. The rows share each load of K (read from memory once for all of
 * them) and sum independently. */
SA_INLINE void FN(decode_dots)(const T *SA_RESTRICT Qs, int64_t E, const void *kb, int64_t ko, int64_t kse, int64_t j,
                               int64_t r0, const int n, const int64_t *vs, const int64_t *ve, T *SA_RESTRICT St,
                               const int st)
{
    int all = 1;
    for (int i = 0; i < n; i++) all &= vs[r0 + i] <= j && j < ve[r0 + i];
    if (all && kse == 1 && E % VW == 0) {
        VT acc[4];
        for (int i = 0; i < n; i++) acc[i] = V(zero)();
        for (int64_t e = 0; e < E; e += VW) {
            VT kv = FN(vload_st)(kb, ko + e, st);
            for (int i = 0; i < n; i++) acc[i] = V(fma)(V(load)(Qs + (r0 + i) * E + e), kv, acc[i]);
        }
        if (n == 4) {                                /* the four sums at once */
            T o[4];
            V(hsum4)(acc[0], acc[1], acc[2], acc[3], o);
            for (int i = 0; i < 4; i++) St[(r0 + i) * BK + j] = o[i];
        } else {
            for (int i = 0; i < n; i++) St[(r0 + i) * BK + j] = V(hsum)(acc[i]);
        }
        return;
    }
    switch (st) {                                    /* a constant: one call */
#if STORE16
    case SA_STORE_BF16: FN(dots_edge_bf16)(Qs, E, kb, ko, kse, j, r0, n, vs, ve, St); return;
    case SA_STORE_F16: FN(dots_edge_f16)(Qs, E, kb, ko, kse, j, r0, n, vs, ve, St); return;
    case SA_READ_I8: FN(dots_edge_i8)(Qs, E, kb, ko, kse, j, r0, n, vs, ve, St); return;
    case SA_READ_E4M3: FN(dots_edge_e4m3)(Qs, E, kb, ko, kse, j, r0, n, vs, ve, St); return;
    case SA_READ_E5M2: FN(dots_edge_e5m2)(Qs, E, kb, ko, kse, j, r0, n, vs, ve, St); return;
#endif
    default: FN(dots_edge_native)(Qs, E, kb, ko, kse, j, r0, n, vs, ve, St); return;
    }
}

/* The block's scores when no key can take decode_dots' vector case (strided
 * K columns, E not whole vectors): row by row, each row's sums those
 * decode_dots gives it */
SA_INLINE void FN(decode_dots_block_edge)(const T *Qs, int64_t E, const void *kb, const sa_kv_run *runs, int nrun,
                                          int64_t kss, int64_t kse, int R, const int64_t *vs, const int64_t *ve,
                                          T *St, const int st)
{
    switch (st) {                                    /* a constant: one call */
#if STORE16
    case SA_STORE_BF16: FN(dots_edge_bf16_block)(Qs, E, kb, runs, nrun, kss, kse, R, vs, ve, St); return;
    case SA_STORE_F16: FN(dots_edge_f16_block)(Qs, E, kb, runs, nrun, kss, kse, R, vs, ve, St); return;
    case SA_READ_I8: FN(dots_edge_i8_block)(Qs, E, kb, runs, nrun, kss, kse, R, vs, ve, St); return;
    case SA_READ_E4M3: FN(dots_edge_e4m3_block)(Qs, E, kb, runs, nrun, kss, kse, R, vs, ve, St); return;
    case SA_READ_E5M2: FN(dots_edge_e5m2_block)(Qs, E, kb, runs, nrun, kss, kse, R, vs, ve, St); return;
#endif
    default: FN(dots_edge_native_block)(Qs, E, kb, runs, nrun, kss, kse, R, vs, ve, St); return;
    }
}

#if BF16_DECODE_PAIRS
/* bfloat16 K on vdpbf16ps (the avx512bf16 instance: T float, VW 16), in place
 * of decode_dots: q.k on pairs of the stored bfloat16 values, as the forward's
 * qk_tile_pairs (attn_bf16dot_avx512.h) -- exact products summed in float32,
 * times qscale at the end -- but K rows read where they are, 32 values a
 * load, never widened; and a tile's 16 sums (nr rows x 16 / nr keys) reduced
 * at once by hsum16, not one horizontal sum per key. */

/* lane i = the sum of v[i]'s 16 lanes, for i < 16: a transpose-add tree
 * (15 adds, 30 shuffles for the 16 sums); each lane's order of summation is
 * fixed, whatever the other vectors hold */
SA_INLINE __m512 FN(hsum16)(const __m512 *v)
{
    __m512 x[8], w[4], z[2];
    for (int m = 0; m < 8; m++)   /* each 128-bit lane: a0+a2, b0+b2, a1+a3, b1+b3 (a, b = v[2m], v[2m+1]) */
        x[m] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * m], v[2 * m + 1]), _mm512_unpackhi_ps(v[2 * m], v[2 * m + 1]));
    for (int m = 0; m < 4; m++) { /* each 128-bit lane: that lane's sums of v[4m .. 4m+3] */
        __m512d a = _mm512_castps_pd(x[2 * m]), b = _mm512_castps_pd(x[2 * m + 1]);
        w[m] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int m = 0; m < 2; m++)   /* 128-bit lanes: halves of w[2m] (lanes 0+1, 2+3), then of w[2m+1] */
        z[m] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * m], w[2 * m + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(w[2 * m], w[2 * m + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* 32 bfloat16 of a K row as two 32-byte loads: numpy's arrays start 16
 * bytes into a cache line, where every 64-byte load would straddle two
 * (measured on Zen 4: slower once K streams from memory) */
SA_INLINE __m512bh FN(load_k_pairs)(const uint16_t *p)
{
    __m256i lo = _mm256_loadu_si256((const __m256i *)(const void *)p);
    __m256i hi = _mm256_loadu_si256((const __m256i *)(const void *)(p + 16));
    return (__m512bh)_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/* St[i][t] = qs (Qw[i] . K[t]) for nr rows i (1, 2 or 4; St rows BK apart)
 * and 16 / nr keys t: Qw rows of E2 words (the rows' stored bfloat16 q, two
 * a word), key t's row at kp[t] (E2 words, any alignment); past a multiple
 * of 16 words, masked loads (zeros, nothing read past the row). Key after
 * key, each K row read once, in order, for the nr rows (the order of the
 * widening decode_dots: streamed from memory, K then reads as fast). nr is a
 * constant after inlining, the loops over rows and keys unrolled (16
 * accumulators in registers). */
SA_INLINE void FN(decode_dots_pairs)(const uint32_t *SA_RESTRICT Qw, int64_t E2, const uint16_t *const *kp,
                                     T *SA_RESTRICT St, const int nr, __m512 qs)
{
    const int nk = VW / nr;
    const int64_t ev = E2 / VW * VW;
    const __mmask16 tail = (__mmask16)((1u << (E2 - ev)) - 1u);
    __m512 acc[VW];
    for (int x = 0; x < VW; x++) acc[x] = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int t = 0; t < nk; t++) {
        for (int64_t e = 0; e < ev; e += VW) {
            __m512bh kv = FN(load_k_pairs)(kp[t] + 2 * e);
            for (int i = 0; i < nr; i++)
                acc[i * nk + t] = _mm512_dpbf16_ps(
                    acc[i * nk + t], (__m512bh)_mm512_loadu_si512((const void *)(Qw + i * E2 + e)), kv);
        }
        if (ev < E2) {
            __m512bh kv = (__m512bh)_mm512_maskz_loadu_epi32(tail, (const void *)(kp[t] + 2 * ev));
            for (int i = 0; i < nr; i++)
                acc[i * nk + t] = _mm512_dpbf16_ps(
                    acc[i * nk + t], (__m512bh)_mm512_maskz_loadu_epi32(tail, (const void *)(Qw + i * E2 + ev)), kv);
        }
    }
    __m512 s = _mm512_mul_ps(FN(hsum16)(acc), qs);        /* lane i * nk + t: row i, key t */
    if (nr == 1) {
        _mm512_storeu_ps(St, s);
    } else if (nr == 2) {
        _mm256_storeu_ps(St, _mm512_extractf32x8_ps(s, 0));
        _mm256_storeu_ps(St + BK, _mm512_extractf32x8_ps(s, 1));
    } else {
        _mm_storeu_ps(St, _mm512_extractf32x4_ps(s, 0));
        _mm_storeu_ps(St + BK, _mm512_extractf32x4_ps(s, 1));
        _mm_storeu_ps(St + 2 * BK, _mm512_extractf32x4_ps(s, 2));
        _mm_storeu_ps(St + 3 * BK, _mm512_extractf32x4_ps(s, 3));
    }
}

/* P.V of decode_pv_rows on vdpbf16ps, for nc (1, 2) chunks of 32 columns from
 * c0 (cm: each chunk's columns below Ev): O[i] = alpha[i] O[i] + the sum over
 * key pairs (j, j+1), j from ja to jb (both even), of (p[i][j], p[i][j+1]) .
 * (v[j], v[j+1]) for the n rows i (n <= 4), exact products summed in float32
 * as the forward's pv_tile_pairs. P: the rows' bfloat16 words (p_to_bf16), BK
 * floats apart; V row j at vp[j], read only for keys in [ulo, uhi) (zeros for
 * the pair's other key at either end, never a product 0 x Inf). Two keys'
 * rows are zipped in registers (vpunpcklwd/hwd: each 128-bit lane's columns
 * 0-3 and 4-7 in pairs), so the columns of the two accumulators of a chunk
 * are interleaved by 4: put in order once, at the end (vpermt2ps). */
/* one pair of keys (j, j+1) into decode_pv_pairs_cols' accumulators: rows
 * ra, rb (their chunks cm-masked where masked, else whole: no mask) */
SA_INLINE void FN(decode_pv_pair)(__m512 (*acc)[2][2], const T *P, const int n, int64_t j, const uint16_t *ra,
                                  const uint16_t *rb, __mmask32 ma0, __mmask32 ma1, __mmask32 mb0, __mmask32 mb1,
                                  const int nc, const int masked)
{
    __m512bh lo[2], hi[2];
    for (int c = 0; c < nc; c++) {
        __m512i x, y;
        if (masked) {
            x = _mm512_maskz_loadu_epi16(c ? ma1 : ma0, (const void *)(ra + 32 * c));
            y = _mm512_maskz_loadu_epi16(c ? mb1 : mb0, (const void *)(rb + 32 * c));
        } else {
            x = _mm512_loadu_si512((const void *)(ra + 32 * c));
            y = _mm512_loadu_si512((const void *)(rb + 32 * c));
        }
        lo[c] = (__m512bh)_mm512_unpacklo_epi16(x, y);
        hi[c] = (__m512bh)_mm512_unpackhi_epi16(x, y);
    }
    for (int i = 0; i < n; i++) {
        /* the word of keys j, j+1 (float slot j/2 of the row, written as two uint16) */
        uint32_t w;
        memcpy(&w, P + i * BK + j / 2, sizeof w);
        __m512bh pb = (__m512bh)_mm512_set1_epi32((int)w);
        for (int c = 0; c < nc; c++) {
            acc[i][c][0] = _mm512_dpbf16_ps(acc[i][c][0], pb, lo[c]);
            acc[i][c][1] = _mm512_dpbf16_ps(acc[i][c][1], pb, hi[c]);
        }
    }
}

SA_INLINE void FN(decode_pv_pairs_cols)(const T *SA_RESTRICT P, const int n, int64_t ja, int64_t jb, int64_t ulo,
                                        int64_t uhi, const uint16_t *const *vp, int64_t c0, const __mmask32 *cm,
                                        int64_t Ev, T *SA_RESTRICT O, int64_t evp, const T *alpha, const int nc)
{
    __m512 acc[4][2][2];
    for (int i = 0; i < n; i++)
        for (int c = 0; c < nc; c++) acc[i][c][0] = acc[i][c][1] = _mm512_setzero_ps();
    /* the pairs wholly in [ulo, uhi) with whole chunks: plain loads; the
     * pair at either end (one key outside) and a last chunk short of 32
     * columns: masked (nothing read outside, zeros) */
    const int whole = cm[nc - 1] == (__mmask32)0xffffffffu;
    int64_t j = ja;
    if (j < ulo) {
        FN(decode_pv_pair)(acc, P, n, j, vp[j] + c0, vp[j + 1] + c0, 0, 0, cm[0], cm[1], nc, 1);
        j += 2;
    }
    const int64_t jw = uhi / 2 * 2;                               /* pairs below it: both keys seen */
    if (whole)
        for (; j < jw; j += 2) FN(decode_pv_pair)(acc, P, n, j, vp[j] + c0, vp[j + 1] + c0, 0, 0, 0, 0, nc, 0);
    else
        for (; j < jw; j += 2)
            FN(decode_pv_pair)(acc, P, n, j, vp[j] + c0, vp[j + 1] + c0, cm[0], cm[1], cm[0], cm[1], nc, 1);
    if (j < jb)                                                   /* key uhi - 1 alone */
        FN(decode_pv_pair)(acc, P, n, j, vp[j] + c0, vp[j + 1] + c0, cm[0], cm[1], 0, 0, nc, 1);
    /* acc[.][c][0]: columns 0-3, 8-11, 16-19, 24-27 of the chunk; [1]: 4-7, 12-15, ... */
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int i = 0; i < n; i++) {
        __m512 va = _mm512_set1_ps(alpha[i]);
        for (int c = 0; c < nc; c++) {
            T *o = O + i * evp + c0 + 32 * c;
            __m512 s0 = _mm512_permutex2var_ps(acc[i][c][0], first, acc[i][c][1]);
            _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_loadu_ps(o), va, s0));
            if (c0 + 32 * c + 16 < Ev) {                      /* evp: Ev rounded up to 16 */
                __m512 s1 = _mm512_permutex2var_ps(acc[i][c][0], second, acc[i][c][1]);
                _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(_mm512_loadu_ps(o + 16), va, s1));
            }
        }
    }
}

/* decode_pv_pairs_cols over every column, 64 a pass (n x 4 accumulators) */
SA_INLINE void FN(decode_pv_pairs)(const T *P, const int n, int64_t ja, int64_t jb, int64_t ulo, int64_t uhi,
                                   const uint16_t *const *vp, int64_t Ev, T *O, int64_t evp, const T *alpha)
{
    for (int64_t c0 = 0; c0 < Ev; c0 += 64) {
        __mmask32 cm[2];
        for (int c = 0; c < 2; c++) {
            int64_t left = Ev - c0 - 32 * c;
            cm[c] = left >= 32 ? (__mmask32)0xffffffffu : left > 0 ? (__mmask32)((1u << left) - 1u) : 0;
        }
        if (Ev - c0 > 32)
            FN(decode_pv_pairs_cols)(P, n, ja, jb, ulo, uhi, vp, c0, cm, Ev, O, evp, alpha, 2);
        else
            FN(decode_pv_pairs_cols)(P, n, ja, jb, ulo, uhi, vp, c0, cm, Ev, O, evp, alpha, 1);
    }
}
#endif

/* ---- backward ----------------------------------------------------------- */

/* C[BWD_MR][nv*VW] (= or +=) A[BWD_MR][K] . B[K][nv*VW]: A's element (r, k) at
 * A[r*ars + k*acs] (so A may be a transposed view), B rows brs apart, C rows
 * crs apart. nv and accumulate are constants after inlining. */
SA_INLINE void FN(bwd_mm_tile)(const T *SA_RESTRICT A, int64_t ars, int64_t acs, int64_t K,
                               const T *SA_RESTRICT B, int64_t brs, T *SA_RESTRICT C, int64_t crs, const int nv,
                               const int accumulate)
{
    VT acc[BWD_MR][NVV];
    for (int r = 0; r < BWD_MR; r++)
        for (int c = 0; c < nv; c++) acc[r][c] = accumulate ? V(load)(C + r * crs + c * VW) : V(zero)();
    for (int64_t k = 0; k < K; k++) {
        VT b[NVV];
        for (int c = 0; c < nv; c++) b[c] = V(load)(B + k * brs + c * VW);
        for (int r = 0; r < BWD_MR; r++) {
            VT av = V(bcast)(A + r * ars + k * acs);
            for (int c = 0; c < nv; c++) acc[r][c] = V(fma)(av, b[c], acc[r][c]);
        }
    }
    for (int r = 0; r < BWD_MR; r++)
        for (int c = 0; c < nv; c++) V(store)(C + r * crs + c * VW, acc[r][c]);
}

#if !BF16_DOT      /* a bfloat16-dot target's backward: mm_pairs (attn_bf16dot.h) */
/* bwd_mm_tile over ncols columns (a multiple of VW) */
static void FN(bwd_mm)(const T *A, int64_t ars, int64_t acs, int64_t K, const T *B, int64_t brs, T *C, int64_t crs,
                       int64_t ncols, int accumulate)
{
    int64_t c0 = 0;
    if (accumulate) {
        for (; c0 + NVV * VW <= ncols; c0 += NVV * VW)
            FN(bwd_mm_tile)(A, ars, acs, K, B + c0, brs, C + c0, crs, NVV, 1);
        for (; c0 < ncols; c0 += VW) FN(bwd_mm_tile)(A, ars, acs, K, B + c0, brs, C + c0, crs, 1, 1);
    } else {
        for (; c0 + NVV * VW <= ncols; c0 += NVV * VW)
            FN(bwd_mm_tile)(A, ars, acs, K, B + c0, brs, C + c0, crs, NVV, 0);
        for (; c0 < ncols; c0 += VW) FN(bwd_mm_tile)(A, ars, acs, K, B + c0, brs, C + c0, crs, 1, 0);
    }
}
#endif
