#!/bin/sh
# Build (once) the Debian 13 chroot that runs real GIMP 3.0 for tests/gimp.
#
# GIMP 3 is only packaged for Debian 13 (trixie); its .debs need a newer glibc than
# Debian 12 has, so the tests run gimp-console-3.0 inside a trixie chroot built with
# mmdebstrap (see ../shared/EDITORS.md). Idempotent: does nothing when the chroot is
# already there. It is built into a temporary folder and renamed when complete, so a
# half-built chroot is never used.
#
#   HEALDUST_GIMP_CHROOT   where the chroot lives (default /var/cache/healdust/gimp-chroot)
#   HEALDUST_DEBIAN_MIRROR the Debian mirror (default http://deb.debian.org/debian)
#
# Needs root (mmdebstrap's root mode and chroot(8)).
set -eu

ROOT="${HEALDUST_GIMP_CHROOT:-/var/cache/healdust/gimp-chroot}"
MIRROR="${HEALDUST_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PACKAGES="gimp,python3-gi,gir1.2-gimp-3.0,python3-zmq,python3-msgpack"

if [ -x "$ROOT/usr/bin/gimp-console-3.0" ] && [ -f "$ROOT/.healdust-complete" ]; then
    echo "gimp chroot: $ROOT (cached)"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "build_gimp_chroot.sh: needs root to build $ROOT" >&2
    exit 1
fi

if ! command -v mmdebstrap >/dev/null 2>&1; then
    echo "gimp chroot: installing mmdebstrap"
    # wait for another apt run (e.g. the Krita test setup) instead of failing on its lock
    apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@"; }
    apt_get install -y -qq mmdebstrap >/dev/null 2>&1 || {
        i=0
        until apt_get update -qq; do
            i=$((i + 1)); [ "$i" -lt 60 ] || exit 1; sleep 10
        done
        apt_get install -y -qq mmdebstrap >/dev/null
    }
fi

parent="$(dirname "$ROOT")"
mkdir -p "$parent"
tmp="$(mktemp -d "$parent/.gimp-chroot.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT INT TERM

echo "gimp chroot: building $ROOT (about 2 minutes)"
mmdebstrap --quiet --variant=minbase --include="$PACKAGES" trixie "$tmp" "$MIRROR"
chmod 755 "$tmp"
touch "$tmp/.healdust-complete"

# A stale, incomplete chroot from an older run is moved aside, then replaced at once.
if [ -e "$ROOT" ]; then
    rm -rf "$ROOT.old"
    mv "$ROOT" "$ROOT.old"
fi
mv "$tmp" "$ROOT"
trap - EXIT INT TERM
rm -rf "$ROOT.old"
echo "gimp chroot: ready at $ROOT"
