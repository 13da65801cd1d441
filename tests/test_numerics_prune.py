"""Pure pruning math: masks, N:M groups, global thresholds, bit packing, least squares, OBS selection."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.numerics.lstsq import Gram, NormalEquations, ridge, solve_gram
from onnxcompress.numerics.prune import (
    allocate_sparsities,
    global_sparsities,
    keep_count,
    magnitude_sample,
    nm_mask,
    obs_fit,
    obs_path,
    obs_rows,
    pack_bits,
    parse_nm,
    sparsegpt,
    topk_mask,
    unpack_bits,
)


def test_topk_mask_keeps_an_exact_count_even_with_ties() -> None:
    scores = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 5.0, 0.0]])
    mask = topk_mask(scores, 0.5)
    assert mask.sum() == 4
    assert mask[1, 2]  # the largest survives
    assert not mask[1, 3]  # the smallest goes
    np.testing.assert_array_equal(mask[0], [True, True, True, False])  # ties broken by position


def test_topk_mask_along_an_axis_prunes_every_row_alike() -> None:
    scores = np.array([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_array_equal(topk_mask(scores, 0.5, axis=1), [[1, 1, 0, 0], [0, 0, 1, 1]])
    np.testing.assert_array_equal(topk_mask(scores, 0.5, axis=0), [[1, 1, 0, 0], [0, 0, 1, 1]])


def test_keep_count_rejects_impossible_sparsity() -> None:
    assert keep_count(10, 0.8) == 2
    with pytest.raises(ValueError):
        keep_count(10, 1.5)


def test_nm_mask_keeps_n_largest_in_each_group_along_the_axis() -> None:
    scores = np.array([[1.0, 4.0, 3.0, 2.0, 9.0, 8.0, 0.0, 7.0, 5.0, 6.0]])
    mask = nm_mask(scores, 2, 4, axis=1)
    # groups [1,4,3,2] -> 4,3; [9,8,0,7] -> 9,8; trailing [5,6] keeps min(2, 2) = both
    np.testing.assert_array_equal(mask[0], [0, 1, 1, 0, 1, 1, 0, 0, 1, 1])
    column = nm_mask(scores.T, 1, 4, axis=0)
    assert column[:8].sum() == 2 and column[8:].sum() == 1


@pytest.mark.parametrize(
    ("text", "parsed"), [("2:4", (2, 4)), ("1:8", (1, 8)), ("4:2", None), ("x:4", None), ("24", None)]
)
def test_parse_nm(text: str, parsed: tuple[int, int] | None) -> None:
    assert parse_nm(text) == parsed


def test_global_sparsities_share_one_threshold_and_respect_the_cap() -> None:
    small = magnitude_sample(np.linspace(0.01, 1.0, 100))
    large = magnitude_sample(np.linspace(1.01, 2.0, 100))
    # One threshold at 50% overall: every small weight goes first, no large one.
    assert global_sparsities([small, large], [100, 100], 0.5) == pytest.approx([1.0, 0.0])
    # With a 60% cap the small tensor stops at 60%, the large one makes up the rest.
    capped = global_sparsities([small, large], [100, 100], 0.5, max_layer_sparsity=0.6)
    assert capped == pytest.approx([0.6, 0.4])


def test_allocated_sparsities_meet_the_target_where_pruning_costs_least() -> None:
    levels = [0.0, 0.5, 0.9]
    # Tensor 0 is cheap to prune, tensor 1 expensive, tensor 2 in between but four times larger.
    costs = np.array([[0.0, 0.1, 0.3], [0.0, 5.0, 9.0], [0.0, 0.4, 2.0]])
    sizes = [100, 100, 400]
    sparsities = allocate_sparsities(levels, costs, sizes, 0.5)
    assert sum(s * n for s, n in zip(sparsities, sizes, strict=True)) == pytest.approx(300)
    # Cheapest per entry removed first: tensor 2 to 0.5 (0.4 / 200), tensor 0 to 0.5 (0.1 / 50), tensor 0
    # on to 0.9 (0.2 / 40), then tensor 2 part of the way to 0.9; the expensive tensor stays dense.
    assert sparsities == pytest.approx([0.9, 0.0, 0.525])
    assert allocate_sparsities(levels, costs, sizes, 0.0) == [0.0, 0.0, 0.0]


def test_allocated_sparsities_ignore_dips_and_saturate_at_the_top_level() -> None:
    levels = [0.0, 0.5, 0.8]
    # A measured cost that falls with sparsity is noise: it is read as flat, not as a reason to prune.
    dipping = np.array([[0.0, 1.0, 0.2], [0.0, 0.6, 0.9]])
    assert allocate_sparsities(levels, dipping, [100, 100], 0.25) == pytest.approx([0.0, 0.5])
    assert allocate_sparsities(levels, dipping, [100, 100], 0.95) == pytest.approx([0.8, 0.8])
    with pytest.raises(ValueError, match="rise strictly from 0"):
        allocate_sparsities([0.5, 0.9], dipping, [100, 100], 0.5)


def test_magnitude_sample_is_bounded_for_huge_tensors() -> None:
    sample = magnitude_sample(np.arange(-5000, 5000, dtype=np.float32), limit=1000)
    assert len(sample) <= 1000 and np.all(np.diff(sample) >= 0)


def test_bits_pack_least_significant_first_and_round_trip() -> None:
    mask = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 1], dtype=bool)
    packed = pack_bits(mask)
    np.testing.assert_array_equal(packed, [1, 2])
    np.testing.assert_array_equal(unpack_bits(packed, 10), mask)
    rng = np.random.default_rng(0)
    mask = rng.random((7, 13)) > 0.5
    np.testing.assert_array_equal(unpack_bits(pack_bits(mask), mask.size).reshape(mask.shape), mask)


def test_ridge_without_damping_is_least_squares_and_fits_the_intercept() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6))
    w = rng.standard_normal((6, 3))
    y = x @ w + np.array([1.0, -2.0, 0.5])
    weights, bias = ridge(x, y, damping=0.0, fit_intercept=True)
    np.testing.assert_allclose(weights, w, atol=1e-10)
    np.testing.assert_allclose(bias, [1.0, -2.0, 0.5], atol=1e-10)
    plain, none = ridge(x, x @ w, damping=0.0)
    assert none is None
    np.testing.assert_allclose(plain, np.linalg.lstsq(x, x @ w, rcond=None)[0], atol=1e-10)


def test_masked_solution_is_the_least_squares_fit_on_each_columns_support() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((100, 5))
    y = rng.standard_normal((100, 2))
    keep = np.array([[1, 0], [1, 1], [0, 1], [1, 0], [0, 1]], dtype=bool)
    weights, _ = ridge(x, y, damping=0.0, keep=keep)
    assert np.all(weights[~keep] == 0.0)
    for j in range(2):
        rows = np.flatnonzero(keep[:, j])
        np.testing.assert_allclose(weights[rows, j], np.linalg.lstsq(x[:, rows], y[:, j], rcond=None)[0], atol=1e-10)


def test_gram_accumulates_batches_like_one_pass() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((64, 4)), rng.standard_normal((64, 2))
    streamed = Gram.empty(4, 2)
    for start in range(0, 64, 16):
        streamed.add(x[start : start + 16], y[start : start + 16])
    a = solve_gram(streamed, 0.1, fit_intercept=True)
    b = ridge(x, y, 0.1, fit_intercept=True)
    np.testing.assert_allclose(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1])


def test_prior_pulls_unobserved_inputs_towards_it_instead_of_zero() -> None:
    x = np.zeros((50, 2))
    x[:, 0] = np.random.default_rng(3).standard_normal(50)  # input 1 never fires (a rare one-hot column)
    y = x[:, :1] * 2.0
    prior = np.array([[2.0], [7.0]])
    towards_zero, _ = ridge(x, y, damping=0.1)
    towards_prior, _ = ridge(x, y, damping=0.1, prior=prior)
    assert towards_zero[1, 0] == pytest.approx(0.0)
    assert towards_prior[1, 0] == pytest.approx(7.0)


def test_singular_systems_fall_back_to_lstsq() -> None:
    x = np.ones((10, 3))
    weights, _ = ridge(x, np.ones((10, 1)) * 3, damping=0.0)
    np.testing.assert_allclose(x @ weights, 3.0)


def test_obs_mask_recovers_the_support_of_a_sparse_layer() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((400, 8))
    truth = np.zeros((8, 3))
    truth[[0, 3], 0] = [1.0, -2.0]
    truth[[1, 6], 1] = [0.5, 3.0]
    truth[[2, 7], 2] = [-1.0, 1.5]
    system = NormalEquations.of(Gram.of(x, x @ truth), damping=1e-6)
    fit = obs_fit(system, 0.75)
    np.testing.assert_array_equal(fit.keep, truth != 0)
    np.testing.assert_allclose(fit.weights, truth, atol=1e-4)
    nm = obs_fit(system, 0.0, nm=(1, 4)).keep
    assert nm.sum(axis=0).tolist() == [2, 2, 2]
    # Continuing from the half-sparse mask reaches the same support.
    half, three_quarters = obs_path(system, [0.5, 0.75], steps=2, steps_after=2)
    assert half.keep.sum(axis=0).tolist() == [4, 4, 4] and np.all(half.keep[truth != 0])
    np.testing.assert_array_equal(three_quarters.keep, truth != 0)


def test_obs_path_narrows_each_columns_inverse_as_fresh_inverses_would() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((500, 24)) @ (np.eye(24) + 0.4 * rng.standard_normal((24, 24)))
    y = x @ rng.standard_normal((24, 5)) + 0.3 * rng.standard_normal((500, 5))
    system = NormalEquations.of(Gram.of(x, y), damping=0.01, fit_intercept=True)
    sparsities = [0.3, 0.5, 0.8, 0.95]
    fits = obs_path(system, sparsities, steps=4, steps_after=2)
    # The same rounds with each column's kept system inverted anew every round.
    keep = np.ones((24, 5), dtype=bool)
    kept, schedule = 24, []
    for level, sparsity in enumerate(sparsities):
        start, final, rounds = kept, keep_count(24, sparsity), 4 if level == 0 else 2
        for step in range(1, rounds + 1):
            kept = start - round((start - final) * step / rounds)
            schedule.append((kept, step == rounds))
    expected = []
    for count, level_end in schedule:
        saliency = np.full(keep.shape, -np.inf)
        for column in range(5):
            rows = np.flatnonzero(keep[:, column])
            inverse = np.linalg.inv(system.a[np.ix_(rows, rows)])
            weights = inverse @ system.b[rows, column]
            saliency[rows, column] = weights**2 / np.diag(inverse)
        keep = topk_mask(saliency, 1 - count / 24, axis=0)
        if level_end:
            expected.append(keep)
    for fit, mask, sparsity in zip(fits, expected, sparsities, strict=True):
        np.testing.assert_array_equal(fit.keep, mask)
        assert fit.keep.sum(axis=0).tolist() == [keep_count(24, sparsity)] * 5
        np.testing.assert_allclose(fit.weights, system.solve(fit.keep), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="rising"):
        obs_path(system, [0.5, 0.3])


def test_nm_masks_decided_in_rounds_leave_the_undecided_groups_to_compensate() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 32)) @ (np.eye(32) + 0.6 * rng.standard_normal((32, 32)))  # correlated inputs
    y = x @ rng.standard_normal((32, 8))
    system = NormalEquations.of(Gram.of(x, y), damping=1e-6)
    errors = []
    for steps in (1, 8):
        fit = obs_fit(system, 0.0, steps, nm=(2, 4))
        assert np.all(fit.keep.reshape(8, 4, 8).sum(axis=1) == 2)
        np.testing.assert_allclose(fit.weights, system.solve(fit.keep), rtol=1e-6, atol=1e-9)
        errors.append(np.linalg.norm(x @ fit.weights - y) / np.linalg.norm(y))
    # One shot on the dense solution: 0.38 relative error; eight rounds in input order: 0.22.
    assert errors[1] < 0.7 * errors[0]


def test_obs_rows_drops_the_inputs_the_next_layer_can_do_without() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 6))
    x[:, 4] = x[:, 0] + x[:, 1]  # redundant: removable once the others refit
    w = rng.standard_normal((6, 2))
    w[[2, 5]] = 0.0  # unused
    system = NormalEquations.of(Gram.of(x, x @ w), damping=1e-8)
    assert obs_rows(system, 3).tolist() in ([0, 1, 3], [0, 3, 4], [1, 3, 4])


def test_sparsegpt_hits_the_sparsity_and_beats_plain_magnitude() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((512, 64)) @ rng.standard_normal((64, 64))
    w = rng.standard_normal((64, 16))
    system = NormalEquations.of(Gram.of(x, x @ w), damping=0.01)
    pruned = sparsegpt(system, 0.75, block=32)
    assert np.mean(pruned == 0) == 0.75
    magnitude = np.where(topk_mask(np.abs(w), 0.75), w, 0.0)

    def error(weights: np.ndarray) -> float:
        return float(np.linalg.norm(x @ weights - x @ w))

    assert error(pruned) < error(magnitude)
    nm = sparsegpt(system, 0.0, nm=(2, 4))
    assert ((nm.reshape(16, 4, 16) != 0).sum(axis=1) <= 2).all()


def test_rows_holding_nan_are_left_out_of_the_least_squares_sums() -> None:
    """An attention position every key is masked from is NaN (left padding under a -inf mask);
    one such row made every refit weight NaN."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 4))
    y = x @ rng.standard_normal((4, 2))
    clean = Gram.of(x, y)
    x_nan, y_nan = np.vstack([x, np.full((1, 4), np.nan)]), np.vstack([y, [[np.inf, 0.0]]])
    gram = Gram.of(x_nan, y_nan)
    assert gram.rows == 50
    np.testing.assert_array_equal(gram.xtx, clean.xtx)
    np.testing.assert_array_equal(gram.xty, clean.xty)
