/*
 * attn_bf16dot.h -- bfloat16's own pieces on a bfloat16 dot product (a
 * template of attn_kernels.h, included for the targets with BF16_DOT 1: T
 * float; avx512bf16, VW 16, on vdpbf16ps; neonbf16, VW 4, on BFDOT). Written
 * once on the pair primitives vbh_* of simd_<target>bf16.h; attn_fwd_body.h
 * and attn_bwd_body.h call these instead of the float32 packing and
 * micro-kernels; the rest (masks, online softmax, schedules, output) is the
 * float32 code.
 *
 * vdpbf16ps and BFDOT multiply pairs of bfloat16 and add both products to a
 * float32 lane: acc[i] += a[2i] b[2i] + a[2i+1] b[2i+1] (vbh_dot). So operands are kept in
 * 32-bit words of two bfloat16, paired along the dimension being summed:
 *   Q tile   [BQ][E2] words: (q[2e], q[2e+1]) -- the stored row, E2 = ceil(E/2)
 *   K block  [E2][BK] words: word (e2, j) = (k[j][2e2], k[j][2e2+1])
 *   V block  [BK/2][evp] words: word (jp, c) = (v[2jp][c], v[2jp+1][c])
 *   P row    the block's probabilities rounded to bfloat16 (to nearest even,
 *            as flash attention does) in place, in the first half of the
 *            row's float32 slots: word jp = (p[2jp], p[2jp+1])
 * The backward (attn_bwd_body.h) pairs the same way: Q.K^T as above, dO.V^T
 * with V^T like K; dV = P^T dO and dK = dS^T Q pair along the tile's query
 * rows (P^T, dS^T [rows/2][BK] words, pair_rows_t; Q, dO [rows/2][ep]
 * words, pack_row_pairs); dQ = dS K along keys (dS paired in place like P,
 * K like V). One micro-kernel, mm_pairs, takes every backward product.
 * An odd E or key count is padded with zeros. Scores are the exact products
 * summed in float32 (vdpbf16ps and BFDOT treat subnormal inputs as zero and
 * flush subnormal results: far below what a softmax can see; BFDOT's own
 * rounding of a pair's sum differs in the last bit), times scale*log2(e).
 */

static inline uint32_t FN(word_at)(const void *p)
{
    uint32_t w;
    memcpy(&w, p, sizeof w);
    return w;
}

/* Q row (E values at element off of base, se apart) as E2 words */
static void FN(load_q_pairs)(const void *base, int64_t off, int64_t se, int64_t E, uint32_t *dst)
{
    const uint16_t *s = (const uint16_t *)base + off;
    if (se == 1 && E % 2 == 0) {
        memcpy(dst, s, (size_t)E * sizeof(uint16_t));
        return;
    }
    for (int64_t e2 = 0; e2 < (E + 1) / 2; e2++) {
        uint32_t lo = s[2 * e2 * se], hi = 2 * e2 + 1 < E ? s[(2 * e2 + 1) * se] : 0;
        dst[e2] = lo | hi << 16;
    }
}

/* K block: keys [0, nvalid) at element off of base (rows ss apart, columns se
 * apart) -> [E2][BK] words; keys nvalid .. BK are zero. Rows of E (even)
 * contiguous values an even number apart are rows of E2 words: 16 x 16 word
 * transposes (vf_transpose moves bits, never rounds), then the rest one by one. */
static void FN(pack_k_pairs)(const void *base, int64_t off, int64_t ss, int64_t se, int64_t nvalid, int64_t E,
                             uint32_t *dst)
{
    const uint16_t *src = (const uint16_t *)base + off;
    const int64_t E2 = (E + 1) / 2;
    int64_t jv = 0, cv = 0;
    if (se == 1 && E % 2 == 0 && ss % 2 == 0) {
        jv = nvalid / VW * VW;
        cv = E2 / VW * VW;
        for (int64_t jj = 0; jj < jv; jj += VW)
            for (int64_t c = 0; c < cv; c += VW)
                vf_transpose((const float *)(const void *)(src + jj * ss + 2 * c), ss / 2,
                             (float *)(void *)(dst + c * BK + jj), BK);
    }
    for (int64_t e2 = 0; e2 < E2; e2++) {
        uint32_t *d = dst + e2 * BK;
        for (int64_t jj = e2 < cv ? jv : 0; jj < nvalid; jj++) {
            const uint16_t *row = src + jj * ss;
            uint32_t lo = row[2 * e2 * se], hi = 2 * e2 + 1 < E ? row[(2 * e2 + 1) * se] : 0;
            d[jj] = lo | hi << 16;
        }
        for (int64_t jj = nvalid; jj < BK; jj++) d[jj] = 0;
    }
}

/* Rows in pairs: rows [0, nvalid) at element off of base (rows ss apart,
 * columns se apart) -> [npairs][wpad] words, word (p, c) = (row 2p [c], row
 * 2p+1 [c]); zero past nvalid and ncols: two rows interleaved (each widened
 * to 32 bits, the second shifted up). The forward's V block (npairs BK/2),
 * the backward's K (for dQ), Q and dO (for dK, dV). */
