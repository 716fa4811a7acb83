/*
 * score_mod.h -- the interpreter of score_mod programs (sa_score_mod in
 * selfattn.h; traced from Python by selfattn/_scoremod.py), and the check
 * the dispatcher runs on them (sa_sm_ok).
 *
 * Included by the kernels' template (attn_kernels.h), after the target's
 * pragma: each instruction set gets its own vectorised copy.
 *
 * Shapes: one call evaluates a program for one query row over n <= SA_SM_CHUNK
 * consecutive keys (the kernels: a tile row's keys, one call): every node is
 * a vector of n values, double or int64 (sa_sm_slot).
 * Passes: node by node in order, each a plain loop over the n keys (the
 * compiler vectorises the arithmetic ones): the per-node dispatch is paid once
 * per row of keys, not per key. Arithmetic follows NumPy's (floor_divide
 * and remainder round toward -inf, integer division by zero gives 0, minimum
 * and maximum propagate NaN) so that the kernels agree with the float64
 * reference, which evaluates the same program in NumPy.
 */
#ifndef SELFATTN_SCORE_MOD_H
#define SELFATTN_SCORE_MOD_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include "selfattn.h"

#define SA_SM_SMALL ((int64_t)1 << 31)   /* a strided load's bound on |c|, keys, |row index| / 2^31 */
#define SA_SM_CHUNK 128          /* keys per evaluation (a tile row: one call): 128 x 128 x 8
                                    bytes of stack */

/* a node's values: float or integer, as its opcode says (each node writes one
 * member and its readers read that one) */
typedef union {
    double f[SA_SM_CHUNK];
    int64_t i[SA_SM_CHUNK];
} sa_sm_slot;

typedef struct {
    sa_sm_slot v[SA_SM_MAX_NODES];
    uint8_t varies[SA_SM_MAX_NODES];   /* depends on the score or kv_idx: a load whose
                                          indices do not is read strided (sa_sm_load) */
} sa_sm_regs;

/* ---- exp, log and tanh that vectorise (libm's are calls, one value at a time:
 * softcap through score_mod ran at 0.15x the plain kernel with them). Within
 * ~2 ulp of libm; special values as libm's: exp(-inf) = 0, exp(inf) = inf,
 * log(0) = -inf, log(x < 0) = NaN, tanh(+-inf) = +-1, NaN through. Bits moved
 * with memcpy (vectorised as register moves). */
static inline double sa_sm_from_bits(uint64_t u) { double d; memcpy(&d, &u, 8); return d; }
static inline uint64_t sa_sm_bits(double d) { uint64_t u; memcpy(&u, &d, 8); return u; }

static inline double sa_sm_exp(double x)
{
    const double shift = 6755399441055744.0;                  /* 1.5 * 2^52: rounds to an integer */
    double t = x * 1.4426950408889634;                        /* x log2(e) */
    t = t > 1100.0 ? 1100.0 : t;
    t = t < -1100.0 ? -1100.0 : t;                            /* (NaN stays NaN) */
    double nd = (t + shift) - shift;                          /* n = round(t) */
    double hd = nd * 0.5;                                     /* 2^n as 2^n1 2^(n - n1), both normal */
    int64_t n = (int64_t)(sa_sm_bits(t + shift) - sa_sm_bits(shift));
    int64_t n1 = (int64_t)(sa_sm_bits(hd + shift) - sa_sm_bits(shift)), n2 = n - n1;   /* no int64 division */
    double r = (x - nd * 6.93147180369123816490e-01) - nd * 1.90821492927058770002e-10;   /* |r| <= 0.35 */
    /* e^r, Taylor to r^12 (error < 2e-16 relative at |r| = 0.35) */
    double p = 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    double y = p * sa_sm_from_bits((uint64_t)(n1 + 1023) << 52) * sa_sm_from_bits((uint64_t)(n2 + 1023) << 52);
    y = x < -746.0 ? 0.0 : y;
    return x > 710.0 ? (double)INFINITY : y;
}

