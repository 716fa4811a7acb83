#!/usr/bin/env bash
# The Python test suite on aarch64, without ARM hardware: a Debian 12 (bookworm) arm64 root made
# with debootstrap, run through a static qemu-aarch64 (binfmt_misc, flag F: the emulator is opened
# here, so the chroot needs no copy of it). selfattn is built from this checkout's HEAD (git archive)
# outside the emulator, by Debian's cross gcc 12 (the root's native compiler is the same gcc 12)
# against the root's Python and NumPy headers and its sysconfig data, into a linux_aarch64 wheel
# that the root's pip installs; the test suite runs in the root against that extension: the neon
# path and generic, and neonbf16 (the best there: qemu's default CPU, max, has the BF16 extension)
# for bfloat16; and once more on an emulated Cortex-A72 (no BF16: neon the best).
# CI step 6 (.ci/aarch64_qemu.sh) runs the C kernel tests cross-compiled; this step runs the
# Cython layer, the Python API and the whole test suite on the aarch64 build.
#
#   .ci/aarch64_python.sh [REPO_ROOT]     (default: the directory above this script)
#
# What comes from where (Debian's arm64 packages are far faster than pip-building under
# emulation): python3 (3.11) and its headers, numpy 1.24, pytest 7.2, hypothesis from bookworm
# (debootstrap --include); no compiler in the root. The build runs in a venv of a host Python of
# the root's version (3.11: $PYTHON, python3.11 or pyenv's) with setuptools >= 77, Cython >= 3 and
# the root's numpy version from pip (the root's NumPy headers are the ones compiled against). numpy 1.24 is below the
# package's numpy>=1.25 pin (the install uses --no-deps): the suite passes with it. ml_dtypes comes
# as an aarch64 wheel; torch, dask, matplotlib, threadpoolctl are not installed: the tests that need
# them skip (listed by -rs).
#
# The tests, both passes with -rs and the hypothesis "ci" profile (conftest.py):
#   pass 1  the whole suite, default path neon; the tests parametrised over the ISAs (the `isa`
#           fixture, sa_testutil.ISAS) run neon and generic each
#   pass 1b the slow tests of robustness/ (large sizes, leaks): the kernels' slow tests, neon; the
#           other slow tests (the demo and training CLIs, Dask, the MiniLM example) are Python-level
#           and run natively (CI step 3) and under ASan (step 12), not under emulation (minutes each)
#   pass 2  SELFATTN_ISA=generic: the files whose tests run on the process default path (not
#           parametrised over the ISAs), so that generic runs them too (PASS2_FILES below)
#   pass 3  QEMU_CPU=cortex-a72 (no BF16): tests/dtypes and tests/dispatch, neon the best path,
#           neonbf16 not offered (its tests skip), bfloat16 widened
# Left out, each for a reason of emulation or time, never of a failure on aarch64:
#   tests/dispatch/test_c_kernels.py  builds tests/c/attn_smoke.c with gcc twice under emulation and
#                                runs it (136 s here): the program CI step 6 cross-compiles (OpenMP and
#                                serial) and runs under qemu; its qemu case skips in an aarch64 root
#   tests/robustness/test_robust_interrupt.py  Ctrl-C latency limits (1.5 s) are native-speed
#                                figures: under emulation a kernel task between two polls takes longer, measured
#                                2.1-4.7 s (the KeyboardInterrupt does come, and the child computes
#                                correctly afterwards); the backward case's child does not even
#                                reach its call within the test's 240 s window
#   test_robust_sizes.py::test_index64_c_program  gcc under emulation again; CI step 6 runs
#                                test_index64.c (both builds) under the same qemu >= 8
#   tests/integration/test_readme.py, test_demo_cli.py  the README's and the user guide's examples and
#                                the demo/CLI: Python-level programs over the same kernels (1024-long
#                                sequences, training loops: minutes each under emulation), run
#                                natively in CI steps 1-3, 5, 6 and under ASan (step 12)
#   test_train.py::test_cli_short_run_writes_the_plots, ::test_short_run_learns_the_task
#                                time: 155 s and 94 s under emulation (250 and 160 training steps);
#                                the training's forward/backward kernels are checked by
#                                test_backward.py and test_train's finite-difference gradient test
# Measured on the 2-core CI VM (nice 19, beside the kernel tier's other steps), full run of
# 88cd6bc: debootstrap 601 s, the cross build and its install 133 s, pass 1 1946 s (2986 passed;
# skipped: torch/dask/matplotlib/threadpoolctl/safetensors absent, the avx2/avx512 paths, and
# test_demo_cli's console-script test: Debian's pip puts scripts in /usr/local/bin, not next to
# /usr/bin/python3), pass 1b 422 s (2 tests), pass 2 ~150 s; the whole step 3409 s (beside the
# rest: the longest step of CI; d428e3a's pass 1 took 1222 s for 2731 tests).
#
# Installs debootstrap with apt-get; the emulator is a static qemu-aarch64 >= 8 (on Debian 12 the
# one of bookworm-backports, see .ci/qemu_aarch64_new.sh and below), registered in binfmt_misc
# (mounted when needed) for the run and unregistered on exit; fails loudly when any of it cannot
# be had. Caches nothing: the root lives in a temp dir, unmounted and removed on exit.
# Environment: AARCH64_PY_KEEP=1 keeps the root (printed) for debugging; AARCH64_PY_PYTEST_ARGS
# extra pytest arguments for both passes; AARCH64_PY_STOP_AFTER_BUILD=1 stops after the install.
set -euo pipefail
ROOT=$(cd "${1:-$(dirname "$0")/..}" && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
SUITE=bookworm
start=$(date +%s)
stamp() { echo "== aarch64-python [$(( $(date +%s) - start ))s] $*"; }
die() { echo "aarch64_python: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mount)"

# ---- tools -------------------------------------------------------------------------------------
if ! command -v debootstrap >/dev/null; then
    command -v apt-get >/dev/null || die "no debootstrap and no apt-get to install it"
    apt-get install -y -q debootstrap >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q debootstrap >/dev/null; } \
        || die "apt-get install debootstrap failed"
fi

# ---- temp dir; every mount under it is undone on exit before anything is removed ---------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/selfattn-aarch64py.XXXXXX")
CH=$WORK/root
BINFMT=/proc/sys/fs/binfmt_misc
ENTRY=selfattn-aarch64-$$    # one per run: concurrent runs never remove each other's entry
disabled=()
cleanup() {
    local m e
    # deepest first; the bind mount of /dev must be gone before rm (--one-file-system guards too)
    for m in $(awk -v w="$WORK/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r); do
        umount "$m" 2>/dev/null || umount -l "$m" || true
    done
    # binfmt_misc as it was: our entry removed, the ones we disabled enabled again
    [ -e "$BINFMT/$ENTRY" ] && echo -1 > "$BINFMT/$ENTRY"
    for e in "${disabled[@]}"; do [ -e "$BINFMT/$e" ] && echo 1 > "$BINFMT/$e"; done
    if awk -v w="$WORK/" 'index($2, w) == 1 {f=1} END {exit !f}' /proc/mounts; then
        echo "aarch64_python: mounts left under $WORK; not removing it" >&2
    elif [ "${AARCH64_PY_KEEP:-0}" = 1 ]; then
        echo "aarch64_python: keeping $WORK"
    else
        rm -rf --one-file-system "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM    # so that cleanup runs on Ctrl-C / kill too

# ---- binfmt_misc: aarch64 ELF -> a static qemu-aarch64 >= 8, flag F ----------------------------
# F: the kernel opens the emulator now, so the chroot needs no copy of it. qemu >= 8, not Debian
# 12's qemu-user-static 7.2: 7.2 keeps ~6 MiB of host memory per GiB that the guest maps, and
# tests/robustness/test_robust_sizes.py maps 4 TiB (plus test_index64.c's several TiB) sparse: OOM-killed
# there (see .ci/qemu_aarch64_new.sh; on Debian 12 the qemu-user of bookworm-backports, unpacked
# into the temp dir). Our own entry; any other enabled aarch64 entry is disabled meanwhile and
# enabled again on exit.
QEMU=$(bash "$ROOT/.ci/qemu_aarch64_new.sh" "$WORK/qemu") || die "no static qemu-aarch64 >= 8"
echo "emulator: $QEMU ($("$QEMU" --version | head -1))"
mountpoint -q "$BINFMT" || mount -t binfmt_misc binfmt_misc "$BINFMT" || die "cannot mount binfmt_misc"
for f in "$BINFMT"/selfattn-aarch64*; do     # entries of killed runs (their pid is gone)
    pid=${f##*-}
    [ -e "$f" ] && case "$pid" in *[!0-9]*|'') ;; *) kill -0 "$pid" 2>/dev/null || echo -1 > "$f" ;; esac
done
MAGIC='7f454c460201010000000000000000000200b700'
for f in "$BINFMT"/*; do
    case "$(basename "$f")" in register|status|selfattn-aarch64*) continue ;; esac
    if grep -qx enabled "$f" && grep -q "^magic $MAGIC" "$f"; then
        echo 0 > "$f" && disabled+=("$(basename "$f")")
    fi
done
[ ${#disabled[@]} -eq 0 ] || echo "binfmt_misc: disabled meanwhile: ${disabled[*]}"
printf '%s' ":$ENTRY:M::"'\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:'"$QEMU:F" \
    > "$BINFMT/register" || die "cannot register $QEMU in binfmt_misc"
grep -qx enabled "$BINFMT/$ENTRY" && grep -q '^flags:.*F' "$BINFMT/$ENTRY" || die "binfmt entry $ENTRY not usable"

# ---- the arm64 root ----------------------------------------------------------------------------
# the Debian mirror that apt uses here (debootstrap's own default when none is configured)
MIRROR=$(grep -hsoE '^(deb|URIs:)[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]+' \
             /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
         | grep -oE 'https?://[^[:space:]]+/debian/?$' | head -1 || true)
# no gcc: selfattn is cross-built outside the emulator (below); python3-dev for its headers, libgomp1
# for OpenMP at run time
PKGS=python3,python3-dev,python3-numpy,python3-pytest,python3-hypothesis,python3-pip,libgomp1
stamp "debootstrap $SUITE arm64 into $CH (${MIRROR:-default mirror})"
# shellcheck disable=SC2086
debootstrap --arch=arm64 --variant=minbase --include="$PKGS" "$SUITE" "$CH" $MIRROR > "$WORK/debootstrap.log" 2>&1 \
    || { tail -30 "$WORK/debootstrap.log"; [ -f "$CH/debootstrap/debootstrap.log" ] && tail -30 "$CH/debootstrap/debootstrap.log"; die "debootstrap failed"; }
[ "$(chroot "$CH" uname -m)" = aarch64 ] || die "the root does not run as aarch64"

mount -t proc proc "$CH/proc"
mount -t sysfs sysfs "$CH/sys"
mount --bind /dev "$CH/dev"
mount -t tmpfs -o mode=1777 tmpfs "$CH/dev/shm"    # multiprocessing's semaphores
# a clean environment: nothing of the host's pip configuration or PYTHON* settings leaks in
inroot() {
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INDEX=1 \
        PYTEST_ADDOPTS="-rs -p no:cacheprovider ${AARCH64_PY_PYTEST_ARGS:-}" \
        chroot "$CH" "$@"
}

# ---- ml_dtypes (bfloat16 arrays, for the 16-bit storage tests; float16 needs nothing), an aarch64
# wheel fetched here: optional, the bfloat16 cases skip without it
pyver=$(inroot python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
mkdir "$CH/wheels"
if "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$CH/wheels" \
    --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 --python-version "$pyver" \
    --implementation cp --abi "cp$pyver" "ml_dtypes>=0.4,<0.6"; then
    ls "$CH/wheels"
    inroot sh -c 'python3 -m pip install -q --break-system-packages --no-deps /wheels/*.whl' \
        || die "installing ml_dtypes in the root failed"
else
    echo "no aarch64 ml_dtypes wheel: the bfloat16 tests skip in the arm64 root"
fi

# ---- build selfattn for the root here, with the cross gcc; install the wheel in the root ---------
# Not under emulation: gcc and Cython under qemu took 189 s on a quiet machine and ~600 s beside the
# other CI steps (the arm64 root is the longest step). Debian's aarch64-linux-gnu-gcc is the same
# gcc 12 as the root's native one; the build reads the root's own sysconfig data (its compiler
# name, flags and extension suffix: _PYTHON_SYSCONFIGDATA_NAME, as crossenv does), the root's
# Python and NumPy headers, and makes a linux_aarch64 wheel that pip installs in the root.
stamp "build selfattn for aarch64 from HEAD ($(git rev-parse --short HEAD)), cross gcc, root's headers"
XCC=aarch64-linux-gnu-gcc
command -v "$XCC" >/dev/null || { apt-get install -y -q gcc-aarch64-linux-gnu >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q gcc-aarch64-linux-gnu >/dev/null; }; } \
    || die "no $XCC and apt-get install gcc-aarch64-linux-gnu failed"
pyxy=$(inroot python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
# a host Python of the root's version (the sysconfig data and the C API are per minor version)
XPY=""
for p in "$PY" "python$pyxy" "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/"$pyxy".*/bin/python; do
    if command -v "$p" >/dev/null 2>&1 && [ "$("$p" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null)" = "$pyxy" ]; then
        XPY=$(command -v "$p"); break
    fi
done
[ -n "$XPY" ] || die "no host Python $pyxy (the root's version) for the cross build: PATH, pyenv"
# the root's NumPy version on the host too: Cython's `cimport numpy` reads the host NumPy's .pxd,
# which must match the headers compiled against (NumPy 2's declares macros 1.24's headers lack)
npver=$(inroot python3 -c 'import numpy; print(numpy.__version__)')
"$XPY" -m venv "$WORK/xbuild" && "$WORK/xbuild/bin/pip" install -q --disable-pip-version-check \
    "setuptools>=77" "packaging>=24.2" "Cython>=3.0" "numpy==$npver" > "$WORK/xbuild.log" 2>&1 \
    || { cat "$WORK/xbuild.log"; die "the cross build's venv (setuptools, Cython, numpy) failed"; }
sysdata=$(cd "$CH/usr/lib/python$pyxy" && ls _sysconfigdata__linux_aarch64-linux-gnu.py 2>/dev/null) \
    || die "no _sysconfigdata__linux_aarch64-linux-gnu.py in the root's /usr/lib/python$pyxy"
mkdir -p "$WORK/xsys" "$WORK/xinc/aarch64-linux-gnu" "$WORK/xsrc" "$WORK/xwhl"
cp "$CH/usr/lib/python$pyxy/$sysdata" "$WORK/xsys/"
# Debian's pyconfig.h includes <aarch64-linux-gnu/python3.X/pyconfig.h>: that directory alone
ln -s "$CH/usr/include/aarch64-linux-gnu/python$pyxy" "$WORK/xinc/aarch64-linux-gnu/python$pyxy"
NPINC=$(inroot python3 -c 'import numpy; print(numpy.get_include())')
[ -f "$CH$NPINC/numpy/arrayobject.h" ] && [ -f "$CH/usr/include/python$pyxy/Python.h" ] \
    || die "the root lacks the Python or NumPy headers ($CH/usr/include/python$pyxy, $CH$NPINC)"
git archive HEAD | tar -x -C "$WORK/xsrc"
# these -I come before setup.py's own (the host's NumPy, the sysconfig's /usr/include/python3.X)
( cd "$WORK/xsrc" && env _PYTHON_HOST_PLATFORM=linux-aarch64 \
      _PYTHON_SYSCONFIGDATA_NAME="${sysdata%.py}" PYTHONPATH="$WORK/xsys" \
      CFLAGS="-I$CH/usr/include/python$pyxy -I$WORK/xinc -I$CH$NPINC" \
      "$WORK/xbuild/bin/python" -c "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))" \
      "$WORK/xwhl" ) > "$WORK/build.log" 2>&1 || { tail -60 "$WORK/build.log"; die "building selfattn for aarch64 failed"; }
grep -E "^ *aarch64-linux-gnu-gcc .*_core\.c" "$WORK/build.log" | head -1 || true
# no compiler warning from any source (-Wall, plus what the root's sysconfig data adds)
if grep -E "\.(c|h|pyx|pxd):[0-9]+(:[0-9]+)?: warning" "$WORK/build.log"; then
    die "compiler warnings in the aarch64 build (above)"
fi
whl=$(ls "$WORK"/xwhl/selfattn-*-cp"${pyxy/./}"-cp"${pyxy/./}"-linux_aarch64.whl) || die "no linux_aarch64 wheel built"
mkdir "$CH/selfattn-wheel" && cp "$whl" "$CH/selfattn-wheel/"
# the tests (and the rest of the tree they read: README, docs, src_c) at /src: run from /tmp, against
# the installed wheel
mkdir "$CH/src" && git archive HEAD | tar -x -C "$CH/src"
stamp "install $(basename "$whl") in the root"
inroot sh -c 'python3 -m pip install -q --break-system-packages --no-deps /selfattn-wheel/*.whl' \
    || die "installing the selfattn wheel in the root failed"
[ "${AARCH64_PY_STOP_AFTER_BUILD:-0}" = 1 ] && { inroot sh -c 'cd /tmp && python3 -c "import selfattn; selfattn.show_config()"'; stamp "stopping after the build (AARCH64_PY_STOP_AFTER_BUILD=1)"; exit 0; }
cfg=$(inroot sh -c 'cd /tmp && python3 -c "import selfattn; selfattn.show_config()"')
echo "$cfg"
case "$cfg" in
    *"isa=neonbf16 (available: neonbf16, neon, generic), openmp=yes"*) ;;
    *) die "expected neonbf16 as the best path (qemu's max CPU has BF16), neon and generic available, OpenMP on: $cfg" ;;
