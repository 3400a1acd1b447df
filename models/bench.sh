#!/usr/bin/env bash
# tract (the agent, release build) vs onnxruntime (Python, from PyPI), in one run, on the same
# models, inputs and batch sizes (1, 16, 64 and 256). Prints latency per batch, summaries/s, and the
# ratio tract/onnxruntime in throughput (> 1: tract is faster). Usage: models/bench.sh [seconds per case]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-2}"
py="$(models/tools/venv.sh)"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
cargo bench -q -p edgewise-agent --bench infer -- --seconds "$seconds" | tee -a "$out" >&2
"$py" models/tools/bench_ort.py --seconds "$seconds" | tee -a "$out" >&2
"$py" - "$out" <<'PY'
import sys, os
r = {}
for line in open(sys.argv[1]):
    p = line.split()
    if len(p) == 4:
        r[(p[0], p[1], int(p[2]))] = float(p[3])
print(f"\n{os.cpu_count()} CPUs; ratio = tract summaries/s / onnxruntime summaries/s (best of ort-1t and ort)")
print("tract: a full batch (the scorer's fixed-batch plan); tract-sym: the same rows through the symbolic-batch plan")
print(f"{'model':8} {'batch':>5} | {'tract us':>9} {'tract sum/s':>12} {'tract-sym us':>12} | {'ort-1t us':>9} {'ort us':>9} {'ort sum/s':>12} | {'ratio':>6} {'sym ratio':>9} | {'score() us':>10}")
for model in ["anomaly", "fault"]:
    for b in [1, 16, 64, 256]:
        t, ts = r[("tract", model, b)], r[("tract-sym", model, b)]
        o1, o = r[("ort-1t", model, b)], r[("ort", model, b)]
        best = min(o1, o)
        print(f"{model:8} {b:>5} | {t:>9.2f} {b/t*1e6:>12,.0f} {ts:>12.2f} | {o1:>9.2f} {o:>9.2f} {b/best*1e6:>12,.0f} | {best/t:>6.2f} {best/ts:>9.2f} | {r[('tract-score', model, b)]:>10.2f}")
PY
