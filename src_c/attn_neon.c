/* attn_neon.c -- the kernels for aarch64 Advanced SIMD (NEON), baseline on
 * every aarch64 CPU: compiled there without extra flags, and to nothing on
 * every other architecture. */
#include <math.h>
#include "attn_internal.h"

#if SA_HAVE_NEON_TARGET
#include "simd_neon.h"

#define ISUF neon

/* 32 q registers: 6 x 4 accumulators + 4 K (or V) vectors + 1 broadcast = 29.
 * Per step of the Q.K^T loop: 24 FMAs against 4 + 6 loads (ld1r for the
 * broadcasts), so the 4 FP pipes of Neoverse V1 / Apple M1 bound it, not the
 * load ports (bench/README.md, "aarch64: NEON path, llvm-mca estimates"). */
#ifndef SA_NEON_MR
#define SA_NEON_MR 6
#endif
#ifndef SA_NEON_NRV
#define SA_NEON_NRV 4
#endif
#ifndef SA_NEON_NVV
#define SA_NEON_NVV 4
#endif

#define T float
#define VP vf
#define VW VF_W
#define TSUF f32
#define MR SA_NEON_MR
#define NRV SA_NEON_NRV
#define NVV SA_NEON_NVV
#define BQ 48
#define BK 128
#include "attn_fwd_body.h"

#define T double
#define VP vd
#define VW VD_W
#define TSUF f64
#define MR SA_NEON_MR
#define NRV SA_NEON_NRV
#define NVV SA_NEON_NVV
#define BQ 48
#define BK 128
#include "attn_fwd_body.h"
#endif
