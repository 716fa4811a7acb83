/* simd_generic.h -- portable layer (see simd_common.h). No intrinsics,
 * builds everywhere.
 *
 * With GCC or Clang (and unless SA_GENERIC_SCALAR is defined) a vector is a
 * GCC/Clang vector-extension type, __attribute__((vector_size(N))): the
 * compiler maps it to whatever the baseline of the target has (two SSE2 xmm
 * registers per 32-byte vector on x86-64, two NEON q registers on aarch64,
 * scalar code where there is no SIMD at all). Other compilers get a small
 * fixed-size array per "vector" and plain C loops. Both give the same
 * results: the same operations lane by lane, the same exp2 polynomial and
 * rounding, the same NaN rules (max/min: a NaN in either gives the second
 * operand, as x86 maxps/minps). */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "simd_common.h"
#include "half.h"

#if (defined(__GNUC__) || defined(__clang__)) && !defined(SA_GENERIC_SCALAR)
#define SA_GENERIC_VECEXT 1
#else
#define SA_GENERIC_VECEXT 0
#endif

#if SA_GENERIC_VECEXT
/* 16-byte vectors by default: 4 floats / 2 doubles, one SSE2 xmm or one
 * NEON q register. 32-byte vectors (SA_GENERIC_VBYTES=32, split in two by
 * the compiler on SSE2) measured about 2x slower on x86-64 with these tiles:
 * 4 x 2 accumulators of two xmm each no longer fit 16 registers. Returning
 * 32-byte vectors by value would change the ABI without AVX (-Wpsabi);
 * everything here is always_inline. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#ifndef SA_GENERIC_VBYTES
#define SA_GENERIC_VBYTES 16
#endif
#define VF_W (SA_GENERIC_VBYTES / 4)
#define VD_W (SA_GENERIC_VBYTES / 8)
typedef float vf_t __attribute__((vector_size(SA_GENERIC_VBYTES)));
typedef double vd_t __attribute__((vector_size(SA_GENERIC_VBYTES)));
typedef uint32_t sa_vfi_t __attribute__((vector_size(SA_GENERIC_VBYTES)));   /* masks, bits */
typedef uint64_t sa_vdi_t __attribute__((vector_size(SA_GENERIC_VBYTES)));

/* every lane = a, as an initializer list (a loop of lane stores compiles to
 * a chain of shuffles with GCC) */
#if SA_GENERIC_VBYTES == 16
#define SA_VF_SPLAT(a) {a, a, a, a}
#define SA_VD_SPLAT(a) {a, a}
#elif SA_GENERIC_VBYTES == 32
#define SA_VF_SPLAT(a) {a, a, a, a, a, a, a, a}
#define SA_VD_SPLAT(a) {a, a, a, a}
#else
#error "SA_GENERIC_VBYTES must be 16 or 32"
#endif
#define SA_vf_SPLAT SA_VF_SPLAT
#define SA_vd_SPLAT SA_VD_SPLAT

/* P: prefix, T: lane type, I: integer vector of the same lane width */
#define SA_GEN_VOPS(P, T, W, I)                                                                      \
SA_INLINE P##_t P##_zero(void) { P##_t r = {0}; return r; }                                          \
SA_INLINE P##_t P##_set1(T a) { P##_t r = SA_##P##_SPLAT(a); return r; }                             \
SA_INLINE P##_t P##_load(const T *p) { P##_t r; memcpy(&r, p, sizeof r); return r; }                  \
SA_INLINE void P##_store(T *p, P##_t v) { memcpy(p, &v, sizeof v); }                                 \
SA_INLINE P##_t P##_bcast(const T *p) { return P##_set1(*p); }                                        \
SA_INLINE P##_t P##_add(P##_t a, P##_t b) { return a + b; }                                           \
SA_INLINE P##_t P##_sub(P##_t a, P##_t b) { return a - b; }                                           \
SA_INLINE P##_t P##_mul(P##_t a, P##_t b) { return a * b; }                                           \
SA_INLINE P##_t P##_div(P##_t a, P##_t b) { return a / b; }                                           \
SA_INLINE P##_t P##_fma(P##_t a, P##_t b, P##_t c) { return c + a * b; }                              \
/* m ? a : b lane by lane (m all ones or all zeros per lane; C has no vector ?:);                    \
 * a cast between vector types of one size keeps the bits */                                          \
