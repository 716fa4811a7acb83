/* simd_avx512.h -- AVX-512 F/DQ/BW/VL layer (see simd_common.h). Included
 * only by attn_avx512.c, after its target pragma. */
#include <immintrin.h>
#include "simd_common.h"
#include "half.h"

/* ---- float ---- */
#define VF_W 16
typedef __m512 vf_t;
SA_INLINE vf_t vf_zero(void) { return _mm512_setzero_ps(); }
SA_INLINE vf_t vf_set1(float x) { return _mm512_set1_ps(x); }
SA_INLINE vf_t vf_load(const float *p) { return _mm512_loadu_ps(p); }
SA_INLINE void vf_store(float *p, vf_t v) { _mm512_storeu_ps(p, v); }
SA_INLINE vf_t vf_bcast(const float *p) { return _mm512_set1_ps(*p); }
SA_INLINE vf_t vf_add(vf_t a, vf_t b) { return _mm512_add_ps(a, b); }
SA_INLINE vf_t vf_sub(vf_t a, vf_t b) { return _mm512_sub_ps(a, b); }
SA_INLINE vf_t vf_mul(vf_t a, vf_t b) { return _mm512_mul_ps(a, b); }
SA_INLINE vf_t vf_div(vf_t a, vf_t b) { return _mm512_div_ps(a, b); }
SA_INLINE vf_t vf_fma(vf_t a, vf_t b, vf_t c) { return _mm512_fmadd_ps(a, b, c); }
/* max_ps returns its second operand when either is NaN: pass data second. */
SA_INLINE vf_t vf_max(vf_t a, vf_t b) { return _mm512_max_ps(a, b); }
SA_INLINE vf_t vf_min(vf_t a, vf_t b) { return _mm512_min_ps(a, b); }
SA_INLINE float vf_hmax(vf_t v) { return _mm512_reduce_max_ps(v); }
SA_INLINE float vf_hsum(vf_t v) { return _mm512_reduce_add_ps(v); }
/* four horizontal sums at once (the decode's dots: 4 rows per key), halves then pairwise */
SA_INLINE void vf_hsum4(vf_t a, vf_t b, vf_t c, vf_t d, float *o) {
    __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256(b), _mm512_extractf32x8_ps(b, 1));
    __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1));
    __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256(d), _mm512_extractf32x8_ps(d, 1));
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a8, b8), _mm256_hadd_ps(c8, d8));   /* [a b c d | a b c d] */
    _mm_storeu_ps(o, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
}
/* Arguments are <= 0 (or NaN) by construction: s - running max. vscalefps
 * applies 2^n without building exponent bits by hand. Below x = -126 the
 * result is exactly +0 (masked keys: -inf), never a subnormal: lanes there are
 * masked out of vscalefps, because a subnormal result costs Intel cores a
 * microcode assist (measured on Emerald Rapids: a bool mask with a pattern ran
 * 4x slower than no mask, -inf lanes clamped to 2^-150). NaN still propagates. */
