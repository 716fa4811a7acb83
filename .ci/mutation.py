#!/usr/bin/env python3
"""Mutation check: plant known faults in the C kernel and show that the tests catch each one.

A test suite that passes a broken kernel is worse than none: it says "correct" about code it
never checked. This script keeps the suite honest. For each planted fault (a one-line change
of src_c/, listed in MUTANTS) it builds the kernel with that fault and runs

  * the C kernel tests (tests/c/attn_smoke.c, tests/c/test_index64.c), always, and
  * with --python, the Python test suite (or the files given with --tests) against the
    extension built from the mutated sources,

and requires every mutant to be "killed" (some test fails). Each mutant is compiled once: with
--python the C tests link the object files of the extension's build; the Cython part
(_core.pyx -> _core.c -> _core.o), the same for every mutant, is compiled once for all (cached_cc). The unmutated sources are run
first: they must pass, or a failure would prove nothing. A mutation whose text no longer
occurs exactly once in its file is an error (the source moved on: update the list here),
never a silent pass.

    python .ci/mutation.py                      # C tests only, about 4 minutes on 2 cores
    python .ci/mutation.py --python             # also the Python suite (CI: some files, -x)
    python .ci/mutation.py --python --tests tests/forward/test_vs_reference.py -x

Exit status 0 when every mutant is killed, 1 otherwise (or on a build error).
"""

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BODY = "src_c/attn_fwd_body.h"
DECODE = "src_c/attn_decode_body.h"
BWD = "src_c/attn_bwd_body.h"
ROWS = "src_c/attn_rows.h"
MERGE = "src_c/lse_merge.h"
DISPATCH = "src_c/dispatch.c"

