from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.metrics import auc, auc_difference
from onnxcompress.parity import LOSSLESS, LOSSY, Budget, Budgets, budget_with, compare, score_column


def test_identical_outputs_pass_the_strict_budget() -> None:
    scores = np.random.default_rng(0).random(100).astype(np.float32)
    result = compare({"score": scores}, {"score": scores.copy()}, Budgets(LOSSLESS))
    assert result and result.passed
    (output,) = result.outputs
    assert output.kind == "score" and output.max_abs == 0 and output.spearman == pytest.approx(1.0)


def test_failure_reports_the_tolerance_that_would_have_passed() -> None:
    reference = np.linspace(0, 1, 50, dtype=np.float32)
    candidate = reference + np.float32(2e-4)
    result = compare({"score": reference}, {"score": candidate}, Budgets(LOSSLESS))
    assert not result
    (output,) = result.failing
    assert "exceeds atol 1e-05" in output.failures[0]
    assert output.would_pass_with["atol"] == pytest.approx(2e-4, rel=1e-3)
    # Only the budget it missed is worth loosening (the report suggested --min-cosine at cosine 1.0).
    assert output.missed == ("atol",) and "min_cosine" in output.would_pass_with
    loosened = compare(
        {"score": reference}, {"score": candidate}, Budgets(Budget(atol=output.would_pass_with["atol"] * 1.001))
    )
    assert loosened.passed


def test_rtol_scales_with_the_reference() -> None:
    reference = np.array([1.0, 100.0], np.float32)
    candidate = reference * np.float32(1.001)
    assert not compare({"y": reference}, {"y": candidate}, Budgets(Budget(atol=1e-3))).passed
    assert compare({"y": reference}, {"y": candidate}, Budgets(Budget(atol=1e-3, rtol=2e-3))).passed


def test_auc_drop_and_rank_correlation_are_checked_against_labels() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000).astype(np.float32)
    reference = labels * 0.5 + rng.random(2000) * 0.6
    candidate = reference + rng.normal(0, 0.2, 2000)
    result = compare({"score": reference}, {"score": candidate}, Budgets(LOSSY), labels=labels)
    (output,) = result.outputs
    assert output.auc_reference > output.auc_candidate
    assert output.auc_delta == pytest.approx(output.auc_candidate - output.auc_reference)
    assert not output.passed
    assert any("AUC dropped" in failure for failure in output.failures)
    assert any("rank correlation" in failure for failure in output.failures)
    assert output.would_pass_with["max_auc_drop"] == pytest.approx(-output.auc_delta)
    assert output.auc_delta_error == pytest.approx(auc_difference(labels, reference, candidate)[1])
    # Paired: a candidate that barely moves the scores has a far smaller error than one that moves
    # them a lot, though each AUC alone is as uncertain as the other's.
    close = compare(
        {"score": reference}, {"score": reference + rng.normal(0, 0.01, 2000)}, Budgets(LOSSY), labels=labels
    )
    assert 0 < close.outputs[0].auc_delta_error < output.auc_delta_error / 5


def test_per_output_budget_overrides_the_default() -> None:
    reference = {"a": np.zeros(4, np.float32), "b": np.zeros((4, 3), np.float32)}
    candidate = {"a": np.full(4, 0.01, np.float32), "b": np.full((4, 3), 0.01, np.float32)}
    budgets = Budgets(LOSSLESS, {"a": Budget(atol=0.1)})
    result = compare(reference, candidate, budgets)
    assert [output.passed for output in result.outputs] == [True, False]
    assert result.outputs[1].kind == "tensor"


def test_integer_outputs_count_mismatches_and_shapes_must_match() -> None:
    labels = np.array([0, 1, 1, 0], np.int64)
    result = compare({"label": labels}, {"label": np.array([0, 1, 0, 0])}, Budgets(LOSSY))
    (output,) = result.outputs
    assert output.kind == "integer" and output.mismatch == 0.25 and not output.passed
    shape = compare({"y": np.zeros(3)}, {"y": np.zeros(4)}, Budgets(LOSSY))
    assert "shape changed" in shape.outputs[0].failures[0]


def test_nan_in_the_candidate_fails() -> None:
    result = compare({"y": np.ones(3)}, {"y": np.array([1.0, np.nan, 1.0])}, Budgets(Budget()))
    (output,) = result.outputs
    assert not result.passed and output.failures == ("1 values are NaN or infinite where the original's are finite",)
    assert output.nonfinite_mismatch == 1
    assert output.max_abs == np.inf and output.mean_abs == np.inf  # not 0 over the values both give
    all_nan = compare({"y": np.ones(3)}, {"y": np.full(3, np.nan)}, Budgets(Budget())).outputs[0]
    assert all_nan.max_abs == np.inf and np.isnan(all_nan.cosine)  # a table read "cosine 1.000000"


