from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxcompress.metrics import auc, spearman, top_k_overlap


def brute_force_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    positives = scores[labels == 1]
    negatives = scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positives, negatives))
    return wins / (len(positives) * len(negatives))


def test_auc_matches_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200), 1)  # many ties
    assert auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)


def test_auc_extremes_and_degenerate_labels() -> None:
    labels = np.array([0, 0, 1, 1])
    assert auc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auc(labels, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert np.isnan(auc(np.ones(4), np.arange(4.0)))
    with pytest.raises(ValueError, match="labels have 4 values"):
        auc(labels, np.arange(3.0))


def test_spearman_is_rank_based() -> None:
    x = np.arange(50.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(np.ones(5), np.ones(5)) == 1.0


def test_top_k_overlap_counts_shared_leaders() -> None:
    a = np.arange(20.0)
    b = a.copy()
    b[19], b[0] = b[0], b[19]  # the best item of a falls to last place in b
    assert top_k_overlap(a, a, 10) == 1.0
    assert top_k_overlap(a, b, 10) == pytest.approx(0.9)
