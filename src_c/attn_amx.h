/*
 * attn_amx.h -- the avx512amx target's bfloat16 products on AMX tiles, the
 * forward's (here) and the backward's (below) (a template of attn_kernels.h,
 * included after attn_bf16dot.h where BF16_AMX is 1: T float, VW 16, MR 8;
 * the target's decode is avx512's, dispatch.c).
 *
 * TDPBF16PS multiplies tiles: C[16][16] float += A[16][16 words] . B[16 words
 * rows][16 words], each word two bfloat16 paired along the summed dimension,
 * the products exact and summed in float32 (subnormal inputs and results
 * flushed, as vdpbf16ps). attn_bf16dot.h's pairs are already its operands,
 * nothing is packed anew:
 *   Q.K^T  A = the Q tile's words [rows][E2] (rows E2 words apart), B = the
 *          K block's [E2][BK] words, C = the scores [16][16] (rows BK apart)
 *   P.V    A = P's words [rows][BK/2] (in each score row's first float slots,
 *          p_to_bf16), B = the V block's [BK/2][evp] words, C = the block's
 *          P.V [16][16], added to alpha * O in vectors (as pv_tile_pairs:
 *          the block summed from zero first)
 * A tile is 16 query rows: two MR groups of the forward's tile, over the
 * union of their key ranges. A row's scores outside its group's range are
 * computed and never read (mask_row, the softmax and p_to_bf16 stay inside
 * the group's range); its P words outside its range are set to zero before
 * P.V, so its output sums exactly its own keys. Rows past the tile's last
 * are zero in Q and P.
 *
 * Tiles (one configuration per forward or backward task, amx_config): 0-3 C, 4 A, 5 B,
 * 6 and 7 the last E2 % 16 words of A and rows of B (E2 not a multiple of
 * 16); else 7 is a second B, loaded while 5 is multiplied (1.05-1.08x,
 * E64 / E128 on Sapphire Rapids).
 * AMX state is per thread: each task configures its own tiles and releases
 * them when done. The OS must have granted the process the tile data
 * (dispatch.c asks once, arch_prctl on Linux, before reporting the path).
 */

#ifndef SA_AMX_CFG_DEFINED
#define SA_AMX_CFG_DEFINED
/* LDTILECFG's 64-byte operand: palette 1, then per tile its bytes a row and rows */
typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} sa_amx_cfg;
#define SA_AMX_ROWS 16                 /* query rows (and words) of a tile */
#endif

_Static_assert(BQ % SA_AMX_ROWS == 0 && SA_AMX_ROWS == 2 * MR && VW == 16 && (BK / 2) % SA_AMX_ROWS == 0,
               "AMX tiles: 16 query rows = two MR groups, 16 float columns = VW");

static void FN(amx_config)(int64_t E2)
{
    sa_amx_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 6; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    int rem = (int)(E2 % 16);
    cfg.rows[6] = 16;
    cfg.colsb[6] = (uint16_t)(rem ? rem * 4 : 64);
    cfg.rows[7] = (uint8_t)(rem ? rem : 16);
    cfg.colsb[7] = 64;
    /* GCC does not count LDTILECFG as reading cfg: without this it may drop the
     * stores above (seen at -O1 / -O2: stale bytes in the reserved fields, #GP) */
    __asm__ volatile("" : : "m"(cfg) : "memory");
    _tile_loadconfig(&cfg);
}

/* C tile t += A . B for B at b (rows bs bytes apart): tile numbers must be constants */
#define SA_AMX_DP(t, A, B, b, bs)  \
    do {                           \
        _tile_loadd(B, (b), (bs)); \
        _tile_dpbf16ps(t, A, B);   \
    } while (0)
/* C tiles 0 .. n-1 += A . the n B tiles of 16 columns at b: B in tile 5, or
 * in 5 and b2 (7) by turns, the next one loaded while one is multiplied */
#define SA_AMX_DP4(A, b2, b, bs, n)                               \
    do {                                                          \
        SA_AMX_DP(0, A, 5, (b), (bs));                            \
        if ((n) > 1) SA_AMX_DP(1, A, b2, (b) + 16, (bs));         \
        if ((n) > 2) SA_AMX_DP(2, A, 5, (b) + 32, (bs));          \
        if ((n) > 3) SA_AMX_DP(3, A, b2, (b) + 48, (bs));         \
    } while (0)
/* C tiles 0 .. n-1 from / to 16 columns each at c (rows bs bytes apart), or zeroed */
#define SA_AMX_LOAD4(c, bs, n)                           \
    do {                                                 \
        _tile_loadd(0, (c), (bs));                       \
        if ((n) > 1) _tile_loadd(1, (c) + 16, (bs));     \
        if ((n) > 2) _tile_loadd(2, (c) + 32, (bs));     \
        if ((n) > 3) _tile_loadd(3, (c) + 48, (bs));     \
    } while (0)
