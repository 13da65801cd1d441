"""Train a Keras Wide&Deep on MovieLens-100k and export it with tf2onnx as models/keras_wide_deep.*.

Graph inputs: one int64 [batch] id per sparse field, named after the field (user, item, gender, occupation,
age_bucket, zip_region, year_bucket), and ``dense`` float32 [batch, 25]; output ``score`` float32
[batch, 1], the sigmoid of the deep logit plus the wide (linear on ``dense``) logit.

TensorFlow does not share numpy/onnx/protobuf versions with the main environment, so the script runs in
its own virtual environment (versions pinned in tools/requirements-tf.txt). From the repo root:

    python -m venv .cache/tf-venv
    .cache/tf-venv/bin/pip install -r tools/requirements-tf.txt
    .cache/tf-venv/bin/python tools/train_keras.py

Training is deterministic (seeded, op determinism on; reruns give a byte-identical .onnx) and takes under a
minute on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
import tf2onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from movielens import DENSE_FIELDS, SPARSE_FIELDS, MovieLens, load_movielens  # noqa: E402

NAME = "keras_wide_deep"
SEED = 0
OPSET = 17
EMBEDDING_DIMS = {"user": 16, "item": 16, "gender": 2, "occupation": 4, "age_bucket": 4, "zip_region": 4,
                  "year_bucket": 4}
DEEP_UNITS = (256, 128, 64)
EMBEDDING_L2 = 1e-4
DROPOUT = 0.3
BATCH = 256
MAX_EPOCHS = 20
CALIB_ROWS = 512
MAX_ABS_DIFF = 1e-5


def load_metrics() -> ModuleType:
    """onnxcompress/metrics.py by path: the package itself needs the main environment's onnx_ir."""
    spec = importlib.util.spec_from_file_location("onnxcompress_metrics", ROOT / "onnxcompress" / "metrics.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_model(cardinalities: tuple[int, ...]) -> tf.keras.Model:
    sparse_inputs = [tf.keras.Input(shape=(), dtype=tf.int64, name=field) for field in SPARSE_FIELDS]
    dense_input = tf.keras.Input(shape=(len(DENSE_FIELDS),), dtype=tf.float32, name="dense")
    embedded = [
        tf.keras.layers.Embedding(n, EMBEDDING_DIMS[field], name=f"{field}_embedding",
                                  embeddings_regularizer=tf.keras.regularizers.l2(EMBEDDING_L2))(x)
        for field, n, x in zip(SPARSE_FIELDS, cardinalities, sparse_inputs, strict=True)
    ]
    h = tf.keras.layers.Concatenate(name="deep_concat")([*embedded, dense_input])
    for i, units in enumerate(DEEP_UNITS):
        h = tf.keras.layers.Dense(units, activation="relu", name=f"deep_{units}")(h)
        if i == 0:
            h = tf.keras.layers.BatchNormalization(name="deep_bn")(h)
        h = tf.keras.layers.Dropout(DROPOUT, name=f"deep_dropout_{units}")(h)
    deep_logit = tf.keras.layers.Dense(1, name="deep_logit")(h)
    # No wide bias: it would get the same gradient as the deep one and stay equal to it.
    wide_logit = tf.keras.layers.Dense(1, use_bias=False, name="wide_logit")(dense_input)
    logit = tf.keras.layers.Add(name="logit")([deep_logit, wide_logit])
    score = tf.keras.layers.Activation("sigmoid", name="score")(logit)
    return tf.keras.Model([*sparse_inputs, dense_input], score, name=NAME)


def feeds_for(data: MovieLens, rows: np.ndarray) -> dict[str, np.ndarray]:
    feeds = {field: data.sparse[rows, k].astype(np.int64) for k, field in enumerate(SPARSE_FIELDS)}
    feeds["dense"] = data.dense[rows].astype(np.float32)
    return feeds


def value_info(values: list[onnx.ValueInfoProto]) -> list[dict[str, object]]:
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param or d.dim_value or None for d in t.shape.dim]  # a name or None: dynamic
        out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                    "shape": shape})
    return out


