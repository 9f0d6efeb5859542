#!/usr/bin/env bash
# tests/fuzz/run.sh [SECONDS] — builds the libFuzzer harnesses with clang (ASan + UBSan +
# coverage) in build-fuzz/, replays every regression case, then fuzzes each harness for
# SECONDS (default 10; tests/run.sh uses the default, run longer by hand:
# `tests/fuzz/run.sh 3600`). Seeds come from the test data; corpora grow in build-fuzz/corpus/.
# A crash leaves its input in build-fuzz/artifacts/: copy it to tests/fuzz/regressions/<harness>/
# once fixed, so it is replayed forever.
set -euo pipefail
SECONDS_EACH=${1:-10}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
B=$REPO/build-fuzz
CC=clang cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCQRS_BUILD_TESTS=OFF \
    -DCQRS_DEPS_PREFIX="$(deploy/local/libs.sh)" -DCQRS_BUILD_FUZZERS=ON -DCQRS_WERROR=ON -DCQRS_ENABLE_ASAN=ON -DCQRS_ENABLE_UBSAN=ON >/dev/null
ninja -C "$B" fuzz_command_body fuzz_event fuzz_http >"$B/ninja.log" 2>&1 ||
    { tail -n 40 "$B/ninja.log" >&2; exit 1; } # errors shown

# seeds
S=$B/seeds
rm -rf "$S" && mkdir -p "$S/command_body" "$S/event" "$S/http" "$B/artifacts"
i=0
for f in tests/data/create_product/*/*/input; do cp "$f" "$S/command_body/seed$((i++))"; done
python3 - "$S" <<'PY'
import json, sys, os
s = sys.argv[1]
cases = json.load(open("tests/data/http/commands.json"))
for n, c in enumerate(cases):
    body = c.get("body") or ""
    if len(body) < 4096:
        open(os.path.join(s, "command_body", f"case{n}"), "w").write(body)
        req = f"{c['method']} {c['path']} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body.encode())}\r\n\r\n{body}"
        open(os.path.join(s, "http", f"case{n}"), "w").write(req)
hdr = ("ce_specversion=1.0\nce_id=6f9619ff-8b86-4011-b42d-00c04fc964ff\nce_type={t}\n"
       "ce_source=/cqrs-commandd\nce_subject=aaaaaaaa-8b86-4011-b42d-00c04fc964ff\n"
       "ce_time=2026-11-26T09:50:52.123Z\nce_aggregatetype={a}\nce_aggregateversion={v}\n"
       "ce_sequence=7\nce_traceparent=00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n\n")
events = [
  ("product.created.v1", "product", 1, {"product_id": "aaaaaaaa-8b86-4011-b42d-00c04fc964ff", "sku": "A", "name": "Red lamp", "description": "Warm", "category": "c", "price_cents": 5, "currency": "EUR", "initial_stock": 3}),
  ("product.created.v2", "product", 1, {"product_id": "aaaaaaaa-8b86-4011-b42d-00c04fc964ff", "sku": "A", "name": "Red lamp", "description": "Warm", "category": "c", "price_cents": 5, "currency": "EUR", "initial_stock": 3, "weight_grams": 1250}),
  ("product.stock-reserved.v1", "product", 2, {"product_id": "x", "order_id": "y", "quantity": 2, "stock": 1}),
  ("product.details-updated.v1", "product", 2, {"name": "n", "description": "d", "category": "c"}),
  ("order.placed.v1", "order", 1, {"order_id": "o", "customer_id": "c", "items": [{"product_id": "p", "sku": "s", "name": "n", "unit_price_cents": 1, "quantity": 1, "line_total_cents": 1}], "total_cents": 1, "currency": "EUR"}),
  ("order.cancelled.v1", "order", 2, {"order_id": "o"}),
]
for n, (t, a, v, d) in enumerate(events):
    open(os.path.join(s, "event", f"seed{n}"), "w").write(hdr.format(t=t, a=a, v=v) + json.dumps(d))
PY

for h in command_body event http; do
    mkdir -p "$B/corpus/$h"
    reg=("tests/fuzz/regressions/$h"/*)
    if [ -e "${reg[0]}" ]; then
        "$B/tests/fuzz/fuzz_$h" "${reg[@]}" >"$B/$h-regressions.log" 2>&1 ||
            { echo "regression case of $h fails"; tail -30 "$B/$h-regressions.log"; exit 1; }
    fi
    "$B/tests/fuzz/fuzz_$h" -max_total_time="$SECONDS_EACH" -max_len=65536 -timeout=10 \
        -artifact_prefix="$B/artifacts/$h-" -print_final_stats=1 \
        "$B/corpus/$h" "$S/$h" >"$B/$h.log" 2>&1 ||
        { echo "fuzz_$h found a problem:"; tail -40 "$B/$h.log"; exit 1; }
    runs=$(grep -E '^stat::number_of_executed_units' "$B/$h.log" | awk '{print $2}')
    echo "fuzz_$h: $runs executions in ${SECONDS_EACH}s, corpus $(ls "$B/corpus/$h" | wc -l) inputs, no crash"
done
