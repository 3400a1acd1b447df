#!/usr/bin/env bash
# Regenerates this model from nothing: synthetic data, training, anomaly.onnx, metrics.json and the
# onnxruntime reference vectors (reference.json). Uses models/.venv (created from
# models/requirements.txt on first run), or $MODELS_PYTHON if set.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="$("$here/../tools/venv.sh")"
"$py" "$here/train.py"
