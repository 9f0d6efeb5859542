#!/usr/bin/env bash
# Checks the deployment files where no Docker engine runs:
#   docker-compose.yml        `docker-compose config` (Debian's docker-compose)
#   deploy/k8s                `kubectl kustomize` of the base and the example overlay, every
#                             rendered object validated against the Kubernetes 1.31 schemas
#                             (kubernetes-validate --strict), the Prometheus Operator's
#                             resources of the monitoring kit by tests/monitoring/check_k8s.py
#   both                      every CQRS_* variable they set exists in a daemon's or
#                             cqrsctl's configuration table (--help)
# usage: check_deploy.sh <python with kubernetes-validate> <cqrs-commandd> <cqrs-queryd> <cqrsctl>
set -euo pipefail
PY=$1 COMMANDD=$2 QUERYD=$3 CTL=$4
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
fail=0

docker-compose -f docker-compose.yml config -q
echo "ok: docker-compose.yml is valid"

# kubernetes-validate has schemas for the built-in kinds only: for any other kind it prints a
# warning and passes the object unchecked. The Prometheus Operator's resources of the monitoring
# kit (deploy/monitoring) are checked by tests/monitoring/check_k8s.py instead; any other kind
# without a schema fails here.
CUSTOM='PrometheusRule|PodMonitor'
for k in deploy/k8s/base deploy/k8s/overlays/example deploy/k8s/overlays/production-tls; do
    kubectl kustomize "$k" >"$OUT/rendered.yaml"
    n=$(grep -c '^kind:' "$OUT/rendered.yaml")
    c=$(grep -cE "^kind: ($CUSTOM)\$" "$OUT/rendered.yaml" || true)
    "$(dirname "$PY")/kubernetes-validate" -k 1.31.0 --strict --quiet "$OUT/rendered.yaml" >"$OUT/validate.log"
    if grep -vE "Couldn't find schema for kind ($CUSTOM) with api version monitoring.coreos.com/v1 " "$OUT/validate.log"; then
        echo "FAIL: $k: kubernetes-validate could not check the objects above"
        exit 1
    fi
    echo "ok: $k renders $n objects: $((n - c)) valid for Kubernetes 1.31, $c custom resources ($CUSTOM):"
    "$PY" tests/monitoring/check_k8s.py "$OUT/rendered.yaml" | sed 's/^/    /'
    cat "$OUT/rendered.yaml" >>"$OUT/all.yaml"
done

{ "$COMMANDD" --help; "$QUERYD" --help; "$CTL" --help; } 2>&1 |
    grep -oE '^ +CQRS_[A-Z0-9_]+' | tr -d ' ' | sort -u >"$OUT/known"
grep -ohE '\bCQRS_[A-Z0-9_]+' docker-compose.yml "$OUT/all.yaml" | sort -u >"$OUT/used"
while read -r v; do
    # CQRS_X_FILE is CQRS_X's value from a file; CQRS_KAFKA_PROPERTY_<NAME> any librdkafka
    # property (the daemons' start-up check refuses unknown ones).
    case $v in
    CQRS_KAFKA_PROPERTY_*) grep -qx CQRS_KAFKA_PROPERTY_ "$OUT/known" && continue ;;
    *_FILE) grep -qx "${v%_FILE}" "$OUT/known" && continue ;;
    esac
    if ! grep -qx "$v" "$OUT/known"; then
        echo "FAIL: $v is set by the deployment files but no daemon has it"
        fail=1
    fi
done <"$OUT/used"
[ $fail -eq 0 ] && echo "ok: the $(wc -l <"$OUT/used") CQRS_* variables used all exist"
exit $fail
