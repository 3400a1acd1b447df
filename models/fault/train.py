"""Generates the synthetic windows, trains the fault classifier, exports fault.onnx and writes
reference.json (inputs and onnxruntime's outputs) and metrics.json. Run: models/fault/make.sh"""

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tools"))
import ewmodels as ew  # noqa: E402

FEATURES = ["mean", "stddev", "range", "delta", "max_deviation", "count", "rate_hz"]
CLASSES = ew.BEHAVIOURS  # normal, spike, stuck, out_of_band, noisy, step, dropout
MIX = {ew.NORMAL: 0.5, **{b: 0.5 / 6 for b in range(1, 7)}}


def split(seed, n):
    windows = ew.make_dataset(seed, n, MIX)
    return [w.summary() for w in windows], np.array([w.behaviour for w in windows])


def main():
    s_train, y_train = split(11, 30000)
    s_val, y_val = split(12, 5000)
    s_test, y_test = split(13, 5000)

    offset, scale = ew.fit_normalisation(ew.raw_features(s_train, FEATURES))
    norm = lambda s: ew.normalise(ew.raw_features(s, FEATURES), offset, scale)
    x_train = norm(s_train).astype(np.float64)
    onehot = np.eye(len(CLASSES))[y_train]

    params = ew.init_mlp(np.random.default_rng(10), [len(FEATURES), 64, 32, len(CLASSES)])
    params = ew.train(params, x_train, onehot, epochs=40, lr=3e-3, seed=10)

    onnx_path = HERE / "fault.onnx"
    ew.export(
        params, onnx_path, "window_features", "class_probs", "softmax",
        "Edgewise fault classifier: probabilities of 7 sensor behaviours from 7 window features.",
    )

    # The agent's score is 1 - P(normal): the probability that the window shows any fault.
    p_val = ew.ort_run(onnx_path, norm(s_val))
    threshold = ew.choose_threshold(1 - p_val[:, 0], y_val != ew.NORMAL)
    p_test = ew.ort_run(onnx_path, norm(s_test))
    flag = (1 - p_test[:, 0]) >= threshold
    precision, recall = ew.pr(flag, y_test != ew.NORMAL)
    predicted = p_test.argmax(axis=1)
    confusion = np.zeros((len(CLASSES), len(CLASSES)), dtype=int)
    for t, p in zip(y_test, predicted):
        confusion[t, p] += 1
    metrics = {
        "threshold": threshold,
        "threshold_rule": "score = 1 - P(normal); lowest threshold with precision >= 0.95 "
        "on the validation split (seed 12)",
        "test_windows": len(s_test),
        "test_faulty": int((y_test != ew.NORMAL).sum()),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "class_accuracy": round(float(np.mean(predicted == y_test)), 4),
        "recall_by_class": {
            c: round(float(confusion[i, i] / max(1, confusion[i].sum())), 4)
            for i, c in enumerate(CLASSES)
        },
        "confusion_rows_truth_cols_predicted": confusion.tolist(),
        "classes": CLASSES,
        "features": FEATURES,
        "offset": list(offset),
        "scale": list(scale),
        "version": ew.model_version(onnx_path),
    }
    (HERE / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")

    ref_s = s_test[:24]
    x = norm(ref_s)
    ew.write_reference(
        HERE / "reference.json", onnx_path, ref_s, FEATURES, offset, scale, x,
        ew.ort_run(onnx_path, x), tolerance=1e-5,
    )
    print(json.dumps({k: v for k, v in metrics.items() if "confusion" not in k}, indent=1))


if __name__ == "__main__":
    main()
