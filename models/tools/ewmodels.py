"""Shared code for the Edgewise edge models: synthetic sensor windows, the agent's window
features, a small numpy MLP trainer, ONNX export and reference vectors.

Feature definitions here must match `agent/src/infer.rs` (`Feature`) exactly; the reference
vectors carry the raw summaries too, so the agent's tests check the mapping, not only the model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# ---------------------------------------------------------------------------------------------
# Synthetic windows of an air-temperature sensor (Cel), like the firmware's Waveform:
# 22.5 +- 6 (sine, 10 minute period) +- uniform noise. Each window is generated reading by reading
# and summarised exactly like the agent does (population stddev, first/last by event time).
# ---------------------------------------------------------------------------------------------

# Behaviours. 0 is normal; the rest are the faults the models learn.
NORMAL, SPIKE, STUCK, SHIFT, NOISY, STEP, DROPOUT = range(7)
BEHAVIOURS = ["normal", "spike", "stuck", "out_of_band", "noisy", "step", "dropout"]

SINE_SLOPE_MAX = 6.0 * 2 * np.pi / 600.0  # Cel per second, steepest point of the sine


@dataclass
class Window:
    behaviour: int
    duration_s: float
    values: np.ndarray  # readings in event-time order

    def summary(self) -> dict:
        v = self.values
        return {
            "count": int(len(v)),
            "min": float(v.min()),
            "max": float(v.max()),
            "mean": float(v.mean()),
            "stddev": float(v.std()),  # population, as the agent's Welford
            "first_value": float(v[0]),
            "last_value": float(v[-1]),
            "window_ms": int(round(self.duration_s * 1000)),
        }


def make_window(rng: np.random.Generator, behaviour: int) -> Window:
    duration = float(rng.choice([2.0, 10.0, 30.0, 60.0]))
    rate_hz = float(rng.uniform(0.5, 4.0))  # sensors sample every 250 ms .. 2 s
    n = max(3, int(round(duration * rate_hz)))
    t = np.sort(rng.uniform(0.0, duration, n))
    level = rng.uniform(16.5, 28.5)
    slope = rng.uniform(-SINE_SLOPE_MAX, SINE_SLOPE_MAX)
    noise = rng.uniform(0.1, 0.8)  # half-width of uniform noise; sensors differ
    clean = level + slope * (t - duration / 2)
    v = clean + rng.uniform(-noise, noise, n)
    if behaviour == SPIKE:
        k = int(rng.integers(1, 3))
        idx = rng.choice(n, size=min(k, n), replace=False)
        v[idx] += rng.choice([-1.0, 1.0], size=len(idx)) * rng.uniform(1.5, 40.0, len(idx))
    elif behaviour == STUCK:
        v[:] = np.round(v[int(rng.integers(0, n))], 1)
    elif behaviour == SHIFT:
        hot = rng.random() < 0.6
        off = rng.uniform(29.0, 75.0) if hot else rng.uniform(-30.0, 16.0)
        v = v - level + off
    elif behaviour == NOISY:
        v = clean + rng.uniform(-1.0, 1.0, n) * rng.uniform(1.2, 10.0)
    elif behaviour == STEP:
        at = int(rng.integers(1, n))
        v[at:] += rng.choice([-1.0, 1.0]) * rng.uniform(1.0, 15.0)
    elif behaviour == DROPOUT:
        # The sensor delivered only a few readings of the window (link or power trouble).
        keep = max(1, int(rng.integers(1, 3)))
        t = t[:keep] if rng.random() < 0.5 else t[-keep:]
        v = level + slope * (t - duration / 2) + rng.uniform(-noise, noise, len(t))
    return Window(behaviour, duration, v)


def make_dataset(seed: int, n: int, mix: dict[int, float]) -> list[Window]:
    rng = np.random.default_rng(seed)
    kinds = list(mix)
    p = np.array([mix[k] for k in kinds])
    p = p / p.sum()
    return [make_window(rng, int(rng.choice(kinds, p=p))) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Window features: the names the agent's config uses. Keep in sync with agent/src/infer.rs.
# ---------------------------------------------------------------------------------------------


def feature(s: dict, name: str) -> float:
    dur_s = s["window_ms"] / 1000.0
    return {
        "count": float(s["count"]),
        "min": s["min"],
        "max": s["max"],
        "mean": s["mean"],
        "stddev": s["stddev"],
        "first": s["first_value"],
        "last": s["last_value"],
        "range": s["max"] - s["min"],
        "delta": s["last_value"] - s["first_value"],
        "max_deviation": max(s["max"] - s["mean"], s["mean"] - s["min"]),
        "rate_hz": s["count"] / dur_s,
        "window_seconds": dur_s,
    }[name]


def raw_features(summaries: list[dict], names: list[str]) -> np.ndarray:
    return np.array([[feature(s, f) for f in names] for s in summaries], dtype=np.float64)


def normalise(raw: np.ndarray, offset: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(x - offset) / scale in float64, then float32: exactly what the agent does."""
    return ((raw - offset) / scale).astype(np.float32)


