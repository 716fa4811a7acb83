/*
 * dispatch.c -- picks the kernel for the CPU (the one function table),
 * computes the workspace layouts (the only place they are computed: the
 * kernels get them from here), runs tasks on threads. The kernels themselves
 * live in attn_<target>.c, each compiled from attn_kernels.h once per dtype.
 */
#include <math.h>
#include <string.h>
#include "selfattn.h"
#include "attn_internal.h"
#include "score_mod.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <time.h>
#define SA_POSIX 1
#else
#define SA_POSIX 0
#endif
#if SA_HAVE_X86_TARGETS
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif
#if SA_HAVE_NEON_TARGET && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP2_BF16
#define HWCAP2_BF16 (1UL << 14)   /* the kernel's bit for FEAT_BF16 (older libc headers lack it) */
#endif
#elif SA_HAVE_NEON_TARGET && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

/* ---- fork safety ------------------------------------------------------- */
/* libgomp's thread pool does not survive fork(): a child that enters a
 * parallel region can hang. After fork the child runs single-threaded. */
static volatile int sa_forked = 0;
#if SA_POSIX
static void sa_atfork_child(void) { sa_forked = 1; }
static pthread_once_t sa_once = PTHREAD_ONCE_INIT;
static void sa_register_atfork(void) { pthread_atfork(NULL, NULL, sa_atfork_child); }
#define SA_INIT() pthread_once(&sa_once, sa_register_atfork)
#else
#define SA_INIT() ((void)0)
#endif

int sa_in_forked_child(void) { return sa_forked; }

int sa_openmp_enabled(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int sa_default_threads(void)
{
    SA_INIT();
#ifdef _OPENMP
    if (!sa_forked) {
        int n = omp_get_max_threads();   /* OMP_NUM_THREADS, threadpoolctl, else cores */
        return n > 0 ? n : 1;
    }
#endif
    return 1;
}

/* More threads than this never help and can exhaust the process's threads. */
#define SA_MAX_THREADS_PER_CORE 4

int sa_effective_threads(int requested)
{
    SA_INIT();
    if (requested < 1 || sa_forked || !sa_openmp_enabled()) return 1;
#ifdef _OPENMP
    int cap = SA_MAX_THREADS_PER_CORE * omp_get_num_procs();
    int limit = omp_get_thread_limit();
    if (cap < 8) cap = 8;
    if (limit > 0 && cap > limit) cap = limit;
    if (requested > cap) requested = cap;
#endif
    return requested;
}

/* ---- instruction sets -------------------------------------------------- */
/* The kernels of one (instruction set, dtype): the forward (shared, fused and
 * banded schedules), the decode schedule, the backward, and their tile sizes. */
typedef struct {
    sa_fwd_fn fwd, decode;
    sa_bwd_fn bwd;
    const sa_tile_params *params;
} sa_kernel;

enum { SA_DT_F32, SA_DT_F64, SA_DT_COUNT };   /* columns of the table */

#define SA_KERNEL_SET(tsuf, isuf) \
    {attn_fwd_##tsuf##_##isuf, attn_decode_##tsuf##_##isuf, attn_bwd_##tsuf##_##isuf, &sa_params_##tsuf##_##isuf}
#define SA_KERNEL_ROW(isuf) {SA_KERNEL_SET(f32, isuf), SA_KERNEL_SET(f64, isuf)}
#define SA_KERNEL_NONE {{NULL, NULL, NULL, NULL}, {NULL, NULL, NULL, NULL}}
/* avx512bf16 / neonbf16: their forward, decode and backward (bfloat16
 * storage on vdpbf16ps / BFDOT; any other storage handed to avx512's /
 * neon's), float64 avx512's / neon's */
#define SA_KERNEL_ROW_AVX512BF16 {SA_KERNEL_SET(f32, avx512bf16), SA_KERNEL_SET(f64, avx512)}
#define SA_KERNEL_ROW_NEONBF16 {SA_KERNEL_SET(f32, neonbf16), SA_KERNEL_SET(f64, neon)}
/* avx512amx: its forward and backward (bfloat16 storage on AMX tiles, any
 * other avx512's); the decode avx512's (its tile sizes are avx512's: a test
 * checks). Not avx512bf16's: on Sapphire Rapids its q.k on vdpbf16ps was
 * 7-10 % faster for 3 rows a K/V at E64 but 15-20 % slower for 4 at E128 */
#define SA_KERNEL_ROW_AVX512AMX                                                                                      \
    {{attn_fwd_f32_avx512amx, attn_decode_f32_avx512, attn_bwd_f32_avx512amx, &sa_params_f32_avx512amx}, \
     SA_KERNEL_SET(f64, avx512)}

/* one function table: row = instruction set, column = dtype */
static const sa_kernel sa_kernels[SA_ISA_COUNT][SA_DT_COUNT] = {
    SA_KERNEL_ROW(generic),
#if SA_HAVE_X86_TARGETS
    SA_KERNEL_ROW(avx2),
    SA_KERNEL_ROW(avx512),
#else
    SA_KERNEL_NONE,
    SA_KERNEL_NONE,
#endif
#if SA_HAVE_NEON_TARGET
    SA_KERNEL_ROW(neon),
#else
    SA_KERNEL_NONE,
#endif
#if SA_HAVE_X86_TARGETS
    SA_KERNEL_ROW_AVX512BF16,
#else
    SA_KERNEL_NONE,
#endif
#if SA_HAVE_NEON_TARGET
    SA_KERNEL_ROW_NEONBF16,
#else
    SA_KERNEL_NONE,
#endif
#if SA_HAVE_X86_TARGETS
    SA_KERNEL_ROW_AVX512AMX,
#else
    SA_KERNEL_NONE,
#endif
};

/* The Armv8.6 BF16 extension (BFDOT, BFCVTN), as the OS reports it */
static int sa_arm_has_bf16(void)
{
#if SA_HAVE_NEON_TARGET && defined(__linux__)
    return (getauxval(AT_HWCAP2) & HWCAP2_BF16) != 0;
#elif SA_HAVE_NEON_TARGET && defined(__APPLE__)
    int v = 0;
    size_t n = sizeof v;
    return sysctlbyname("hw.optional.arm.FEAT_BF16", &v, &n, NULL, 0) == 0 && v != 0;
#else
    return 0;
#endif
}

#if SA_HAVE_X86_TARGETS
/* AMX-TILE and AMX-BF16 (CPUID 7.0 EDX bits 24, 22), their state enabled by
 * the OS (XCR0 bits 17, 18) and, on Linux, the tile data granted to this
 * process (arch_prctl ARCH_REQ_XCOMP_PERM; without it the first tile
 * instruction faults). Asked once; anything missing: no AMX path. */
static int sa_amx_usable;
static void sa_amx_probe(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22))) return;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return;     /* OSXSAVE: xgetbv */
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return;
#if defined(__linux__)
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) return;
#else
    return;      /* other systems: not tested here, so not used */
