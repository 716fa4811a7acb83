/*
 * attn_amx.h -- the avx512amx target's bfloat16 forward products on AMX tiles
 * (a template of attn_kernels.h, included after attn_bf16dot.h where
 * BF16_AMX is 1: T float, VW 16, MR 8).
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
 * Tiles (one configuration per compute_tile, amx_config): 0-3 C, 4 A, 5 B,
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
    _tile_loadconfig(&cfg);
}

/* C tile t += A . B for B at b (rows bs bytes apart): tile numbers must be constants */
#define SA_AMX_DP(t, A, B, b, bs)  \
    do {                           \
        _tile_loadd(B, (b), (bs)); \
        _tile_dpbf16ps(t, A, B);   \
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
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        if (e16 == E2)                   /* no remainder: B in tiles 5 and 7 by turns */
            for (int64_t k = 0; k < e16; k += 16) {
                const uint32_t *kb = Kw + k * BK + j;
                _tile_loadd(4, Qw + k, qs_b);
                SA_AMX_DP(0, 4, 5, kb, ks_b);
                if (n > 1) SA_AMX_DP(1, 4, 7, kb + 16, ks_b);
                if (n > 2) SA_AMX_DP(2, 4, 5, kb + 32, ks_b);
                if (n > 3) SA_AMX_DP(3, 4, 7, kb + 48, ks_b);
            }
        else
            for (int64_t k = 0; k < e16; k += 16) {
                const uint32_t *kb = Kw + k * BK + j;
                _tile_loadd(4, Qw + k, qs_b);
                SA_AMX_DP(0, 4, 5, kb, ks_b);
                if (n > 1) SA_AMX_DP(1, 4, 5, kb + 16, ks_b);
                if (n > 2) SA_AMX_DP(2, 4, 5, kb + 32, ks_b);
                if (n > 3) SA_AMX_DP(3, 4, 5, kb + 48, ks_b);
            }
        if (e16 < E2) {                  /* the last E2 % 16 words: tiles 6 and 7 */
            const uint32_t *kb = Kw + e16 * BK + j;
            _tile_loadd(6, Qw + e16, qs_b);
            SA_AMX_DP(0, 6, 7, kb, ks_b);
            if (n > 1) SA_AMX_DP(1, 6, 7, kb + 16, ks_b);
            if (n > 2) SA_AMX_DP(2, 6, 7, kb + 32, ks_b);
            if (n > 3) SA_AMX_DP(3, 6, 7, kb + 48, ks_b);
        }
        _tile_stored(0, St + j, ks_b);
        if (n > 1) _tile_stored(1, St + j + 16, ks_b);
        if (n > 2) _tile_stored(2, St + j + 32, ks_b);
        if (n > 3) _tile_stored(3, St + j + 48, ks_b);
    }
    VT qs = V(set1)(qscale);
    for (int64_t r = 0; r < nrows; r++)
        for (int64_t j = c0; j < c1; j += VW) V(store)(St + r * BK + j, V(mul)(V(load)(St + r * BK + j), qs));
}

/* O[r][..evp) = alpha[r] O + P[r] . V over key pairs [w0, w1) (multiples of
 * 16) for the first nrows of 16 rows: P's words in rows BK floats apart (all
 * 16 rows' words in [w0, w1) set: zero where a row sees no key), V's rows evp
 * words apart, O's rows evp floats apart; b7: tile 7 is configured whole
 * (E2 % 16 == 0, amx_config), a second B tile */
static void FN(pv_rows_amx)(const T *P, int64_t w0, int64_t w1, const uint32_t *Vw, int64_t evp, T *O,
                            const T *alpha, int64_t nrows, int b7)
{
    T acc[16 * 64];
    const long ps_b = (long)(BK * 4), vs_b = (long)(evp * 4);
    for (int64_t c0 = 0; c0 < evp; c0 += 64) {
        const int64_t n = (evp - c0) / 16 < 4 ? (evp - c0) / 16 : 4;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        if (b7)                          /* tile 7 a whole B tile too: B in 5 and 7 by turns */
            for (int64_t w = w0; w < w1; w += 16) {
                const uint32_t *vb = Vw + w * evp + c0;
                _tile_loadd(4, P + w, ps_b);
                SA_AMX_DP(0, 4, 5, vb, vs_b);
                if (n > 1) SA_AMX_DP(1, 4, 7, vb + 16, vs_b);
                if (n > 2) SA_AMX_DP(2, 4, 5, vb + 32, vs_b);
                if (n > 3) SA_AMX_DP(3, 4, 7, vb + 48, vs_b);
            }
        else
            for (int64_t w = w0; w < w1; w += 16) {
                const uint32_t *vb = Vw + w * evp + c0;
                _tile_loadd(4, P + w, ps_b);
                SA_AMX_DP(0, 4, 5, vb, vs_b);
                if (n > 1) SA_AMX_DP(1, 4, 5, vb + 16, vs_b);
                if (n > 2) SA_AMX_DP(2, 4, 5, vb + 32, vs_b);
                if (n > 3) SA_AMX_DP(3, 4, 5, vb + 48, vs_b);
            }
        _tile_stored(0, acc, 256);
        if (n > 1) _tile_stored(1, acc + 16, 256);
        if (n > 2) _tile_stored(2, acc + 32, 256);
        if (n > 3) _tile_stored(3, acc + 48, 256);
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
