#!/usr/bin/env bash
# Developer entry point. Works on a fresh Debian 12 machine (installs what it needs).
#   ./dev.sh demo            run `gateway demo` (hub, simulated devices, live output)
#   ./dev.sh test [ARGS]     run the whole test suite (ARGS go to pytest)
#   ./dev.sh bench           run the benchmarks in tests/bench/ (mosquitto as the peer)
#   ./dev.sh setup           only install
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
    setup_python
}

cmd=${1:-help}
shift || true
case "$cmd" in
    demo)  setup_python; exec "$VENV/bin/gateway" demo "$@" ;;
    test)  setup_test; exec "$VENV/bin/python" -m pytest "$@" ;;
    bench) setup_test
           for b in tests/bench/ingest.py tests/bench/methods.py tests/bench/modbus_bus.py \
                    tests/bench/ble_decode.py tests/bench/serial_decode.py; do
               echo "== $b"; "$VENV/bin/python" "$b" "$@"
           done ;;
    setup) setup_test ;;
    *) sed -n '2,7p' "$0"; exit 2 ;;
esac