# (name, file, exact text, replacement, what the fault is)
MASK = "src_c/attn_mask.h"
PACK = "src_c/attn_pack.h"
HALF = "src_c/half.h"
MICRO = "src_c/attn_micro.h"
INTERNAL = "src_c/attn_internal.h"
AMX = "src_c/attn_amx.h"
MUTANTS = [
    ("nan_output", BODY, "Oacc + r * evp, (T)1 / l[r]);", "Oacc + r * evp, (T)NAN);",
     "every output row is NaN (the fmax() blind spot of the old C smoke test)"),
    ("wrong_rescale", BODY, "alpha[r] = m[r] - msafe[r];", "alpha[r] = (m[r] - msafe[r]) * (T)0.5;",
     "online softmax rescales O and l by 2^(d/2) instead of 2^d when the running max moves by d"),
    ("off_by_one_tile_edge", BODY, "int64_t kvalid = um.S - j0 < BK ? um.S - j0 : BK;",
     "int64_t kvalid = um.S - j0 < BK ? um.S - j0 : BK - 1;",
     "the last key of every full key block is dropped (only a problem with S >= BK)"),
    ("dropped_mask_bit", ROWS, "if (!m[j * ss]) s[j] = NEG_INF;",
     "if (!m[j * ss] && j != ve - 1) s[j] = NEG_INF;",
     "a False in a bool mask is ignored at the last visible key of each row and block"),
    ("wrong_lse", BODY, "(T)(SA_LN2 * (double)m[r] + log((double)l[r]))",
     "(T)((double)m[r] + log((double)l[r]))",
     "lse mixes log2 and natural-log units (the running max is not converted)"),
    ("float_mask_units", ROWS, "s[j] += (T)(m[j * ss] * SA_LOG2E);", "s[j] += (T)m[j * ss];",
     "a float64 mask is added in natural-log units to log2-unit scores"),
    ("causal_off_by_one", MASK, "if (m->causal && p < h) h = p;", "if (m->causal && p + 1 < h) h = p + 1;",
     "under is_causal, query p also sees key p + 1"),
    ("window_left_off_by_one", MASK, "if (m->left >= 0 && p - m->left > l) l = p - m->left;",
     "if (m->left >= 0 && p - m->left + 1 > l) l = p - m->left + 1;",
     "a window (left, .) sees one key less on the left"),
    ("alignment_ignored", MASK, ": a->alignment == SA_ALIGN_BOTTOM_RIGHT ? m->S - m->L : 0;",
     ": 0;", "bottom_right alignment behaves as top_left"),
    ("alibi_sign", ROWS, "s[j] -= slope * (d < 0 ? -d : d);", "s[j] += slope * (d < 0 ? -d : d);",
     "ALiBi adds +slope |p - j| instead of subtracting it"),
    ("key_lengths_read_past_end", BODY, "FN(pack_block)(c, g, kb, hi + 1, Kp + kb * c->lay->blk_elems);",
     "FN(pack_block)(c, g, kb, a->S, Kp + kb * c->lay->blk_elems);",
     "the fused schedule packs (reads) keys past key_lengths: NaN/Inf there leaks into the packed block"),
    ("banded_stale_slot", BODY, "if (slot_kb[kb % ring] == kb) continue;", "if (slot_kb[kb % ring] >= 0) continue;",
     "the banded schedule reuses a ring slot that holds another key block (stale K/V)"),
    ("decode_no_rescale", DECODE, "alph[rr] = (T)exp2((double)(mp[rr] - msafe));", "alph[rr] = 1;",
     "the decode path does not rescale O when a later key block raises the running max"),
    ("decode_merge_unweighted_l", MERGE, "total += w[c] * l[c][l_off];",
     "total += l[c][l_off];",
     "the split-KV merge sums the chunks' l without their weights exp(m_c - M)"),
    ("bwd_no_softcap_derivative", BWD, "ds = V(mul)(ds, V(sub)(one, V(mul)(t, t)));", "(void)t;",
     "the backward forgets softcap's derivative 1 - tanh^2"),
    ("bwd_no_delta", BWD, "VT dr = V(set1)(Dr[r]);", "VT dr = V(zero)();",
     "the backward drops D = rowsum(dO o O) from dS = P (dP - D)"),
    ("bwd_chunks_follow_threads", DISPATCH,
     "int64_t nc = a->n_kv > 0 ? (32 + a->n_kv - 1) / a->n_kv : 1;",
     "int64_t nc = a->n_kv > 0 ? (16 * sa_effective_threads(a->num_threads) + a->n_kv - 1) / a->n_kv : 1;",
     "the backward's key chunks depend on the thread count: dQ's sums change with it"),
    ("bwd_stale_dk_block", BWD, "for (int64_t i = 0; i < BK * ep; i++) dKa[i] = 0;", "(void)0;",
     "the backward does not clear dK's block accumulator: one key block's dK leaks into the next"),
    ("f16_store_truncates", HALF, "uint32_t r = a + 0xfffu + ((a >> 13) & 1u);", "uint32_t r = a;",
     "float16 output truncated instead of rounded to nearest even (the portable conversion: the generic "
     "path, and every path's last values of a row)"),
    ("half_load_ignores_stride", PACK,
     "dst[e] = (T)(storage == SA_STORE_BF16 ? sa_bf16_to_f32(s[e * se]) : sa_f16_to_f32(s[e * se]));",
     "dst[e] = (T)(storage == SA_STORE_BF16 ? sa_bf16_to_f32(s[e]) : sa_f16_to_f32(s[e]));",
     "a 16-bit row read with stride 1 whatever its stride (strided or transposed q, k, v)"),
    ("decode_f16_read_as_bf16", MICRO,
     "if (st == SA_STORE_F16) return V(load_f16)((const uint16_t *)base + i);",
     "if (st == SA_STORE_F16) return V(load_bf16)((const uint16_t *)base + i);",
     "the decode schedule widens float16 K/V, read in place, as bfloat16 (every ISA)"),
    ("sink_left_out_of_lse", BODY, "if (lse) lse[(i0 + r) * a->lse_sl] = (T)(SA_LN2 * M + log(tot));",
     "if (lse) lse[(i0 + r) * a->lse_sl] = (T)(SA_LN2 * mr + log((double)l[r]));",
     "the forward's lse leaves the sink out (the backward, which reads lse, then gets P wrong)"),
    ("decode_rows_left_third_dropped", DECODE, "case 3: FN(decode_pv_rows)(P0, 3,", "case 3: FN(decode_pv_rows)(P0, 2,",
     "decode: of the 1-3 rows left after whole fours (GQA groups of 3, 7), the third's P.V left out"),
    ("bf16dec_pv_front_key_read", MICRO, "(acc, P, n, j, vp[j] + c0, vp[j + 1] + c0, 0, 0, cm[0], cm[1], nc, 1);",
     "(acc, P, n, j, vp[j] + c0, vp[j + 1] + c0, cm[0], cm[1], cm[0], cm[1], nc, 1);",
     "avx512bf16 decode P.V: the pair before a row group's first (odd) key reads that key's V row (P = 0 x NaN)"),
    ("bf16dec_pv_back_key_read", MICRO, "(acc, P, n, j, vp[j] + c0, vp[j + 1] + c0, cm[0], cm[1], 0, 0, nc, 1);",
     "(acc, P, n, j, vp[j] + c0, vp[j + 1] + c0, cm[0], cm[1], cm[0], cm[1], nc, 1);",
     "avx512bf16 decode P.V: the pair after a row group's last (even) key reads the next key's V row"),
    ("bf16dec_pv_columns_out_of_order", MICRO,
     "_mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);",
     "_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);",
     "avx512bf16 decode P.V: the zipped chunk's columns put back in the wrong order"),
    ("decode_sink_ignored", DECODE, "T sink2 = a->sink ? (T)(a->sink[u] * SA_LOG2E) : -(T)INFINITY;",
     "T sink2 = -(T)INFINITY;",
     "the decode schedule's merge drops the attention sink"),
    ("sink_tokens_gap_visible", ROWS, "    if (shi >= 0)                                            /* the keys between sinks and interval */",
     "    if (0)",
     "the keys between the sink tokens and the window, inside one block, stay visible"),
    ("sink_token_blocks_skipped", MASK, "return shi >= 0 || hi < lo ? 0 : lo / bk;", "return hi < lo ? 0 : lo / bk;",
     "the blocks of the sink tokens are not visited when a window follows them"),
    ("decode_i8_no_v_scale", DECODE, "for (int64_t j = vs[rr]; j < ve[rr]; j++) s[j] *= vsv[j];",
     "(void)vsv;", "the decode schedule's int8 P.V leaves out v's scales"),
    ("paged_run_base_off_by_one", INTERNAL, "runs[n].v = a->kv_v_off[g] + pg * a->v_page_s + (r - j) * a->v_ss;",
     "runs[n].v = a->kv_v_off[g] + pg * a->v_page_s + (r + 1 - j) * a->v_ss;",
     "paged K/V: each value read from the next row of its page"),
    ("paged_gang_shared_q", DECODE, "gi == 0 ? ws : ws + lay->off_qgang + (gi - 1) * lay->dec_rows * E", "ws",
     "paged decode, a sequence's heads in one task: every head's queries in one buffer (the last one wins)"),
    ("block_mask_partial_as_full", ROWS, "} else if (id >= 0) {                          /* bits of row i, key j at m[j] */",
     "} else if (id >= 0 && 0) {", "a block mask's partial blocks read as full (their bits ignored)"),
    ("block_mask_bits_of_first_row", ROWS, "(id * a->bm_rows + i % a->bm_rows) * bk", "(id * a->bm_rows) * bk",
     "every row of a partial block reads the block's first row of bits"),
    ("block_mask_skips_partial_tiles", MASK, "if (t[qb * a->mask_sl + kb * a->mask_ss] != SA_BLOCK_EMPTY) return 0;",
     "if (t[qb * a->mask_sl + kb * a->mask_ss] == SA_BLOCK_FULL) return 0;",
     "tiles that meet only partial (and empty) blocks are skipped as if empty"),
    ("dropout_dv_from_undropped_p", BWD, "V(store)(St + r * BK + j, V(mul)(p, zz));", "(void)0;",
     "the backward's dV from the undropped probabilities"),
    ("dropout_counter_row_off_by_one", "src_c/dropout.h", "uint32_t c[4] = {(uint32_t)g, (uint32_t)i, (uint32_t)u,",
     "uint32_t c[4] = {(uint32_t)g, (uint32_t)(i + 1), (uint32_t)u,",
     "dropout's mask drawn for the next row (forward and backward alike: only the reference sees it)"),
    ("dropout_kept_not_rescaled", ROWS, "const T kept = (T)(1.0 / (1.0 - a->dropout_p));", "const T kept = (T)1;",
     "kept probabilities not scaled by 1 / (1 - p)"),
    ("score_mod_no_derivative", BWD, "if (a->score_mod) ds = V(mul)(ds, V(load)(gm + j));", "(void)gm;",
     "the backward forgets score_mod's derivative (dS as if score_mod were the identity)"),
    ("score_mod_log2_units", ROWS, "x[j] = (double)s[c + j] * SA_LN2;", "x[j] = (double)s[c + j];",
     "score_mod sees the kernels' log2-unit scores instead of natural-log ones"),
    ("score_mod_strided_read_forward", "src_c/score_mod.h",
     "else if (step == -1) for (j = 0; j < n; j++) f[j] = src[-j];",
     "else if (step == -1) for (j = 0; j < n; j++) f[j] = src[j];",
     "a bias read backward along the row (T5's bias[h, q - kv]) is read forward"),
    ("score_mod_index_no_wrap", "src_c/score_mod.h", "int64_t x = v < 0 ? v + dn : v;", "int64_t x = v;",
     "a negative index into a captured array is clamped to 0 instead of wrapping once (NumPy's)"),
    ("pack_i8_scale_of_next_key", PACK, "T f = jj < nvalid ? (T)sc[jj * scs] : 0;",
     "T f = jj + 1 < nvalid ? (T)sc[(jj + 1) * scs] : 0;", "int8 K/V packed with the next key's scale"),
    ("amx_p_tail_not_zeroed", AMX, "for (int64_t w = b; w < hi; w++) pw[w] = 0;", "(void)0;",
     "AMX's P.V: a row's words past its group's keys (the other group's range) keep stale scores"),
    ("amx_p_head_not_zeroed", AMX, "for (int64_t w = lo; w < a; w++) pw[w] = 0;", "(void)0;",
     "AMX's P.V: a row's words before its group's keys keep stale scores (windows)"),
    ("amx_e_remainder_dropped", AMX, "if (e16 < E2) {", "if (0) {",
     "AMX's Q.K^T: the last E2 % 16 words of E left out (E not a multiple of 32)"),
    ("amx_bwd_dq_ends_dropped", BWD, "if (wa > pa) FN(mm_pairs)", "if (0) FN(mm_pairs)",
     "AMX's backward: dQ leaves out the key pairs before its first whole 16-pair step"),
    ("amx_bwd_ev_remainder_config", BWD, "if (Ev2 % 16 != E2 % 16) FN(amx_config)(Ev2);", "(void)0;",
     "AMX's backward: dP = dO V^T multiplied with E's remainder tiles where Ev's differs"),
    ("amx_bwd_dkdv_not_transposed", BWD, "SA_GRAD_OUT(dVa[e * BK + jj]);", "SA_GRAD_OUT(dVa[jj * evp + e]);",
     "AMX's backward: dV written out as if its accumulator were [keys][Ev], not dV^T"),
]

