#!/usr/bin/env bash
# tests/soak/soak.sh [SECONDS] — both daemons under steady mixed load (commands and reads, wrk)
# for SECONDS (default 60; run for hours with e.g. `tests/soak/soak.sh 14400`). Every 5 s it
# records each daemon's resident memory and open file descriptors, the outbox backlog and the
# projector's total consumer lag into soak.csv, plots them into soak.png (gnuplot), and fails
# when any of them trends upward after the warm-up (the first third): a least-squares slope
# whose rise over the measured window exceeds 10 % of the warm level (and a small floor).
# Uses the stack of the environment (CQRS_PG_DSN, …) and a Release build in build-soak/.
set -euo pipefail
DURATION=${1:-60}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
B=$REPO/build-soak
OUT=${SOAK_OUT:-$(mktemp -d /tmp/cqrs-soak.XXXXXX)}
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCQRS_BUILD_TESTS=OFF \
    -DCQRS_DEPS_PREFIX="$(deploy/local/libs.sh)" -DCQRS_WERROR=ON >/dev/null
ninja -C "$B" >"$B/ninja.log" 2>&1 || { tail -n 40 "$B/ninja.log" >&2; exit 1; } # errors shown
PREFIX=soak$RANDOM
export CQRS_TOPIC_PREFIX=$PREFIX CQRS_CONSUMER_GROUP=$PREFIX CQRS_LOG_LEVEL=warn
"$B/cmd/cqrsctl" migrate >/dev/null
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
CP=$(free_port) QP=$(free_port)
CQRS_HTTP_PORT=$CP "$B/cmd/cqrs-commandd" >"$OUT/commandd.log" 2>&1 &
C=$!
CQRS_HTTP_PORT=$QP "$B/cmd/cqrs-queryd" >"$OUT/queryd.log" 2>&1 &
Q=$!
W1='' W2=''
cleanup() { kill $C $Q ${W1:-} ${W2:-} 2>/dev/null || true; }
trap cleanup EXIT
for p in $CP $QP; do
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$p/readyz" >/dev/null && break; sleep 0.1; done
done
# 200 products to work on
for i in $(seq 200); do
    curl -fs -X POST "http://127.0.0.1:$CP/v1/products" -H 'Content-Type: application/json' \
        -d "{\"sku\":\"S-$PREFIX-$i\",\"name\":\"soak $i\",\"category\":\"c$((i % 5))\",\"price_cents\":$i,\"currency\":\"EUR\",\"initial_stock\":1000000}" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'
done >"$OUT/ids"
cat >"$OUT/commands.lua" <<'LUA'
local ids = {}
for line in io.lines(os.getenv("SOAK_IDS")) do ids[#ids + 1] = line end
local n = 0
request = function()
    n = n + 1
    local id = ids[math.random(#ids)]
    if n % 3 == 0 then
        return wrk.format("POST", "/v1/orders", {["Content-Type"] = "application/json"},
            '{"customer_id":"6f9619ff-8b86-4011-b42d-00c04fc964ff","items":[{"product_id":"' .. id .. '","quantity":1}]}')
    end
    return wrk.format("POST", "/v1/products/" .. id .. "/stock-adjustments",
        {["Content-Type"] = "application/json"}, '{"delta":1,"reason":"soak"}')
end
delay = function() return 5 end
LUA
cat >"$OUT/reads.lua" <<'LUA'
local ids = {}
for line in io.lines(os.getenv("SOAK_IDS")) do ids[#ids + 1] = line end
local n = 0
request = function()
    n = n + 1
    if n % 4 == 0 then return wrk.format("GET", "/v1/products?sort=-updated&limit=20") end
    return wrk.format("GET", "/v1/products/" .. ids[math.random(#ids)])
end
delay = function() return 2 end
LUA
SOAK_IDS="$OUT/ids" wrk -t1 -c4 -d"${DURATION}s" -s "$OUT/commands.lua" "http://127.0.0.1:$CP" >"$OUT/wrk-commands.txt" 2>&1 &
W1=$!
SOAK_IDS="$OUT/ids" wrk -t1 -c4 -d"${DURATION}s" -s "$OUT/reads.lua" "http://127.0.0.1:$QP" >"$OUT/wrk-reads.txt" 2>&1 &
W2=$!

echo "t,commandd_rss_kb,queryd_rss_kb,commandd_fds,queryd_fds,outbox_backlog,consumer_lag" >"$OUT/soak.csv"
start=$(date +%s)
while kill -0 $W1 2>/dev/null; do
    t=$(($(date +%s) - start))
    rc=$(awk '/VmRSS/ {print $2}' /proc/$C/status) rq=$(awk '/VmRSS/ {print $2}' /proc/$Q/status)
    fc=$(ls /proc/$C/fd | wc -l) fq=$(ls /proc/$Q/fd | wc -l)
    bl=$(psql "$CQRS_PG_DSN" -Atc "SELECT count(*) FROM outbox")
    lag=$(curl -fs "http://127.0.0.1:$QP/metrics" | awk '/^cqrs_projector_consumer_lag_messages/ {s += $2} END {print s + 0}')
    echo "$t,$rc,$rq,$fc,$fq,$bl,$lag" >>"$OUT/soak.csv"
    sleep 5
done
wait $W1 $W2 || true
grep -h "Requests/sec" "$OUT"/wrk-*.txt | sed 's/^/load: /'

if command -v gnuplot >/dev/null; then
    gnuplot <<GP
set datafile separator ","
set terminal png size 1200,800
set output "$OUT/soak.png"
set multiplot layout 2,2 title "cqrs soak ($DURATION s)"
set xlabel "s"
plot "$OUT/soak.csv" using 1:2 with lines title "commandd RSS (kB)", "" using 1:3 with lines title "queryd RSS (kB)"
plot "$OUT/soak.csv" using 1:4 with lines title "commandd fds", "" using 1:5 with lines title "queryd fds"
plot "$OUT/soak.csv" using 1:6 with lines title "outbox backlog"
plot "$OUT/soak.csv" using 1:7 with lines title "consumer lag"
unset multiplot
GP
fi

python3 - "$OUT/soak.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
if len(rows) < 6:
    print("soak: too few samples"); sys.exit(1)
rows = rows[len(rows) // 3:]                   # after the warm-up
floors = {"commandd_rss_kb": 4096, "queryd_rss_kb": 4096, "commandd_fds": 4, "queryd_fds": 4,
          "outbox_backlog": 200, "consumer_lag": 200}
bad = False
for col, floor in floors.items():
    ys = [float(r[col]) for r in rows]; xs = [float(r["t"]) for r in rows]
    n = len(xs); mx = sum(xs) / n; my = sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs) or 1.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    rise = slope * (xs[-1] - xs[0])
    limit = max(floor, 0.10 * ys[0])
    verdict = "flat" if rise <= limit else "TRENDS UP"
    bad |= rise > limit
    print(f"soak: {col:16s} first {ys[0]:10.0f} last {ys[-1]:10.0f} rise {rise:9.1f} (limit {limit:.0f}): {verdict}")
sys.exit(1 if bad else 0)
PY
echo "soak: data and plot in $OUT"
