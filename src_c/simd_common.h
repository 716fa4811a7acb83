/*
 * simd_common.h -- shared pieces of the per-target SIMD layers.
 *
 * Each simd_<target>.h defines, for float (vf_*) and double (vd_*):
 *   vf_t            the vector type; VF_W lanes
 *   vf_zero() vf_set1(x) vf_load(p) vf_store(p,v) vf_bcast(p)
 *   vf_add vf_sub vf_mul vf_div vf_fma(a,b,c)=a*b+c  vf_max(a,b)
 *   vf_hmax(v) vf_hsum(v)   horizontal max / sum in a fixed order
 *   vf_hsum4(a, b, c, d, o) o[0..3] = the horizontal sums of a, b, c, d, in a fixed order
 *                           (pairwise where the target has it: fewer shuffles than 4 hsums)
 *   vf_exp2(x)             2^x (NaN in -> NaN out); the softmax only passes x <= 0,
 *                          softcap's tanh also x > 0. Underflow differs by
 *                          target: generic and AVX2 build the exponent by hand and
 *                          flush to 0 below about -126.5 (float) / -1022.5 (double);
 *                          AVX-512 (vscalef) keeps subnormals, 0 below -150 / -1080.
 *                          x >= 128 (float) / 1024 (double) gives +inf.
 *   vf_transpose(src, ss, dst, ds)   dst[c*ds + r] = src[r*ss + c], r, c < VF_W
 * and, for the 16-bit storage of sa_attn_args.storage (float only; half.h for
 * the values that do not fill a vector, and the targets without a native form):
 *   vf_from_f16_row(s, d, n)  vf_from_bf16_row(s, d, n)   d[i] = (float)s[i], exact
 *   vf_load_f16(p)  vf_load_bf16(p)   VF_W 16-bit values at p widened to a vector, exact
 *   vf_to_f16_row(s, d, n)    d[i] = s[i] rounded to float16, to nearest even
 *                             (bfloat16 is written by half.h's sa_f32_to_bf16)
 *   vf_load_i8(p)             VF_W int8 values at p (quantized K/V) as floats, exact
 *   vf_load_e4m3(p)  vf_load_e5m2(p)   VF_W float8 values at p (K/V): e5m2 exact, e4m3fn
 *                             exact x 2^-8 (half.h: SA_E4M3_UNIT goes into the scale)
 * The kernels (attn_kernels.h and the headers it includes) are written once
 * against these names.
 */
#ifndef SELFATTN_SIMD_COMMON_H
#define SELFATTN_SIMD_COMMON_H

#include <stdint.h>

/* 2^f on [-0.5, 0.5]: least-squares fits on Chebyshev nodes, max relative
 * error 1.6e-8 (float, degree 6) and 3.6e-17 (double, degree 11). */
#define SA_EXP2F_C1 0.6931471824645996f
#define SA_EXP2F_C2 0.24022646248340607f
#define SA_EXP2F_C3 0.05550329014658928f
#define SA_EXP2F_C4 0.009618519805371761f
#define SA_EXP2F_C5 0.0013399859890341759f
#define SA_EXP2F_C6 0.00015337577497120947f

#define SA_EXP2D_C1 0.6931471805599453
#define SA_EXP2D_C2 0.24022650695910155
#define SA_EXP2D_C3 0.055504108664819855
#define SA_EXP2D_C4 0.009618129107588462
#define SA_EXP2D_C5 0.0013333558146805236
#define SA_EXP2D_C6 0.00015403530462376356
#define SA_EXP2D_C7 1.525273347609763e-05
#define SA_EXP2D_C8 1.321543315189853e-06
#define SA_EXP2D_C9 1.0178203546050033e-07
#define SA_EXP2D_C10 7.074095745687914e-09
#define SA_EXP2D_C11 4.4344834580530274e-10

#define SA_CAT2(a, b) a##b
#define SA_CAT(a, b) SA_CAT2(a, b)

#if defined(__GNUC__) || defined(__clang__)
#define SA_INLINE static inline __attribute__((always_inline))
#define SA_NOINLINE static __attribute__((noinline, unused))
#define SA_RESTRICT __restrict__
#else
#define SA_INLINE static inline
#define SA_NOINLINE static
#define SA_RESTRICT
#endif

#endif