# A mutant that only a CPU feature runs (/proc/cpuinfo's flag; prefix of its name -> flag) is
# skipped, and said so, where the CPU lacks it: its path is not built to run there, so no test can
# kill it (the tests of that path skip too). The record of a full pass says which CPU ran them.
NEEDS_CPU = {"amx_": "amx_bf16", "bf16dec_": "avx512_bf16"}


def cpu_flags():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()

# A mutant of a feature meets that feature's own test file first (when it is among --tests): with
# -x its run then stops in seconds instead of after every other file (the same files run either way)
FIRST_TESTS = {"score_mod_": "test_flex_score_mod.py", "dropout_": "test_dropout.py", "block_mask_": "test_flex.py",
               "paged_": "test_paged.py", "decode_i8_": "test_kv_int8.py", "decode_rows_": "test_decode.py", "sink": "test_sinks.py",
               "amx_bwd_": "test_bf16_dot_backward.py", "amx_": "test_bf16_dot.py",
               "bf16dec_": "test_bf16_dot_decode.py"}


def tests_for(name, files):
    """files with the mutant's own test file (FIRST_TESTS) moved to the front."""
    own = next((f for p, f in FIRST_TESTS.items() if name.startswith(p)), None)
    first = [t for t in files if own and Path(t).name == own]
    return first + [t for t in files if t not in first]