SA_INLINE P##_t P##_select(I m, P##_t a, P##_t b) { return (P##_t)(((I)a & m) | ((I)b & ~m)); }       \
/* a NaN in either gives the second operand (comparisons with NaN are false) */                      \
SA_INLINE P##_t P##_max(P##_t a, P##_t b) { return P##_select((I)(a > b), a, b); }                    \
SA_INLINE P##_t P##_min(P##_t a, P##_t b) { return P##_select((I)(a < b), a, b); }                    \
SA_INLINE T P##_hmax(P##_t v) { T m = v[0]; for (int i = 1; i < W; i++) m = v[i] > m ? v[i] : m; return m; } \
SA_INLINE T P##_hsum(P##_t v) { T s = v[0]; for (int i = 1; i < W; i++) s += v[i]; return s; }       \
SA_INLINE void P##_hsum4(P##_t a, P##_t b, P##_t c, P##_t d, T *o) {                                  \
    o[0] = P##_hsum(a); o[1] = P##_hsum(b); o[2] = P##_hsum(c); o[3] = P##_hsum(d); }                  \
SA_INLINE void P##_transpose(const T *src, int64_t ss, T *dst, int64_t ds) {                          \
    for (int r = 0; r < W; r++) for (int c = 0; c < W; c++) dst[c * ds + r] = src[r * ss + c]; }

SA_GEN_VOPS(vf, float, VF_W, sa_vfi_t)
SA_GEN_VOPS(vd, double, VD_W, sa_vdi_t)

/* The scalar version's steps on whole vectors: clamp to [-127, 128] (NaN
 * kept), n = round-to-nearest(x) by the 1.5*2^23 magic constant, the
 * polynomial in f = x - n, then 2^n built in the exponent field: n + 127 +
 * 2^23 holds n + 127 in its low mantissa bits, shifted up by 23. A NaN gives
 * p = NaN and n is zeroed first, so the result is NaN; x = 128 gives
 * exponent 255 and p = 1: +inf; x <= -127 gives exponent 0: +0. */
SA_INLINE vf_t vf_exp2(vf_t x) {
    x = vf_select((sa_vfi_t)(x <= -127.0f), vf_set1(-127.0f), x);
    x = vf_select((sa_vfi_t)(x >= 128.0f), vf_set1(128.0f), x);
    vf_t big = vf_set1(12582912.0f);
    vf_t n = (x + big) - big;           /* no -ffast-math anywhere: not folded */
    vf_t f = x - n;
    vf_t p = vf_set1(SA_EXP2F_C6);
    p = p * f + SA_EXP2F_C5; p = p * f + SA_EXP2F_C4; p = p * f + SA_EXP2F_C3;
    p = p * f + SA_EXP2F_C2; p = p * f + SA_EXP2F_C1; p = p * f + 1.0f;
    n = vf_select((sa_vfi_t)(n == n), n, vf_zero());
    vf_t biased = n + (127.0f + 8388608.0f);
    return p * (vf_t)((sa_vfi_t)biased << 23);
}
SA_INLINE vd_t vd_exp2(vd_t x) {
    x = vd_select((sa_vdi_t)(x <= -1023.0), vd_set1(-1023.0), x);
    x = vd_select((sa_vdi_t)(x >= 1024.0), vd_set1(1024.0), x);
    vd_t big = vd_set1(6755399441055744.0);
    vd_t n = (x + big) - big;
    vd_t f = x - n;
    vd_t p = vd_set1(SA_EXP2D_C11);
    p = p * f + SA_EXP2D_C10; p = p * f + SA_EXP2D_C9; p = p * f + SA_EXP2D_C8;
    p = p * f + SA_EXP2D_C7; p = p * f + SA_EXP2D_C6; p = p * f + SA_EXP2D_C5;
    p = p * f + SA_EXP2D_C4; p = p * f + SA_EXP2D_C3; p = p * f + SA_EXP2D_C2;
    p = p * f + SA_EXP2D_C1; p = p * f + 1.0;
    n = vd_select((sa_vdi_t)(n == n), n, vd_zero());
    vd_t biased = n + (1023.0 + 4503599627370496.0);
    return p * (vd_t)((sa_vdi_t)biased << 52);
}
/* (-Wpsabi stays off for the rest of attn_generic.c, the only includer: the
 * kernel body's inlined uses of these types warn too) */

