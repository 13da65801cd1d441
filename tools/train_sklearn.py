"""Train a scikit-learn MLPClassifier on MovieLens-100k and export it with skl2onnx as models/sklearn_mlp.*.

The single float32 input ``features`` [batch, 75] holds the 25 dense features followed by one-hot encodings
of gender, occupation, age_bucket, zip_region and year_bucket (user and item ids are left out: their
target statistics are already among the dense features). The exported graph is kept exactly as skl2onnx
writes it (``zipmap`` off), with outputs ``label`` int64 [batch] and ``probabilities`` float32 [batch, 2];
the score is column 1 of ``probabilities``.

Runs in the main environment (scikit-learn and skl2onnx from PyPI, under a minute on 2 cores):

    pip install scikit-learn==1.9.1 skl2onnx==1.20.0
    python tools/train_sklearn.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import skl2onnx
import sklearn
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.neural_network import MLPClassifier

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

from movielens import SPARSE_FIELDS, MovieLens, load_movielens  # noqa: E402

from onnxcompress.metrics import auc  # noqa: E402

NAME = "sklearn_mlp"
SEED = 0
OPSET = 17
HIDDEN = (128, 64)
ALPHA = 1.0  # strong L2: the target-rate features are optimistic on the training rows
BATCH = 512
ONE_HOT_FIELDS = ("gender", "occupation", "age_bucket", "zip_region", "year_bucket")
CALIB_ROWS = 512
MAX_ABS_DIFF = 1e-5


def features(data: MovieLens) -> np.ndarray:
    """Dense features followed by the one-hot small sparse fields, float32 (N, 25 + sum of cardinalities)."""
    blocks = [data.dense]
    for field in ONE_HOT_FIELDS:
        k = SPARSE_FIELDS.index(field)
        blocks.append(np.eye(data.cardinalities[k], dtype=np.float32)[data.sparse[:, k]])
    return np.concatenate(blocks, axis=1).astype(np.float32)


def value_info(values: list[onnx.ValueInfoProto]) -> list[dict[str, object]]:
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param or d.dim_value or None for d in t.shape.dim]  # None: dynamic
        out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                    "shape": shape})
    return out


def main() -> None:
    data = load_movielens()
    x = features(data)
    clf = MLPClassifier(hidden_layer_sizes=HIDDEN, activation="relu", alpha=ALPHA, batch_size=BATCH,
                        early_stopping=True, validation_fraction=0.1, n_iter_no_change=10, max_iter=200,
                        random_state=SEED)
    clf.fit(x[data.train], data.label[data.train].astype(np.int64))
    framework_score = clf.predict_proba(x[data.test])[:, 1]
    framework_auc = auc(data.label[data.test], framework_score)

    model = convert_sklearn(clf, name=NAME, initial_types=[("features", FloatTensorType([None, x.shape[1]]))],
                            options={"zipmap": False}, target_opset={"": OPSET, "ai.onnx.ml": 3})
    onnx.checker.check_model(model, full_check=True)
    out_dir = ROOT / "models"
    out_dir.mkdir(exist_ok=True)
    paths = {kind: out_dir / f"{NAME}.{kind}" for kind in ("onnx", "feeds.npz", "labels.npy", "calib.npz")}
    onnx.save(model, paths["onnx"])

    feeds = {"features": x[data.test]}
    calib_rows = np.sort(np.random.default_rng(SEED).choice(data.train, CALIB_ROWS, replace=False))
    np.savez_compressed(paths["feeds.npz"], **feeds)
    np.save(paths["labels.npy"], data.label[data.test].astype(np.float32))
    np.savez_compressed(paths["calib.npz"], features=x[calib_rows])

    session = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]
    ort_score = session.run(["probabilities"], feeds)[0][:, 1]
    max_abs_diff = float(np.max(np.abs(ort_score.astype(np.float64) - framework_score)))
    assert max_abs_diff <= MAX_ABS_DIFF, f"onnxruntime differs from scikit-learn by {max_abs_diff}"
    ort_auc = auc(data.label[data.test], ort_score)

    n_params = sum(w.size for w in clf.coefs_) + sum(b.size for b in clf.intercepts_)
    layers = [x.shape[1], *HIDDEN, 1]
    meta = {
        "name": NAME,
        "architecture": f"MLPClassifier {' -> '.join(map(str, layers))} (ReLU hidden layers, logistic "
                        f"output); input = 25 dense + one-hot {', '.join(ONE_HOT_FIELDS)}",
        "layer_sizes": layers,
        "framework": "scikit-learn",
        "framework_version": sklearn.__version__,
        "exporter": "skl2onnx",
        "exporter_version": skl2onnx.__version__,
        "opset": {op.domain or "ai.onnx": op.version for op in model.opset_import},
        "parameter_count": int(n_params),
        "training": {"iterations": clf.n_iter_, "alpha": ALPHA, "batch_size": BATCH,
                     "early_stopping": "accuracy on a random 10% of the training rows (valid split unused)",
                     "best_validation_score": clf.best_validation_score_},
        "rows": {"train": len(data.train), "valid": len(data.valid), "test": len(data.test),
                 "calib": CALIB_ROWS},
        "test_auc_framework": framework_auc,
        "test_auc_onnxruntime": ort_auc,
        "max_abs_diff_framework_vs_onnxruntime": max_abs_diff,
        "inputs": value_info(list(model.graph.input)),
        "outputs": output_names,
        "score_output": "probabilities",
        "score_column": 1,
        "seed": SEED,
        "rebuild": "python tools/train_sklearn.py",
        "file_sizes": {p.name: p.stat().st_size for p in paths.values()},
    }
    (out_dir / f"{NAME}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
