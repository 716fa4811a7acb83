/*
 * half.h -- bfloat16 and IEEE float16 <-> float32, one value at a time, in
 * plain C (no compiler extension): what every target can use, and what the
 * generic target does use. Conversions to float32 are exact; to 16 bits they
 * round to nearest, ties to even (as NumPy, ml_dtypes and torch do), keep
 * the sign of zero, give +-inf past the largest finite value and keep NaN a
 * (quiet) NaN.
 */
#ifndef SELFATTN_HALF_H
#define SELFATTN_HALF_H

#include <stdint.h>
#include <string.h>

static inline float sa_bits_f32(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline uint32_t sa_f32_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

/* bfloat16 is the top half of a float32 */
static inline float sa_bf16_to_f32(uint16_t h) { return sa_bits_f32((uint32_t)h << 16); }

static inline uint16_t sa_f32_to_bf16(float f)
{
    uint32_t b = sa_f32_bits(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40u);   /* NaN: stays quiet NaN */
    b += 0x7fffu + ((b >> 16) & 1u);                                             /* nearest, ties to even */
    return (uint16_t)(b >> 16);
}

/* float16: 1 sign, 5 exponent (bias 15), 10 mantissa bits */
static inline float sa_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return sa_bits_f32(sign | 0x7f800000u | (man << 13));       /* inf, NaN */
    if (exp != 0) return sa_bits_f32(sign | ((exp + 112u) << 23) | (man << 13)); /* normal */
    /* zero or subnormal: man * 2^-24, exact in float32 */
    float v = (float)man * 5.9604644775390625e-8f;
    return sign ? -v : v;
}

static inline uint16_t sa_f32_to_f16(float f)
{
    uint32_t b = sa_f32_bits(f);
    uint16_t sign = (uint16_t)((b >> 16) & 0x8000u);
    uint32_t a = b & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  /* NaN, kept quiet */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);   /* rounds past 65504 (or inf): inf */
    if (a >= 0x38800000u) {                                    /* normal float16 (>= 2^-14) */
        uint32_t r = a + 0xfffu + ((a >> 13) & 1u);            /* nearest, ties to even, at bit 13 */
        return (uint16_t)(sign | ((r - 0x38000000u) >> 13));   /* rebias 127 -> 15 */
    }
    if (a < 0x33000000u) return sign;                          /* below half the smallest subnormal: 0 */
    /* subnormal float16: round a's value to a multiple of 2^-24 */
    uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;     /* value = m * 2^(e - 150) */
    uint32_t shift = 126u - e;                                 /* 14 .. 24: m >> shift units of 2^-24 */
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (uint16_t)(sign | q);                               /* q == 0x400: the smallest normal */
}

/* float8 (OCP 8-bit floats, K/V storage only; ml_dtypes' float8_e4m3fn and
 * float8_e5m2), widened through float16, whose bits they fit into:
 *   e5m2 (1 sign, 5 exponent bias 15, 2 mantissa) is the top byte of a
 *     float16, inf and NaN included;
 *   e4m3fn (1 sign, 4 exponent bias 7, 3 mantissa, no inf, NaN = S.1111.111)
 *     moved to float16's exponent and mantissa bits is its value x 2^-8
 *     (float16's bias is 8 more), subnormals included; its NaN is made one.
 * The vector loaders (simd_<target>.h's vf_load_e4m3 / vf_load_e5m2) do the
 * same on whole vectors; e4m3fn's are x 2^-8 there too (the scale takes the
 * 2^8, SA_E4M3_UNIT), so these give the exact value and the _f16 forms the
 * loaders' bits. */
#define SA_E4M3_UNIT 256.0f
static inline uint16_t sa_e4m3_f16_bits(uint8_t x)
{
    uint16_t h = (uint16_t)(((x & 0x80u) << 8) | ((x & 0x7fu) << 7));
    return (x & 0x7fu) == 0x7fu ? (uint16_t)(h | 0x7c00u) : h;    /* NaN: exponent all ones, mantissa 111 */
}
static inline float sa_e4m3_to_f32(uint8_t x) { return sa_f16_to_f32(sa_e4m3_f16_bits(x)) * SA_E4M3_UNIT; }
static inline float sa_e5m2_to_f32(uint8_t x) { return sa_f16_to_f32((uint16_t)(x << 8)); }

#endif
