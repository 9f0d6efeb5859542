#!/usr/bin/env bash
# tests/bench/rebuild.sh — `cqrsctl rebuild` over an event log of EVENTS events (default
# 1,000,000: PRODUCTS products with a creation and EVENTS/PRODUCTS - 1 stock adjustments
# each), next to `redis-benchmark` pipelined SET on the same Redis in the same run. Prints the
# rebuild's events/s (the build phase's, and end to end until the switch) and its ratio to
# SETs/s. Not a test: nothing is asserted.
# Uses the local dev stack with a database of its own (cqrs_bench_rebuild, recreated), Redis
# database 8 (the read model, Redis prefix benchrb) and 9 (redis-benchmark), both flushed, topics
# of their own (benchrebuild.*, made by migrate), and a Release build in build/. A rebuild needs
# the layout (<prefix>:layout: each topic's partition count) that a cqrs-queryd's projector
# records from Kafka's metadata, so one runs until it is ready, then stops.
# SHAPE=interleaved (default): the log holds every product's first event, then every product's
# second, … — each aggregate is complete only in the last tenth of the log. SHAPE=grouped: each
# product's events one after the other — each is complete as soon as its last event is read (a
# rebuild writes an aggregate whole once it reaches the version its row had when the build
# began, while it goes on reading: this shape shows that overlap at its best).
#   EVENTS=1000000 PRODUCTS=100000 JOBS="1 2" SHAPE=interleaved tests/bench/rebuild.sh
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
EVENTS=${EVENTS:-1000000}
PRODUCTS=${PRODUCTS:-100000}
PER=$((EVENTS / PRODUCTS))
case ${SHAPE:=interleaved} in
interleaved) ORDER="v, i" ;;
grouped) ORDER="i, v" ;;
*) echo "SHAPE is interleaved or grouped" >&2 && exit 2 ;;
esac
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCQRS_BUILD_TESTS=OFF \
    -DCQRS_DEPS_PREFIX="$(deploy/local/libs.sh)" >/dev/null
ninja -C build >/dev/null
deploy/local/stack.sh up >/dev/null 2>&1
eval "$(deploy/local/stack.sh env)"
DB=cqrs_bench_rebuild
psql "$CQRS_PG_DSN" -qc "DROP DATABASE IF EXISTS $DB" -qc "CREATE DATABASE $DB" >/dev/null
export CQRS_PG_DSN="${CQRS_PG_DSN/dbname=cqrs/dbname=$DB}"
REDIS_BASE=${CQRS_REDIS_URL%/*}
export CQRS_REDIS_URL=$REDIS_BASE/8 CQRS_REDIS_PREFIX=benchrb CQRS_TOPIC_PREFIX=benchrebuild \
    CQRS_CONSUMER_GROUP=benchrebuild CQRS_LOG_LEVEL=warn
REDIS_PORT=$(echo "$REDIS_BASE" | sed -E 's#.*:([0-9]+)$#\1#')
redis-cli -p "$REDIS_PORT" -n 8 FLUSHDB >/dev/null
redis-cli -p "$REDIS_PORT" -n 9 FLUSHDB >/dev/null
build/cmd/cqrsctl migrate >/dev/null
QPORT=${BENCH_QPORT:-18482}
CQRS_HTTP_PORT=$QPORT build/cmd/cqrs-queryd >/tmp/rebuild-bench-queryd.log 2>&1 &
Q=$!
trap 'kill $Q 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    [ "$(redis-cli -p "$REDIS_PORT" -n 8 HLEN benchrb:layout)" -ge 2 ] && break
    sleep 0.2
done
kill $Q
wait $Q || true
echo "== layout: $(redis-cli -p "$REDIS_PORT" -n 8 HGETALL benchrb:layout | paste -sd ' ')"
echo "== writing $PRODUCTS products × $PER events = $((PRODUCTS * PER)) events into PostgreSQL ($SHAPE)"
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
  FROM generate_series(1, $PRODUCTS) AS i, generate_series(1, $PER) AS v
 ORDER BY $ORDER;
ANALYZE events;
SQL
echo "== baseline: redis-benchmark SET, pipelined 64, 2,000,000 requests, 16 clients (db 9)"
SETS=$(redis-benchmark -p "$REDIS_PORT" --dbnum 9 -t set -P 64 -n 2000000 -c 16 -r 1000000 -q |
    awk '/SET/ {for (i = 1; i <= NF; i++) if ($i ~ /^[0-9.]+$/) {print $i; exit}}')
redis-cli -p "$REDIS_PORT" -n 9 FLUSHDB >/dev/null
echo "   $SETS SET/s"
# Each --jobs value of JOBS (default "1 2") rebuilds once, back to back (a rebuild replaces the
# one before). The time to the switch (the line "switched: …"), not to the exit: after
# switching, rebuild waits out the readers' generation cache before it deletes the old one.
for J in ${JOBS:-1 2}; do
    echo "== cqrsctl rebuild --jobs $J (Redis db 8, prefix benchrb)"
    START=$(date +%s.%N)
    END=
    : >/tmp/rebuild-bench.out
    while IFS= read -r line; do
        echo "$line" >>/tmp/rebuild-bench.out
        case $line in switched:*) END=$(date +%s.%N) ;; esac
    done < <(build/cmd/cqrsctl rebuild --jobs "$J" 2>/tmp/rebuild-bench.err)
    [ -n "$END" ] || { cat /tmp/rebuild-bench.err >&2; exit 1; }
    WALL=$(echo "$END - $START" | bc -l)
    RATE=$(echo "$((PRODUCTS * PER)) / $WALL" | bc -l)
    cat /tmp/rebuild-bench.out
    grep -E '^(catch-up|phases|old generation)' /tmp/rebuild-bench.err || true
    BUILD=$(grep -oE 'in the build at [0-9]+' /tmp/rebuild-bench.out | awk '{print $NF}' | head -n 1)
    printf 'rebuild to the switch: %.1f s → %.0f events/s\n' "$WALL" "$RATE"
    printf 'ratio to redis-benchmark SET/s: %.2f end to end' "$(echo "$RATE / $SETS" | bc -l)"
    [ -n "$BUILD" ] && printf ', %.2f for the build phase alone' "$(echo "$BUILD / $SETS" | bc -l)"
    echo
done
echo "== cqrsctl verify"
build/cmd/cqrsctl verify | tail -n 2
