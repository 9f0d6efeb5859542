#!/usr/bin/env bash
# tests/bench/fill_log.sh N — a database beside the dev stack's whose event log holds N
# historical events (already relayed: rows in `events` only, the outbox empty), for benchmarks
# that must show a cost that does not grow with the log (kept forever). Made once and kept
# (database cqrs_log_<N> on the stack's PostgreSQL, migrated by this build's cqrsctl), filled
# 1,000,000 events per statement; prints its DSN on stdout, progress on stderr.
#   DSN=$(tests/bench/fill_log.sh 10000000)
# Needs the stack's environment (eval "$(deploy/local/stack.sh env)") and CQRSCTL (default
# build/cmd/cqrsctl).
set -euo pipefail
N=${1:?usage: fill_log.sh N}
CQRSCTL=${CQRSCTL:-build/cmd/cqrsctl}
DB=cqrs_log_$N
: "${CQRS_PG_DSN:?run eval \"\$(deploy/local/stack.sh env)\" first}"
DSN="$CQRS_PG_DSN dbname=$DB" # a later keyword wins in a libpq keyword/value string
say() { echo "[fill_log] $*" >&2; }

if ! psql "$CQRS_PG_DSN" -Atc "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1; then
    psql "$CQRS_PG_DSN" -qc "CREATE DATABASE $DB"
fi
CQRS_PG_DSN=$DSN "$CQRSCTL" migrate --no-topics >/dev/null
have=$(psql "$DSN" -Atc "SELECT count(*) FROM events")
if [ "$have" -lt "$N" ]; then
    say "filling $DB: $have → $N events"
    t0=$(date +%s)
    psql "$DSN" -qc "ALTER TABLE events SET (autovacuum_enabled = false)"
    while [ "$have" -lt "$N" ]; do
        step=$((N - have < 1000000 ? N - have : 1000000))
        # 100 versions per synthetic aggregate; the aggregate type is one no projection reads.
        psql "$DSN" -q <<SQL
INSERT INTO events(event_id, aggregate_type, aggregate_id, version, event_type, occurred_at,
                   data)
SELECT gen_random_uuid(), 'history', md5('history' || (n / 100))::uuid, n % 100 + 1,
       'history.recorded.v1', now() - interval '1 day',
       jsonb_build_object('n', n, 'sku', 'H-' || n, 'delta', n % 7 - 3,
                          'reason', 'restocked from the spring delivery')
  FROM generate_series($have, $have + $step - 1) n;
SQL
        have=$((have + step))
        say "  $have events ($(($(date +%s) - t0)) s)"
    done
    psql "$DSN" -qc "VACUUM ANALYZE events"
    say "filled in $(($(date +%s) - t0)) s; events: $(psql "$DSN" -Atc "SELECT pg_size_pretty(pg_total_relation_size('events'))")"
fi
# Also after an interrupted fill: never leave the kept database without autovacuum.
psql "$DSN" -qc "ALTER TABLE events RESET (autovacuum_enabled)"
echo "$DSN"
