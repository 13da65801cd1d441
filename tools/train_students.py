"""Distil models/deepfm.onnx into a smaller DeepFM student with PyTorch, export it to models/deepfm_student.*.

The student keeps the teacher's inputs (``sparse`` int64 [batch, 7], ``dense`` float32 [batch, 25]),
output (``score``) and FM part, and replaces the deep MLP 137-256-256-256-1 by 137-64-1. It starts
from the teacher's embedding tables, frozen (ids unseen in training, such as most test users, then
look up the same vectors in both), and trains on the teacher's soft targets: the BCE target of every
training row is
``LABEL_WEIGHT * label + (1 - LABEL_WEIGHT) * teacher score``, the teacher scored by onnxruntime on the
same MovieLens-100k training rows as tools/train_deepfm.py (knowledge distillation at temperature 1).
The files are the usual set (onnx, test feeds and labels, calibration rows, meta), so the student is a
model of the zoo, and ``onnxcompress models/deepfm.onnx OUT --passes distill --set
distill.student=models/deepfm_student.onnx`` swaps it in behind the parity gate.

Rebuild from the repo root: ``python tools/train_students.py``
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from movielens import load_movielens
from torch_common import MODELS_DIR, fit, publish, rows, setup
from train_deepfm import DROPOUT, EMBED_DIM, DeepFM

from onnxcompress.metrics import auc, spearman

HIDDEN = (64,)
LABEL_WEIGHT = 0.2


class StudentDeepFM(DeepFM):
    """The teacher's DeepFM with a smaller deep MLP."""

    def __init__(self, cardinalities: tuple[int, ...], n_dense: int) -> None:
        super().__init__(cardinalities, n_dense)
        layers: list[nn.Module] = []
        width = len(cardinalities) * EMBED_DIM + n_dense
        for hidden in HIDDEN:
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(DROPOUT)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)


def adopt_teacher_tables(student: StudentDeepFM) -> None:
    """Copy the teacher's embedding tables and first-order weights into the student and freeze them, so
    ids the training rows never show (most test users) look up the same vectors in both models."""
    teacher = onnx.load(str(MODELS_DIR / "deepfm.onnx"))
    weights = {tensor.name: numpy_helper.to_array(tensor) for tensor in teacher.graph.initializer}
    for name in ("embedding.weight", "first_order.weight"):
        parameter = student.get_parameter(name)
        parameter.data = torch.from_numpy(weights[name].copy())
        parameter.requires_grad_(False)


def teacher_scores(feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(MODELS_DIR / "deepfm.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["score"], feeds)[0].astype(np.float32)


def main() -> None:
    setup()
    data = load_movielens()
    feeds = {"sparse": data.sparse, "dense": data.dense}
    train = rows(feeds, data.train)
    soft = LABEL_WEIGHT * data.label[data.train] + (1 - LABEL_WEIGHT) * teacher_scores(train)
    model = StudentDeepFM(data.cardinalities, data.dense.shape[1])
    adopt_teacher_tables(model)
    trained = fit(
        model,
        train,
        soft.astype(np.float32),
        rows(feeds, data.valid),
        data.label[data.valid],
        lr=1e-3,
        weight_decay=1e-5,
        batch_size=1024,
        max_epochs=10,
        patience=2,
    )
    test = rows(feeds, data.test)
    teacher_test = teacher_scores(test)
    meta = publish(
        "deepfm_student",
        model,
        architecture="DeepFM student of deepfm: shared offset embedding (7 fields x 16) + FM first/second order "
        "+ MLP 1x[Linear 64, BatchNorm1d, ReLU, Dropout 0.2] -> Linear 1, sigmoid; trained on "
        f"{LABEL_WEIGHT:g} x label + {1 - LABEL_WEIGHT:g} x teacher score",
        layers={
            "embedding": [int(sum(data.cardinalities)), EMBED_DIM],
            "first_order": [int(sum(data.cardinalities)), 1],
            "dense_linear": [data.dense.shape[1], 1],
            "mlp": [len(data.cardinalities) * EMBED_DIM + data.dense.shape[1], *HIDDEN, 1],
            "cardinalities": list(data.cardinalities),
        },
        mode="torchscript",
        opset=17,
        test=test,
        test_label=data.label[data.test],
        calib_pool=train,
        split_rows={"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
        trained=trained,
        script="tools/train_students.py",
        notes={"teacher": "models/deepfm.onnx", "label_weight": LABEL_WEIGHT},
    )
    session = ort.InferenceSession(str(MODELS_DIR / "deepfm_student.onnx"), providers=["CPUExecutionProvider"])
    student_test = session.run(["score"], test)[0]
    print(
        f"teacher AUC {auc(data.label[data.test], teacher_test):.4f}  student AUC {meta['test_auc_onnxruntime']:.4f}  "
        f"teacher-student Spearman {spearman(teacher_test, student_test):.4f}"
    )


if __name__ == "__main__":
    main()
