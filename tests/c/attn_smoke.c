/*
 * attn_smoke.c -- the C kernels against a naive C reference, on any
 * architecture (CI runs it natively; it is also how the portable path was
 * checked on aarch64 under qemu-user). Every supported ISA, both dtypes,
 * 1 and 2 threads, no mask / bool mask / float mask / causal, sizes around
 * each path's own tile edges (sa_tile_params_get).
 * Prints "N passed, M failed"; exit status 1 on any failure.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "selfattn.h"

static int n_pass = 0, n_fail = 0;

static double urand(uint64_t *s)
{
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(*s >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

/* naive float64 attention of one unit, with the same mask rules as selfattn.reference */
static void naive(int64_t L, int64_t S, int64_t E, int64_t Ev, const double *q, const double *k, const double *v,
                  int mkind, const double *mask, int causal, double scale, double *out, double *lse)
{
    double *s = malloc(sizeof(double) * (S ? S : 1));
    for (int64_t i = 0; i < L; i++) {
        double m = -INFINITY;
        for (int64_t j = 0; j < S; j++) {
            double d = 0;
            for (int64_t e = 0; e < E; e++) d += q[i * E + e] * k[j * E + e];
            d *= scale;
            if (causal && j > i) d = -INFINITY;
            if (mkind == 1 && mask[i * S + j] == 0) d = -INFINITY;
            if (mkind == 2) d += mask[i * S + j];
            s[j] = d;
            if (d > m) m = d;
        }
        double l = 0;
        for (int64_t j = 0; j < S; j++) { s[j] = m == -INFINITY ? 0 : exp(s[j] - m); l += s[j]; }
        for (int64_t c = 0; c < Ev; c++) {
            double acc = 0;
            for (int64_t j = 0; j < S; j++) acc += s[j] * v[j * Ev + c];
            out[i * Ev + c] = l > 0 ? acc / l : 0;
        }
        lse[i] = l > 0 ? m + log(l) : -INFINITY;
    }
    free(s);
}