def test_nan_in_the_original_is_named_as_the_original_s_and_left_out_of_ranks_and_auc() -> None:
    """A Keras masked mean gives NaN on an empty history; a compressed model may not: the message
    says which side has the NaN, and Spearman and AUC are taken over the rows both score."""
    rng = np.random.default_rng(0)
    labels = (rng.random(200) < 0.4).astype(np.float32)
    reference = labels + rng.normal(size=200)
    candidate = reference + 0.01 * rng.normal(size=200)
    reference[:10] = np.nan
    result = compare({"score": reference}, {"score": candidate}, Budgets(LOSSY), labels=labels)
    (output,) = result.outputs
    assert not output.passed and output.nonfinite_mismatch == 10
    assert output.failures[0].startswith("the original gives NaN or infinity on 10 values where this model does not")
    assert output.spearman is not None and output.spearman > 0.999
    assert output.auc_reference == pytest.approx(auc(labels[10:], reference[10:]))
    same_nan = compare(
        {"score": reference}, {"score": np.where(np.isnan(reference), np.nan, candidate)}, Budgets(LOSSY)
    )
    assert same_nan.passed  # NaN where the original has NaN is agreement


def test_ranking_groups_average_per_user_top_k() -> None:
    reference = np.concatenate([np.arange(20.0), np.arange(20.0)])
    candidate = reference.copy()
    candidate[39], candidate[20] = candidate[20], candidate[39]  # second user's best item moved
    result = compare({"s": reference}, {"s": candidate}, Budgets(LOSSY), rank_group=20)
    assert result.outputs[0].top10_overlap == pytest.approx((1.0 + 0.9) / 2)


def test_score_column_detection() -> None:
    assert score_column((10,)) == 0
    assert score_column((10, 1)) == 0
    assert score_column((10, 2)) == 1
    assert score_column((10, 64)) is None


def test_a_pipeline_is_held_to_its_loosest_lossy_pass_and_lossless_passes_never_loosen_it() -> None:
    from onnxcompress.pipeline import Pipeline
    from onnxcompress.recipe import build_specs

    assert Pipeline(build_specs(["cleanup"])).budget == LOSSLESS
    assert Pipeline(build_specs(["cleanup", "quant", "cleanup@final"])).budget == LOSSY
    pruned = Pipeline(build_specs(["prune", "quant", "sparse"])).budget
    assert pruned.min_rank_corr == 0.98 and pruned.max_auc_drop == 0.003 and pruned.min_cosine == 0.99


def test_the_lossless_budget_is_a_fraction_of_the_output_s_peak_above_one() -> None:
    """A folded BatchNorm on a regression head reaching 3,590 differs by 7.9e-4 (float32 rounding,
    2e-7 of the peak): the lossless default of 1e-5 absolute refused it. An --atol given stays absolute."""
    reference = np.linspace(-3590.0, 3590.0, 101)
    candidate = reference + 7.9e-4
    assert compare({"y": reference}, {"y": candidate}, Budgets(LOSSLESS)).passed
    absolute = budget_with(LOSSLESS, atol=1e-5)
    failed = compare({"y": reference}, {"y": candidate}, Budgets(absolute)).outputs[0]
    assert not failed.passed and failed.failures[0].startswith("max abs error 0.00079 exceeds atol 1e-05 (rtol 0)")
    small = np.linspace(-0.5, 0.5, 101)
    unit = compare({"y": small}, {"y": small + 2e-5}, Budgets(LOSSLESS)).outputs[0]
    assert not unit.passed  # outputs within [-1, 1] keep 1e-5 absolute


def test_grouped_rank_figures_are_means_and_the_worst_group_is_given() -> None:
    """Per-user Spearman and top-10 are averaged over the groups: the report says over how many and
    gives the worst group (two-tower int8: mean top-10 0.99 over 20 users, the worst user 0.90)."""
    rng = np.random.default_rng(3)
    reference = rng.standard_normal(60)
    candidate = reference.copy()
    candidate[40:] = rng.standard_normal(20)  # the third group is scrambled
    (output,) = compare({"s": reference}, {"s": candidate}, Budgets(LOSSY), rank_group=20).outputs
    assert output.rank_groups == 3
    assert output.worst_spearman is not None and output.worst_spearman < 0.5 < output.spearman
    assert output.worst_top10_overlap is not None and output.worst_top10_overlap < 1.0
    (alone,) = compare({"s": reference}, {"s": candidate}, Budgets(LOSSY)).outputs
    assert alone.rank_groups == 1 and alone.worst_spearman is None
