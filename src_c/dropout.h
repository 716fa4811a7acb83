/*
 * dropout.h -- attention dropout's random mask: which probabilities are kept,
 * a pure function of (seed, unit, query row, key), so the forward and the
 * backward draw the same mask, at any thread count, on every schedule and
 * instruction set, and selfattn.reference draws it too (reference._philox_keep).
 *
 * Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
 * 3", SC 2011; Random123's philox4x32): key = (seed low, seed high), counter =
 * (j / 4, i, u, high bits of j, i, u mixed); its four 32-bit outputs decide
 * keys 4 (j / 4) .. + 3. Key j of row i of unit u is kept when its output is
 * >= thr = floor(p 2^32): dropped with probability thr / 2^32 (p to 2^-32).
 * Plain C integer arithmetic: the same bits everywhere by construction.
 */
#ifndef SELFATTN_DROPOUT_H
#define SELFATTN_DROPOUT_H

#include <stdint.h>

#define SA_PHILOX_M0 0xD2511F53u
#define SA_PHILOX_M1 0xCD9E8D57u
#define SA_PHILOX_W0 0x9E3779B9u
#define SA_PHILOX_W1 0xBB67AE85u

/* the 4 outputs for counter c under key (k0, k1): 10 rounds (scalar: compilers
 * do not vectorize its 32x32 -> 64-bit high products on x86) */
static inline void sa_philox4x32(uint32_t c[4], uint32_t k0, uint32_t k1)
{
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)SA_PHILOX_M0 * c[0], p1 = (uint64_t)SA_PHILOX_M1 * c[2];
        uint32_t x0 = (uint32_t)(p1 >> 32) ^ c[1] ^ k0, x1 = (uint32_t)p1;
        uint32_t x2 = (uint32_t)(p0 >> 32) ^ c[3] ^ k1, x3 = (uint32_t)p0;
        c[0] = x0; c[1] = x1; c[2] = x2; c[3] = x3;
        k0 += SA_PHILOX_W0;
        k1 += SA_PHILOX_W1;
    }
}

/* keep[t] = 1 if key j_first + t of row i of unit u is kept, for t < n */
static inline void sa_dropout_keep(uint64_t seed, uint32_t thr, int64_t u, int64_t i, int64_t j_first, int64_t n,
                                   uint8_t *keep)
{
    const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    const uint32_t hi = (uint32_t)((uint64_t)i >> 32) ^ ((uint32_t)((uint64_t)u >> 32) << 16);
    int64_t j = j_first, end = j_first + n;
    while (j < end) {
        int64_t g = j >> 2;
        uint32_t c[4] = {(uint32_t)g, (uint32_t)i, (uint32_t)u, hi ^ ((uint32_t)((uint64_t)g >> 32) << 8)};
        sa_philox4x32(c, k0, k1);
        for (int64_t t = j & 3; t < 4 && j < end; t++, j++) keep[j - j_first] = c[t] >= thr;
    }
}

/* thr of a dropout probability p in [0, 1) */
static inline uint32_t sa_dropout_threshold(double p)
{
    double t = p * 4294967296.0;
    return t <= 0 ? 0u : t >= 4294967295.0 ? 4294967295u : (uint32_t)t;
}

#endif