#define SA_AMX_STORE4(c, bs, n)                          \
    do {                                                 \
        _tile_stored(0, (c), (bs));                      \
        if ((n) > 1) _tile_stored(1, (c) + 16, (bs));    \
        if ((n) > 2) _tile_stored(2, (c) + 32, (bs));    \
        if ((n) > 3) _tile_stored(3, (c) + 48, (bs));    \
    } while (0)
#define SA_AMX_ZERO4()  \
    do {                \
        _tile_zero(0);  \
        _tile_zero(1);  \
        _tile_zero(2);  \
        _tile_zero(3);  \
    } while (0)

/* St[16][c0 .. c1) = qscale * (Qw[16][E2] . Kw[E2][c0 .. c1)): c0, c1 multiples of 16;
 * the first nrows rows scaled (the others are never read) */
static void FN(qk_rows_amx)(const uint32_t *Qw, int64_t E2, const uint32_t *Kw, T *St, int64_t c0, int64_t c1,
                            int64_t nrows, T qscale)
{
    const int64_t e16 = E2 / 16 * 16;
    const long qs_b = (long)(E2 * 4), ks_b = (long)(BK * 4);
    for (int64_t j = c0; j < c1; j += 64) {
        const int64_t n = (c1 - j) / 16 < 4 ? (c1 - j) / 16 : 4;    /* C tiles of this pass */
        SA_AMX_ZERO4();
        if (e16 == E2)                   /* no remainder: B in tiles 5 and 7 by turns */
            for (int64_t k = 0; k < e16; k += 16) {
                const uint32_t *kb = Kw + k * BK + j;
                _tile_loadd(4, Qw + k, qs_b);
                SA_AMX_DP4(4, 7, kb, ks_b, n);
            }
        else
            for (int64_t k = 0; k < e16; k += 16) {
                const uint32_t *kb = Kw + k * BK + j;
                _tile_loadd(4, Qw + k, qs_b);
                SA_AMX_DP4(4, 5, kb, ks_b, n);
            }
        if (e16 < E2) {                  /* the last E2 % 16 words: tiles 6 and 7 */
            const uint32_t *kb = Kw + e16 * BK + j;
            _tile_loadd(6, Qw + e16, qs_b);
            SA_AMX_DP(0, 6, 7, kb, ks_b);
            if (n > 1) SA_AMX_DP(1, 6, 7, kb + 16, ks_b);
            if (n > 2) SA_AMX_DP(2, 6, 7, kb + 32, ks_b);
            if (n > 3) SA_AMX_DP(3, 6, 7, kb + 48, ks_b);
        }
        SA_AMX_STORE4(St + j, ks_b, n);
    }
    VT qs = V(set1)(qscale);
    for (int64_t r = 0; r < nrows; r++)
        for (int64_t j = c0; j < c1; j += VW) V(store)(St + r * BK + j, V(mul)(V(load)(St + r * BK + j), qs));
}

/* C[16][16 n floats) (rows cs_b bytes apart, n <= 4 tiles) = (accumulate ? C
 * : 0) + A[16] . B over the pairs [w0, w1) (multiples of 16): A's words in
 * rows BK floats apart, B's rows bs words apart; b7: tile 7 is configured
 * whole (E2 % 16 == 0, amx_config), a second B tile. P.V and dQ = dS K. */
static void FN(rows_dot_amx)(const T *A, int64_t w0, int64_t w1, const uint32_t *B, int64_t bs, T *C, long cs_b,
                             int64_t n, int accumulate, int b7)
{
    const long as_b = (long)(BK * 4), bs_b = (long)(bs * 4);
    if (accumulate) SA_AMX_LOAD4(C, cs_b, n);
    else SA_AMX_ZERO4();
    if (b7)                              /* B in tiles 5 and 7 by turns */
        for (int64_t w = w0; w < w1; w += 16) {
            _tile_loadd(4, A + w, as_b);
            SA_AMX_DP4(4, 7, B + w * bs, bs_b, n);
        }
    else
        for (int64_t w = w0; w < w1; w += 16) {
            _tile_loadd(4, A + w, as_b);
            SA_AMX_DP4(4, 5, B + w * bs, bs_b, n);
        }
    SA_AMX_STORE4(C, cs_b, n);
}

/* O[r][..evp) = alpha[r] O + P[r] . V over key pairs [w0, w1) (multiples of
 * 16) for the first nrows of 16 rows: P's words in rows BK floats apart (all
 * 16 rows' words in [w0, w1) set: zero where a row sees no key), V's rows evp
 * words apart, O's rows evp floats apart; b7 as rows_dot_amx */