C_SOURCES = ["dispatch.c", "merge.c", "attn_generic.c", "attn_avx2.c", "attn_avx512.c", "attn_neon.c"]
C_TESTS = [("attn_smoke.c", ["-O2", "-fopenmp"]), ("test_index64.c", ["-O1", "-fopenmp"])]


def log(msg):
    print(msg, flush=True)


def compiler():
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shlex.split(cc)


def copy_tree(dst):
    """The parts of the repository a build and the tests need (no .git, build/, in-place .so)."""
    ignore = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "*.so", "_core.c", "__pycache__",
                                    ".hypothesis", ".pytest_cache", ".benchmarks")
    shutil.copytree(ROOT, dst, ignore=ignore)


def apply(tree, mutant):
    name, rel, old, new, _ = mutant
    path = Path(tree) / rel
    text = path.read_text()
    count = text.count(old)
    if count != 1:
        raise SystemExit(f"mutation {name!r}: {old!r} occurs {count} times in {rel} (expected once); "
                         f"the source changed, update MUTANTS in {__file__}")
    path.write_text(text.replace(old, new))


def extension_objects(tree):
    """The kernel's object files the extension build left in tree/build (pip builds in the tree),
    in C_SOURCES order; None if any is missing."""
    found = {p.name: p for p in Path(tree).glob("build/temp.*/src_c/*.o")}
    objs = [found.get(f.replace(".c", ".o")) for f in C_SOURCES]
    return None if None in objs else objs