SA_INLINE vf_t vf_exp2(vf_t x) {
    __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);   /* x >= -126 or NaN */
    x = _mm512_max_ps(_mm512_set1_ps(-127.0f), x);
    vf_t n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf_t f = _mm512_sub_ps(x, n);
    vf_t p = _mm512_set1_ps(SA_EXP2F_C6);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(SA_EXP2F_C5));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(SA_EXP2F_C4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(SA_EXP2F_C3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(SA_EXP2F_C2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(SA_EXP2F_C1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(normal, p, n);
}

/* dst[c*ds + r] = src[r*ss + c] for r, c < 16: in-lane 4x4 transposes
 * (unpack + shuffle), then 128-bit lanes gathered with two shuffle_f32x4. */
SA_INLINE void vf_transpose(const float *src, int64_t ss, float *dst, int64_t ds) {
    __m512 s[16];
    for (int g = 0; g < 4; g++) {
        __m512 a = _mm512_loadu_ps(src + (4 * g + 0) * ss), b = _mm512_loadu_ps(src + (4 * g + 1) * ss);
        __m512 c = _mm512_loadu_ps(src + (4 * g + 2) * ss), d = _mm512_loadu_ps(src + (4 * g + 3) * ss);
        __m512 t0 = _mm512_unpacklo_ps(a, b), t1 = _mm512_unpackhi_ps(a, b);
        __m512 t2 = _mm512_unpacklo_ps(c, d), t3 = _mm512_unpackhi_ps(c, d);
        s[4 * g + 0] = _mm512_shuffle_ps(t0, t2, 0x44);   /* columns 0,4,8,12 of rows 4g..4g+3 */
        s[4 * g + 1] = _mm512_shuffle_ps(t0, t2, 0xEE);   /* columns 1,5,9,13  */
        s[4 * g + 2] = _mm512_shuffle_ps(t1, t3, 0x44);   /* columns 2,6,10,14 */
        s[4 * g + 3] = _mm512_shuffle_ps(t1, t3, 0xEE);   /* columns 3,7,11,15 */
    }
    for (int k = 0; k < 4; k++) {                         /* column 4*lane + k */
        __m512 x = _mm512_shuffle_f32x4(s[k], s[4 + k], 0x44), y = _mm512_shuffle_f32x4(s[8 + k], s[12 + k], 0x44);
        __m512 xh = _mm512_shuffle_f32x4(s[k], s[4 + k], 0xEE), yh = _mm512_shuffle_f32x4(s[8 + k], s[12 + k], 0xEE);
        _mm512_storeu_ps(dst + (0 + k) * ds, _mm512_shuffle_f32x4(x, y, 0x88));
        _mm512_storeu_ps(dst + (4 + k) * ds, _mm512_shuffle_f32x4(x, y, 0xDD));
        _mm512_storeu_ps(dst + (8 + k) * ds, _mm512_shuffle_f32x4(xh, yh, 0x88));
        _mm512_storeu_ps(dst + (12 + k) * ds, _mm512_shuffle_f32x4(xh, yh, 0xDD));
    }
}

/* 16-bit storage rows (simd_common.h): vcvtph2ps for float16, shifts for bfloat16 */
SA_INLINE void vf_from_f16_row(const uint16_t *s, float *d, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + i))));
    for (; i < n; i++) d[i] = sa_f16_to_f32(s[i]);
}
SA_INLINE void vf_from_bf16_row(const uint16_t *s, float *d, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(d + i, _mm512_castsi512_ps(_mm512_slli_epi32(
                                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(s + i))), 16)));
    for (; i < n; i++) d[i] = sa_bf16_to_f32(s[i]);
}
/* one vector of 16-bit storage, widened in registers (the decode schedule reads K/V this way) */
SA_INLINE vf_t vf_load_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
SA_INLINE vf_t vf_load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
/* one vector of int8 (quantized K/V), widened in registers, exact */
SA_INLINE vf_t vf_load_i8(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }
/* one vector of float8 (half.h): e4m3fn x 2^-8 (its NaN kept), e5m2 exact; through float16 bits */
SA_INLINE vf_t vf_load_e4m3(const uint8_t *p) {
    __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)), 7),
                                 _mm256_set1_epi16((short)0xbf80));            /* sign, then e and m below bit 14 */
    __mmask16 nan = _mm256_cmpeq_epi16_mask(_mm256_and_si256(h, _mm256_set1_epi16(0x3f80)), _mm256_set1_epi16(0x3f80));
    return _mm512_cvtph_ps(_mm256_mask_mov_epi16(h, nan, _mm256_set1_epi16(0x7fff)));    /* NaN: a float16 NaN */
}
SA_INLINE vf_t vf_load_e5m2(const uint8_t *p) {
    return _mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p)), 8));
}
SA_INLINE void vf_to_f16_row(const float *s, uint16_t *d, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(d + i), _mm512_cvtps_ph(_mm512_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; i++) d[i] = sa_f32_to_f16(s[i]);
}

