#!/usr/bin/env bash
# tests/package/run.sh BUILD SOURCE — libcqrs as a user gets it: installed from BUILD (component
# cqrs_dev) into a throw-away prefix, then examples/counter configured against that prefix alone
# (find_package(cqrs), CMAKE_PREFIX_PATH) and built. It needs no server: it only builds.
# That the example builds with nothing of services/ also proves libcqrs knows no products or
# orders.
set -euo pipefail
BUILD=$1
SRC=$2
WORK=$(mktemp -d /tmp/cqrs-package.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
cmake --install "$BUILD" --prefix "$WORK/prefix" --component cqrs_dev >/dev/null
test -f "$WORK/prefix/lib/cmake/cqrs/cqrsConfig.cmake" -o -f "$WORK/prefix/lib64/cmake/cqrs/cqrsConfig.cmake"
# the compiler of BUILD (the sanitizer flags of a sanitizer build come with cqrs::cqrs)
CC=$(sed -n 's/^CMAKE_C_COMPILER:[A-Z]*=//p' "$BUILD/CMakeCache.txt")
cmake -S "$SRC/examples/counter" -B "$WORK/build" -G Ninja -DCMAKE_C_COMPILER="$CC" \
    -DCMAKE_PREFIX_PATH="$WORK/prefix" -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON \
    -DCMAKE_COMPILE_WARNING_AS_ERROR=ON
ninja -C "$WORK/build"
test -x "$WORK/build/counterd"
echo "ok: examples/counter built against the installed cqrs::cqrs"