def fit_normalisation(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z-score, rounded to 4 significant digits so the config and card carry short numbers.
    Heavy-tailed features are scaled by a robust spread so outliers do not flatten normal data."""
    offset = np.median(raw, axis=0)
    q = np.percentile(raw, [5, 95], axis=0)
    scale = np.maximum((q[1] - q[0]) / 3.29, 1e-3)
    r = lambda a: np.array([float(f"{x:.4g}") for x in a])
    return r(offset), r(scale)


# ---------------------------------------------------------------------------------------------
# A small MLP in numpy (ReLU hidden layers; sigmoid or softmax head), trained with Adam.
# ---------------------------------------------------------------------------------------------


def init_mlp(rng, sizes):
    return [
        (rng.normal(0, np.sqrt(2.0 / a), (a, b)), np.zeros(b)) for a, b in zip(sizes, sizes[1:])
    ]


def forward(params, x):
    acts = [x]
    for i, (w, b) in enumerate(params):
        z = acts[-1] @ w + b
        acts.append(np.maximum(z, 0) if i + 1 < len(params) else z)
    return acts


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def train(params, x, y_onehot, epochs, lr, seed, class_weight=None, batch=256):
    """Softmax cross-entropy (a 1-logit head is trained as sigmoid via 2-class softmax on [0, z])."""
    rng = np.random.default_rng(seed)
    m = [(np.zeros_like(w), np.zeros_like(b)) for w, b in params]
    v = [(np.zeros_like(w), np.zeros_like(b)) for w, b in params]
    step = 0
    cw = np.ones(y_onehot.shape[1]) if class_weight is None else class_weight
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for s in range(0, len(x), batch):
            idx = order[s : s + batch]
            xb, yb = x[idx], y_onehot[idx]
            acts = forward(params, xb)
            logits = acts[-1]
            if logits.shape[1] == 1:
                p1 = 1 / (1 + np.exp(-logits))
                grad = (p1 - yb[:, 1:2]) * (yb @ cw)[:, None]
            else:
                grad = (softmax(logits) - yb) * (yb @ cw)[:, None]
            grad /= len(xb)
            step += 1
            for i in reversed(range(len(params))):
                w, b = params[i]
                gw, gb = acts[i].T @ grad, grad.sum(axis=0)
                if i > 0:
                    grad = (grad @ w.T) * (acts[i] > 0)
                for j, (p, g) in enumerate(((w, gw), (b, gb))):
                    mm, vv = m[i][j], v[i][j]
                    mm *= 0.9
                    mm += 0.1 * g
                    vv *= 0.999
                    vv += 0.001 * g * g
                    p -= lr * (mm / (1 - 0.9**step)) / (np.sqrt(vv / (1 - 0.999**step)) + 1e-8)
    return params


# ---------------------------------------------------------------------------------------------
# ONNX export: Gemm/Relu layers, symbolic batch dimension "N", opset 17.
# ---------------------------------------------------------------------------------------------


def export(params, path: Path, input_name: str, output_name: str, head: str, doc: str):
    nodes, inits = [], []
    prev = input_name
    for i, (w, b) in enumerate(params):
        wn, bn = f"layer{i}.weight", f"layer{i}.bias"
        inits += [
            numpy_helper.from_array(w.astype(np.float32), wn),
            numpy_helper.from_array(b.astype(np.float32), bn),
        ]
        out = f"layer{i}.out"
        nodes.append(helper.make_node("Gemm", [prev, wn, bn], [out], name=f"layer{i}"))
        prev = out
        if i + 1 < len(params):
            nodes.append(helper.make_node("Relu", [prev], [f"layer{i}.relu"], name=f"relu{i}"))
            prev = f"layer{i}.relu"
    if head == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", [prev], [output_name], name="head"))
    else:
        nodes.append(helper.make_node("Softmax", [prev], [output_name], name="head", axis=1))
    n_in, n_out = params[0][0].shape[0], params[-1][0].shape[1]
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", n_out])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="edgewise-models",
        doc_string=doc,
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def model_version(path: Path) -> str:
    """The agent's model version: the first 8 hex digits of the file's SHA-256."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def write_reference(
    path: Path, model_path: Path, summaries, names, offset, scale, x, y, tolerance
):
    ref = {
        "model": model_path.name,
        "version": model_version(model_path),
        "produced_by": "onnxruntime " + __import__("onnxruntime").__version__,
        "tolerance_abs": tolerance,
        "features": names,
        "offset": [float(o) for o in offset],
        "scale": [float(s) for s in scale],
        "summaries": summaries,
        # float32 values written as the shortest decimal that reads back to the same float32
        "inputs": [[float(np.format_float_positional(v, unique=True)) for v in row] for row in x],
        "outputs": [[float(np.format_float_positional(v, unique=True)) for v in row] for row in y],
    }
    path.write_text(json.dumps(ref, indent=1) + "\n")


def pr(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    tp = float(np.sum(pred & truth))
    return tp / max(1.0, float(np.sum(pred))), tp / max(1.0, float(np.sum(truth)))


def choose_threshold(score, truth, min_precision=0.95):
    """The lowest threshold (so the highest recall) on a 0.01 grid whose validation precision is
    >= min_precision."""
    best = 0.99
    for t in np.arange(0.99, 0.005, -0.01):
        p, _ = pr(score >= t, truth)
        if p >= min_precision:
            best = float(t)
    return round(best, 2)
