/*
 * test_sm_math.c -- score_mod.h's vectorisable exp, log and tanh against libm.
 *
 * The interpreter (src_c/score_mod.h) evaluates SA_SM_FEXP / FLOG / FTANH with
 * its own sa_sm_exp / sa_sm_log / sa_sm_tanh so that the per-node loops
 * vectorise. This program checks them, in loops over arrays like the
 * interpreter's (so the compiler vectorises them the same way), against libm:
 *
 *   - at most MAX_ULP units in the last place apart, on 2^22 arguments per
 *     function spread over every range that behaves differently (exp's
 *     subnormal results and overflow, log of subnormals and of values near 1,
 *     tanh both sides of its 0.625 switch, tiny and huge arguments);
 *   - bit for bit libm's special values (+-0, +-inf, NaN, the overflow and
 *     underflow edges), NaN for NaN.
 *
 * tests/structured/test_flex_score_mod.py builds it with the kernels' flags
 * (-O3 -fno-math-errno -fno-trapping-math) once per ISA the CPU runs
 * (-mavx2 -mfma, -mavx512f) and runs it. Prints "N passed, 0 failed".
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "score_mod.h"

#define N (1 << 22)
#define MAX_ULP 3

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
static uint64_t rng(void)                     /* splitmix64 */
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
static double uniform(double lo, double hi) { return lo + (hi - lo) * ((double)(rng() >> 11) * 0x1.0p-53); }
static double from_bits(uint64_t u) { double d; memcpy(&d, &u, 8); return d; }

/* distance in units in the last place: doubles' bits as a monotone integer line */
static int64_t ordered(double d)
{
    int64_t i; memcpy(&i, &d, 8);
    return i < 0 ? (int64_t)0x8000000000000000ULL - i : i;
}
static uint64_t ulps(double a, double b)
{
    if (a != a || b != b) return (a != a && b != b) ? 0 : UINT64_MAX;
    if (a == b) return 0;                     /* also +0 == -0 */
    int64_t d = ordered(a) - ordered(b);
    return (uint64_t)(d < 0 ? -d : d);
}

/* the loops the interpreter runs, one per function (noinline: vectorised on their own) */
__attribute__((noinline)) static void run_exp(const double *x, double *y, int64_t n)
{ for (int64_t j = 0; j < n; j++) y[j] = sa_sm_exp(x[j]); }
__attribute__((noinline)) static void run_log(const double *x, double *y, int64_t n)
{ for (int64_t j = 0; j < n; j++) y[j] = sa_sm_log(x[j]); }
__attribute__((noinline)) static void run_tanh(const double *x, double *y, int64_t n)
{ for (int64_t j = 0; j < n; j++) y[j] = sa_sm_tanh(x[j]); }

static int n_pass = 0, n_fail = 0;

static void check(const char *name, void (*run)(const double *, double *, int64_t), double (*ref)(double),
                  const double *x, int64_t n, double *y)
{
    run(x, y, n);
    uint64_t worst = 0; int64_t at = 0;
    for (int64_t j = 0; j < n; j++) {
        uint64_t u = ulps(y[j], ref(x[j]));
        /* a zero's sign must match too (tanh(-0) = -0, exp never returns -0) */
        if (u == 0 && y[j] == 0.0 && signbit(y[j]) != signbit(ref(x[j]))) u = UINT64_MAX;
        if (u > worst) { worst = u; at = j; }
    }
    if (worst <= MAX_ULP) {
        n_pass++;
        printf("ok   %-28s %9lld args, worst %llu ulp\n", name, (long long)n, (unsigned long long)worst);
    } else {
        n_fail++;
        printf("FAIL %-28s worst %llu ulp at x = %.17g: got %.17g, libm %.17g\n", name,
               (unsigned long long)worst, x[at], y[at], ref(x[at]));
    }
}

