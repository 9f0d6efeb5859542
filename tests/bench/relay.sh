#!/usr/bin/env bash
# tests/bench/relay.sh — the outbox relay's throughput and latency (not a test: nothing is
# asserted).
#   1. Drain: 100,000 events written straight into the event log and outbox while no relay
#      runs, then one cqrs-commandd relays them; events per second until the outbox is empty.
#   2. Latency: AdjustStock at a steady ~1,000 commands/s (wrk, paced by a per-request delay);
#      commit → Kafka acknowledgement p50/p99 from the relay's histogram
#      (cqrs_relay_publish_latency_seconds; bucket bounds, so read "≤").
#   Both over an event log of LOG_EVENTS historical events (default 0; tests/bench/fill_log.sh
#   makes that database once and keeps it): the relay's statements must cost in proportion to
#   the batch, not to the log, so the figures must not move with LOG_EVENTS. Printed too: the
#   relay's own step times during the drain (cqrs_relay_round_phase_seconds: read, produce,
#   ack, record, commit, delete; bucket bounds, so read "≤").
# Uses the local dev stack and a Release build in build/.
#   EVENTS=100000 RATE_SECONDS=20 LOG_EVENTS=10000000 tests/bench/relay.sh
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
EVENTS=${EVENTS:-100000}
RATE_SECONDS=${RATE_SECONDS:-20}
LOG_EVENTS=${LOG_EVENTS:-0}
PORT=${BENCH_PORT:-18182}
PREFIX=bench$RANDOM
OUT=$(mktemp -d /tmp/cqrs-bench-relay.XXXXXX)

command -v wrk >/dev/null || { [ "$(id -u)" -eq 0 ] && apt-get install -y -qq wrk >/dev/null; }
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCQRS_BUILD_TESTS=OFF \
    -DCQRS_DEPS_PREFIX="$(deploy/local/libs.sh)" >/dev/null
ninja -C build >/dev/null
deploy/local/stack.sh up >/dev/null 2>&1
eval "$(deploy/local/stack.sh env)"
CQRS_TOPIC_PREFIX=$PREFIX build/cmd/cqrsctl migrate >/dev/null
if [ "$LOG_EVENTS" -gt 0 ]; then
    CQRS_PG_DSN=$(CQRSCTL=build/cmd/cqrsctl tests/bench/fill_log.sh "$LOG_EVENTS")
    export CQRS_PG_DSN
fi
echo "== event log: $(psql "$CQRS_PG_DSN" -Atc 'SELECT count(*) FROM events') events before the run"
if [ "$(psql "$CQRS_PG_DSN" -Atc 'SELECT count(*) FROM outbox')" != 0 ]; then
    echo "the outbox is not empty: stop other cqrs-commandd instances of this stack first" >&2
    exit 1
fi

echo "== writing $EVENTS events into the outbox (1,000 aggregates)"
psql "$CQRS_PG_DSN" -q <<SQL
WITH x AS (
  SELECT gen_random_uuid() AS event_id, md5('relaybench-$PREFIX-' || (n % 1000))::uuid AS agg,
         1000000 + n / 1000 AS version, n
    FROM generate_series(0, $EVENTS - 1) n)
, e AS (
  INSERT INTO events(event_id, aggregate_type, aggregate_id, version, event_type, occurred_at,
                     data)
  SELECT event_id, 'benchmark', agg, version, 'benchmark.happened.v1', now(),
         jsonb_build_object('n', n, 'padding', repeat('x', 200))
    FROM x ORDER BY n
  RETURNING sequence)
INSERT INTO outbox(sequence, topic) SELECT sequence, '$PREFIX.product.events' FROM e;
SQL

start_relay() {
    CQRS_HTTP_PORT=$PORT CQRS_TOPIC_PREFIX=$PREFIX CQRS_LOG_LEVEL=warn \
        CQRS_RELAY_BATCH_SIZE=${BATCH:-2000} build/cmd/cqrs-commandd >>"$OUT/commandd.log" 2>&1 &
    DPID=$!
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
}
trap 'kill ${DPID:-0} 2>/dev/null || true' EXIT

