/* simd_neon.h -- aarch64 Advanced SIMD (NEON) layer (see simd_common.h).
 * Included only by attn_neon.c, on aarch64, where NEON is baseline: no
 * target flags needed. 128-bit vectors: 4 floats, 2 doubles. */
#include <arm_neon.h>
#include <string.h>
#include "simd_common.h"
#include "half.h"

/* ---- float ---- */
#define VF_W 4
typedef float32x4_t vf_t;
SA_INLINE vf_t vf_zero(void) { return vdupq_n_f32(0.0f); }
SA_INLINE vf_t vf_set1(float x) { return vdupq_n_f32(x); }
SA_INLINE vf_t vf_load(const float *p) { return vld1q_f32(p); }
SA_INLINE void vf_store(float *p, vf_t v) { vst1q_f32(p, v); }
/* Broadcast a scalar from memory. Clang folds dup(load) into ld1r, which on
 * Neoverse V1 also takes one of the 4 FP/ASIMD pipes the FMAs need; an empty
 * asm between the scalar load and the dup keeps it a plain ldr, and the dup
 * then folds into the FMA's by-element form (fmla v.4s, v.4s, v.s[0]).
 * GCC already emits ldr + by-element fmla. */
#if defined(__clang__)
#define SA_NEON_OPAQUE(x) __asm__("" : "+w"(x))
#else
#define SA_NEON_OPAQUE(x) ((void)0)
#endif
SA_INLINE vf_t vf_bcast(const float *p) { float x = *p; SA_NEON_OPAQUE(x); return vdupq_n_f32(x); }
SA_INLINE vf_t vf_add(vf_t a, vf_t b) { return vaddq_f32(a, b); }
SA_INLINE vf_t vf_sub(vf_t a, vf_t b) { return vsubq_f32(a, b); }
SA_INLINE vf_t vf_mul(vf_t a, vf_t b) { return vmulq_f32(a, b); }
SA_INLINE vf_t vf_div(vf_t a, vf_t b) { return vdivq_f32(a, b); }
SA_INLINE vf_t vf_fma(vf_t a, vf_t b, vf_t c) { return vfmaq_f32(c, a, b); }
/* The x86 rule (maxps/minps): a NaN in either gives the second operand.
 * vmaxq/vminq would give NaN whenever either is NaN, so compare and select:
 * a comparison with a NaN is false, which picks b. */
SA_INLINE vf_t vf_max(vf_t a, vf_t b) { return vbslq_f32(vcgtq_f32(a, b), a, b); }
SA_INLINE vf_t vf_min(vf_t a, vf_t b) { return vbslq_f32(vcltq_f32(a, b), a, b); }
/* the same tree as AVX2's (halves, then pairs), with the same max rule */
SA_INLINE float vf_hmax(vf_t v) {
    vf_t m = vf_max(v, vextq_f32(v, v, 2));
    m = vf_max(m, vextq_f32(m, m, 1));
    return vgetq_lane_f32(m, 0);
}
SA_INLINE float vf_hsum(vf_t v) { return vaddvq_f32(v); }
/* four horizontal sums at once (the decode's dots: 4 rows per key): pairwise adds */
SA_INLINE void vf_hsum4(vf_t a, vf_t b, vf_t c, vf_t d, float *o) {
    vst1q_f32(o, vpaddq_f32(vpaddq_f32(a, b), vpaddq_f32(c, d)));
}
/* Clamp to [-127, 128] (NaN stays NaN: vmaxq/vminq propagate it), round to
 * nearest even (as the other layers), the polynomial in f = x - n, 2^n built
 * in the exponent field. vcvtq_s32_f32 turns NaN into 0; p is NaN then, so
 * the result is NaN. x <= -127 gives +0, x >= 128 gives +inf. */
