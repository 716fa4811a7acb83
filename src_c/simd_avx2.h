/* simd_avx2.h -- AVX2 + FMA layer (see simd_common.h). Included only by
 * attn_avx2.c, after its target pragma. */
#include <immintrin.h>
#include "simd_common.h"
#include "half.h"

/* ---- float ---- */
#define VF_W 8
typedef __m256 vf_t;
SA_INLINE vf_t vf_zero(void) { return _mm256_setzero_ps(); }
SA_INLINE vf_t vf_set1(float x) { return _mm256_set1_ps(x); }
SA_INLINE vf_t vf_load(const float *p) { return _mm256_loadu_ps(p); }
SA_INLINE void vf_store(float *p, vf_t v) { _mm256_storeu_ps(p, v); }
SA_INLINE vf_t vf_bcast(const float *p) { return _mm256_broadcast_ss(p); }
SA_INLINE vf_t vf_add(vf_t a, vf_t b) { return _mm256_add_ps(a, b); }
SA_INLINE vf_t vf_sub(vf_t a, vf_t b) { return _mm256_sub_ps(a, b); }
SA_INLINE vf_t vf_mul(vf_t a, vf_t b) { return _mm256_mul_ps(a, b); }
SA_INLINE vf_t vf_div(vf_t a, vf_t b) { return _mm256_div_ps(a, b); }
SA_INLINE vf_t vf_fma(vf_t a, vf_t b, vf_t c) { return _mm256_fmadd_ps(a, b, c); }
SA_INLINE vf_t vf_max(vf_t a, vf_t b) { return _mm256_max_ps(a, b); }
SA_INLINE vf_t vf_min(vf_t a, vf_t b) { return _mm256_min_ps(a, b); }
SA_INLINE float vf_hmax(vf_t v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}
SA_INLINE float vf_hsum(vf_t v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
/* four horizontal sums at once (the decode's dots: 4 rows per key), halves then pairwise */
SA_INLINE void vf_hsum4(vf_t a, vf_t b, vf_t c, vf_t d, float *o) {
    __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 b4 = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
    __m128 c4 = _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
    __m128 d4 = _mm_add_ps(_mm256_castps256_ps128(d), _mm256_extractf128_ps(d, 1));
    _mm_storeu_ps(o, _mm_hadd_ps(_mm_hadd_ps(a4, b4), _mm_hadd_ps(c4, d4)));
}
SA_INLINE vf_t vf_exp2(vf_t x) {
    x = _mm256_max_ps(_mm256_set1_ps(-127.0f), x);
    x = _mm256_min_ps(_mm256_set1_ps(128.0f), x);
    vf_t n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf_t f = _mm256_sub_ps(x, n);
    vf_t p = _mm256_set1_ps(SA_EXP2F_C6);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(SA_EXP2F_C5));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(SA_EXP2F_C4));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(SA_EXP2F_C3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(SA_EXP2F_C2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(SA_EXP2F_C1));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* dst[c*ds + r] = src[r*ss + c] for r, c < 8 */
SA_INLINE void vf_transpose(const float *src, int64_t ss, float *dst, int64_t ds) {
    __m256 s[8];
    for (int g = 0; g < 2; g++) {
        __m256 a = _mm256_loadu_ps(src + (4 * g + 0) * ss), b = _mm256_loadu_ps(src + (4 * g + 1) * ss);
        __m256 c = _mm256_loadu_ps(src + (4 * g + 2) * ss), d = _mm256_loadu_ps(src + (4 * g + 3) * ss);
        __m256 t0 = _mm256_unpacklo_ps(a, b), t1 = _mm256_unpackhi_ps(a, b);
        __m256 t2 = _mm256_unpacklo_ps(c, d), t3 = _mm256_unpackhi_ps(c, d);
        s[4 * g + 0] = _mm256_shuffle_ps(t0, t2, 0x44);    /* columns 0,4 of rows 4g..4g+3 */
        s[4 * g + 1] = _mm256_shuffle_ps(t0, t2, 0xEE);    /* columns 1,5 */
        s[4 * g + 2] = _mm256_shuffle_ps(t1, t3, 0x44);    /* columns 2,6 */
        s[4 * g + 3] = _mm256_shuffle_ps(t1, t3, 0xEE);    /* columns 3,7 */
    }
    for (int k = 0; k < 4; k++) {
        _mm256_storeu_ps(dst + k * ds, _mm256_permute2f128_ps(s[k], s[4 + k], 0x20));
        _mm256_storeu_ps(dst + (4 + k) * ds, _mm256_permute2f128_ps(s[k], s[4 + k], 0x31));
    }
}

/* 16-bit storage rows (simd_common.h): F16C for float16, shifts for bfloat16 */
SA_INLINE void vf_from_f16_row(const uint16_t *s, float *d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
    for (; i < n; i++) d[i] = sa_f16_to_f32(s[i]);
}
SA_INLINE void vf_from_bf16_row(const uint16_t *s, float *d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(
                                    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i))), 16)));
    for (; i < n; i++) d[i] = sa_bf16_to_f32(s[i]);
}
/* one vector of 16-bit storage, widened in registers (the decode schedule reads K/V this way) */
SA_INLINE vf_t vf_load_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
SA_INLINE vf_t vf_load_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
/* one vector of int8 (quantized K/V), widened in registers, exact */
SA_INLINE vf_t vf_load_i8(const int8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }
/* one vector of float8 (half.h): e4m3fn x 2^-8 (its NaN kept), e5m2 exact; through float16 bits */
SA_INLINE vf_t vf_load_e4m3(const uint8_t *p) {
    __m128i h = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)p)), 7),
                              _mm_set1_epi16((short)0xbf80));                  /* sign, then e and m below bit 14 */
    __m128i nan = _mm_cmpeq_epi16(_mm_and_si128(h, _mm_set1_epi16(0x3f80)), _mm_set1_epi16(0x3f80));
    return _mm256_cvtph_ps(_mm_or_si128(h, _mm_and_si128(nan, _mm_set1_epi16(0x7c00))));
}
SA_INLINE vf_t vf_load_e5m2(const uint8_t *p) {
    return _mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p)), 8));
}
SA_INLINE void vf_to_f16_row(const float *s, uint16_t *d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; i++) d[i] = sa_f32_to_f16(s[i]);
}

