#!/usr/bin/env bash
# tests/run.sh — the one test command (README, CI).
#
# Installs what is missing, checks formatting, lints the Python (ruff), builds with ASan+UBSan,
# starts an isolated stack (its own folder and free ports, so a running dev stack is left alone), runs every
# ctest label (unit, integration, e2e, fault — the fault suite starts a stack of its own, since
# it kills servers) and always tears the stack down, also on failure or Ctrl-C. Exits non-zero on any failure. Integration and e2e tests fail (never skip) when a
# server is missing: CI=true is set for them. The tests labelled tls need the TLS profile of
# the stack: they run last, on a second stack (stack.sh up --tls) started after the first one
# is torn down, and only when the ctest arguments select any of them; the e2e tests run there
# again (label e2e-tls), over TLS with authentication to all three servers. The first stack also
# runs a Redis Cluster (stack.sh up --redis-cluster: three primaries, three replicas, on twelve
# free ports listed in CQRS_REDIS_CLUSTER_PORTS and CQRS_REDIS_CLUSTER_BUS_PORTS); tests reach it
# through CQRS_REDIS_CLUSTER_URL (a seed node) while CQRS_REDIS_URL stays the single Redis.
#
#   tests/run.sh                 everything
#   tests/run.sh -L unit         extra arguments go to ctest (the tls label runs only on the
#                                TLS stack: tests/run.sh -L tls)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
BUILD=${CQRS_TEST_BUILD_DIR:-$REPO/build-asan}
started=$(date +%s)

say() { printf '\n==> %s\n' "$*"; }

say "dependencies"
deploy/local/deps.sh
# the pinned client libraries' prefix (deps.sh built them; this only prints it)
DEPS_PREFIX=$(deploy/local/libs.sh)

say "formatting (clang-format --dry-run)"
mapfile -t sources < <(git ls-files '*.c' '*.h' 2>/dev/null || find libcqrs services cmd tests -name '*.[ch]')
clang-format --dry-run -Werror "${sources[@]}"

say "python validators (openapi-spec-validator, jsonschema) in $BUILD/venv"
mkdir -p "$BUILD"
# The tools of issue 21 too: schemathesis and the CloudEvents SDK (with confluent-kafka) from
# PyPI into the venv; @redocly/cli from npm and kube-score through the Go module proxy into the
# cache folder (CQRS_CACHE_DIR, as deploy/local/libs.sh), downloads cached there as well.
CACHE_DIR=${CQRS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cqrs}
# ruff (the Python lint below) is pinned there too; a venv with another ruff is brought up to date.
RUFF_VERSION=$(sed -n 's/^ruff==//p' tests/schemas/requirements.txt)
if ! "$BUILD/venv/bin/python" -c 'import openapi_spec_validator, jsonschema, yaml, kubernetes_validate, schemathesis, cloudevents, confluent_kafka' 2>/dev/null ||
    [ "$("$BUILD/venv/bin/ruff" --version 2>/dev/null)" != "ruff $RUFF_VERSION" ]; then
    python3 -m venv "$BUILD/venv"
    "$BUILD/venv/bin/pip" install -q --disable-pip-version-check --cache-dir "$CACHE_DIR/pip" \
        -r tests/schemas/requirements.txt
fi

say "python lint (ruff $RUFF_VERSION check; ruff.toml)"
"$BUILD/venv/bin/ruff" check --no-cache tests/fault tests/schemas tests/monitoring tests/support
# npm (Node.js 20 or newer) and Go come with the machine (README, "Tests"); Debian 12's own
# nodejs 18 and golang 1.19 are too old for these releases, so they are not installed here.
PATH=$PATH:/usr/local/go/bin
for tool in npm go; do
    command -v "$tool" >/dev/null || { echo "tests/run.sh needs $tool on PATH (Node.js >= 20 with npm, Go >= 1.22)" >&2; exit 1; }
