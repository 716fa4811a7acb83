#!/usr/bin/env bash
# The aarch64 build, without ARM hardware: cross-compile the C kernel test
# (tests/c/attn_smoke.c, every supported ISA vs a naive reference) for aarch64,
# with and without OpenMP, statically, and run it under qemu-aarch64. There the
# x86 files compile to nothing and the ISAs tested are neon and generic.
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
SRCS="src_c/dispatch.c src_c/merge.c src_c/attn_generic.c src_c/attn_avx2.c src_c/attn_avx512.c src_c/attn_neon.c"
for variant in openmp serial; do
    flags="-O2 -Wall -Wno-unused-function -Werror=implicit-function-declaration"
    [ "$variant" = openmp ] && flags="$flags -fopenmp"
    # shellcheck disable=SC2086
    "$CC" $flags -Isrc_c tests/c/attn_smoke.c $SRCS -lm -static -o "$OUT/smoke-$variant" 2> "$OUT/cc.log" \
        || { cat "$OUT/cc.log"; exit 1; }
    # libgomp's static dlopen notice is the only thing the linker may say
    grep -v "dlopen\|oacc-profiling\|goacc_profiling" "$OUT/cc.log" | grep -i "warning\|error" && { echo "aarch64 build warnings"; exit 1; }
    qemu-aarch64 "$OUT/smoke-$variant" > "$OUT/run.log" || { tail -30 "$OUT/run.log"; exit 1; }
    tail -2 "$OUT/run.log"
    grep -q "isas tested: 2," "$OUT/run.log" || { echo "aarch64 ($variant): expected neon and generic tested"; exit 1; }
    grep -q "best isa: neon" "$OUT/run.log" || { echo "aarch64 ($variant): neon is not the best isa"; exit 1; }
    grep -q " 0 failed" "$OUT/run.log" || { echo "aarch64 ($variant): failures"; exit 1; }
done
echo "aarch64: neon and generic kernels pass under qemu (OpenMP and serial builds)"
