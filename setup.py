"""Build of the selfattn extension: selfattn._core (Cython) + src_c/ (plain C).

One extension holds every kernel target; attn_avx2.c and attn_avx512.c enable
their instruction sets with a target pragma for their own functions only, and
dispatch.c picks one at run time. attn_neon.c holds the aarch64 NEON kernels
(NEON is baseline there: no flags) and compiles to nothing elsewhere, as the
x86 files do on aarch64. The rest is compiled for the baseline of the
architecture: never -march=native, so one wheel runs on any x86-64 (or aarch64).

Environment switches:
  SELFATTN_SANITIZE=1   build with AddressSanitizer + UndefinedBehaviorSanitizer
  SELFATTN_NO_OPENMP=1  build without OpenMP (single-threaded)
  SELFATTN_LIBOMP_PREFIX=DIR  where libomp lives (DIR/include/omp.h, DIR/lib/libomp.*) for a compiler
                        that rejects -fopenmp (Apple's clang); Homebrew's libomp is found without it

OpenMP: -fopenmp where the compiler takes it (GCC; LLVM clang with libomp). Apple's clang rejects
-fopenmp but compiles OpenMP with "-Xpreprocessor -fopenmp" and links it with -lomp when libomp is
installed (brew install libomp): that form is tried next, with SELFATTN_LIBOMP_PREFIX, `brew --prefix
libomp`, /opt/homebrew/opt/libomp and /usr/local/opt/libomp. Without either the build is
single-threaded, says so, and selfattn.show_config() prints openmp=no, default_threads=1.
  SELFATTN_BUILD_JOBS=N compile at most N sources at once (default: the usable cores)

The extension's sources compile in parallel, one compiler process per core,
largest first: the Cython-generated _core.c takes about as long as the three
kernel files together, so on 2 cores the build takes roughly half as long.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

C_SOURCES = ["src_c/dispatch.c", "src_c/merge.c", "src_c/attn_generic.c", "src_c/attn_avx2.c", "src_c/attn_avx512.c",
             "src_c/attn_neon.c"]


def _flag_works(compiler, flags, link_flags=()):
    """Does a tiny program compile and link with these flags?"""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() < 0;}\n"
                    if "-fopenmp" in flags else "int main(void){return 0;}\n")
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=list(flags))
            compiler.link_executable(objs, "probe", output_dir=tmp, extra_postargs=list(link_flags))
            return True
        except Exception:
            return False


def _libomp_prefixes():
    """Where a libomp for Apple-style clang may be: the user's, Homebrew's, the usual Homebrew roots."""
    found = [os.environ.get("SELFATTN_LIBOMP_PREFIX", "")]
    if shutil.which("brew"):
        try:
            found.append(subprocess.run(["brew", "--prefix", "libomp"], capture_output=True, text=True,
                                        timeout=60).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    found += ["/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"]
    seen = []
    for p in found:
        if p and os.path.isfile(os.path.join(p, "include", "omp.h")) and p not in seen:
            seen.append(p)
    return seen


def _openmp_flags(cc):
    """(compile args, link args) that give this compiler OpenMP, or None (see the docstring above)."""
    if _flag_works(cc, ["-fopenmp"], ["-fopenmp"]):
        return ["-fopenmp"], ["-fopenmp"]   # shared libgomp / libomp: threadpoolctl can see it
    for prefix in _libomp_prefixes():
        lib = os.path.join(prefix, "lib")
        cflags = ["-Xpreprocessor", "-fopenmp", "-I" + os.path.join(prefix, "include")]
        lflags = ["-L" + lib, "-Wl,-rpath," + lib, "-lomp"]
        if _flag_works(cc, cflags, lflags):
            return cflags, lflags
    return None


def _build_jobs():
    env = os.environ.get("SELFATTN_BUILD_JOBS", "").strip()
    if env:
        return max(1, int(env))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def _compile_parallel(self, sources, output_dir=None, macros=None, include_dirs=None, debug=False,
                      extra_preargs=None, extra_postargs=None, depends=None):
    """CCompiler.compile, with one compiler process per source on a thread pool.

    Same steps as distutils' CCompiler.compile (which runs them one after another);
    bound to a compiler instance whose class uses that generic compile (Unix compilers).
    """
    macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
        output_dir, macros, include_dirs, sources, depends, extra_postargs)
    cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)
    todo = sorted((obj for obj in objects if obj in build),
                  key=lambda obj: -os.path.getsize(build[obj][0]))   # longest compile first

    def compile_one(obj):
        src, ext = build[obj]
        self._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

    with ThreadPoolExecutor(max_workers=max(1, min(_build_jobs(), len(todo)))) as pool:
        for _ in pool.map(compile_one, todo):   # re-raises the first CompileError
            pass
    return objects


class BuildExt(build_ext):
    def build_extension(self, ext):
        cc = self.compiler
        # only compilers that use distutils' generic compile() loop (Unix-like); MSVC has its own
        generic = cc.compiler_type in ("unix", "cygwin", "mingw32") and all(
            hasattr(cc, m) for m in ("_setup_compile", "_get_cc_args", "_compile"))
        if generic and _build_jobs() > 1:
            cc.compile = types.MethodType(_compile_parallel, cc)
        super().build_extension(ext)

    def build_extensions(self):
        cc = self.compiler
        compile_args, link_args = [], []
        if cc.compiler_type == "msvc":
            compile_args += ["/O2"]
            if not os.environ.get("SELFATTN_NO_OPENMP"):
                compile_args += ["/openmp"]
        else:
            sanitize = os.environ.get("SELFATTN_SANITIZE", "") not in ("", "0")
            # -fno-trapping-math: nothing reads the FP exception flags, and without it GCC will not
            # if-convert (so not vectorise) the selects of score_mod.h's exp / log / tanh on AVX2
            compile_args += ["-O1" if sanitize else "-O3", "-fno-math-errno", "-fno-trapping-math",
                             "-Wall", "-Wno-unused-function"]
            if sanitize:
                san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g",
                       "-fno-sanitize-recover=undefined"]
                compile_args += san
                link_args += san
            if not os.environ.get("SELFATTN_NO_OPENMP"):
                omp = _openmp_flags(cc)
                if omp:
                    compile_args += omp[0]
                    link_args += omp[1]
                    print(f"selfattn: OpenMP with {' '.join(omp[0])} / {' '.join(omp[1])}", file=sys.stderr)
                else:
                    print("selfattn: compiler has no OpenMP (for Apple's clang: brew install libomp, or set "
                          "SELFATTN_LIBOMP_PREFIX); building single-threaded", file=sys.stderr)
        for ext in self.extensions:
            ext.extra_compile_args = compile_args + ext.extra_compile_args
            ext.extra_link_args = link_args + ext.extra_link_args
        # -Wall applies to every source, Cython's generated _core.c included (clean with
        # Cython 3 and gcc 12); -Wno-unused-function is for the static inline SIMD
        # helpers each target includes and may not use
        super().build_extensions()


ext = Extension(
    "selfattn._core",
    sources=["selfattn/_core.pyx"] + C_SOURCES,
    include_dirs=["src_c", np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    # every header: a change to any of them rebuilds the kernels (a list written out by hand
    # missed dropout.h, half.h, score_mod.h and the bf16 one)
    depends=sorted("src_c/" + f for f in os.listdir(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                   "src_c")) if f.endswith(".h")),
)

setup(
    ext_modules=cythonize([ext], language_level=3),
    cmdclass={"build_ext": BuildExt},
)