int main(void)
{
    double *x = malloc(sizeof(double) * N), *y = malloc(sizeof(double) * N);
    if (!x || !y) { printf("out of memory\n"); return 2; }
    int64_t j;

    /* exp: the whole finite range incl. subnormal results (x < -708) and overflow (x > 709.78) */
    for (j = 0; j < N; j++) x[j] = uniform(-760.0, 720.0);
    check("exp [-760, 720]", run_exp, exp, x, N, y);
    for (j = 0; j < N; j++) x[j] = uniform(-30.0, 30.0);
    check("exp [-30, 30]", run_exp, exp, x, N, y);
    for (j = 0; j < N; j++) x[j] = uniform(-1e-6, 1e-6);
    check("exp [-1e-6, 1e-6]", run_exp, exp, x, N, y);
    for (j = 0; j < N; j++) x[j] = uniform(-746.5, -707.0);
    check("exp subnormal results", run_exp, exp, x, N, y);

    /* log: random positive bit patterns (every exponent, subnormals included), near 1, [0.5, 4) */
    for (j = 0; j < N; j++) x[j] = from_bits(rng() & 0x7fefffffffffffffULL);
    check("log positive bit patterns", run_log, log, x, N, y);
    for (j = 0; j < N; j++) x[j] = from_bits(rng() & 0x000fffffffffffffULL);
    check("log subnormals", run_log, log, x, N, y);
    for (j = 0; j < N; j++) x[j] = 1.0 + uniform(-1e-3, 1e-3);
    check("log near 1", run_log, log, x, N, y);
    for (j = 0; j < N; j++) x[j] = uniform(0.5, 4.0);
    check("log [0.5, 4)", run_log, log, x, N, y);

    /* tanh: the soft-capping range, both sides of 0.625, tiny, saturated */
    for (j = 0; j < N; j++) x[j] = uniform(-50.0, 50.0);
    check("tanh [-50, 50]", run_tanh, tanh, x, N, y);
    for (j = 0; j < N; j++) x[j] = uniform(-1.5, 1.5);
    check("tanh [-1.5, 1.5]", run_tanh, tanh, x, N, y);
    for (j = 0; j < N; j++) x[j] = uniform(-1e-8, 1e-8);
    check("tanh [-1e-8, 1e-8]", run_tanh, tanh, x, N, y);

    /* special values, bit for bit as libm (the ulp check with MAX_ULP 0) */
    const double sp[] = {0.0, -0.0, INFINITY, -INFINITY, NAN, -NAN, 1.0, -1.0, 709.78, 709.79, 710.0, 711.0,
                         -745.13, -745.14, -746.0, -750.0, 1e300, -1e300, 5e-324, -5e-324, 2.2250738585072014e-308,
                         1.7976931348623157e308, 0.625, -0.625, 0.6249999999999999, 40.0, -40.0, 19.0, 1e-300};
    int ns = (int)(sizeof(sp) / sizeof(sp[0]));
    struct { const char *name; void (*run)(const double *, double *, int64_t); double (*ref)(double); } fns[] = {
        {"exp", run_exp, exp}, {"log", run_log, log}, {"tanh", run_tanh, tanh}};
    for (int f = 0; f < 3; f++) {
        fns[f].run(sp, y, ns);
        int bad = -1;
        for (int i = 0; i < ns; i++) {
            double r = fns[f].ref(sp[i]);
            int same_nan = (r != r) && (y[i] != y[i]);
            int exact = !(r != r) && r == y[i] && signbit(r) == signbit(y[i]);
            /* finite, normal-range results may round differently (1 ulp); zeros, infinities, NaN exact */
            int close = !(r != r) && isfinite(r) && r != 0.0 && ulps(y[i], r) <= MAX_ULP;
            if (!(same_nan || exact || close)) { bad = i; break; }
        }
        if (bad < 0) { n_pass++; printf("ok   %-28s %9d values\n", fns[f].name, ns); }
        else {
            n_fail++;
            printf("FAIL %s special value %.17g: got %.17g, libm %.17g\n", fns[f].name, sp[bad], y[bad],
                   fns[f].ref(sp[bad]));
        }
    }
    printf("%d passed, %d failed\n", n_pass, n_fail);
    free(x); free(y);
    return n_fail ? 1 : 0;
}
