#!/usr/bin/env bash
# tests/bench/reads.sh — GET /v1/products/{id} over a catalogue of 10,000 products, next to
# nginx serving the same JSON document as a static file and webdis (HTTP in front of Redis)
# reading the same document from Redis, in the same run, with the same wrk settings; plus the
# resident memory of both daemons idle and under the read load, and the end-to-end
# visibility lag (command 2xx → document readable) at a paced command rate
# (tests/bench/visload; tests/bench/visibility.sh is the full visibility benchmark). Not a test:
# nothing is asserted; ratios are printed.
#   PRODUCTS=10000 DURATION=10 RATE=1000 tests/bench/reads.sh
# Uses the local dev stack (deploy/local/stack.sh) and a Release build in build/.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
PRODUCTS=${PRODUCTS:-10000}
DURATION=${DURATION:-10}
RATE=${RATE:-1000}
THREADS=${WRK_THREADS:-2}
CONNS=${WRK_CONNECTIONS:-64}
CPORT=${BENCH_CPORT:-18381}
QPORT=${BENCH_QPORT:-18382}
NPORT=${BENCH_NGINX_PORT:-18383}
WPORT=${BENCH_WEBDIS_PORT:-18384}
PREFIX=reads$RANDOM
OUT=$(mktemp -d /tmp/cqrs-bench-reads.XXXXXX)
chmod 755 "$OUT"

