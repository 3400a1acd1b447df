#!/usr/bin/env bash
# CI steps of the cloud receiver that need the machine's services:
#   1. the shared HTTP suite and the multi-replica test against PostgreSQL (127.0.0.1:5432);
# Honours $CARGO_TARGET_DIR. Run from anywhere: bash .ci/cloud.sh
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
export EDGEWISE_TEST_PG_URL="${EDGEWISE_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/test}"

echo "== cloud: test suite on SQLite and PostgreSQL, multi-replica test"
cargo test -p edgewise-cloud --tests -- --test-threads=4

echo "== cloud CI done in $(( $(date +%s) - start )) s"
