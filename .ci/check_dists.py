#!/usr/bin/env python3
"""Check what the wheel and the sdist contain (CI step): fail on a missing or an unwanted file.

    python .ci/check_dists.py DIST_DIR [REPO_ROOT]

wheel: the Python package, the compiled extension, py.typed and the license, nothing else:
       no build inputs (_core.pyx, the generated _core.c, the .pxd, C sources), no tests.
sdist: every file git tracks except the CI's own (.ci/, .gitignore), so that it builds, tests
       and benchmarks like a clone; every file the README links to; no build outputs.
Both:  metadata with the SPDX license, the project URLs and the console script.
Prints both file lists.
"""

import re
import subprocess
import sys
import tarfile
import zipfile
from fnmatch import fnmatch
from pathlib import Path

NOT_IN_SDIST = [".ci/*", ".gitignore", ".gitattributes", ".github/*"]
WHEEL_REQUIRED = ["selfattn/__init__.py", "selfattn/__main__.py", "selfattn/_api.py", "selfattn/_demo.py",
                  "selfattn/reference.py", "selfattn/py.typed", "selfattn/_core.*",
                  "selfattn-*.dist-info/licenses/LICENSE", "selfattn-*.dist-info/METADATA",
                  "selfattn-*.dist-info/entry_points.txt"]
WHEEL_ALLOWED = ["selfattn/*.py", "selfattn/*.pyi", "selfattn/py.typed", "selfattn/_core.*.so", "selfattn/_core.*.pyd",
                 "selfattn-*.dist-info/*"]
SDIST_UNWANTED = ["*.so", "*.o", "*.pyd", "*.pyc", "*/__pycache__/*", "selfattn/_core.c", "build/*", "dist/*"]
METADATA_REQUIRED = [r"^License-Expression: MIT$", r"^License-File: LICENSE$", r"^Project-URL: Source, ",
                     r"^Project-URL: Documentation, ", r"^Provides-Extra: test$", r"^Provides-Extra: bench$",
                     r"^Provides-Extra: all$", r"^Classifier: Typing :: Typed$"]


def _match(name, patterns):
    return any(fnmatch(name, p) for p in patterns)


def _readme_links(readme_text):
    """Relative targets of markdown links and images: ](path) not starting with a scheme or #."""
    return sorted({m for m in re.findall(r"\]\(([^)\s#]+)\)", readme_text) if "://" not in m})


def check_wheel(path):
    names = [n for n in zipfile.ZipFile(path).namelist() if not n.endswith("/")]
    errors = [f"wheel: missing {p}" for p in WHEEL_REQUIRED if not any(fnmatch(n, p) for n in names)]
    errors += [f"wheel: unwanted {n}" for n in names if not _match(n, WHEEL_ALLOWED)]
    meta = next((n for n in names if fnmatch(n, "selfattn-*.dist-info/METADATA")), None)
    if meta:
        text = zipfile.ZipFile(path).read(meta).decode()
        errors += [f"wheel METADATA: no line matching {r!r}" for r in METADATA_REQUIRED
                   if not re.search(r, text, re.M)]
        errors += [f"wheel METADATA: license classifier next to License-Expression: {ln}"
                   for ln in text.splitlines() if ln.startswith("Classifier: License ::")]
    ep = next((n for n in names if n.endswith(".dist-info/entry_points.txt")), None)
    if ep and "selfattn = selfattn.__main__:main" not in zipfile.ZipFile(path).read(ep).decode():
        errors.append("wheel: console script `selfattn` missing from entry_points.txt")
    return names, errors


def check_sdist(path, root):
    with tarfile.open(path) as tar:
        members = [m.name for m in tar.getmembers() if m.isfile()]
        readme = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/README.md")
                                      and m.name.count("/") == 1)).read().decode()
    prefix = members[0].split("/", 1)[0] + "/"
    names = sorted(n[len(prefix):] for n in members)
    errors = [f"sdist: unwanted {n}" for n in names if _match(n, SDIST_UNWANTED)]
    for req in ["LICENSE", "README.md", "pyproject.toml", "setup.py", "selfattn/_core.pyx", "selfattn/py.typed"]:
        if req not in names:
            errors.append(f"sdist: missing {req}")
    for link in _readme_links(readme):
        if link not in names:
            errors.append(f"sdist: missing {link} (linked from README.md)")
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        tracked = []
        print("(not a git checkout: sdist not compared with git ls-files)")
    errors += [f"sdist: missing tracked file {t}" for t in tracked
               if t not in names and not _match(t, NOT_IN_SDIST)]
    return names, errors


def main(argv):
    dist = Path(argv[1])
    root = Path(argv[2]) if len(argv) > 2 else Path(__file__).resolve().parent.parent
    wheels, sdists = sorted(dist.glob("selfattn-*.whl")), sorted(dist.glob("selfattn-*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        print(f"expected one wheel and one sdist in {dist}, found {wheels + sdists}")
        return 1
    wnames, werr = check_wheel(wheels[0])
    snames, serr = check_sdist(sdists[0], root)
    print(f"{wheels[0].name} ({len(wnames)} files):", *("  " + n for n in wnames), sep="\n")
    print(f"{sdists[0].name} ({len(snames)} files):", *("  " + n for n in snames), sep="\n")
    for e in werr + serr:
        print("ERROR:", e)
    print("archives OK" if not (werr or serr) else f"{len(werr + serr)} problem(s)")
    return 1 if (werr or serr) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