need() { command -v "$1" >/dev/null || { [ "$(id -u)" -eq 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }; }
need wrk wrk
need nginx nginx-light
need webdis webdis
for p in $CPORT $QPORT $NPORT $WPORT $((QPORT + 10)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        echo "port $p is taken (a previous run still going?)" >&2
        exit 1
    fi
done
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCQRS_BUILD_TESTS=OFF \
    -DCQRS_DEPS_PREFIX="$(deploy/local/libs.sh)" >/dev/null
ninja -C build >/dev/null
(cd tests/bench/visload && GOTOOLCHAIN=local GOPROXY=off "${GO:-$(command -v go || echo /usr/local/go/bin/go)}" \
    build -o "$REPO/build/visload" .)
deploy/local/stack.sh up >/dev/null 2>&1
eval "$(deploy/local/stack.sh env)"
CQRS_TOPIC_PREFIX=$PREFIX build/cmd/cqrsctl migrate >/dev/null
export CQRS_TOPIC_PREFIX=$PREFIX CQRS_CONSUMER_GROUP=$PREFIX CQRS_LOG_LEVEL=warn
CQRS_HTTP_PORT=$CPORT build/cmd/cqrs-commandd >"$OUT/commandd.log" 2>&1 &
C=$!
CQRS_HTTP_PORT=$QPORT CQRS_HTTP_THREADS=$THREADS build/cmd/cqrs-queryd >"$OUT/queryd.log" 2>&1 &
Q=$!
N='' W=''
trap 'kill $C $Q $N $W 2>/dev/null || true' EXIT
for p in $CPORT $QPORT; do
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$p/readyz" >/dev/null && break; sleep 0.1; done
done
rss() { awk '/^VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
echo "idle RSS: cqrs-commandd $(rss $C) MB, cqrs-queryd $(rss $Q) MB" | tee "$OUT/rss.txt"

echo "== creating $PRODUCTS products"
cat >"$OUT/create.lua" <<LUA
local n = 0
local thread_id = 0
setup = function(thread) thread:set("tid", thread_id); thread_id = thread_id + 1 end
init = function() n = 0 end
request = function()
    n = n + 1
    if n > $PRODUCTS / 2 then return wrk.format("GET", "/healthz") end
    local i = tid * ($PRODUCTS / 2) + n
    local body = string.format('{"sku":"R-%s-%d","name":"Reading lamp %d","description":"A lamp for reading, in brushed steel","category":"lamps","price_cents":%d,"currency":"EUR","initial_stock":10}',
        "$PREFIX", i, i, 1000 + i)
    return wrk.format("POST", "/v1/products", {["Content-Type"] = "application/json"}, body)
end
LUA
wrk -t2 -c16 -d"$((PRODUCTS / 1500 + 8))s" -s "$OUT/create.lua" "http://127.0.0.1:$CPORT" >"$OUT/create.txt" 2>&1 || true
last=-1
for _ in $(seq 300); do
    applied=$(curl -fs "http://127.0.0.1:$QPORT/metrics" | awk '/^cqrs_projector_events_applied_total/ {print $2}')
    [ "${applied:-0}" -ge "$PRODUCTS" ] && break
    [ "${applied:-0}" -gt 0 ] && [ "$applied" = "$last" ] && break
    last=${applied:-0}
    sleep 1
done
echo "   projected: ${applied:-0}"

# The ids, for wrk to pick from; one document for nginx and webdis. Documents are
# {cqrs:<topic>:<partition>}:doc:<id> (keyspace.h); webdis gets the key, URL-encoded.
redis-cli -u "$CQRS_REDIS_URL" --scan --pattern '{cqrs:*.product.events:*}:doc:*' | head -n "$PRODUCTS" >"$OUT/keys.txt"
sed -e 's/.*:doc://' "$OUT/keys.txt" >"$OUT/ids.txt"
sed -e 's/{/%7B/g' -e 's/}/%7D/g' "$OUT/keys.txt" >"$OUT/keys-enc.txt"
ID=$(head -n 1 "$OUT/ids.txt")
mkdir -p "$OUT/www"
curl -fs "http://127.0.0.1:$QPORT/v1/products/$ID" >"$OUT/www/product.json"
echo "   $(wc -l <"$OUT/ids.txt") ids; document of $(wc -c <"$OUT/www/product.json") bytes"

cat >"$OUT/nginx.conf" <<NGINX
worker_processes $THREADS;
daemon off;
pid $OUT/nginx.pid;
error_log $OUT/nginx-error.log;
events { worker_connections 1024; }
http {
    access_log off;
    default_type application/json;
    keepalive_requests 1000000;
    # every /v1/products/<id> is answered with the one document, so nginx gets the same
    # requests (and the same wrk script) as cqrs-queryd
    server { listen 127.0.0.1:$NPORT; root $OUT/www;
             location /v1/products/ { try_files /product.json =404; } }
}
NGINX
nginx -c "$OUT/nginx.conf" -p "$OUT" &
N=$!
REDIS_PORT=$(echo "$CQRS_REDIS_URL" | sed -E 's#redis://([^@]*@)?[^:]*:([0-9]+).*#\2#')
REDIS_DB=$(echo "$CQRS_REDIS_URL" | sed -E 's#.*/([0-9]+)$#\1#')
cat >"$OUT/webdis.json" <<WEBDIS
{ "redis_host": "127.0.0.1", "redis_port": $REDIS_PORT, "database": ${REDIS_DB:-0},
  "http_host": "127.0.0.1", "http_port": $WPORT, "threads": $THREADS, "pool_size": 8,
  "daemonize": false, "websockets": false, "verbosity": 0, "logfile": "$OUT/webdis.log" }
WEBDIS
webdis "$OUT/webdis.json" &
W=$!
sleep 1

# wrk picks a random id per request (same ids for cqrs and webdis).
cat >"$OUT/ids.lua" <<'LUA'
local ids = {}
for line in io.lines(os.getenv("IDS")) do ids[#ids + 1] = line end
local fmt = os.getenv("FMT")
request = function()
    return wrk.format("GET", string.format(fmt, ids[math.random(#ids)]))
end
LUA
run() { # name url [fmt [ids file]]
    local rps
    if [ -n "${3:-}" ]; then
        rps=$(IDS=${4:-$OUT/ids.txt} FMT=$3 wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" -s "$OUT/ids.lua" "$2" | tee -a "$OUT/wrk.txt" | awk '/^Requests\/sec/ {print $2}')
    else
        rps=$(wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" "$2" | tee -a "$OUT/wrk.txt" | awk '/^Requests\/sec/ {print $2}')
    fi
    printf '%-52s %10.0f req/s\n' "$1" "$rps"
    echo "$1|$rps" >>"$OUT/results.txt"
}
echo "== $DURATION s each, wrk -t$THREADS -c$CONNS"
run "nginx, the document as a static file (baseline)" "http://127.0.0.1:$NPORT" '/v1/products/%s'
run "webdis, HGET of the document from Redis" "http://127.0.0.1:$WPORT" '/HGET/%s/json' "$OUT/keys-enc.txt"
# Under the read load: the daemon's RSS is sampled in the middle of the run.
( sleep $((DURATION / 2)); echo "loaded RSS: cqrs-queryd $(rss $Q) MB" >>"$OUT/rss.txt" ) &
SAMPLER=$!
run "cqrs-queryd GET /v1/products/{id}, 10,000 ids" "http://127.0.0.1:$QPORT" '/v1/products/%s'
CQRS_HTTP_PORT=$((QPORT + 10)) CQRS_HTTP_THREADS=$THREADS CQRS_QUERY_ROLE=serve CQRS_QUERY_CACHE_MB=0 \
    build/cmd/cqrs-queryd >"$OUT/queryd-nocache.log" 2>&1 &
Q2=$!
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$((QPORT + 10))/readyz" >/dev/null && break; sleep 0.1; done
run "cqrs-queryd without the cache (Redis per request)" "http://127.0.0.1:$((QPORT + 10))" '/v1/products/%s'
kill $Q2
echo
awk -F'|' 'NR == 1 { base = $2 } { printf "%-52s ratio to nginx: %.2f\n", $1, $2 / base }' "$OUT/results.txt"
curl -fs "http://127.0.0.1:$QPORT/metrics" | grep -E '^cqrs_cache_(hits|misses|entries|bytes)' | sed 's/^/   /'
wait "$SAMPLER"
cat "$OUT/rss.txt"

echo "== visibility lag at $RATE commands/s (command 2xx → the change arrives on a stream)"
build/visload -command "http://127.0.0.1:$CPORT" -query "http://127.0.0.1:$QPORT" -products 50 \
    -rates "$RATE" -seconds "${DURATION}s" | tee "$OUT/visibility.txt"
echo "commandd RSS after the command load: $(rss $C) MB, queryd $(rss $Q) MB"
echo "(raw output in $OUT)"