esac

# ---- the tests ---------------------------------------------------------------------------------
# deselected (why: in the header)
DESELECT=(--ignore=/src/tests/dispatch/test_c_kernels.py --ignore=/src/tests/robustness/test_robust_interrupt.py
          --ignore=/src/tests/integration/test_readme.py --ignore=/src/tests/integration/test_demo_cli.py
          --deselect=tests/robustness/test_robust_sizes.py::test_index64_c_program
          --deselect=tests/backward/test_train.py::test_cli_short_run_writes_the_plots
          --deselect=tests/backward/test_train.py::test_short_run_learns_the_task)
# pass 2: the files with tests that run the process default path; -k drops their tests that are
# parametrised over the ISAs (ids [neon]/[generic]: run in pass 1) and usability's
# test_lower_isa_is_used_silently[ Generic ] (the ISA machinery, pass 1)
PASS2_FILES=(backward/test_attend_vjp.py backward/test_backward.py backward/test_backward_schedule.py
             forward/test_cnn_as_attention.py forward/test_positional.py
             decode/test_decode.py decode/test_kvcache.py decode/test_merge.py
             robustness/test_dtypes_errors.py robustness/test_robust_fuzz.py robustness/test_robust_inputs.py
             robustness/test_robust_misuse.py structured/test_structured.py dispatch/test_threads.py
             integration/test_inspection.py integration/test_usability.py)
