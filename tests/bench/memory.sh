#!/usr/bin/env bash
# tests/bench/memory.sh — bytes per product of a topic prefix's product read model in Redis:
# `MEMORY USAGE <key> SAMPLES 0` (every element counted, not sampled) summed over every key of
# the product shards ({<redis prefix>:<topic prefix>.product.events:<p>}:…), grouped by family,
# divided by the number of product documents. Not a test: nothing is asserted.
#   tests/bench/memory.sh <topic prefix>     (Redis: CQRS_REDIS_PORT, default 16379)
# Sorted sets are listpack-encoded below zset-max-listpack-entries (128) members, so measure a
# catalogue large enough that its lists are not (tests/bench/lists.sh: 100,000 products).
set -euo pipefail
TOPIC_PREFIX=${1:?usage: memory.sh <topic prefix>}
PORT=${CQRS_REDIS_PORT:-16379}
RPREFIX=${CQRS_REDIS_PREFIX:-cqrs}
OUT=$(mktemp -d /tmp/cqrs-bench-memory.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
redis-cli -p "$PORT" --scan --pattern "{$RPREFIX:$TOPIC_PREFIX.product.events:*" >"$OUT/keys"
# one command per line; keys of this read model hold no spaces or quotes (words and
# categories are quoted anyway)
awk '{ gsub(/\\/, "\\\\"); gsub(/"/, "\\\""); printf "MEMORY USAGE \"%s\" SAMPLES 0\n", $0 }' \
    "$OUT/keys" | redis-cli -p "$PORT" >"$OUT/bytes"
paste -d '\t' "$OUT/bytes" "$OUT/keys" | awk -F '\t' '
    {
        k = $2; sub(/^\{[^}]*\}:(g[0-9]+:)?/, "", k)
        if (k ~ /^doc:/) { f = "documents (doc:<id>)"; docs++ }
        else if (k ~ /^idx:p:rec$/) f = "search records (idx:p:rec)"
        else if (k ~ /^idx:(products|p):/) f = "product lists (idx:p:*, idx:products:*)"
        else if (k ~ /^idx:(word|w):/) f = "word sets (idx:w:*, idx:word:*)"
        else if (k ~ /^idx:/) f = "other indexes (top products)"
        else f = "platform keys (offsets, meta, …)"
        bytes[f] += $1; keys[f]++; total += $1
    }
    END {
        if (!docs) { print "no product documents under this prefix"; exit 1 }
        for (f in bytes)
            printf "%-40s %8d keys %12d bytes %8.0f bytes/product\n", f, keys[f], bytes[f], bytes[f] / docs | "sort"
        close("sort")
        printf "%-40s %8d keys %12d bytes %8.0f bytes/product  (%d products)\n", "total", NR, total, total / docs, docs
    }'
