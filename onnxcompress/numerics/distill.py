"""Pure numerics of distillation: fitting rows made from calibration rows, affine folds, fidelity figures.

A teacher labels any input, so a closed-form student fit is not limited to the labelled calibration
rows: :func:`mix_columns` draws new rows whose every column comes from an independently chosen
calibration row (the product of the columns' empirical distributions). The fits themselves are the
ridge solvers of :mod:`onnxcompress.numerics.lstsq`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from onnxcompress.metrics import spearman

__all__ = ["batchnorm_affine", "cosine_distance", "logit_fidelity", "mix_columns", "relative_error"]


def mix_columns(arrays: Mapping[str, np.ndarray], rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``rows`` new rows, each column of each input drawn from an independently chosen existing row.

    Columns are the last axis of 2-D inputs (one categorical field or dense feature each); inputs of
    any other rank (a 1-D id, a ``[rows, length, dim]`` sequence) are drawn as whole rows. Inputs
    every row shares (a 0-d temperature, a ``[1]`` flag beside batched inputs) are left out: they
    are no rows to mix.
    """
    rng = np.random.default_rng(seed)
    total = max((array.shape[0] for array in arrays.values() if array.ndim), default=0)
    mixed = {}
    for name, array in arrays.items():
        if array.ndim == 0 or array.shape[0] != total:
            continue
        count = array.shape[0]
        if array.ndim == 2:
            picks = rng.integers(0, count, size=(rows, array.shape[1]))
            mixed[name] = array[picks, np.arange(array.shape[1])]
        else:
            mixed[name] = array[rng.integers(0, count, size=rows)]
    return mixed


def batchnorm_affine(
    scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray, epsilon: float
) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNormalization as ``y = x * multiplier + shift`` (float64)."""
    multiplier = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + epsilon)
    return multiplier, bias.astype(np.float64) - mean.astype(np.float64) * multiplier


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """RMS of ``candidate - reference`` over the standard deviation of ``reference`` (0 = identical)."""
    reference = np.asarray(reference, dtype=np.float64)
    difference = np.asarray(candidate, dtype=np.float64) - reference
    spread = float(reference.std())
    rms = float(np.sqrt(np.mean(difference * difference)))
    return rms / spread if spread > 0 else rms


def cosine_distance(inputs: np.ndarray, outputs: np.ndarray) -> float:
    """Mean ``1 - cos`` between matching vectors (last axis) of two arrays, over vectors nonzero in both.

    Zero vectors are padded positions of a sequence (masked out) and have no direction.
    """
    a = np.asarray(inputs, dtype=np.float64).reshape(-1, inputs.shape[-1])
    b = np.asarray(outputs, dtype=np.float64).reshape(-1, outputs.shape[-1])
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    kept = norms > 0
    if not kept.any():
        return 0.0
    return float(np.mean(1.0 - (a[kept] * b[kept]).sum(axis=1) / norms[kept]))


def logit_fidelity(teacher: np.ndarray, student: np.ndarray) -> dict[str, float]:
    """How a student's logits ``[rows, k]`` follow the teacher's: rank correlation of the last column
    (the score) and mean absolute logit error."""
    teacher = np.asarray(teacher, dtype=np.float64).reshape(teacher.shape[0], -1)
    student = np.asarray(student, dtype=np.float64).reshape(student.shape[0], -1)
    return {
        "spearman": round(spearman(teacher[:, -1], student[:, -1]), 5),
        "logit_mae": round(float(np.mean(np.abs(student - teacher))), 5),
    }