static void run_case(int isa, int dsize, int nt, int mkind, int causal, int64_t L, int64_t S, int64_t E, int64_t Ev)
{
    uint64_t seed = (uint64_t)(L * 131 + S * 17 + E * 7 + Ev + mkind * 1000 + causal * 5000);
    size_t nq = (size_t)(L * E), nk = (size_t)(S * E), nv = (size_t)(S * Ev), nm = (size_t)(L * S), no = (size_t)(L * Ev);
    double *qd = malloc(8 * (nq + 1)), *kd = malloc(8 * (nk + 1)), *vd = malloc(8 * (nv + 1)), *md = malloc(8 * (nm + 1));
    double *od = malloc(8 * (no + 1)), *ld = malloc(8 * (L + 1));
    for (size_t i = 0; i < nq; i++) qd[i] = 2 * urand(&seed);
    for (size_t i = 0; i < nk; i++) kd[i] = 2 * urand(&seed);
    for (size_t i = 0; i < nv; i++) vd[i] = urand(&seed);
    for (size_t i = 0; i < nm; i++) md[i] = mkind == 1 ? (urand(&seed) > -0.6) : 0.5 * urand(&seed);
    if (mkind == 2 && nm) md[0] = -INFINITY;
    /* inputs in the compute dtype, rounded, so both sides see the same numbers */
    void *q = malloc((size_t)dsize * (nq + 1)), *k = malloc((size_t)dsize * (nk + 1)), *v = malloc((size_t)dsize * (nv + 1));
    void *out = malloc((size_t)dsize * (no + 1)), *lse = malloc((size_t)dsize * (L + 1));
    void *mask = malloc(8 * (nm + 1));
    for (size_t i = 0; i < nq; i++) { if (dsize == 4) { ((float *)q)[i] = (float)qd[i]; qd[i] = ((float *)q)[i]; } else ((double *)q)[i] = qd[i]; }
    for (size_t i = 0; i < nk; i++) { if (dsize == 4) { ((float *)k)[i] = (float)kd[i]; kd[i] = ((float *)k)[i]; } else ((double *)k)[i] = kd[i]; }
    for (size_t i = 0; i < nv; i++) { if (dsize == 4) { ((float *)v)[i] = (float)vd[i]; vd[i] = ((float *)v)[i]; } else ((double *)v)[i] = vd[i]; }
    for (size_t i = 0; i < nm; i++) { if (mkind == 1) ((uint8_t *)mask)[i] = md[i] != 0; else ((double *)mask)[i] = md[i]; }
    double scale = 1.0 / sqrt((double)(E ? E : 1));
    naive(L, S, E, Ev, qd, kd, vd, mkind, md, causal, scale, od, ld);

    int64_t zero = 0, kvstart[2] = {0, 1};
    sa_attn_args a;
    memset(&a, 0, sizeof a);
    a.n_units = 1; a.n_kv = 1; a.L = L; a.S = S; a.E = E; a.Ev = Ev;
    a.q = q; a.q_off = &zero; a.q_sl = E; a.q_se = 1;
    a.k = k; a.kv_k_off = &zero; a.k_ss = E; a.k_se = 1;
    a.v = v; a.kv_v_off = &zero; a.v_ss = Ev; a.v_se = 1;
    a.kv_start = kvstart; a.kv_units = &zero;
    a.mask_kind = mkind == 0 ? SA_MASK_NONE : mkind == 1 ? SA_MASK_BOOL : SA_MASK_F64;
    a.mask = mkind ? mask : NULL; a.mask_off = &zero; a.mask_sl = S; a.mask_ss = 1;
    a.out = out; a.out_off = &zero; a.out_sl = Ev; a.out_se = 1;
    a.lse = lse; a.lse_off = &zero; a.lse_sl = 1;
    a.scale = scale; a.causal = causal; a.num_threads = nt;
    size_t bytes = 0;
    int st = sa_attn_workspace_size(&a, isa, dsize, &bytes);
    void *raw = malloc(bytes + 64);
    void *ws = (void *)(((uintptr_t)raw + 63) & ~(uintptr_t)63);
    if (st == SA_OK) st = dsize == 4 ? sa_attn_fwd_f32(&a, isa, ws, bytes) : sa_attn_fwd_f64(&a, isa, ws, bytes);
    /* worst error, NaN-propagating: fmax() would drop a NaN and pass a kernel
     * that writes NaN everywhere; `!(d <= err)` takes a NaN, and once err is
     * NaN it stays NaN (so `err <= tol` fails) */
    double tol = dsize == 4 ? 2e-5 : 1e-12, err = 0;
#define SA_WORST(d) do { double d_ = (d); if (!isnan(err) && !(d_ <= err)) err = d_; } while (0)
    for (size_t i = 0; i < no; i++) {
        double o = dsize == 4 ? ((float *)out)[i] : ((double *)out)[i];
        SA_WORST(fabs(o - od[i]));
    }
    for (int64_t i = 0; i < L; i++) {
        double l = dsize == 4 ? ((float *)lse)[i] : ((double *)lse)[i];
        if (isinf(ld[i])) SA_WORST(l == ld[i] ? 0 : 1);
        else SA_WORST(fabs(l - ld[i]) / 8);
    }
#undef SA_WORST
    if (st == SA_OK && err <= tol) n_pass++;
    else {
        n_fail++;
        printf("FAIL isa=%s f%d nt=%d mask=%d causal=%d L=%lld S=%lld E=%lld Ev=%lld status=%d err=%g\n",
               sa_isa_name(isa), dsize * 8, nt, mkind, causal, (long long)L, (long long)S, (long long)E,
               (long long)Ev, st, err);
    }
    free(qd); free(kd); free(vd); free(md); free(od); free(ld);
    free(q); free(k); free(v); free(out); free(lse); free(mask); free(raw);
}

#define N_SHAPES 7

int main(void)
{
    int n_isas = 0;
    for (int isa = 0; isa < SA_ISA_COUNT; isa++) {
        if (!sa_isa_supported(isa)) {
            printf("isa %s: NOT TESTED (not available on this CPU/build)\n", sa_isa_name(isa));
            continue;
        }
        n_isas++;
        for (int dsize = 4; dsize <= 8; dsize += 4) {
            /* sizes around this path's own tile edges (query tile, key block,
             * micro-tiles, vector width), so the cases follow the tiles */
            sa_tile_params p;
            if (sa_tile_params_get(isa, dsize, &p) != SA_OK) { n_fail++; continue; }
            const int64_t shapes[N_SHAPES][4] = {
                {1, 1, 1, 1},
                {p.mr, p.nr - 1, 3, p.vw - 1},
                {p.bq + 1, p.bk + 1, 17, p.nv + 1},
                {2 * p.bq + 2, p.bk - 1, 64, 80},
                {p.bq - 1, 2 * p.bk + 1, 5, p.vw + 1},
                {p.bq, p.bk, 2, p.nv},
                {3, 0, 5, 2},
            };
            for (int nt = 1; nt <= 2; nt++)
                for (int mkind = 0; mkind < 3; mkind++)
                    for (int causal = 0; causal < 2; causal++) {
                        if (mkind && causal) continue;
                        for (int s = 0; s < N_SHAPES; s++)
                            run_case(isa, dsize, nt, mkind, causal, shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3]);
                    }
        }
    }
    /* per isa: 2 dtypes x 2 thread counts x 4 masking kinds x N_SHAPES */
    printf("best isa: %s, openmp: %d, isas tested: %d, cases per isa: %d\n", sa_isa_name(sa_isa_best()),
           sa_openmp_enabled(), n_isas, 2 * 2 * 4 * N_SHAPES);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail != 0;
}
