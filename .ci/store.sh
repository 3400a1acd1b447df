#!/usr/bin/env bash
# Store CI steps (issue 3): the kill -9 chaos test with a small kill count, and the store fault
# tests, against the embedded broker (or EDGEWISE_TEST_MQTT_URL when the caller sets it).
# Uses the caller's CARGO_TARGET_DIR. The 100-kill run is the same test with
# EDGEWISE_CHAOS_KILLS=100 (see README, "Durability and the offline buffer").
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/edgewise-target}"

step() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "store unit tests (eviction, gaps, drain order, disk full, corrupt files)"
cargo test -p edgewise-agent --lib -- store:: pipeline::

step "store fault tests against the real agent, broker and receiver"
cargo test -p edgewise-agent --test store_faults

step "chaos: kill -9 the agent binary ${EDGEWISE_CHAOS_KILLS:=20} times"
EDGEWISE_CHAOS_KILLS="$EDGEWISE_CHAOS_KILLS" \
  cargo test -p edgewise-agent --test chaos -- --nocapture

step "store CI steps passed"
