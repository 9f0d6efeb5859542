#!/usr/bin/env bash
# tests/bench/adjust_stock.sh — AdjustStock commands per second through cqrs-commandd at 32
# concurrent clients (wrk), next to pgbench running the same SQL transaction with prepared
# statements against the same database in the same run: the database's own ceiling.
#
# Uses the local dev stack (deploy/local/stack.sh up) and a Release build in build/. Prints
# both rates and their ratio. Not a test: nothing is asserted.
#   CLIENTS=32 DURATION=20 PRODUCTS=1000 tests/bench/adjust_stock.sh
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
CLIENTS=${CLIENTS:-32}
DURATION=${DURATION:-20}
PRODUCTS=${PRODUCTS:-1000}
PORT=${BENCH_PORT:-18181}
OUT=$(mktemp -d /tmp/cqrs-bench.XXXXXX)

command -v wrk >/dev/null || { [ "$(id -u)" -eq 0 ] && apt-get install -y -qq wrk >/dev/null; }
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCQRS_BUILD_TESTS=OFF \
    -DCQRS_DEPS_PREFIX="$(deploy/local/libs.sh)" >/dev/null
ninja -C build >/dev/null
deploy/local/stack.sh up >/dev/null
eval "$(deploy/local/stack.sh env)"
build/cmd/cqrsctl migrate >/dev/null

echo "== bench set: $PRODUCTS products (ids md5('bench' || n))"
psql "$CQRS_PG_DSN" -qAt >/dev/null <<SQL
INSERT INTO products(id, sku, name, description, category, price_cents, currency, stock,
                     status, units_sold, version, created_at, updated_at)
SELECT md5('bench' || n)::uuid, 'BENCH-' || n, 'Bench ' || n, '', 'bench', 100, 'EUR',
       1000000, 'active', 0, 1, now(), now()
  FROM generate_series(1, $PRODUCTS) n
ON CONFLICT (id) DO UPDATE SET stock = 1000000;
SQL
psql "$CQRS_PG_DSN" -qAt -c "SELECT md5('bench' || n)::uuid FROM generate_series(1, $PRODUCTS) n" >"$OUT/ids"

# The daemon runs during both measurements, so its relay drains the outbox rows of both.
CQRS_HTTP_PORT=$PORT CQRS_HTTP_THREADS=$CLIENTS CQRS_PG_POOL_SIZE=$CLIENTS CQRS_LOG_LEVEL=warn \
    build/cmd/cqrs-commandd >"$OUT/commandd.log" 2>&1 &
DPID=$!
trap 'kill $DPID 2>/dev/null; wait $DPID 2>/dev/null' EXIT
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done

echo "== pgbench: the same transaction, prepared statements, $CLIENTS clients, ${DURATION}s"
pgbench "$CQRS_PG_DSN" -n -M prepared -c "$CLIENTS" -j 2 -T "$DURATION" -D products="$PRODUCTS" \
    -D idseed=bench -D topic=cqrs.product.events -f tests/bench/adjust_stock.sql >"$OUT/pgbench.txt" 2>&1
PG_TPS=$(grep -E '^tps' "$OUT/pgbench.txt" | head -1 | sed -E 's/tps = ([0-9.]+).*/\1/')
grep -E 'latency average|^tps|failed' "$OUT/pgbench.txt" || true

echo "== cqrs-commandd: POST /v1/products/{id}/stock-adjustments, $CLIENTS connections, ${DURATION}s"
BENCH_IDS="$OUT/ids" wrk -t2 -c"$CLIENTS" -d"${DURATION}s" -s tests/bench/adjust_stock.lua \
    "http://127.0.0.1:$PORT" >"$OUT/wrk.txt" 2>&1
CQ_RPS=$(grep -E '^Requests/sec' "$OUT/wrk.txt" | awk '{print $2}')
grep -E 'Requests/sec|non-2xx|p50' "$OUT/wrk.txt" || true

echo
printf 'pgbench (database ceiling): %8.0f tx/s\n' "$PG_TPS"
printf 'cqrs-commandd AdjustStock:  %8.0f commands/s\n' "$CQ_RPS"
awk -v a="$CQ_RPS" -v b="$PG_TPS" 'BEGIN { printf "ratio:                      %8.2f\n", a / b }'
echo "(raw output in $OUT)"
