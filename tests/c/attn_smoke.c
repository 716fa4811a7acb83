/*
 * attn_smoke.c -- the C kernels against a naive C reference, on any
 * architecture (CI runs it natively; it is also how the portable path was
 * checked on aarch64 under qemu-user). Every supported ISA, both dtypes,
 * 1 and 2 threads, no mask / bool mask / float mask / causal, structured
 * masks (window, alignment, key lengths with NaN planted past them, ALiBi,
 * softcap) over several units, sizes around each path's own tile edges
 * (sa_tile_params_get); the backward (sa_attn_bwd_*) against naive float64
 * gradients, with GQA and the structured masks, bit-identical for 1, 2 (and 3)
 * threads; the decode schedule on paged K/V (block_table, pages of 1 .. bk + 3
 * rows, NaN in every page row no key fills). Then bfloat16 storage
 * (sa_attn_args.storage) on every ISA: the forward (widened, or on the
 * bfloat16-dot paths avx512bf16 / neonbf16 / avx512amx their own kernels) and, on those,
 * the backward, against the same float64 references on the rounded values.
 * Prints "N passed, M failed"; exit status 1 on any failure.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "selfattn.h"

static int n_pass = 0, n_fail = 0, n_cases = 0, n_cases16 = 0;
/* bfloat16 storage: q, k, v, out (and dout, dq, dk, dv) are bfloat16, the
 * kernels float32 (store() / load() with element size 2) */
static int store16 = 0;

