/*
 * attn_kernels.h -- every kernel of one (instruction set, dtype), the one
 * list of what is compiled per target. Included by attn_<target>.c once per
 * dtype, after defining:
 *   T     float | double           VP   vf | vd (the SIMD layer's prefix)
 *   VW    lanes of VP's vector      TSUF f32 | f64      ISUF the target name
 *   MR    rows of a micro-tile      NRV  key vectors of a Q.K^T micro-tile
 *   NVV   value vectors of a P.V micro-tile
 *   BQ    query rows per task       BK   keys per block
 *   STORE16  1 where 16-bit storage may be given (T float), else 0
 *   BF16_DOT 1 for the bfloat16-dot targets (avx512bf16, neonbf16; optional,
 *            default 0): bfloat16 storage computed on bfloat16 pairs
 *            (attn_bf16dot.h on simd_<target>bf16.h's vbh_*; the bodies'
 *            BF16_DOT branches) in the forward and the backward; every
 *            other storage is handed at each kernel's top to the functions
 *            of BF16_BASE_ISUF (avx512, neon), the target it extends
 *   BF16_DECODE_PAIRS 1 (avx512bf16): the decode's scores on pairs too
 *            (attn_micro.h, decode_dots_pairs); else the base's decode
 *   BF16_AMX 1 (avx512amx, with BF16_DOT): the forward's Q.K^T and P.V
 *            and the backward's five products on AMX tiles (attn_amx.h)
 *            instead of vbh_dot; no decode is compiled (dispatch.c's
 *            table gives avx512's)
 * It defines attn_fwd_, attn_decode_, attn_bwd_<TSUF>_<ISUF> (dispatch.c's
 * function table lists them) and sa_params_<TSUF>_<ISUF>, and undefines the
 * macros above. The pieces, in order (each a template on these macros; no
 * body includes another):
 *   attn_pack.h         K/V packing (a key block transposed or as rows) and the
 *                       arrays' storage: 16-bit q, k, v widened where loaded,
 *                       out rounded where written (sa_attn_args.storage)
 *   attn_micro.h        register-blocked micro-kernels of the three bodies
 *   attn_rows.h         score rows: softcap, ALiBi, attn_mask (mask_row),
 *                       the online-softmax step
 *   lse_merge.h         the log-sum-exp merge (merge.c's too)
 *   attn_fwd_body.h     the forward: shared, fused and banded schedules
 *   attn_decode_body.h  the forward's decode schedule (split-KV)
 *   attn_bwd_body.h     the backward
 * A new mask kind is one branch of attn_rows.h's mask_row; a new compute
 * dtype one more inclusion per target (and a column of dispatch.c's table);
 * a new storage dtype (computed in float32) a case of attn_pack.h's load_row
 * and store_row, with its row conversions in simd_<target>.h.
 */

#define FN(name) SA_CAT(name, SA_CAT(_, SA_CAT(TSUF, SA_CAT(_, ISUF))))
/* a BF16_DOT target's base target's function (its other storages' kernels) */
#define BF16_BASE(name) SA_CAT(name, SA_CAT(_, SA_CAT(TSUF, SA_CAT(_, BF16_BASE_ISUF))))
#define V(op) SA_CAT(VP, SA_CAT(_, op))
#define VT SA_CAT(VP, _t)

/* Tile geometry derived from the target's macros. */
#define KEYS_PER_TILE (NRV * VW)      /* keys of a forward Q.K^T micro-tile */
/* decode: P.V micro-tile width in vectors: 4 rows x DEC_NV accumulators plus
 * DEC_NV loaded V vectors fit in the register file (32 zmm; 16 ymm) */
#define DEC_NV (VW * (int)sizeof(T) >= 64 ? 4 : 2)
/* backward: rows of a micro-tile, MR where one of MR and VW divides the other
 * (then key ranges aligned to BWD_KEY_ALIGN serve both the score vectors and
 * the micro-tiles of dK and dV), else 4 */
#define BWD_MR ((VW % MR == 0 || MR % VW == 0) ? MR : 4)
#define BWD_KEY_ALIGN (VW > BWD_MR ? VW : BWD_MR)

/* What the kernels assume of their tile sizes, checked when they are
 * compiled: whole micro-tiles per query tile and key block, and the row
 * arrays (m, l, msafe, alpha) are processed VW rows at a time up to BQ. */
_Static_assert(BQ % MR == 0, "BQ must be a multiple of MR");
_Static_assert(BQ % VW == 0, "BQ must be a multiple of VW (row arrays are read VW rows at a time)");
_Static_assert(BK % KEYS_PER_TILE == 0, "BK must be a multiple of NRV * VW");
_Static_assert(NVV >= 1 && NRV >= 1 && MR >= 1, "micro-tiles must be non-empty");
_Static_assert(BWD_KEY_ALIGN % VW == 0 && BWD_KEY_ALIGN % BWD_MR == 0 && BK % BWD_KEY_ALIGN == 0 && BQ % BWD_MR == 0,
               "backward tiles: BWD_KEY_ALIGN must be a multiple of VW and BWD_MR, and divide BK");

const sa_tile_params FN(sa_params) = {VW, MR, KEYS_PER_TILE, NVV * VW, BQ, BK};

/* x (natural-log units) in the kernels' log2 units, rounded once to T */
static inline T FN(log2_units)(double x) { return (T)(x * SA_LOG2E); }

#ifndef BF16_DOT
#define BF16_DOT 0
#endif
#ifndef BF16_DECODE_PAIRS
#define BF16_DECODE_PAIRS 0
#endif
#ifndef BF16_AMX
#define BF16_AMX 0
#endif

#include "score_mod.h"     /* here, not in attn_internal.h: compiled for the target */
#include "attn_pack.h"
#include "attn_micro.h"
#include "attn_rows.h"
#if BF16_DOT
#include "attn_bf16dot.h"
#endif
#if BF16_AMX
#include "attn_amx.h"
#endif

/* the split-KV merge of the decode schedule: unnormalised partials (O, m, l)
 * in log2 units, summed in T (avx512amx: no decode of its own) */
#if !BF16_AMX
#define LM_FN FN
#define LM_T T
#define LM_ACC T
#define LM_EXP exp2
#define LM_LN_UNIT SA_LN2
#define LM_NORMALISED 0
#include "lse_merge.h"
#endif

#include "attn_fwd_body.h"
#if !BF16_AMX                  /* avx512amx: no decode of its own (avx512's) */
#include "attn_decode_body.h"
#endif
#include "attn_bwd_body.h"

#undef FN
#undef V
#undef VT
#undef STORE16
#undef BF16_DOT
#undef BF16_DECODE_PAIRS
#undef BF16_AMX
#undef BF16_BASE_ISUF
#undef KEYS_PER_TILE
#undef DEC_NV
#undef BWD_MR
#undef BWD_KEY_ALIGN
#undef T
#undef VP
#undef VW
#undef TSUF
#undef MR
#undef NRV
#undef NVV
#undef BQ
#undef BK