SA_INLINE vf_t vf_exp2(vf_t x) {
    x = vmaxq_f32(x, vdupq_n_f32(-127.0f));
    x = vminq_f32(x, vdupq_n_f32(128.0f));
    vf_t n = vrndnq_f32(x);
    vf_t f = vsubq_f32(x, n);
    vf_t p = vdupq_n_f32(SA_EXP2F_C6);
    p = vfmaq_f32(vdupq_n_f32(SA_EXP2F_C5), p, f);
    p = vfmaq_f32(vdupq_n_f32(SA_EXP2F_C4), p, f);
    p = vfmaq_f32(vdupq_n_f32(SA_EXP2F_C3), p, f);
    p = vfmaq_f32(vdupq_n_f32(SA_EXP2F_C2), p, f);
    p = vfmaq_f32(vdupq_n_f32(SA_EXP2F_C1), p, f);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, f);
    int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
}
/* dst[c*ds + r] = src[r*ss + c] for r, c < 4 */
SA_INLINE void vf_transpose(const float *src, int64_t ss, float *dst, int64_t ds) {
    float32x4_t r0 = vld1q_f32(src), r1 = vld1q_f32(src + ss);
    float32x4_t r2 = vld1q_f32(src + 2 * ss), r3 = vld1q_f32(src + 3 * ss);
    float64x2_t t0 = vreinterpretq_f64_f32(vtrn1q_f32(r0, r1));   /* r0c0 r1c0 r0c2 r1c2 */
    float64x2_t t1 = vreinterpretq_f64_f32(vtrn2q_f32(r0, r1));   /* r0c1 r1c1 r0c3 r1c3 */
    float64x2_t t2 = vreinterpretq_f64_f32(vtrn1q_f32(r2, r3));
    float64x2_t t3 = vreinterpretq_f64_f32(vtrn2q_f32(r2, r3));
    vst1q_f32(dst, vreinterpretq_f32_f64(vtrn1q_f64(t0, t2)));
    vst1q_f32(dst + ds, vreinterpretq_f32_f64(vtrn1q_f64(t1, t3)));
    vst1q_f32(dst + 2 * ds, vreinterpretq_f32_f64(vtrn2q_f64(t0, t2)));
    vst1q_f32(dst + 3 * ds, vreinterpretq_f32_f64(vtrn2q_f64(t1, t3)));
}

/* 16-bit storage rows (simd_common.h): fcvtl / fcvtn (ARMv8.0; FPCR's default
 * rounding, to nearest even) for float16, shifts for bfloat16 */
SA_INLINE void vf_from_f16_row(const uint16_t *s, float *d, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(d + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(s + i))));
    for (; i < n; i++) d[i] = sa_f16_to_f32(s[i]);
}
SA_INLINE void vf_from_bf16_row(const uint16_t *s, float *d, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(d + i, vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(s + i), 16)));
    for (; i < n; i++) d[i] = sa_bf16_to_f32(s[i]);
}
/* one vector of 16-bit storage, widened in registers (the decode schedule reads K/V this way) */
SA_INLINE vf_t vf_load_f16(const uint16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
SA_INLINE vf_t vf_load_bf16(const uint16_t *p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
/* one vector of int8 (quantized K/V), widened in registers, exact (4 bytes, read as one word) */
SA_INLINE vf_t vf_load_i8(const int8_t *p) {
    int32_t w;
    memcpy(&w, p, 4);
    return vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(w))))));
}
/* one vector of float8 (half.h): e4m3fn x 2^-8 (its NaN kept), e5m2 exact; through float16 bits */
SA_INLINE vf_t vf_load_e4m3(const uint8_t *p) {
    int32_t w;
    memcpy(&w, p, 4);
    int16x4_t s = vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(w))));
    uint16x4_t h = vand_u16(vreinterpret_u16_s16(vshl_n_s16(s, 7)), vdup_n_u16(0xbf80));
    uint16x4_t nan = vceq_u16(vand_u16(h, vdup_n_u16(0x3f80)), vdup_n_u16(0x3f80));
    return vcvt_f32_f16(vreinterpret_f16_u16(vorr_u16(h, vand_u16(nan, vdup_n_u16(0x7c00)))));
}
SA_INLINE vf_t vf_load_e5m2(const uint8_t *p) {
    int32_t w;
    memcpy(&w, p, 4);
    uint16x4_t h = vshl_n_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_s32(vdup_n_s32(w)))), 8);
    return vcvt_f32_f16(vreinterpret_f16_u16(h));
}
SA_INLINE void vf_to_f16_row(const float *s, uint16_t *d, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1_u16(d + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(s + i))));
    for (; i < n; i++) d[i] = sa_f32_to_f16(s[i]);
}

