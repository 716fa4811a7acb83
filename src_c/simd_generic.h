/* simd_generic.h -- portable layer (see simd_common.h): a small fixed-size
 * array per "vector", plain C loops the compiler may vectorise for the
 * baseline of any architecture. No intrinsics, builds everywhere. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "simd_common.h"

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