static inline double sa_sm_log(double x)
{
    double xs = x < 2.2250738585072014e-308 ? x * 18014398509481984.0 : x;   /* subnormal: x 2^54 */
    uint64_t u = sa_sm_bits(xs);
    int64_t e = (int64_t)((u >> 52) & 0x7ff) - (x < 2.2250738585072014e-308 ? 1077 : 1023);
    double m = sa_sm_from_bits((u & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL);   /* [1, 2) */
    e += m > 1.4142135623730951 ? 1 : 0;
    m = m > 1.4142135623730951 ? m * 0.5 : m;
    double f = m - 1.0, s = f / (2.0 + f), z = s * s;      /* log(m) = 2 atanh(s), |s| <= 0.172 */
    double p = 1.0 / 23.0;
    p = p * z + 1.0 / 21.0;
    p = p * z + 1.0 / 19.0;
    p = p * z + 1.0 / 17.0;
    p = p * z + 1.0 / 15.0;
    p = p * z + 1.0 / 13.0;
    p = p * z + 1.0 / 11.0;
    p = p * z + 1.0 / 9.0;
    p = p * z + 1.0 / 7.0;
    p = p * z + 1.0 / 5.0;
    p = p * z + 1.0 / 3.0;
    /* (double)e without an int64 -> double conversion (AVX2 has none): through 2^52's bits */
    double ed = sa_sm_from_bits(0x4330000000000000ULL + (uint64_t)(e + 2048)) - (4503599627370496.0 + 2048.0);
    /* f - (f - 2 s p') keeps the small terms exact: log(m) = f - f^2/2 + ... = 2s + 2s z p */
    double lm = 2.0 * s + 2.0 * s * z * p;
    double y = ed * 6.93147180369123816490e-01 + (ed * 1.90821492927058770002e-10 + lm);
    y = x == 0.0 ? -(double)INFINITY : y;
    y = x < 0.0 ? (double)NAN : y;
    y = x == (double)INFINITY ? x : y;
    return x != x ? x : y;
}

static inline double sa_sm_tanh(double x)
{
    double a = fabs(x), z = x * x;
    /* |x| < 0.625: x + x z P(z) / Q(z) (Cephes' tanh); above, 1 - 2 / (e^2|x| + 1) */
    double P = (-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z - 1.61468768441708447952e3;
    double Q = ((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z + 4.84406305325125486048e3;
    double small = x + x * z * (P / Q);
    double e = sa_sm_exp(2.0 * (a > 40.0 ? 40.0 : a));
    double big = 1.0 - 2.0 / (e + 1.0);
    big = x < 0 ? -big : big;
    small = x == 0.0 ? x : small;                            /* tanh(-0) = -0 */
    return a < 0.625 ? small : (x != x ? x : big);
}

/* NumPy's float floor_divide and remainder (npy_divmod): exact where a / b
 * rounds to an integer that floor(a / b) would miss */
static inline double sa_sm_divmod(double a, double b, double *mod)
{
    double m = fmod(a, b), div, fl;
    if (b == 0) {
        *mod = m;
        return a / b;
    }
    div = (a - m) / b;
    if (m != 0) {
        if ((b < 0) != (m < 0)) {
            m += b;
            div -= 1.0;
        }
    } else {
        m = copysign(0.0, b);
    }
    if (div != 0) {
        fl = floor(div);
        if (div - fl > 0.5) fl += 1.0;
    } else {
        fl = copysign(0.0, a / b);
    }
    *mod = m;
    return fl;
}

static inline int64_t sa_sm_ifloordiv(int64_t a, int64_t b)
{
    if (b == 0) return 0;
    if (b == -1) return (int64_t)(0 - (uint64_t)a);           /* INT64_MIN / -1 wraps, as NumPy */
    int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

static inline int64_t sa_sm_imod(int64_t a, int64_t b)
{
    if (b == 0 || b == -1) return 0;
    int64_t r = a % b;
    return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r;
}

static inline int64_t sa_sm_ipow(int64_t a, int64_t e)
{
    uint64_t r = 1, x = (uint64_t)a;                          /* wraps like NumPy's int64 */
    if (e < 0) return a == 1 ? 1 : a == -1 ? ((e & 1) ? -1 : 1) : 0;
    for (; e; e >>= 1, x *= x)
        if (e & 1) r *= x;
    return (int64_t)r;
}

static inline int64_t sa_sm_trunc(double x)
{
    /* NumPy's cast gives INT64_MIN for NaN and out-of-range values on x86 */
    return (x != x || x >= 9223372036854775808.0 || x < -9223372036854775808.0) ? INT64_MIN : (int64_t)x;
}

/* operands a node reads (a load: its array's dims) */
static inline int sa_sm_nargs(const sa_score_mod *m, const sa_sm_node *nd)
{
    switch (nd->op) {
    case SA_SM_SCORE: case SA_SM_FCONST: case SA_SM_B: case SA_SM_H: case SA_SM_Q: case SA_SM_KV: case SA_SM_ICONST:
        return 0;
    case SA_SM_FNEG: case SA_SM_FABS: case SA_SM_FEXP: case SA_SM_FLOG: case SA_SM_FTANH: case SA_SM_FSQRT:
    case SA_SM_FFLOOR: case SA_SM_FCAST: case SA_SM_INEG: case SA_SM_IABS: case SA_SM_ITRUNC: case SA_SM_NOT:
        return 1;
    case SA_SM_FWHERE: case SA_SM_IWHERE:
        return 3;
    case SA_SM_FLOAD: case SA_SM_ILOAD:
        return m->ndim[nd->arr];
    default:
        return 2;
    }
}

/* off[j] = off[j] dn + index j on an axis of dn (a load's offsets, one axis at
 * a time); below 0 wraps once (NumPy's), still outside is clamped: returns
 * nonzero then. Written so that it vectorises (restrict, no chained ?:). */
static inline int64_t sa_sm_offsets(const int64_t *restrict ix, int64_t dn, int64_t *restrict off, int n)
{
    int64_t bad = 0;
    for (int j = 0; j < n; j++) {
        int64_t v = ix[j];
        int64_t x = v < 0 ? v + dn : v;
        int64_t c = x < 0 ? 0 : x;
        c = c > dn - 1 ? dn - 1 : c;
        bad |= (c != x);
        off[j] = off[j] * dn + c;
    }
    return bad;
}

static inline void sa_sm_gather_f(const double *restrict src, const int64_t *restrict off, double *restrict f, int n)
{
    for (int j = 0; j < n; j++) f[j] = src[off[j]];
}

static inline void sa_sm_gather_i(const int64_t *restrict src, const int64_t *restrict off, int64_t *restrict o,
                                  int n)
{
    for (int j = 0; j < n; j++) o[j] = src[off[j]];
}

/* whether op's result is an integer (int64) node */
static inline int sa_sm_is_int(int32_t op) { return op >= SA_SM_B; }

/* A load (SA_SM_FLOAD / SA_SM_ILOAD) of keys kv0 .. kv0 + n - 1 into f or o. */
static void sa_sm_load(const sa_score_mod *m, const sa_sm_node *nd, const sa_sm_regs *R, int64_t kv0, int n,
                       double *f, int64_t *o)
{
    const int32_t a = nd->arr, ndim = m->ndim[a], ax = nd->kv_axis;
    const int64_t *dims = m->dims + (int64_t)a * SA_SM_MAX_DIMS, c = nd->i;
    int64_t off[SA_SM_CHUNK], idx[SA_SM_CHUNK], bad = 0;
    /* small enough that no sum below wraps (NumPy's int64 would: the per-key path does) */
    int strided = ax >= 0 && c > -SA_SM_SMALL && c < SA_SM_SMALL && kv0 + n < SA_SM_SMALL, j;
    for (int32_t d = 0; d < ndim; d++) strided &= !R->varies[nd->arg[d]];
    if (strided) {        /* the row's indices: arg[d] (one value) and, on ax, first + c j */
        int64_t base = 0, step = 0;
        for (int32_t d = 0; d < ndim && strided; d++) {
            int64_t x = R->v[nd->arg[d]].i[0], dn = dims[d];
            if (d == ax) {                 /* both ends inside, no wrap: every key's is */
                if (x <= -SA_SM_SMALL * SA_SM_SMALL || x >= SA_SM_SMALL * SA_SM_SMALL) {
                    strided = 0;
                    break;
                }
                int64_t first = x + c * kv0, last = first + c * (n - 1);
                strided = first >= 0 && first < dn && last >= 0 && last < dn;
                base = base * dn + first;
                step = step * dn + c;
            } else {
                int64_t w = x < 0 ? x + dn : x, cl = w < 0 ? 0 : w > dn - 1 ? dn - 1 : w;
                bad |= cl != w;
                base = base * dn + cl;
                step = step * dn;
            }
        }
        if (strided) {
            if (nd->op == SA_SM_FLOAD) {            /* +-1: T5's contiguous run, read forward or back */
                const double *src = (const double *)m->arrays[a] + base;
                if (step == 1) for (j = 0; j < n; j++) f[j] = src[j];
                else if (step == -1) for (j = 0; j < n; j++) f[j] = src[-j];
                else for (j = 0; j < n; j++) f[j] = src[step * j];
            } else {
                const int64_t *src = (const int64_t *)m->arrays[a] + base;
                for (j = 0; j < n; j++) o[j] = src[step * j];
            }
        }
    }
    if (!strided) {       /* per key: offsets (vectorised), then a gather */
        bad = 0;
        for (j = 0; j < n; j++) off[j] = 0;
        for (int32_t d = 0; d < ndim; d++) {
            const int64_t *ix = R->v[nd->arg[d]].i;
            if (!R->varies[nd->arg[d]]) {          /* a row constant: element 0 only is computed */
                for (j = 0; j < n; j++) idx[j] = ix[0];
                ix = idx;
            }
            if (d == ax) {
                for (j = 0; j < n; j++) idx[j] = (int64_t)((uint64_t)ix[j] + (uint64_t)c * (uint64_t)(kv0 + j));
                ix = idx;
            }
            bad |= sa_sm_offsets(ix, dims[d], off, n);
        }
        if (nd->op == SA_SM_FLOAD) sa_sm_gather_f((const double *)m->arrays[a], off, f, n);
        else sa_sm_gather_i((const int64_t *)m->arrays[a], off, o, n);
    }
    if (bad && !m->oob[a]) {                              /* every writer stores the same 1 */
#ifdef _OPENMP
#pragma omp atomic write
#endif
        m->oob[a] = 1;
    }
}

/* Node values of program m for unit u, query row q, keys kv0 .. kv0 + n - 1
 * (n <= SA_SM_CHUNK), scores score[0..n) (natural-log units), nodes [0, upto). */
static inline void sa_sm_eval(const sa_score_mod *m, int32_t upto, int64_t u, int64_t q, int64_t kv0, int n,
                              const double *score, sa_sm_regs *R)
{
    const int64_t bb = u / m->n_heads, hh = u % m->n_heads;
    uint8_t vec[SA_SM_MAX_NODES];
    /* which nodes vary along the row (the score, kv_idx, what reads them); the others are
     * computed once (element 0), and spread over the row only where a varying node other
     * than a load reads them, or the caller does (out, dout): loads read them as scalars */
    for (int32_t t = 0; t < upto; t++) {
        const sa_sm_node *nd = m->nodes + t;
        int k = sa_sm_nargs(m, nd), var = nd->op == SA_SM_SCORE || nd->op == SA_SM_KV
                                          || ((nd->op == SA_SM_FLOAD || nd->op == SA_SM_ILOAD) && nd->kv_axis >= 0);
        for (int d = 0; d < k; d++) var |= R->varies[nd->arg[d]];
        R->varies[t] = (uint8_t)var;
        vec[t] = 0;
    }
    for (int32_t t = 0; t < upto; t++) {
        const sa_sm_node *nd = m->nodes + t;
        if (R->varies[t] && nd->op != SA_SM_FLOAD && nd->op != SA_SM_ILOAD)
            for (int d = 0, k = sa_sm_nargs(m, nd); d < k; d++) vec[nd->arg[d]] = 1;
    }
    if (m->out < upto) vec[m->out] = 1;
    if (m->dout < upto) vec[m->dout] = 1;
    for (int32_t t = 0; t < upto; t++) {
        const sa_sm_node *nd = m->nodes + t;
        double *f = R->v[t].f;
        int64_t *o = R->v[t].i;
        const double *fa = R->v[nd->arg[0]].f, *fb = R->v[nd->arg[1]].f, *fc = R->v[nd->arg[2]].f;
        const int64_t *ia = R->v[nd->arg[0]].i, *ib = R->v[nd->arg[1]].i, *ic = R->v[nd->arg[2]].i;
        const int nn = R->varies[t] ? n : 1;
        int j;
        switch (nd->op) {
        case SA_SM_SCORE: if (score != f) for (j = 0; j < n; j++) f[j] = score[j]; break;
        case SA_SM_FCONST: for (j = 0; j < nn; j++) f[j] = nd->f; break;
        case SA_SM_FADD: for (j = 0; j < nn; j++) f[j] = fa[j] + fb[j]; break;
        case SA_SM_FSUB: for (j = 0; j < nn; j++) f[j] = fa[j] - fb[j]; break;
        case SA_SM_FMUL: for (j = 0; j < nn; j++) f[j] = fa[j] * fb[j]; break;
        case SA_SM_FDIV: for (j = 0; j < nn; j++) f[j] = fa[j] / fb[j]; break;
        case SA_SM_FPOW: for (j = 0; j < nn; j++) f[j] = pow(fa[j], fb[j]); break;
        case SA_SM_FMIN: for (j = 0; j < nn; j++) f[j] = (fa[j] != fa[j] || fa[j] < fb[j]) ? fa[j] : fb[j]; break;
        case SA_SM_FMAX: for (j = 0; j < nn; j++) f[j] = (fa[j] != fa[j] || fa[j] > fb[j]) ? fa[j] : fb[j]; break;
        case SA_SM_FNEG: for (j = 0; j < nn; j++) f[j] = -fa[j]; break;
        case SA_SM_FABS: for (j = 0; j < nn; j++) f[j] = fabs(fa[j]); break;
        case SA_SM_FEXP: for (j = 0; j < nn; j++) f[j] = sa_sm_exp(fa[j]); break;
        case SA_SM_FLOG: for (j = 0; j < nn; j++) f[j] = sa_sm_log(fa[j]); break;
        case SA_SM_FTANH: for (j = 0; j < nn; j++) f[j] = sa_sm_tanh(fa[j]); break;
        case SA_SM_FSQRT: for (j = 0; j < nn; j++) f[j] = sqrt(fa[j]); break;
        case SA_SM_FFLOOR: for (j = 0; j < nn; j++) f[j] = floor(fa[j]); break;
        case SA_SM_FFLOORDIV: { double r; for (j = 0; j < nn; j++) f[j] = sa_sm_divmod(fa[j], fb[j], &r); } break;
        case SA_SM_FMOD: for (j = 0; j < nn; j++) (void)sa_sm_divmod(fa[j], fb[j], f + j); break;
        case SA_SM_FWHERE: for (j = 0; j < nn; j++) f[j] = ia[j] ? fb[j] : fc[j]; break;
        case SA_SM_FCAST: for (j = 0; j < nn; j++) f[j] = (double)ia[j]; break;
        case SA_SM_B: for (j = 0; j < nn; j++) o[j] = bb; break;
        case SA_SM_H: for (j = 0; j < nn; j++) o[j] = hh; break;
        case SA_SM_Q: for (j = 0; j < nn; j++) o[j] = q; break;
        case SA_SM_KV: for (j = 0; j < nn; j++) o[j] = kv0 + j; break;
        case SA_SM_ICONST: for (j = 0; j < nn; j++) o[j] = nd->i; break;
        /* int64 arithmetic wraps as NumPy's does (unsigned: no undefined overflow) */
        case SA_SM_IADD: for (j = 0; j < nn; j++) o[j] = (int64_t)((uint64_t)ia[j] + (uint64_t)ib[j]); break;
        case SA_SM_ISUB: for (j = 0; j < nn; j++) o[j] = (int64_t)((uint64_t)ia[j] - (uint64_t)ib[j]); break;
        case SA_SM_IMUL: for (j = 0; j < nn; j++) o[j] = (int64_t)((uint64_t)ia[j] * (uint64_t)ib[j]); break;
        case SA_SM_IFLOORDIV: for (j = 0; j < nn; j++) o[j] = sa_sm_ifloordiv(ia[j], ib[j]); break;
        case SA_SM_IMOD: for (j = 0; j < nn; j++) o[j] = sa_sm_imod(ia[j], ib[j]); break;
        case SA_SM_IPOW: for (j = 0; j < nn; j++) o[j] = sa_sm_ipow(ia[j], ib[j]); break;
        case SA_SM_IMIN: for (j = 0; j < nn; j++) o[j] = ia[j] < ib[j] ? ia[j] : ib[j]; break;
        case SA_SM_IMAX: for (j = 0; j < nn; j++) o[j] = ia[j] > ib[j] ? ia[j] : ib[j]; break;
        case SA_SM_INEG: for (j = 0; j < nn; j++) o[j] = (int64_t)(0 - (uint64_t)ia[j]); break;
        case SA_SM_IABS: for (j = 0; j < nn; j++) o[j] = ia[j] < 0 ? (int64_t)(0 - (uint64_t)ia[j]) : ia[j]; break;
        case SA_SM_IWHERE: for (j = 0; j < nn; j++) o[j] = ia[j] ? ib[j] : ic[j]; break;
        case SA_SM_ITRUNC: for (j = 0; j < nn; j++) o[j] = sa_sm_trunc(fa[j]); break;
        case SA_SM_FLT: for (j = 0; j < nn; j++) o[j] = fa[j] < fb[j]; break;
        case SA_SM_FLE: for (j = 0; j < nn; j++) o[j] = fa[j] <= fb[j]; break;
        case SA_SM_FGT: for (j = 0; j < nn; j++) o[j] = fa[j] > fb[j]; break;
        case SA_SM_FGE: for (j = 0; j < nn; j++) o[j] = fa[j] >= fb[j]; break;
        case SA_SM_FEQ: for (j = 0; j < nn; j++) o[j] = fa[j] == fb[j]; break;
        case SA_SM_FNE: for (j = 0; j < nn; j++) o[j] = fa[j] != fb[j]; break;
        case SA_SM_ILT: for (j = 0; j < nn; j++) o[j] = ia[j] < ib[j]; break;
        case SA_SM_ILE: for (j = 0; j < nn; j++) o[j] = ia[j] <= ib[j]; break;
        case SA_SM_IGT: for (j = 0; j < nn; j++) o[j] = ia[j] > ib[j]; break;
        case SA_SM_IGE: for (j = 0; j < nn; j++) o[j] = ia[j] >= ib[j]; break;
        case SA_SM_IEQ: for (j = 0; j < nn; j++) o[j] = ia[j] == ib[j]; break;
        case SA_SM_INE: for (j = 0; j < nn; j++) o[j] = ia[j] != ib[j]; break;
        case SA_SM_AND: for (j = 0; j < nn; j++) o[j] = (ia[j] != 0) & (ib[j] != 0); break;
        case SA_SM_OR: for (j = 0; j < nn; j++) o[j] = (ia[j] != 0) | (ib[j] != 0); break;
        case SA_SM_XOR: for (j = 0; j < nn; j++) o[j] = (ia[j] != 0) ^ (ib[j] != 0); break;
        case SA_SM_NOT: for (j = 0; j < nn; j++) o[j] = ia[j] == 0; break;
        case SA_SM_FLOAD:
        case SA_SM_ILOAD:
            sa_sm_load(m, nd, R, kv0, nn, f, o);
            break;
        default: break;                                   /* sa_sm_ok refused it */
        }
        if (nn == 1 && vec[t] && n > 1) {                  /* a row constant some vector op reads */
            if (sa_sm_is_int(nd->op)) for (j = 1; j < n; j++) o[j] = o[0];
            else for (j = 1; j < n; j++) f[j] = f[0];
        }
    }
}

/* A program the interpreter can run: opcodes known, operands earlier nodes,
 * loads within the arrays; 1 if so. (The dispatcher checks it once per call.) */
static inline int sa_sm_ok(const sa_score_mod *m)
{
    if (!m->nodes || m->n_nodes < 1 || m->n_nodes > SA_SM_MAX_NODES || m->n_fwd < 1 || m->n_fwd > m->n_nodes
        || m->out < 0 || m->out >= m->n_fwd || m->dout < 0 || m->dout >= m->n_nodes || m->n_heads < 1
        || m->n_arrays < 0 || (m->n_arrays > 0 && (!m->arrays || !m->ndim || !m->is_int || !m->dims || !m->oob)))
        return 0;
    for (int32_t a = 0; a < m->n_arrays; a++) {
        if (!m->arrays[a] || m->ndim[a] < 1 || m->ndim[a] > SA_SM_MAX_DIMS) return 0;
        for (int32_t d = 0; d < m->ndim[a]; d++)
            if (m->dims[(int64_t)a * SA_SM_MAX_DIMS + d] < 1) return 0;
    }
    for (int32_t t = 0; t < m->n_nodes; t++) {
        const sa_sm_node *nd = m->nodes + t;
        if (nd->op < 0 || nd->op >= SA_SM_OP_COUNT) return 0;
        if ((nd->op == SA_SM_FLOAD || nd->op == SA_SM_ILOAD)
            && (nd->arr < 0 || nd->arr >= m->n_arrays || m->is_int[nd->arr] != (nd->op == SA_SM_ILOAD)
                || nd->kv_axis < -1 || nd->kv_axis >= m->ndim[nd->arr]))
            return 0;
        for (int d = 0; d < SA_SM_MAX_DIMS; d++)              /* the unused ones in range too */
            if (nd->arg[d] < 0 || nd->arg[d] >= (t > 0 ? t : 1)) return 0;
        if (sa_sm_nargs(m, nd) > 0 && t == 0) return 0;       /* operands: earlier nodes */
    }
    return 1;
}

#endif
