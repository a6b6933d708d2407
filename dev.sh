#!/usr/bin/env bash
# Developer entry point. Works on a fresh Debian 12 machine (installs what it needs).
#   ./dev.sh demo            run `gateway demo` (hub, simulated devices, live output)
#   ./dev.sh test [ARGS]     run the whole test suite (ARGS go to pytest)
#   ./dev.sh bench           run the benchmarks in tests/bench/ (mosquitto as the peer)
#   ./dev.sh setup           only install
#   ./dev.sh image-test [amd64|arm64|all]   build images with image/build and boot-test them
#   ./dev.sh image-build amd64|arm64 DIR    only build DIR/gateway-ARCH.img (.ci/run: arm64 in the background)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "dev.sh: installing Debian packages: ${missing[*]}" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

python_bin() {
    # Prefer a python3 >= 3.11 that can make venvs.
    for py in python3.11 python3; do
        if command -v "$py" >/dev/null && "$py" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"; return 0
        fi
    done
    return 1
}

setup_python() {
    if ! python_bin >/dev/null; then
        apt_install python3 python3-venv python3-dev
    fi
    # python-qpid-proton (AMQP) builds from its source on PyPI: a C compiler and Python headers
    apt_install gcc python3-dev
    local py; py=$(python_bin)
    if [ ! -x "$VENV/bin/python" ]; then
        "$py" -m venv "$VENV"
    fi
    if [ ! -f "$VENV/.installed" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
        "$VENV/bin/pip" install -q --upgrade pip >/dev/null
        "$VENV/bin/pip" install -q -e ".[test]"
        touch "$VENV/.installed"
    fi
}

setup_test() {
    # Real peers for the tests: Debian's mosquitto broker and clients, socat for serial pairs,
    # a D-Bus daemon for the fake BlueZ that bleak talks to, umockdev for recorded udev devices,
    # curl and openssl for the README's command blocks (tests/e2e/test_14_readme.py),
    # Chromium and its WebDriver for the web page's browser tests (tests/ui/).
    apt_install mosquitto mosquitto-clients socat ca-certificates dbus-daemon umockdev curl openssl \
        chromium chromium-driver
    # systemd-analyze for the unit checks; libsystemd-dev, pkg-config and a compiler to build
    # systemd-python (the journal and sd_notify) into the venv.
    apt_install systemd libsystemd-dev pkg-config gcc python3-dev
    setup_python
}

setup_image() {
    # Image builds (image/build) and their boot tests under qemu (TCG).
    apt_install mmdebstrap mtools dosfstools fdisk e2fsprogs systemd-boot-efi ovmf qemu-system-x86 \
        qemu-system-arm qemu-user-static binfmt-support arch-test openssh-client qemu-utils file
    # arm64 builds run the target's binaries through qemu-user: binfmt_misc must be mounted.
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        as_root mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    as_root update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    arch-test arm64 >/dev/null || { echo "dev.sh: arm64 binaries do not run (binfmt_misc)" >&2; return 1; }
}

image_build() {
    # One image, $2/gateway-$1.img (no apt: call setup_image before, not in parallel with it).
    local arch=$1 dir=$2 t; t=$(date +%s)
    as_root env GATEWAY_BUILD_PYTHON="$(cd "$VENV" && pwd)/bin/python" image/build --arch "$arch" --out "$dir/gateway-$arch.img"
    echo "dev.sh: image $arch built in $(( $(date +%s) - t )) s" >&2
}

image_test() {
    # Build each image, then run its boot tests. Artefacts in $IMAGE_DIR (default: a temp dir).
    # IMAGE_PREBUILT=1: use the images already in $IMAGE_DIR (made by `image-build`).
    local which=${1:-all} dir=${IMAGE_DIR:-$(mktemp -d /tmp/gateway-images.XXXXXX)} arch
    shift || true
    local archs=(amd64 arm64); [ "$which" = all ] || archs=("$which")
    setup_test; setup_image
    for arch in "${archs[@]}"; do
        if [ "${IMAGE_PREBUILT:-0}" = 1 ] && [ -f "$dir/gateway-$arch.img" ]; then continue; fi
        image_build "$arch" "$dir"
    done
    local env_=(); for arch in "${archs[@]}"; do env_+=("GATEWAY_IMAGE_${arch^^}=$dir/gateway-$arch.img"); done
    local t=$(date +%s) rc=0
    env "${env_[@]}" "$VENV/bin/python" -m pytest tests/image -v -rs -p no:cacheprovider "$@" || rc=$?
    echo "dev.sh: image boot tests took $(( $(date +%s) - t )) s" >&2
    [ -n "${IMAGE_DIR:-}" ] || rm -rf "$dir"
    return $rc
}

cmd=${1:-help}
shift || true
case "$cmd" in
    demo)  setup_python; exec "$VENV/bin/gateway" demo "$@" ;;
    test)  setup_test; exec "$VENV/bin/python" -m pytest "$@" ;;
    bench) setup_test
           for b in tests/bench/ingest.py tests/bench/methods.py tests/bench/modbus_bus.py \
                    tests/bench/ble_decode.py tests/bench/serial_decode.py \
                    tests/bench/amqp_events.py; do
               echo "== $b"; "$VENV/bin/python" "$b" "$@"
           done ;;
    setup) setup_test ;;
    image-test) image_test "$@" ;;
    image-build) [ $# -eq 2 ] || { echo "usage: ./dev.sh image-build amd64|arm64 DIR" >&2; exit 2; }
                 setup_python; setup_image; image_build "$@" ;;
    image-setup) setup_test; setup_image ;;
    *) sed -n '2,8p' "$0"; exit 2 ;;
esac
