#!/usr/bin/env bash
# deploy/local/run.sh — the quick start: on a fresh Debian 12 machine, installs what is
# missing, builds, brings the local stack up, migrates, starts cqrs-commandd and cqrs-queryd
# in the background, creates a few demo products and prints curl examples.
#
# Idempotent: running it again rebuilds and restarts the daemons. `deploy/local/stack.sh down`
# stops everything it started. Ports: CQRS_COMMAND_PORT (8081), CQRS_QUERY_PORT (8082), and
# the stack's own (see stack.sh).
#
#   run.sh           the stack in plain text, as for development
#   run.sh --tls     the same over the stack's TLS profile (stack.sh up --tls): PostgreSQL,
#                    Redis and Kafka reached over TLS with authentication only; the daemons' own
#                    HTTP is unchanged. A stack keeps the profile it was made with: use another
#                    CQRS_STACK_DIR (and ports) than a plain one, or `stack.sh down --purge` it.
#   run.sh --redis-cluster
#                    the same with cqrs-queryd and cqrsctl on the stack's Redis Cluster
#                    (stack.sh up --redis-cluster: three primaries, three replicas) instead of
#                    its single Redis: CQRS_REDIS_URL=$CQRS_REDIS_CLUSTER_URL, a seed node. The
#                    stack keeps the cluster; a later plain run.sh uses the single Redis again.
set -euo pipefail

UP_ARGS=()
REDIS_CLUSTER=0
case ${1:-} in
"") ;;
--tls) UP_ARGS=(--tls) ;;
--redis-cluster) UP_ARGS=(--redis-cluster) REDIS_CLUSTER=1 ;;
-h | --help)
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
    exit 0
    ;;
*)
    echo "usage: $0 [--tls | --redis-cluster]" >&2
    exit 2
    ;;
esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
BUILD=$REPO/build
COMMAND_PORT=${CQRS_COMMAND_PORT:-8081}
QUERY_PORT=${CQRS_QUERY_PORT:-8082}

say() { printf '[run] %s\n' "$*" >&2; }

deploy/local/deps.sh

say "building (Release) in $BUILD"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCQRS_BUILD_TESTS=OFF \
    -DCQRS_DEPS_PREFIX="$(deploy/local/libs.sh)" >/dev/null
ninja -C "$BUILD" >"$BUILD/ninja.log" 2>&1 || { tail -n 40 "$BUILD/ninja.log" >&2; exit 1; } # errors shown

deploy/local/stack.sh up "${UP_ARGS[@]}"
eval "$(deploy/local/stack.sh env)"
if ((REDIS_CLUSTER)); then
    say "the query side on the Redis Cluster: CQRS_REDIS_URL=$CQRS_REDIS_CLUSTER_URL"
    export CQRS_REDIS_URL=$CQRS_REDIS_CLUSTER_URL
fi
RUN=$CQRS_STACK_DIR/run
mkdir -p "$RUN"

say "migrating"
"$BUILD/cmd/cqrsctl" migrate

stop_daemon() {
    local pidfile=$RUN/$1.pid pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$pidfile"
}

start_daemon() {
    local name=$1 port=$2
    stop_daemon "$name"
    CQRS_HTTP_PORT=$port setsid nohup "$BUILD/cmd/$name" >>"$RUN/$name.log" 2>&1 </dev/null &
    echo $! >"$RUN/$name.pid"
    for _ in $(seq 300); do
        if curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then
            say "$name ready on 127.0.0.1:$port (log: $RUN/$name.log)"
            return 0
        fi
        kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null || break
        sleep 0.1
    done
    say "ERROR: $name did not become ready; last log lines:"
    tail -n 20 "$RUN/$name.log" >&2
    exit 1
}

start_daemon cqrs-commandd "$COMMAND_PORT"
start_daemon cqrs-queryd "$QUERY_PORT"

say "creating demo products"
demo() {
    local code
    code=$(curl -sS -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$COMMAND_PORT/v1/products" \
        -H 'Content-Type: application/json' -d "$1")
    case $code in
    201) say "  created $(echo "$1" | sed -E 's/.*"sku":"([^"]+)".*/\1/')" ;;
    409) say "  $(echo "$1" | sed -E 's/.*"sku":"([^"]+)".*/\1/') exists already" ;;
    *) say "  unexpected HTTP $code"; exit 1 ;;
    esac
}
demo '{"sku":"DEMO-MUG","name":"Enamel mug","description":"Keeps coffee hot.","category":"kitchen","price_cents":1450,"currency":"EUR","initial_stock":120}'
demo '{"sku":"DEMO-KETTLE","name":"Stovetop kettle","category":"kitchen","price_cents":3900,"currency":"EUR","initial_stock":35}'
demo '{"sku":"DEMO-LAMP","name":"Desk lamp","description":"Warm light, dimmable.","category":"office","price_cents":5900,"currency":"EUR","initial_stock":18}'

cat <<MSG

cqrs is running: commands on http://127.0.0.1:$COMMAND_PORT, queries on http://127.0.0.1:$QUERY_PORT

Create a product (note the Location header):
  curl -i -X POST http://127.0.0.1:$COMMAND_PORT/v1/products \\
       -H 'Content-Type: application/json' \\
       -d '{"sku":"MY-1","name":"My product","category":"misc","price_cents":999,"currency":"EUR","initial_stock":5}'

Read it from the query side (use the id from the Location header):
  curl -i http://127.0.0.1:$QUERY_PORT/v1/products/<id>

Health: curl http://127.0.0.1:$COMMAND_PORT/readyz ; curl http://127.0.0.1:$QUERY_PORT/readyz
Stop everything: deploy/local/stack.sh down
MSG
