#!/bin/sh
# The test command (README): installs everything a fresh Debian 12 machine needs, then runs
# ruff and the whole pytest suite, real Krita and real GIMP 3 included.
#   sh scripts/test.sh [pytest args...]
set -eu
cd "$(dirname "$0")/.."
VENV="${HEALDUST_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# torch first, pinned: the CPU build on this machine's disk (a bare 'torch' would pull CUDA)
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
sh tests/editors/install_krita.sh
sh tests/editors/build_gimp_chroot.sh
"$VENV/bin/ruff" check .
exec "$VENV/bin/pytest" -ra "$@"