/* ---- double ---- */
#define VD_W 8
typedef __m512d vd_t;
SA_INLINE vd_t vd_zero(void) { return _mm512_setzero_pd(); }
SA_INLINE vd_t vd_set1(double x) { return _mm512_set1_pd(x); }
SA_INLINE vd_t vd_load(const double *p) { return _mm512_loadu_pd(p); }
SA_INLINE void vd_store(double *p, vd_t v) { _mm512_storeu_pd(p, v); }
SA_INLINE vd_t vd_bcast(const double *p) { return _mm512_set1_pd(*p); }
SA_INLINE vd_t vd_add(vd_t a, vd_t b) { return _mm512_add_pd(a, b); }
SA_INLINE vd_t vd_sub(vd_t a, vd_t b) { return _mm512_sub_pd(a, b); }
SA_INLINE vd_t vd_mul(vd_t a, vd_t b) { return _mm512_mul_pd(a, b); }
SA_INLINE vd_t vd_div(vd_t a, vd_t b) { return _mm512_div_pd(a, b); }
SA_INLINE vd_t vd_fma(vd_t a, vd_t b, vd_t c) { return _mm512_fmadd_pd(a, b, c); }
SA_INLINE vd_t vd_max(vd_t a, vd_t b) { return _mm512_max_pd(a, b); }
SA_INLINE vd_t vd_min(vd_t a, vd_t b) { return _mm512_min_pd(a, b); }
SA_INLINE double vd_hmax(vd_t v) { return _mm512_reduce_max_pd(v); }
SA_INLINE double vd_hsum(vd_t v) { return _mm512_reduce_add_pd(v); }
SA_INLINE void vd_hsum4(vd_t a, vd_t b, vd_t c, vd_t d, double *o) {
    o[0] = vd_hsum(a); o[1] = vd_hsum(b); o[2] = vd_hsum(c); o[3] = vd_hsum(d);
}
SA_INLINE vd_t vd_exp2(vd_t x) {                  /* as vf_exp2: +0 below -1022, no subnormal */
    __mmask8 normal = _mm512_cmp_pd_mask(x, _mm512_set1_pd(-1022.0), _CMP_NLT_UQ);
    x = _mm512_max_pd(_mm512_set1_pd(-1023.0), x);
    vd_t n = _mm512_roundscale_pd(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vd_t f = _mm512_sub_pd(x, n);
    vd_t p = _mm512_set1_pd(SA_EXP2D_C11);
    p = _mm512_fmadd_pd(p, f, _mm512_set1_pd(SA_EXP2D_C10));
    p = _mm512_fmadd_pd(p, f, _mm512_set1_pd(SA_EXP2D_C9));
    p = _mm512_fmadd_pd(p, f, _mm512_set1_pd(SA_EXP2D_C8));
    p = _mm512_fmadd_pd(p, f, _mm512_set1_pd(SA_EXP2D_C7));
    p = _mm512_fmadd_pd(p, f, _mm512_set1_pd(SA_EXP2D_C6));
    p = _mm512_fmadd_pd(p, f, _mm512_set1_pd(SA_EXP2D_C5));
    p = _mm512_fmadd_pd(p, f, _mm512_set1_pd(SA_EXP2D_C4));
    p = _mm512_fmadd_pd(p, f, _mm512_set1_pd(SA_EXP2D_C3));
    p = _mm512_fmadd_pd(p, f, _mm512_set1_pd(SA_EXP2D_C2));
    p = _mm512_fmadd_pd(p, f, _mm512_set1_pd(SA_EXP2D_C1));
    p = _mm512_fmadd_pd(p, f, _mm512_set1_pd(1.0));
    return _mm512_maskz_scalef_pd(normal, p, n);
}

/* dst[c*ds + r] = src[r*ss + c] for r, c < 8 */
SA_INLINE void vd_transpose(const double *src, int64_t ss, double *dst, int64_t ds) {
    __m512d t[8];
    for (int p = 0; p < 4; p++) {
        __m512d a = _mm512_loadu_pd(src + (2 * p) * ss), b = _mm512_loadu_pd(src + (2 * p + 1) * ss);
        t[2 * p + 0] = _mm512_unpacklo_pd(a, b);           /* columns 0,2,4,6 of rows 2p, 2p+1 */
        t[2 * p + 1] = _mm512_unpackhi_pd(a, b);           /* columns 1,3,5,7 */
    }
    for (int k = 0; k < 2; k++) {                          /* column 2*lane + k */
        __m512d x = _mm512_shuffle_f64x2(t[k], t[2 + k], 0x44), y = _mm512_shuffle_f64x2(t[4 + k], t[6 + k], 0x44);
        __m512d xh = _mm512_shuffle_f64x2(t[k], t[2 + k], 0xEE), yh = _mm512_shuffle_f64x2(t[4 + k], t[6 + k], 0xEE);
        _mm512_storeu_pd(dst + (0 + k) * ds, _mm512_shuffle_f64x2(x, y, 0x88));
        _mm512_storeu_pd(dst + (2 + k) * ds, _mm512_shuffle_f64x2(x, y, 0xDD));
        _mm512_storeu_pd(dst + (4 + k) * ds, _mm512_shuffle_f64x2(xh, yh, 0x88));
        _mm512_storeu_pd(dst + (6 + k) * ds, _mm512_shuffle_f64x2(xh, yh, 0xDD));
    }
}
