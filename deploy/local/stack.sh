#!/usr/bin/env bash
# deploy/local/stack.sh — the native local stack (no Docker) for development
# and tests: PostgreSQL 15, Redis 7 and Apache Kafka (KRaft, combined
# broker+controller; one node, or three on request), all bound to 127.0.0.1
# on non-default ports.
#
#   stack.sh up [--redis-replica] [--redis-cluster] [--tls] [--kafka-brokers 1|3]
#               [--pg-standby]
#                            install missing Debian packages (as root), start
#                            whatever is not running, wait until each answers;
#                            --redis-replica (or CQRS_REDIS_REPLICA_PORT set)
#                            also starts a Redis replica of the Redis server;
#                            --redis-cluster also runs a six-node Redis
#                            Cluster (below), for good;
#                            --tls makes this stack the
#                            TLS-everywhere profile (below), for good;
#                            --kafka-brokers 3 makes it a three-broker Kafka
#                            cluster (below), for good;
#                            --pg-standby gives PostgreSQL a synchronous
#                            streaming standby (below), for good
#   stack.sh down [--purge]  stop the app daemons in $STATE/run/*.pid, then
#                            Kafka, the Redis Cluster, the Redis replica,
#                            Redis, PostgreSQL (both nodes); --purge deletes
#                            $STATE
#   stack.sh purge           same as down --purge
#   stack.sh stop SERVER     stop one of postgres, redis, redis-replica, kafka
#                            (with three brokers: kafka is node 1, kafka-2 and
#                            kafka-3 the others) (outage tests); `up` starts
#                            it again. With a standby: postgres is the
#                            current primary, pg-standby the current standby,
#                            pg-node1 and pg-node2 a node by number
#                            With the Redis Cluster: redis-cluster-1 … -6
#   stack.sh start SERVER    start one Kafka node (kafka, kafka-2, kafka-3) and
#                            wait until it is registered, or one Redis Cluster
#                            node (redis-cluster-N) and wait until it sees the
#                            cluster ok; nothing else (outage tests: one broker
#                            back of two down)
#   stack.sh redis-cluster-failover N [force|takeover]
#                            CLUSTER FAILOVER on a replica of the primary node
#                            N is; waits until the replica is the primary
#   stack.sh pg-promote      promote the PostgreSQL standby (failover)
#   stack.sh pg-rejoin       make the other node a standby of the primary
#   stack.sh status          one line per server; exit 0 if all up, 3 if not
#   stack.sh env             exports for: eval "$(deploy/local/stack.sh env)"
#
# Everything a stack owns (data, logs, pid files) lives in its state folder,
# ${CQRS_STACK_DIR:-<repo>/.local/stack}.  A second stack with another
# CQRS_STACK_DIR and other ports (CQRS_PG_PORT, CQRS_REDIS_PORT,
# CQRS_REDIS_REPLICA_PORT, CQRS_KAFKA_PORT, CQRS_KAFKA_CONTROLLER_PORT,
# CQRS_KAFKA_MTLS_PORT, with a standby CQRS_PG_STANDBY_PORT, with three
# brokers CQRS_KAFKA_PORT_2/_3,
# CQRS_KAFKA_CONTROLLER_PORT_2/_3, with the Redis Cluster
# CQRS_REDIS_CLUSTER_PORT or CQRS_REDIS_CLUSTER_PORTS) runs beside the first one.
#
# The Redis replica (tests of a failover: tests/fault/) is a second
# redis-server on 127.0.0.1:${CQRS_REDIS_REPLICA_PORT:-16380} with
# `replicaof` the Redis server and the same persistence (AOF), in
# $STATE/redis-replica.  `up` only starts it when it is down: a replica that
# was promoted (REPLICAOF NO ONE) or pointed elsewhere is left as it is.
# `env` exports CQRS_REDIS_REPLICA_PORT and CQRS_REDIS_REPLICA_URL while it
# runs, so a later `up` in that environment keeps starting it.
#
# The Redis Cluster (`up --redis-cluster`, remembered with its ports in
# $STATE/.redis-cluster, so a later plain `up` restarts a missing node without
# making the cluster again) runs beside the Redis server, which stays the
# daemons' default: six redis-servers (cluster-enabled, the same persistence),
# three primaries and three replicas made once by `redis-cli --cluster create
# --cluster-replicas 1`, node N in $STATE/redis-cluster-N (its nodes.conf
# there too, kept across restarts). Client ports: CQRS_REDIS_CLUSTER_PORT
# (default 17000) and the next five, or six ports listed in
# CQRS_REDIS_CLUSTER_PORTS; cluster bus ports: each client port + 100, or six
# listed in CQRS_REDIS_CLUSTER_BUS_PORTS. cluster-node-timeout
# ${CQRS_REDIS_CLUSTER_NODE_TIMEOUT_MS:-2000} ms (CQRS_REDIS_CLUSTER_NODE_TIMEOUT_MS).
# `up` waits until every node says cluster_state:ok with all 16384 slots
# served and every replica linked. `env` exports CQRS_REDIS_CLUSTER_URL (node
# 1, a seed), CQRS_REDIS_CLUSTER_PORT(S) and CQRS_REDIS_CLUSTER_BUS_PORTS while
# a node runs. Not in the TLS profile (`--tls --redis-cluster` is refused).
#
# Three Kafka brokers (`up --kafka-brokers 3`, remembered in $STATE/.kafka-brokers,
# so a later plain `up` restarts whichever node is down, in the same topology):
# nodes 1, 2, 3 in $STATE/kafka, $STATE/kafka-2, $STATE/kafka-3, clients on
# 127.0.0.1:$CQRS_KAFKA_PORT, $CQRS_KAFKA_PORT_2 (default 19192), $CQRS_KAFKA_PORT_3
# (19292), controllers on $CQRS_KAFKA_CONTROLLER_PORT, _2 (19193), _3 (19293).
# Each node is a combined broker+controller and the three form the KRaft quorum
# (three voters, formatted with --initial-controllers): the smallest setup where
# a broker *and* the active controller can each be killed while a majority
# remains. Production separates the roles (dedicated controllers, process.roles=
# controller, three or five of them, and broker-only nodes); the failure modes
# the fault suite exercises — a partition leader, a transaction or group
# coordinator, the active controller, a broker cut off — are the same.
# Durability settings: every topic and the internal ones (__consumer_offsets,
# __transaction_state, the share-group state) with replication factor 3 and
# min.insync.replicas 2, unclean leader election off (said explicitly), so an
# acks=all write (the relay's idempotent, transactional producer) survives any
# one broker. replica.lag.time.max.ms is lowered from Kafka's 30 s to
# ${CQRS_KAFKA_REPLICA_LAG_MS:-10000} ms (CQRS_KAFKA_REPLICA_LAG_MS): a stalled
# follower leaves the ISR after that long, which the outage tests wait for.
# Heap per node: CQRS_KAFKA_HEAP, default 384m with three nodes (512m with one).
# The TLS profile runs one broker only (`--tls --kafka-brokers 3` is refused).
#
# Kafka comes as jars from Maven Central (deploy/local/kafka/pom.xml), fetched
# once with Maven into a cache outside the repo,
# ${CQRS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cqrs}/kafka-<version>/libs.
#
# The TLS profile (`up --tls`): the test PKI of deploy/local/tls.sh in
# $STATE/tls, random passwords in $STATE/secrets, and every server reached
# over TLS with authentication only; `env` then exports the settings the
# daemons need (certificates, users, password files). A stack keeps the
# profile it was first started with ($STATE/tls/.profile).
# Kafka in that profile: clients only over SASL_SSL on localhost:$CQRS_KAFKA_PORT
# (SCRAM-SHA-512 user `cqrs`, password $STATE/secrets/kafka, made when the
# storage is formatted), and mutual TLS (client certificate of the test CA
# required) on localhost:${CQRS_KAFKA_MTLS_PORT:-19094}; the broker's own
# inter-broker connections use the SASL_SSL listener (user `broker`); the
# KRaft controller listener stays PLAINTEXT on 127.0.0.1 (quorum traffic, not
# a client listener: `env` never points a client at it).
# $STATE/kafka/client.properties holds what a client needs for SASL_SSL (kcat
# -F, or CQRS_KAFKA_PROPERTIES_FILE).
#
# The PostgreSQL standby (`up --pg-standby`, remembered in $STATE/pg-ha): node 1 is the
# usual server ($STATE/pg, CQRS_PG_PORT), node 2 a copy made by pg_basebackup in
# $STATE/pg-standby on 127.0.0.1:${CQRS_PG_STANDBY_PORT:-15433}, streaming; the primary
# waits for it at every commit (synchronous_standby_names). `pg-promote` fails over to
# the standby, `pg-rejoin` rebuilds the other node as its standby (pg_rewind or a fresh
# base backup); `up` never starts a node that is not the recorded primary as a primary.
# `env` then gives CQRS_PG_DSN with both nodes (libpq multi-host, node 1 first,
# target_session_attrs=read-write: the current primary). Not in the TLS profile.
#
# PostgreSQL refuses to run as root, so under root its data folder belongs to
# the `postgres` system user and initdb/pg_ctl run through `runuser`.
set -euo pipefail

KAFKA_VERSION=4.4.0

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/../.." && pwd)

