/* simd_avx512bf16.h -- bfloat16 pairs on AVX512_BF16 (vdpbf16ps): the
 * primitives of attn_bf16dot.h for the avx512bf16 target (16 float lanes,
 * so 16 words of two bfloat16 a vector). Included by attn_avx512.c after
 * simd_avx512.h, where avx512bf16 is in the target. */

typedef __m512bh vbh_t;

/* VW words */
SA_INLINE vbh_t vbh_load(const uint32_t *p) { return (vbh_t)_mm512_loadu_si512((const void *)p); }
/* one word in every lane */
SA_INLINE vbh_t vbh_set1(uint32_t w) { return (vbh_t)_mm512_set1_epi32((int)w); }
/* acc[i] += a[2i] b[2i] + a[2i+1] b[2i+1], the products exact, summed in float32 */
SA_INLINE vf_t vbh_dot(vf_t acc, vbh_t a, vbh_t b) { return _mm512_dpbf16_ps(acc, a, b); }
/* VW floats rounded to bfloat16 (nearest even), stored as 16-bit values */
SA_INLINE void vbh_store_rne(uint16_t *d, vf_t x)
{
    _mm256_storeu_si256((__m256i *)(void *)d, (__m256i)_mm512_cvtneps_pbh(x));
}
/* the same for n < VW floats at s */
SA_INLINE void vbh_store_rne_n(uint16_t *d, const float *s, int64_t n)
{
    __mmask16 m = (__mmask16)((1u << n) - 1u);
    _mm256_mask_storeu_epi16((void *)d, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, s)));
}
/* VW words (a[c], b[c]) of two rows of bfloat16 */
SA_INLINE void vbh_zip(const uint16_t *a, const uint16_t *b, uint32_t *d)
{
    __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(const void *)a));
    __m512i y = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(const void *)b));
    _mm512_storeu_si512((void *)d, _mm512_or_si512(x, _mm512_slli_epi32(y, 16)));
}
/* VW words (a[c], b[c]) of two float vectors rounded to bfloat16 (nearest even) */
SA_INLINE void vbh_zip_f32(vf_t a, vf_t b, uint32_t *d)
{
    __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(a));
    __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(b));
    _mm512_storeu_si512((void *)d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
}
/* the first (hi 0) or second (hi 1) bfloat16 of VW words, widened (exact) */
SA_INLINE vf_t vbh_half(const uint32_t *w, int hi)
{
    __m512i x = _mm512_loadu_si512((const void *)w);
    return _mm512_castsi512_ps(hi ? _mm512_and_si512(x, _mm512_set1_epi32((int)0xffff0000u)) : _mm512_slli_epi32(x, 16));
}
