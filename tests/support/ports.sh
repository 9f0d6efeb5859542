# shellcheck shell=bash
# tests/support/ports.sh — sourced by the test scripts.
#
# The test suite's one policy for a free port, the same in C (tests/support/daemons.c
# free_port) and Python (tests/support/ports.py free_port: the fault suite, the schemathesis runner, the Prometheus e2e test): a random TCP port on 127.0.0.1 in
# [20000, 32000), that is
#   - below Linux's ephemeral range (32768+): a port inside it can be taken at any moment by an
#     outgoing connection, and a client's TIME_WAIT on it blocks a listener's bind even with
#     SO_REUSEADDR (so never bind port 0, which picks one there);
#   - none of the local stack's ports (CQRS_*_PORT): a server of the stack may be down right
#     now (a fault) and its port look free;
#   - free now: C and Python bind it; the shell, which cannot bind, checks nothing answers.

# The stack's ports, from the environment (stack.sh env), one per line.
stack_ports() {
    local v
    for v in CQRS_PG_PORT CQRS_PG_STANDBY_PORT CQRS_REDIS_PORT CQRS_REDIS_REPLICA_PORT \
        CQRS_KAFKA_PORT CQRS_KAFKA_CONTROLLER_PORT CQRS_KAFKA_PORT_2 CQRS_KAFKA_CONTROLLER_PORT_2 \
        CQRS_KAFKA_PORT_3 CQRS_KAFKA_CONTROLLER_PORT_3; do
        [[ -n ${!v:-} ]] && echo "${!v}"
    done
    # shellcheck disable=SC2086 # lists of ports, split on purpose
    printf '%s\n' ${CQRS_REDIS_CLUSTER_PORTS:-} ${CQRS_REDIS_CLUSTER_BUS_PORTS:-}
}

free_port() {
    local p stack
    stack=" $(stack_ports | tr '\n' ' ') "
    while :; do
        p=$((20000 + RANDOM % 12000))
        [[ $stack == *" $p "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return
        fi
    done
}

# free_ports N [TAKEN...]: N free ports (free_port), distinct and none of TAKEN, on one line.
free_ports() {
    local n=$1 p taken
    shift
    taken=" $* "
    while ((n > 0)); do
        p=$(free_port)
        [[ $taken == *" $p "* ]] && continue
        taken+="$p "
        printf '%s' "$p"
        n=$((n - 1))
        ((n > 0)) && printf ' '
    done
    echo
}
