"""The C kernels on their own: tests/c/attn_smoke.c against a naive C reference.

Built twice from src_c/: with OpenMP, and without it (the single-threaded build a compiler
without OpenMP gets). Every ISA the CPU runs, both dtypes, 1 and 2 threads, masks, causal.
The same program is how the portable path was checked on aarch64 (under qemu-user).
"""

import re
import subprocess

import pytest

from sa_testutil import ISAS, build_c_program, env_without_sanitizer


@pytest.mark.slow
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
    n16 = re.search(r"^bfloat16 storage cases: (\d+)$", r.stdout, re.M)     # every path, the bfloat16-dot ones too
    assert n16 and int(n16.group(1)) > 0, r.stdout[-2000:]
    assert int(m.group(1)) == int(info.group(3)) * len(ISAS) + int(n16.group(1)), r.stdout[-2000:]


@pytest.mark.slow      # ~40 s each under emulation: CI's step 3 runs it once, not in every suite run
@pytest.mark.parametrize("cpu,best", [("max", "neonbf16"), ("cortex-a72", "neon")])
def test_c_kernels_aarch64_under_qemu(tmp_path, cpu, best):
    """The neon and generic paths, cross-compiled for aarch64 and run under qemu-aarch64 (when
    both tools are installed: the kernel tier's step 10, .ci/aarch64_qemu.sh, installs them and
    also runs the OpenMP build; this is the serial one), on an emulated CPU with the BF16 extension (qemu's
    max: neonbf16 the best path) and one without (Cortex-A72: neon)."""
    import shutil

    from sa_testutil import C_SOURCES, SRC_C
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if cc is None or qemu is None:
        pytest.skip("no aarch64 cross compiler / qemu-aarch64 (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    src = SRC_C.parent / "tests" / "c" / "attn_smoke.c"
    if not src.is_file() or not all((SRC_C / f).is_file() for f in C_SOURCES):
        pytest.skip(f"the C sources are not at {SRC_C}")
    exe = tmp_path / "attn_smoke_aarch64"
    cmd = [cc, "-O2", "-Wall", "-Wno-unknown-pragmas", f"-I{SRC_C}", str(src)] + [str(SRC_C / f) for f in C_SOURCES] \
        + ["-lm", "-static", "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env_without_sanitizer())
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr[-3000:]
    r = subprocess.run([qemu, "-cpu", cpu, str(exe)], capture_output=True, text=True, timeout=600,
                       env=env_without_sanitizer())
    m = re.search(r"^(\d+) passed, (\d+) failed$", r.stdout, re.M)
    assert r.returncode == 0 and m and int(m.group(2)) == 0, r.stdout[-4000:] + r.stderr[-2000:]
    info = re.search(r"best isa: (\w+), openmp: 0, isas tested: (\d+), cases per isa: (\d+)", r.stdout)
    assert info and info.group(1) == best and info.group(2) == "2", r.stdout[-2000:]
    n16 = re.search(r"^bfloat16 storage cases: (\d+)$", r.stdout, re.M)
    assert n16 and int(n16.group(1)) > 0, r.stdout[-2000:]
    assert int(m.group(1)) == 2 * int(info.group(3)) + int(n16.group(1)) > 0
