/* attn_generic.c -- the portable kernels: plain C, any architecture. */
#include <math.h>
#include "attn_internal.h"
#include "simd_generic.h"

#define ISUF generic

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
