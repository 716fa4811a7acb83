/*
 * test_index64.c -- all index arithmetic of the selfattn C kernels is 64-bit.
 *
 * Linked directly against src_c/ (dispatch.c attn_generic.c attn_avx2.c
 * attn_avx512.c). For every supported instruction set, both dtypes, 1 and 2
 * threads, every mask kind and causal, it calls sa_attn_fwd_f32/f64 with
 * element offsets and strides far beyond 2^31 elements, without allocating
 * that much memory:
 *
 *   shift+     base pointers moved back by 2^33 elements, offsets of +2^33 (+ the real offset)
 *   shift-     base pointers moved forward by 2^33 elements, offsets of -2^33
 *   bigstride  row / column / unit strides of 2^31 .. 2^34 elements inside a sparse
 *              mmap(MAP_NORESERVE) region: only the touched pages ever exist
 *   negstride  bigstride with negative row strides (base at the top of the region)
 *   size1      huge strides (2^40+1, -2^45) paired with size-1 dims (L = 1, Ev = 1, E = 1)
 *   bcast      zero strides (one key row / one mask row for all) plus +2^33 shifts
 *
 * and checks every result against a tiny scalar float64 reference.
 * Prints "N passed, 0 failed" and exits 0 when everything matches.
 *
 * Build (what tests/robustness/test_robust_sizes.py does):
 *   cc -O1 -fopenmp -Isrc_c tests/c/test_index64.c src_c/dispatch.c src_c/attn_generic.c \
 *      src_c/attn_avx2.c src_c/attn_avx512.c -lm -o test_index64
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include "selfattn.h"

#define SHIFT ((int64_t)1 << 33)

static int n_pass = 0, n_fail = 0, n_skip = 0;
static char current_case[256] = "(none)";

static void on_crash(int sig)
{
    /* a wrong 32-bit index usually lands outside the mapped memory: name the case */
    static const char msg[] = "CRASH in case: ";
    ssize_t w = write(2, msg, sizeof msg - 1);
    w = write(2, current_case, strlen(current_case));
    w = write(2, "\n", 1);
    (void)w;
    signal(sig, SIG_DFL);
    raise(sig);
}

/* ---- deterministic values ------------------------------------------------ */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static double rnd(void)   /* uniform in [-1, 1) */
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(rng_state >> 11) / (double)(1ull << 53) * 2.0 - 1.0;
}

/* ---- memory: a dense heap buffer or a sparse reserved region ------------- */
typedef struct {
    char *mem;        /* what was allocated / mapped                */
    size_t bytes;
    int mapped;
} region;

static int region_heap(region *r, size_t bytes)
{
    r->mem = (char *)calloc(1, bytes + 64);
    r->bytes = bytes;
    r->mapped = 0;
    return r->mem != NULL;
}

static int region_sparse(region *r, size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return 0;
    r->mem = (char *)p;
    r->bytes = bytes;
    r->mapped = 1;
    return 1;
}

static void region_free(region *r)
{
    if (!r->mem) return;
    if (r->mapped) munmap(r->mem, r->bytes);
    else free(r->mem);
    r->mem = NULL;
}

/* An array as the kernel sees it: base pointer (may point outside any object,
 * it is only ever used with an offset), per-unit element offsets, two strides. */
typedef struct {
    char *base;            /* = region start + shift * dsize (shift may be huge) */
    int64_t off[4];        /* per unit (q, mask, out, lse) or per kv unit (k, v) */
    int64_t s0, s1;
    int dsize;
} view;

static void *vaddr(const view *a, int u, int64_t i, int64_t j)
{
    return a->base + (a->off[u] + i * a->s0 + j * a->s1) * (int64_t)a->dsize;
}
static void vput(const view *a, int u, int64_t i, int64_t j, double x)
{
    void *p = vaddr(a, u, i, j);
    if (a->dsize == 4) *(float *)p = (float)x;
    else if (a->dsize == 8) *(double *)p = x;
    else *(uint8_t *)p = (uint8_t)(x != 0);
}
static double vget(const view *a, int u, int64_t i, int64_t j)
{
    void *p = vaddr(a, u, i, j);
    if (a->dsize == 4) return *(float *)p;
    if (a->dsize == 8) return *(double *)p;
    return *(uint8_t *)p;
}

