"""Generates the synthetic windows, trains the anomaly scorer, exports anomaly.onnx and writes
reference.json (inputs and onnxruntime's outputs) and metrics.json. Run: models/anomaly/make.sh"""

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tools"))
import ewmodels as ew  # noqa: E402

FEATURES = ["mean", "stddev", "range", "delta", "max_deviation"]
ANOMALOUS = {ew.SPIKE, ew.SHIFT, ew.NOISY, ew.STEP}
# Normal windows dominate, as on a real gateway; stuck and dropout windows are the fault model's.
MIX = {ew.NORMAL: 0.6, ew.SPIKE: 0.1, ew.SHIFT: 0.1, ew.NOISY: 0.1, ew.STEP: 0.1}


def split(seed, n):
    windows = ew.make_dataset(seed, n, MIX)
    summaries = [w.summary() for w in windows]
    truth = np.array([w.behaviour in ANOMALOUS for w in windows])
    return windows, summaries, truth


def main():
    _, s_train, y_train = split(1, 20000)
    _, s_val, y_val = split(2, 5000)
    w_test, s_test, y_test = split(3, 5000)

    offset, scale = ew.fit_normalisation(ew.raw_features(s_train, FEATURES))
    norm = lambda s: ew.normalise(ew.raw_features(s, FEATURES), offset, scale)
    x_train = norm(s_train).astype(np.float64)
    onehot = np.eye(2)[y_train.astype(int)]

    params = ew.init_mlp(np.random.default_rng(0), [len(FEATURES), 32, 16, 1])
    params = ew.train(params, x_train, onehot, epochs=40, lr=3e-3, seed=0)

    onnx_path = HERE / "anomaly.onnx"
    ew.export(
        params, onnx_path, "features", "anomaly_score", "sigmoid",
        "Edgewise anomaly scorer: P(window is anomalous) from 5 normalised window features.",
    )

    score_val = ew.ort_run(onnx_path, norm(s_val))[:, 0]
    threshold = ew.choose_threshold(score_val, y_val)
    score_test = ew.ort_run(onnx_path, norm(s_test))[:, 0]
    flag = score_test >= threshold
    precision, recall = ew.pr(flag, y_test)
    per_behaviour = {
        ew.BEHAVIOURS[b]: round(float(np.mean(flag[[w.behaviour == b for w in w_test]])), 4)
        for b in sorted(MIX)
    }
    metrics = {
        "threshold": threshold,
        "threshold_rule": "lowest threshold with precision >= 0.95 on the validation split (seed 2)",
        "test_windows": len(s_test),
        "test_anomalous": int(y_test.sum()),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "flag_rate_by_behaviour": per_behaviour,
        "features": FEATURES,
        "offset": list(offset),
        "scale": list(scale),
        "version": ew.model_version(onnx_path),
    }
    (HERE / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")

    # Reference vectors: 24 test windows (both classes, every behaviour), plus edge values.
    pick = list(range(0, 24))
    ref_s = [s_test[i] for i in pick]
    x = norm(ref_s)
    ew.write_reference(
        HERE / "reference.json", onnx_path, ref_s, FEATURES, offset, scale, x,
        ew.ort_run(onnx_path, x), tolerance=1e-5,
    )
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
