"""onnxruntime side of the inference benchmark (see agent/benches/infer.rs): the same models, the
same input rows (reference.json repeated to the batch size), the same timing rule (median of 5
rounds of mean time per batch). Prints `<runtime> <model> <batch> <microseconds per batch>` with
runtime `ort-1t` (one intra-op thread, like tract) and `ort` (onnxruntime's default threads)."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

MODELS = Path(__file__).resolve().parent.parent


def measure(seconds, f):
    rnd = seconds / 5
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < rnd / 2:
        f()
    rounds = []
    for _ in range(5):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < rnd:
            for _ in range(16):
                f()
            n += 16
        rounds.append((time.perf_counter() - start) * 1e6 / n)
    return sorted(rounds)[2]


def main():
    seconds = float(sys.argv[sys.argv.index("--seconds") + 1]) if "--seconds" in sys.argv else 1.0
    for model in ["anomaly", "fault"]:
        ref = json.loads((MODELS / model / "reference.json").read_text())
        rows = np.array(ref["inputs"], dtype=np.float32)
        for name, threads in [("ort-1t", 1), ("ort", 0)]:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(
                str(MODELS / model / ref["model"]), opts, providers=["CPUExecutionProvider"]
            )
            inp = sess.get_inputs()[0].name
            for batch in [1, 16, 64, 256]:
                x = np.ascontiguousarray(np.resize(rows, (batch, rows.shape[1])))
                us = measure(seconds, lambda: sess.run(None, {inp: x}))
                print(f"{name} {model} {batch} {us:.3f}", flush=True)


if __name__ == "__main__":
    main()
