/* attn_avx512.c -- the kernels compiled for x86-64 AVX-512 F/DQ/BW/VL
 * (selected at run time by dispatch.c). */
#include <math.h>
#include <string.h>
#include "attn_internal.h"

#if SA_HAVE_X86_TARGETS
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#endif
#include "simd_avx512.h"

#define ISUF avx512

/* 32 zmm registers: 8 x 2 accumulators + operands */
#define T float
#define VP vf
#define VW VF_W
#define TSUF f32
#define STORE16 1
#define MR 8
#define NRV 2
#define NVV 2
#define BQ 64
#define BK 128
#include "attn_kernels.h"

#define T double
#define VP vd
#define VW VD_W
#define TSUF f64
#define STORE16 0
#define MR 8
#define NRV 2
#define NVV 2
#define BQ 64
#define BK 128
#include "attn_kernels.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

/* The avx512bf16 target (AVX-512 above plus AVX512_BF16: Cooper Lake,
 * Sapphire Rapids and later, Zen 4, Zen 5): bfloat16's forward, backward
 * and decode scores on vdpbf16ps, its functions alone compiled with that
 * extension (dispatch.c runs them only where the CPU reports it). Same tiles
 * as avx512's float. */
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,avx512bf16"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,avx512bf16")
#endif
#include "simd_avx512bf16.h"
#undef ISUF
#define ISUF avx512bf16
#define BF16_BASE_ISUF avx512
#define BF16_DECODE_PAIRS 1
#define T float
#define VP vf
#define VW VF_W
#define TSUF f32
#define STORE16 1
#define BF16_DOT 1
#define MR 8
#define NRV 2
#define NVV 2
#define BQ 64
#define BK 128
#include "attn_kernels.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

/* The avx512amx target (avx512bf16 above plus AMX-TILE and AMX-BF16:
 * Sapphire Rapids and later): bfloat16's forward and backward on AMX tiles
 * (attn_amx.h), the rest of its pairs code (packing, P rounding)
 * avx512bf16's; every other storage's avx512's. No decode is compiled:
 * dispatch.c's table gives it avx512's (on Intel's cores widening outruns
 * vdpbf16ps, see sa_isa_preferred). */
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,avx512bf16,amx-tile,amx-bf16"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,avx512bf16,amx-tile,amx-bf16")
#endif
#undef ISUF
#define ISUF avx512amx
#define BF16_BASE_ISUF avx512
#define T float
#define VP vf
#define VW VF_W
#define TSUF f32
#define STORE16 1
#define BF16_DOT 1
#define BF16_AMX 1
#define MR 8
#define NRV 2
#define NVV 2
#define BQ 64
#define BK 128
#include "attn_kernels.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
