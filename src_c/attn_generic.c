/* attn_generic.c -- the portable kernels: plain C, any architecture. */
#include <math.h>
#include "attn_internal.h"
#include "simd_generic.h"

#define ISUF generic

#ifndef SA_GEN_MR
#define SA_GEN_MR 4
#endif
#ifndef SA_GEN_NRV
#define SA_GEN_NRV 2
#endif
#ifndef SA_GEN_NVV
#define SA_GEN_NVV 2
#endif
#ifndef SA_GEN_BQ
#define SA_GEN_BQ 64
#endif
#ifndef SA_GEN_BK
#define SA_GEN_BK 128
#endif

#define T float
#define VP vf
#define VW VF_W
#define TSUF f32
#define STORE16 1
#define MR SA_GEN_MR
#define NRV SA_GEN_NRV
#define NVV SA_GEN_NVV
#define BQ SA_GEN_BQ
#define BK SA_GEN_BK
#include "attn_kernels.h"

#define T double
#define VP vd
#define VW VD_W
#define TSUF f64
#define STORE16 0
#define MR SA_GEN_MR
#define NRV SA_GEN_NRV
#define NVV SA_GEN_NVV
#define BQ SA_GEN_BQ
#define BK SA_GEN_BK
#include "attn_kernels.h"