static void FN(pack_row_pairs)(const void *base, int64_t off, int64_t ss, int64_t se, int64_t nvalid, int64_t npairs,
                               int64_t ncols, int64_t wpad, uint32_t *dst)
{
    const uint16_t *src = (const uint16_t *)base + off;
    static const uint16_t zeros[1] = {0};
    for (int64_t jp = 0; jp < npairs; jp++) {
        uint32_t *d = dst + jp * wpad;
        int64_t j = 2 * jp, c = 0;
        const uint16_t *ra = j < nvalid ? src + j * ss : zeros, *rb = j + 1 < nvalid ? src + (j + 1) * ss : zeros;
        int64_t sa = j < nvalid ? se : 0, sb = j + 1 < nvalid ? se : 0;   /* a missing row reads zeros[0] */
        if (sa == 1 && sb == 1)
            for (; c + VW <= ncols; c += VW) vbh_zip(ra + c, rb + c, d + c);
        for (; c < ncols; c++) d[c] = (uint32_t)ra[c * sa] | (uint32_t)rb[c * sb] << 16;
        for (; c < wpad; c++) d[c] = 0;
    }
}

/* V block: keys [0, nvalid) -> [BK/2][evp] words, zero past nvalid and Ev */
static void FN(pack_v_pairs)(const void *base, int64_t off, int64_t ss, int64_t se, int64_t nvalid, int64_t Ev,
                             int64_t evp, uint32_t *dst)
{
    FN(pack_row_pairs)(base, off, ss, se, nvalid, BK / 2, Ev, evp, dst);
}

/* St[MR][nr*VW] = qs * (Qw[MR][E2] . Kw[E2][..]), St rows BK apart */
SA_INLINE void FN(qk_tile_pairs)(const uint32_t *SA_RESTRICT Qw, int64_t E2, const uint32_t *SA_RESTRICT Kw,
                                 T *SA_RESTRICT St, const int nr, VT qs)
{
    VT acc[MR][NRV];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < nr; c++) acc[r][c] = V(zero)();
    for (int64_t e = 0; e < E2; e++) {
        vbh_t kv[NRV];
        for (int c = 0; c < nr; c++) kv[c] = vbh_load(Kw + e * BK + c * VW);
        for (int r = 0; r < MR; r++) {
            vbh_t qb = vbh_set1(Qw[r * E2 + e]);
            for (int c = 0; c < nr; c++) acc[r][c] = vbh_dot(acc[r][c], qb, kv[c]);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < nr; c++) V(store)(St + r * BK + c * VW, V(mul)(acc[r][c], qs));
}

/* scores of a group of MR rows over block keys [c0, c1), whole vectors (as qk_range) */
static inline void FN(qk_range_pairs)(const uint32_t *Qw, int64_t E2, const uint32_t *Kw, T *St, int64_t c0,
                                      int64_t c1, T qscale)
{
    VT qs = V(set1)(qscale);
    while (c0 < c1) {
        if (c0 % KEYS_PER_TILE == 0 && c0 + KEYS_PER_TILE <= c1) {
            FN(qk_tile_pairs)(Qw, E2, Kw + c0, St + c0, NRV, qs);
            c0 += KEYS_PER_TILE;
        } else {
            FN(qk_tile_pairs)(Qw, E2, Kw + c0, St + c0, 1, qs);
            c0 += VW;
        }
    }
}

/* probabilities s[a0 .. b0) (a0 even) rounded to bfloat16 in place: value j
 * to 16-bit slot j of the row (slot j lies in float slot j/2 <= j, read
 * before it is written) */
static inline void FN(p_to_bf16)(T *s, int64_t a0, int64_t b0)
{
    uint16_t *h = (uint16_t *)(void *)s;
    int64_t j = a0;
    for (; j + VW <= b0; j += VW) vbh_store_rne(h + j, V(load)(s + j));
    if (j < b0) vbh_store_rne_n(h + j, s + j, b0 - j);
}

/* O[MR][nv*VW] = alpha[r] O + P[MR] . V over key pairs [jp0, jp1): P rows BK
 * floats apart (their bfloat16 words, p_to_bf16), V rows evp words apart */
SA_INLINE void FN(pv_tile_pairs)(const T *SA_RESTRICT P, int64_t jp0, int64_t jp1, const uint32_t *SA_RESTRICT Vw,
                                 int64_t evp, T *SA_RESTRICT O, const T *SA_RESTRICT alpha, const int nv)
{
    VT acc[MR][NVV];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < nv; c++) acc[r][c] = V(zero)();
    for (int64_t jp = jp0; jp < jp1; jp++) {
        vbh_t vv[NVV];
        for (int c = 0; c < nv; c++) vv[c] = vbh_load(Vw + jp * evp + c * VW);
        for (int r = 0; r < MR; r++) {
            vbh_t pb = vbh_set1(FN(word_at)(P + r * BK + jp));
            for (int c = 0; c < nv; c++) acc[r][c] = vbh_dot(acc[r][c], pb, vv[c]);
        }
    }
    for (int r = 0; r < MR; r++) {
        VT al = V(set1)(alpha[r]);
        for (int c = 0; c < nv; c++)
            V(store)(O + r * evp + c * VW, V(fma)(V(load)(O + r * evp + c * VW), al, acc[r][c]));
    }
}

