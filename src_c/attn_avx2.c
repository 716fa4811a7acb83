/* attn_avx2.c -- the kernels compiled for x86-64 AVX2 + FMA (selected at run
 * time by dispatch.c; the rest of the extension stays baseline x86-64). */
#include <math.h>
#include "attn_internal.h"

#if SA_HAVE_X86_TARGETS
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#include "simd_avx2.h"

#define ISUF avx2

/* 16 ymm registers: 4 x 2 accumulators + operands */
#define T float
#define VP vf
#define VW VF_W
#define TSUF f32
#define MR 4
#define NRV 2
#define NVV 2
#define BQ 64
#define BK 128
#include "attn_fwd_body.h"

#define T double
#define VP vd
#define VW VD_W
#define TSUF f64
#define MR 4
#define NRV 2
#define NVV 2
#define BQ 64
#define BK 128
#include "attn_fwd_body.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