def run_c_tests(tree, workdir, objs=None):
    """{test program: (killed?, summary line)} for the C tests built against tree/src_c.
    The kernel sources are compiled once (-O2 -fopenmp, two at a time) and linked into each test;
    objs: the extension build's objects of the same sources (with --python), linked instead."""
    src = Path(tree) / "src_c"
    if objs is not None:
        return link_c_tests(tree, workdir, objs)
    objs = [Path(workdir) / f.replace(".c", ".o") for f in C_SOURCES]

    def compile_one(pair):
        c_file, obj = pair
        cmd = compiler() + ["-O2", "-fopenmp", f"-I{src}", "-c", str(src / c_file), "-o", str(obj)]
        return cmd, subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for cmd, r in pool.map(compile_one, zip(C_SOURCES, objs)):
            if r.returncode != 0:
                raise SystemExit(f"compiling failed:\n$ {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return link_c_tests(tree, workdir, objs)


def link_c_tests(tree, workdir, objs):
    src = Path(tree) / "src_c"
    results = {}
    for test, flags in C_TESTS:
        exe = Path(workdir) / test.replace(".c", "")
        cmd = compiler() + flags + [f"-I{src}", str(Path(tree) / "tests" / "c" / test)] + \
            [str(o) for o in objs] + ["-lm", "-lpthread", "-o", str(exe)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"building {test} failed:\n$ {' '.join(cmd)}\n{r.stderr[-3000:]}")
        r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=900)
        m = re.search(r"^(\d+) passed, (\d+) failed", r.stdout, re.M)
        summary = m.group(0) if m else f"exit {r.returncode}, no summary"
        results[test] = (r.returncode != 0 or not m or int(m.group(2)) > 0, summary)
    return results


# The Cython part of the extension (_core.pyx -> _core.c -> _core.o) is the same for every mutant
# (the faults are planted in src_c/): it is generated and compiled once, by the unmutated build,
# and reused. CC points at this wrapper, which serves _core.c's object from a cache keyed by the
# file's bytes and the compiler's flags (paths of the temporary trees left out), and runs the real
# compiler for everything else.
def cached_cc(workroot):
    """A CC value that caches the compile of selfattn/_core.c under workroot/cc-cache."""
    wrapper = Path(workroot) / "cc_cache.py"
    wrapper.write_text(
        "import hashlib, os, shutil, subprocess, sys\n"
        "cache, root, n = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
        "real, args = sys.argv[4:4 + n], sys.argv[4 + n:]\n"
        "src = next((a for a in args if a.endswith('_core.c')), None)\n"
        "out = args[args.index('-o') + 1] if '-o' in args and '-c' in args else None\n"
        "if src is None or out is None:\n"
        "    sys.exit(subprocess.call(real + args))\n"
        "h = hashlib.sha256(open(src, 'rb').read())\n"
        "h.update(' '.join(real + [a for a in args if root not in a]).encode())\n"
        "hit = os.path.join(cache, h.hexdigest() + '.o')\n"
        "if not os.path.exists(hit):\n"
        "    rc = subprocess.call(real + args)\n"
        "    if rc:\n"
        "        sys.exit(rc)\n"
        "    os.makedirs(cache, exist_ok=True)\n"
        "    shutil.copyfile(out, hit + '.tmp')\n"
        "    os.replace(hit + '.tmp', hit)\n"
        "else:\n"
        "    shutil.copyfile(hit, out)\n")
    real = compiler()
    return " ".join(shlex.quote(a) for a in [sys.executable, str(wrapper), str(Path(workroot) / "cc-cache"),
                                             str(workroot), str(len(real))] + real)