echo "== drain"
T0=$(date +%s.%N)
start_relay
while [ "$(psql "$CQRS_PG_DSN" -Atc 'SELECT count(*) FROM outbox')" != 0 ]; do sleep 0.2; done
T1=$(date +%s.%N)
DRAIN=$(awk -v a="$T0" -v b="$T1" -v n="$EVENTS" 'BEGIN { printf "%.0f", n / (b - a) }')
echo "relayed $EVENTS events in $(awk -v a="$T0" -v b="$T1" 'BEGIN { printf "%.1f", b - a }') s: $DRAIN events/s"
# The relay's step times over the drain (bucket bounds: p50/p99 "≤").
curl -fs "http://127.0.0.1:$PORT/metrics" | awk '
  /^cqrs_relay_round_phase_seconds_bucket/ {
      match($0, /phase="[^"]+"/); ph = substr($0, RSTART + 7, RLENGTH - 8)
      match($0, /le="[^"]+"/); le = substr($0, RSTART + 4, RLENGTH - 5)
      if (!(ph in n)) order[++k] = ph
      n[ph]++; les[ph, n[ph]] = le; cnt[ph, n[ph]] = $2 }
  END {
      for (j = 1; j <= k; j++) {
          ph = order[j]; total = cnt[ph, n[ph]]; p50 = p99 = ""
          if (total == 0) continue
          for (i = 1; i <= n[ph]; i++) {
              if (p50 == "" && cnt[ph, i] >= total * 0.5) p50 = les[ph, i]
              if (p99 == "" && cnt[ph, i] >= total * 0.99) p99 = les[ph, i] }
          printf "   relay %-8s %6d rounds: p50 <= %s s, p99 <= %s s\n", ph, total, p50, p99 } }'
# By aggregate id (its index), not by type: on a long log a scan of all of it.
psql "$CQRS_PG_DSN" -q -c "DELETE FROM events WHERE aggregate_id = ANY(ARRAY(
    SELECT md5('relaybench-$PREFIX-' || n)::uuid FROM generate_series(0, 999) n))"

echo "== latency at ~1,000 commands/s for ${RATE_SECONDS}s"
kill $DPID; wait $DPID 2>/dev/null || true
psql "$CQRS_PG_DSN" -qAt >/dev/null <<SQL
INSERT INTO products(id, sku, name, description, category, price_cents, currency, stock,
                     status, units_sold, version, created_at, updated_at)
SELECT md5('bench' || n)::uuid, 'BENCH-' || n, 'Bench ' || n, '', 'bench', 100, 'EUR',
       1000000, 'active', 0, 1, now(), now()
  FROM generate_series(1, 1000) n
ON CONFLICT (id) DO UPDATE SET stock = 1000000;
SQL
psql "$CQRS_PG_DSN" -qAt -c "SELECT md5('bench' || n)::uuid FROM generate_series(1, 1000) n" >"$OUT/ids"
start_relay
# warm-up: leadership and init_transactions happen before the measured traffic
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$PORT/metrics" | grep -q '^cqrs_relay_leader 1' && break
    sleep 0.1
done
# …and the first Kafka transaction (partition registration, PID) before the measured traffic
curl -fs -o /dev/null -X POST "http://127.0.0.1:$PORT/v1/products/$(head -1 "$OUT/ids")/stock-adjustments" \
    -H 'Content-Type: application/json' -d '{"delta":1,"reason":"warm-up"}'
sleep 2
cat >"$OUT/paced.lua" <<'LUA'
local ids = {}
for line in io.lines(os.getenv("BENCH_IDS")) do ids[#ids + 1] = line end
local body = '{"delta":1,"reason":"bench"}'
local headers = {["Content-Type"] = "application/json"}
request = function()
    return wrk.format("POST", "/v1/products/" .. ids[math.random(#ids)] .. "/stock-adjustments",
                      headers, body)
end
-- 10 connections, each waiting 10 ms between requests: about 1,000 requests/s.
delay = function() return 10 end
LUA
BENCH_IDS="$OUT/ids" wrk -t2 -c10 -d"${RATE_SECONDS}s" -s "$OUT/paced.lua" "http://127.0.0.1:$PORT" >"$OUT/wrk.txt"
sleep 2
curl -s "http://127.0.0.1:$PORT/metrics" >"$OUT/metrics.txt"
RPS=$(grep -E '^Requests/sec' "$OUT/wrk.txt" | awk '{print $2}')
awk -v rps="$RPS" '
  /^cqrs_relay_publish_latency_seconds_bucket/ {
      match($0, /le="[^"]+"/); le = substr($0, RSTART + 4, RLENGTH - 5); n = $2
      les[++k] = le; cnt[k] = n }
  /^cqrs_relay_publish_latency_seconds_count/ { total = $2 }
  END {
      for (i = 1; i <= k; i++) { if (!p50 && cnt[i] >= total * 0.5) p50 = les[i];
                                 if (!p99 && cnt[i] >= total * 0.99) p99 = les[i] }
      printf "commands/s: %s\ncommit -> Kafka ack over %d events: p50 <= %s s, p99 <= %s s\n",
             rps, total, p50, p99 }' "$OUT/metrics.txt"
echo
echo "drain: $DRAIN events/s (batch ${BATCH:-2000})"
echo "(raw output in $OUT)"
