#!/usr/bin/env bash
# Print the path of a static qemu-aarch64 (user mode) of version >= 8, fetching one when needed:
#
#   QEMU=$(bash .ci/qemu_aarch64_new.sh DESTDIR)
#
# Why: qemu-user before 8.0 (Debian 12 ships 7.2) keeps a page descriptor for every guest page
# of every mapping, reserved or not: about 6 MiB of host memory per GiB that the guest mmaps, so
# the sparse MAP_NORESERVE regions of tests/c/test_index64.c and tests/robustness/test_robust_sizes.py
# (several TiB of address space, a few pages touched) cost tens of GiB and the process is
# OOM-killed (rc 137). qemu 8.0 tracks pages in an interval tree: the same run peaks at ~20 MiB.
#
# Uses the system's qemu-aarch64-static / qemu-aarch64 when it is static and >= 8; otherwise
# downloads qemu-user from <codename>-backports (Debian 12: qemu 10) with apt-get, through a
# private sources list and lists directory (the system's apt configuration is not touched), and
# unpacks it under DESTDIR (nothing installed). Fails loudly when neither works.
set -euo pipefail
DEST=${1:?usage: qemu_aarch64_new.sh DESTDIR}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)

usable() {   # static (runs inside a chroot through binfmt flag F) and version >= 8
    local q=$1 major
    [ -x "$q" ] || return 1
    major=$("$q" --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1)
    [ -n "$major" ] && [ "$major" -ge 8 ] || return 1
    ldd "$q" 2>&1 | grep -qE "statically linked|not a dynamic executable"
}
for q in /usr/bin/qemu-aarch64-static /usr/bin/qemu-aarch64; do
    if usable "$q"; then echo "$q"; exit 0; fi
done

command -v apt-get >/dev/null || { echo "qemu_aarch64_new: no qemu-aarch64 >= 8 and no apt-get" >&2; exit 1; }
. /etc/os-release
CODENAME=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}
# the Debian mirror apt uses here
MIRROR=$(grep -hsoE '^(deb|URIs:)[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]+' \
             /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
         | grep -oE 'https?://[^[:space:]]+/debian/?$' | head -1 || true)
[ -n "$MIRROR" ] || { echo "qemu_aarch64_new: no Debian mirror in apt's sources" >&2; exit 1; }
APT="$DEST/apt"
mkdir -p "$APT/lists/partial" "$APT/archives/partial"
echo "deb ${MIRROR%/} $CODENAME-backports main" > "$APT/sources.list"
O=(-o "Dir::Etc::sourcelist=$APT/sources.list" -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$APT/lists"
   -o "Dir::Cache::archives=$APT/archives" -o "APT::Sandbox::User=root" -q)
apt-get "${O[@]}" update >"$APT/update.log" 2>&1 || { cat "$APT/update.log" >&2; exit 1; }
( cd "$APT" && apt-get "${O[@]}" download "qemu-user/$CODENAME-backports" >"$APT/download.log" 2>&1 ) \
    || { cat "$APT/download.log" >&2; echo "qemu_aarch64_new: no qemu-user in $CODENAME-backports" >&2; exit 1; }
dpkg-deb -x "$APT"/qemu-user_*.deb "$DEST/qemu"
for q in "$DEST/qemu/usr/bin/qemu-aarch64-static" "$DEST/qemu/usr/bin/qemu-aarch64"; do
    if usable "$q"; then echo "$q"; exit 0; fi
done
echo "qemu_aarch64_new: the qemu-user of $CODENAME-backports has no static qemu-aarch64 >= 8" >&2
exit 1
