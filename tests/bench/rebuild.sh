#!/usr/bin/env bash
# tests/bench/rebuild.sh — `cqrsctl rebuild` over an event log of EVENTS events (default
# 1,000,000: PRODUCTS products with a creation and EVENTS/PRODUCTS - 1 stock adjustments
# each), next to `redis-benchmark` pipelined SET on the same Redis in the same run. Prints the
# rebuild's events/s and its ratio to SETs/s. Not a test: nothing is asserted.
# Uses the local dev stack with a database of its own (cqrs_bench_rebuild, recreated) and Redis
# databases 8 (live) and 9 (scratch), flushed; a Release build in build/.
#   EVENTS=1000000 PRODUCTS=100000 tests/bench/rebuild.sh
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
EVENTS=${EVENTS:-1000000}
PRODUCTS=${PRODUCTS:-100000}
PER=$((EVENTS / PRODUCTS))
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCQRS_BUILD_TESTS=OFF \
    -DCQRS_DEPS_PREFIX="$(deploy/local/libs.sh)" >/dev/null
ninja -C build >/dev/null
deploy/local/stack.sh up >/dev/null 2>&1
eval "$(deploy/local/stack.sh env)"
DB=cqrs_bench_rebuild
psql "$CQRS_PG_DSN" -qc "DROP DATABASE IF EXISTS $DB" -qc "CREATE DATABASE $DB" >/dev/null
export CQRS_PG_DSN="${CQRS_PG_DSN/dbname=cqrs/dbname=$DB}"
REDIS_BASE=${CQRS_REDIS_URL%/*}
export CQRS_REDIS_URL=$REDIS_BASE/8 CQRS_TOPIC_PREFIX=benchrebuild
build/cmd/cqrsctl migrate --no-topics >/dev/null
echo "== writing $PRODUCTS products × $PER events = $((PRODUCTS * PER)) events into PostgreSQL"
psql "$CQRS_PG_DSN" -q <<SQL
INSERT INTO products (id, sku, name, description, category, price_cents, currency, stock, status,
                      units_sold, version, created_at, updated_at)
SELECT md5('p' || i)::uuid, 'RB-' || i, 'Bench lamp ' || i, 'steel reading lamp number ' || i,
       'cat' || (i % 50), 1000 + i, 'EUR', 10 + ($PER - 1), 'active', 0, $PER,
       timestamptz '2026-01-01' + i * interval '1 ms' + interval '1 s',
       timestamptz '2026-01-01' + i * interval '1 ms' + $PER * interval '1 s'
  FROM generate_series(1, $PRODUCTS) AS i;
INSERT INTO events (event_id, aggregate_type, aggregate_id, version, event_type, occurred_at,
                    traceparent, data)
SELECT md5('e' || i || '-' || v)::uuid, 'product', md5('p' || i)::uuid, v,
       CASE WHEN v = 1 THEN 'product.created.v1' ELSE 'product.stock-adjusted.v1' END,
       timestamptz '2026-01-01' + i * interval '1 ms' + v * interval '1 s', NULL,
       CASE WHEN v = 1 THEN jsonb_build_object('product_id', md5('p' || i)::uuid, 'sku', 'RB-' || i,
              'name', 'Bench lamp ' || i, 'description', 'steel reading lamp number ' || i,
              'category', 'cat' || (i % 50), 'price_cents', 1000 + i, 'currency', 'EUR',
              'initial_stock', 10)
            ELSE jsonb_build_object('product_id', md5('p' || i)::uuid, 'delta', 1,
              'reason', 'restock', 'stock', 10 + v - 1) END
  FROM generate_series(1, $PRODUCTS) AS i, generate_series(1, $PER) AS v;
ANALYZE events;
SQL
REDIS_PORT=$(echo "$REDIS_BASE" | sed -E 's#.*:([0-9]+)$#\1#')
redis-cli -p "$REDIS_PORT" -n 8 FLUSHDB >/dev/null
redis-cli -p "$REDIS_PORT" -n 9 FLUSHDB >/dev/null
echo "== baseline: redis-benchmark SET, pipelined 64, 2,000,000 requests, 16 clients (db 9)"
SETS=$(redis-benchmark -p "$REDIS_PORT" --dbnum 9 -t set -P 64 -n 2000000 -c 16 -r 1000000 -q |
    awk '/SET/ {for (i = 1; i <= NF; i++) if ($i ~ /^[0-9.]+$/) {print $i; exit}}')
redis-cli -p "$REDIS_PORT" -n 9 FLUSHDB >/dev/null
echo "   $SETS SET/s"
echo "== cqrsctl rebuild (live db 8, scratch db 9)"
START=$(date +%s.%N)
build/cmd/cqrsctl rebuild --scratch-db 9 2>/dev/null | tee /tmp/rebuild-bench.txt
END=$(date +%s.%N)
WALL=$(echo "$END - $START" | bc -l)
RATE=$(echo "$((PRODUCTS * PER)) / $WALL" | bc -l)
printf 'rebuild wall time %.1f s → %.0f events/s end to end (switch included)\n' "$WALL" "$RATE"
printf 'ratio to redis-benchmark SET/s: %.2f\n' "$(echo "$RATE / $SETS" | bc -l)"
echo "== cqrsctl verify"
build/cmd/cqrsctl verify | tail -n 2
