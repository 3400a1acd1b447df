#!/usr/bin/env bash
# Prints the path of a Python with models/requirements.txt installed: $MODELS_PYTHON if set,
# else models/.venv, created (python3 -m venv, pip from PyPI) on first use.
set -euo pipefail
if [[ -n "${MODELS_PYTHON:-}" ]]; then
  echo "$MODELS_PYTHON"
  exit 0
fi
models="$(cd "$(dirname "$0")/.." && pwd)"
venv="${MODELS_VENV:-$models/.venv}"
if [[ ! -x "$venv/bin/python" ]] || ! cmp -s "$models/requirements.txt" "$venv/.requirements"; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$models/requirements.txt" >&2
  cp "$models/requirements.txt" "$venv/.requirements"
fi
echo "$venv/bin/python"
