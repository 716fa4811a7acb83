#!/usr/bin/env bash
# Build selfattn with AddressSanitizer + UndefinedBehaviorSanitizer (SELFATTN_SANITIZE=1) in a
# fresh virtualenv and run the whole test suite under it. Exits non-zero on any sanitizer report
# (in pytest itself or in any subprocess the tests start) and on any test failure.
#
#   .ci/sanitize.sh [REPO_ROOT]          (default: the directory above this script)
#
# Environment:
#   PYTHON                         interpreter for the venv (default python3)
#   SELFATTN_HYPOTHESIS_PROFILE    hypothesis profile (default here: dev, 15 examples a test)
#   SANITIZE_PYTEST_ARGS           extra pytest arguments (e.g. "-x" or "-k robust")
#   SANITIZE_KEEP=1                keep the temp dir (venv, logs) for debugging
# Every dispatch path runs: the suite forces each ISA via selfattn.use_isa, and
# tests/robustness/test_robust_sizes.py also builds tests/c/test_index64.c with the sanitizers.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "${1:-$HERE/..}" && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/selfattn-sanitize.XXXXXX")
if [ "${SANITIZE_KEEP:-0}" = 1 ]; then echo "sanitize.sh: keeping $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start ))s] $*"; }

command -v gcc >/dev/null || { echo "sanitize.sh: gcc is required"; exit 2; }
LIBASAN=$(gcc -print-file-name=libasan.so)
LIBUBSAN=$(gcc -print-file-name=libubsan.so)
[ -f "$LIBASAN" ] || { echo "sanitize.sh: libasan not found (gcc -print-file-name=libasan.so -> $LIBASAN)"; exit 2; }

stamp "venv in $WORK/venv"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q numpy pytest hypothesis pytest-benchmark Cython "setuptools>=77" wheel
"$VPY" -m pip install -q threadpoolctl || echo "sanitize.sh: optional threadpoolctl not installed"
# bfloat16 arrays (the 16-bit storage path's tests; float16 ones run without it)
"$VPY" -m pip install -q "ml_dtypes>=0.4" || echo "sanitize.sh: optional ml_dtypes not installed"

stamp "build + install with SELFATTN_SANITIZE=1 from $ROOT"
# a private copy: the build never touches the caller's tree (build/, in-place .so files)
mkdir "$WORK/src"
(cd "$ROOT" && tar --exclude=./build --exclude='./*.egg-info' --exclude=./.git -cf - .) | (cd "$WORK/src" && tar -xf -)
rm -f "$WORK"/src/selfattn/*.so "$WORK/src/selfattn/_core.c"
(cd "$WORK/src" && SELFATTN_SANITIZE=1 CC=gcc "$VPY" -m pip install -q --no-build-isolation --no-deps .) \
    > "$WORK/build.log" 2>&1 || { tail -60 "$WORK/build.log"; exit 1; }
# locate the extension without importing it (it needs the preloaded ASan runtime)
SO=$(cd "$WORK" && "$VPY" -c "import glob, importlib.util as u, os; d = os.path.dirname(u.find_spec('selfattn').origin); print(glob.glob(os.path.join(d, '_core*.so'))[0])")
# ldd's output is read whole first: `ldd | grep -q` under pipefail fails at random when grep exits
# on its first match and ldd, still writing, dies of SIGPIPE (this is how CI once failed here)
DEPS=$(ldd "$SO")
if ! grep -q libasan <<<"$DEPS"; then
    echo "sanitize.sh: $SO is not linked against libasan: the sanitizer build did not happen"; exit 1
fi
echo "sanitized extension: $SO"

PRELOAD="$LIBASAN"
if grep -q libubsan <<<"$DEPS" && [ -f "$LIBUBSAN" ]; then PRELOAD="$LIBASAN:$LIBUBSAN"; fi
LOGS="$WORK/sanitizer-logs"
mkdir "$LOGS"

stamp "pytest tests under ASan+UBSan (LD_PRELOAD=$PRELOAD)"
set +e
(
    cd "$WORK"     # not the source tree: the installed, sanitized package is imported
    export LD_PRELOAD="$PRELOAD"
    # interpreter leaks are not ours (detect_leaks=0); an impossible allocation must return NULL
    # (the code turns it into MemoryError) instead of aborting; log_path also catches ASan
    # reports from processes the tests start (GCC's UBSan ignores log_path and writes to stderr)
    export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:allocator_may_return_null=1:log_path=$LOGS/asan"
    export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
    export SELFATTN_HYPOTHESIS_PROFILE="${SELFATTN_HYPOTHESIS_PROFILE:-dev}"
    export SELFATTN_CTEST_SANITIZE=1
    export PYTHONFAULTHANDLER=1
    # --capture=sys: pytest captures sys.stdout/err only, so a sanitizer report written to fd 2 by
    # a dying process reaches the log instead of vanishing with pytest's capture file
    "$VPY" -m pytest "$ROOT/tests" -q -p no:cacheprovider -rs --capture=sys ${SANITIZE_PYTEST_ARGS:-} 2>&1 \
        | tee "$WORK/pytest.log"
    exit "${PIPESTATUS[0]}"
)
rc=$?
set -e

pattern='runtime error:|ERROR: AddressSanitizer|ERROR: LeakSanitizer|SUMMARY: (Address|UndefinedBehavior)Sanitizer|AddressSanitizer:DEADLYSIGNAL'
# log files with a report (allocator_may_return_null=1 also logs harmless "failed to allocate" warnings)
reports=$(grep -lE "$pattern" "$LOGS"/* 2>/dev/null | sort || true)
if [ -n "$reports" ] || grep -Eq "$pattern" "$WORK/pytest.log"; then
    echo "sanitize.sh: FAIL: sanitizer reports:"
    grep -E -A30 "$pattern" "$WORK/pytest.log" | head -120 || true
    for f in $reports; do echo "---- $f"; head -80 "$f"; done
    exit 1
fi
if [ $rc -ne 0 ]; then
    echo "sanitize.sh: FAIL: pytest exited $rc under the sanitizers"
    exit $rc
fi
stamp "OK: no sanitizer report, all tests passed"
