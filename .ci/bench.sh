#!/usr/bin/env bash
# Bench CI steps (issue 9): the harness's unit tests, then a short smoke run of the whole harness
# (Mosquitto from the machine's config on a free port and the embedded broker; the counting
# subscriber and the agent binary; one 3-second step each at a low rate), asserting the JSON it
# writes. Debug build: this checks the harness works, it does not measure. The measurement is
# `cargo run --release -p edgewise-bench` (README, "Performance"). Honours $CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/edgewise-target}"

step() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

if ! command -v mosquitto >/dev/null || ! command -v jq >/dev/null; then
  step "installing mosquitto and jq"
  apt-get update && apt-get install -y mosquitto jq
fi

step "bench unit tests"
cargo test -p edgewise-bench

step "smoke run: both brokers, both consumers, QoS 1, 100 sensors, one 3 s step at 200 msg/s"
cargo build -p edgewise-agent -p edgewise-bench --bins
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
timeout 300 "$CARGO_TARGET_DIR/debug/edgewise-bench" \
  --agent-bin "$CARGO_TARGET_DIR/debug/edgewise-agent" \
  --brokers mosquitto,embedded --qos 1 --sensors 100 --rates 200 --step-seconds 3 \
  --json "$out/bench.json" --keep | tee "$out/bench.out"

step "the private Mosquitto wrote its log (it runs as its own user, in the harness's directory)"
kept="$(sed -n 's/^files kept in //p' "$out/bench.out")"
[ -n "$kept" ] && [ -d "$kept" ] || { echo "no kept directory printed"; exit 1; }
trap 'rm -rf "$out" "$kept"' EXIT
[ -s "$kept/mosquitto/mosquitto.log" ] || {
  echo "no Mosquitto log in $kept/mosquitto:"; ls -la "$kept/mosquitto"; cat "$kept/mosquitto/mosquitto.stderr"; exit 1; }

step "the JSON has both cases, each with a sustained ceiling and agent step that add up"
jq -e '
  (.cases | length) == 2
  and all(.cases[];
    .ceiling.sustained and .agent.sustained
    and .ceiling.published_messages > 0
    and .ceiling.received_messages == .ceiling.published_messages
    and .agent.published_readings > 0
    and .agent.summary_readings == .agent.published_readings
    and .agent.distinct_windows == .agent.summaries
    and .agent.peak_rss_mib > 0 and .agent.cpu_seconds > 0)
' "$out/bench.json" >/dev/null || { echo "unexpected results:"; cat "$out/bench.json"; exit 1; }

step "bench CI steps passed"
