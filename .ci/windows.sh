#!/usr/bin/env bash
# Windows CI steps (issue 4, windows part): the window property test with many more cases than
# the default run, the end-to-end window test through the pipeline, and both window benchmarks
# in the debug test profile as smoke runs (criterion runs each benchmark once; the memory bench
# checks what 10,000 active streams add over its own baseline, since a debug binary's own pages
# are most of its resident set). The measurements are release runs:
# `cargo bench -p edgewise-agent --bench streams` and `--bench memory` (README, "Windows").
# Honours $CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/edgewise-target}"

step() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "window property test against the sort-then-aggregate reference, 5000 cases"
PROPTEST_CASES=5000 cargo test -p edgewise-agent --lib window::tests

step "revisions and the stream cap through the pipeline (real SQLite)"
cargo test -p edgewise-agent --lib pipeline::tests

step "backpressure: a full queue stops reading from Mosquitto at 127.0.0.1:1883, nothing lost"
EDGEWISE_TEST_MQTT_URL="${EDGEWISE_TEST_MQTT_URL:-mqtt://127.0.0.1:1883}" \
  cargo test -p edgewise-agent --test backpressure

step "benchmarks, smoke (debug): streams once each, memory of 10,000 streams"
cargo test -p edgewise-agent --bench streams
cargo test -p edgewise-agent --bench memory