/* ---- double ---- */
#define VD_W 4
typedef __m256d vd_t;
SA_INLINE vd_t vd_zero(void) { return _mm256_setzero_pd(); }
SA_INLINE vd_t vd_set1(double x) { return _mm256_set1_pd(x); }
SA_INLINE vd_t vd_load(const double *p) { return _mm256_loadu_pd(p); }
SA_INLINE void vd_store(double *p, vd_t v) { _mm256_storeu_pd(p, v); }
SA_INLINE vd_t vd_bcast(const double *p) { return _mm256_broadcast_sd(p); }
SA_INLINE vd_t vd_add(vd_t a, vd_t b) { return _mm256_add_pd(a, b); }
SA_INLINE vd_t vd_sub(vd_t a, vd_t b) { return _mm256_sub_pd(a, b); }
SA_INLINE vd_t vd_mul(vd_t a, vd_t b) { return _mm256_mul_pd(a, b); }
SA_INLINE vd_t vd_div(vd_t a, vd_t b) { return _mm256_div_pd(a, b); }
SA_INLINE vd_t vd_fma(vd_t a, vd_t b, vd_t c) { return _mm256_fmadd_pd(a, b, c); }
SA_INLINE vd_t vd_max(vd_t a, vd_t b) { return _mm256_max_pd(a, b); }
SA_INLINE vd_t vd_min(vd_t a, vd_t b) { return _mm256_min_pd(a, b); }
SA_INLINE double vd_hmax(vd_t v) {
    __m128d m = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    m = _mm_max_sd(m, _mm_unpackhi_pd(m, m));
    return _mm_cvtsd_f64(m);
}
SA_INLINE double vd_hsum(vd_t v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
    return _mm_cvtsd_f64(s);
}
SA_INLINE void vd_hsum4(vd_t a, vd_t b, vd_t c, vd_t d, double *o) {
    o[0] = vd_hsum(a); o[1] = vd_hsum(b); o[2] = vd_hsum(c); o[3] = vd_hsum(d);
}
SA_INLINE vd_t vd_exp2(vd_t x) {
    x = _mm256_max_pd(_mm256_set1_pd(-1023.0), x);
    x = _mm256_min_pd(_mm256_set1_pd(1024.0), x);
    vd_t n = _mm256_round_pd(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vd_t f = _mm256_sub_pd(x, n);
    vd_t p = _mm256_set1_pd(SA_EXP2D_C11);
    p = _mm256_fmadd_pd(p, f, _mm256_set1_pd(SA_EXP2D_C10));
    p = _mm256_fmadd_pd(p, f, _mm256_set1_pd(SA_EXP2D_C9));
    p = _mm256_fmadd_pd(p, f, _mm256_set1_pd(SA_EXP2D_C8));
    p = _mm256_fmadd_pd(p, f, _mm256_set1_pd(SA_EXP2D_C7));
    p = _mm256_fmadd_pd(p, f, _mm256_set1_pd(SA_EXP2D_C6));
    p = _mm256_fmadd_pd(p, f, _mm256_set1_pd(SA_EXP2D_C5));
    p = _mm256_fmadd_pd(p, f, _mm256_set1_pd(SA_EXP2D_C4));
    p = _mm256_fmadd_pd(p, f, _mm256_set1_pd(SA_EXP2D_C3));
    p = _mm256_fmadd_pd(p, f, _mm256_set1_pd(SA_EXP2D_C2));
    p = _mm256_fmadd_pd(p, f, _mm256_set1_pd(SA_EXP2D_C1));
    p = _mm256_fmadd_pd(p, f, _mm256_set1_pd(1.0));
    /* no 64-bit float->int convert in AVX2: build 2^n from n + 1023 via the
     * magic-number trick (n is integral and within [-1023, 1024]) */
    __m256d biased = _mm256_add_pd(n, _mm256_set1_pd(1023.0 + 4503599627370496.0));
    __m256i e = _mm256_slli_epi64(_mm256_castpd_si256(biased), 52);
    return _mm256_mul_pd(p, _mm256_castsi256_pd(e));
}

/* dst[c*ds + r] = src[r*ss + c] for r, c < 4 */
SA_INLINE void vd_transpose(const double *src, int64_t ss, double *dst, int64_t ds) {
    __m256d a = _mm256_loadu_pd(src), b = _mm256_loadu_pd(src + ss);
    __m256d c = _mm256_loadu_pd(src + 2 * ss), d = _mm256_loadu_pd(src + 3 * ss);
    __m256d t0 = _mm256_unpacklo_pd(a, b), t1 = _mm256_unpackhi_pd(a, b);
    __m256d t2 = _mm256_unpacklo_pd(c, d), t3 = _mm256_unpackhi_pd(c, d);
    _mm256_storeu_pd(dst, _mm256_permute2f128_pd(t0, t2, 0x20));
    _mm256_storeu_pd(dst + ds, _mm256_permute2f128_pd(t1, t3, 0x20));
    _mm256_storeu_pd(dst + 2 * ds, _mm256_permute2f128_pd(t0, t2, 0x31));
    _mm256_storeu_pd(dst + 3 * ds, _mm256_permute2f128_pd(t1, t3, 0x31));
}
