#!/usr/bin/env bash
# Builds with clang, with and without OpenMP, as on a Mac (setup.py's OpenMP probing):
#   A. clang without libomp: -fopenmp does not compile, so the build is single-threaded and
#      says so: config() reports openmp False, default_threads 1;
#   B. clang with libomp (Debian's libomp-19-dev): -fopenmp works, openmp True;
#   C. Apple's clang, emulated: a wrapper that rejects a plain -fopenmp as Apple's clang does
#      ("unsupported option '-fopenmp'") and forwards everything else to clang, with libomp in
#      a Homebrew-like prefix (SELFATTN_LIBOMP_PREFIX: include/omp.h, lib/libomp.so): the build
#      must take "-Xpreprocessor -fopenmp ... -lomp" and run threaded.
# Each build runs the thread tests (bitwise identity across thread counts; they expect one
# thread without OpenMP) and the core forward tests.
# Usage: .ci/clang_openmp.sh ROOT PYTHON   (PYTHON: a venv with numpy, pytest, hypothesis,
# Cython, setuptools, wheel). Installs clang-19 and libomp-19-dev with apt-get.
set -euo pipefail
ROOT=$1
PY=$2
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
apt_install() {
    $SUDO apt-get install -y -q --no-install-recommends "$@" >/dev/null \
        || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends "$@" >/dev/null; }
}
command -v clang-19 >/dev/null || apt_install clang-19
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
git -C "$ROOT" archive HEAD | tar -x -C "$W" --one-top-level=src

build_and_test() {   # $1: label, $2: expected openmp (True/False); CC etc. from the environment
    ( cd "$W/src" && rm -rf build && "$PY" -m pip install -v --no-build-isolation --no-deps . > "$W/build.log" 2>&1 ) \
        || { tail -40 "$W/build.log"; exit 1; }
    grep "selfattn: " "$W/build.log" | grep -i "openmp" | sed 's/^ *//' | sort -u
    ( cd "$W" && "$PY" -c "
import selfattn; c = selfattn.config(); print('$1:', c)
assert c['openmp'] is $2, c
assert (c['default_threads'] == 1) == (not c['openmp']), c" )
    ( cd "$W" && "$PY" -P -m pytest "$ROOT/tests/dispatch/test_threads.py" "$ROOT/tests/forward/test_vs_reference.py" \
        -q -p no:cacheprovider ) | tail -1
}

echo "A. clang-19 without libomp: single-threaded"
if dpkg -s libomp-19-dev >/dev/null 2>&1; then
    echo "   (libomp-19-dev already installed on this machine: case A cannot be shown here, skipped)"
else
    CC=clang-19 build_and_test "A" False
    grep -q "compiler has no OpenMP" "$W/build.log" || { echo "A: the build did not say it is single-threaded"; exit 1; }
fi

echo "B. clang-19 with libomp: -fopenmp"
apt_install libomp-19-dev
CC=clang-19 build_and_test "B" True
grep -q "OpenMP with -fopenmp" "$W/build.log" || { echo "B: not built with -fopenmp"; exit 1; }

echo "C. Apple-style clang (rejects -fopenmp) with libomp in a prefix: -Xpreprocessor -fopenmp -lomp"
mkdir -p "$W/libomp/include" "$W/libomp/lib" "$W/bin"
ln -s "$(dpkg -L libomp-19-dev | grep '/omp\.h$' | head -1)" "$W/libomp/include/omp.h"
ln -s "$(dpkg -L libomp-19-dev | grep '/libomp\.so$' | head -1)" "$W/libomp/lib/libomp.so"
cat > "$W/bin/apple-clang" <<'EOF'
#!/usr/bin/env bash
# Apple's clang: -fopenmp is rejected by the driver; "-Xpreprocessor -fopenmp" passes it to the
# front end only (no runtime is linked: -lomp does that)
prev=""
for a in "$@"; do
    if [ "$a" = "-fopenmp" ] && [ "$prev" != "-Xpreprocessor" ]; then
        echo "clang: error: unsupported option '-fopenmp'" >&2; exit 1
    fi
    prev=$a
done
exec clang-19 "$@"
EOF
chmod +x "$W/bin/apple-clang"
CC="$W/bin/apple-clang" LDSHARED="$W/bin/apple-clang -shared" SELFATTN_LIBOMP_PREFIX="$W/libomp" build_and_test "C" True
grep -q "OpenMP with -Xpreprocessor -fopenmp" "$W/build.log" || { echo "C: not built the Apple way"; exit 1; }
echo "clang builds: single-threaded without libomp, OpenMP with it (plain and Apple-style)"
