#!/usr/bin/env bash
# deploy/local/deps.sh — installs what building and testing cqrs needs on Debian 12, when it
# is missing: compilers, CMake/Ninja, the libraries (libpq, jansson, cmocka, libuuid) and the
# tools the tests use (prometheus: promtool and the Prometheus server that tests/monitoring
# runs), then has deploy/local/libs.sh build the pinned client libraries (librdkafka, hiredis
# with TLS, libmicrohttpd) into its cache, once. Debian 12's own -dev packages of those three
# are too old and not installed (CMake would refuse them; where they are installed anyway,
# the cache's prefix comes first). The servers themselves (PostgreSQL, Redis, Kafka) are
# installed by stack.sh.
#
# Run as root to install; as another user it only reports what is missing.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

PACKAGES=(
    build-essential cmake ninja-build pkg-config clang clang-format curl
    libpq-dev libjansson-dev libcmocka-dev uuid-dev python3 python3-venv prometheus docker-compose
    libclang-rt-14-dev valgrind wrk gnuplot-nox
)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# kubectl (renders the Kubernetes manifests in the tests): any package that provides it
command -v kubectl >/dev/null || missing+=(kubernetes-client)

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "[deps] missing Debian packages: ${missing[*]}" >&2
        echo "[deps] install them with: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "[deps] installing: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# librdkafka, hiredis, libmicrohttpd at their pins (instant once built); the prefix it prints
# is what CMake searches first.
"$SCRIPT_DIR/libs.sh" >/dev/null