static void FN(pv_rows_amx)(const T *P, int64_t w0, int64_t w1, const uint32_t *Vw, int64_t evp, T *O,
                            const T *alpha, int64_t nrows, int b7)
{
    T acc[16 * 64];
    for (int64_t c0 = 0; c0 < evp; c0 += 64) {
        const int64_t n = (evp - c0) / 16 < 4 ? (evp - c0) / 16 : 4;
        FN(rows_dot_amx)(P, w0, w1, Vw + c0, evp, acc, 256, n, 0, b7);
        for (int64_t r = 0; r < nrows; r++) {
            VT al = V(set1)(alpha[r]);
            T *o = O + r * evp + c0;
            for (int64_t c = 0; c < n * 16; c += VW) V(store)(o + c, V(fma)(V(load)(o + c), al, V(load)(acc + r * 64 + c)));
        }
    }
}

/* A's 16 rows of P for pv_rows_amx: each row's probabilities [a0, b0) (its
 * group's keys, widened to whole pairs) rounded to bfloat16 words in place,
 * the rest of the words [w0, w1) zero. ga, gb: each group's keys in the
 * block (attn_fwd_body.h), g0 the first group of these rows, nrows of them
 * real (the rest zero). Sets [*w0, *w1), the union rounded to whole tiles
 * (empty: w0 == w1). */
static void FN(p_rows_amx)(T *P, const int64_t *ga, const int64_t *gb, int64_t g0, int64_t nrows, int64_t *w0,
                           int64_t *w1)
{
    int64_t lo = BK / 2, hi = 0;
    for (int64_t g = g0; g < g0 + (nrows + MR - 1) / MR; g++)
        if (gb[g] > ga[g]) {
            int64_t a = (ga[g] & ~(int64_t)1) / 2, b = ((gb[g] + 1) & ~(int64_t)1) / 2;
            lo = a < lo ? a : lo;
            hi = b > hi ? b : hi;
        }
    if (hi <= lo) {
        *w0 = *w1 = 0;
        return;
    }
    lo = lo / 16 * 16;
    hi = sa_round_up(hi, 16);
    for (int64_t r = 0; r < 16; r++) {
        T *s = P + r * BK;
        uint32_t *pw = (uint32_t *)(void *)s;
        int64_t a = 0, b = 0;           /* this row's words */
        if (r < nrows) {
            int64_t g = g0 + r / MR;
            if (gb[g] > ga[g]) {
                a = (ga[g] & ~(int64_t)1) / 2;
                b = ((gb[g] + 1) & ~(int64_t)1) / 2;
                FN(p_to_bf16)(s, 2 * a, 2 * b);
            }
        }
        if (b <= a) a = b = lo;
        for (int64_t w = lo; w < a; w++) pw[w] = 0;
        for (int64_t w = b; w < hi; w++) pw[w] = 0;
    }
    *w0 = lo;
    *w1 = hi;
}

/* step a of compute_tile (attn_fwd_body.h): the scores of the tile's
 * rows_eff rows, 16 at a time over the union of their two groups' whole
 * vectors [cs, ce) */
static void FN(qk_groups_amx)(const uint32_t *Qw, int64_t E2, const uint32_t *Kw, T *St, const int64_t *cs,
                              const int64_t *ce, int64_t rows_eff, T qscale)
{
    for (int64_t r0 = 0; r0 < rows_eff; r0 += SA_AMX_ROWS) {
        int64_t nr = rows_eff - r0 < SA_AMX_ROWS ? rows_eff - r0 : SA_AMX_ROWS, u0 = BK, u1 = 0;
        for (int64_t g = r0 / MR; g < (r0 + nr) / MR; g++)
            if (ce[g] > cs[g]) {
                u0 = cs[g] < u0 ? cs[g] : u0;
                u1 = ce[g] > u1 ? ce[g] : u1;
            }
        if (u1 > u0) FN(qk_rows_amx)(Qw + r0 * E2, E2, Kw, St + r0 * BK, u0, u1, nr, qscale);
    }
}

/* step e: O = alpha O + P.V for the tile's rows_eff rows, 16 at a time */
static void FN(pv_groups_amx)(T *St, const int64_t *ga, const int64_t *gb, int64_t rows_eff, const uint32_t *Vw,
                              int64_t evp, T *Oacc, const T *alpha, int64_t E2)
{
    for (int64_t r0 = 0; r0 < rows_eff; r0 += SA_AMX_ROWS) {
        int64_t nr = rows_eff - r0 < SA_AMX_ROWS ? rows_eff - r0 : SA_AMX_ROWS, w0, w1;
        FN(p_rows_amx)(St + r0 * BK, ga, gb, r0 / MR, nr, &w0, &w1);
        FN(pv_rows_amx)(St + r0 * BK, w0, w1, Vw, evp, Oacc + r0 * evp, alpha + r0, nr, E2 % 16 == 0);
    }
}

