#!/usr/bin/env bash
# CI for the stream stages (issue #4): the decoders and data contracts under cargo-fuzz, each
# target for a short time (FUZZ_SECONDS, default 25 s), starting from the committed seeds in
# fuzz/corpus/<target>. cargo-fuzz needs nightly compiler flags: RUSTC_BOOTSTRAP=1 enables them
# on the stable toolchain. A crash fails the run; libFuzzer's reproducer is left in
# fuzz/artifacts/<target>/ (run it again with `cargo fuzz run --fuzz-dir fuzz <target> <file>`).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/edgewise-target}"
TOOLS="${EDGEWISE_TOOLS:-/var/tmp/edgewise-tools}"
FUZZ_SECONDS="${FUZZ_SECONDS:-25}"

step() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }
start=$(date +%s)

step "cargo-fuzz (installed once into $TOOLS)"
if [ ! -x "$TOOLS/bin/cargo-fuzz" ]; then
  cargo install --locked --root "$TOOLS" cargo-fuzz
fi
export PATH="$TOOLS/bin:$PATH"
cargo fuzz --version

# The fuzz build has its own target dir (instrumented), kept between runs next to the shared one.
fuzz_target_dir="$CARGO_TARGET_DIR/fuzz"
export RUSTC_BOOTSTRAP=1

step "build the fuzz targets"
cargo fuzz build --fuzz-dir fuzz --target-dir "$fuzz_target_dir"

for target in $(cargo fuzz list --fuzz-dir fuzz); do
  step "fuzz $target for ${FUZZ_SECONDS}s"
  # New inputs go to a scratch corpus (first dir); the committed seeds are only read.
  scratch="$(mktemp -d)"
  status=0
  cargo fuzz run --fuzz-dir fuzz --target-dir "$fuzz_target_dir" "$target" \
    "$scratch" "fuzz/corpus/$target" -- \
    -max_total_time="$FUZZ_SECONDS" -max_len=4096 -timeout=10 -rss_limit_mb=1024 \
    -print_final_stats=1 >"$scratch.log" 2>&1 || status=$?
  grep -E 'Done [0-9]+ runs|stat::number_of_executed_units|stat::peak_rss_mb' "$scratch.log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$scratch.log" >&2
    echo "fuzz target $target failed (exit $status); reproducer in fuzz/artifacts/$target/" >&2
    rm -rf "$scratch" "$scratch.log"
    exit 1
  fi
  rm -rf "$scratch" "$scratch.log"
done

step "streams CI passed in $(( $(date +%s) - start )) s"