def run_python_tests(tree, workdir, test_args, python, cc=None):
    """Build the extension from tree into a private target dir, run pytest; (killed?, failed ids).
    cc: the CC for the build (cached_cc: _core.c compiled once for all mutants)."""
    target = Path(workdir) / "site"
    build_env = dict(os.environ, **({"CC": cc} if cc else {}))
    r = subprocess.run([python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                        "--target", str(target), str(tree)], capture_output=True, text=True, env=build_env)
    if r.returncode != 0:
        raise SystemExit(f"building the extension failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    env = dict(os.environ, PYTHONPATH=str(target))
    tests = [str(Path(tree) / t) if not os.path.isabs(t) else t for t in test_args["files"]]
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=no", "-rf"] + test_args["extra"] + tests
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=env, timeout=3600)
    failed = re.findall(r"^FAILED (\S+)", r.stdout, re.M)
    m = re.search(r"^=+ (.*) in [\d.]+s", r.stdout, re.M)
    summary = m.group(1) if m else r.stdout.strip().splitlines()[-1:] or ["?"]
    return r.returncode != 0, failed, summary if isinstance(summary, str) else summary[0]


def short(test_id):
    """tests/test_x.py::test_y[param] -> test_x.py::test_y (parameters may hold '/' and '::')"""
    path, _, rest = test_id.partition("::")
    return f"{Path(path).name}::{rest.split('[')[0]}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", action="store_true", help="also run the Python test suite against each mutant")
    ap.add_argument("--tests", nargs="*", default=["tests"], help="test files/dirs for --python (default: tests)")
    ap.add_argument("-x", action="store_true", help="pytest -x: stop a mutant's run at its first failing test")
    ap.add_argument("--only", nargs="*", help="run only these mutants")
    ap.add_argument("--interpreter", default=sys.executable, help="Python with numpy, Cython, pytest, hypothesis")
    args = ap.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m[0] in args.only]
    flags = cpu_flags()
    for m in list(mutants):
        need = next((f for p, f in NEEDS_CPU.items() if m[0].startswith(p)), None)
        if need and need not in flags:
            log(f"SKIPPED  {m[0]}: this CPU lacks {need} (its path does not run here)")
            mutants.remove(m)
    test_args = {"files": args.tests, "extra": ["-x"] if args.x else []}
    survivors, rows = [], []
    with tempfile.TemporaryDirectory(prefix="selfattn-mutation-") as tmp:
        cc = cached_cc(tmp)
        core_c = Path(tmp) / "unmutated" / "repo" / "selfattn" / "_core.c"
        for mutant in [None] + mutants:
            name = "unmutated" if mutant is None else mutant[0]
            t0 = time.time()
            tree = Path(tmp) / name / "repo"
            copy_tree(tree)
            if mutant is not None:
                apply(tree, mutant)
                if core_c.exists():        # the unmutated build's _core.c: not generated again
                    shutil.copy2(core_c, tree / "selfattn" / "_core.c")
            work = Path(tmp) / name / "work"
            work.mkdir()
            py_failed, py_killed = [], False
            if args.python:         # first: the C tests then link the objects this build leaves
                targs = dict(test_args, files=tests_for(name, test_args["files"]))
                py_killed, py_failed, py_summary = run_python_tests(tree, work, targs, args.interpreter, cc)
            c = run_c_tests(tree, work, extension_objects(tree) if args.python else None)
            killed = py_killed or any(k for k, _ in c.values())
            line = f"{name:22s} C: " + "; ".join(f"{t}: {s}" for t, (_, s) in c.items())
            if args.python:
                line += f" | pytest: {py_summary}"
            line += f"  [{time.time() - t0:.0f}s]"
            if mutant is None:
                log(line)
                if killed:
                    log("the UNMUTATED sources fail the tests: fix that first, the mutation check proves nothing")
                    return 1
                continue
            log(("KILLED   " if killed else "SURVIVED ") + line)
            if py_failed:
                by_file = {}
                for f in py_failed:
                    by_file.setdefault(short(f), 0)
                    by_file[short(f)] += 1
                log("         caught by: " + ", ".join(f"{k} ({n})" for k, n in sorted(by_file.items())))
            rows.append((name, killed))
            if not killed:
                survivors.append(name)
    log(f"{len(rows) - len(survivors)} passed, {len(survivors)} failed"
        f"  (mutants killed / survived{': ' + ', '.join(survivors) if survivors else ''})")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
