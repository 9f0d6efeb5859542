#!/usr/bin/env bash
# tests/fault/run.sh — the fault-injection suite (tests/fault/fault.py) on a stack of its own.
#
# The suite SIGKILLs, pauses and empties servers, so it never runs on a stack someone else
# uses: this script starts a fresh one (its own folder and free ports), runs the suite against
# it and always purges it, also on failure or Ctrl-C. A server that cannot be started is a
# failure (exit non-zero), never a skip. The stack includes a Redis replica (stack.sh up
# --redis-replica), which the Redis failover scenarios promote.
#
#   tests/fault/run.sh BUILD_DIR [fault.py options]     e.g. --scenario kafka-kill --seed 42
#   tests/fault/run.sh BUILD_DIR --replicated [options] the replicated-server scenarios, on a stack
#                                                       with three Kafka brokers (up --kafka-brokers 3)
#                                                       and a PostgreSQL standby (--pg-standby)
#   tests/fault/run.sh BUILD_DIR --cluster [options]    the Redis Cluster scenarios, on a stack with a
#                                                       six-node Redis Cluster (up --redis-cluster)
#   CQRS_FAULT_LONG=1 tests/fault/run.sh BUILD_DIR      more rounds, longer load
#
# BUILD_DIR must be a -DCQRS_ENABLE_FAILPOINTS=ON build (tests/run.sh's build-asan is).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD=${1:?usage: tests/fault/run.sh BUILD_DIR [fault.py options]}
shift
# --replicated (first after BUILD_DIR): three Kafka brokers and a PostgreSQL standby; --cluster:
# a Redis Cluster instead of the replica. fault.py gets the option too.
UP_OPTS=(--redis-replica)
RESULTS=$BUILD/fault-results.txt
if [[ ${1:-} == --replicated ]]; then
    UP_OPTS=(--redis-replica --kafka-brokers 3 --pg-standby)
    RESULTS=$BUILD/fault-results-replicated.txt
elif [[ ${1:-} == --cluster ]]; then
    UP_OPTS=(--redis-cluster)
    RESULTS=$BUILD/fault-results-cluster.txt
fi

# shellcheck source=tests/support/ports.sh
. "$(dirname "${BASH_SOURCE[0]}")/../support/ports.sh"

# Nothing of a caller's stack: tests/run.sh exports its own Redis Cluster's settings, which would
# name that cluster's ports here (stack.sh up --redis-cluster would take them, fault.py its seed).
unset CQRS_REDIS_CLUSTER_URL CQRS_REDIS_CLUSTER_PORT CQRS_REDIS_CLUSTER_PORTS CQRS_REDIS_CLUSTER_BUS_PORTS
unset CQRS_REDIS_REPLICA_URL CQRS_KAFKA_BROKER_COUNT

STACK_DIR=$(mktemp -d /tmp/cqrs-fault.XXXXXX)
chmod 755 "$STACK_DIR" # PostgreSQL runs as its own user under root
export CQRS_STACK_DIR=$STACK_DIR
CQRS_PG_PORT=$(free_port)
CQRS_REDIS_PORT=$(free_port)
CQRS_REDIS_REPLICA_PORT=$(free_port)
CQRS_KAFKA_PORT=$(free_port)
CQRS_KAFKA_CONTROLLER_PORT=$(free_port)
export CQRS_PG_PORT CQRS_REDIS_PORT CQRS_REDIS_REPLICA_PORT CQRS_KAFKA_PORT CQRS_KAFKA_CONTROLLER_PORT
if [[ ${1:-} == --cluster ]]; then
    # six client ports and six cluster bus ports, none of the others (as tests/run.sh)
    read -r -a cluster_ports <<<"$(free_ports 12 "$CQRS_PG_PORT" "$CQRS_REDIS_PORT" "$CQRS_REDIS_REPLICA_PORT" \
        "$CQRS_KAFKA_PORT" "$CQRS_KAFKA_CONTROLLER_PORT")"
    export CQRS_REDIS_CLUSTER_PORTS="${cluster_ports[*]:0:6}"
    export CQRS_REDIS_CLUSTER_BUS_PORTS="${cluster_ports[*]:6:6}"
fi
if [[ ${1:-} == --replicated ]]; then
    CQRS_KAFKA_PORT_2=$(free_port)
    CQRS_KAFKA_CONTROLLER_PORT_2=$(free_port)
    CQRS_KAFKA_PORT_3=$(free_port)
    CQRS_KAFKA_CONTROLLER_PORT_3=$(free_port)
    CQRS_PG_STANDBY_PORT=$(free_port)
    export CQRS_KAFKA_PORT_2 CQRS_KAFKA_CONTROLLER_PORT_2 CQRS_KAFKA_PORT_3 CQRS_KAFKA_CONTROLLER_PORT_3
    export CQRS_PG_STANDBY_PORT
fi

teardown() {
    local rc=$?
    trap - EXIT INT TERM
    if "$REPO/deploy/local/stack.sh" down --purge >"$STACK_DIR.down.log" 2>&1; then
        rm -f "$STACK_DIR.down.log"
    else
        echo "fault stack teardown failed, see $STACK_DIR.down.log" >&2
    fi
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

echo "==> fault stack in $STACK_DIR (pg=$CQRS_PG_PORT redis=$CQRS_REDIS_PORT" \
    "redis-replica=$CQRS_REDIS_REPLICA_PORT kafka=$CQRS_KAFKA_PORT${CQRS_REDIS_CLUSTER_PORTS:+ redis-cluster=$CQRS_REDIS_CLUSTER_PORTS})"
"$REPO/deploy/local/stack.sh" up "${UP_OPTS[@]}"
eval "$("$REPO/deploy/local/stack.sh" env)"
# The results also go to BUILD/fault-results.txt (--replicated: fault-results-replicated.txt,
# --cluster: fault-results-cluster.txt; tests/run.sh prints them at the end).
python3 "$REPO/tests/fault/fault.py" --build "$BUILD" --table "$RESULTS" "$@"
