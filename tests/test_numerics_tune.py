"""Joint tuning of a pruned ReLU chain towards the original chain's output."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.numerics.tune import chain_forward, pair_loss, pair_scores, tune_chain, tune_pair


def chain(rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    weights = [rng.standard_normal((12, 24)) / 3.5, rng.standard_normal((24, 8)) / 5, rng.standard_normal((8, 1)) / 3]
    biases = [rng.standard_normal(24) * 0.1, rng.standard_normal(8) * 0.1, np.zeros(1)]
    return weights, biases


def test_tuning_a_pruned_chain_lowers_its_held_out_error_and_keeps_its_zeros() -> None:
    rng = np.random.default_rng(0)
    weights, biases = chain(rng)
    x = rng.standard_normal((1024, 12))
    target = chain_forward(weights, biases, x)[-1]
    pruned = [w * (rng.random(w.shape) < 0.5) for w in weights]
    fit = tune_chain(x, target, pruned, biases, steps=400, biased=[True, True, False])
    assert fit.error_after < 0.5 * fit.error_before
    for before, after in zip(pruned, fit.weights, strict=True):
        assert (after[before == 0] == 0).all()
    np.testing.assert_array_equal(fit.biases[2], biases[2])  # a layer without a bias gets none
    assert not np.array_equal(fit.biases[0], biases[0])


def test_nothing_to_gain_returns_the_given_weights() -> None:
    rng = np.random.default_rng(1)
    weights, biases = chain(rng)
    weights, biases = [w.astype(np.float32) for w in weights], [b.astype(np.float32) for b in biases]
    x = rng.standard_normal((256, 12)).astype(np.float32)
    target = chain_forward(weights, biases, x)[-1]
    fit = tune_chain(x, target, weights, biases, steps=50)
    # The held-out rows' products can round differently from the full batch's in another BLAS.
    assert fit.error_before < 1e-10
    assert fit.error_after == fit.error_before
    for given, returned in zip(weights, fit.weights, strict=True):
        np.testing.assert_array_equal(given, returned)


def tower(rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """12 inputs, 24 hidden units, 4 outputs: one side of a two-tower score."""
    return [rng.standard_normal((12, 24)) / 3.5, rng.standard_normal((24, 4)) / 5], [
        rng.standard_normal(24) * 0.1,
        rng.standard_normal(4) * 0.1,
    ]


@pytest.mark.parametrize("normalized", [True, False])
def test_tuning_two_towers_on_their_dot_products_lowers_the_held_out_error(normalized: bool) -> None:
    rng = np.random.default_rng(2)
    towers = (tower(rng), tower(rng))
    xa, xb = rng.standard_normal((1024, 12)), rng.standard_normal((1024, 12))
    targets = (chain_forward(*towers[0], xa)[-1], chain_forward(*towers[1], xb)[-1])
    pruned = tuple(([w * (rng.random(w.shape) < 0.5) for w in weights], biases) for weights, biases in towers)
    fit = tune_pair((xa, xb), targets, (pruned[0], pruned[1]), steps=600, normalized=normalized, judged_rows=512)
    assert fit.first.error_after < 0.5 * fit.first.error_before
    assert fit.second.error_after == fit.first.error_after
    for side, (weights, _) in zip((fit.first, fit.second), pruned, strict=True):
        for before, after in zip(weights, side.weights, strict=True):
            assert (after[before == 0] == 0).all()
    # What is matched is the products: with cosines, a tower scaled by a constant matches already.
    scaled = ([towers[0][0][0], towers[0][0][1] * 3.0], [towers[0][1][0], towers[0][1][1] * 3.0])
    same = tune_pair((xa, xb), targets, (scaled, towers[1]), steps=0, normalized=True)
    assert same.first.error_before < 1e-10


def test_pair_scores_are_every_row_against_every_row() -> None:
    first, second = np.array([[3.0, 4.0], [1.0, 0.0]]), np.array([[0.0, 2.0], [1.0, 1.0], [2.0, 0.0]])
    np.testing.assert_allclose(pair_scores(first, second, normalized=False), [[8, 7, 6], [0, 1, 2]])
    np.testing.assert_allclose(
        pair_scores(first, second, normalized=True), [[0.8, 7 / 5 / np.sqrt(2), 0.6], [0, 1 / np.sqrt(2), 1]]
    )


@pytest.mark.parametrize("normalized", [True, False])
def test_the_pair_loss_gradient_matches_finite_differences(normalized: bool) -> None:
    rng = np.random.default_rng(3)
    first, second = rng.standard_normal((5, 3)), rng.standard_normal((4, 3))
    target = rng.standard_normal((5, 4)) * 0.5
    _, grad_first, grad_second = pair_loss(first, second, target, normalized, scale=0.7)
    for array, grad in ((first, grad_first), (second, grad_second)):
        numeric = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            saved = array[index]
            array[index] = saved + 1e-6
            up = pair_loss(first, second, target, normalized, 0.7)[0]
            array[index] = saved - 1e-6
            down = pair_loss(first, second, target, normalized, 0.7)[0]
            array[index] = saved
            numeric[index] = (up - down) / 2e-6
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)