/* ---- the backward's (attn_bwd_body.h under BF16_AMX) ------------------------
 * Its five products on tiles, the pairs as attn_bf16dot.h makes them except
 * where AMX needs the summed dimension along A's rows:
 *   S  = Qs K^T, dP = dO V^T   qk_rows_amx (the forward's), A the Q / dO
 *                              tile's words [16 rows][E2 | Ev2]
 *   dV^T += dO^T P, dK^T += Q^T dS   mm_t_amx: A = dO^T / Q^T paired along
 *          query rows [cpad][BQ/2] words (pack_pairs_t_amx), B = P^T / dS^T
 *          as pair_rows_t writes them [BQ/2][BK] words, C = the block's dV^T
 *          [evp][BK] / dK^T [ep][BK] (transposed: written out as such)
 *   dQ += dS K   dq_rows_amx on the whole 16-word steps of the tile's key
 *          pairs (the ends on vdpbf16ps, as attn_bf16dot.h's mm_pairs)
 * The summed dimension of the two transposed products is the tile's query
 * row pairs, padded with zero pairs to whole steps of 16. */

/* rows [0, nvalid) of 16-bit values at element off of base (rows ss apart,
 * columns se apart), paired down the rows and transposed: word (c, p) at
 * dst[c * BQ/2 + p] = (row 2p [c], row 2p+1 [c]), for p < np16 and c < cpad
 * (zero past nvalid rows and ncols columns); 16 x 16 words at a time,
 * pack_row_pairs's then vf_transpose (bits moved, never rounded) */
static void FN(pack_pairs_t_amx)(const void *base, int64_t off, int64_t ss, int64_t se, int64_t nvalid, int64_t np16,
                                 int64_t ncols, int64_t cpad, uint32_t *dst)
{
    uint32_t blk[16 * 16];
    for (int64_t p0 = 0; p0 < np16; p0 += 16)
        for (int64_t c0 = 0; c0 < cpad; c0 += 16) {
            int64_t nc = ncols - c0 < 16 ? (ncols - c0 > 0 ? ncols - c0 : 0) : 16;
            FN(pack_row_pairs)(base, off + 2 * p0 * ss + c0 * se, ss, se, nvalid - 2 * p0, 16, nc, 16, blk);
            vf_transpose((const float *)(const void *)blk, 16, (float *)(void *)(dst + c0 * (BQ / 2) + p0), BQ / 2);
        }
}

/* C [cpad][BK] floats (rows BK apart) += A [cpad][BQ/2] words . B [BQ/2][BK]
 * words over the key columns [cs, ce) and the pairs [0, np16) (multiples of
 * 16); b7 as rows_dot_amx */
static void FN(mm_t_amx)(const uint32_t *A, int64_t cpad, int64_t np16, const uint32_t *B, T *C, int64_t cs, int64_t ce,
                         int b7)
{
    const long as_b = (long)(BQ / 2 * 4), bs_b = (long)(BK * 4);
    for (int64_t r0 = 0; r0 < cpad; r0 += 16)
        for (int64_t j = cs; j < ce; j += 64) {
            const int64_t n = (ce - j) / 16 < 4 ? (ce - j) / 16 : 4;
            T *c = C + r0 * BK + j;
            SA_AMX_LOAD4(c, bs_b, n);
            if (b7)
                for (int64_t k = 0; k < np16; k += 16) {
                    const uint32_t *bb = B + k * BK + j;
                    _tile_loadd(4, A + r0 * (BQ / 2) + k, as_b);
                    SA_AMX_DP4(4, 7, bb, bs_b, n);
                }
            else
                for (int64_t k = 0; k < np16; k += 16) {
                    const uint32_t *bb = B + k * BK + j;
                    _tile_loadd(4, A + r0 * (BQ / 2) + k, as_b);
                    SA_AMX_DP4(4, 5, bb, bs_b, n);
                }
            SA_AMX_STORE4(c, bs_b, n);
        }
}

/* dQ[16][..ep) (rows ep apart) += dS[16] . K over the key pairs [w0, w1)
 * (multiples of 16): dS's words in rows BK floats apart (p_to_bf16 in
 * place), K's pairs [BK/2][ep] words; b7 as rows_dot_amx */
static void FN(dq_rows_amx)(const T *dS, int64_t w0, int64_t w1, const uint32_t *Kw, int64_t ep, T *dQ, int b7)
{
    for (int64_t c0 = 0; c0 < ep; c0 += 64)
        FN(rows_dot_amx)(dS, w0, w1, Kw + c0, ep, dQ + c0, (long)(ep * 4), (ep - c0) / 16 < 4 ? (ep - c0) / 16 : 4, 1,
                         b7);
}