done
REDOCLY_VERSION=2.77.0 KUBE_SCORE_VERSION=v1.20.0
REDOCLY=$CACHE_DIR/tools/npm/node_modules/.bin/redocly
if [ "$("$REDOCLY" --version 2>/dev/null)" != "$REDOCLY_VERSION" ]; then
    say "@redocly/cli $REDOCLY_VERSION (npm) in $CACHE_DIR/tools/npm"
    mkdir -p "$CACHE_DIR/tools/npm"
    (cd "$CACHE_DIR/tools/npm" && npm install -q --no-audit --no-fund --cache "$CACHE_DIR/npm-cache" \
        "@redocly/cli@$REDOCLY_VERSION" >/dev/null)
fi
KUBE_SCORE=$CACHE_DIR/tools/kube-score-$KUBE_SCORE_VERSION/kube-score
if [ ! -x "$KUBE_SCORE" ]; then
    say "kube-score $KUBE_SCORE_VERSION (Go module proxy) in ${KUBE_SCORE%/*}"
    GOPATH=$CACHE_DIR/go GOBIN=${KUBE_SCORE%/*} GOFLAGS=-modcacherw PATH=$PATH:/usr/local/go/bin \
        go install "github.com/zegl/kube-score/cmd/kube-score@$KUBE_SCORE_VERSION"
fi

say "build (ASan + UBSan) in $BUILD"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCQRS_BUILD_TESTS=ON \
    -DCQRS_DEPS_PREFIX="$DEPS_PREFIX" -DCQRS_ENABLE_ASAN=ON -DCQRS_ENABLE_UBSAN=ON -DCQRS_ENABLE_FAILPOINTS=ON -DCQRS_WERROR=ON -DCQRS_PYTHON="$BUILD/venv/bin/python" \
    -DCQRS_REDOCLY="$REDOCLY" -DCQRS_KUBE_SCORE="$KUBE_SCORE" >/dev/null
ninja -C "$BUILD"

# shellcheck source=tests/support/ports.sh
. "$(dirname "${BASH_SOURCE[0]}")/support/ports.sh"

STACK_DIR=$(mktemp -d /tmp/cqrs-test-stack.XXXXXX)
export CQRS_STACK_DIR=$STACK_DIR
CQRS_PG_PORT=$(free_port)
CQRS_REDIS_PORT=$(free_port)
CQRS_KAFKA_PORT=$(free_port)
CQRS_KAFKA_CONTROLLER_PORT=$(free_port)
export CQRS_PG_PORT CQRS_REDIS_PORT CQRS_KAFKA_PORT CQRS_KAFKA_CONTROLLER_PORT
# six client ports and six cluster bus ports, no two alike (six consecutive free ports are not
# to be had for sure)
read -r -a cluster_ports <<<"$(free_ports 12 "$CQRS_PG_PORT" "$CQRS_REDIS_PORT" "$CQRS_KAFKA_PORT" \
    "$CQRS_KAFKA_CONTROLLER_PORT")"
export CQRS_REDIS_CLUSTER_PORTS="${cluster_ports[*]:0:6}"
export CQRS_REDIS_CLUSTER_BUS_PORTS="${cluster_ports[*]:6:6}"
chmod 755 "$STACK_DIR" # PostgreSQL runs as its own user under root

TLS_STACK_DIR=

teardown() {
    local rc=$?
    trap - EXIT INT TERM
    echo "==> tearing the test stack down ($STACK_DIR)"
    deploy/local/stack.sh down --purge >"$BUILD/stack-down.log" 2>&1 ||
        echo "stack teardown failed, see $BUILD/stack-down.log"
    if [ -n "$TLS_STACK_DIR" ]; then
        echo "==> tearing the TLS test stack down ($TLS_STACK_DIR)"
        CQRS_STACK_DIR=$TLS_STACK_DIR deploy/local/stack.sh down --purge >"$BUILD/stack-down-tls.log" 2>&1 ||
            echo "TLS stack teardown failed, see $BUILD/stack-down-tls.log"
    fi
    for f in "$BUILD/fault-results.txt" "$BUILD/fault-results-replicated.txt" "$BUILD/fault-results-cluster.txt"; do
        if [ -f "$f" ]; then
            echo
            cat "$f"
        fi
    done
    if [ -f "$BUILD/ctest-summary.txt" ]; then
        echo
        cat "$BUILD/ctest-summary.txt"
    fi
    echo "tests/run.sh: $(($(date +%s) - started)) s, exit $rc"
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

say "test stack on ports pg=$CQRS_PG_PORT redis=$CQRS_REDIS_PORT kafka=$CQRS_KAFKA_PORT redis-cluster=$CQRS_REDIS_CLUSTER_PORTS"
deploy/local/stack.sh up --redis-cluster
eval "$(deploy/local/stack.sh env)"

export CI=true
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}


extra=0
if [ $# -eq 0 ]; then
    # The whole suite also fuzzes briefly (tests/fuzz/run.sh SECONDS for long runs), runs both
    # daemons under valgrind and soaks them for a minute; all skipped when ctest arguments pick
    # a subset.
    say "fuzz (10 s per harness)"
    tests/fuzz/run.sh 10 || extra=1
    say "valgrind smoke run of both daemons"
    tests/valgrind/smoke.sh || extra=1
    say "soak (60 s; tests/soak/soak.sh SECONDS for long runs)"
    SOAK_OUT="$BUILD/soak" && rm -rf "$SOAK_OUT" && mkdir -p "$SOAK_OUT" && export SOAK_OUT
    tests/soak/soak.sh 60 || extra=1
fi

say "ctest $* (all but the tls label)"
rm -f "$BUILD/ctest-summary.txt" "$BUILD/fault-results.txt" "$BUILD/fault-results-replicated.txt" \
    "$BUILD/fault-results-cluster.txt"
set +e
(cd "$BUILD" && ctest --output-on-failure --timeout 300 -LE '^tls$' "$@") | tee "$BUILD/ctest.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] && rc=$extra
set -e

# The tls and e2e-tls labels (several -L options must all match): on a TLS stack of its own.
n_tls=$(cd "$BUILD" && ctest -N -L '^(tls|e2e-tls)$' "$@" | sed -n 's/^Total Tests: //p')
if [ "${n_tls:-0}" != 0 ]; then
    echo "==> tearing the test stack down ($STACK_DIR)"
    deploy/local/stack.sh down --purge >"$BUILD/stack-down.log" 2>&1 ||
        echo "stack teardown failed, see $BUILD/stack-down.log"
    TLS_STACK_DIR=$(mktemp -d /tmp/cqrs-test-tls-stack.XXXXXX)
    chmod 755 "$TLS_STACK_DIR"
    set +e
    (
        set -e
        export CQRS_STACK_DIR=$TLS_STACK_DIR
        # no cluster in the TLS profile; the first stack's is gone
        unset CQRS_REDIS_CLUSTER_URL CQRS_REDIS_CLUSTER_PORT CQRS_REDIS_CLUSTER_PORTS CQRS_REDIS_CLUSTER_BUS_PORTS
        CQRS_PG_PORT=$(free_port)
        CQRS_REDIS_PORT=$(free_port)
        CQRS_KAFKA_PORT=$(free_port)
        CQRS_KAFKA_CONTROLLER_PORT=$(free_port)
        CQRS_KAFKA_MTLS_PORT=$(free_port)
        export CQRS_PG_PORT CQRS_REDIS_PORT CQRS_KAFKA_PORT CQRS_KAFKA_CONTROLLER_PORT CQRS_KAFKA_MTLS_PORT
        say "TLS test stack on ports pg=$CQRS_PG_PORT redis=$CQRS_REDIS_PORT kafka=$CQRS_KAFKA_PORT"
        deploy/local/stack.sh up --tls
        eval "$(deploy/local/stack.sh env)"
        say "ctest -L '^(tls|e2e-tls)\$' $*"
        set +e
        (cd "$BUILD" && ctest --output-on-failure --timeout 300 -L '^(tls|e2e-tls)$' "$@") |
            tee -a "$BUILD/ctest.log"
        exit "${PIPESTATUS[0]}"
    )
    tls_rc=$?
    set -e
    [ "$rc" -eq 0 ] && rc=$tls_rc
fi
grep -E -A100 '^(100% tests passed|[0-9]+% tests passed)' "$BUILD/ctest.log" >"$BUILD/ctest-summary.txt" || true
exit "$rc"
