#!/usr/bin/env bash
# Memcheck over .ci/valgrind_script.py with the INSTALLED selfattn package.
#
#   .ci/valgrind.sh                 uses $PYTHON (default: python3), which must have selfattn installed
#   PYTHON=/path/to/venv/bin/python .ci/valgrind.sh
#
# Fails (exit 1) when valgrind reports a definitely-lost block, an invalid read/write, a
# conditional jump on uninitialised memory, ... whose stack has a selfattn frame (the _core
# extension: Cython functions, sa_* / attn_* kernels). Python itself leaks at exit: stacks
# without a selfattn frame are ignored. PYTHONMALLOC=malloc so that every Python allocation
# goes through malloc and valgrind sees it. Skips (exit 0, with a message) without valgrind.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}

if ! command -v valgrind >/dev/null 2>&1; then
    echo "valgrind.sh: SKIP: valgrind is not installed"
    exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# run from a directory without the source tree, so the installed package is imported
cd "$WORK"
if ! "$PY" -c "import selfattn, sys; print('selfattn from', selfattn.__file__)"; then
    echo "valgrind.sh: FAIL: selfattn is not importable with $PY"
    exit 1
fi
cp "$HERE/valgrind_script.py" "$WORK/"

LOG="$WORK/valgrind.log"
start=$(date +%s)
PYTHONMALLOC=malloc OMP_NUM_THREADS=2 valgrind --tool=memcheck --leak-check=full \
    --errors-for-leak-kinds=definite --show-leak-kinds=definite --num-callers=40 \
    --log-file="$LOG" "$PY" "$WORK/valgrind_script.py"
rc=$?
echo "valgrind.sh: valgrind exited $rc after $(( $(date +%s) - start ))s"

"$PY" - "$LOG" <<'EOF'
import re, sys

log = open(sys.argv[1], errors="replace").read()
lines = [re.sub(r"^==\d+== ?", "", l) for l in log.splitlines()]
# a record is a message followed by its stack ("at 0x..." / "by 0x..."), ended by a blank line
records, cur = [], []
for l in lines:
    if l.strip() == "":
        if cur:
            records.append(cur)
        cur = []
    else:
        cur.append(l)
if cur:
    records.append(cur)
# a selfattn frame: the extension's file, its Cython functions, the C kernels
ours = re.compile(r"selfattn/_core|_core\.cpython|__pyx_\w*selfattn|\bsa_[a-z_]+\b|\battn_(fwd|decode|bwd)_\w+")
kinds = re.compile(r"definitely lost|Invalid (read|write|free)|uninitialised|Mismatched free|"
                   r"overlap|Source and destination|Syscall param|Argument .* of function malloc")
bad = []
for r in records:
    head = r[0]
    if not kinds.search(head):
        continue
    stack = [l for l in r if re.search(r"^\s*(at|by) 0x", l)]
    if any(ours.search(l) for l in stack):
        bad.append("\n".join(r))
summary = [l for l in lines if re.search(r"definitely lost:|ERROR SUMMARY", l)]
print("\n".join(summary))
if bad:
    print(f"\nvalgrind.sh: FAIL: {len(bad)} report(s) with a selfattn frame:\n")
    print("\n\n".join(bad[:20]))
    sys.exit(1)
print("valgrind.sh: no definite leak or memory error in selfattn frames")
EOF
parse_rc=$?
if [ $rc -ne 0 ]; then
    echo "valgrind.sh: FAIL: the script under valgrind exited $rc"; tail -40 "$LOG"; exit 1
fi
exit $parse_rc