/* ---- double ---- */
#define VD_W 2
typedef float64x2_t vd_t;
SA_INLINE vd_t vd_zero(void) { return vdupq_n_f64(0.0); }
SA_INLINE vd_t vd_set1(double x) { return vdupq_n_f64(x); }
SA_INLINE vd_t vd_load(const double *p) { return vld1q_f64(p); }
SA_INLINE void vd_store(double *p, vd_t v) { vst1q_f64(p, v); }
SA_INLINE vd_t vd_bcast(const double *p) { double x = *p; SA_NEON_OPAQUE(x); return vdupq_n_f64(x); }
SA_INLINE vd_t vd_add(vd_t a, vd_t b) { return vaddq_f64(a, b); }
SA_INLINE vd_t vd_sub(vd_t a, vd_t b) { return vsubq_f64(a, b); }
SA_INLINE vd_t vd_mul(vd_t a, vd_t b) { return vmulq_f64(a, b); }
SA_INLINE vd_t vd_div(vd_t a, vd_t b) { return vdivq_f64(a, b); }
SA_INLINE vd_t vd_fma(vd_t a, vd_t b, vd_t c) { return vfmaq_f64(c, a, b); }
SA_INLINE vd_t vd_max(vd_t a, vd_t b) { return vbslq_f64(vcgtq_f64(a, b), a, b); }
SA_INLINE vd_t vd_min(vd_t a, vd_t b) { return vbslq_f64(vcltq_f64(a, b), a, b); }
SA_INLINE double vd_hmax(vd_t v) { return vgetq_lane_f64(vd_max(v, vextq_f64(v, v, 1)), 0); }
SA_INLINE double vd_hsum(vd_t v) { return vaddvq_f64(v); }
SA_INLINE void vd_hsum4(vd_t a, vd_t b, vd_t c, vd_t d, double *o) {
    o[0] = vd_hsum(a); o[1] = vd_hsum(b); o[2] = vd_hsum(c); o[3] = vd_hsum(d);
}
SA_INLINE vd_t vd_exp2(vd_t x) {
    x = vmaxq_f64(x, vdupq_n_f64(-1023.0));
    x = vminq_f64(x, vdupq_n_f64(1024.0));
    vd_t n = vrndnq_f64(x);
    vd_t f = vsubq_f64(x, n);
    vd_t p = vdupq_n_f64(SA_EXP2D_C11);
    p = vfmaq_f64(vdupq_n_f64(SA_EXP2D_C10), p, f);
    p = vfmaq_f64(vdupq_n_f64(SA_EXP2D_C9), p, f);
    p = vfmaq_f64(vdupq_n_f64(SA_EXP2D_C8), p, f);
    p = vfmaq_f64(vdupq_n_f64(SA_EXP2D_C7), p, f);
    p = vfmaq_f64(vdupq_n_f64(SA_EXP2D_C6), p, f);
    p = vfmaq_f64(vdupq_n_f64(SA_EXP2D_C5), p, f);
    p = vfmaq_f64(vdupq_n_f64(SA_EXP2D_C4), p, f);
    p = vfmaq_f64(vdupq_n_f64(SA_EXP2D_C3), p, f);
    p = vfmaq_f64(vdupq_n_f64(SA_EXP2D_C2), p, f);
    p = vfmaq_f64(vdupq_n_f64(SA_EXP2D_C1), p, f);
    p = vfmaq_f64(vdupq_n_f64(1.0), p, f);
    int64x2_t e = vshlq_n_s64(vaddq_s64(vcvtq_s64_f64(n), vdupq_n_s64(1023)), 52);
    return vmulq_f64(p, vreinterpretq_f64_s64(e));
}
/* dst[c*ds + r] = src[r*ss + c] for r, c < 2 */
SA_INLINE void vd_transpose(const double *src, int64_t ss, double *dst, int64_t ds) {
    float64x2_t r0 = vld1q_f64(src), r1 = vld1q_f64(src + ss);
    vst1q_f64(dst, vtrn1q_f64(r0, r1));
    vst1q_f64(dst + ds, vtrn2q_f64(r0, r1));
}