stamp "pass 1: the suite, default path neonbf16 (float32: neon's; parametrised tests: neon and generic)"
inroot sh -c 'cd /tmp && exec python3 -m pytest /src/tests -q "$@"' sh "${DESELECT[@]}" \
    || die "pass 1 (default path neon) failed"
stamp "pass 1b: the kernels' slow tests (robustness/: sizes, leaks), default path neon"
inroot sh -c 'cd /tmp && exec python3 -m pytest /src/tests/robustness -q -m slow "$@"' sh "${DESELECT[@]}" \
    || die "pass 1b (slow kernel tests, neon) failed"
stamp "pass 2: SELFATTN_ISA=generic, the tests that run the default path"
inroot env SELFATTN_ISA=generic sh -c 'cd /tmp && python3 -c "import selfattn; selfattn.show_config()" \
    && exec python3 -m pytest -q -k "not neon and not generic" "$@"' sh "${PASS2_FILES[@]/#//src/tests/}" \
    || die "pass 2 (default path generic) failed"
stamp "pass 3: QEMU_CPU=cortex-a72 (no BF16): tests/dtypes and tests/dispatch"
cfg=$(inroot env QEMU_CPU=cortex-a72 sh -c 'cd /tmp && python3 -c "import selfattn; selfattn.show_config()"')
echo "$cfg"
case "$cfg" in
    *"isa=neon (available: neon, generic), openmp=yes"*) ;;
    *) die "expected neon as the best path on a Cortex-A72 (no BF16), generic available: $cfg" ;;
esac
inroot env QEMU_CPU=cortex-a72 sh -c 'cd /tmp && exec python3 -m pytest /src/tests/dtypes /src/tests/dispatch -q "$@"' \
    sh "${DESELECT[@]}" || die "pass 3 (Cortex-A72, no BF16) failed"
stamp "done: selfattn built and tested in an arm64 root, neonbf16, neon and generic paths"