#else /* plain arrays: any C compiler */
#define VF_W 8
#define VD_W 4
typedef struct { float x[VF_W]; } vf_t;
typedef struct { double x[VD_W]; } vd_t;

#define SA_GEN_OPS(P, T, W)                                                               \
SA_INLINE P##_t P##_zero(void) { P##_t r; for (int i = 0; i < W; i++) r.x[i] = 0; return r; } \
SA_INLINE P##_t P##_set1(T a) { P##_t r; for (int i = 0; i < W; i++) r.x[i] = a; return r; } \
SA_INLINE P##_t P##_load(const T *p) { P##_t r; memcpy(r.x, p, sizeof r.x); return r; }      \
SA_INLINE void P##_store(T *p, P##_t v) { memcpy(p, v.x, sizeof v.x); }                      \
SA_INLINE P##_t P##_bcast(const T *p) { return P##_set1(*p); }                                \
SA_INLINE P##_t P##_add(P##_t a, P##_t b) { for (int i = 0; i < W; i++) a.x[i] += b.x[i]; return a; } \
SA_INLINE P##_t P##_sub(P##_t a, P##_t b) { for (int i = 0; i < W; i++) a.x[i] -= b.x[i]; return a; } \
SA_INLINE P##_t P##_mul(P##_t a, P##_t b) { for (int i = 0; i < W; i++) a.x[i] *= b.x[i]; return a; } \
SA_INLINE P##_t P##_div(P##_t a, P##_t b) { for (int i = 0; i < W; i++) a.x[i] /= b.x[i]; return a; } \
SA_INLINE P##_t P##_fma(P##_t a, P##_t b, P##_t c) { for (int i = 0; i < W; i++) c.x[i] += a.x[i] * b.x[i]; return c; } \
/* same NaN rule as x86 max/min: a NaN in either gives the second operand */                  \
SA_INLINE P##_t P##_max(P##_t a, P##_t b) { for (int i = 0; i < W; i++) b.x[i] = a.x[i] > b.x[i] ? a.x[i] : b.x[i]; return b; } \
SA_INLINE P##_t P##_min(P##_t a, P##_t b) { for (int i = 0; i < W; i++) b.x[i] = a.x[i] < b.x[i] ? a.x[i] : b.x[i]; return b; } \
SA_INLINE T P##_hmax(P##_t v) { T m = v.x[0]; for (int i = 1; i < W; i++) m = v.x[i] > m ? v.x[i] : m; return m; } \
SA_INLINE T P##_hsum(P##_t v) { T s = v.x[0]; for (int i = 1; i < W; i++) s += v.x[i]; return s; } \
SA_INLINE void P##_hsum4(P##_t a, P##_t b, P##_t c, P##_t d, T *o) {                                  \
    o[0] = P##_hsum(a); o[1] = P##_hsum(b); o[2] = P##_hsum(c); o[3] = P##_hsum(d); }                  \
SA_INLINE void P##_transpose(const T *src, int64_t ss, T *dst, int64_t ds) {                     \
    for (int r = 0; r < W; r++) for (int c = 0; c < W; c++) dst[c * ds + r] = src[r * ss + c]; }

SA_GEN_OPS(vf, float, VF_W)
SA_GEN_OPS(vd, double, VD_W)

/* Rounding to nearest by the 1.5*2^k magic constant (exact for |x| < 2^22
 * resp. 2^51, default rounding mode); no libm call per element. */
