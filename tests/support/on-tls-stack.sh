#!/usr/bin/env bash
# tests/support/on-tls-stack.sh COMMAND... — runs a test against the TLS-profile stack
# (`deploy/local/stack.sh up --tls`): loads the environment tests/run.sh saved from that stack's
# `stack.sh env` (CQRS_TLS_STACK_ENV names the file), then runs COMMAND. ctest's e2e-tls and tls
# labels go through here. Without the file the test fails: it never silently runs in plain text.
set -euo pipefail
env_file=${CQRS_TLS_STACK_ENV:-}
if [[ -z $env_file || ! -r $env_file ]]; then
    echo "on-tls-stack: no TLS stack (CQRS_TLS_STACK_ENV='$env_file'); tests/run.sh starts one," \
        "or: CQRS_STACK_DIR=… stack.sh up --tls && stack.sh env > FILE" >&2
    exit 1
fi
# shellcheck disable=SC1090
. "$env_file"
[[ ${CQRS_STACK_TLS:-} == 1 ]] || {
    echo "on-tls-stack: $env_file is not the environment of a TLS-profile stack" >&2
    exit 1
}
exec "$@"
