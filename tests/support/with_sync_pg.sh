#!/usr/bin/env bash
# tests/support/with_sync_pg.sh TEST [ARGS] — runs TEST beside a private PostgreSQL whose
# synchronous_standby_names names a standby that never connects: every commit with
# synchronous_commit=on waits for it until a cancel request ends the wait (statement_timeout
# does not: PostgreSQL disables it before committing), and PostgreSQL then reports success
# with a WARNING. That is what a client of a primary sees
# once its standby was promoted (tests/integration/test_store_failover.c). The test gets
#   CQRS_TEST_SYNC_PG_DSN   commits wait for the missing standby
#   CQRS_TEST_LOCAL_PG_DSN  the same database, synchronous_commit=local (setup and checks)
# The server is a throwaway (initdb of a temp folder, a free port); it is always removed. A
# server that cannot be started fails the test (exit 2), never skips it.
set -euo pipefail
PG_BIN=${CQRS_PG_BIN:-/usr/lib/postgresql/15/bin}
# shellcheck source=tests/support/ports.sh
. "$(dirname "${BASH_SOURCE[0]}")/ports.sh"

dir=$(mktemp -d /tmp/cqrs-syncpg.XXXXXX)
chmod 755 "$dir"
as_owner() { if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[[ $EUID -eq 0 ]] && chown postgres:postgres "$dir"
cleanup() {
    as_owner "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
port=$(free_port)
if ! as_owner "$PG_BIN/initdb" -D "$dir/data" -U cqrs -A trust --encoding=UTF8 --locale=C.UTF-8 \
    >"$dir/initdb.log" 2>&1; then
    cat "$dir/initdb.log" >&2
    exit 2
fi
cat >>"$dir/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
fsync = off
synchronous_commit = on
synchronous_standby_names = 'never_connects'
CONF
if ! as_owner "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/pg.log" -w -t 30 start >/dev/null; then
    cat "$dir/pg.log" >&2
    exit 2
fi
base="host=127.0.0.1 port=$port user=cqrs dbname=postgres"
export CQRS_TEST_SYNC_PG_DSN=$base
export CQRS_TEST_LOCAL_PG_DSN="$base options='-c synchronous_commit=local'"
"$@"
