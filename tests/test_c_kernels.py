"""The C kernels on their own: tests/c/attn_smoke.c against a naive C reference.

Built twice from src_c/: with OpenMP, and without it (the single-threaded build a compiler
without OpenMP gets). Every ISA the CPU runs, both dtypes, 1 and 2 threads, masks, causal.
The same program is how the portable path was checked on aarch64 (under qemu-user).
"""

import re
import subprocess

import pytest

from sa_testutil import ISAS, build_c_program, env_without_sanitizer


@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "no-openmp"])
def test_c_kernels_against_naive_reference(tmp_path, openmp):
    flags = ["-O2"] + ([] if openmp else ["-Wno-unknown-pragmas"])
    exe, why = build_c_program("attn_smoke.c", tmp_path / "attn_smoke", openmp=openmp, extra_flags=flags)
    if exe is None:
        pytest.skip(why)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, env=env_without_sanitizer())
    m = re.search(r"^(\d+) passed, (\d+) failed$", r.stdout, re.M)
    assert r.returncode == 0 and m, r.stdout[-4000:] + r.stderr[-2000:]
    assert int(m.group(2)) == 0, r.stdout[-4000:]
    info = re.search(r"openmp: (\d), isas tested: (\d+), cases per isa: (\d+)", r.stdout)
    assert info, r.stdout[-2000:]
    assert int(info.group(1)) == (1 if openmp else 0)
    # every path this CPU runs was run (the C program sees the same CPU), and every case passed
    assert int(info.group(2)) == len(ISAS), r.stdout[-2000:]
    assert int(m.group(1)) == int(info.group(3)) * len(ISAS) > 0, r.stdout[-2000:]