/* ---- the problem ----------------------------------------------------------- */
enum { N_UNITS = 3, N_KV = 2 };
/* unit u reads kv unit kv_of[u]: units 0 and 2 share kv 0 */
static const int kv_of[N_UNITS] = {0, 1, 0};

typedef enum { LAY_SHIFT_POS, LAY_SHIFT_NEG, LAY_BIGSTRIDE, LAY_NEGSTRIDE, LAY_SIZE1, LAY_BCAST, LAY_COUNT } layout_kind;
static const char *lay_name[LAY_COUNT] = {"shift+", "shift-", "bigstride", "negstride", "size1", "bcast"};

/* Lay out one array of n units x [rows x cols] (elements of dsize bytes). */
static int make_view(view *a, region *r, layout_kind lay, int n, int64_t rows, int64_t cols, int dsize,
                     int which /* 0..5, varies the big strides */, int bcast_rows)
{
    memset(a, 0, sizeof(*a));
    memset(r, 0, sizeof(*r));
    a->dsize = dsize;
    if (lay == LAY_SHIFT_POS || lay == LAY_SHIFT_NEG || lay == LAY_BCAST || lay == LAY_SIZE1) {
        int64_t s0 = cols, s1 = 1, per = rows * cols;
        if (lay == LAY_BCAST && bcast_rows) { s0 = 0; per = cols; }
        if (lay == LAY_SIZE1) {
            /* huge strides on the dims of size 1 (they are never multiplied by anything but 0) */
            s0 = rows == 1 ? ((int64_t)1 << 40) + 1 : cols;
            s1 = cols == 1 ? -((int64_t)1 << 45) : 1;
        }
        if (!region_heap(r, (size_t)(n * per) * dsize)) return 0;
        int64_t shift = (lay == LAY_SHIFT_NEG) ? SHIFT : -SHIFT;
        if (lay == LAY_SIZE1) shift = -((int64_t)1 << 34) - 3;
        a->base = r->mem + shift * dsize;     /* outside the buffer: only base + off is dereferenced */
        for (int u = 0; u < n; u++) a->off[u] = -shift + u * per;
        a->s0 = s0;
        a->s1 = s1;
        return 1;
    }
    /* sparse: strides of ~2^31..2^33 elements between rows (and columns for some arrays) */
    int64_t big_row = ((int64_t)1 << 31) + 3 + 2 * which;
    int64_t big_col = ((int64_t)1 << 31) + 17 + which;
    int64_t s0, s1;
    if (which % 2 == 0) { s0 = big_row; s1 = 1; }             /* rows far apart          */
    else { s0 = 1; s1 = big_col; }                             /* columns far apart       */
    int64_t span = (rows - 1) * (s0 > 0 ? s0 : -s0) + (cols - 1) * s1 + 1;
    int64_t unit = span + ((int64_t)1 << 32) + 11;             /* units > 2^32 apart      */
    size_t bytes = (size_t)(n * unit) * dsize + 4096;
    if (!region_sparse(r, bytes)) return 0;
    if (lay == LAY_NEGSTRIDE && (which % 2 == 0)) {
        s0 = -s0;                                              /* row 0 at the top         */
        for (int u = 0; u < n; u++) a->off[u] = u * unit + (rows - 1) * (-s0);
    } else {
        for (int u = 0; u < n; u++) a->off[u] = u * unit;
    }
    a->base = r->mem;
    a->s0 = s0;
    a->s1 = s1;
    return 1;
}

