from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxcompress.metrics import auc, auc_difference, spearman, top_k_overlap


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


def test_auc_difference_error_agrees_with_the_bootstrap() -> None:
    rng = np.random.default_rng(3)
    labels = rng.random(1500) < 0.3
    reference = labels * 0.8 + rng.normal(size=labels.size)
    close = reference + 0.1 * rng.normal(size=labels.size)
    far = reference + 1.0 * rng.normal(size=labels.size)
    delta, error = auc_difference(labels, reference, far)
    assert delta == pytest.approx(auc(labels, far) - auc(labels, reference), abs=1e-12)
    draws = []
    for _ in range(300):
        rows = rng.integers(0, labels.size, labels.size)
        draws.append(auc(labels[rows], far[rows]) - auc(labels[rows], reference[rows]))
    assert error == pytest.approx(float(np.std(draws)), rel=0.15)
    # Paired: a candidate close to the reference has a far smaller error than either AUC alone.
    assert auc_difference(labels, reference, close)[1] < error / 3
    assert auc_difference(labels, reference, reference) == (0.0, 0.0)
    assert all(np.isnan(auc_difference(np.ones(4), np.arange(4.0), np.arange(4.0))))


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


def test_top_k_overlap_counts_ties_at_the_cut_as_leaders() -> None:
    """290 scores saturated at 1.0: any ten of them are a valid top ten (the DCN found by a probe
    showed an overlap of 0.00 at a Spearman of 0.9992 from arbitrary picks among the ties)."""
    rng = np.random.default_rng(0)
    reference = np.concatenate([np.ones(290), rng.random(710) * 0.9])
    candidate = reference + rng.normal(0, 1e-3, reference.size)
    candidate[:290] = 1.0 - rng.random(290) * 1e-4  # the tie broken in some order
    assert top_k_overlap(reference, candidate, 10) == 1.0
    assert top_k_overlap(candidate, reference, 10) == 1.0
    moved = candidate.copy()
    moved[np.argsort(candidate)[-10:]] = 0.0  # the candidate's leaders fall out
    assert top_k_overlap(candidate, moved, 10) == 0.0