static double urand(uint64_t *s)
{
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(*s >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

/* Structured options of a case (all off when zero-initialised, as in sa_attn_args). */
typedef struct {
    int window;
    int64_t left, right;     /* with window: < 0 = unbounded      */
    int align;               /* sa_alignment                      */
    int64_t klen;            /* < 0: all keys; else S_u = klen - u */
    double slope;            /* ALiBi slope of unit u: slope (u+1) */
    double softcap;
    int units;               /* distinct (q, k, v) units, >= 1     */
    int schedule;            /* sa_schedule_kind (0: automatic)    */
    int64_t page;            /* > 0: K/V paged (block_table), pages of this many rows,
                                in reverse order, NaN in every row no key fills */
} smoke_opts;

/* naive float64 attention of one unit, with the same rules as selfattn.reference:
 * positions p = i (+ S_u - L), visibility, logit -> softcap -> ALiBi -> mask */
static void naive(int64_t L, int64_t S, int64_t Su, int64_t E, int64_t Ev, const double *q, const double *k,
                  const double *v, int mkind, const double *mask, int causal, const smoke_opts *o, double slope,
                  double scale, double *out, double *lse)
{
    double *s = malloc(sizeof(double) * (S ? S : 1));
    for (int64_t i = 0; i < L; i++) {
        int64_t p = i + (o->align == SA_ALIGN_BOTTOM_RIGHT ? Su - L : 0);
        double m = -INFINITY;
        for (int64_t j = 0; j < S; j++) {
            int visible = j < Su && !(causal && j > p);
            if (o->window && o->left >= 0 && j < p - o->left) visible = 0;
            if (o->window && o->right >= 0 && j > p + o->right) visible = 0;
            if (mkind == 1 && mask[i * S + j] == 0) visible = 0;
            double d = -INFINITY;
            if (visible) {
                d = 0;
                for (int64_t e = 0; e < E; e++) d += q[i * E + e] * k[j * E + e];
                d *= scale;
                if (o->softcap > 0) d = o->softcap * tanh(d / o->softcap);
                d -= slope * (double)(p > j ? p - j : j - p);
                if (mkind == 2) d += mask[i * S + j];
            }
            s[j] = d;
            if (d > m) m = d;
        }
        double l = 0;
        for (int64_t j = 0; j < S; j++) { s[j] = m == -INFINITY ? 0 : exp(s[j] - m); l += s[j]; }
        for (int64_t c = 0; c < Ev; c++) {
            double acc = 0;
            for (int64_t j = 0; j < S; j++) if (s[j] != 0) acc += s[j] * v[j * Ev + c];
            out[i * Ev + c] = l > 0 ? acc / l : 0;
        }
        lse[i] = l > 0 ? m + log(l) : -INFINITY;
    }
    free(s);
}

/* element i of a buffer of float (dsize 4), double (8) or bfloat16 (2:
 * rounded to nearest even, NaN kept quiet, as the kernels round) */
static void store(void *dst, int dsize, size_t i, double x)
{
    if (dsize == 2) {
        float f = (float)x;
        uint32_t b;
        memcpy(&b, &f, 4);
        if ((b & 0x7fffffffu) > 0x7f800000u) b |= 0x400000u;
        else b += 0x7fffu + ((b >> 16) & 1u);
        ((uint16_t *)dst)[i] = (uint16_t)(b >> 16);
    } else if (dsize == 4) {
        ((float *)dst)[i] = (float)x;
    } else {
        ((double *)dst)[i] = x;
    }
}

static double load(const void *src, int dsize, size_t i)
{
    if (dsize == 2) {
        uint32_t b = (uint32_t)((const uint16_t *)src)[i] << 16;
        float f;
        memcpy(&f, &b, 4);
        return f;
    }
    return dsize == 4 ? ((const float *)src)[i] : ((const double *)src)[i];
}

static void run_case(int isa, int dsize, int nt, int mkind, int causal, int64_t L, int64_t S, int64_t E, int64_t Ev,
                     const smoke_opts *o)
{
    uint64_t seed = (uint64_t)(L * 131 + S * 17 + E * 7 + Ev + mkind * 1000 + causal * 5000 + o->units * 77);
    const int ed = store16 ? 2 : dsize;      /* q, k, v, out as stored */
    if (store16) n_cases16++; else n_cases++;
    int64_t U = o->units;
    size_t nq = (size_t)(L * E), nk = (size_t)(S * E), nv = (size_t)(S * Ev), nm = (size_t)(L * S), no = (size_t)(L * Ev);
    double *qd = malloc(8 * (U * nq + 1)), *kd = malloc(8 * (U * nk + 1)), *vd = malloc(8 * (U * nv + 1));
    double *md = malloc(8 * (nm + 1)), *od = malloc(8 * (U * no + 1)), *ld = malloc(8 * (U * L + 1));
    int64_t *su = malloc(8 * U), *offq = malloc(8 * U), *offk = malloc(8 * U), *offv = malloc(8 * U);
    int64_t *offo = malloc(8 * U), *offl = malloc(8 * U), *units = malloc(8 * U), *kvstart = malloc(8 * (U + 1));
    int64_t *zeros = calloc((size_t)U, 8);
    double *slopes = malloc(8 * U);
    for (size_t i = 0; i < U * nq; i++) qd[i] = 2 * urand(&seed);
    for (size_t i = 0; i < U * nk; i++) kd[i] = 2 * urand(&seed);
    for (size_t i = 0; i < U * nv; i++) vd[i] = urand(&seed);
    for (size_t i = 0; i < nm; i++) md[i] = mkind == 1 ? (urand(&seed) > -0.6) : 0.5 * urand(&seed);
    if (mkind == 2 && nm) md[0] = -INFINITY;
    /* inputs in the compute dtype, rounded, so both sides see the same numbers */
    void *q = malloc((size_t)ed * (U * nq + 1)), *k = malloc((size_t)ed * (U * nk + 1));
    void *v = malloc((size_t)ed * (U * nv + 1)), *out = malloc((size_t)ed * (U * no + 1));
    void *lse = malloc((size_t)dsize * (U * L + 1)), *mask = malloc(8 * (nm + 1));
    for (size_t i = 0; i < U * nq; i++) { store(q, ed, i, qd[i]); qd[i] = load(q, ed, i); }
    for (size_t i = 0; i < U * nk; i++) { store(k, ed, i, kd[i]); kd[i] = load(k, ed, i); }
    for (size_t i = 0; i < U * nv; i++) { store(v, ed, i, vd[i]); vd[i] = load(v, ed, i); }
    for (size_t i = 0; i < nm; i++) { if (mkind == 1) ((uint8_t *)mask)[i] = md[i] != 0; else ((double *)mask)[i] = md[i]; }
    double scale = 1.0 / sqrt((double)(E ? E : 1));
    for (int64_t u = 0; u < U; u++) {
        su[u] = o->klen < 0 ? S : (o->klen - u < 0 ? 0 : o->klen - u);
        slopes[u] = o->slope * (double)(u + 1);
        offq[u] = u * (int64_t)nq; offk[u] = u * (int64_t)nk; offv[u] = u * (int64_t)nv;
        offo[u] = u * (int64_t)no; offl[u] = u * L; units[u] = u; kvstart[u] = u;
        naive(L, S, su[u], E, Ev, qd + offq[u], kd + offk[u], vd + offv[u], mkind, md, causal, o, slopes[u], scale,
              od + offo[u], ld + offl[u]);
        /* keys past S_u must never be read: plant NaN / Inf there */
        for (int64_t j = su[u]; j < S; j++) {
            for (int64_t e = 0; e < E; e++) store(k, ed, (size_t)(offk[u] + j * E + e), NAN);
            for (int64_t e = 0; e < Ev; e++) store(v, ed, (size_t)(offv[u] + j * Ev + e), INFINITY);
        }
    }
    kvstart[U] = U;

    /* paged: unit u's key j is row j % ps of page N - 1 - (u * nb + j / ps) */
    int64_t ps = o->page > 0 ? o->page : 1, nb = (S + ps - 1) / ps, N = U * nb;
    void *kp = NULL, *vp = NULL;
    int32_t *bt = NULL;
    int64_t *btoff = NULL;
    if (o->page > 0) {
        kp = malloc((size_t)ed * (size_t)(N * ps * E + 1));
        vp = malloc((size_t)ed * (size_t)(N * ps * Ev + 1));
        bt = malloc(4 * (size_t)(N + 1));
        btoff = malloc(8 * (size_t)U);
        for (int64_t i = 0; i < N * ps * E; i++) store(kp, ed, (size_t)i, NAN);
        for (int64_t i = 0; i < N * ps * Ev; i++) store(vp, ed, (size_t)i, NAN);
        for (int64_t u = 0; u < U; u++) {
            btoff[u] = u * nb;
            for (int64_t b = 0; b < nb; b++) bt[u * nb + b] = (int32_t)(N - 1 - (u * nb + b));
            for (int64_t j = 0; j < su[u]; j++) {
                int64_t row = bt[u * nb + j / ps] * ps + j % ps;
                for (int64_t e = 0; e < E; e++)
                    store(kp, ed, (size_t)(row * E + e), load(k, ed, (size_t)(offk[u] + j * E + e)));
                for (int64_t e = 0; e < Ev; e++)
                    store(vp, ed, (size_t)(row * Ev + e), load(v, ed, (size_t)(offv[u] + j * Ev + e)));
            }
        }
    }

    sa_attn_args a;
    memset(&a, 0, sizeof a);
    a.n_units = U; a.n_kv = U; a.L = L; a.S = S; a.E = E; a.Ev = Ev;
    a.q = q; a.q_off = offq; a.q_sl = E; a.q_se = 1;
    a.k = k; a.kv_k_off = offk; a.k_ss = E; a.k_se = 1;
    a.v = v; a.kv_v_off = offv; a.v_ss = Ev; a.v_se = 1;
    a.kv_start = kvstart; a.kv_units = units;
    a.mask_kind = mkind == 0 ? SA_MASK_NONE : mkind == 1 ? SA_MASK_BOOL : SA_MASK_F64;
    a.mask = mkind ? mask : NULL; a.mask_off = zeros; a.mask_sl = S; a.mask_ss = 1;
    a.out = out; a.out_off = offo; a.out_sl = Ev; a.out_se = 1;
    a.lse = lse; a.lse_off = offl; a.lse_sl = 1;
    a.scale = scale; a.causal = causal; a.num_threads = nt;
    a.window = o->window; a.window_left = o->left; a.window_right = o->right; a.alignment = o->align;
    a.k_len = o->klen >= 0 ? su : NULL;
    a.alibi_slope = o->slope != 0 ? slopes : NULL;
    a.softcap = o->softcap;
    a.schedule = o->schedule;
    a.storage = store16 ? SA_STORE_BF16 : SA_STORE_NATIVE;
    if (o->page > 0) {
        a.k = kp; a.v = vp; a.kv_k_off = zeros; a.kv_v_off = zeros;
        a.block_table = bt; a.kv_bt_off = btoff; a.page_size = ps;
        a.k_page_s = ps * E; a.v_page_s = ps * Ev;
    }
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
    /* bfloat16 out: within 2e-2 (its rounding, half an ulp: 2^-9 of |out| <= 1;
     * on the bfloat16-dot paths, P's too: 2^-9 of max|v| = 1), scaled to tol */
    const double oscale = store16 ? tol / 2e-2 : 1.0;
    for (size_t i = 0; i < U * no; i++) SA_WORST(fabs(load(out, ed, i) - od[i]) * oscale);
    for (size_t i = 0; i < (size_t)(U * L); i++) {
        double l = load(lse, dsize, i);
        if (isinf(ld[i])) SA_WORST(l == ld[i] ? 0 : 1);
        else SA_WORST(fabs(l - ld[i]) / 8);
    }
#undef SA_WORST
    if (st == SA_OK && err <= tol) n_pass++;
    else {
        n_fail++;
        printf("FAIL isa=%s f%d nt=%d mask=%d causal=%d L=%lld S=%lld E=%lld Ev=%lld units=%d window=%d(%lld,%lld) "
               "align=%d klen=%lld slope=%g softcap=%g schedule=%d page=%lld status=%d err=%g\n",
               sa_isa_name(isa), ed * 8, nt, mkind, causal, (long long)L, (long long)S, (long long)E,
               (long long)Ev, o->units, o->window, (long long)o->left, (long long)o->right, o->align,
               (long long)o->klen, o->slope, o->softcap, o->schedule, (long long)o->page, st, err);
    }
    free(kp); free(vp); free(bt); free(btoff);
    free(qd); free(kd); free(vd); free(md); free(od); free(ld);
    free(q); free(k); free(v); free(out); free(lse); free(mask); free(raw);
    free(su); free(offq); free(offk); free(offv); free(offo); free(offl); free(units); free(kvstart); free(zeros);
    free(slopes);
}

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
/* "Keys past key_lengths are never read", proved by the MMU: each unit's K and
 * V end exactly where its S_u valid keys end, at a page followed by a
 * PROT_NONE page, while the kernel is told S = 300. A read past S_u (packing,
 * scores, P.V) is a segfault. 4 units: with L = 70 the fused schedule at 1
 * thread, the shared one at 2; with L = 2 the decode path. Returns 1 if it ran
 * (and counted a pass or a failure). */
static int guard_case(int isa, int dsize, int nt, int64_t L)
{
    const int64_t U = 4, Su = 64, S = 300;
    long page = sysconf(_SC_PAGESIZE);
    int64_t E = page / (Su * dsize), Ev = E;
    if (E < 1) return 0;
    smoke_opts o = {0, -1, -1, 0, Su, 0.0, 0.0, (int)U, SA_SCHEDULE_AUTO};
    void *kreg[4], *vreg[4];
    int64_t offq[4], offk[4], offv[4], offo[4], offl[4], units[4], kvstart[5], su[4], zeros[4] = {0, 0, 0, 0};
    void *q = malloc((size_t)(U * L * E * dsize)), *out = malloc((size_t)(U * L * Ev * dsize));
    void *lse = malloc((size_t)(U * L * dsize));
    double *qd = malloc(8 * U * L * E), *kd = malloc(8 * U * Su * E), *vd = malloc(8 * U * Su * Ev);
    double *od = malloc(8 * U * L * Ev), *ld = malloc(8 * U * L);
    uint64_t seed = 99;
    for (int64_t u = 0; u < U; u++) {
        kreg[u] = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        vreg[u] = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (kreg[u] == MAP_FAILED || vreg[u] == MAP_FAILED) return 0;
        mprotect((char *)kreg[u] + page, page, PROT_NONE);
        mprotect((char *)vreg[u] + page, page, PROT_NONE);
    }
    /* K and V are addressed from a common base (the first unit's page) by offsets */
    char *kbase = kreg[0], *vbase = vreg[0];
    for (int64_t u = 0; u < U; u++) {
        offq[u] = u * L * E; offo[u] = u * L * Ev; offl[u] = u * L; units[u] = u; kvstart[u] = u; su[u] = Su;
        offk[u] = ((char *)kreg[u] - kbase) / dsize;
        offv[u] = ((char *)vreg[u] - vbase) / dsize;
        for (int64_t i = 0; i < L * E; i++) { store(q, dsize, (size_t)(offq[u] + i), 2 * urand(&seed)); qd[u * L * E + i] = load(q, dsize, (size_t)(offq[u] + i)); }
        for (int64_t i = 0; i < Su * E; i++) { store(kreg[u], dsize, (size_t)i, 2 * urand(&seed)); kd[u * Su * E + i] = load(kreg[u], dsize, (size_t)i); }
        for (int64_t i = 0; i < Su * Ev; i++) { store(vreg[u], dsize, (size_t)i, urand(&seed)); vd[u * Su * Ev + i] = load(vreg[u], dsize, (size_t)i); }
        naive(L, Su, Su, E, Ev, qd + u * L * E, kd + u * Su * E, vd + u * Su * Ev, 0, NULL, 0, &o, 0.0,
              1.0 / sqrt((double)E), od + u * L * Ev, ld + u * L);
    }
    kvstart[U] = U;

    sa_attn_args a;
    memset(&a, 0, sizeof a);
    a.n_units = U; a.n_kv = U; a.L = L; a.S = S; a.E = E; a.Ev = Ev;
    a.q = q; a.q_off = offq; a.q_sl = E; a.q_se = 1;
    a.k = kbase; a.kv_k_off = offk; a.k_ss = E; a.k_se = 1;
    a.v = vbase; a.kv_v_off = offv; a.v_ss = Ev; a.v_se = 1;
    a.kv_start = kvstart; a.kv_units = units; a.mask_off = zeros;
    a.out = out; a.out_off = offo; a.out_sl = Ev; a.out_se = 1;
    a.lse = lse; a.lse_off = offl; a.lse_sl = 1;
    a.scale = 1.0 / sqrt((double)E); a.num_threads = nt; a.k_len = su;
    size_t bytes = 0;
    int st = sa_attn_workspace_size(&a, isa, dsize, &bytes);
    void *raw = malloc(bytes + 64);
    void *ws = (void *)(((uintptr_t)raw + 63) & ~(uintptr_t)63);
    if (st == SA_OK) st = dsize == 4 ? sa_attn_fwd_f32(&a, isa, ws, bytes) : sa_attn_fwd_f64(&a, isa, ws, bytes);
    double err = 0, tol = dsize == 4 ? 2e-5 : 1e-12;
    for (int64_t i = 0; i < U * L * Ev; i++) {
        double d = fabs(load(out, dsize, (size_t)i) - od[i]);
        if (isnan(err) || !(d <= err)) err = isnan(err) ? err : d;
    }
    n_cases++;
    if (st == SA_OK && err <= tol) n_pass++;
    else { n_fail++; printf("FAIL guard-page key_lengths isa=%s f%d nt=%d L=%lld status=%d err=%g\n", sa_isa_name(isa), dsize * 8, nt, (long long)L, st, err); }
    for (int64_t u = 0; u < U; u++) { munmap(kreg[u], 2 * page); munmap(vreg[u], 2 * page); }
    free(q); free(out); free(lse); free(qd); free(kd); free(vd); free(od); free(ld); free(raw);
    return 1;
}
#else
static int guard_case(int isa, int dsize, int nt, int64_t L) { (void)isa; (void)dsize; (void)nt; (void)L; return 0; }
#endif

/* ---- the backward ----------------------------------------------------------
 * naive float64 gradients of one unit (the rules of `naive`), added into
 * dq [L][E], dk [S][E], dv [S][Ev]: P from the logits, D = rowsum(dO o O),
 * dS = P (dP - D) (1 - tanh^2 for softcap), dQ = scale dS K, dK = scale dS^T Q,
 * dV = P^T dO. */
static void naive_bwd(int64_t L, int64_t S, int64_t Su, int64_t E, int64_t Ev, const double *q, const double *k,
                      const double *v, const double *dout, int mkind, const double *mask, int causal,
                      const smoke_opts *o, double slope, double scale, double *dq, double *dk, double *dv)
{
    double *s = malloc(sizeof(double) * (S ? S : 1)), *x = malloc(sizeof(double) * (S ? S : 1));
    for (int64_t i = 0; i < L; i++) {
        int64_t p = i + (o->align == SA_ALIGN_BOTTOM_RIGHT ? Su - L : 0);
        double m = -INFINITY;
        for (int64_t j = 0; j < S; j++) {
            int visible = j < Su && !(causal && j > p);
            if (o->window && o->left >= 0 && j < p - o->left) visible = 0;
            if (o->window && o->right >= 0 && j > p + o->right) visible = 0;
            if (mkind == 1 && mask[i * S + j] == 0) visible = 0;
            double d = -INFINITY;
            x[j] = 0;
            if (visible) {
                d = 0;
                for (int64_t e = 0; e < E; e++) d += q[i * E + e] * k[j * E + e];
                d *= scale;
                x[j] = d;
                if (o->softcap > 0) d = o->softcap * tanh(d / o->softcap);
                d -= slope * (double)(p > j ? p - j : j - p);
                if (mkind == 2) d += mask[i * S + j];
            }
            s[j] = d;
            if (d > m) m = d;
        }
        if (m == -INFINITY) continue;                     /* every key masked: zero gradients */
        double l = 0;
        for (int64_t j = 0; j < S; j++) { s[j] = exp(s[j] - m); l += s[j]; }
        double D = 0;
        for (int64_t c = 0; c < Ev; c++) {
            double oc = 0;
            for (int64_t j = 0; j < S; j++) if (s[j] != 0) oc += s[j] / l * v[j * Ev + c];
            D += oc * dout[i * Ev + c];
        }
        for (int64_t j = 0; j < S; j++) {
            double pj = s[j] / l;
            if (pj == 0) continue;
            double dp = 0;
            for (int64_t c = 0; c < Ev; c++) { dp += dout[i * Ev + c] * v[j * Ev + c]; dv[j * Ev + c] += pj * dout[i * Ev + c]; }
            double ds = pj * (dp - D);
            if (o->softcap > 0) { double t = tanh(x[j] / o->softcap); ds *= 1 - t * t; }
            ds *= scale;
            for (int64_t e = 0; e < E; e++) { dq[i * E + e] += ds * k[j * E + e]; dk[j * E + e] += ds * q[i * E + e]; }
        }
    }
    free(s);
    free(x);
}

/* The backward of `G` units per distinct K/V (GQA), 2 distinct K/V, key
 * lengths S_u = klen - u (different within a K/V's units; NaN planted past
 * the longest), against naive_bwd; then 1 thread (and 3 where bwd_3_threads:
 * more threads than the 2 cores CI has make libgomp's barriers spin, slow)
 * must give the same bits as `nt`. The forward provides out and lse. */
static int bwd_3_threads = 0;
static void bwd_case(int isa, int dsize, int nt, int mkind, int causal, int64_t L, int64_t S, int64_t E, int64_t Ev,
                     int G, const smoke_opts *o)
{
    uint64_t seed = (uint64_t)(L * 31 + S * 7 + E * 3 + Ev + G * 101 + causal * 7000 + mkind * 300);
    const int ed = store16 ? 2 : dsize;      /* q, k, v, out, dout and the gradients as stored */
    if (store16) n_cases16++; else n_cases++;
    const int64_t NKV = 2, U = NKV * G;
    size_t nq = (size_t)(L * E), nk = (size_t)(S * E), nv = (size_t)(S * Ev), no = (size_t)(L * Ev), nm = (size_t)(L * S);
    double *qd = calloc(U * nq + 1, 8), *kd = calloc(NKV * nk + 1, 8), *vd = calloc(NKV * nv + 1, 8);
    double *dod = calloc(U * no + 1, 8), *md = calloc(nm + 1, 8);
    double *gq = calloc(U * nq + 1, 8), *gk = calloc(NKV * nk + 1, 8), *gv = calloc(NKV * nv + 1, 8);
    void *q = malloc((size_t)ed * (U * nq + 1)), *k = malloc((size_t)ed * (NKV * nk + 1));
    void *v = malloc((size_t)ed * (NKV * nv + 1)), *dout = malloc((size_t)ed * (U * no + 1));
    void *out = malloc((size_t)ed * (U * no + 1)), *lse = malloc((size_t)dsize * (U * L + 1));
    void *mask = malloc(8 * (nm + 1));
    void *g[3][3];                                    /* [run][dq, dk, dv] */
    size_t gn[3] = {U * nq, NKV * nk, NKV * nv};
    for (int r = 0; r < 3; r++)
        for (int t = 0; t < 3; t++) g[r][t] = calloc(gn[t] + 1, (size_t)ed);
    int64_t su[64], offq[64], offo[64], offl[64], units[64], kvstart[3], offk[2], offv[2], zeros[64];
    double slopes[64];
    for (size_t i = 0; i < U * nq; i++) { store(q, ed, i, 2 * urand(&seed)); qd[i] = load(q, ed, i); }
    for (size_t i = 0; i < NKV * nk; i++) { store(k, ed, i, 2 * urand(&seed)); kd[i] = load(k, ed, i); }
    for (size_t i = 0; i < NKV * nv; i++) { store(v, ed, i, urand(&seed)); vd[i] = load(v, ed, i); }
    for (size_t i = 0; i < U * no; i++) { store(dout, ed, i, urand(&seed)); dod[i] = load(dout, ed, i); }
    for (size_t i = 0; i < nm; i++) md[i] = mkind == 1 ? (urand(&seed) > -0.6) : 0.5 * urand(&seed);
    for (size_t i = 0; i < nm; i++) { if (mkind == 1) ((uint8_t *)mask)[i] = md[i] != 0; else ((double *)mask)[i] = md[i]; }
    double scale = 1.0 / sqrt((double)(E ? E : 1));
    int64_t smax[2] = {0, 0};
    for (int64_t u = 0; u < U; u++) {
        int64_t gkv = u / G;
        su[u] = o->klen < 0 ? S : (o->klen - u < 0 ? 0 : o->klen - u > S ? S : o->klen - u);
        if (su[u] > smax[gkv]) smax[gkv] = su[u];
        slopes[u] = o->slope * (double)(u + 1);
        offq[u] = u * (int64_t)nq; offo[u] = u * (int64_t)no; offl[u] = u * L; units[u] = u; zeros[u] = 0;
        naive_bwd(L, S, su[u], E, Ev, qd + offq[u], kd + gkv * nk, vd + gkv * nv, dod + offo[u], mkind, md, causal, o,
                  slopes[u], scale, gq + offq[u], gk + gkv * nk, gv + gkv * nv);
    }
    for (int64_t gkv = 0; gkv < NKV; gkv++) {
        offk[gkv] = gkv * (int64_t)nk; offv[gkv] = gkv * (int64_t)nv; kvstart[gkv] = gkv * G;
        for (int64_t j = smax[gkv]; j < S; j++) {          /* never read: NaN / Inf */
            for (int64_t e = 0; e < E; e++) store(k, ed, (size_t)(offk[gkv] + j * E + e), NAN);
            for (int64_t e = 0; e < Ev; e++) store(v, ed, (size_t)(offv[gkv] + j * Ev + e), INFINITY);
        }
    }
    kvstart[NKV] = U;
    sa_attn_args a;
    memset(&a, 0, sizeof a);
    a.n_units = U; a.n_kv = NKV; a.L = L; a.S = S; a.E = E; a.Ev = Ev;
    a.q = q; a.q_off = offq; a.q_sl = E; a.q_se = 1;
    a.k = k; a.kv_k_off = offk; a.k_ss = E; a.k_se = 1;
    a.v = v; a.kv_v_off = offv; a.v_ss = Ev; a.v_se = 1;
    a.kv_start = kvstart; a.kv_units = units;
    a.mask_kind = mkind == 0 ? SA_MASK_NONE : mkind == 1 ? SA_MASK_BOOL : SA_MASK_F64;
    a.mask = mkind ? mask : NULL; a.mask_off = zeros; a.mask_sl = S; a.mask_ss = 1;
    a.out = out; a.out_off = offo; a.out_sl = Ev; a.out_se = 1;
    a.lse = lse; a.lse_off = offl; a.lse_sl = 1;
    a.scale = scale; a.causal = causal;
    a.window = o->window; a.window_left = o->left; a.window_right = o->right; a.alignment = o->align;
    a.k_len = o->klen >= 0 ? su : NULL;
    a.alibi_slope = o->slope != 0 ? slopes : NULL;
    a.softcap = o->softcap;
    a.storage = store16 ? SA_STORE_BF16 : SA_STORE_NATIVE;
    a.dout = dout; a.dout_sl = Ev; a.dout_se = 1;
    a.dq_off = offq; a.dq_sl = E; a.dq_se = 1;
    a.dk_off = offk; a.dk_ss = E; a.dk_se = 1;
    a.dv_off = offv; a.dv_ss = Ev; a.dv_se = 1;
    int st = SA_OK, nts[3] = {nt, 1, 3}, runs = bwd_3_threads ? 3 : 2;
    for (int r = 0; r < runs && st == SA_OK; r++) {
        size_t bytes = 0;
        a.num_threads = nts[r];
        a.dq = g[r][0]; a.dk = g[r][1]; a.dv = g[r][2];
        st = r ? SA_OK : sa_attn_workspace_size(&a, isa, dsize, &bytes);
        void *raw = NULL, *ws;
        if (st == SA_OK && r == 0) {                   /* the forward gives out and lse */
            raw = malloc(bytes + 64);
            ws = (void *)(((uintptr_t)raw + 63) & ~(uintptr_t)63);
            st = dsize == 4 ? sa_attn_fwd_f32(&a, isa, ws, bytes) : sa_attn_fwd_f64(&a, isa, ws, bytes);
            free(raw);
        }
        if (st == SA_OK) st = sa_attn_bwd_workspace_size(&a, isa, dsize, &bytes);
        if (st == SA_OK) {
            raw = malloc(bytes + 64);
            ws = (void *)(((uintptr_t)raw + 63) & ~(uintptr_t)63);
            st = dsize == 4 ? sa_attn_bwd_f32(&a, isa, ws, bytes) : sa_attn_bwd_f64(&a, isa, ws, bytes);
            free(raw);
        }
    }
    /* worst error relative to each gradient's largest entry, NaN-propagating
     * (bfloat16: the gradients' rounding and P's, dS's and out's, measured at
     * most 8e-3 in tests/dtypes/test_bf16_dot_backward.py) */
    double err = 0, tol = store16 ? 3e-2 : dsize == 4 ? 2e-4 : 1e-10;
    const double *ref[3] = {gq, gk, gv};
    for (int t = 0; t < 3; t++) {
        double big = 1e-3;
        for (size_t i = 0; i < gn[t]; i++) if (fabs(ref[t][i]) > big) big = fabs(ref[t][i]);
        for (size_t i = 0; i < gn[t]; i++) {
            double d = fabs(load(g[0][t], ed, i) - ref[t][i]) / big;
            if (!isnan(err) && !(d <= err)) err = d;
        }
    }
    int same = 1;
    for (int r = 1; r < runs; r++)
        for (int t = 0; t < 3; t++) same &= memcmp(g[0][t], g[r][t], gn[t] * (size_t)ed) == 0;
    if (st == SA_OK && err <= tol && same) n_pass++;
    else {
        n_fail++;
        printf("FAIL backward isa=%s f%d nt=%d mask=%d causal=%d L=%lld S=%lld E=%lld Ev=%lld G=%d window=%d(%lld,%lld) "
               "align=%d klen=%lld slope=%g softcap=%g status=%d err=%g same-bits-1-3-threads=%d\n",
               sa_isa_name(isa), ed * 8, nt, mkind, causal, (long long)L, (long long)S, (long long)E, (long long)Ev,
               G, o->window, (long long)o->left, (long long)o->right, o->align, (long long)o->klen, o->slope,
               o->softcap, st, err, same);
    }
    free(qd); free(kd); free(vd); free(dod); free(md); free(gq); free(gk); free(gv);
    free(q); free(k); free(v); free(dout); free(out); free(lse); free(mask);
    for (int r = 0; r < 3; r++)
        for (int t = 0; t < 3; t++) free(g[r][t]);
}

#define N_SHAPES 7
#define N_STRUCTURED 3

int main(void)
{
    int n_isas = 0, n_guard = 0;
    for (int isa = 0; isa < SA_ISA_COUNT; isa++) {
        /* avx512bf16, neonbf16 and avx512amx run avx512's / neon's functions for float32 /
         * float64 storage (their own kernels, bfloat16's, are tested below and from Python:
         * tests/dtypes) */
        if (isa == SA_ISA_AVX512BF16 || isa == SA_ISA_NEONBF16 || isa == SA_ISA_AVX512AMX) continue;
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
            const smoke_opts plain = {0, -1, -1, 0, -1, 0.0, 0.0, 1, SA_SCHEDULE_AUTO};
            for (int nt = 1; nt <= 2; nt++)
                for (int mkind = 0; mkind < 3; mkind++)
                    for (int causal = 0; causal < 2; causal++) {
                        if (mkind && causal) continue;
                        for (int s = 0; s < N_SHAPES; s++)
                            run_case(isa, dsize, nt, mkind, causal, shapes[s][0], shapes[s][1], shapes[s][2],
                                     shapes[s][3], &plain);
                    }
            /* structured masks (attn_mask.h), each composed with a mask kind; 5 units
             * with key lengths S_u = klen - u (NaN/Inf planted past them); every
             * schedule forced in turn (banded where the window allows it) */
            for (int nt = 1; nt <= 2; nt++)
                for (int s = 0; s < N_SHAPES; s++)
                    for (int sched = SA_SCHEDULE_AUTO; sched <= SA_SCHEDULE_DECODE; sched++) {
                        int64_t S = shapes[s][1];
                        const smoke_opts cfg[N_STRUCTURED] = {
                            {1, p.bk / 2 + 3, 2, SA_ALIGN_BOTTOM_RIGHT, S > 3 ? S - 3 : S, 0.0, 0.0, 5, sched},
                            {1, 7, -1, SA_ALIGN_TOP_LEFT, -1, 0.3, 4.0, 1, sched},
                            {1, 1, 0, SA_ALIGN_BOTTOM_RIGHT, S, 0.05, 0.0, 5, sched},
                        };
                        run_case(isa, dsize, nt, 0, 1, shapes[s][0], S, shapes[s][2], shapes[s][3], &cfg[0]);
                        run_case(isa, dsize, nt, 2, 0, shapes[s][0], S, shapes[s][2], shapes[s][3], &cfg[1]);
                        run_case(isa, dsize, nt, 1, 1, shapes[s][0], S, shapes[s][2], shapes[s][3], &cfg[2]);
                    }
            /* the decode path (few query rows: nothing packed, keys split into
             * chunks merged by log-sum-exp): rows, key blocks and chunks across
             * their edges, each structured mask, 5 distinct K/V */
            const int64_t dshapes[6][4] = {
                {1, 1, 5, 3}, {1, p.bk - 1, p.vw, 4 * p.vw}, {3, 257, 2 * p.vw + 3, 5 * p.vw + 1},
                {1, 3 * p.bk + 5, 64, 64}, {2, 1100, 17, 9}, {16, 600, 8, 8},
            };
            for (int nt = 1; nt <= 2; nt++)
                for (int s = 0; s < 6; s++) {
                    int64_t L = dshapes[s][0], S = dshapes[s][1], E = dshapes[s][2], Ev = dshapes[s][3];
                    const smoke_opts dcfg[4] = {
                        {0, -1, -1, 0, -1, 0.0, 0.0, 5, SA_SCHEDULE_DECODE},
                        {1, p.bk / 2 + 3, 2, SA_ALIGN_BOTTOM_RIGHT, S > 3 ? S - 3 : S, 0.0, 0.0, 5, SA_SCHEDULE_AUTO},
                        {1, 7, -1, SA_ALIGN_TOP_LEFT, -1, 0.3, 4.0, 5, SA_SCHEDULE_DECODE},
                        {1, 300, 0, SA_ALIGN_BOTTOM_RIGHT, S, 0.05, 0.0, 5, SA_SCHEDULE_DECODE},
                    };
                    run_case(isa, dsize, nt, 0, 0, L, S, E, Ev, &dcfg[0]);
                    run_case(isa, dsize, nt, 1, 1, L, S, E, Ev, &dcfg[0]);
                    run_case(isa, dsize, nt, 0, 1, L, S, E, Ev, &dcfg[1]);
                    run_case(isa, dsize, nt, 2, 0, L, S, E, Ev, &dcfg[2]);
                    run_case(isa, dsize, nt, 1, 1, L, S, E, Ev, &dcfg[3]);
                    /* paged K/V (pages of 1, 5, 16 and bk + 3 rows) with the plain and the
                     * structured decode cases */
                    const int64_t pages[4] = {1, 5, 16, p.bk + 3};
                    for (int pi = 0; pi < 4; pi++) {
                        smoke_opts pg0 = dcfg[0], pg3 = dcfg[3];
                        pg0.page = pg3.page = pages[pi];
                        run_case(isa, dsize, nt, 0, 0, L, S, E, Ev, &pg0);
                        run_case(isa, dsize, nt, 1, 1, L, S, E, Ev, &pg3);
                    }
                }
            /* the banded schedule over more key blocks than its ring holds, so
             * that slots are reused (windows narrower than a block, and wider) */
            for (int nt = 1; nt <= 2; nt++)
                for (int sched = SA_SCHEDULE_AUTO; sched <= SA_SCHEDULE_BANDED; sched += SA_SCHEDULE_BANDED) {
                    const smoke_opts bcfg[2] = {
                        {1, p.bk / 2, 0, SA_ALIGN_TOP_LEFT, -1, 0.0, 0.0, 3, sched},
                        {1, p.bk + 5, 3, SA_ALIGN_BOTTOM_RIGHT, 6 * p.bk, 0.1, 0.0, 2, sched},
                    };
                    run_case(isa, dsize, nt, 0, 1, 3 * p.bq + 5, 6 * p.bk + 7, 9, 5, &bcfg[0]);
                    run_case(isa, dsize, nt, 1, 0, 4 * p.bq + 1, 6 * p.bk + 7, 16, 16, &bcfg[1]);
                }
            for (int nt = 1; nt <= 2; nt++) n_guard += guard_case(isa, dsize, nt, 70) + guard_case(isa, dsize, nt, 2);
            /* the backward: tile edges, GQA (3 query heads per K/V), every structured mask,
             * bit-identical for 1, 2 and 3 threads */
            const smoke_opts bplain = {0, -1, -1, 0, -1, 0.0, 0.0, 1, SA_SCHEDULE_AUTO};
            const smoke_opts bcfg[3] = {
                {1, p.bk / 2 + 3, 2, SA_ALIGN_BOTTOM_RIGHT, p.bk + 9, 0.0, 0.0, 1, SA_SCHEDULE_AUTO},
                {1, 7, -1, SA_ALIGN_TOP_LEFT, -1, 0.3, 4.0, 1, SA_SCHEDULE_AUTO},
                {1, 1, 0, SA_ALIGN_BOTTOM_RIGHT, 2 * p.bk, 0.05, 0.0, 1, SA_SCHEDULE_AUTO},
            };
            for (int s = 1; s < N_SHAPES; s++) {
                bwd_case(isa, dsize, 2, 0, 0, shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3], 1, &bplain);
                bwd_case(isa, dsize, 2, 1, 1, shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3], 3, &bplain);
                bwd_case(isa, dsize, 2, 2, 0, shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3], 1, &bplain);
            }
            /* many key blocks: more blocks than chunks, so each chunk sums several blocks
             * into its dQ partial (a chunking that followed the thread count shows here) */
            bwd_3_threads = 1;
            bwd_case(isa, dsize, 2, 0, 0, 3, 20 * p.bk + 3, 8, 4, 1, &bplain);
            bwd_case(isa, dsize, 2, 1, 1, p.bq + 3, 2 * p.bk + 5, 17, p.vw + 3, 3, &bcfg[0]);
            bwd_3_threads = 0;
            for (int c = 0; c < 3; c++) {
                bwd_case(isa, dsize, 2, c == 2 ? 1 : 0, c != 1, p.bq + 3, 2 * p.bk + 5, 17, p.vw + 3, 3, &bcfg[c]);
                bwd_case(isa, dsize, 2, 2, 0, 2 * p.bq + 1, p.bk + 1, 33, 5, 2, &bcfg[c]);
            }
        }
    }
    /* bfloat16 storage (q, k, v, out; the backward's dout and gradients too) on every path this
     * CPU runs, the bfloat16-dot ones included: the forward (plain, causal, masks, structured,
     * decode, paged) and, where the path has its own bfloat16 backward, the backward (GQA,
     * structured masks, 1 / 2 / 3 threads the same bits); sizes around the path's tile edges
     * and odd E (a bfloat16 pair padded) */
    store16 = 1;
    for (int isa = 0; isa < SA_ISA_COUNT; isa++) {
        if (!sa_isa_supported(isa)) continue;
        sa_tile_params p;
        if (sa_tile_params_get(isa, 4, &p) != SA_OK) { n_fail++; continue; }
        const int64_t sh[4][4] = {{1, 1, 1, 1}, {p.bq + 1, p.bk + 1, 17, p.nv + 1}, {p.bq - 1, 2 * p.bk + 1, 64, 33},
                                  {2, 300, 40, 24}};
        const smoke_opts plain = {0, -1, -1, 0, -1, 0.0, 0.0, 1, SA_SCHEDULE_AUTO};
        for (int nt = 1; nt <= 2; nt++)
            for (int s = 0; s < 4; s++) {
                int64_t L = sh[s][0], S = sh[s][1], E = sh[s][2], Ev = sh[s][3];
                const smoke_opts cfg[3] = {
                    {1, p.bk / 2 + 3, 2, SA_ALIGN_BOTTOM_RIGHT, S > 3 ? S - 3 : S, 0.0, 0.0, 5, SA_SCHEDULE_AUTO},
                    {1, 7, -1, SA_ALIGN_TOP_LEFT, -1, 0.3, 4.0, 3, SA_SCHEDULE_DECODE},
                    {0, -1, -1, 0, -1, 0.0, 0.0, 3, SA_SCHEDULE_DECODE},
                };
                for (int mkind = 0; mkind < 3; mkind++) run_case(isa, 4, nt, mkind, mkind == 0, L, S, E, Ev, &plain);
                run_case(isa, 4, nt, 0, 1, L, S, E, Ev, &cfg[0]);
                run_case(isa, 4, nt, 2, 0, L, S, E, Ev, &cfg[1]);
                smoke_opts pg = cfg[2];                   /* paged K/V: the decode schedule's (few rows) */
                pg.page = 16;
                if (L <= 3) run_case(isa, 4, nt, 1, 0, L, S, E, Ev, &pg);
            }
        if (isa == SA_ISA_AVX512BF16 || isa == SA_ISA_NEONBF16 || isa == SA_ISA_AVX512AMX) {
            const smoke_opts bcfg[2] = {
                {1, p.bk / 2 + 3, 2, SA_ALIGN_BOTTOM_RIGHT, p.bk + 9, 0.0, 0.0, 1, SA_SCHEDULE_AUTO},
                {1, 7, -1, SA_ALIGN_TOP_LEFT, -1, 0.3, 4.0, 1, SA_SCHEDULE_AUTO},
            };
            bwd_3_threads = 1;
            for (int s = 1; s < 4; s++) {
                bwd_case(isa, 4, 2, 0, 0, sh[s][0], sh[s][1], sh[s][2], sh[s][3], 1, &plain);
                bwd_case(isa, 4, 2, 1, 1, sh[s][0], sh[s][1], sh[s][2], sh[s][3], 3, &bcfg[0]);
                bwd_case(isa, 4, 2, 2, 0, sh[s][0], sh[s][1], sh[s][2], sh[s][3], 2, &bcfg[1]);
            }
            bwd_3_threads = 0;
        }
    }
    store16 = 0;
    /* per isa: 2 dtypes x 2 thread counts x ((4 masking kinds + 5 schedules x N_STRUCTURED) x N_SHAPES
     * + 13 decode cases (8 paged) x 6 shapes + 4 banded cases) + the guard-page cases */
    printf("best isa: %s, openmp: %d, isas tested: %d, cases per isa: %d\n", sa_isa_name(sa_isa_best()),
           sa_openmp_enabled(), n_isas, n_cases / (n_isas ? n_isas : 1));
    printf("bfloat16 storage cases: %d\n", n_cases16);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail != 0;
}