/* ---- float64 reference -------------------------------------------------- */
static void reference(int64_t L, int64_t S, int64_t E, int64_t Ev, const double *q, const double *k,
                      const double *v, const double *mask, int mask_kind, int causal, double scale,
                      double *out, double *lse)
{
    double *s = (double *)malloc(sizeof(double) * (size_t)(S > 0 ? S : 1));
    for (int64_t i = 0; i < L; i++) {
        double mx = -INFINITY;
        for (int64_t j = 0; j < S; j++) {
            double acc = 0;
            for (int64_t e = 0; e < E; e++) acc += q[i * E + e] * k[j * E + e];
            acc *= scale;
            if (mask_kind == SA_MASK_BOOL && mask[i * S + j] == 0) acc = -INFINITY;
            if (mask_kind == SA_MASK_F32 || mask_kind == SA_MASK_F64) acc += mask[i * S + j];
            if (causal && j > i) acc = -INFINITY;
            s[j] = acc;
            if (acc > mx) mx = acc;
        }
        if (mx == -INFINITY) {
            for (int64_t c = 0; c < Ev; c++) out[i * Ev + c] = 0;
            lse[i] = -INFINITY;
            continue;
        }
        double sum = 0;
        for (int64_t j = 0; j < S; j++) { s[j] = exp(s[j] - mx); sum += s[j]; }
        for (int64_t c = 0; c < Ev; c++) {
            double acc = 0;
            for (int64_t j = 0; j < S; j++) acc += s[j] * v[j * Ev + c];
            out[i * Ev + c] = acc / sum;
        }
        lse[i] = mx + log(sum);
    }
    free(s);
}

