#!/usr/bin/env bash
# CI steps of the cloud receiver that need the machine's services or tools:
#   1. the shared HTTP suite on SQLite and PostgreSQL, and the multi-replica test (PG 127.0.0.1:5432);
#   2. the dashboard in headless Chromium (Debian's `chromium`, installed here), screenshot kept;
# Honours $CARGO_TARGET_DIR. Run from anywhere: bash .ci/cloud.sh
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
export EDGEWISE_TEST_PG_URL="${EDGEWISE_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/test}"
artifacts="${EDGEWISE_CI_ARTIFACTS:-${CARGO_TARGET_DIR:-target}/ci-artifacts}"
mkdir -p "$artifacts"

if ! command -v chromium >/dev/null; then
    echo "== installing chromium"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
export EDGEWISE_TEST_CHROMIUM="$(command -v chromium)"
export EDGEWISE_DASHBOARD_SCREENSHOT="$artifacts/dashboard.png"

echo "== cloud: suite on SQLite and PostgreSQL, multi-replica test, dashboard in Chromium"
cargo test -p edgewise-cloud --tests -- --test-threads=4
echo "   dashboard screenshot: $EDGEWISE_DASHBOARD_SCREENSHOT"

echo "== cloud CI done in $(( $(date +%s) - start )) s"
