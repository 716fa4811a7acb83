/* simd_neonbf16.h -- bfloat16 pairs on the Armv8.6 BF16 extension (BFDOT,
 * BFCVTN): the primitives of attn_bf16dot.h for the neonbf16 target (4 float
 * lanes, so 4 words of two bfloat16 a vector). Included by attn_neon.c after
 * simd_neon.h, where bf16 is in the target. */

typedef bfloat16x8_t vbh_t;

/* VW words */
SA_INLINE vbh_t vbh_load(const uint32_t *p) { return vreinterpretq_bf16_u32(vld1q_u32(p)); }
/* one word in every lane */
SA_INLINE vbh_t vbh_set1(uint32_t w) { return vreinterpretq_bf16_u32(vdupq_n_u32(w)); }
/* acc[i] += a[2i] b[2i] + a[2i+1] b[2i+1] (BFDOT) */
SA_INLINE vf_t vbh_dot(vf_t acc, vbh_t a, vbh_t b) { return vbfdotq_f32(acc, a, b); }
/* VW floats rounded to bfloat16 (BFCVTN: FPCR's rounding, nearest even), stored as 16-bit values */
SA_INLINE void vbh_store_rne(uint16_t *d, vf_t x) { vst1_u16(d, vreinterpret_u16_bf16(vcvt_bf16_f32(x))); }
/* the same for n < VW floats at s */
SA_INLINE void vbh_store_rne_n(uint16_t *d, const float *s, int64_t n)
{
    float t[4] = {0, 0, 0, 0};
    uint16_t h[4];
    for (int64_t i = 0; i < n; i++) t[i] = s[i];
    vst1_u16(h, vreinterpret_u16_bf16(vcvt_bf16_f32(vld1q_f32(t))));
    for (int64_t i = 0; i < n; i++) d[i] = h[i];
}
/* VW words (a[c], b[c]) of two rows of bfloat16 */
SA_INLINE void vbh_zip(const uint16_t *a, const uint16_t *b, uint32_t *d)
{
    uint16x4x2_t z = vzip_u16(vld1_u16(a), vld1_u16(b));
    vst1q_u16((uint16_t *)(void *)d, vcombine_u16(z.val[0], z.val[1]));
}
/* VW words (a[c], b[c]) of two float vectors rounded to bfloat16 (nearest even) */
SA_INLINE void vbh_zip_f32(vf_t a, vf_t b, uint32_t *d)
{
    uint16x4x2_t z = vzip_u16(vreinterpret_u16_bf16(vcvt_bf16_f32(a)), vreinterpret_u16_bf16(vcvt_bf16_f32(b)));
    vst1q_u16((uint16_t *)(void *)d, vcombine_u16(z.val[0], z.val[1]));
}
/* the first (hi 0) or second (hi 1) bfloat16 of VW words, widened (exact) */
SA_INLINE vf_t vbh_half(const uint32_t *w, int hi)
{
    uint32x4_t x = vld1q_u32(w);
    return vreinterpretq_f32_u32(hi ? vandq_u32(x, vdupq_n_u32(0xffff0000u)) : vshlq_n_u32(x, 16));
}