/* ---- one case ------------------------------------------------------------- */
static void run_case(int isa, int dsize, int nthreads, layout_kind lay, int mask_kind, int causal,
                     int64_t L, int64_t S, int64_t E, int64_t Ev)
{
    char name[256];
    snprintf(name, sizeof name, "isa=%s f%d threads=%d layout=%s mask=%d causal=%d L=%lld S=%lld E=%lld Ev=%lld",
             sa_isa_name(isa), dsize * 8, nthreads, lay_name[lay], mask_kind, causal, (long long)L,
             (long long)S, (long long)E, (long long)Ev);
    memcpy(current_case, name, sizeof current_case);
    int mdsize = mask_kind == SA_MASK_BOOL ? 1 : mask_kind == SA_MASK_F32 ? 4 : 8;
    int bc = (lay == LAY_BCAST);
    view q, k, v, m, o, l;
    region rq, rk, rv, rm, ro, rl;
    memset(&rm, 0, sizeof rm);
    memset(&m, 0, sizeof m);
    int ok = make_view(&q, &rq, lay, N_UNITS, L, E, dsize, 0, 0)
          && make_view(&k, &rk, lay, N_KV, S, E, dsize, 1, bc)   /* bcast: every key row the same */
          && make_view(&v, &rv, lay, N_KV, S, Ev, dsize, 2, 0)
          && make_view(&o, &ro, lay, N_UNITS, L, Ev, dsize, 3, 0)
          && make_view(&l, &rl, lay, N_UNITS, L, 1, dsize, 4, 0);
    if (ok && mask_kind != SA_MASK_NONE) ok = make_view(&m, &rm, lay, N_UNITS, L, S, mdsize, 5, bc);
    if (!ok) {
        printf("SKIP %s: could not reserve memory\n", name);
        n_skip++;
        goto done;
    }

    /* logical (dense) copies for the reference */
    double *Q = malloc(sizeof(double) * N_UNITS * L * E), *K = malloc(sizeof(double) * N_KV * S * E);
    double *Vv = malloc(sizeof(double) * N_KV * S * Ev), *M = malloc(sizeof(double) * N_UNITS * L * S);
    double *R = malloc(sizeof(double) * N_UNITS * L * Ev), *RL = malloc(sizeof(double) * N_UNITS * L);
    for (int u = 0; u < N_UNITS; u++)
        for (int64_t i = 0; i < L; i++)
            for (int64_t e = 0; e < E; e++) {
                double x = rnd() * 2;
                vput(&q, u, i, e, x);
                Q[(u * L + i) * E + e] = vget(&q, u, i, e);
            }
    for (int g = 0; g < N_KV; g++) {
        for (int64_t j = 0; j < S; j++)
            for (int64_t e = 0; e < E; e++) {
                if (!(bc && j > 0)) vput(&k, g, j, e, rnd() * 2);
            }
        for (int64_t j = 0; j < S; j++)
            for (int64_t e = 0; e < E; e++) K[(g * S + j) * E + e] = vget(&k, g, j, e);
        for (int64_t j = 0; j < S; j++)
            for (int64_t c = 0; c < Ev; c++) {
                vput(&v, g, j, c, rnd() * 3);
                Vv[(g * S + j) * Ev + c] = vget(&v, g, j, c);
            }
    }
    if (mask_kind != SA_MASK_NONE) {
        for (int u = 0; u < N_UNITS; u++) {
            for (int64_t i = 0; i < L; i++)
                for (int64_t j = 0; j < S; j++) {
                    if (bc && i > 0) break;
                    double x;
                    if (mask_kind == SA_MASK_BOOL) x = (i % 7 == 3) ? 0 : (rnd() > -0.4);  /* some all-False rows */
                    else x = (i % 5 == 2) ? -INFINITY : rnd() * 4;                      /* some all -inf rows   */
                    vput(&m, u, i, j, x);
                }
            for (int64_t i = 0; i < L; i++)
                for (int64_t j = 0; j < S; j++) M[(u * L + i) * S + j] = vget(&m, u, i, j);
        }
    }
    /* poison the outputs: every element must be written */
    for (int u = 0; u < N_UNITS; u++)
        for (int64_t i = 0; i < L; i++) {
            for (int64_t c = 0; c < Ev; c++) vput(&o, u, i, c, NAN);
            vput(&l, u, i, 0, NAN);
        }

    int64_t kv_k_off[N_KV], kv_v_off[N_KV], kv_start[N_KV + 1] = {0, 2, 3}, kv_units[N_UNITS] = {0, 2, 1};
    int64_t q_off[N_UNITS], m_off[N_UNITS], o_off[N_UNITS], l_off[N_UNITS];
    for (int g = 0; g < N_KV; g++) { kv_k_off[g] = k.off[g]; kv_v_off[g] = v.off[g]; }
    for (int u = 0; u < N_UNITS; u++) { q_off[u] = q.off[u]; m_off[u] = m.off[u]; o_off[u] = o.off[u]; l_off[u] = l.off[u]; }

    double scale = 0.7;
    sa_attn_args a;
    memset(&a, 0, sizeof a);
    a.n_units = N_UNITS; a.n_kv = N_KV; a.L = L; a.S = S; a.E = E; a.Ev = Ev;
    a.q = q.base; a.q_off = q_off; a.q_sl = q.s0; a.q_se = q.s1;
    a.k = k.base; a.kv_k_off = kv_k_off; a.k_ss = k.s0; a.k_se = k.s1;
    a.v = v.base; a.kv_v_off = kv_v_off; a.v_ss = v.s0; a.v_se = v.s1;
    a.kv_start = kv_start; a.kv_units = kv_units;
    a.mask_kind = mask_kind;
    a.mask = mask_kind != SA_MASK_NONE ? (const void *)m.base : NULL;
    a.mask_off = m_off; a.mask_sl = m.s0; a.mask_ss = m.s1;
    a.out = o.base; a.out_off = o_off; a.out_sl = o.s0; a.out_se = o.s1;
    a.lse = l.base; a.lse_off = l_off; a.lse_sl = l.s0;
    a.scale = scale; a.causal = causal; a.num_threads = nthreads;
    a.interrupt = NULL; a.interrupt_ctx = NULL;

    size_t ws_bytes = 0;
    int st = sa_attn_workspace_size(&a, isa, dsize, &ws_bytes);
    void *ws = NULL;
    if (st == SA_OK && posix_memalign(&ws, 64, ws_bytes ? ws_bytes : 64) != 0) ws = NULL;
    if (st == SA_OK && ws) st = dsize == 4 ? sa_attn_fwd_f32(&a, isa, ws, ws_bytes) : sa_attn_fwd_f64(&a, isa, ws, ws_bytes);
    free(ws);
    if (st != SA_OK) {
        printf("FAIL %s: status %d\n", name, st);
        n_fail++;
        goto freeall;
    }

    double tol = dsize == 4 ? 2e-4 : 1e-10;
    int bad = 0;
    for (int u = 0; u < N_UNITS && !bad; u++) {
        int g = kv_of[u];
        reference(L, S, E, Ev, Q + u * L * E, K + g * S * E, Vv + g * S * Ev, M + u * L * S, mask_kind, causal,
                  scale, R + u * L * Ev, RL + u * L);
        for (int64_t i = 0; i < L && !bad; i++) {
            for (int64_t c = 0; c < Ev; c++) {
                double got = vget(&o, u, i, c), want = R[(u * L + i) * Ev + c];
                if (!(fabs(got - want) <= tol * 3.0)) {
                    printf("FAIL %s: out[u=%d][%lld][%lld] = %.9g, expected %.9g\n", name, u, (long long)i,
                           (long long)c, got, want);
                    bad = 1;
                    break;
                }
            }
            double gl = vget(&l, u, i, 0), wl = RL[u * L + i];
            if (!bad && !((isinf(wl) && gl == wl) || fabs(gl - wl) <= tol * (1 + fabs(wl)))) {
                printf("FAIL %s: lse[u=%d][%lld] = %.9g, expected %.9g\n", name, u, (long long)i, gl, wl);
                bad = 1;
            }
        }
    }
    if (bad) n_fail++;
    else n_pass++;
freeall:
    free(Q); free(K); free(Vv); free(M); free(R); free(RL);
done:
    region_free(&rq); region_free(&rk); region_free(&rv); region_free(&ro); region_free(&rl); region_free(&rm);
}

