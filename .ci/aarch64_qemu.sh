#!/usr/bin/env bash
# The aarch64 build, without ARM hardware: cross-compile the C kernel test
# (tests/c/attn_smoke.c, every supported ISA vs a naive reference) for aarch64,
# with and without OpenMP, statically, and run it under qemu-aarch64. There the
# x86 files compile to nothing and the ISAs tested are neon and generic, and
# bfloat16 storage on neonbf16 (BFDOT) too: the OpenMP build on qemu's max CPU
# (which has the BF16 extension: neonbf16 the best path), the serial one on a
# Cortex-A72 (no BF16: neon the best, neonbf16 not offered).
# Also tests/c/test_index64.c (offsets and strides beyond 2^31 elements, in sparse MAP_NORESERVE
# regions of several TiB), both builds, under a qemu-aarch64 >= 8 (.ci/qemu_aarch64_new.sh: on
# Debian 12 the one of bookworm-backports, unpacked into the temp dir): Debian 12's qemu 7.2 keeps
# ~6 MiB of host memory per GiB that the guest maps, so there it is OOM-killed (rc 137).
# Installs gcc-aarch64-linux-gnu and qemu-user with apt-get when missing; fails
# loudly when they cannot be had.
set -euo pipefail
ROOT=${1:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$ROOT"
CC=${AARCH64_CC:-aarch64-linux-gnu-gcc}
if ! command -v "$CC" >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    command -v apt-get >/dev/null || { echo "aarch64: $CC / qemu-aarch64 missing and no apt-get to install them"; exit 1; }
    $SUDO apt-get install -y -q gcc-aarch64-linux-gnu qemu-user >/dev/null \
        || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q gcc-aarch64-linux-gnu qemu-user >/dev/null; }
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
QEMU_NEW=$(bash "$ROOT/.ci/qemu_aarch64_new.sh" "$OUT/qemu-new") || { echo "aarch64: no qemu-aarch64 >= 8 for test_index64"; exit 1; }
"$QEMU_NEW" --version | head -1
SRCS="src_c/dispatch.c src_c/merge.c src_c/attn_generic.c src_c/attn_avx2.c src_c/attn_avx512.c src_c/attn_neon.c"
for variant in openmp serial; do
    flags="-O2 -Wall -Wno-unused-function -Werror=implicit-function-declaration"
    [ "$variant" = openmp ] && flags="$flags -fopenmp"
    # shellcheck disable=SC2086
    "$CC" $flags -Isrc_c tests/c/attn_smoke.c $SRCS -lm -static -o "$OUT/smoke-$variant" 2> "$OUT/cc.log" \
        || { cat "$OUT/cc.log"; exit 1; }
    # libgomp's static dlopen notice is the only thing the linker may say
    grep -v "dlopen\|oacc-profiling\|goacc_profiling" "$OUT/cc.log" | grep -i "warning\|error" && { echo "aarch64 build warnings"; exit 1; }
    if [ "$variant" = openmp ]; then cpu=max best=neonbf16; else cpu=cortex-a72 best=neon; fi
    qemu-aarch64 -cpu "$cpu" "$OUT/smoke-$variant" > "$OUT/run.log" || { tail -30 "$OUT/run.log"; exit 1; }
    tail -3 "$OUT/run.log"
    grep -q "isas tested: 2," "$OUT/run.log" || { echo "aarch64 ($variant): expected neon and generic tested"; exit 1; }
    grep -q "best isa: $best," "$OUT/run.log" || { echo "aarch64 ($variant, -cpu $cpu): $best is not the best isa"; exit 1; }
    grep -q " 0 failed" "$OUT/run.log" || { echo "aarch64 ($variant): failures"; exit 1; }
    # 64-bit index arithmetic: every case run (none skipped for want of address space), all pass
    # shellcheck disable=SC2086
    "$CC" $flags -Isrc_c tests/c/test_index64.c $SRCS -lm -static -o "$OUT/index64-$variant" 2> "$OUT/cc.log" \
        || { cat "$OUT/cc.log"; exit 1; }
    grep -v "dlopen\|oacc-profiling\|goacc_profiling" "$OUT/cc.log" | grep -i "warning\|error" && { echo "aarch64 build warnings"; exit 1; }
    "$QEMU_NEW" "$OUT/index64-$variant" > "$OUT/run.log" || { tail -30 "$OUT/run.log"; exit 1; }
    tail -2 "$OUT/run.log"
    grep -q "isas tested: 2, openmp: [01], skipped cases: 0$" "$OUT/run.log" \
        || { echo "aarch64 index64 ($variant): expected neon and generic tested, no case skipped"; exit 1; }
    grep -qE "^[1-9][0-9]* passed, 0 failed$" "$OUT/run.log" || { echo "aarch64 index64 ($variant): failures"; exit 1; }
done
echo "aarch64: neon, neonbf16 and generic kernels pass under qemu (OpenMP and serial builds), test_index64 included"