SA_INLINE vf_t vf_exp2(vf_t v) {
    vf_t r;
    for (int i = 0; i < VF_W; i++) {
        float x = v.x[i];
        x = x > -127.0f ? x : (x != x ? x : -127.0f);
        x = x < 128.0f ? x : (x != x ? x : 128.0f);
        volatile float big = 12582912.0f;           /* keep (x+big)-big from folding */
        float n = (x + big) - big;
        float f = x - n;
        float p = SA_EXP2F_C6;
        p = p * f + SA_EXP2F_C5; p = p * f + SA_EXP2F_C4; p = p * f + SA_EXP2F_C3;
        p = p * f + SA_EXP2F_C2; p = p * f + SA_EXP2F_C1; p = p * f + 1.0f;
        int32_t ni = (n == n) ? (int32_t)n : 0;
        uint32_t bits = (uint32_t)(ni + 127) << 23;
        float s; memcpy(&s, &bits, sizeof s);
        r.x[i] = p * s;
    }
    return r;
}
SA_INLINE vd_t vd_exp2(vd_t v) {
    vd_t r;
    for (int i = 0; i < VD_W; i++) {
        double x = v.x[i];
        x = x > -1023.0 ? x : (x != x ? x : -1023.0);
        x = x < 1024.0 ? x : (x != x ? x : 1024.0);
        volatile double big = 6755399441055744.0;
        double n = (x + big) - big;
        double f = x - n;
        double p = SA_EXP2D_C11;
        p = p * f + SA_EXP2D_C10; p = p * f + SA_EXP2D_C9; p = p * f + SA_EXP2D_C8;
        p = p * f + SA_EXP2D_C7; p = p * f + SA_EXP2D_C6; p = p * f + SA_EXP2D_C5;
        p = p * f + SA_EXP2D_C4; p = p * f + SA_EXP2D_C3; p = p * f + SA_EXP2D_C2;
        p = p * f + SA_EXP2D_C1; p = p * f + 1.0;
        int64_t ni = (n == n) ? (int64_t)n : 0;
        uint64_t bits = (uint64_t)(ni + 1023) << 52;
        double s; memcpy(&s, &bits, sizeof s);
        r.x[i] = p * s;
    }
    return r;
}

#endif

/* 16-bit storage rows (simd_common.h): half.h, one value at a time (the
 * bfloat16 shift is a loop the compiler vectorises) */
static inline void vf_from_f16_row(const uint16_t *s, float *d, int64_t n) {
    for (int64_t i = 0; i < n; i++) d[i] = sa_f16_to_f32(s[i]);
}
static inline void vf_from_bf16_row(const uint16_t *s, float *d, int64_t n) {
    for (int64_t i = 0; i < n; i++) d[i] = sa_bf16_to_f32(s[i]);
}
/* one vector of 16-bit storage, widened (the decode schedule reads K/V this way) */
static inline vf_t vf_load_f16(const uint16_t *p) {
    float t[VF_W];
    vf_from_f16_row(p, t, VF_W);
    return vf_load(t);
}
static inline vf_t vf_load_bf16(const uint16_t *p) {
    float t[VF_W];
    vf_from_bf16_row(p, t, VF_W);
    return vf_load(t);
}
static inline void vf_to_f16_row(const float *s, uint16_t *d, int64_t n) {
    for (int64_t i = 0; i < n; i++) d[i] = sa_f32_to_f16(s[i]);
}
/* one vector of int8 (quantized K/V), widened, exact */
static inline vf_t vf_load_i8(const int8_t *p) {
    float t[VF_W];
    for (int i = 0; i < VF_W; i++) t[i] = (float)p[i];
    return vf_load(t);
}
static inline vf_t vf_load_e4m3(const uint8_t *p) {     /* x 2^-8, as the vector targets' (half.h) */
    float t[VF_W];
    for (int i = 0; i < VF_W; i++) t[i] = sa_f16_to_f32(sa_e4m3_f16_bits(p[i]));
    return vf_load(t);
}
static inline vf_t vf_load_e5m2(const uint8_t *p) {
    float t[VF_W];
    for (int i = 0; i < VF_W; i++) t[i] = sa_e5m2_to_f32(p[i]);
    return vf_load(t);
}