int main(void)
{
    static const int64_t shapes[][4] = {   /* L, S, E, Ev: two query tiles, two key blocks, odd sizes */
        {67, 131, 3, 5},
        {5, 9, 17, 16},
    };
    int nthreads_list[2] = {1, 2};
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGSEGV, on_crash);
    signal(SIGBUS, on_crash);
    int n_isas = 0;
    for (int isa = 0; isa < SA_ISA_COUNT; isa++) {
        /* avx512bf16, neonbf16, avx512amx: avx512's / neon's functions for float32 / float64 */
        if (isa == SA_ISA_AVX512BF16 || isa == SA_ISA_NEONBF16 || isa == SA_ISA_AVX512AMX) continue;
        if (!sa_isa_supported(isa)) {
            printf("isa %s not supported here: skipped\n", sa_isa_name(isa));
            continue;
        }
        n_isas++;
        for (int dsize = 4; dsize <= 8; dsize += 4)
            for (int ti = 0; ti < 2; ti++)
                for (int lay = 0; lay < LAY_COUNT; lay++)
                    for (int mk = SA_MASK_NONE; mk <= SA_MASK_F64 + 1; mk++) {
                        int mask_kind = mk <= SA_MASK_F64 ? mk : SA_MASK_NONE;
                        int causal = mk > SA_MASK_F64;
                        if (lay == LAY_SIZE1) {
                            /* L = 1 (huge q/out/mask row strides), Ev = 1 (huge v/out column strides), E = 1 */
                            run_case(isa, dsize, nthreads_list[ti], lay, mask_kind, causal, 1, 9, 1, 1);
                            continue;
                        }
                        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
                            run_case(isa, dsize, nthreads_list[ti], (layout_kind)lay, mask_kind, causal,
                                     shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3]);
                    }
    }
    printf("isas tested: %d, openmp: %d, skipped cases: %d\n", n_isas, sa_openmp_enabled(), n_skip);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return (n_fail == 0 && n_pass > 0) ? 0 : 1;
}
