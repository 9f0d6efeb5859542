#!/usr/bin/env bash
# tests/bench/visibility.sh — the consistency window (issue 24): from a command's 2xx until its
# version arrives on a Server-Sent Event stream of cqrs-queryd, at paced rates and at the
# highest rate the pipeline sustains, next to the physical floor measured in the same run.
# Not a test: nothing is asserted.
#   1. (LOG_EVENTS > 0) the run uses a database whose event log holds LOG_EVENTS rows of
#      history (events only, already relayed: no outbox rows), made once and kept by
#      tests/bench/fill_log.sh; the table's size is printed.
#   2. The floor, before the daemons start (nothing else running):
#      - PostgreSQL: pgbench at 1 client running the AdjustStock transaction
#        (tests/bench/adjust_stock.sql) on PRODUCTS products of its own, each made with its
#        product.created.v1 event and outbox row as CreateProduct writes them (so the relay and
#        the projector take the pgbench events later like any other); p50/p99 from the
#        per-transaction log (pgbench --log).
#      - Kafka: Kafka's own org.apache.kafka.tools.EndToEndLatency from the jars the stack's
#        broker runs (deploy/local/stack.sh, KAFKA_VERSION), same broker, --producer-acks all,
#        KAFKA_RECORDS records of KAFKA_RECORD_SIZE bytes; its p50/p99 (whole milliseconds).
#   3. cqrs-commandd and cqrs-queryd (topic prefix and consumer group of their own), then
#      tests/bench/visload (Go, standard library): PRODUCTS products made through the command
#      API with one stream each, AdjustStock paced open loop at each of RATES, then stepping up
#      LADDER until a rate is not sustained (achieved < 95 % of paced, p99 lag > 1 s, a command
#      never visible or failing); it prints each run, the per-stage breakdown from both
#      daemons' histograms and the table with the floor ratios.
#
# Knobs (environment):
#   RATES="100,1000"  paced rates, commands/s       FIND_MAX=1   step LADDER afterwards (0: no)
#   LADDER="500,1000,1500,2000,3000,4000,6000,8000" PRODUCTS=50  products (= streams)
#   SECONDS=20        measured seconds per rate (DURATION also works; see below)
#   LOG_EVENTS=0      run over an event log of this many rows (e.g. 10000000; fill_log.sh)
#   FLOOR_SECONDS=10  pgbench duration              KAFKA_RECORDS=5000  KAFKA_RECORD_SIZE=512
#   BENCH_CPORT=18581 BENCH_QPORT=18582  daemon HTTP ports   BUILD=build  build folder
#   BUILD_JOBS=$(nproc)  ninja -j                   GO=go (else /usr/local/go/bin/go)
#   VISLOAD_ARGS=     more visload flags (e.g. "-timeline -conns 1024")
# The stack's own ports come from deploy/local/stack.sh's environment (CQRS_STACK_DIR,
# CQRS_PG_PORT, CQRS_KAFKA_PORT, …). Plain (non-TLS) stack only.
#   SECONDS=10 LOG_EVENTS=0 tests/bench/visibility.sh
#   LOG_EVENTS=10000000 tests/bench/visibility.sh
set -euo pipefail
# bash counts SECONDS up from its value at start-up (0 when the environment does not set it):
# read it before anything takes time.
DURATION=${DURATION:-$SECONDS}
((DURATION > 0)) || DURATION=20
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
RATES=${RATES:-100,1000}
RATES=${RATES// /,}
FIND_MAX=${FIND_MAX:-1}
LADDER=${LADDER:-500,1000,1500,2000,3000,4000,6000,8000}
LADDER=${LADDER// /,}
PRODUCTS=${PRODUCTS:-50}
LOG_EVENTS=${LOG_EVENTS:-0}
FLOOR_SECONDS=${FLOOR_SECONDS:-10}
KAFKA_RECORDS=${KAFKA_RECORDS:-5000}
KAFKA_RECORD_SIZE=${KAFKA_RECORD_SIZE:-512}
CPORT=${BENCH_CPORT:-18581}
QPORT=${BENCH_QPORT:-18582}
BUILD=${BUILD:-build}
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
PREFIX=vis$RANDOM
OUT=$(mktemp -d /tmp/cqrs-bench-visibility.XXXXXX)
C='' Q=''
trap 'kill $C $Q 2>/dev/null || true' EXIT

for p in $CPORT $QPORT; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        echo "port $p is taken (a previous run still going?)" >&2
        exit 1
    fi
done
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCQRS_BUILD_TESTS=OFF \
    -DCQRS_DEPS_PREFIX="$(deploy/local/libs.sh)" >/dev/null
ninja -C "$BUILD" -j "${BUILD_JOBS:-$(nproc)}" >/dev/null
BUILD=$(cd "$BUILD" && pwd)
# go.mod has no requirements: nothing to fetch (GOFLAGS=-mod=mod would not either).
(cd tests/bench/visload && GOTOOLCHAIN=local GOPROXY=off "$GO" build -o "$BUILD/visload" .)
deploy/local/stack.sh up >/dev/null 2>&1
eval "$(deploy/local/stack.sh env)"
CQRS_TOPIC_PREFIX=$PREFIX "$BUILD/cmd/cqrsctl" migrate >/dev/null
psqlq() { psql "$CQRS_PG_DSN" -X -v ON_ERROR_STOP=1 -qAt "$@"; }

# ---- 1. the event log ----------------------------------------------------------------------
# A database of its own holding LOG_EVENTS historical events (tests/bench/fill_log.sh: made
# once, kept for the next run), so the dev stack's own database stays as it is.
if ((LOG_EVENTS > 0)); then
    CQRS_PG_DSN=$(CQRSCTL="$BUILD/cmd/cqrsctl" tests/bench/fill_log.sh "$LOG_EVENTS")
    export CQRS_PG_DSN
fi
if [ "$(psqlq -c 'SELECT count(*) FROM outbox')" != 0 ]; then
    echo "note: the outbox is not empty; this run's relay will publish those rows first" >&2
fi
LOG_ROWS=$(psqlq -c 'SELECT count(*) FROM events')
LOG_SIZE=$(psqlq -c "SELECT pg_size_pretty(pg_total_relation_size('events'))")
echo "== event log: $LOG_ROWS rows, $LOG_SIZE with its indexes"

# ---- 2. the floor ------------------------------------------------------------------------------
TOPIC=$PREFIX.product.events
SEED=visfloor-$PREFIX-
echo "== floor: PostgreSQL, the AdjustStock transaction at 1 client for ${FLOOR_SECONDS}s (pgbench)"
psqlq <<SQL
WITH p AS (
  INSERT INTO products (id, sku, name, description, category, price_cents, currency, stock,
                        status, units_sold, version, created_at, updated_at)
  SELECT md5('$SEED' || n)::uuid, 'FLOOR-$PREFIX-' || n, 'Floor lamp ' || n, '', 'lamps',
         1000, 'EUR', 10, 'active', 0, 1, now(), now()
    FROM generate_series(1, $PRODUCTS) AS n
  RETURNING id, sku, name, price_cents, created_at)
, e AS (
  INSERT INTO events (event_id, aggregate_type, aggregate_id, version, event_type, occurred_at,
                      data)
  SELECT gen_random_uuid(), 'product', id, 1, 'product.created.v1', created_at,
         jsonb_build_object('product_id', id, 'sku', sku, 'name', name, 'description', '',
                            'category', 'lamps', 'price_cents', price_cents, 'currency', 'EUR',
                            'initial_stock', 10)
    FROM p
  RETURNING sequence)
INSERT INTO outbox (sequence, topic) SELECT sequence, '$TOPIC' FROM e;
SQL
mkdir -p "$OUT/pgbench"
pgbench "$CQRS_PG_DSN" -n -M prepared -c 1 -j 1 -T "$FLOOR_SECONDS" -D products="$PRODUCTS" \
    -D idseed="$SEED" -D topic="$TOPIC" --log --log-prefix="$OUT/pgbench/tx" \
    -f tests/bench/adjust_stock.sql >"$OUT/pgbench.txt" 2>&1 ||
    { echo "pgbench failed: see $OUT/pgbench.txt" >&2; exit 1; }
# The per-transaction log: client, transaction, latency (µs), script, epoch s, µs.
read -r PG_N PG_P50 PG_P99 < <(cat "$OUT"/pgbench/tx.* | awk '{print $3}' | sort -n | awk '
    { v[NR] = $1 }
    END { i50 = int(NR * 0.50 + 0.999999); i99 = int(NR * 0.99 + 0.999999)
          printf "%d %.3f %.3f\n", NR, v[i50] / 1000, v[i99] / 1000 }')
echo "   $PG_N transactions ($(grep -E '^tps' "$OUT/pgbench.txt" | sed -E 's/tps = ([0-9.]+).*/\1/') tx/s): p50 $PG_P50 ms, p99 $PG_P99 ms"

KAFKA_VERSION=$(sed -n 's/^KAFKA_VERSION=//p' deploy/local/stack.sh)
KAFKA_LIBS=${CQRS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cqrs}/kafka-$KAFKA_VERSION/libs
echo "== floor: Kafka $KAFKA_VERSION end to end (EndToEndLatency, acks=all, $KAFKA_RECORDS × $KAFKA_RECORD_SIZE bytes)"
"${JAVA:-java}" -Xms64m -Xmx256m -cp "$KAFKA_LIBS/*" org.apache.kafka.tools.EndToEndLatency \
    --bootstrap-server "$CQRS_KAFKA_BROKERS" --topic "$PREFIX.e2e-latency" \
    --num-records "$KAFKA_RECORDS" --producer-acks all --record-size "$KAFKA_RECORD_SIZE" \
    >"$OUT/e2e.txt" 2>&1 || { echo "EndToEndLatency failed: see $OUT/e2e.txt" >&2; exit 1; }
# "Percentiles: 50th = 3, 99th = 47, 99.9th = 134" (ms)
read -r K_P50 K_P99 < <(sed -nE 's/^Percentiles: 50th = ([0-9.]+), 99th = ([0-9.]+).*/\1 \2/p' "$OUT/e2e.txt") ||
    { echo "EndToEndLatency printed no percentiles: see $OUT/e2e.txt" >&2; exit 1; }
echo "   $(grep -E '^Avg latency' "$OUT/e2e.txt"); p50 $K_P50 ms, p99 $K_P99 ms" \
    "(the tool's percentiles are whole milliseconds, rounded down)"
"${JAVA:-java}" -Xmx128m -cp "$KAFKA_LIBS/*" org.apache.kafka.tools.TopicCommand \
    --bootstrap-server "$CQRS_KAFKA_BROKERS" --delete --topic "$PREFIX.e2e-latency" >/dev/null 2>&1 || true

# ---- 3. the pipeline ---------------------------------------------------------------------------
export CQRS_TOPIC_PREFIX=$PREFIX CQRS_CONSUMER_GROUP=$PREFIX CQRS_LOG_LEVEL=warn
CQRS_HTTP_PORT=$CPORT "$BUILD/cmd/cqrs-commandd" >"$OUT/commandd.log" 2>&1 &
C=$!
CQRS_HTTP_PORT=$QPORT "$BUILD/cmd/cqrs-queryd" >"$OUT/queryd.log" 2>&1 &
Q=$!
for p in $CPORT $QPORT; do
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$p/readyz" >/dev/null && break; sleep 0.1; done
done
# The floor's events go out first (outbox order); start from an empty outbox.
for _ in $(seq 600); do
    [ "$(psqlq -c 'SELECT count(*) FROM outbox')" = 0 ] && break
    sleep 0.1
done
FIND=()
[ "$FIND_MAX" = 1 ] && FIND=(-find-max -ladder "$LADDER")
# shellcheck disable=SC2086 # VISLOAD_ARGS: flags, split on purpose
"$BUILD/visload" -command "http://127.0.0.1:$CPORT" -query "http://127.0.0.1:$QPORT" \
    -products "$PRODUCTS" -seconds "${DURATION}s" -rates "$RATES" "${FIND[@]}" \
    -sku-prefix "VIS-$PREFIX" -json "$OUT/visload.jsonl" -label "log_events=$LOG_ROWS" \
    -floor-pg-p50 "$PG_P50" -floor-pg-p99 "$PG_P99" -floor-kafka-p50 "$K_P50" \
    -floor-kafka-p99 "$K_P99" ${VISLOAD_ARGS:-} | tee "$OUT/visload.txt"
echo
echo "$(date -u +%F), event log $LOG_ROWS rows ($LOG_SIZE), $PRODUCTS products, ${DURATION}s per rate," \
    "pgbench $PG_N tx, Kafka $KAFKA_RECORDS records"
echo "(raw output in $OUT: visload.txt, visload.jsonl — one JSON object per run —, pgbench/, e2e.txt, daemon logs)"
