#!/usr/bin/env bash
# tests/valgrind/smoke.sh — both daemons under valgrind (memcheck) against the running stack
# (CQRS_PG_DSN, CQRS_KAFKA_BROKERS, CQRS_REDIS_URL): migrate, create a product, read it back,
# SIGTERM. Fails on any memcheck error or definite/indirect leak (valgrind's exit code), or
# when a daemon does not exit 0. Builds an unsanitized Debug build in build-valgrind/.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
B=$REPO/build-valgrind
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCQRS_BUILD_TESTS=OFF \
    -DCQRS_DEPS_PREFIX="$(deploy/local/libs.sh)" -DCQRS_WERROR=ON >/dev/null
ninja -C "$B" >"$B/ninja.log" 2>&1 || { tail -n 40 "$B/ninja.log" >&2; exit 1; } # errors shown
OUT=$(mktemp -d /tmp/cqrs-valgrind.XXXXXX)
PREFIX=vg$RANDOM
export CQRS_TOPIC_PREFIX=$PREFIX CQRS_CONSUMER_GROUP=$PREFIX CQRS_RELAY_POLL_MS=200
"$B/cmd/cqrsctl" migrate >/dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
CP=$(free_port) QP=$(free_port)
# shellcheck disable=SC2054 # the commas belong to --show-leak-kinds
VG=(valgrind --quiet --error-exitcode=99 --leak-check=full --show-leak-kinds=definite,indirect
    --errors-for-leak-kinds=definite,indirect --track-fds=no --num-callers=30)
CQRS_HTTP_PORT=$CP "${VG[@]}" --log-file="$OUT/commandd.vg" "$B/cmd/cqrs-commandd" >"$OUT/commandd.log" 2>&1 &
C=$!
CQRS_HTTP_PORT=$QP "${VG[@]}" --log-file="$OUT/queryd.vg" "$B/cmd/cqrs-queryd" >"$OUT/queryd.log" 2>&1 &
Q=$!
cleanup() { kill -9 $C $Q 2>/dev/null || true; }
trap cleanup EXIT
for p in $CP $QP; do
    for _ in $(seq 600); do curl -fs "http://127.0.0.1:$p/readyz" >/dev/null && break; sleep 0.2; done
done
LOC=$(curl -fsS -D - -o /dev/null -X POST "http://127.0.0.1:$CP/v1/products" -H 'Content-Type: application/json' \
    -d "{\"sku\":\"VG-$PREFIX\",\"name\":\"Valgrind\",\"category\":\"v\",\"price_cents\":1,\"currency\":\"EUR\",\"initial_stock\":2}" |
    tr -d '\r' | awk 'tolower($1) == "location:" {print $2}')
curl -fs -o /dev/null -X POST "http://127.0.0.1:$CP/v1/products" -H 'Content-Type: application/json' -d '{"sku":' || true
ok=0
for _ in $(seq 300); do
    if curl -fs "http://127.0.0.1:$QP$LOC" >/dev/null; then ok=1; break; fi
    sleep 0.2
done
curl -fs "http://127.0.0.1:$QP/v1/products?limit=5" >/dev/null
curl -fs "http://127.0.0.1:$CP/metrics" >/dev/null
curl -fs "http://127.0.0.1:$QP/metrics" >/dev/null
kill -TERM $C $Q
rc_c=0 rc_q=0
wait $C || rc_c=$?
wait $Q || rc_q=$?
trap - EXIT
echo "commandd exit $rc_c, queryd exit $rc_q, product read back: $ok (logs: $OUT)"
if [ $rc_c -ne 0 ] || [ $rc_q -ne 0 ] || [ $ok -ne 1 ]; then
    cat "$OUT"/*.vg >&2
    exit 1
fi
echo "valgrind: no errors, no definite or indirect leaks"