def main() -> None:
    tf.keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    auc = load_metrics().auc
    data = load_movielens()
    train, valid, test = (feeds_for(data, rows) for rows in (data.train, data.valid, data.test))

    model = build_model(data.cardinalities)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
                  metrics=[tf.keras.metrics.AUC(name="auc")])
    stop = tf.keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=2,
                                            restore_best_weights=True)
    history = model.fit(train, data.label[data.train], batch_size=BATCH, epochs=MAX_EPOCHS,
                        validation_data=(valid, data.label[data.valid]), callbacks=[stop], verbose=2)
    framework_score = model.predict(test, batch_size=4096, verbose=0)
    framework_auc = auc(data.label[data.test], framework_score)

    signature = [tf.TensorSpec((None,), tf.int64, name=field) for field in SPARSE_FIELDS]
    signature.append(tf.TensorSpec((None, len(DENSE_FIELDS)), tf.float32, name="dense"))
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=OPSET)
    onnx.checker.check_model(proto, full_check=True)
    out_dir = ROOT / "models"
    out_dir.mkdir(exist_ok=True)
    paths = {kind: out_dir / f"{NAME}.{kind}" for kind in ("onnx", "feeds.npz", "labels.npy", "calib.npz")}
    onnx.save(proto, paths["onnx"])

    calib_rows = np.sort(np.random.default_rng(SEED).choice(data.train, CALIB_ROWS, replace=False))
    np.savez_compressed(paths["feeds.npz"], **test)
    np.save(paths["labels.npy"], data.label[data.test].astype(np.float32))
    np.savez_compressed(paths["calib.npz"], **feeds_for(data, calib_rows))

    session = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in session.get_inputs()) == sorted(test), "graph inputs differ from the feeds"
    output_names = [o.name for o in session.get_outputs()]
    ort_score = session.run(["score"], test)[0]
    max_abs_diff = float(np.max(np.abs(ort_score.astype(np.float64) - framework_score)))
    assert max_abs_diff <= MAX_ABS_DIFF, f"onnxruntime differs from Keras by {max_abs_diff}"
    ort_auc = auc(data.label[data.test], ort_score)

    embedding_sizes = ", ".join(f"{f} {n}x{EMBEDDING_DIMS[f]}" for f, n in zip(SPARSE_FIELDS, data.cardinalities,
                                                                                strict=True))
    deep_in = sum(EMBEDDING_DIMS.values()) + len(DENSE_FIELDS)
    meta = {
        "name": NAME,
        "architecture": f"Wide&Deep: embeddings ({embedding_sizes}) + dense -> concat {deep_in} -> "
                        f"{' -> '.join(map(str, DEEP_UNITS))} ReLU (BatchNorm after the first, dropout {DROPOUT} in "
                        f"training) -> 1; wide Dense {len(DENSE_FIELDS)} -> 1 (no bias) on dense; "
                        "sigmoid(deep + wide)",
        "layer_sizes": {"embeddings": {f: [n, EMBEDDING_DIMS[f]] for f, n in zip(SPARSE_FIELDS, data.cardinalities,
                                                                                  strict=True)},
                        "deep": [deep_in, *DEEP_UNITS, 1], "wide": [len(DENSE_FIELDS), 1]},
        "framework": "tensorflow (tf.keras 2)",
        "framework_version": tf.__version__,
        "exporter": "tf2onnx",
        "exporter_version": tf2onnx.__version__,
        "opset": {op.domain or "ai.onnx": op.version for op in proto.opset_import},
        "parameter_count": int(model.count_params()),  # with the BatchNorm moving statistics
        "onnx_initializer_elements": int(sum(np.prod(t.dims) for t in proto.graph.initializer)),
        "training": {"epochs": len(history.history["loss"]), "batch_size": BATCH, "optimizer": "Adam 1e-3",
                     "embedding_l2": EMBEDDING_L2, "dropout": DROPOUT,
                     "best_valid_auc": max(history.history["val_auc"]),
                     "early_stopping": "Keras AUC on the valid split, patience 2, best weights restored"},
        "rows": {"train": len(data.train), "valid": len(data.valid), "test": len(data.test),
                 "calib": CALIB_ROWS},
        "test_auc_framework": framework_auc,
        "test_auc_onnxruntime": ort_auc,
        "max_abs_diff_framework_vs_onnxruntime": max_abs_diff,
        "inputs": value_info(list(proto.graph.input)),
        "outputs": output_names,
        "output_shape": value_info(list(proto.graph.output))[0]["shape"],
        "score_output": "score",
        "seed": SEED,
        "rebuild": ".cache/tf-venv/bin/python tools/train_keras.py (venv from tools/requirements-tf.txt)",
        "file_sizes": {p.name: p.stat().st_size for p in paths.values()},
    }
    (out_dir / f"{NAME}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
