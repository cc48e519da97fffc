#!/bin/sh
# Install real Krita (Debian 12: 5.1.5) and what its embedded Python needs for the healdust
# plugin tests, plus Xvfb to run its GUI without a display. Idempotent: returns at once when
# everything is already there. Needs root (or sudo) when something is missing.
set -eu

PACKAGES="krita python3-pyqt5 python3-zmq python3-msgpack xvfb xauth"

missing=""
for p in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
if [ -z "$missing" ]; then
    echo "install_krita.sh: already installed ($PACKAGES)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
echo "install_krita.sh: installing$missing"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# python3-pyqt5 is only a Recommends of krita: name it, Krita's Python plugins need it.
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq $PACKAGES