#endif
    sa_amx_usable = 1;
}
#if SA_POSIX
static pthread_once_t sa_amx_once = PTHREAD_ONCE_INIT;
#endif
static int sa_cpu_has_amx(void)
{
#if SA_POSIX
    pthread_once(&sa_amx_once, sa_amx_probe);
    return sa_amx_usable;
#else
    return 0;
#endif
}
#endif

static int sa_cpu_has(int isa)
{
    if (isa == SA_ISA_GENERIC) return 1;
    if (isa == SA_ISA_NEON) return SA_HAVE_NEON_TARGET;   /* baseline on aarch64 */
    if (isa == SA_ISA_NEONBF16) return SA_HAVE_NEON_TARGET && sa_arm_has_bf16();
#if SA_HAVE_X86_TARGETS
    __builtin_cpu_init();
    if (isa == SA_ISA_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");   /* float16 storage: vcvtph2ps */
    if (isa == SA_ISA_AVX512 || isa == SA_ISA_AVX512BF16 || isa == SA_ISA_AVX512AMX)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               (isa == SA_ISA_AVX512 || __builtin_cpu_supports("avx512bf16")) &&
               (isa != SA_ISA_AVX512AMX || sa_cpu_has_amx());
#endif
    return 0;
}

int sa_isa_supported(int isa)
{
    if (isa < 0 || isa >= SA_ISA_COUNT || sa_kernels[isa][SA_DT_F32].fwd == NULL) return 0;
    return sa_cpu_has(isa);
}

/* avx512bf16 is the default where vdpbf16ps outruns float32 FMAs: AMD's
 * Zen 4 and Zen 5 (Zen 5: ~840 GFLOP/s on 2 cores, 1.63x its float32 FMA
 * peak). On Intel's (Sapphire Rapids measured: 12-24 independent vdpbf16ps
 * chains gave ~80 GFLOP/s a core against 140-170 for vfmadd231ps; the forced
 * bfloat16 forward ran at 0.45-0.78x of the float32 one) widening to float32
 * is faster: there avx512bf16 runs only when forced. */
/* neonbf16 is preferred wherever the CPU reports BF16: BFDOT does twice
 * FMLA's multiply-adds per instruction (not measured on hardware yet: the
 * project has no ARM machine; tested under qemu). */
static int sa_isa_preferred(int isa)
{
#if SA_HAVE_X86_TARGETS
    if (isa == SA_ISA_AVX512BF16) {
        __builtin_cpu_init();
        return __builtin_cpu_is("amd");
    }
#endif
    (void)isa;
    return 1;
}

int sa_isa_best(void)
{
    for (int isa = SA_ISA_COUNT - 1; isa > 0; isa--)
        if (sa_isa_supported(isa) && sa_isa_preferred(isa)) return isa;
    return SA_ISA_GENERIC;
}

const char *sa_isa_name(int isa)
{
    switch (isa) {
    case SA_ISA_GENERIC: return "generic";
    case SA_ISA_AVX2: return "avx2";
    case SA_ISA_AVX512: return "avx512";
    case SA_ISA_NEON: return "neon";
    case SA_ISA_AVX512BF16: return "avx512bf16";
    case SA_ISA_NEONBF16: return "neonbf16";
    case SA_ISA_AVX512AMX: return "avx512amx";
    default: return "unknown";
    }
}

/* How 16-bit storage runs on each target: the float32 kernels, each value
 * widened where it is loaded or packed (attn_pack.h, simd_<isa>.h's
 * vf_from_*_row) by this; avx512bf16's bfloat16 forward, backward and
 * decode scores multiply the 16-bit values themselves (its decode P.V
 * widens, as avx512's), as neonbf16's forward and backward do (BFDOT; its
 * decode is neon's). */
const char *sa_storage_path(int isa, int storage)
{
    if (storage == SA_STORE_BF16)
        return isa == SA_ISA_AVX512BF16  ? "vdpbf16ps"
               : isa == SA_ISA_NEONBF16  ? "BFDOT"
               : isa == SA_ISA_AVX512AMX ? "AMX tdpbf16ps"
                                         : "shifts";
    if (storage != SA_STORE_F16) return "native";
    switch (isa) {
    case SA_ISA_AVX2: return "F16C vcvtph2ps";
    case SA_ISA_AVX512:
    case SA_ISA_AVX512BF16:
    case SA_ISA_AVX512AMX: return "AVX-512 vcvtph2ps";
    case SA_ISA_NEON:
    case SA_ISA_NEONBF16: return "NEON fcvtl";
    default: return "portable C";
    }
}

/* ---- workspace ----------------------------------------------------------- */
#define SA_PACK_BUDGET_BYTES ((int64_t)8 << 20)   /* shared mode: packed K/V held at once */
#define SA_FUSED_MAX_KV_BYTES ((int64_t)4 << 20)   /* fused mode: one packed K/V per thread */
#define SA_DECODE_PREFETCH_BYTES ((int64_t)1 << 20)  /* decode: K/V beyond this prefetched */
/* Below this much work (units * L * S * (E + Ev) multiply-adds) a forward runs on one thread: a
 * second thread does not pay for its wake-up (measured on 2 vCPUs of a Sapphire Rapids Xeon:
 * 2 threads first win at about 5e5, B1 H4 L32 E64 in 32 us vs 38 us; equal below), and on a
 * loaded machine waiting for it costs milliseconds. Results do not depend on the thread count. */
#define SA_SMALL_WORK ((int64_t)1 << 19)

/* The mask fields: a known kind, its array given; a block mask with its block
 * sizes; a dropout probability in [0, 1). */
static int sa_mask_args_ok(const sa_attn_args *a)
{
    if (a->mask_kind < SA_MASK_NONE || a->mask_kind > SA_MASK_BLOCKS) return 0;
    if (a->mask_kind != SA_MASK_NONE && (!a->mask || !a->mask_off)) return 0;
    if (a->mask_kind == SA_MASK_BLOCKS && (a->bm_rows < 1 || a->bm_keys < 1)) return 0;
    if (a->score_mod && (a->softcap > 0 || !sa_sm_ok(a->score_mod))) return 0;   /* one or the other */
    return a->dropout_p >= 0 && a->dropout_p < 1;     /* (NaN fails both) */
}

int sa_layout_compute(const sa_attn_args *a, const sa_tile_params *p, int dsize, sa_layout *lay)
{
    if (a->L < 0 || a->S < 0 || a->E < 0 || a->Ev < 0 || a->n_units < 0 || a->n_kv < 0 || dsize <= 0
        || a->sink_tokens < 0 || a->schedule < SA_SCHEDULE_AUTO || a->schedule > SA_SCHEDULE_DECODE
        || a->storage < SA_STORE_NATIVE || a->storage > SA_STORE_F16 || (a->storage != SA_STORE_NATIVE && dsize != 4)
        || !sa_mask_args_ok(a))
        return SA_ERR_ARG;
    /* K/V apart from q: float32 queries and output; quantized, the scales given */
    if (a->kv_quant < SA_KV_PLAIN || a->kv_quant > SA_KV_F16)
        return SA_ERR_ARG;
    if (a->kv_quant != SA_KV_PLAIN && (a->storage != SA_STORE_NATIVE || dsize != 4))
        return SA_ERR_ARG;
    if (sa_read_scaled(sa_kv_read(a)) && (!a->k_scale || !a->v_scale || !a->kv_ks_off || !a->kv_vs_off))
        return SA_ERR_ARG;
    int64_t align = 64 / dsize;                    /* elements per 64 bytes */
    lay->n_qt = (a->L + p->bq - 1) / p->bq;
    lay->n_kb = (a->S + p->bk - 1) / p->bk;
    lay->evp = sa_round_up(a->Ev, p->vw);
    /* V rows stored back to back whose width is whole vectors are read where
     * they are: packing them would only copy. Rows further apart are packed:
     * P.V reads a block's rows down one column tile at a time, and rows a
     * multiple of 2 KiB apart (heads viewed in place in a fused (L, 3*H*E)
     * projection, E64 H8: 6 KiB) fall into 2 of L1's 64 sets: in place was
     * 3-4 % slower than packed on Zen 4 (B1 H8 L4096 E64, L2048 E128). */
    lay->v_direct = a->storage == SA_STORE_NATIVE && a->kv_quant == SA_KV_PLAIN && a->v_se == 1 && a->Ev > 0 && a->Ev % p->vw == 0
                    && a->v_ss == a->Ev;
    lay->blk_elems = sa_round_up((int64_t)p->bk * a->E + (lay->v_direct ? 0 : (int64_t)p->bk * lay->evp), align);
    lay->kv_elems = lay->n_kb * lay->blk_elems;
    /* the schedule's thresholds count K and V packed, whether or not V is
     * read in place (they were tuned so) */
    int64_t kv_bytes = lay->n_kb * sa_round_up((int64_t)p->bk * (a->E + lay->evp), align) * dsize;
    int64_t group = kv_bytes > 0 ? SA_PACK_BUDGET_BYTES / kv_bytes : a->n_kv;
    if (group < 1) group = 1;
    if (group > a->n_kv) group = a->n_kv > 0 ? a->n_kv : 1;
    lay->packed_kv = group;
    lay->qp_elems = sa_round_up((int64_t)p->bq * a->E, align);
    lay->st_elems = sa_round_up((int64_t)p->bq * p->bk, align);
    lay->oacc_elems = sa_round_up((int64_t)p->bq * lay->evp, align);
    lay->row_elems = sa_round_up(p->bq, align);
    lay->off_st = lay->qp_elems;
    lay->off_oacc = lay->off_st + lay->st_elems;
    lay->off_rows = lay->off_oacc + lay->oacc_elems;
    lay->off_conv = lay->off_rows + SA_ROW_ARRAYS * lay->row_elems;
    /* 16-bit K/V (as q, or under float32 q), decode: one key block's K and V rows converted (the other schedules
     * convert while packing) */
    lay->thread_elems = lay->off_conv
                      + (sa_kv_read(a) == SA_STORE_BF16 || sa_kv_read(a) == SA_STORE_F16
                         ? sa_round_up((int64_t)p->bk * (a->E + lay->evp), align) : 0);
    int nt = sa_effective_threads(a->num_threads);

    /* A window bounded on both sides (the right side by causal, or by
     * window_right) lets a query tile see at most `band` consecutive keys,
     * which span at most `ring` key blocks. */
    int64_t ring = 0;       /* (sink tokens: blocks far before the window too, no ring) */
    if (a->window && a->window_left >= 0 && (a->causal || a->window_right >= 0) && a->sink_tokens <= 0) {
        int64_t right = a->causal ? 0 : a->window_right;   /* causal: keys j <= p */
        int64_t band = a->window_left + right + p->bq;
        ring = (band - 1) / p->bk + 2;
    }
    /* Fused schedule when there are enough distinct K/V to keep every thread
     * busy and one packed K/V stays cache-sized: no barrier between packing and
     * computing, and the packed data is hot when it is read. Banded schedule
     * when a window leaves each tile fewer blocks than the whole K/V: each task
     * (kv unit, run of consecutive query tiles) packs the blocks it reaches
     * into its thread's ring as it goes, so packed K/V never leaves L2 and the
     * blocks outside every window cost nothing. Else shared: pack a group of
     * K/V with all threads, then compute its tiles with all threads. */
    int banded_ok = ring > 0 && ring <= SA_RING_MAX;
    /* Decode path when each distinct K/V has few query rows, its GQA heads
     * (or batch entries sharing it) stacked: nothing is packed, and the keys
     * are split into chunks that depend on the shapes only (so the merged
     * result does not depend on the thread count): about 64 tasks in all.
     * A unit stacks the rows it really has (q_len: at most their max, so a
     * ragged KV-cache call of one new token per sequence padded to L rows
     * is still a decode step). */
    int64_t gmax = 0;
    for (int64_t g = 0; g < a->n_kv; g++)
        if (a->kv_start[g + 1] - a->kv_start[g] > gmax) gmax = a->kv_start[g + 1] - a->kv_start[g];
    lay->dec_l = a->L;
    if (a->q_len) {
        lay->dec_l = 0;
        for (int64_t u = 0; u < a->n_units; u++)
            if (a->q_len[u] > lay->dec_l) lay->dec_l = a->q_len[u];
        if (lay->dec_l > a->L) lay->dec_l = a->L;
    }
    lay->dec_rows = gmax * lay->dec_l;
    int64_t ck = a->n_kv > 0 ? (a->S * a->n_kv + 63) / 64 : a->S;
    if (ck < 256) ck = 256;
    lay->dec_ck = sa_round_up(ck, p->bk);
    /* at most 64 chunks: ck >= S n_kv / 64 >= S / 64, or ck >= 256 > S / 64 */
    lay->dec_chunks = a->S > 0 ? (a->S + lay->dec_ck - 1) / lay->dec_ck : 1;
    int decode_ok = a->L > 0 && a->S > 0 && a->dropout_p == 0 && lay->dec_rows >= 1 && lay->dec_rows <= SA_DECODE_MAX_ROWS
                    && lay->dec_rows <= p->bq && lay->dec_chunks <= SA_DECODE_MAX_CHUNKS;
    lay->dec_part_elems = sa_round_up(lay->dec_rows * (lay->evp + 2), align);
    /* decode: K/V larger than a core's L2 are prefetched a block ahead
     * (attn_decode_body.h): in an LLM's decode loop they come from memory at
     * every step (the other layers' K/V and weights pass in between); K/V
     * this small stay in L2, where the prefetches only cost (about 6 %) */
    {
        const int rd = sa_kv_read(a);
        const int64_t kes = rd == SA_STORE_NATIVE ? dsize : rd == SA_STORE_BF16 || rd == SA_STORE_F16 ? 2 : 1;
        lay->dec_prefetch = (double)a->n_kv * (double)a->S * (double)(a->E + a->Ev) * (double)kes
                            >= (double)SA_DECODE_PREFETCH_BYTES;
    }
    if (a->schedule == SA_SCHEDULE_SHARED || a->schedule == SA_SCHEDULE_FUSED) {
        lay->sched = a->schedule;
    } else if (a->schedule == SA_SCHEDULE_BANDED && banded_ok) {
        lay->sched = SA_SCHEDULE_BANDED;
    } else if (decode_ok && (a->schedule == SA_SCHEDULE_DECODE || a->schedule == SA_SCHEDULE_AUTO)) {
        lay->sched = SA_SCHEDULE_DECODE;
    } else if (a->n_kv >= 4 * (int64_t)nt && kv_bytes <= SA_FUSED_MAX_KV_BYTES) {
        lay->sched = SA_SCHEDULE_FUSED;
    } else if (banded_ok && ring < lay->n_kb) {
        lay->sched = SA_SCHEDULE_BANDED;
    } else {
        lay->sched = SA_SCHEDULE_SHARED;
    }
    /* paged K/V: read through sa_kv_runs, which only the decode schedule does */
    if (a->block_table && (a->page_size < 1 || !a->kv_bt_off || lay->sched != SA_SCHEDULE_DECODE))
        return SA_ERR_ARG;
    /* Decode on paged K/V: the kv units sharing a row of the block table (a
     * sequence's heads, consecutive) in one task, when that still leaves 4
     * tasks per thread; a page's bytes are then read by one task (the
     * results are those of one unit per task, bit for bit) */
    lay->dec_gang = 1;
    if (lay->sched == SA_SCHEDULE_DECODE && a->block_table && a->n_kv > 1) {
        int64_t run = 1;
        while (run < a->n_kv && a->kv_bt_off[run] == a->kv_bt_off[0]) run++;
        int64_t gang = run < SA_DECODE_MAX_GANG ? run : SA_DECODE_MAX_GANG;
        for (; gang > 1; gang--) {
            int ok = run % gang == 0 && a->n_kv % gang == 0
                     && (a->n_kv / gang) * lay->dec_chunks >= 4 * (int64_t)nt;
            for (int64_t g = 0; ok && g < a->n_kv; g++)
                ok = a->kv_bt_off[g] == a->kv_bt_off[g - g % gang];
            if (ok) break;
        }
        lay->dec_gang = gang;
    }
    lay->off_qgang = lay->thread_elems;
    if (lay->dec_gang > 1) lay->thread_elems += (lay->dec_gang - 1) * sa_round_up(lay->dec_rows * a->E, align);
    lay->ring = lay->sched == SA_SCHEDULE_BANDED ? ring : 0;
    /* banded: about 4 tasks per thread, runs of at least 4 tiles (a run
     * re-packs the ring - 2 blocks its predecessor ended on) */
    int64_t per_kv = a->n_kv > 0 ? (4 * (int64_t)nt + a->n_kv - 1) / a->n_kv : 1;
    lay->chunk = lay->n_qt > 0 ? (lay->n_qt + per_kv - 1) / per_kv : 1;
    if (lay->chunk < 4) lay->chunk = 4;
    lay->n_chunks = lay->n_qt > 0 ? (lay->n_qt + lay->chunk - 1) / lay->chunk : 1;
    switch (lay->sched) {
    case SA_SCHEDULE_FUSED: lay->tasks = a->n_kv; break;
    case SA_SCHEDULE_BANDED: lay->tasks = a->n_kv * lay->n_chunks; break;
    case SA_SCHEDULE_DECODE: lay->tasks = (a->n_kv + lay->dec_gang - 1) / lay->dec_gang * lay->dec_chunks; break;
    default: lay->tasks = a->n_units * lay->n_qt; break;
    }
    int64_t tasks = lay->tasks < 1 ? 1 : lay->tasks;
    if (nt > tasks) nt = (int)tasks;
    if ((double)a->n_units * (double)a->L * (double)a->S * (double)(a->E + a->Ev) < (double)SA_SMALL_WORK)
        nt = 1;
    lay->nt = nt;
    lay->packed_elems = lay->sched == SA_SCHEDULE_FUSED ? (int64_t)nt * lay->kv_elems
                      : lay->sched == SA_SCHEDULE_BANDED ? (int64_t)nt * lay->ring * lay->blk_elems
                      : lay->sched == SA_SCHEDULE_DECODE ? a->n_kv * lay->dec_chunks * lay->dec_part_elems
                      : group * lay->kv_elems;
    lay->total_bytes = (size_t)((lay->packed_elems + (int64_t)nt * lay->thread_elems) * dsize);
    return SA_OK;
}

/* The backward's chunking depends on the shapes only (never on the thread
 * count, so results do not either): about 32 tasks in all, at most
 * SA_BWD_MAX_CHUNKS key chunks per kv unit (each chunk keeps a partial dQ). */
int sa_bwd_layout_compute(const sa_attn_args *a, const sa_tile_params *p, int dsize, sa_bwd_layout *lay)
{
    /* 16-bit storage and quantized K/V: the forward only (selfattn.h) */
    if (a->L < 0 || a->S < 0 || a->E < 0 || a->Ev < 0 || a->n_units < 0 || a->n_kv < 0 || dsize <= 0
        || a->sink_tokens < 0 || (a->storage != SA_STORE_NATIVE && (a->storage != SA_STORE_BF16 || dsize != 4))
        || a->kv_quant != SA_KV_PLAIN || a->block_table
        || !sa_mask_args_ok(a))
        return SA_ERR_ARG;
    int64_t align = 64 / dsize;
    int64_t bq = p->bq, bk = p->bk;
    lay->n_qt = (a->L + bq - 1) / bq;
    lay->n_kb = (a->S + bk - 1) / bk;
    lay->lp = lay->n_qt * bq;
    lay->ep = sa_round_up(a->E, p->vw);
    lay->evp = sa_round_up(a->Ev, p->vw);
    int64_t nc = a->n_kv > 0 ? (32 + a->n_kv - 1) / a->n_kv : 1;
    if (nc > SA_BWD_MAX_CHUNKS) nc = SA_BWD_MAX_CHUNKS;
    if (nc > lay->n_kb) nc = lay->n_kb;
    if (nc < 1) nc = 1;
    lay->cb = lay->n_kb > 0 ? (lay->n_kb + nc - 1) / nc : 1;
    lay->nc = lay->n_kb > 0 ? (lay->n_kb + lay->cb - 1) / lay->cb : 1;
    lay->tasks = a->n_kv * lay->nc;
    lay->part_elems = sa_round_up(lay->lp * lay->ep, align);
    lay->part_off = sa_round_up(a->n_units * lay->lp, align);
    lay->shared_elems = lay->part_off + a->n_units * lay->nc * lay->part_elems;
    int64_t o = 0;
#define SA_PIECE(field, n) do { lay->field = o; o += sa_round_up((n), align); } while (0)
    SA_PIECE(off_kt, a->E * bk);
    SA_PIECE(off_kr, bk * lay->ep);
    SA_PIECE(off_vt, a->Ev * bk);
    SA_PIECE(off_dk, bk * lay->ep);
    SA_PIECE(off_dv, bk * lay->evp);
    SA_PIECE(off_qs, bq * lay->ep);
    SA_PIECE(off_qu, bq * lay->ep);
    SA_PIECE(off_do, bq * lay->evp);
    SA_PIECE(off_s, bq * bk);
    SA_PIECE(off_dp, bq * bk);
    SA_PIECE(off_raw, bq * bk);
    SA_PIECE(off_rows, 2 * bq);
    SA_PIECE(off_pairs, a->storage == SA_STORE_BF16 ? bq * bk : 0);   /* bfloat16: P^T, dS^T paired */
#undef SA_PIECE
    lay->thread_elems = o;
    int nt = sa_effective_threads(a->num_threads);
    int64_t most = lay->tasks > a->n_units ? lay->tasks : a->n_units;
    if (most < 1) most = 1;
    if (nt > most) nt = (int)most;
    lay->nt = nt;
    lay->total_bytes = (size_t)((lay->shared_elems + (int64_t)nt * lay->thread_elems) * dsize);
    return SA_OK;
}

int sa_tile_params_get(int isa, int dtype_size, sa_tile_params *params)
{
    if (isa < 0 || isa >= SA_ISA_COUNT || sa_kernels[isa][SA_DT_F32].fwd == NULL) return SA_ERR_ISA;
    if (dtype_size != 4 && dtype_size != 8) return SA_ERR_ARG;
    *params = *sa_kernels[isa][dtype_size == 4 ? SA_DT_F32 : SA_DT_F64].params;
    return SA_OK;
}

/* The kernels for (isa, dtype_size), NULL where there are none (status in *st). */
static const sa_kernel *sa_kernel_for(int isa, int dtype_size, int *st)
{
    *st = !sa_isa_supported(isa) ? SA_ERR_ISA : dtype_size != 4 && dtype_size != 8 ? SA_ERR_ARG : SA_OK;
    return *st == SA_OK ? &sa_kernels[isa][dtype_size == 4 ? SA_DT_F32 : SA_DT_F64] : NULL;
}

static int sa_layout_for(const sa_attn_args *a, int isa, int dtype_size, sa_layout *lay)
{
    int st;
    const sa_kernel *k = sa_kernel_for(isa, dtype_size, &st);
    return k ? sa_layout_compute(a, k->params, dtype_size, lay) : st;
}

int sa_attn_workspace_size(const sa_attn_args *a, int isa, int dtype_size, size_t *bytes)
{
    sa_layout lay;
    int st = sa_layout_for(a, isa, dtype_size, &lay);
    if (st != SA_OK) return st;
    *bytes = lay.total_bytes;
    return SA_OK;
}

int sa_attn_schedule(const sa_attn_args *a, int isa, int dtype_size, sa_schedule *sch)
{
    sa_layout lay;
    int st = sa_layout_for(a, isa, dtype_size, &lay);
    if (st != SA_OK) return st;
    sch->threads = lay.nt;
    sch->fused = lay.sched == SA_SCHEDULE_FUSED;
    sch->banded = lay.sched == SA_SCHEDULE_BANDED;
    sch->decode = lay.sched == SA_SCHEDULE_DECODE;
    sch->compute_tasks = lay.tasks;
    sch->packed_kv = lay.packed_kv;
    sch->key_chunks = 0;
    sch->ring_blocks = lay.ring;
    sch->prefetch = lay.sched == SA_SCHEDULE_DECODE && lay.dec_prefetch;
    return SA_OK;
}

/* The backward's layout on isa; bfloat16 storage on avx512bf16, neonbf16 and
 * avx512amx only (their bfloat16-dot backward: every other target computes
 * from float32 copies). */
static int sa_bwd_layout_for(const sa_attn_args *a, int isa, int dtype_size, sa_bwd_layout *lay)
{
    int st;
    const sa_kernel *k = sa_kernel_for(isa, dtype_size, &st);
    if (!k) return st;
    if (a->storage != SA_STORE_NATIVE && isa != SA_ISA_AVX512BF16 && isa != SA_ISA_NEONBF16
        && isa != SA_ISA_AVX512AMX)
        return SA_ERR_ARG;
    return sa_bwd_layout_compute(a, k->params, dtype_size, lay);
}

int sa_attn_bwd_workspace_size(const sa_attn_args *a, int isa, int dtype_size, size_t *bytes)
{
    sa_bwd_layout lay;
    int st = sa_bwd_layout_for(a, isa, dtype_size, &lay);
    if (st != SA_OK) return st;
    *bytes = lay.total_bytes;
    return SA_OK;
}

int sa_attn_bwd_schedule(const sa_attn_args *a, int isa, int dtype_size, sa_schedule *sch)
{
    sa_bwd_layout lay;
    int st = sa_bwd_layout_for(a, isa, dtype_size, &lay);
    if (st != SA_OK) return st;
    sch->threads = lay.nt;
    sch->fused = sch->banded = sch->decode = 0;
    sch->compute_tasks = lay.tasks;
    sch->packed_kv = 0;
    sch->key_chunks = lay.nc;
    sch->ring_blocks = 0;
    sch->prefetch = 0;
    return SA_OK;
}

/* The forward: the layout (which also picks the schedule), the workspace
 * check, then the forward kernel, or the decode kernel on the decode schedule. */
static int sa_attn_fwd(const sa_attn_args *a, int isa, int dtype_size, void *ws, size_t ws_bytes)
{
    int st;
    const sa_kernel *k = sa_kernel_for(isa, dtype_size, &st);
    if (!k) return st;
    sa_layout lay;
    if (sa_layout_compute(a, k->params, dtype_size, &lay) != SA_OK) return SA_ERR_ARG;
    if (ws_bytes < lay.total_bytes || ws == NULL) return SA_ERR_WORKSPACE;
    return (lay.sched == SA_SCHEDULE_DECODE ? k->decode : k->fwd)(a, &lay, ws);
}

static int sa_attn_bwd(const sa_attn_args *a, int isa, int dtype_size, void *ws, size_t ws_bytes)
{
    int st;
    const sa_kernel *k = sa_kernel_for(isa, dtype_size, &st);
    if (!k) return st;
    if (a->lse == NULL || a->out == NULL || a->dout == NULL || a->dq == NULL || a->dk == NULL || a->dv == NULL)
        return SA_ERR_ARG;
    sa_bwd_layout lay;
    if (sa_bwd_layout_for(a, isa, dtype_size, &lay) != SA_OK) return SA_ERR_ARG;
    if (ws_bytes < lay.total_bytes || ws == NULL) return SA_ERR_WORKSPACE;
    return k->bwd(a, &lay, ws);
}

int sa_attn_fwd_f32(const sa_attn_args *a, int isa, void *ws, size_t ws_bytes)
{
    return sa_attn_fwd(a, isa, 4, ws, ws_bytes);
}

int sa_attn_fwd_f64(const sa_attn_args *a, int isa, void *ws, size_t ws_bytes)
{
    return sa_attn_fwd(a, isa, 8, ws, ws_bytes);
}

int sa_attn_bwd_f32(const sa_attn_args *a, int isa, void *ws, size_t ws_bytes)
{
    return sa_attn_bwd(a, isa, 4, ws, ws_bytes);
}

int sa_attn_bwd_f64(const sa_attn_args *a, int isa, void *ws, size_t ws_bytes)
{
    return sa_attn_bwd(a, isa, 8, ws, ws_bytes);
}

/* ---- task runner ---------------------------------------------------------- */
#define SA_POLL_SECONDS 0.02

static double sa_now(void)
{
#if SA_POSIX
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
#else
    return 0.0;   /* no clock: poll after every task */
#endif
}

int sa_poll_interrupt(const sa_attn_args *a, double *last_poll)
{
    if (!a->interrupt) return 0;
    double t = sa_now();
    if (t - *last_poll < SA_POLL_SECONDS) return 0;
    *last_poll = t;
    return a->interrupt(a->interrupt_ctx) != 0;
}

int sa_run_tasks(int64_t n, int nt, sa_task_fn fn, void *ctx, const sa_attn_args *a)
{
    if (n <= 0) return SA_OK;
    if (nt > n) nt = (int)n;
    double last_poll = sa_now();
    if (nt <= 1) {
        for (int64_t t = 0; t < n; t++) {
            fn(ctx, t, 0);
            if (a->interrupt && sa_now() - last_poll >= SA_POLL_SECONDS) {
                last_poll = sa_now();
                if (a->interrupt(a->interrupt_ctx)) return SA_ERR_INTERRUPTED;
            }
        }
        return SA_OK;
    }
#ifdef _OPENMP
    int64_t next = 0;
    int stop = 0;
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num();
        for (;;) {
            int64_t t;
            int halt;
#pragma omp atomic read
            halt = stop;
            if (halt) break;
#pragma omp atomic capture
            t = next++;
            if (t >= n) break;
            fn(ctx, t, tid);
            /* thread 0 is the caller's thread: the only one that may call back into Python */
            if (tid == 0 && a->interrupt && sa_now() - last_poll >= SA_POLL_SECONDS) {
                last_poll = sa_now();
                if (a->interrupt(a->interrupt_ctx)) {
#pragma omp atomic write
                    stop = 1;
                }
            }
        }
    }
    return stop ? SA_ERR_INTERRUPTED : SA_OK;
#else
    return SA_ERR_ARG;   /* unreachable: nt is 1 without OpenMP */
#endif
}
