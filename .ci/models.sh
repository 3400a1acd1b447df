#!/usr/bin/env bash
# CI for models/: the reference vectors still match their models under onnxruntime (Python venv,
# packages from PyPI pinned in models/requirements.txt), then tract in the agent matches them
# (agent/tests/infer.rs). Run after the workspace is built; honours $CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/edgewise-target}"
# A venv outside the clone survives between runs, like the target dir.
export MODELS_VENV="${MODELS_VENV:-${CARGO_TARGET_DIR}/models-venv}"

step() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }
start=$(date +%s)

step "python venv (models/requirements.txt)"
py="$(models/tools/venv.sh)"
"$py" -c 'import numpy, onnx, onnxruntime; print("onnxruntime", onnxruntime.__version__, "numpy", numpy.__version__)'

step "every model file passes onnx.checker"
for m in models/*/*.onnx; do
  "$py" -c 'import onnx, sys; onnx.checker.check_model(onnx.load(sys.argv[1])); print(sys.argv[1], "ok")' "$m"
done

step "reference vectors reproduce under onnxruntime"
"$py" models/tools/verify.py

step "tract in the agent matches the reference vectors (agent/tests/infer.rs)"
cargo test -q -p edgewise-agent --test infer

step "models CI passed in $(( $(date +%s) - start )) s"
