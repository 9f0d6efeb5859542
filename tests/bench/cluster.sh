#!/usr/bin/env bash
# tests/bench/cluster.sh — document and list reads on the single Redis and on the local Redis
# Cluster (six nodes: three primaries, three replicas) in the same run, for read models of
# 1, 3, 6, 12 and 24 shards (the topics' partition counts): requests/s of a document GET and of
# two list pages, and the Redis commands one list page costs (every shard is read and merged).
# Prints a table and the cluster/single ratios. Not a test: nothing is asserted.
#   PRODUCTS=20000 DURATION=5 SHARDS="1 3 6 12 24" tests/bench/cluster.sh
# The catalogue (PRODUCTS products, each a creation and a stock adjustment) is written into a
# database of its own (cqrs_bench_cluster, recreated) and each read model is made by
# `cqrsctl rebuild` (after a cqrs-queryd recorded the layout of topics of that many
# partitions), under a Redis prefix of its own (bc<shards>s / bc<shards>c, deleted first).
# cqrs-queryd serves with its document cache off (CQRS_QUERY_CACHE_MB=0): every request goes
# to Redis. Uses the local dev stack with its Redis Cluster and a Release build in build/.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
PRODUCTS=${PRODUCTS:-20000}
DURATION=${DURATION:-5}
SHARDS=${SHARDS:-1 3 6 12 24}
QPORT=${BENCH_QPORT:-18582}
OUT=$(mktemp -d /tmp/cqrs-bench-cluster.XXXXXX)

command -v wrk >/dev/null || { [ "$(id -u)" -eq 0 ] && apt-get install -y -qq wrk >/dev/null; }
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCQRS_BUILD_TESTS=OFF \
    -DCQRS_DEPS_PREFIX="$(deploy/local/libs.sh)" >/dev/null
ninja -C build >/dev/null
deploy/local/stack.sh up --redis-cluster >/dev/null 2>&1
eval "$(deploy/local/stack.sh env)"
SINGLE_URL=$CQRS_REDIS_URL
SINGLE_PORT=$(echo "$SINGLE_URL" | sed -E 's#redis://([^@]*@)?[^:]*:([0-9]+).*#\2#')
SINGLE_DB=$(echo "$SINGLE_URL" | sed -E 's#.*/([0-9]+)$#\1#')
read -r -a CLUSTER_PORTS <<<"$CQRS_REDIS_CLUSTER_PORTS"
DB=cqrs_bench_cluster
psql "$CQRS_PG_DSN" -qc "DROP DATABASE IF EXISTS $DB" -qc "CREATE DATABASE $DB" >/dev/null
export CQRS_PG_DSN="${CQRS_PG_DSN/dbname=cqrs/dbname=$DB}" CQRS_LOG_LEVEL=warn
Q=
trap 'kill $Q 2>/dev/null || true' EXIT
CQRS_TOPIC_PREFIX=bcmigrate build/cmd/cqrsctl migrate --no-topics >/dev/null
echo "== writing $PRODUCTS products × 2 events into PostgreSQL"
psql "$CQRS_PG_DSN" -q <<SQL
INSERT INTO products (id, sku, name, description, category, price_cents, currency, stock, status,
                      units_sold, version, created_at, updated_at)
SELECT md5('p' || i)::uuid, 'CL-' || i, 'lamp ' || i, 'steel reading lamp number ' || i,
       'cat' || (i % 50), (i * 7919) % 100000, 'EUR', 11, 'active', 0, 2,
       timestamptz '2026-01-01' + i * interval '1 ms' + interval '1 s',
       timestamptz '2026-01-01' + i * interval '1 ms' + interval '2 s'
  FROM generate_series(1, $PRODUCTS) AS i;
INSERT INTO events (event_id, aggregate_type, aggregate_id, version, event_type, occurred_at,
                    traceparent, data)
SELECT md5('e' || i || '-' || v)::uuid, 'product', md5('p' || i)::uuid, v,
       CASE WHEN v = 1 THEN 'product.created.v1' ELSE 'product.stock-adjusted.v1' END,
       timestamptz '2026-01-01' + i * interval '1 ms' + v * interval '1 s', NULL,
       CASE WHEN v = 1 THEN jsonb_build_object('product_id', md5('p' || i)::uuid, 'sku', 'CL-' || i,
              'name', 'lamp ' || i, 'description', 'steel reading lamp number ' || i,
              'category', 'cat' || (i % 50), 'price_cents', (i * 7919) % 100000,
              'currency', 'EUR', 'initial_stock', 10)
            ELSE jsonb_build_object('product_id', md5('p' || i)::uuid, 'delta', 1,
              'reason', 'restock', 'stock', 11) END
  FROM generate_series(1, $PRODUCTS) AS i, generate_series(1, 2) AS v;