#if !BF16_AMX               /* avx512amx: P.V on AMX tiles (attn_amx.h) */
static void FN(pv_rows_pairs)(const T *P, int64_t jp0, int64_t jp1, const uint32_t *Vw, int64_t evp, T *O,
                              const T *alpha)
{
    int64_t c0 = 0;
    for (; c0 + NVV * VW <= evp; c0 += NVV * VW) FN(pv_tile_pairs)(P, jp0, jp1, Vw + c0, evp, O + c0, alpha, NVV);
    for (; c0 < evp; c0 += VW) FN(pv_tile_pairs)(P, jp0, jp1, Vw + c0, evp, O + c0, alpha, 1);
}
#endif

/* ---- the backward's (attn_bwd_body.h, BF16_DOT) ----------------------------- */

/* C[BWD_MR][nv*VW] (= or +=) A . B over K2 pairs: A's word (r, k2) at
 * A[r*ars + k2*acs], B rows (k2) bs words apart, C rows crs floats apart.
 * The float32 backward's bwd_mm_tile on bfloat16 pairs; with accumulate the
 * sums start from C, as there. nv and accumulate are constants after inlining. */
SA_INLINE void FN(mm_pairs_tile)(const uint32_t *SA_RESTRICT A, int64_t ars, int64_t acs, int64_t K2,
                                 const uint32_t *SA_RESTRICT B, int64_t bs, T *SA_RESTRICT C, int64_t crs, const int nv,
                                 const int accumulate)
{
    VT acc[BWD_MR][NVV];
    for (int r = 0; r < BWD_MR; r++)
        for (int c = 0; c < nv; c++) acc[r][c] = accumulate ? V(load)(C + r * crs + c * VW) : V(zero)();
    for (int64_t k = 0; k < K2; k++) {
        vbh_t b[NVV];
        for (int c = 0; c < nv; c++) b[c] = vbh_load(B + k * bs + c * VW);
        for (int r = 0; r < BWD_MR; r++) {
            vbh_t av = vbh_set1(A[r * ars + k * acs]);
            for (int c = 0; c < nv; c++) acc[r][c] = vbh_dot(acc[r][c], av, b[c]);
        }
    }
    for (int r = 0; r < BWD_MR; r++)
        for (int c = 0; c < nv; c++) V(store)(C + r * crs + c * VW, acc[r][c]);
}

/* mm_pairs_tile over ncols columns (a multiple of VW) */
static void FN(mm_pairs)(const uint32_t *A, int64_t ars, int64_t acs, int64_t K2, const uint32_t *B, int64_t bs, T *C,
                         int64_t crs, int64_t ncols, int accumulate)
{
    int64_t c0 = 0;
    if (accumulate) {
        for (; c0 + NVV * VW <= ncols; c0 += NVV * VW)
            FN(mm_pairs_tile)(A, ars, acs, K2, B + c0, bs, C + c0, crs, NVV, 1);
        for (; c0 < ncols; c0 += VW) FN(mm_pairs_tile)(A, ars, acs, K2, B + c0, bs, C + c0, crs, 1, 1);
    } else {
        for (; c0 + NVV * VW <= ncols; c0 += NVV * VW)
            FN(mm_pairs_tile)(A, ars, acs, K2, B + c0, bs, C + c0, crs, NVV, 0);
        for (; c0 < ncols; c0 += VW) FN(mm_pairs_tile)(A, ars, acs, K2, B + c0, bs, C + c0, crs, 1, 0);
    }
}

/* X [2 npairs][..] floats (rows BK apart), columns [c0, c1) (whole vectors),
 * rounded to bfloat16 (nearest even) and paired down the rows: dst word
 * (p, j) at dst[p * BK + j] = (X[2p][j], X[2p+1][j]) -- P^T and dS^T as the
 * A operand of dV += P^T dO and dK += dS^T Q (A's word (j, p): ars 1, acs BK). */
static void FN(pair_rows_t)(const T *X, int64_t npairs, int64_t c0, int64_t c1, uint32_t *dst)
{
    for (int64_t p = 0; p < npairs; p++)
        for (int64_t j = c0; j < c1; j += VW)
            vbh_zip_f32(V(load)(X + 2 * p * BK + j), V(load)(X + (2 * p + 1) * BK + j), dst + p * BK + j);
}

/* element i of stored bfloat16 values, widened (exact) */
static inline T FN(bf16_at)(const void *base, int64_t i) { return sa_bf16_to_f32(((const uint16_t *)base)[i]); }