STATE=${CQRS_STACK_DIR:-$REPO_DIR/.local/stack}
[[ $STATE == /* ]] || STATE=$PWD/$STATE
STATE=${STATE%/}

PG_PORT=${CQRS_PG_PORT:-15432}
REDIS_PORT=${CQRS_REDIS_PORT:-16379}
KAFKA_PORT=${CQRS_KAFKA_PORT:-19092}
KAFKA_CONTROLLER_PORT=${CQRS_KAFKA_CONTROLLER_PORT:-19093}

PG_BIN=${CQRS_PG_BIN:-/usr/lib/postgresql/15/bin}
PG_DIR=$STATE/pg
PG_DATA=$PG_DIR/data
PG_SOCK=$PG_DIR/sock
PG_LOG=$PG_DIR/postgres.log
PG_USER=cqrs
PG_DB=cqrs

# A streaming standby (`up --pg-standby`): node 1 is the folder and port above, node 2 lives in
# $STATE/pg-standby on CQRS_PG_STANDBY_PORT. Which node is the primary, and whether it waits
# for its standby (synchronous_standby_names), is recorded in $PG_HA_DIR; the roles swap on a
# failover (pg-promote), so the node numbers, not the folder names, say who is who.
PG_STANDBY_PORT=${CQRS_PG_STANDBY_PORT:-15433}
PG_HA_DIR=$STATE/pg-ha       # primary (1 or 2), sync (on or off): the topology, for good
PG_HA=0
[[ -f $PG_HA_DIR/primary ]] && PG_HA=1
PG1_DIR=$PG_DIR PG1_PORT=$PG_PORT
PG2_DIR=$STATE/pg-standby PG2_PORT=$PG_STANDBY_PORT
PG_NODE=1
PG_STANDBY_WAIT=${CQRS_PG_STANDBY_WAIT:-60}

REDIS_DIR=$STATE/redis
REDIS_PID=$REDIS_DIR/redis.pid
REDIS_LOG=$REDIS_DIR/redis.log

# The replica: started by `up --redis-replica`, or when CQRS_REDIS_REPLICA_PORT is set.
REDIS_REPLICA=0
[[ -n ${CQRS_REDIS_REPLICA_PORT:-} ]] && REDIS_REPLICA=1
REPLICA_PORT=${CQRS_REDIS_REPLICA_PORT:-16380}
REPLICA_DIR=$STATE/redis-replica
REPLICA_PID=$REPLICA_DIR/redis.pid
REPLICA_LOG=$REPLICA_DIR/redis.log
REPLICA_WAIT=${CQRS_REDIS_REPLICA_WAIT:-60}

# The Redis Cluster (`up --redis-cluster`): six nodes, node N's ports RC_PORTS[N] and
# RC_BUS_PORTS[N] (rc_load: from $RC_FILE once made, else from the environment).
RC_FILE=$STATE/.redis-cluster
RC=0
[[ -f $RC_FILE ]] && RC=1
RC_ASKED=0
RC_NAMED=
RC_COUNT=6
RC_PORTS=()
RC_BUS_PORTS=()
RC_NODE_TIMEOUT=${CQRS_REDIS_CLUSTER_NODE_TIMEOUT_MS:-2000}
RC_WAIT=${CQRS_REDIS_CLUSTER_WAIT:-60}   # up, start, failover: how long to wait for cluster_state:ok

CACHE_DIR=${CQRS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cqrs}
KAFKA_HOME=$CACHE_DIR/kafka-$KAFKA_VERSION
KAFKA_LIBS=$KAFKA_HOME/libs
KAFKA_POM=$SCRIPT_DIR/kafka/pom.xml
KAFKA_LOG4J=$SCRIPT_DIR/kafka/log4j2.xml
KAFKA_DIR=$STATE/kafka
KAFKA_DATA=$KAFKA_DIR/data
KAFKA_LOGS=$KAFKA_DIR/logs
KAFKA_CONF=$KAFKA_DIR/server.properties
KAFKA_PID=$KAFKA_DIR/kafka.pid
KAFKA_OUT=$KAFKA_LOGS/kafka.out
KAFKA_HEAP=${CQRS_KAFKA_HEAP:-}                  # default 512m, 384m with three nodes
KAFKA_WAIT=${CQRS_KAFKA_WAIT:-}                  # default 60 s, 120 s with three nodes
KAFKA_MTLS_PORT=${CQRS_KAFKA_MTLS_PORT:-19094}  # TLS profile only: the mutual-TLS listener
KAFKA_KEYSTORE=$KAFKA_DIR/server-keystore.pem    # TLS profile: server key + certificate
KAFKA_CLIENT_CONF=$KAFKA_DIR/client.properties   # TLS profile: SASL_SSL client settings
KAFKA_SCRAM_MARK=$KAFKA_DIR/scram-users          # TLS profile: formatted with SCRAM users

# Three brokers (`up --kafka-brokers 3`): node N's ports; the choice is kept in
# $STATE/.kafka-brokers. The current node of the kafka_* functions: kafka_node N.
KAFKA_NODES_FILE=$STATE/.kafka-brokers
KAFKA_NODES=1
[[ -r $KAFKA_NODES_FILE ]] && KAFKA_NODES=$(tr -dc '0-9' <"$KAFKA_NODES_FILE")
[[ $KAFKA_NODES == 3 ]] || KAFKA_NODES=1
KAFKA_NODES_ASKED=
KAFKA_PORTS=("" "$KAFKA_PORT" "${CQRS_KAFKA_PORT_2:-19192}" "${CQRS_KAFKA_PORT_3:-19292}")
KAFKA_CONTROLLER_PORTS=("" "$KAFKA_CONTROLLER_PORT" "${CQRS_KAFKA_CONTROLLER_PORT_2:-19193}"
    "${CQRS_KAFKA_CONTROLLER_PORT_3:-19293}")
KAFKA_REPLICA_LAG_MS=${CQRS_KAFKA_REPLICA_LAG_MS:-10000}
KN=1                     # the current node (kafka_node)
KN_NAME=kafka
KN_PORT=$KAFKA_PORT
KN_CONTROLLER_PORT=$KAFKA_CONTROLLER_PORT

TLS_DIR=$STATE/tls           # test PKI (deploy/local/tls.sh)
SECRETS_DIR=$STATE/secrets   # one password per server and user, 0600
TLS=0
[[ -f $TLS_DIR/.profile ]] && TLS=1 # not CQRS_STACK_TLS: `env` exports it for the tests

RUN_DIR=$STATE/run          # pid files of the app daemons (deploy/local/run.sh)
DAEMON_WAIT=${CQRS_DAEMON_STOP_WAIT:-15}

JAVA=java
KAFKA_JVM=()

# ---------------------------------------------------------------- helpers ---

log() { printf '[stack] %s\n' "$*" >&2; }

die() {
    printf '[stack] ERROR: %s\n' "$*" >&2
    exit 1
}

# die_log MESSAGE LOGFILE: fail with the last 40 lines of a server's log.
die_log() {
    printf '[stack] ERROR: %s\n' "$1" >&2
    if [[ -s $2 ]]; then
        printf '[stack] ---- last 40 lines of %s ----\n' "$2" >&2
        tail -n 40 "$2" >&2
        printf '[stack] ---- end of %s ----\n' "$2" >&2
    else
        printf '[stack] (log %s is empty or missing)\n' "$2" >&2
    fi
    exit 1
}

is_root() { [[ $EUID -eq 0 ]]; }

# Single-quote a value for the shell.
sq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# pid_alive PID [PATTERN]: the process exists (and its command line contains
# PATTERN, which guards against a recycled pid).
pid_alive() {
    local pid=$1 pattern=${2:-}
    [[ $pid =~ ^[0-9]+$ ]] && ((pid > 1)) || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [[ -z $pattern ]] && return 0
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$pattern"
}

read_pid() {
    if [[ -r $1 ]]; then head -n 1 "$1" | tr -dc '0-9'; fi
}

# port_busy PORT: something accepts TCP connections on 127.0.0.1:PORT.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# check_port NAME ACTUAL WANTED VAR: a server of this stack already runs, but
# on another port than the environment asks for (a mixed-up CQRS_* setting).
check_port() {
    [[ -z $2 || $2 == "$3" ]] && return 0
    die "$1 of $STATE already runs on port $2, not $3 ($4): fix the environment, or run 'down' first"
}

# stop_pid NAME PID SECONDS: SIGTERM, wait up to SECONDS, then SIGKILL.
stop_pid() {
    local name=$1 pid=$2 wait_s=$3 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < wait_s * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "$name (pid $pid) still running after ${wait_s}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
}

# Take the per-stack lock so two concurrent up/down runs don't race.  Every
# server is started with 9>&- so no daemon inherits (and holds) the lock.
lock_stack() {
    mkdir -p "$STATE"
    exec 9>"$STATE/.lock"
    flock -w 300 9 || die "another stack.sh is busy with $STATE (lock $STATE/.lock)"
}

# secret NAME: the password stored as $SECRETS_DIR/NAME, made (random) on first use.
secret() {
    local f=$SECRETS_DIR/$1
    if [[ ! -s $f ]]; then
        mkdir -p "$SECRETS_DIR"
        chmod 0700 "$SECRETS_DIR"
        (umask 077 && openssl rand -hex 16 >"$f")
    fi
    cat "$f"
}

# tls_prepare: the TLS profile's PKI, once.
tls_prepare() {
    ((TLS)) || return 0
    if [[ ! -f $TLS_DIR/.profile && ( -d $PG_DATA || -d $KAFKA_DATA || -d $REDIS_DIR ) ]]; then
        die "the stack in $STATE was made without --tls (its users and listeners are plain):" \
            "'$0 down --purge' first, or use another CQRS_STACK_DIR and ports"
    fi
    "$SCRIPT_DIR/tls.sh" "$TLS_DIR" || die "cannot make the test PKI in $TLS_DIR"
    touch "$TLS_DIR/.profile"
}

# ------------------------------------------------------------- packages ---

java_major() {
    "$1" -XshowSettings:properties -version 2>&1 |
        sed -n 's/^ *java\.specification\.version = \([0-9]*\).*/\1/p' | head -n 1
}

# Pick a Java >= 17: $JAVA_HOME, the one on PATH, else Debian's openjdk-17.
find_java() {
    local candidate major
    for candidate in ${JAVA_HOME:+"$JAVA_HOME/bin/java"} "$(command -v java || true)" \
        /usr/lib/jvm/java-17-openjdk-*/bin/java; do
        [[ -n $candidate && -x $candidate ]] || continue
        major=$(java_major "$candidate")
        if [[ -n $major ]] && ((major >= 17)); then
            JAVA=$candidate
            return 0
        fi
    done
    return 1
}

ensure_packages() {
    local -a missing=()
    [[ -x $PG_BIN/initdb ]] || missing+=(postgresql-15)
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v redis-cli >/dev/null || missing+=(redis-tools)
    command -v kcat >/dev/null || missing+=(kcat)
    command -v openssl >/dev/null || missing+=(openssl)
    find_java || missing+=(openjdk-17-jre-headless)
    if ! kafka_libs_ok; then
        command -v mvn >/dev/null || missing+=(maven)
    fi
    ((${#missing[@]} == 0)) && return 0

    if ! is_root; then
        die "missing packages: ${missing[*]} — run as root, or: sudo apt-get install -y ${missing[*]}"
    fi
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
        die "apt-get install ${missing[*]} failed"
    find_java || die "no Java >= 17 found even after installing openjdk-17-jre-headless"
}

# ----------------------------------------------------------- PostgreSQL ---
#
# TLS profile: ssl=on with the test PKI's server.crt/server.key (copied into the data
# folder, the key 0600 and owned by the server's user, as PostgreSQL demands), TLS 1.2 at
# least, and a pg_hba.conf with `hostssl` as the only TCP line (SCRAM password of the cqrs
# user): a plain TCP connection finds no entry and is refused. The password (`secret
# pg-cqrs`) is given to the cqrs role on every `up` and kept for clients in a libpq password
# file, $SECRETS_DIR/pgpass (0600), which the DSN names (passfile=): neither `env` nor the
# daemons' settings ever hold the password itself. The stack's own admin steps (set the
# password, create the database) use the unix socket with `local ... trust`, the socket
# reachable by the server's user (and root) only (unix_socket_permissions = 0700).

PG_PASSFILE=$SECRETS_DIR/pgpass

# Run a PostgreSQL server tool as the data folder's owner.
pg_as_owner() {
    if is_root; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

pg_pid() { read_pid "$PG_DATA/postmaster.pid"; }

pg_running() {
    local pid
    pid=$(pg_pid)
    [[ -n $pid ]] && pid_alive "$pid" postgres
}

# The port the running postmaster listens on (line 4 of postmaster.pid).
pg_actual_port() { sed -n 4p "$PG_DATA/postmaster.pid" 2>/dev/null | tr -dc '0-9'; }

# A conninfo value, single-quoted when it holds a space, a quote or a backslash.
pg_conninfo_value() {
    local v=$1
    if [[ $v =~ [[:space:]\'\\] ]]; then
        v=${v//\\/\\\\}
        v=${v//\'/\\\'}
        v="'$v'"
    fi
    printf '%s' "$v"
}

# The connection string the daemons get (CQRS_PG_DSN). TLS profile: by the certificate's
# name (localhost) with the chain and the name checked, the password in the password file.
pg_dsn() {
    if ((TLS)); then
        printf 'host=localhost port=%s dbname=%s user=%s sslmode=verify-full sslrootcert=%s passfile=%s' \
            "$PG_PORT" "$PG_DB" "$PG_USER" "$(pg_conninfo_value "$TLS_DIR/ca.crt")" \
            "$(pg_conninfo_value "$PG_PASSFILE")"
    elif ((PG_HA)); then
        # both nodes, node 1 first; libpq keeps the first that accepts writes
        printf 'host=127.0.0.1,127.0.0.1 port=%s,%s dbname=%s user=%s target_session_attrs=read-write' \
            "$PG1_PORT" "$PG2_PORT" "$PG_DB" "$PG_USER"
    else
        printf 'host=127.0.0.1 port=%s dbname=%s user=%s' "$PG_PORT" "$PG_DB" "$PG_USER"
    fi
}

# psql for the stack's own admin steps: over TCP in the plain profile; over the unix socket
# in the TLS profile, where TCP needs the password that these steps set.
pg_psql() {
    if ((TLS)); then
        "$PG_BIN/psql" -h "$PG_SOCK" -p "$PG_PORT" -U "$PG_USER" "$@"
    else
        "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" "$@"
    fi
}

# The server answers `select 1` the way the daemons connect (TLS profile: verify-full and
# the password file).
pg_answers() {
    if ((TLS)); then
        "$PG_BIN/pg_isready" -q -d "$(pg_dsn) dbname=postgres" -t 2 &&
            [[ $("$PG_BIN/psql" "$(pg_dsn) dbname=postgres" -XtAq -c 'select 1' 2>/dev/null) == 1 ]]
    else
        "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres -t 2 &&
            [[ $("$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres \
                -XtAq -c 'select 1' 2>/dev/null) == 1 ]]
    fi
}

# The server answers the admin steps' psql (the same as pg_answers in the plain profile).
pg_admin_answers() {
    if ((TLS)); then
        [[ $(pg_psql -d postgres -XtAq -c 'select 1' 2>/dev/null) == 1 ]]
    else
        pg_answers
    fi
}

# Under root the postgres user must be able to reach $PG_DIR: make each
# ancestor it cannot traverse world-searchable (o+x, not readable).
pg_fix_traversal() {
    local dir=$PG_DIR
    local -a blocked=()
    while [[ $dir != / && -n $dir ]]; do
        dir=$(dirname "$dir")
        runuser -u postgres -- test -x "$dir" || blocked+=("$dir")
    done
    if ((${#blocked[@]})); then
        log "making ${blocked[*]} traversable (o+x) for the postgres user"
        chmod o+x "${blocked[@]}"
    fi
}

pg_write_conf() {
    # Settings that follow the environment (port, paths) are rewritten on
    # every up; postgresql.conf includes this file.
    cat >"$PG_DATA/cqrs_stack.conf" <<EOF
# Written by deploy/local/stack.sh on every 'up' — edits are overwritten.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_SOCK'
max_connections = 200
shared_buffers = 128MB
fsync = on
synchronous_commit = on
timezone = 'UTC'
log_timezone = 'UTC'
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
EOF
    ((PG_HA)) && pg_write_ha_conf
    if ((TLS)); then
        cat >>"$PG_DATA/cqrs_stack.conf" <<EOF
# TLS profile
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
ssl_min_protocol_version = 'TLSv1.2'
password_encryption = 'scram-sha-256'
unix_socket_permissions = 0700
EOF
        pg_write_tls
    fi
    is_root && chown postgres:postgres "$PG_DATA/cqrs_stack.conf"
    return 0
}

# TLS profile: the server's certificate and key in the data folder, and a pg_hba.conf that
# admits TCP over TLS with a password only.
pg_write_tls() {
    local owner=()
    is_root && owner=(-o postgres -g postgres)
    install "${owner[@]}" -m 0644 "$TLS_DIR/server.crt" "$PG_DATA/server.crt"
    install "${owner[@]}" -m 0600 "$TLS_DIR/server.key" "$PG_DATA/server.key"
    cat >"$PG_DATA/pg_hba.conf" <<EOF
# Written by deploy/local/stack.sh (TLS profile) on every 'up' — edits are overwritten.
# TCP: TLS with the cqrs user's SCRAM password, nothing else. There is no 'host' line, so a
# connection without TLS finds no entry and is refused.
hostssl all $PG_USER 127.0.0.1/32 scram-sha-256
# The stack's own admin steps (stack.sh pg_psql): the unix socket, which only the server's
# user (and root) can open (unix_socket_permissions = 0700).
local   all all trust
EOF
    is_root && chown postgres:postgres "$PG_DATA/pg_hba.conf"
    chmod 0600 "$PG_DATA/pg_hba.conf"
}

# TLS profile: the cqrs role's password (set on every up, so the role and the secret never
# disagree) and the libpq password file the DSN names. The secret is hex: nothing to escape
# in SQL or in the password file. It goes to psql on stdin, never on a command line.
pg_set_password() {
    local pw
    pw=$(secret pg-cqrs)
    printf "ALTER ROLE %s PASSWORD '%s';\n" "$PG_USER" "$pw" |
        pg_psql -d postgres -XqAt -v ON_ERROR_STOP=1 -f - >/dev/null ||
        die "postgres: cannot set the password of $PG_USER"
    # Any host: a connection by another name (hostaddr=, tests of the name check) must fail
    # on the certificate, not for want of a password.
    if ! (umask 077 && printf '*:%s:*:%s:%s\n' "$PG_PORT" "$PG_USER" "$pw" >"$PG_PASSFILE.tmp" &&
        mv -f "$PG_PASSFILE.tmp" "$PG_PASSFILE"); then
        die "postgres: cannot write $PG_PASSFILE"
    fi
}

pg_init() {
    [[ -f $PG_DATA/PG_VERSION ]] && return 0
    log "postgres: initdb $PG_DATA"
    rm -rf "$PG_DATA"
    mkdir -p "$PG_DATA"
    is_root && chown postgres:postgres "$PG_DATA"
    chmod 700 "$PG_DATA"
    pg_as_owner "$PG_BIN/initdb" -D "$PG_DATA" -U "$PG_USER" -A trust \
        --encoding=UTF8 --locale=C.UTF-8 >"$PG_DIR/initdb.log" 2>&1 9>&- ||
        die_log "postgres: initdb failed" "$PG_DIR/initdb.log"
    printf "\ninclude_if_exists = 'cqrs_stack.conf'\n" >>"$PG_DATA/postgresql.conf"
}

pg_up() {
    (($(printf '%s' "$PG_SOCK/.s.PGSQL.$PG_PORT" | wc -c) < 100)) ||
        die "postgres: socket path $PG_SOCK/.s.PGSQL.$PG_PORT is too long for a unix socket; use a shorter CQRS_STACK_DIR"
    mkdir -p "$PG_DIR" "$PG_SOCK"
    touch "$PG_LOG"
    if is_root; then
        id postgres >/dev/null 2>&1 || die "postgres: system user 'postgres' missing (reinstall postgresql-common)"
        chown postgres:postgres "$PG_DIR" "$PG_SOCK" "$PG_LOG"
        pg_fix_traversal
    fi
    pg_init
    pg_write_conf

    if pg_running; then
        check_port postgres "$(pg_actual_port)" "$PG_PORT" CQRS_PG_PORT
        log "postgres: already running (pid $(pg_pid), port $PG_PORT)"
        # TLS profile: its settings and pg_hba.conf take effect without a restart
        if ((TLS)); then
            pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" reload >/dev/null 9>&- ||
                die_log "postgres: pg_ctl reload failed" "$PG_LOG"
        fi
    else
        port_busy "$PG_PORT" && die "postgres: port 127.0.0.1:$PG_PORT is already taken by another process"
        log "postgres: starting on 127.0.0.1:$PG_PORT"
        pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start >/dev/null 9>&- ||
            die_log "postgres: pg_ctl start failed" "$PG_LOG"
    fi

    local deadline=$((SECONDS + 30))
    while ((SECONDS < deadline)); do
        pg_admin_answers && break
        pg_running || die_log "postgres: server exited during startup" "$PG_LOG"
        sleep 0.5
    done
    pg_admin_answers || die_log "postgres: not answering 'select 1' on 127.0.0.1:$PG_PORT after 30s" "$PG_LOG"
    ((TLS)) && pg_set_password

    if [[ -z $(pg_psql -d postgres -XtAq \
        -c "select 1 from pg_database where datname = '$PG_DB'") ]]; then
        log "postgres: creating database $PG_DB owned by $PG_USER"
        pg_psql -d postgres -XqAt -v ON_ERROR_STOP=1 \
            -c "create database $PG_DB owner $PG_USER encoding 'UTF8'" ||
            die "postgres: create database $PG_DB failed"
    fi
    if ((TLS)); then
        # as the daemons will connect: TLS, verify-full, the password file
        pg_answers || die_log "postgres: no 'select 1' over TLS (verify-full, $PG_PASSFILE) on localhost:$PG_PORT" "$PG_LOG"
        log "postgres: ready on 127.0.0.1:$PG_PORT, TLS only (pid $(pg_pid))"
    else
        log "postgres: ready on 127.0.0.1:$PG_PORT (pid $(pg_pid))"
    fi
}

pg_down() {
    if pg_running; then
        log "postgres: stopping (pid $(pg_pid))"
        pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null 9>&- ||
            die_log "postgres: pg_ctl stop failed" "$PG_LOG"
    fi
}

# ------------------------------------------------ PostgreSQL standby (HA) ---
#
# `up --pg-standby`: two nodes, a primary and a streaming standby made by pg_basebackup from
# it, each with its own application_name (cqrs_node1, cqrs_node2). The primary lists the other
# node in synchronous_standby_names (synchronous_commit = on): a COMMIT is acknowledged once the
# standby flushed it, so an acknowledged command survives the primary's loss. Failover is
# manual, as an operator or Patroni would do it:
#   pg-promote  promotes the standby and records it as the primary; like Patroni in non-strict
#               synchronous mode its synchronous_standby_names is '' while it has no standby
#               (else every commit would wait for ever). It does not stop the old primary.
#   pg-rejoin   makes the other node a standby of the primary: stopped if it runs as a
#               primary (fenced), pg_rewind (which runs crash recovery itself after a kill),
#               a fresh pg_basebackup when that fails; started, streaming, and then the primary
#               waits for it again.
# `up` starts the recorded primary as pg_up always did; the other node only ever as a standby:
# a node running as a primary that is not the recorded one is fenced (stopped immediately) and
# rejoined, a former primary that is down is rejoined, never started as it was (split brain).
# Clients get both nodes in one libpq connection string with target_session_attrs=read-write
# (`env`): libpq tries them in order and keeps the first that accepts writes.

# pg_select N: the PG_* variables (folder, data, socket, log, port) of node N.
pg_select() {
    PG_NODE=$1
    if (($1 == 1)); then
        PG_DIR=$PG1_DIR PG_PORT=$PG1_PORT
    else
        PG_DIR=$PG2_DIR PG_PORT=$PG2_PORT
    fi
    PG_DATA=$PG_DIR/data PG_SOCK=$PG_DIR/sock PG_LOG=$PG_DIR/postgres.log
}

pg_node_port() { (($1 == 1)) && echo "$PG1_PORT" || echo "$PG2_PORT"; }

pg_app_name() { printf 'cqrs_node%s' "$1"; }

# The recorded primary (1 when none is recorded) and whether it waits for its standby.
pg_ha_primary() {
    local n
    n=$(cat "$PG_HA_DIR/primary" 2>/dev/null || true)
    [[ $n == 2 ]] && echo 2 || echo 1
}
pg_ha_sync() { [[ $(cat "$PG_HA_DIR/sync" 2>/dev/null || true) == off ]] && echo off || echo on; }

# pg_ha_record FILE VALUE: one fact of the topology, replaced atomically.
pg_ha_record() {
    mkdir -p "$PG_HA_DIR"
    printf '%s\n' "$2" >"$PG_HA_DIR/$1.tmp" && mv -f "$PG_HA_DIR/$1.tmp" "$PG_HA_DIR/$1"
}

# What the selected node's cqrs_stack.conf adds with a standby. PG_HA_PRIMARY and PG_HA_SYNC
# (set by the caller) override the recorded topology: pg-promote writes the new primary's
# settings before it records them.
pg_write_ha_conf() {
    local primary=${PG_HA_PRIMARY:-$(pg_ha_primary)} sync=${PG_HA_SYNC:-$(pg_ha_sync)}
    local other=$((3 - PG_NODE)) names=''
    if ((PG_NODE == primary)) && [[ $sync == on ]]; then
        names="FIRST 1 ($(pg_app_name "$other"))"
    fi
    cat >>"$PG_DATA/cqrs_stack.conf" <<EOF
# Streaming replication (stack.sh up --pg-standby): node $PG_NODE of 2; node $primary is the primary
wal_level = replica
wal_log_hints = on
max_wal_senders = 10
wal_keep_size = '512MB'
hot_standby = on
synchronous_standby_names = '$names'
# used while this node is a standby (standby.signal): it follows the other node
primary_conninfo = 'host=127.0.0.1 port=$(pg_node_port "$other") user=$PG_USER application_name=$(pg_app_name "$PG_NODE")'
recovery_target_timeline = 'latest'
EOF
}

# psql -c SQL on the selected node (plain profile: TCP, trust); empty when it does not answer.
pg_node_sql() {
    "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres -XtAq -c "$1" 2>/dev/null || true
}

# pg_is_in_recovery() of the selected node: t (a standby), f (a primary), empty (no answer).
pg_in_recovery() { pg_node_sql 'select pg_is_in_recovery()'; }

# The selected node's pg_stat_replication.state of standby node N (streaming once caught up).
pg_replica_state() {
    pg_node_sql "select state from pg_stat_replication where application_name = '$(pg_app_name "$1")'"
}

pg_stop_node() {
    local mode=${1:-fast}
    pg_running || return 0
    log "postgres node $PG_NODE: stopping ($mode, pid $(pg_pid))"
    pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -m "$mode" -w -t 60 stop >/dev/null 9>&- ||
        die_log "postgres node $PG_NODE: pg_ctl stop -m $mode failed" "$PG_LOG"
}

# pg_start_node [try]: pg_ctl start of the selected node; with `try`, a failure is returned.
pg_start_node() {
    port_busy "$PG_PORT" && die "postgres node $PG_NODE: port 127.0.0.1:$PG_PORT is already taken by another process"
    log "postgres node $PG_NODE: starting on 127.0.0.1:$PG_PORT"
    pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start >/dev/null 9>&- && return 0
    [[ ${1:-} == try ]] || die_log "postgres node $PG_NODE: pg_ctl start failed" "$PG_LOG"
    log "postgres node $PG_NODE: pg_ctl start failed: $(grep FATAL "$PG_LOG" | tail -n 1)"
    return 1
}

pg_node_dirs() {
    mkdir -p "$PG_DIR" "$PG_SOCK"
    touch "$PG_LOG"
    if is_root; then
        chown postgres:postgres "$PG_DIR" "$PG_SOCK" "$PG_LOG"
        pg_fix_traversal
    fi
}

# pg_basebackup_node P: the selected node's data folder, anew: a copy of node P's.
pg_basebackup_node() {
    local src_port
    src_port=$(pg_node_port "$1")
    log "postgres node $PG_NODE: pg_basebackup from node $1 (127.0.0.1:$src_port)"
    rm -rf "$PG_DATA"
    mkdir -p "$PG_DATA"
    is_root && chown postgres:postgres "$PG_DATA"
    chmod 700 "$PG_DATA"
    pg_as_owner "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$src_port" -U "$PG_USER" -D "$PG_DATA" \
        -X stream -c fast >>"$PG_DIR/basebackup.log" 2>&1 9>&- ||
        die_log "postgres node $PG_NODE: pg_basebackup from 127.0.0.1:$src_port failed" "$PG_DIR/basebackup.log"
}

# pg_rewind_node P: the selected (stopped) node's data folder rewound to node P's timeline
# (pg_rewind copies the configuration files too: pg_write_conf follows). Fails when it cannot.
pg_rewind_node() {
    local src_port
    src_port=$(pg_node_port "$1")
    log "postgres node $PG_NODE: pg_rewind from node $1 (127.0.0.1:$src_port)"
    rm -f "$PG_DATA/standby.signal"
    if pg_as_owner "$PG_BIN/pg_rewind" -D "$PG_DATA" \
        --source-server="host=127.0.0.1 port=$src_port user=$PG_USER dbname=postgres" \
        >>"$PG_DIR/rewind.log" 2>&1 9>&-; then
        log "postgres node $PG_NODE: $(grep -E 'Done!|no rewind required' "$PG_DIR/rewind.log" | tail -n 1)"
        return 0
    fi
    log "postgres node $PG_NODE: pg_rewind failed: $(tail -n 2 "$PG_DIR/rewind.log" | tr '\n' ' ')"
    return 1
}

# A killed postmaster stays a zombie until its parent (init) reaps it, and its lock files name
# it until then: PostgreSQL (pg_rewind's single-user recovery too) refuses to start while the
# pid in postmaster.pid still exists. Wait (bounded) until it is gone.
pg_wait_dead() {
    local pid i
    pid=$(pg_pid)
    [[ -n $pid ]] || return 0
    for ((i = 0; i < 600; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        pg_running && return 0 # a live postmaster after all: the caller sees it
        sleep 0.1
    done
    die "postgres node $PG_NODE: process $pid of $PG_DATA/postmaster.pid still exists after 60s"
}

# pg_standby_start [try]: start the selected node as a standby (its data as it is) of the other.
pg_standby_start() {
    pg_write_conf
    local owner=()
    is_root && owner=(-o postgres -g postgres)
    install "${owner[@]}" -m 0600 /dev/null "$PG_DATA/standby.signal"
    pg_start_node "${1:-}"
}

# pg_wait_streaming S P SECONDS: node P reports node S streaming.
pg_wait_streaming() {
    local s=$1 p=$2 deadline=$((SECONDS + $3)) node=$PG_NODE
    pg_select "$p"
    while ((SECONDS < deadline)); do
        if [[ $(pg_replica_state "$s") == streaming ]]; then
            pg_select "$node"
            return 0
        fi
        sleep 0.5
    done
    pg_select "$node"
    return 1
}

# pg_sync_set P on|off: whether node P waits for its standby (synchronous_standby_names), recorded.
pg_sync_set() {
    local p=$1 node=$PG_NODE
    pg_ha_record sync "$2"
    pg_select "$p"
    pg_write_conf
    if pg_running; then
        pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" reload >/dev/null 9>&- ||
            die_log "postgres node $p: pg_ctl reload failed" "$PG_LOG"
    fi
    pg_select "$node"
}

# pg_rejoin S P: node S becomes a streaming standby of the primary node P, whatever it was:
# stopped when it runs as a primary (fenced) or streams from nothing; pg_rewind when it was a
# primary or does not stream, a fresh base backup when that fails; then P waits for it.
pg_rejoin() {
    local s=$1 p=$2 t0=$SECONDS
    pg_select "$s"
    pg_node_dirs
    if pg_running; then
        if [[ $(pg_in_recovery) == t ]]; then
            # reload: primary_conninfo follows the environment (reloadable since PG 13)
            pg_write_conf
            pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" reload >/dev/null 9>&- || true
            if pg_wait_streaming "$s" "$p" 15; then
                pg_sync_set "$p" on
                log "postgres node $s: standby of node $p on 127.0.0.1:$PG_PORT, streaming, synchronous"
                return 0
            fi
            log "postgres node $s: a standby, but not streaming from node $p: stopping it to rewind it"
            pg_stop_node fast
        else
            log "postgres node $s: running as a primary while node $p is the recorded primary: fencing it (immediate stop)"
            pg_stop_node immediate
        fi
    fi
    pg_wait_dead
    # pg_rewind before PG 16 reads the source's timeline in its pg_control, which a promotion
    # updates only at the next checkpoint (Patroni checkpoints too): one now.
    pg_select "$p"
    pg_node_sql 'checkpoint' >/dev/null
    pg_select "$s"
    local rewound=0
    if [[ ! -f $PG_DATA/PG_VERSION ]]; then
        pg_basebackup_node "$p"
    elif [[ ! -f $PG_DATA/standby.signal ]]; then
        # a former primary: rewound to the primary's timeline before it starts as a standby
        if pg_rewind_node "$p"; then rewound=1; else pg_basebackup_node "$p"; fi
    fi
    if ! pg_standby_start try || ! pg_wait_streaming "$s" "$p" "$PG_STANDBY_WAIT"; then
        pg_stop_node immediate
        if ((rewound)); then
            log "postgres node $s: does not stream from node $p after pg_rewind: a fresh base backup"
        else
            log "postgres node $s: does not stream from node $p: rewinding it (a fresh base backup if that fails)"
            pg_rewind_node "$p" || pg_basebackup_node "$p"
            if pg_standby_start try && pg_wait_streaming "$s" "$p" "$PG_STANDBY_WAIT"; then
                pg_sync_set "$p" on
                log "postgres node $s: standby of node $p on 127.0.0.1:$PG_PORT, streaming, synchronous (in $((SECONDS - t0))s)"
                return 0
            fi
            pg_stop_node immediate
        fi
        pg_basebackup_node "$p"
        pg_standby_start
        pg_wait_streaming "$s" "$p" "$PG_STANDBY_WAIT" ||
            die_log "postgres node $s: not streaming from node $p after a fresh base backup" "$PG_LOG"
    fi
    pg_sync_set "$p" on
    log "postgres node $s: standby of node $p on 127.0.0.1:$PG_PORT, streaming, synchronous (in $((SECONDS - t0))s)"
}

# `up` with a standby: the recorded primary as pg_up starts it, the other node as its standby.
pg_ha_up() {
    ((TLS)) && die "postgres: --pg-standby is not available in the TLS profile (no replication over hostssl yet): use a plain stack"
    local p s
    if [[ ! -f $PG_HA_DIR/primary ]]; then
        pg_ha_record sync off # until its standby streams (pg_rejoin)
        pg_ha_record primary 1
    fi
    p=$(pg_ha_primary)
    s=$((3 - p))
    # Never two primaries: a node running as a primary that is not the recorded one is fenced.
    pg_select "$s"
    if pg_running && [[ $(pg_in_recovery) == f ]]; then
        log "postgres node $s: running as a primary, but node $p is the recorded primary: fencing it (immediate stop)"
        pg_stop_node immediate
    fi
    # No standby running: the primary must not wait for one while this up brings it back
    # (non-strict, as Patroni: pg_rejoin below makes it synchronous again once it streams).
    if ! pg_running && [[ $(pg_ha_sync) == on ]]; then
        log "postgres node $s (the standby) is down: node $p does not wait for it until it streams again"
        pg_ha_record sync off
        pg_select "$p"
        if pg_running; then pg_sync_set "$p" off; fi
    fi
    pg_select "$p"
    if [[ -f $PG_DATA/standby.signal ]]; then
        die "postgres node $p is the recorded primary ($PG_HA_DIR/primary) but its data is a standby's (standby.signal): finish its promotion by hand"
    fi
    ((p == 1)) || [[ -f $PG_DATA/PG_VERSION ]] ||
        die "postgres node $p is the recorded primary but has no data in $PG_DATA"
    pg_up
    # a primary made without these settings (a 1-node stack until now): wal_log_hints needs a restart
    if [[ $(pg_node_sql 'show wal_log_hints') != on ]]; then
        log "postgres node $p: restarting for wal_log_hints = on (pg_rewind)"
        pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -m fast -w -t 60 restart >/dev/null 9>&- ||
            die_log "postgres node $p: pg_ctl restart failed" "$PG_LOG"
    fi
    pg_rejoin "$s" "$p"
    pg_select 1
}

# `stack.sh pg-promote`: the standby becomes the primary, recorded; it waits for no standby.
cmd_pg_promote() {
    ((PG_HA)) || die "pg-promote: this stack has no standby ('up --pg-standby')"
    local p s t0 i
    p=$(pg_ha_primary)
    s=$((3 - p))
    pg_select "$s"
    pg_running || die "pg-promote: node $s (the standby) is not running"
    [[ $(pg_in_recovery) == t ]] || die "pg-promote: node $s is not in recovery (not a standby)"
    # its settings as the primary first: no synchronous standby to wait for
    PG_HA_PRIMARY=$s PG_HA_SYNC=off pg_write_conf
    pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" reload >/dev/null 9>&- ||
        die_log "pg-promote: pg_ctl reload of node $s failed" "$PG_LOG"
    t0=$(date +%s%N)
    log "postgres node $s: promoting"
    pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -w -t 60 promote >/dev/null 9>&- ||
        die_log "pg-promote: pg_ctl promote of node $s failed" "$PG_LOG"
    for ((i = 0; i < 600; i++)); do
        [[ $(pg_in_recovery) == f ]] && break
        sleep 0.1
    done
    [[ $(pg_in_recovery) == f ]] || die_log "pg-promote: node $s still in recovery after 60s" "$PG_LOG"
    pg_ha_record sync off
    pg_ha_record primary "$s"
    log "postgres node $s: the primary on 127.0.0.1:$PG_PORT (promoted in $((($(date +%s%N) - t0) / 1000000)) ms; synchronous_standby_names '' until a standby rejoins)"
    # the new timeline into pg_control (pg_rewind of the old primary reads it there before PG 16)
    pg_node_sql 'checkpoint' >/dev/null
    pg_select "$p"
    if pg_running; then
        log "postgres node $p (the old primary) still runs as a primary: fence it ('stop pg-node$p'), then 'pg-rejoin'"
    fi
    pg_select 1
}

# `stack.sh pg-rejoin`: the node that is not the primary becomes its synchronous standby.
cmd_pg_rejoin() {
    ((PG_HA)) || die "pg-rejoin: this stack has no standby ('up --pg-standby')"
    local p
    p=$(pg_ha_primary)
    pg_select "$p"
    pg_running && [[ $(pg_in_recovery) == f ]] || die "pg-rejoin: node $p (the recorded primary) does not run as a primary"
    pg_rejoin $((3 - p)) "$p"
    pg_select 1
}

# pg_stop_node_n N: a fast stop of node N.
pg_stop_node_n() {
    pg_select "$1"
    pg_stop_node fast
    pg_select 1
}

# ---------------------------------------------------------------- Redis ---

# Several instances share these functions: WHICH is `redis` (the server the
# daemons use), `replica` (its replica, on request) or `cluster-N` (node N of
# the Redis Cluster, on request).  redis_vars sets R_NAME, R_PORT, R_VAR,
# R_DIR, R_PID, R_LOG for one of them.
#
# In the TLS profile both listen with TLS only (`port 0`, `tls-port`), every
# client must present a certificate of the test CA (`tls-auth-clients yes`:
# the daemons get client.crt), the replica links over TLS too, and the
# default user is off (with its permissions kept: redis_tls_conf says why).  ACL users, their passwords in $SECRETS_DIR/redis-<user>
# (the servers keep only their SHA-256):
#   cqrs          the daemons and cqrsctl: exactly the commands and keys they
#                 use (deploy/local/redis-cqrs.acl, quoted in the README)
#   cqrs-admin    the operator: this script's checks, the tests' own
#                 connections (FLUSHDB of a test database, INFO, CLIENT KILL)
#   cqrs-replica  the replica's link to its primary
REDIS_ACL_CQRS_FILE=$SCRIPT_DIR/redis-cqrs.acl
REDIS_ACL_REPLICA='resetkeys resetchannels -@all +ping +psync +replconf'
redis_vars() {
    if [[ $1 == replica ]]; then
        R_NAME=redis-replica R_PORT=$REPLICA_PORT R_VAR=CQRS_REDIS_REPLICA_PORT
        R_DIR=$REPLICA_DIR R_PID=$REPLICA_PID R_LOG=$REPLICA_LOG
    elif [[ $1 == cluster-[1-6] ]]; then
        R_NAME=redis-$1 R_PORT=${RC_PORTS[${1#cluster-}]} R_VAR=CQRS_REDIS_CLUSTER_PORTS
        R_DIR=$STATE/redis-$1
        R_PID=$R_DIR/redis.pid R_LOG=$R_DIR/redis.log
    else
        R_NAME=redis R_PORT=$REDIS_PORT R_VAR=CQRS_REDIS_PORT
        R_DIR=$REDIS_DIR R_PID=$REDIS_PID R_LOG=$REDIS_LOG
    fi
}

redis_pid() {
    local R_NAME R_PORT R_VAR R_DIR R_PID R_LOG
    redis_vars "${1:-redis}"
    read_pid "$R_PID"
}

redis_running() {
    local pid
    pid=$(redis_pid "${1:-redis}")
    [[ -n $pid ]] && pid_alive "$pid" redis-server
}

# The port of the running redis-server (it retitles itself "redis-server IP:PORT").
redis_actual_port() {
    local pid
    pid=$(redis_pid "${1:-redis}")
    [[ -n $pid ]] || return 0
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | sed -n 's/.*:\([0-9][0-9]*\).*/\1/p'
}

# redis_cli PORT ARGS...: redis-cli on a server of this stack; in the TLS
# profile over TLS as cqrs-admin, the password in the environment
# (REDISCLI_AUTH), not on the command line.
redis_cli() {
    local port=$1
    shift
    if ((TLS)); then
        REDISCLI_AUTH=$(secret redis-cqrs-admin) timeout 5 redis-cli --tls \
            --cacert "$TLS_DIR/ca.crt" --cert "$TLS_DIR/client.crt" --key "$TLS_DIR/client.key" \
            --sni localhost --user cqrs-admin -h 127.0.0.1 -p "$port" "$@"
    else
        timeout 5 redis-cli -h 127.0.0.1 -p "$port" "$@"
    fi
}

redis_answers() {
    local R_NAME R_PORT R_VAR R_DIR R_PID R_LOG
    redis_vars "${1:-redis}"
    [[ $(redis_cli "$R_PORT" ping 2>/dev/null) == PONG ]]
}

# The replica's link to its primary is up (it loaded the primary's data).
replica_linked() {
    redis_cli "$REPLICA_PORT" info replication 2>/dev/null | grep -q '^master_link_status:up'
}

# redis_tls_conf WHICH: writes the TLS profile's settings of a server (on
# every start; 0600, the replica's holds its password) and prints the path,
# the only thing of it on redis-server's command line.
redis_tls_conf() {
    local conf=$R_DIR/tls-acl.conf user hash
    (
        umask 077
        cat >"$conf" <<EOF
# Written by deploy/local/stack.sh on every start of $R_NAME — edits are overwritten.
port 0
tls-port $R_PORT
tls-cert-file $TLS_DIR/server.crt
tls-key-file $TLS_DIR/server.key
tls-ca-cert-file $TLS_DIR/ca.crt
tls-auth-clients yes
tls-replication yes
# off: no client can act as the default user. Its permissions stay: Redis up to 7.x
# replays the AOF's transactions (every script with several writes) as the default user
# and drops those it may not run (redis#14541) — a restart would lose the read model.
user default off resetpass ~* &* +@all
EOF
        for user in cqrs cqrs-admin cqrs-replica; do
            hash=$(printf '%s' "$(secret "redis-$user")" | sha256sum | cut -d' ' -f1)
            case $user in
            cqrs) printf 'user cqrs on #%s %s\n' "$hash" "$(grep -v '^#' "$REDIS_ACL_CQRS_FILE")" ;;
            cqrs-admin) printf 'user cqrs-admin on #%s ~* &* +@all\n' "$hash" ;;
            cqrs-replica) printf 'user cqrs-replica on #%s %s\n' "$hash" "$REDIS_ACL_REPLICA" ;;
            esac
        done >>"$conf"
        if [[ $1 == replica ]]; then
            printf 'masteruser cqrs-replica\nmasterauth %s\n' "$(secret redis-cqrs-replica)" >>"$conf"
        fi
    )
    printf '%s' "$conf"
}

redis_up() {
    local which=${1:-redis} started=0
    local R_NAME R_PORT R_VAR R_DIR R_PID R_LOG
    redis_vars "$which"
    local -a extra=()
    local note=
    # The same persistence as the primary; a replica of it (read-only, the default).
    if [[ $which == replica ]]; then
        extra=(--replicaof 127.0.0.1 "$REDIS_PORT")
        note=" (replica of 127.0.0.1:$REDIS_PORT)"
    fi
    # A Redis Cluster node: the same persistence; its cluster state (node ids, epochs, who
    # serves which slot) in nodes.conf of its own folder, which a restart keeps.
    # cluster-node-timeout: a node silent that long is suspected (PFAIL), FAIL once a
    # majority of primaries agree; its replica then waits 0.5-1 s plus 1 s per rank before
    # its election. Redis's 15 s default makes every primary killed by a fault test a ~17 s
    # outage; 2 s (the default here) makes it 2-4 s (2.2 s measured from a stopped primary to
    # its replica's promotion). Much lower, a node stalled for a moment
    # (fork for an AOF rewrite, a 2-core machine busy with ASan builds) would be failed over
    # for nothing.
    if [[ $which == cluster-* ]]; then
        local bus=${RC_BUS_PORTS[${which#cluster-}]}
        extra=(--cluster-enabled yes --cluster-config-file "$R_DIR/nodes.conf"
            --cluster-port "$bus" --cluster-node-timeout "$RC_NODE_TIMEOUT")
        note=" (Redis Cluster node, bus port $bus)"
        if ! redis_running "$which" && port_busy "$bus"; then
            die "$R_NAME: port 127.0.0.1:$bus (cluster bus) is already taken by another process"
        fi
    fi
    mkdir -p "$R_DIR"
    if redis_running "$which"; then
        check_port "$R_NAME" "$(redis_actual_port "$which")" "$R_PORT" "$R_VAR"
        log "$R_NAME: already running (pid $(redis_pid "$which"), port $R_PORT)"
    else
        rm -f "$R_PID"
        port_busy "$R_PORT" && die "$R_NAME: port 127.0.0.1:$R_PORT is already taken by another process"
        log "$R_NAME: starting on 127.0.0.1:$R_PORT$( ((TLS)) && echo ' (TLS only, ACL users)')$note"
        local -a listen=(--port "$R_PORT")
        ((TLS)) && listen=("$(redis_tls_conf "$which")")
        redis-server "${listen[@]}" --bind 127.0.0.1 --protected-mode yes \
            --dir "$R_DIR" --appendonly yes "${extra[@]}" \
            --daemonize yes --pidfile "$R_PID" --logfile "$R_LOG" 9>&- ||
            die_log "$R_NAME: redis-server failed to start" "$R_LOG"
        started=1
    fi

    local deadline=$((SECONDS + 30))
    while ((SECONDS < deadline)); do
        redis_answers "$which" && break
        # (the daemonized child writes its pid file a moment after forking)
        if [[ -s $R_PID ]] && ! redis_running "$which"; then
            die_log "$R_NAME: server exited during startup" "$R_LOG"
        fi
        sleep 0.5
    done
    redis_answers "$which" || die_log "$R_NAME: no PONG from 127.0.0.1:$R_PORT after 30s" "$R_LOG"
    if [[ $which == replica ]] && ((started)); then
        # A fresh replica: wait for its first sync with the primary.
        deadline=$((SECONDS + REPLICA_WAIT))
        while ((SECONDS < deadline)) && ! replica_linked; do
            sleep 0.5
        done
        replica_linked ||
            die_log "$R_NAME: no link to the primary 127.0.0.1:$REDIS_PORT after ${REPLICA_WAIT}s" "$R_LOG"
    fi
    log "$R_NAME: ready on 127.0.0.1:$R_PORT (pid $(redis_pid "$which"))"
}

redis_down() {
    local which=${1:-redis} pid
    local R_NAME R_PORT R_VAR R_DIR R_PID R_LOG
    redis_vars "$which"
    redis_running "$which" || { rm -f "$R_PID"; return 0; }
    pid=$(redis_pid "$which")
    log "$R_NAME: stopping (pid $pid)"
    # SIGTERM is a clean SHUTDOWN (final AOF fsync).  Signalling the pid, not
    # `redis-cli -p PORT shutdown`, can never hit another stack's server.
    stop_pid "$R_NAME" "$pid" 20
    rm -f "$R_PID"
}

# -------------------------------------------------------- Redis Cluster ---
#
# Six redis-servers (redis_up cluster-N), three primaries and three replicas, made once by
# `redis-cli --cluster create` and remembered in $RC_FILE: the nodes' client and bus ports,
# and `created` once the cluster was made. Once made, the ports are the file's: an
# environment asking for others is refused (the nodes know each other by address).

# rc_ports_parse VAR LIST: six distinct ports 1..65535 from a space- or comma-separated LIST
# into the array VAR[1..6].
rc_ports_parse() {
    local -n out=$1
    local -a words
    local p
    read -r -a words <<<"${2//,/ }"
    ((${#words[@]} == RC_COUNT)) || return 1
    out=("")
    for p in "${words[@]}"; do
        [[ $p =~ ^[1-9][0-9]{0,4}$ ]] && ((p <= 65535)) || return 1
        out+=("$p")
    done
}

# rc_ports_asked: the ports the environment asks for, into RC_PORTS and RC_BUS_PORTS; which
# of them it names explicitly ("ports", "bus") into RC_NAMED.
rc_ports_asked() {
    local base=${CQRS_REDIS_CLUSTER_PORT:-17000} n
    if [[ -n ${CQRS_REDIS_CLUSTER_PORTS:-} ]]; then
        rc_ports_parse RC_PORTS "$CQRS_REDIS_CLUSTER_PORTS" ||
            die "CQRS_REDIS_CLUSTER_PORTS='$CQRS_REDIS_CLUSTER_PORTS': expected six ports"
    else
        [[ $base =~ ^[1-9][0-9]{0,4}$ ]] && ((base + 5 <= 65535)) ||
            die "CQRS_REDIS_CLUSTER_PORT='$base': expected a port (it and the next five)"
        RC_PORTS=("")
        for ((n = 0; n < RC_COUNT; n++)); do RC_PORTS+=($((base + n))); done
    fi
    if [[ -n ${CQRS_REDIS_CLUSTER_BUS_PORTS:-} ]]; then
        rc_ports_parse RC_BUS_PORTS "$CQRS_REDIS_CLUSTER_BUS_PORTS" ||
            die "CQRS_REDIS_CLUSTER_BUS_PORTS='$CQRS_REDIS_CLUSTER_BUS_PORTS': expected six ports"
    else
        # Not Redis's own default (client port + 10000): it puts ports above 22767 in
        # Linux's ephemeral range (32768+), where an outgoing connection can take them.
        RC_BUS_PORTS=("")
        for ((n = 1; n <= RC_COUNT; n++)); do
            ((RC_PORTS[n] + 100 <= 65535)) || die "cluster bus port ${RC_PORTS[n]} + 100: out of range"
            RC_BUS_PORTS+=($((RC_PORTS[n] + 100)))
        done
    fi
    if [[ $(printf '%s\n' "${RC_PORTS[@]:1}" "${RC_BUS_PORTS[@]:1}" | sort -u | wc -l) != $((2 * RC_COUNT)) ]]; then
        die "the Redis Cluster's ports are not twelve distinct ones: clients ${RC_PORTS[*]:1}, bus ${RC_BUS_PORTS[*]:1}"
    fi
    RC_NAMED=
    [[ -n ${CQRS_REDIS_CLUSTER_PORTS:-}${CQRS_REDIS_CLUSTER_PORT:-} ]] && RC_NAMED+=" ports"
    [[ -n ${CQRS_REDIS_CLUSTER_BUS_PORTS:-} ]] && RC_NAMED+=" bus"
    return 0
}

# rc_load: a stack with a cluster takes the nodes' ports from $RC_FILE.
rc_load() {
    ((RC)) || return 0
    rc_ports_parse RC_PORTS "$(sed -n 's/^ports //p' "$RC_FILE")" &&
        rc_ports_parse RC_BUS_PORTS "$(sed -n 's/^bus-ports //p' "$RC_FILE")" ||
        die "$RC_FILE: no six ports and six bus ports in it; 'down --purge' the stack"
}

rc_created() { ((RC)) && grep -qx created "$RC_FILE"; }

# rc_topology: whether this `up` runs the cluster, on which ports. --redis-cluster is for
# good, on the ports it was made with.
rc_topology() {
    ((RC || RC_ASKED)) || return 0
    local -a asked_p asked_b
    rc_ports_asked
    if ((!RC)); then
        printf '# Redis Cluster of this stack (stack.sh up --redis-cluster); "created" once made\n' >"$RC_FILE"
        printf 'ports %s\nbus-ports %s\n' "${RC_PORTS[*]:1}" "${RC_BUS_PORTS[*]:1}" >>"$RC_FILE"
        RC=1
        return 0
    fi
    asked_p=("${RC_PORTS[@]}") asked_b=("${RC_BUS_PORTS[@]}")
    rc_load
    if [[ $RC_NAMED == *ports* && ${asked_p[*]} != "${RC_PORTS[*]}" ]] ||
        [[ $RC_NAMED == *bus* && ${asked_b[*]} != "${RC_BUS_PORTS[*]}" ]]; then
        die "the Redis Cluster of $STATE was made on ports ${RC_PORTS[*]:1} (bus ${RC_BUS_PORTS[*]:1}), not" \
            "${asked_p[*]:1} (bus ${asked_b[*]:1}): fix CQRS_REDIS_CLUSTER_PORT(S), CQRS_REDIS_CLUSTER_BUS_PORTS," \
            "or '$0 down --purge' first"
    fi
}

# rc_info N FIELD: FIELD of `cluster info` (or of `info replication`) on node N.
rc_info() {
    local what=cluster
    [[ $2 == role || $2 == master_link_status ]] && what=replication
    if [[ $what == cluster ]]; then
        redis_cli "${RC_PORTS[$1]}" cluster info 2>/dev/null
    else
        redis_cli "${RC_PORTS[$1]}" info replication 2>/dev/null
    fi | tr -d '\r' | sed -n "s/^$2://p"
}

# rc_node_ok N [all]: node N sees the cluster ok: every slot served by a live primary, all six
# nodes known; with `all`, also its link to its primary up if it is a replica.
rc_node_ok() {
    local info
    info=$(redis_cli "${RC_PORTS[$1]}" cluster info 2>/dev/null | tr -d '\r') || return 1
    grep -qx 'cluster_state:ok' <<<"$info" && grep -qx 'cluster_slots_ok:16384' <<<"$info" &&
        grep -qx "cluster_known_nodes:$RC_COUNT" <<<"$info" || return 1
    [[ ${2:-} == all && $(rc_info "$1" role) == slave ]] || return 0
    [[ $(rc_info "$1" master_link_status) == up ]]
}

# rc_wait_ok SECONDS all|running: wait until every node (all: every node must run, each replica
# linked; running: the nodes running now) sees the cluster ok; fails after SECONDS.
rc_wait_ok() {
    local deadline=$((SECONDS + $1)) n ok
    while :; do
        ok=1
        for ((n = 1; n <= RC_COUNT; n++)); do
            if ! redis_running "cluster-$n"; then
                [[ $2 == all ]] && die_log "redis-cluster-$n: exited" "$STATE/redis-cluster-$n/redis.log"
                continue
            fi
            rc_node_ok "$n" "$2" || { ok=0 && break; }
        done
        ((ok)) && return 0
        ((SECONDS < deadline)) || break
        sleep 0.5
    done
    redis_cli "${RC_PORTS[$n]}" cluster info 2>&1 | head -n 8 >&2 || true
    die_log "redis-cluster-$n: no cluster_state:ok with all 16384 slots served$([[ $2 == all ]] &&
        echo ' and its primary linked') after $1s" "$STATE/redis-cluster-$n/redis.log"
}

# rc_nodes [N]: `cluster nodes` as node N sees it (default: the first node that answers).
rc_nodes() {
    local n out
    for n in ${1:-1 2 3 4 5 6}; do
        redis_running "cluster-$n" || continue
        out=$(redis_cli "${RC_PORTS[$n]}" cluster nodes 2>/dev/null | tr -d '\r') || continue
        [[ -n $out ]] && printf '%s\n' "$out" && return 0
    done
    return 1
}

# rc_name ADDR: redis-cluster-N for an address ip:port[@bus], else the address.
rc_name() {
    local port=${1%%@*} n
    port=${port##*:}
    for ((n = 1; n <= RC_COUNT; n++)); do
        [[ ${RC_PORTS[$n]} == "$port" ]] && { echo "redis-cluster-$n"; return 0; }
    done
    echo "${1%%@*}"
}

# rc_role N: how node N sees itself: "primary, slots …" or "replica of redis-cluster-M".
rc_role() {
    local nodes me master
    nodes=$(rc_nodes "$1") || return 0
    read -r -a me <<<"$(awk '$3 ~ /myself/' <<<"$nodes")"
    ((${#me[@]} >= 8)) || return 0
    if [[ ${me[2]} == *master* ]]; then
        printf 'primary, slots %s' "${me[*]:8}"
    else
        master=$(awk -v id="${me[3]}" '$1 == id { print $2 }' <<<"$nodes")
        printf 'replica of %s' "$(rc_name "$master")"
    fi
}

# rc_create: the cluster, once, from six fresh nodes (no other node known, no slot).
rc_create() {
    local n fresh=0 made=0 log=$STATE/redis-cluster-1/create.log
    local -a addrs=()
    for ((n = 1; n <= RC_COUNT; n++)); do
        addrs+=("127.0.0.1:${RC_PORTS[$n]}")
        if [[ $(rc_info "$n" cluster_known_nodes) == 1 && $(rc_info "$n" cluster_slots_assigned) == 0 ]]; then
            fresh=$((fresh + 1))
        elif [[ $(rc_info "$n" cluster_known_nodes) == "$RC_COUNT" &&
            $(rc_info "$n" cluster_slots_assigned) == 16384 ]]; then
            made=$((made + 1))
        fi
    done
    if ((made == RC_COUNT)); then # made by an earlier `up` cut short before recording it
        echo created >>"$RC_FILE"
        return 0
    fi
    ((fresh == RC_COUNT)) ||
        die "redis-cluster: $fresh of $RC_COUNT nodes are fresh, $made joined: a half-made cluster; '$0 down --purge' first"
    log "redis-cluster: creating (redis-cli --cluster create ${addrs[*]} --cluster-replicas 1)"
    timeout 120 redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes \
        </dev/null >"$log" 2>&1 9>&- || die_log "redis-cluster: redis-cli --cluster create failed" "$log"
    echo created >>"$RC_FILE"
}

rc_up() {
    local n
    for ((n = 1; n <= RC_COUNT; n++)); do
        redis_up "cluster-$n"
    done
    rc_created || rc_create
    rc_wait_ok "$RC_WAIT" all
    for ((n = 1; n <= RC_COUNT; n++)); do
        log "redis-cluster-$n: $(rc_role "$n")"
    done
    log "redis-cluster: ok on 127.0.0.1, ports ${RC_PORTS[*]:1}"
}

# rc_start_one N: start node N only (`start redis-cluster-N`), wait until it sees the cluster
# ok and, a replica, is linked to its primary (synced: ready to be failed over to).
rc_start_one() {
    rc_created || die "the Redis Cluster of $STATE is not made yet: '$0 up' first"
    redis_up "cluster-$1"
    local deadline=$((SECONDS + RC_WAIT))
    while ((SECONDS < deadline)) && ! rc_node_ok "$1" all; do
        sleep 0.5
    done
    rc_node_ok "$1" all ||
        die_log "redis-cluster-$1: no cluster_state:ok with all 16384 slots served (a replica: linked) after ${RC_WAIT}s" \
            "$STATE/redis-cluster-$1/redis.log"
    log "redis-cluster-$1: $(rc_role "$1")"
}

# rc_down [N...]: stop node N, or every node; SIGTERM to all at once (one by one, a replica
# could be promoted in between).
rc_down() {
    local n i pid
    local -a nodes=("$@") pids=() names=()
    ((${#nodes[@]})) || for ((n = 1; n <= RC_COUNT; n++)); do nodes+=("$n"); done
    for n in "${nodes[@]}"; do
        if redis_running "cluster-$n"; then
            pid=$(redis_pid "cluster-$n")
            log "redis-cluster-$n: stopping (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            names+=("redis-cluster-$n")
        fi
        rm -f "$STATE/redis-cluster-$n/redis.pid"
    done
    for i in "${!pids[@]}"; do
        stop_pid "${names[$i]}" "${pids[$i]}" 20
    done
}

# cmd_rc_failover N [force|takeover]: CLUSTER FAILOVER on a replica of node N (a primary);
# waits until that replica is the primary and every running node sees the cluster ok.
# Without an option the replica first catches up with the primary (no write lost), which
# needs the primary up; force: without the primary (a majority of primaries must vote);
# takeover: without any vote.
cmd_rc_failover() {
    local n=${1:-} mode=${2:-} nodes id flags replica m deadline reply
    ((RC)) || die "this stack has no Redis Cluster (up --redis-cluster)"
    [[ $n =~ ^[1-6]$ ]] || die "redis-cluster-failover N [force|takeover]: N is a node, 1 to 6"
    case $mode in
    "" | force | takeover) ;;
    *) die "redis-cluster-failover: '$mode'? force or takeover, or nothing" ;;
    esac
    nodes=$(rc_nodes) || die "redis-cluster: no node answers"
    read -r id _ flags _ < <(awk -v a="127.0.0.1:${RC_PORTS[$n]}@" 'index($2, a) == 1' <<<"$nodes")
    [[ -n ${id:-} ]] || die "redis-cluster-$n: not in CLUSTER NODES of the cluster"
    [[ $flags == *master* ]] || die "redis-cluster-$n is not a primary (${flags#myself,}): give the node of its primary"
    [[ $flags == *fail* && -z $mode ]] &&
        log "redis-cluster-$n is down ($flags): without force, the failover waits for it in vain"

    replica=$(awk -v id="$id" '$4 == id && $3 !~ /fail|noaddr|handshake/ { print $2; exit }' <<<"$nodes")
    [[ -n $replica ]] || die "redis-cluster-$n has no replica that is up"
    m=$(rc_name "$replica")
    m=${m#redis-cluster-}
    [[ $m =~ ^[1-6]$ ]] || die "redis-cluster-$n: its replica $replica is not a node of this stack"
    log "redis-cluster-$m: CLUSTER FAILOVER${mode:+ ${mode^^}} (replica of redis-cluster-$n)"
    local -a args=(cluster failover)
    [[ -n $mode ]] && args+=("${mode^^}")
    reply=$(redis_cli "${RC_PORTS[$m]}" "${args[@]}" 2>&1 || true)
    [[ $reply == OK ]] || die "redis-cluster-$m: CLUSTER FAILOVER refused: $reply"
    deadline=$((SECONDS + RC_WAIT))
    while ((SECONDS < deadline)) && [[ $(rc_info "$m" role) != master ]]; do
        sleep 0.2
    done
    [[ $(rc_info "$m" role) == master ]] ||
        die_log "redis-cluster-$m: not a primary ${RC_WAIT}s after CLUSTER FAILOVER$([[ -z $mode ]] &&
            echo " (is redis-cluster-$n down? then: force)")" "$STATE/redis-cluster-$m/redis.log"
    rc_wait_ok "$RC_WAIT" running
    # The old primary, when up, follows the new one: linked before the next failover test.
    if redis_running "cluster-$n"; then
        deadline=$((SECONDS + RC_WAIT))
        while ((SECONDS < deadline)) && ! [[ $(rc_info "$n" role) == slave &&
            $(rc_info "$n" master_link_status) == up ]]; do
            sleep 0.2
        done
        [[ $(rc_info "$n" master_link_status) == up ]] ||
            die_log "redis-cluster-$n: not linked to its new primary redis-cluster-$m" "$STATE/redis-cluster-$n/redis.log"
    fi
    log "redis-cluster-$m: $(rc_role "$m")"
}

# ---------------------------------------------------------------- Kafka ---

kafka_libs_ok() { [[ -f $KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar ]]; }

# Fetch the broker's jars once.  Maven writes into a temp folder next to the
# cache, which is renamed into place only when complete, so an interrupted
# fetch never leaves a half-filled cache.
kafka_fetch() {
    kafka_libs_ok && return 0
    command -v mvn >/dev/null || die "kafka: mvn not found (apt-get install maven)"
    mkdir -p "$CACHE_DIR"
    # leftovers of fetches that were killed outright (no EXIT trap ran)
    find "$CACHE_DIR" -maxdepth 1 -name '.kafka-*.tmp.*' -mmin +60 -exec rm -rf {} + 2>/dev/null || true
    local tmp
    tmp=$(mktemp -d "$CACHE_DIR/.kafka-$KAFKA_VERSION.tmp.XXXXXX")
    # shellcheck disable=SC2064 # expand $tmp now: it is local
    trap "rm -rf '$tmp'" EXIT
    trap 'exit 130' INT # so that an interrupted fetch still runs the EXIT trap
    trap 'exit 143' TERM
    log "kafka: fetching Kafka $KAFKA_VERSION jars with Maven into $KAFKA_LIBS (once)"
    if ! mvn -q -B -Dstyle.color=never -f "$KAFKA_POM" dependency:copy-dependencies \
        -Dkafka.version="$KAFKA_VERSION" -DincludeScope=runtime \
        -DoutputDirectory="$tmp/libs" >"$tmp/mvn.log" 2>&1 9>&-; then
        die_log "kafka: Maven could not fetch the Kafka $KAFKA_VERSION jars" "$tmp/mvn.log"
    fi
    [[ -f $tmp/libs/kafka_2.13-$KAFKA_VERSION.jar ]] ||
        die_log "kafka: Maven ran but kafka_2.13-$KAFKA_VERSION.jar is missing" "$tmp/mvn.log"
    cp "$KAFKA_POM" "$tmp/pom.xml"
    chmod 755 "$tmp"
    if kafka_libs_ok; then
        rm -rf "$tmp" # another stack.sh finished the same fetch meanwhile
    else
        if [[ -e $KAFKA_HOME ]]; then # a damaged cache: move it aside first
            mv -T "$KAFKA_HOME" "$KAFKA_HOME.old.$$" && rm -rf "$KAFKA_HOME.old.$$"
        fi
        if ! mv -T "$tmp" "$KAFKA_HOME" 2>/dev/null; then
            kafka_libs_ok || die "kafka: could not move $tmp to $KAFKA_HOME"
            rm -rf "$tmp" # lost the race to another stack.sh: its copy is complete
        fi
    fi
    trap - EXIT INT TERM
    log "kafka: cached $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars in $KAFKA_LIBS"
}

# kafka_node N: node N (1, 2 or 3) becomes the current node of the kafka_*
# functions below. Node 1 keeps the single broker's folder and ports.
kafka_node() {
    KN=$1
    KN_PORT=${KAFKA_PORTS[$KN]}
    KN_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORTS[$KN]}
    if ((KN == 1)); then
        KN_NAME=kafka
        KAFKA_DIR=$STATE/kafka
    else
        KN_NAME=kafka-$KN
        KAFKA_DIR=$STATE/kafka-$KN
    fi
    KAFKA_DATA=$KAFKA_DIR/data
    KAFKA_LOGS=$KAFKA_DIR/logs
    KAFKA_CONF=$KAFKA_DIR/server.properties
    KAFKA_PID=$KAFKA_DIR/kafka.pid
    KAFKA_OUT=$KAFKA_LOGS/kafka.out
}

# The brokers' client addresses, comma separated (bootstrap list).
kafka_bootstrap() {
    local n list=
    for ((n = 1; n <= KAFKA_NODES; n++)); do
        list+=${list:+,}127.0.0.1:${KAFKA_PORTS[$n]}
    done
    printf '%s' "$list"
}

# kafka_topology: the broker count this `up` runs with. --kafka-brokers is for
# good: a stack made with one broker cannot become three, nor the reverse.
kafka_topology() {
    local saved=
    [[ -r $KAFKA_NODES_FILE ]] && saved=$(tr -dc '0-9' <"$KAFKA_NODES_FILE")
    if [[ -n $KAFKA_NODES_ASKED ]]; then
        if [[ -n $saved && $saved != "$KAFKA_NODES_ASKED" ]] ||
            [[ -z $saved && $KAFKA_NODES_ASKED != 1 && -d $STATE/kafka/data ]]; then
            die "the stack in $STATE was made with ${saved:-1} Kafka broker(s), not $KAFKA_NODES_ASKED:" \
                "'$0 down --purge' first, or use another CQRS_STACK_DIR and ports"
        fi
        KAFKA_NODES=$KAFKA_NODES_ASKED
    fi
    if ((KAFKA_NODES > 1 && TLS)); then
        die "the TLS profile runs one Kafka broker: --kafka-brokers $KAFKA_NODES with --tls is not supported"
    fi
    echo "$KAFKA_NODES" >"$KAFKA_NODES_FILE"
}

kafka_pid() { read_pid "$KAFKA_PID"; }

kafka_running() {
    local pid
    pid=$(kafka_pid)
    [[ -n $pid ]] && pid_alive "$pid" "kafka.Kafka $KAFKA_CONF"
}

# The broker port the running Kafka was started with (its server.properties
# is only rewritten when Kafka is (re)started).
kafka_actual_port() {
    sed -n 's/^listeners=[A-Z_]*:\/\/127\.0\.0\.1:\([0-9]*\),.*/\1/p' "$KAFKA_CONF" 2>/dev/null
}

# The broker lists itself to a client. In the TLS profile over mutual TLS, as
# localhost (the name its certificate holds): Debian 12's kcat links librdkafka
# 2.0.2, whose SCRAM Kafka 4 rejects (fixed in librdkafka 2.6.1, #4895).
kafka_answers() {
    if ((TLS)); then
        timeout 10 kcat -b "localhost:$KAFKA_MTLS_PORT" -X security.protocol=SSL \
            -X ssl.ca.location="$TLS_DIR/ca.crt" -X ssl.certificate.location="$TLS_DIR/client.crt" \
            -X ssl.key.location="$TLS_DIR/client.key" -L -m 3 2>/dev/null |
            grep -q "broker 1 at localhost:$KAFKA_MTLS_PORT"
    else
        timeout 10 kcat -b "127.0.0.1:$KN_PORT" -L -m 3 2>/dev/null |
            grep -q "broker $KN at 127.0.0.1:$KN_PORT"
    fi
}

# Every broker of the cluster is registered (unfenced: in the metadata a client gets).
kafka_cluster_answers() {
    local out n
    ((KAFKA_NODES > 1)) || { kafka_answers; return; }
    out=$(timeout 10 kcat -b "$(kafka_bootstrap)" -L -m 3 2>/dev/null) || return 1
    for ((n = 1; n <= KAFKA_NODES; n++)); do
        grep -q "broker $n at 127.0.0.1:${KAFKA_PORTS[$n]}" <<<"$out" || return 1
    done
}

# The JVM command line shared by the broker and the storage tool.
kafka_jvm() {
    local heap=${KAFKA_HEAP:-512m}
    ((KAFKA_NODES > 1)) && heap=${KAFKA_HEAP:-384m}
    KAFKA_JVM=("$JAVA" -Xmx"$heap" -Xms"$heap" -XX:+UseG1GC -XX:MaxGCPauseMillis=20
        -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true -Djava.net.preferIPv4Stack=true
        -Dlog4j2.configurationFile="$KAFKA_LOG4J" -Dkafka.logs.dir="$KAFKA_LOGS"
        -cp "$KAFKA_LIBS/*")
}

kafka_write_conf() {
    if ((KAFKA_NODES > 1)); then
        kafka_write_conf_cluster
        return
    fi
    local listeners="PLAINTEXT://127.0.0.1:$KAFKA_PORT" advertised="PLAINTEXT://127.0.0.1:$KAFKA_PORT"
    local map=PLAINTEXT:PLAINTEXT inter=PLAINTEXT
    if ((TLS)); then
        listeners="SASL_SSL://127.0.0.1:$KAFKA_PORT,MTLS://127.0.0.1:$KAFKA_MTLS_PORT"
        advertised="SASL_SSL://localhost:$KAFKA_PORT,MTLS://localhost:$KAFKA_MTLS_PORT"
        map=SASL_SSL:SASL_SSL,MTLS:SSL inter=SASL_SSL
    fi
    cat >"$KAFKA_CONF" <<EOF
# Written by deploy/local/stack.sh on every 'up' — edits are overwritten.
# Kafka $KAFKA_VERSION, KRaft, one combined broker+controller on 127.0.0.1.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=$listeners,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=$advertised,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
listener.security.protocol.map=$map,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=$inter
log.dirs=$KAFKA_DATA

num.partitions=6
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.recovery.threads.per.data.dir=1
log.retention.hours=168

# KIP-848 groups (cqrs-queryd with CQRS_KAFKA_GROUP_PROTOCOL=consumer): the broker decides
# how soon a dead member's partitions move. Kafka's 45 s floor is lowered to the classic
# protocol's 10 s of cqrs-queryd (CQRS_KAFKA_SESSION_TIMEOUT_MS); see the README.
group.consumer.min.session.timeout.ms=6000
group.consumer.session.timeout.ms=10000
group.consumer.min.heartbeat.interval.ms=1000
group.consumer.heartbeat.interval.ms=2000
EOF
    ((TLS)) || return 0
    chmod 600 "$KAFKA_CONF" # the broker's SCRAM password follows
    cat >>"$KAFKA_CONF" <<EOF

# TLS profile. SASL_SSL: SCRAM-SHA-512 only (users made by kafka_format), also
# the broker's own inter-broker connections (user broker). MTLS: TLS with a
# client certificate of the test CA required (principal User:CN=<cert CN>).
# CONTROLLER stays PLAINTEXT on 127.0.0.1: the KRaft quorum's listener, not one
# for clients. No authorizer: any authenticated client may do anything.
ssl.keystore.type=PEM
ssl.keystore.location=$KAFKA_KEYSTORE
ssl.truststore.type=PEM
ssl.truststore.location=$TLS_DIR/ca.crt
ssl.endpoint.identification.algorithm=https
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="broker" password="$(secret kafka-broker)";
listener.name.mtls.ssl.client.auth=required
EOF
}

# The TLS profile's files: the broker's PEM keystore (key, then certificate)
# and a SASL_SSL client's settings (kcat -F with librdkafka >= 2.6.1, or
# CQRS_KAFKA_PROPERTIES_FILE).

# Node $KN of three: combined broker+controller, one of the three voters; the
# replicated durability settings (see the header comment).
kafka_write_conf_cluster() {
    local n bootstrap=
    for ((n = 1; n <= KAFKA_NODES; n++)); do
        bootstrap+=${bootstrap:+,}127.0.0.1:${KAFKA_CONTROLLER_PORTS[$n]}
    done
    cat >"$KAFKA_CONF" <<EOC
# Written by deploy/local/stack.sh on every 'up' — edits are overwritten.
# Kafka $KAFKA_VERSION, KRaft, node $KN of $KAFKA_NODES combined broker+controller nodes on
# 127.0.0.1 (a three-voter controller quorum; production separates controllers).
process.roles=broker,controller
node.id=$KN
controller.quorum.bootstrap.servers=$bootstrap
listeners=PLAINTEXT://127.0.0.1:$KN_PORT,CONTROLLER://127.0.0.1:$KN_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KN_PORT,CONTROLLER://127.0.0.1:$KN_CONTROLLER_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$KAFKA_DATA

num.partitions=6
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
num.recovery.threads.per.data.dir=1
log.retention.hours=168

# Replicated: every write acknowledged with acks=all is on two brokers at least; no
# out-of-sync replica ever becomes leader (that would drop acknowledged writes).
default.replication.factor=3
min.insync.replicas=2
unclean.leader.election.enable=false
offsets.topic.replication.factor=3
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
# A follower that has not caught up for this long leaves the ISR (Kafka's default: 30 s).
replica.lag.time.max.ms=$KAFKA_REPLICA_LAG_MS

# KIP-848 groups (cqrs-queryd with CQRS_KAFKA_GROUP_PROTOCOL=consumer): the broker decides
# how soon a dead member's partitions move. Kafka's 45 s floor is lowered to the classic
# protocol's 10 s of cqrs-queryd (CQRS_KAFKA_SESSION_TIMEOUT_MS); see the README.
group.consumer.min.session.timeout.ms=6000
group.consumer.session.timeout.ms=10000
group.consumer.min.heartbeat.interval.ms=1000
group.consumer.heartbeat.interval.ms=2000
EOC
}
kafka_write_tls() {
    ((TLS)) || return 0
    (
        umask 077
        cat "$TLS_DIR/server.key" "$TLS_DIR/server.crt" >"$KAFKA_KEYSTORE"
        cat >"$KAFKA_CLIENT_CONF" <<EOF
# Written by deploy/local/stack.sh: a SASL_SSL client of this stack's Kafka
# (kcat -F <this file>, or CQRS_KAFKA_PROPERTIES_FILE=<this file>).
security.protocol=SASL_SSL
sasl.mechanisms=SCRAM-SHA-512
sasl.username=cqrs
sasl.password=$(secret kafka)
ssl.ca.location=$TLS_DIR/ca.crt
EOF
    )
}

# Format the storage once: a fresh random cluster id, a standalone
# (single-voter, dynamic) controller quorum.
kafka_format() {
    if [[ -f $KAFKA_DATA/meta.properties ]]; then
        # The SCRAM users are made by the format only: data formatted for
        # the plain profile has none.
        if ((TLS)) && [[ ! -f $KAFKA_SCRAM_MARK ]]; then
            die "kafka: $KAFKA_DATA was formatted without the TLS profile's SCRAM users; 'stack.sh down --purge' first"
        fi
        return 0
    fi
    # The SCRAM users' passwords go to the JVM in an argument file (java @file, 0600), never
    # on its command line, which every local user can read in /proc.
    local -a scram=()
    local argfile=$KAFKA_DIR/.format-args
    rm -f "$argfile"
    if ((TLS)); then
        local cqrs_pw broker_pw
        cqrs_pw=$(secret kafka)
        broker_pw=$(secret kafka-broker)
        (umask 077 && printf '%s\n' --add-scram "SCRAM-SHA-512=[name=cqrs,password=$cqrs_pw]" \
            --add-scram "SCRAM-SHA-512=[name=broker,password=$broker_pw]" >"$argfile")
        scram=("@$argfile")
    fi
    local cluster_id
    cluster_id=$("${KAFKA_JVM[@]}" kafka.tools.StorageTool random-uuid 2>>"$KAFKA_DIR/format.log" 9>&- |
        tail -n 1) || true
    [[ $cluster_id =~ ^[A-Za-z0-9_-]{22}$ ]] ||
        die_log "kafka: StorageTool random-uuid gave '$cluster_id'" "$KAFKA_DIR/format.log"
    log "kafka: formatting $KAFKA_DATA (cluster id $cluster_id)"
    "${KAFKA_JVM[@]}" kafka.tools.StorageTool format --standalone -t "$cluster_id" -c "$KAFKA_CONF" \
        "${scram[@]}" >>"$KAFKA_DIR/format.log" 2>&1 9>&- ||
        { rm -f "$argfile" && die_log "kafka: storage format failed" "$KAFKA_DIR/format.log"; }
    rm -f "$argfile"
    if ((TLS)); then echo "SCRAM-SHA-512: cqrs broker" >"$KAFKA_SCRAM_MARK"; fi
}


# A random Kafka Uuid (16 bytes, URL-safe base64 without padding, not starting with '-',
# as org.apache.kafka.common.Uuid.randomUuid makes them).
kafka_uuid() {
    local u
    while :; do
        u=$(openssl rand 16 | base64 | tr '+/' '-_' | tr -d '=\n')
        if [[ ${#u} == 22 && $u != -* && $u != AAAAAAAAAAAAAAAAAAAAA[AB] ]]; then
            printf '%s' "$u"
            return
        fi
    done
}

# Three nodes: format every node once, with one random cluster id and the same three
# initial voters (id@host:port:directory-id); each node's metadata folder gets its id.
kafka_format_cluster() {
    local n formatted=0 voters='' cluster_id
    local -a dirids=("")
    for ((n = 1; n <= KAFKA_NODES; n++)); do
        kafka_node "$n"
        [[ -f $KAFKA_DATA/meta.properties ]] && formatted=$((formatted + 1))
    done
    ((formatted == KAFKA_NODES)) && return 0
    if ((formatted)); then
        die "kafka: only $formatted of $KAFKA_NODES nodes in $STATE are formatted; 'stack.sh down --purge' first"
    fi
    cluster_id=$(kafka_uuid)
    for ((n = 1; n <= KAFKA_NODES; n++)); do
        dirids+=("$(kafka_uuid)")
        voters+=${voters:+,}$n@127.0.0.1:${KAFKA_CONTROLLER_PORTS[$n]}:${dirids[$n]}
    done
    log "kafka: formatting $KAFKA_NODES nodes (cluster id $cluster_id, voters $voters)"
    local -a pids=()
    for ((n = 1; n <= KAFKA_NODES; n++)); do
        kafka_node "$n"
        "${KAFKA_JVM[@]}" kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_CONF" \
            --initial-controllers "$voters" >>"$KAFKA_DIR/format.log" 2>&1 9>&- &
        pids+=($!)
    done
    for ((n = 1; n <= KAFKA_NODES; n++)); do
        kafka_node "$n"
        wait "${pids[$((n - 1))]}" || die_log "kafka: storage format of node $n failed" "$KAFKA_DIR/format.log"
    done
}

# Start node $KN unless it runs (its server.properties written first).
kafka_start_node() {
    mkdir -p "$KAFKA_DIR" "$KAFKA_DATA" "$KAFKA_LOGS"
    if kafka_running; then
        check_port "$KN_NAME" "$(kafka_actual_port)" "$KN_PORT" \
            "$( ((KN == 1)) && echo CQRS_KAFKA_PORT || echo "CQRS_KAFKA_PORT_$KN")"
        log "$KN_NAME: already running (pid $(kafka_pid), port $KN_PORT)"
        return 0
    fi
    rm -f "$KAFKA_PID"
    kafka_write_conf
    kafka_write_tls
    local port
    local -a ports=("$KN_PORT" "$KN_CONTROLLER_PORT")
    ((TLS)) && ports+=("$KAFKA_MTLS_PORT")
    for port in "${ports[@]}"; do
        port_busy "$port" && die "$KN_NAME: port 127.0.0.1:$port is already taken by another process"
    done
    return 1 # written, to be formatted and started
}

kafka_launch_node() {
    if ((TLS)); then
        log "kafka: starting Kafka $KAFKA_VERSION, SASL_SSL on localhost:$KAFKA_PORT, mutual TLS on localhost:$KAFKA_MTLS_PORT (controller 127.0.0.1:$KAFKA_CONTROLLER_PORT)"
    elif ((KAFKA_NODES > 1)); then
        log "$KN_NAME: starting Kafka $KAFKA_VERSION node $KN on 127.0.0.1:$KN_PORT (controller :$KN_CONTROLLER_PORT)"
    else
        log "kafka: starting Kafka $KAFKA_VERSION on 127.0.0.1:$KAFKA_PORT (controller :$KAFKA_CONTROLLER_PORT)"
    fi
    # setsid: own session, so the broker survives this shell and its
    # terminal; stdout/stderr only catch JVM-level output (logs go to
    # server.log through log4j2).
    setsid nohup "${KAFKA_JVM[@]}" kafka.Kafka "$KAFKA_CONF" </dev/null >>"$KAFKA_OUT" 2>&1 9>&- &
    echo $! >"$KAFKA_PID"
}

kafka_up() {
    kafka_fetch
    local n wait_s=${KAFKA_WAIT:-60}
    ((KAFKA_NODES > 1)) && wait_s=${KAFKA_WAIT:-120}
    local -a start=()
    for ((n = 1; n <= KAFKA_NODES; n++)); do
        kafka_node "$n"
        kafka_jvm
        kafka_start_node || start+=("$n")
    done
    if ((${#start[@]})); then
        if ((KAFKA_NODES > 1)); then
            kafka_jvm
            kafka_format_cluster
        else
            kafka_node 1
            kafka_format
        fi
        for n in "${start[@]}"; do
            kafka_node "$n"
            kafka_jvm
            kafka_launch_node
        done
    fi

    local deadline=$((SECONDS + wait_s))
    kafka_node 1
    while ((SECONDS < deadline)); do
        kafka_cluster_answers && break
        for ((n = 1; n <= KAFKA_NODES; n++)); do
            kafka_node "$n"
            if ! pid_alive "$(kafka_pid)"; then
                [[ -s $KAFKA_OUT ]] && tail -n 20 "$KAFKA_OUT" >&2
                die_log "$KN_NAME: broker exited during startup" "$KAFKA_LOGS/server.log"
            fi
        done
        sleep 1
    done
    kafka_node 1
    if ! kafka_cluster_answers; then
        [[ -s $KAFKA_OUT ]] && tail -n 20 "$KAFKA_OUT" >&2
        if ((KAFKA_NODES > 1)); then
            timeout 10 kcat -b "$(kafka_bootstrap)" -L -m 3 2>&1 | head -n 8 >&2 || true
            die_log "kafka: not all $KAFKA_NODES brokers in 'kcat -L' on $(kafka_bootstrap) after ${wait_s}s" "$KAFKA_LOGS/server.log"
        fi
        die_log "kafka: no broker in 'kcat -L' on $( ((TLS)) && echo "localhost:$KAFKA_MTLS_PORT (mutual TLS)" || echo "127.0.0.1:$KAFKA_PORT") after ${wait_s}s" "$KAFKA_LOGS/server.log"
    fi
    for ((n = 1; n <= KAFKA_NODES; n++)); do
        kafka_node "$n"
        log "$KN_NAME: ready on 127.0.0.1:$KN_PORT (pid $(kafka_pid))"
    done
}

# kafka_start_one N: start node N only (formatted by an earlier `up`), wait until it lists itself.
kafka_start_one() {
    local wait_s=${KAFKA_WAIT:-60}
    ((KAFKA_NODES > 1)) && wait_s=${KAFKA_WAIT:-120}
    kafka_fetch
    kafka_node "$1"
    kafka_jvm
    if ! kafka_start_node; then
        [[ -f $KAFKA_DATA/meta.properties ]] || die "$KN_NAME: not formatted yet: '$0 up' first"
        kafka_launch_node
    fi
    local deadline=$((SECONDS + wait_s))
    while ((SECONDS < deadline)); do
        kafka_answers && break
        pid_alive "$(kafka_pid)" || die_log "$KN_NAME: broker exited during startup" "$KAFKA_LOGS/server.log"
        sleep 1
    done
    kafka_answers || die_log "$KN_NAME: not in 'kcat -L' on 127.0.0.1:$KN_PORT after ${wait_s}s" "$KAFKA_LOGS/server.log"
    log "$KN_NAME: ready on 127.0.0.1:$KN_PORT (pid $(kafka_pid))"
}

# kafka_down [N]: stop node N, or every node (SIGTERM to all at once: a controlled
# shutdown of the last nodes of a quorum waits for a majority that is stopping too).
kafka_down() {
    local n pid
    local -a nodes=("$@") pids=() names=()
    ((${#nodes[@]})) || for ((n = 1; n <= 3; n++)); do nodes+=("$n"); done
    for n in "${nodes[@]}"; do
        kafka_node "$n"
        if kafka_running; then
            pid=$(kafka_pid)
            log "$KN_NAME: stopping (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            names+=("$KN_NAME")
        fi
        rm -f "$KAFKA_PID"
    done
    for n in "${!pids[@]}"; do
        stop_pid "${names[$n]}" "${pids[$n]}" 30
    done
    kafka_node 1
}

# ---------------------------------------------------------- app daemons ---

# Stop the daemons that deploy/local/run.sh started ($STATE/run/*.pid): all
# get SIGTERM at once, then a bounded wait, then SIGKILL.
daemons_down() {
    local f pid name i
    local -a pids=() names=()
    [[ -d $RUN_DIR ]] || return 0
    for f in "$RUN_DIR"/*.pid; do
        [[ -e $f ]] || continue
        pid=$(read_pid "$f")
        name=$(basename "$f" .pid)
        if [[ -n $pid && $pid != "$$" ]] && pid_alive "$pid"; then
            log "$name: stopping (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            names+=("$name")
        fi
        rm -f "$f"
    done
    ((${#pids[@]})) || return 0
    for ((i = 0; i < DAEMON_WAIT * 10; i++)); do
        local alive=0
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        ((alive)) || return 0
        sleep 0.1
    done
    for i in "${!pids[@]}"; do
        if kill -0 "${pids[$i]}" 2>/dev/null; then
            log "${names[$i]} (pid ${pids[$i]}) still running after ${DAEMON_WAIT}s, sending SIGKILL"
            kill -KILL "${pids[$i]}" 2>/dev/null || true
        fi
    done
    sleep 0.2
}

# ------------------------------------------------------------- commands ---

cmd_up() {
    local t0=$SECONDS
    if ((PG_HA && TLS)); then
        die "--pg-standby is not available in the TLS profile (no replication over hostssl yet): use a plain stack"
    fi
    if (((RC || RC_ASKED) && TLS)); then
        die "the TLS profile has no Redis Cluster (yet): --redis-cluster with --tls is not supported"
    fi
    ensure_packages
    find_java || die "no Java >= 17"
    lock_stack
    kafka_topology
    rc_topology
    log "state folder $STATE$( ((TLS)) && echo ' (TLS profile)')$( ((KAFKA_NODES > 1)) && echo " ($KAFKA_NODES Kafka brokers)")$( ((RC)) && echo ' (Redis Cluster)')"
    tls_prepare
    if ((PG_HA)); then pg_ha_up; else pg_up; fi
    redis_up
    ((REDIS_REPLICA)) && redis_up replica
    ((RC)) && rc_up
    kafka_up
    log "stack is up in $((SECONDS - t0))s — eval \"\$($0 env)\" to use it"
}

cmd_down() {
    local purge=${1:-}
    [[ -d $STATE ]] || { log "nothing at $STATE"; return 0; }
    lock_stack
    daemons_down
    kafka_down
    ((RC)) && rc_down
    redis_down replica
    redis_down
    pg_down
    if ((PG_HA)); then pg_stop_node_n 2; fi
    if [[ $purge == --purge ]]; then
        case $STATE in
        / | "$HOME" | "$REPO_DIR" | "$SCRIPT_DIR"*) die "refusing to delete $STATE" ;;
        esac
        log "purging $STATE"
        rm -rf "$STATE"
    fi
    log "stack is down"
}

# status_line NAME ADDRESS PID RUNNING ANSWERS [ACTUAL_PORT WANTED_PORT]:
# one row; fails unless the server runs, answers, and on the wanted port.
status_line() {
    local state=stopped address=$2
    if (($4)); then
        state=running
        (($5)) || state=no-answer
        if [[ -n ${6:-} && $6 != "${7:-}" ]]; then
            state=wrong-port
            address="127.0.0.1:$6 (not ${7:-})"
        fi
    fi
    printf '%-16s %-10s %-22s %s\n' "$1" "$state" "$address" "${3:--}"
    [[ $state == running ]]
}

# With a standby: `postgres` is the recorded primary, `pg-standby` the other node, each with
# its node number and the role it answers (pg_is_in_recovery); a node in the wrong role, or a
# standby the primary does not see streaming, is a failure.
pg_ha_status() {
    local p s n row want role state addr pid rc=0 repl
    p=$(pg_ha_primary)
    s=$((3 - p))
    for n in "$p" "$s"; do
        pg_select "$n"
        if ((n == p)); then row=postgres want=f; else row=pg-standby want=t; fi
        state=stopped role=- addr="127.0.0.1:$PG_PORT" pid=$(pg_pid)
        if pg_running; then
            state=running
            role=$(pg_in_recovery)
            if [[ -z $role ]]; then
                state=no-answer role=-
            elif [[ $role != "$want" ]]; then
                state=wrong-role
            fi
            [[ $role == t ]] && role=standby
            [[ $role == f ]] && role=primary
            if [[ -n $(pg_actual_port) && $(pg_actual_port) != "$PG_PORT" ]]; then
                state=wrong-port addr="127.0.0.1:$(pg_actual_port) (not $PG_PORT)"
            fi
        fi
        if ((n == s)) && [[ $state == running ]]; then
            pg_select "$p"
            repl=$(pg_node_sql "select state || ' ' || sync_state from pg_stat_replication where application_name = '$(pg_app_name "$s")'")
            pg_select "$n"
            role="$role, ${repl:-not streaming}"
            [[ $repl == streaming* ]] || state=no-stream
        fi
        printf '%-16s %-10s %-22s %-8s node%s %s\n' "$row" "$state" "$addr" "${pid:--}" "$n" "$role"
        [[ $state == running ]] || rc=3
    done
    pg_select 1
    return "$rc"
}

# The Redis Cluster: a row per node with its role as it sees itself; a node that does not
# see the cluster ok (a slot not served, a node it does not know) is a failure.
rc_status() {
    local n rc=0 state addr pid role
    for ((n = 1; n <= RC_COUNT; n++)); do
        state=stopped addr="127.0.0.1:${RC_PORTS[$n]}" pid=$(redis_pid "cluster-$n") role=
        if redis_running "cluster-$n"; then
            state=running
            if ! redis_answers "cluster-$n"; then
                state=no-answer
            else
                role=$(rc_role "$n")
                rc_node_ok "$n" || state=cluster-$(rc_info "$n" cluster_state)
            fi
            if [[ -n $(redis_actual_port "cluster-$n") && $(redis_actual_port "cluster-$n") != "${RC_PORTS[$n]}" ]]; then
                state=wrong-port addr="127.0.0.1:$(redis_actual_port "cluster-$n") (not ${RC_PORTS[$n]})"
            fi
        fi
        printf '%-16s %-10s %-22s %-8s %s\n' "redis-cluster-$n" "$state" "$addr" "${pid:--}" "$role"
        [[ $state == running ]] || rc=3
    done
    return "$rc"
}

cmd_status() {
    local ok=0 r a pid f
    printf '%-16s %-10s %-22s %s\n' SERVER STATE ADDRESS PID
    if ((PG_HA)); then
        pg_ha_status || ok=3
    else
        r=0 a=0
        pg_running && r=1 && pg_answers && a=1
        status_line postgres "127.0.0.1:$PG_PORT" "$(pg_pid)" "$r" "$a" \
            "$(pg_actual_port)" "$PG_PORT" || ok=3
    fi
    r=0 a=0
    redis_running && r=1 && redis_answers && a=1
    status_line redis "127.0.0.1:$REDIS_PORT" "$(redis_pid)" "$r" "$a" \
        "$(redis_actual_port)" "$REDIS_PORT" || ok=3
    # The replica: when asked for (--redis-replica, CQRS_REDIS_REPLICA_PORT) or running.
    r=0 a=0
    redis_running replica && r=1 && redis_answers replica && a=1
    if ((REDIS_REPLICA)); then
        status_line redis-replica "127.0.0.1:$REPLICA_PORT" "$(redis_pid replica)" "$r" "$a" \
            "$(redis_actual_port replica)" "$REPLICA_PORT" || ok=3
    elif ((r)); then # started earlier with --redis-replica: wherever it runs
        status_line redis-replica "127.0.0.1:$(redis_actual_port replica)" "$(redis_pid replica)" \
            "$r" "$a" || ok=3
    fi
    ((RC)) && { rc_status || ok=3; }
    local n
    for ((n = 1; n <= KAFKA_NODES; n++)); do
        kafka_node "$n"
        r=0 a=0
        kafka_running && r=1 && kafka_answers && a=1
        status_line "$KN_NAME" "127.0.0.1:$KN_PORT" "$(kafka_pid)" "$r" "$a" \
            "$(kafka_actual_port)" "$KN_PORT" || ok=3
    done
    # App daemons from run.sh: informational, they don't change the exit status.
    for f in "$RUN_DIR"/*.pid; do
        [[ -e $f ]] || continue
        pid=$(read_pid "$f")
        r=0
        [[ -n $pid ]] && pid_alive "$pid" && r=1
        status_line "$(basename "$f" .pid)" - "$pid" "$r" "$r" || true
    done
    printf 'state: %s\n' "$STATE"
    return "$ok"
}

cmd_env() {
    printf 'export CQRS_STACK_DIR=%s\n' "$(sq "$STATE")"
    if ((TLS)); then
        printf 'export CQRS_STACK_TLS=1\n'
        printf 'export CQRS_TLS_DIR=%s\n' "$(sq "$TLS_DIR")"
    fi
    printf 'export CQRS_PG_PORT=%s\n' "$(sq "$PG_PORT")"
    ((PG_HA)) && printf 'export CQRS_PG_STANDBY_PORT=%s\n' "$(sq "$PG_STANDBY_PORT")"
    printf 'export CQRS_REDIS_PORT=%s\n' "$(sq "$REDIS_PORT")"
    printf 'export CQRS_KAFKA_PORT=%s\n' "$(sq "$KAFKA_PORT")"
    printf 'export CQRS_KAFKA_CONTROLLER_PORT=%s\n' "$(sq "$KAFKA_CONTROLLER_PORT")"
    # (TLS profile: the password stays in the file the DSN names, passfile=)
    printf 'export CQRS_PG_DSN=%s\n' "$(sq "$(pg_dsn)")"
    if ((TLS)); then
        # The URL names the least-privilege user; its password is a file, so the
        # URL can be passed around (and changed per database) without the secret.
        printf 'export CQRS_REDIS_URL=%s\n' "$(sq "rediss://cqrs@localhost:$REDIS_PORT/0")"
        printf 'export CQRS_REDIS_PASSWORD_FILE=%s\n' "$(sq "$SECRETS_DIR/redis-cqrs")"
        printf 'export CQRS_REDIS_TLS_CA_FILE=%s\n' "$(sq "$TLS_DIR/ca.crt")"
        printf 'export CQRS_REDIS_TLS_CERT_FILE=%s\n' "$(sq "$TLS_DIR/client.crt")"
        printf 'export CQRS_REDIS_TLS_KEY_FILE=%s\n' "$(sq "$TLS_DIR/client.key")"
        # not daemon settings: the operator's (and the tests' own) connections
        printf 'export CQRS_REDIS_ADMIN_USER=cqrs-admin\n'
        printf 'export CQRS_REDIS_ADMIN_PASSWORD_FILE=%s\n' "$(sq "$SECRETS_DIR/redis-cqrs-admin")"
        # A name the broker's certificate holds; the password by file, never inline.
        printf 'export CQRS_KAFKA_MTLS_PORT=%s\n' "$(sq "$KAFKA_MTLS_PORT")"
        printf 'export CQRS_KAFKA_BROKERS=%s\n' "$(sq "localhost:$KAFKA_PORT")"
        printf 'export CQRS_KAFKA_PROPERTY_SECURITY_PROTOCOL=SASL_SSL\n'
        printf 'export CQRS_KAFKA_PROPERTY_SASL_MECHANISMS=SCRAM-SHA-512\n'
        printf 'export CQRS_KAFKA_PROPERTY_SASL_USERNAME=cqrs\n'
        printf 'export CQRS_KAFKA_PROPERTY_SASL_PASSWORD_FILE=%s\n' "$(sq "$SECRETS_DIR/kafka")"
        printf 'export CQRS_KAFKA_PROPERTY_SSL_CA_LOCATION=%s\n' "$(sq "$TLS_DIR/ca.crt")"
    else
        printf 'export CQRS_REDIS_URL=%s\n' "$(sq "redis://127.0.0.1:$REDIS_PORT/0")"
        printf 'export CQRS_KAFKA_BROKERS=%s\n' "$(sq "$(kafka_bootstrap)")"
    fi
    printf 'export CQRS_KAFKA_BROKER_COUNT=%s\n' "$KAFKA_NODES"
    if ((KAFKA_NODES > 1)); then
        local n
        for ((n = 2; n <= KAFKA_NODES; n++)); do
            printf 'export CQRS_KAFKA_PORT_%s=%s\n' "$n" "$(sq "${KAFKA_PORTS[$n]}")"
            printf 'export CQRS_KAFKA_CONTROLLER_PORT_%s=%s\n' "$n" "$(sq "${KAFKA_CONTROLLER_PORTS[$n]}")"
        done
    fi
    if redis_running replica; then
        local port
        port=$(redis_actual_port replica)
        port=${port:-$REPLICA_PORT}
        printf 'export CQRS_REDIS_REPLICA_PORT=%s\n' "$(sq "$port")"
        if ((TLS)); then
            printf 'export CQRS_REDIS_REPLICA_URL=%s\n' "$(sq "rediss://cqrs@localhost:$port/0")"
        else
            printf 'export CQRS_REDIS_REPLICA_URL=%s\n' "$(sq "redis://127.0.0.1:$port/0")"
        fi
    fi
    local n
    for ((n = 1; n <= RC_COUNT && RC; n++)); do
        redis_running "cluster-$n" || continue
        # A seed: node 1 (the client learns the others from it: CLUSTER SLOTS).
        printf 'export CQRS_REDIS_CLUSTER_URL=%s\n' "$(sq "redis://127.0.0.1:${RC_PORTS[1]}/0")"
        printf 'export CQRS_REDIS_CLUSTER_PORT=%s\n' "$(sq "${RC_PORTS[1]}")"
        printf 'export CQRS_REDIS_CLUSTER_PORTS=%s\n' "$(sq "${RC_PORTS[*]:1}")"
        printf 'export CQRS_REDIS_CLUSTER_BUS_PORTS=%s\n' "$(sq "${RC_BUS_PORTS[*]:1}")"
        break
    done
}

# usage [STATUS]: the header comment; to stderr (exit 2) for a bad command.
usage() {
    local status=${1:-2}
    if ((status == 0)); then
        sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
    else
        sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
    fi
    exit "$status"
}

main() {
    local cmd=${1:-}
    shift || true
    rc_load
    case $cmd in
    up)
        while (($#)); do
            case $1 in
            --redis-replica) REDIS_REPLICA=1 ;;
            --redis-cluster) RC_ASKED=1 ;;
            --tls) TLS=1 ;;
            --kafka-brokers)
                [[ ${2:-} == 1 || ${2:-} == 3 ]] || die "--kafka-brokers takes 1 or 3, not '${2:-}'"
                KAFKA_NODES_ASKED=$2
                shift
                ;;
            --pg-standby) PG_HA=1 ;;
            *) die "unknown option for up: $1 (--redis-replica, --redis-cluster, --tls, --kafka-brokers 1|3, --pg-standby)" ;;
            esac
            shift
        done
        cmd_up
        ;;
    down)
        case ${1:-} in
        "" | --purge) cmd_down "${1:-}" ;;
        *) die "unknown option for down: $1 (only --purge)" ;;
        esac
        ;;
    purge) cmd_down --purge ;;
    stop)
        # One server, e.g. for outage tests; `up` starts it again.
        lock_stack
        case ${1:-} in
        postgres) if ((PG_HA)); then pg_stop_node_n "$(pg_ha_primary)"; else pg_down; fi ;;
        pg-standby) ((PG_HA)) || die "this stack has no standby"; pg_stop_node_n $((3 - $(pg_ha_primary))) ;;
        pg-node1 | pg-node2) ((PG_HA)) || die "this stack has no standby"; pg_stop_node_n "${1#pg-node}" ;;
        redis) redis_down ;;
        redis-replica) redis_down replica ;;
        redis-cluster-[1-6])
            ((RC)) || die "$1: this stack has no Redis Cluster (up --redis-cluster)"
            rc_down "${1#redis-cluster-}"
            ;;
        kafka) kafka_down 1 ;;
        kafka-2 | kafka-3)
            ((KAFKA_NODES > 1)) || die "$1: this stack runs one Kafka broker (up --kafka-brokers 3)"
            kafka_down "${1#kafka-}"
            ;;
        *) die "stop what? postgres, pg-standby, pg-node1, pg-node2 (with a standby), redis, redis-replica, redis-cluster-1 … -6 (with the cluster), kafka (kafka-2, kafka-3 with three brokers)" ;;
        esac
        ;;
    start)
        lock_stack
        case ${1:-} in
        kafka) find_java || die "no Java >= 17"; kafka_start_one 1 ;;
        kafka-2 | kafka-3)
            ((KAFKA_NODES > 1)) || die "$1: this stack runs one Kafka broker (up --kafka-brokers 3)"
            find_java || die "no Java >= 17"
            kafka_start_one "${1#kafka-}"
            ;;
        redis-cluster-[1-6])
            ((RC)) || die "$1: this stack has no Redis Cluster (up --redis-cluster)"
            rc_start_one "${1#redis-cluster-}"
            ;;
        *) die "start what? kafka (kafka-2, kafka-3 with three brokers), redis-cluster-1 … -6 (with the cluster); 'up' starts everything" ;;
        esac
        ;;
    redis-cluster-failover) lock_stack && cmd_rc_failover "$@" ;;
    pg-promote) lock_stack && cmd_pg_promote ;;
    pg-rejoin) lock_stack && cmd_pg_rejoin ;;
    status) cmd_status ;;
    env) cmd_env ;;
    -h | --help | help) usage 0 ;;
    *) usage ;;
    esac
}

main "$@"
