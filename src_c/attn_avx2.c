/* attn_avx2.c -- the kernels compiled for x86-64 AVX2 + FMA + F16C (selected at run
 * time by dispatch.c; the rest of the extension stays baseline x86-64). */
#include <math.h>
#include "attn_internal.h"

#if SA_HAVE_X86_TARGETS
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#include "simd_avx2.h"

#define ISUF avx2

/* 16 ymm registers: MR x 2 accumulators + operands (overridable for tuning
 * experiments: -DSA_AVX2_MR=...). float: the 6 x 16 micro-tile (12 of the 16
 * registers accumulate) measured 5-8 % faster than 4 x 16 on a Zen 4 forced
 * to AVX2 (B1 H8 L1024/4096 E64/128, ViT, Whisper; Python A/B, interleaved);
 * BQ must then be a multiple of lcm(6, 8) = 24. double: 6 x 8 gained 2-4 %
 * only, kept at 4 x 8. */
#ifndef SA_AVX2_MR
#define SA_AVX2_MR 6
#endif
#ifndef SA_AVX2_NRV
#define SA_AVX2_NRV 2
#endif
#ifndef SA_AVX2_NVV
#define SA_AVX2_NVV 2
#endif
#ifndef SA_AVX2_BQ
#define SA_AVX2_BQ 48
#endif
#define T float
#define VP vf
#define VW VF_W
#define TSUF f32
#define STORE16 1
#define MR SA_AVX2_MR
#define NRV SA_AVX2_NRV
#define NVV SA_AVX2_NVV
#define BQ SA_AVX2_BQ
#define BK 128
#include "attn_kernels.h"

#ifndef SA_AVX2_MR64
#define SA_AVX2_MR64 4
#endif
#ifndef SA_AVX2_BQ64
#define SA_AVX2_BQ64 64
#endif
#define T double
#define VP vd
#define VW VD_W
#define TSUF f64
#define STORE16 0
#define MR SA_AVX2_MR64
#define NRV 2
#define NVV 2
#define BQ SA_AVX2_BQ64
#define BK 128
#include "attn_kernels.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
