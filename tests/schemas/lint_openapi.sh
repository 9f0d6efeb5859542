#!/usr/bin/env bash
# redocly lint (npm @redocly/cli, recommended rules) on both OpenAPI documents: no errors
# (issue 21 items 9–11: security schemes and scopes, 401/403, tags, descriptions, contact).
# Warnings are printed, not failed on: operation-4xx-response on /healthz and /readyz, which
# answer no 4xx. usage: lint_openapi.sh <redocly>
set -euo pipefail
REDOCLY=${1:-redocly}
cd "$(dirname "${BASH_SOURCE[0]}")/../../schemas/openapi"
if ! command -v "$REDOCLY" >/dev/null; then
    echo "FAIL: no redocly at '$REDOCLY' (tests/run.sh installs @redocly/cli)"
    [ "${CI:-}" = true ] && exit 1
    exit 77
fi
export REDOCLY_TELEMETRY=off REDOCLY_SUPPRESS_UPDATE_NOTICE=true
"$REDOCLY" lint --format stylish command-api.yaml query-api.yaml