ANALYZE events;
SQL

# Commands processed by the Redis of a target so far (the cluster: summed over its nodes).
commands() {
    local ports=("$SINGLE_PORT")
    [ "$1" = cluster ] && ports=("${CLUSTER_PORTS[@]}")
    for p in "${ports[@]}"; do
        redis-cli -p "$p" INFO stats | awk -F: '/^total_commands_processed/ {print $2 + 0}'
    done | awk '{ s += $1 } END { print s }'
}
# Deletes the keys of a Redis prefix (every node of the cluster).
forget() { # target prefix
    local ports=("$SINGLE_PORT") db=(-n "$SINGLE_DB")
    [ "$1" = cluster ] && { ports=("${CLUSTER_PORTS[@]}"); db=(); }
    for p in "${ports[@]}"; do
        redis-cli -p "$p" "${db[@]}" --scan --pattern "*$2:*" |
            xargs -r -n 500 redis-cli -p "$p" "${db[@]}" UNLINK >/dev/null 2>&1 || true
    done
}
rate() { # path → requests/s
    wrk -t2 -c16 -d"${DURATION}s" "http://127.0.0.1:$QPORT$1" | awk '/^Requests\/sec/ {print $2}'
}
per_request() { # target path → Redis commands per request (100 requests, one at a time)
    local before after
    before=$(commands "$1")
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$QPORT$2" >/dev/null; done
    after=$(commands "$1")
    echo "$(((after - before) / 100))"
}

printf '%-8s %6s %12s %14s %14s %10s %10s\n' target shards "doc GET/s" "list name/s" \
    "list cat+price/s" "cmds/page" "cmds/doc" | tee "$OUT/table.txt"
for P in $SHARDS; do
    for T in single cluster; do
        PREFIX=bc$P${T:0:1}
        URL=$SINGLE_URL
        [ "$T" = cluster ] && URL=$CQRS_REDIS_CLUSTER_URL
        export CQRS_REDIS_URL=$URL CQRS_REDIS_PREFIX=$PREFIX CQRS_TOPIC_PREFIX=bcp$P \
            CQRS_KAFKA_PARTITIONS=$P CQRS_CONSUMER_GROUP=$PREFIX
        forget "$T" "$PREFIX"
        build/cmd/cqrsctl migrate >/dev/null
        # a projector records the layout (the topics' partition counts), then goes
        CQRS_HTTP_PORT=$QPORT build/cmd/cqrs-queryd >"$OUT/queryd-$PREFIX-layout.log" 2>&1 &
        Q=$!
        for _ in $(seq 300); do
            [ "$(redis-cli -u "$URL" -c HLEN "$PREFIX:layout" 2>/dev/null || echo 0)" -ge 2 ] && break
            sleep 0.2
        done
        kill $Q
        wait $Q || true
        build/cmd/cqrsctl rebuild --projection products >"$OUT/rebuild-$PREFIX.txt" 2>&1
        CQRS_HTTP_PORT=$QPORT CQRS_QUERY_ROLE=serve CQRS_QUERY_CACHE_MB=0 CQRS_HTTP_THREADS=2 \
            build/cmd/cqrs-queryd >"$OUT/queryd-$PREFIX.log" 2>&1 &
        Q=$!
        for _ in $(seq 100); do curl -fs "http://127.0.0.1:$QPORT/readyz" >/dev/null && break; sleep 0.1; done
        ID=$(curl -fs "http://127.0.0.1:$QPORT/v1/products?limit=1" |
            python3 -c 'import json,sys;print(json.load(sys.stdin)["items"][0]["id"])')
        DOC=$(rate "/v1/products/$ID")
        NAME=$(rate "/v1/products?limit=20")
        CAT=$(rate "/v1/products?category=cat7&sort=price&limit=20")
        CPP=$(per_request "$T" "/v1/products?limit=20")
        CPD=$(per_request "$T" "/v1/products/$ID")
        kill $Q
        wait $Q || true
        Q=
        forget "$T" "$PREFIX"
        printf '%-8s %6d %12.0f %14.0f %14.0f %10d %10d\n' "$T" "$P" "$DOC" "$NAME" "$CAT" "$CPP" \
            "$CPD" | tee -a "$OUT/table.txt"
    done
done
echo
echo "cluster / single (requests/s, same shards):"
awk 'NR > 1 { k = $2; if ($1 == "single") { d[k] = $3; n[k] = $4; c[k] = $5 }
              else printf "  %3d shards: doc GET %.2f, list name %.2f, list cat+price %.2f\n",
                          k, $3 / d[k], $4 / n[k], $5 / c[k] }' "$OUT/table.txt"
echo "(raw output in $OUT)"
