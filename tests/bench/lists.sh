#!/usr/bin/env bash
# tests/bench/lists.sh — list and search requests per second over a catalogue of 100,000
# products, next to a plain document GET in the same run (the baseline); prints each rate and
# its ratio to the GET. Not a test: nothing is asserted.
# Uses the local dev stack and a Release build in build/; the catalogue is created through the
# command API (wrk) under its own topic prefix and projected by a cqrs-queryd of this run.
#   PRODUCTS=100000 DURATION=10 tests/bench/lists.sh
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
PRODUCTS=${PRODUCTS:-100000}
DURATION=${DURATION:-10}
CPORT=${BENCH_CPORT:-18281}
QPORT=${BENCH_QPORT:-18282}
PREFIX=lists$RANDOM
OUT=$(mktemp -d /tmp/cqrs-bench-lists.XXXXXX)

command -v wrk >/dev/null || { [ "$(id -u)" -eq 0 ] && apt-get install -y -qq wrk >/dev/null; }
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCQRS_BUILD_TESTS=OFF \
    -DCQRS_DEPS_PREFIX="$(deploy/local/libs.sh)" >/dev/null
ninja -C build >/dev/null
deploy/local/stack.sh up >/dev/null 2>&1
eval "$(deploy/local/stack.sh env)"
CQRS_TOPIC_PREFIX=$PREFIX build/cmd/cqrsctl migrate >/dev/null
export CQRS_TOPIC_PREFIX=$PREFIX CQRS_CONSUMER_GROUP=$PREFIX CQRS_LOG_LEVEL=warn
CQRS_HTTP_PORT=$CPORT build/cmd/cqrs-commandd >"$OUT/commandd.log" 2>&1 &
C=$!
CQRS_HTTP_PORT=$QPORT CQRS_HTTP_THREADS=4 build/cmd/cqrs-queryd >"$OUT/queryd.log" 2>&1 &
Q=$!
trap 'kill $C $Q 2>/dev/null || true' EXIT
for p in $CPORT $QPORT; do
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$p/readyz" >/dev/null && break; sleep 0.1; done
done

echo "== creating $PRODUCTS products"
cat >"$OUT/create.lua" <<LUA
local words = {"red", "green", "blue", "steel", "oak", "glass", "lamp", "kettle", "chair",
               "table", "mug", "bowl", "pan", "knife", "vase", "clock"}
local n = 0
local thread_id = 0
setup = function(thread) thread:set("tid", thread_id); thread_id = thread_id + 1 end
init = function() n = 0 end
request = function()
    n = n + 1
    -- past its half of the catalogue a thread only asks for /healthz until wrk's duration ends
    if n > $PRODUCTS / 2 then return wrk.format("GET", "/healthz") end
    local i = tid * ($PRODUCTS / 2) + n
    local name = words[i % 16 + 1] .. " " .. words[(i * 7) % 16 + 1] .. " " .. i
    local body = string.format('{"sku":"B-%s-%d","name":"%s","description":"%s","category":"cat%d","price_cents":%d,"currency":"EUR","initial_stock":10}',
        "$PREFIX", i, name, words[(i * 3) % 16 + 1], i % 50, (i * 7919) % 100000)
    return wrk.format("POST", "/v1/products", {["Content-Type"] = "application/json"}, body)
end
LUA
# long enough for the catalogue at ~2,000 commands/s; then the threads idle on /healthz
wrk -t2 -c16 -d"$((PRODUCTS / 1500 + 10))s" -s "$OUT/create.lua" "http://127.0.0.1:$CPORT" >"$OUT/create.txt" 2>&1 || true
echo "   waiting for the projection (until the applied count stops growing)"
last=-1
for _ in $(seq 600); do
    applied=$(curl -fs "http://127.0.0.1:$QPORT/metrics" | awk '/^cqrs_projector_events_applied_total/ {print $2}')
    [ "${applied:-0}" -gt 0 ] && [ "$applied" = "$last" ] && break
    last=${applied:-0}
    sleep 2
done
echo "   projected: ${applied:-0}"
echo "== memory per product (tests/bench/memory.sh $PREFIX)"
tests/bench/memory.sh "$PREFIX"
ID=$(curl -fs "http://127.0.0.1:$QPORT/v1/products?limit=1" | python3 -c 'import json,sys;print(json.load(sys.stdin)["items"][0]["id"])')

run() { # name path
    local rps
    rps=$(wrk -t2 -c16 -d"${DURATION}s" "http://127.0.0.1:$QPORT$2" | awk '/^Requests\/sec/ {print $2}')
    printf '%-44s %10.0f req/s\n' "$1" "$rps"
    echo "$1 $rps" >>"$OUT/results.txt"
}
echo "== $DURATION s each, 16 connections"
run "GET /v1/products/{id} (baseline)" "/v1/products/$ID"
run "list, name order, limit 20" "/v1/products?limit=20"
run "list, category + price order, limit 20" "/v1/products?category=cat7&sort=price&limit=20"
run "list, active, -updated, limit 100" "/v1/products?status=active&sort=-updated&limit=100"
run "search q=lamp (common word), limit 20" "/v1/products?q=lamp&limit=20"
run "search q=oak+lamp, category, limit 20" "/v1/products?q=oak+lamp&category=cat3&limit=20"
run "search q=12345 (rare word), limit 20" "/v1/products?q=12345&limit=20"
echo
awk 'NR == 1 { base = $NF } { printf "%-44s ratio to GET: %.2f\n", substr($0, 1, length($0) - length($NF) - 1), $NF / base }' "$OUT/results.txt"
echo "(raw output in $OUT)"
