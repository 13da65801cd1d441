"""Ranking and agreement metrics on plain numpy arrays."""

from __future__ import annotations

import numpy as np

__all__ = ["auc", "auc_difference", "spearman", "top_k_overlap"]


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts - 1) / 2.0 + 1.0, counts)
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count one half); NaN if one class is absent."""
    positive = np.asarray(labels).ravel() > 0.5
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if positive.shape != scores.shape:
        raise ValueError(f"labels have {positive.size} values but scores have {scores.size}")
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc_difference(labels: np.ndarray, reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """``auc(candidate) - auc(reference)`` on the same rows and its standard error (DeLong et al.,
    1988, for two correlated ROC curves): near-identical scores give a small error even on few rows,
    where each AUC alone would be uncertain. NaN for both if one class is absent."""
    positive = np.asarray(labels).ravel() > 0.5
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos < 2 or n_neg < 2:
        return float("nan"), float("nan")
    # Each row's structural component: the share of the other class it outranks.
    pos_parts, neg_parts, aucs = [], [], []
    for scores in (np.asarray(reference, dtype=np.float64).ravel(), np.asarray(candidate, dtype=np.float64).ravel()):
        overall = _average_ranks(scores)
        within_pos = _average_ranks(scores[positive])
        within_neg = _average_ranks(scores[~positive])
        pos_parts.append((overall[positive] - within_pos) / n_neg)
        neg_parts.append(1.0 - (overall[~positive] - within_neg) / n_pos)
        aucs.append(float(pos_parts[-1].mean()))
    pos_cov = np.cov(np.stack(pos_parts))
    neg_cov = np.cov(np.stack(neg_parts))
    variance = (pos_cov[0, 0] + pos_cov[1, 1] - 2 * pos_cov[0, 1]) / n_pos
    variance += (neg_cov[0, 0] + neg_cov[1, 1] - 2 * neg_cov[0, 1]) / n_neg
    return aucs[1] - aucs[0], float(np.sqrt(max(variance, 0.0)))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equally long score vectors; 1.0 when both are constant."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    ra, rb = _average_ranks(a) - (a.size + 1) / 2.0, _average_ranks(b) - (b.size + 1) / 2.0
    denominator = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    if denominator == 0.0:
        return 1.0 if np.array_equal(ra, rb) else 0.0
    return float((ra * rb).sum() / denominator)


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Fraction of the k highest scores of ``a`` that are also among the k highest of ``b``.

    Ties at the k-th score belong to the top k (any order of tied items is a valid ranking): a
    score saturated at 1.0 on hundreds of rows would otherwise be compared by arbitrary picks."""
    a = np.asarray(a).ravel()
    b = np.asarray(b).ravel()
    k = min(k, a.size)
    if k == 0:
        return 1.0
    top_a = np.flatnonzero(a >= np.partition(a, a.size - k)[a.size - k])
    top_b = np.flatnonzero(b >= np.partition(b, b.size - k)[b.size - k])
    return min(1.0, len(np.intersect1d(top_a, top_b)) / k)
