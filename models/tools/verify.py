"""Checks every models/<name>/reference.json against its model with onnxruntime: the version is
the file's SHA-256 prefix, the inputs follow from the summaries by ewmodels' feature mapping, and
onnxruntime reproduces the outputs (1e-6 absolute). Exits 1 on the first mismatch."""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ewmodels as ew  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent


def main():
    refs = sorted(MODELS.glob("*/reference.json"))
    if not refs:
        sys.exit("no models/*/reference.json found")
    for path in refs:
        ref = json.loads(path.read_text())
        model = path.parent / ref["model"]
        problems = []
        if ew.model_version(model) != ref["version"]:
            problems.append(f"version {ew.model_version(model)} != reference {ref['version']}")
        x = np.array(ref["inputs"], dtype=np.float32)
        mapped = ew.normalise(
            ew.raw_features(ref["summaries"], ref["features"]),
            np.array(ref["offset"]),
            np.array(ref["scale"]),
        )
        if not np.array_equal(mapped, x):
            problems.append("inputs do not follow from the summaries")
        got = ew.ort_run(model, x)
        worst = float(np.max(np.abs(got - np.array(ref["outputs"], dtype=np.float32))))
        if worst > 1e-6:
            problems.append(f"onnxruntime differs from the reference by {worst:g}")
        status = "ok" if not problems else "FAILED: " + "; ".join(problems)
        print(f"{path.parent.name}: {len(x)} vectors, max |diff| {worst:.1e}: {status}")
        if problems:
            sys.exit(1)


if __name__ == "__main__":
    main()
