/* attn_neon.c -- the kernels for aarch64 Advanced SIMD (NEON), baseline on
 * every aarch64 CPU: compiled there without extra flags, and to nothing on
 * every other architecture. */
#include <math.h>
#include "attn_internal.h"

#if SA_HAVE_NEON_TARGET
#include "simd_neon.h"

#define ISUF neon

/* 32 q registers: 5 x 4 accumulators + 4 K (or V) vectors + 5 scalars for
 * the by-element FMAs = 29. 6 x 4 would need 34 with GCC, which then keeps one
 * accumulator on the stack (a store-load chain every step). Per step of the
 * Q.K^T and P.V loops: 20 FMAs against 4 vector + 5 scalar loads, so the FP
 * pipes bound it, not the load ports: llvm-mca puts both loops at 94%
 * (GCC 12) and 99% (Clang 19) of the FMA peak on Neoverse V1 and Apple M1
 * (bench/neon_mca.py; bench/README.md, "aarch64: NEON path, llvm-mca
 * estimates"). BQ: a multiple of MR and of the 4 float lanes. */
#ifndef SA_NEON_MR
#define SA_NEON_MR 5
#endif
#ifndef SA_NEON_NRV
#define SA_NEON_NRV 4
#endif
#ifndef SA_NEON_NVV
#define SA_NEON_NVV 4
#endif
#ifndef SA_NEON_BQ
#define SA_NEON_BQ 40
#endif

#define T float
#define VP vf
#define VW VF_W
#define TSUF f32
#define STORE16 1
#define MR SA_NEON_MR
#define NRV SA_NEON_NRV
#define NVV SA_NEON_NVV
#define BQ SA_NEON_BQ
#define BK 128
#include "attn_kernels.h"

#define T double
#define VP vd
#define VW VD_W
#define TSUF f64
#define STORE16 0
#define MR SA_NEON_MR
#define NRV SA_NEON_NRV
#define NVV SA_NEON_NVV
#define BQ SA_NEON_BQ
#define BK 128
#include "attn_kernels.h"

/* The neonbf16 target (NEON plus the Armv8.6 BF16 extension: Neoverse V1 /
 * N2 / V2, Graviton 3 and later, Apple M2 and later; dispatch.c runs it
 * only where the CPU reports it, HWCAP2_BF16): bfloat16's forward and
 * backward on BFDOT (attn_bf16dot.h), its functions alone compiled with
 * that extension; its decode and every other storage are neon's. Same tiles
 * as neon's float. */
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("bf16"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+bf16")
#endif
#include "simd_neonbf16.h"
#undef ISUF
#define ISUF neonbf16
#define BF16_BASE_ISUF neon
#define T float
#define VP vf
#define VW VF_W
#define TSUF f32
#define STORE16 1
#define BF16_DOT 1
#define MR SA_NEON_MR
#define NRV SA_NEON_NRV
#define NVV SA_NEON_NVV
#define BQ SA_NEON_BQ
#define BK 128
#include "attn_kernels.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
