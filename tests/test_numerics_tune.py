"""Joint tuning of a pruned ReLU chain towards the original chain's output."""

from __future__ import annotations

import numpy as np

from onnxcompress.numerics.tune import chain_forward, tune_chain


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
