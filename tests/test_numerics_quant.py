from __future__ import annotations

import warnings

import numpy as np
import pytest

from onnxcompress.numerics.quant import (
    EQUALIZATION_MIN_FACTOR,
    INT8_PAIR_LIMIT,
    QuantizedRows,
    _refit_levels,
    binarize_rows,
    code_planes,
    dequantize_rows,
    equalization_factors,
    gptq_levels,
    gptq_quantize,
    gptq_quantize_output_blocks,
    int8_requantize,
    limit_pair_sums,
    pack_codes,
    packed_width,
    quantize_pair_limited,
    quantize_rows,
    quantized_row_error,
    relative_error,
    tensor_scale,
    unpack_codes,
    with_scale_codebook,
)

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_to_nearest_error_is_at_most_half_a_step(bits: int, symmetric: bool) -> None:
    rows = RNG.standard_normal((50, 33))
    quantized = quantize_rows(rows, bits, symmetric=symmetric)
    step = quantized.scale.astype(np.float64)[:, None]
    assert np.all(np.abs(dequantize_rows(quantized) - rows) <= step / 2 + 1e-12)
    if symmetric:
        assert quantized.codes.dtype == np.int8 and quantized.zero_point is None
        assert np.abs(quantized.codes).max() <= 2 ** (bits - 1) - 1
    else:
        assert quantized.codes.dtype == np.uint8
        assert quantized.codes.max() <= 2**bits - 1


def test_zero_is_exact_and_constant_rows_do_not_divide_by_zero() -> None:
    rows = np.array([[0.0, 0.0, 0.0], [0.0, 1.0, -2.0]])
    for symmetric in (True, False):
        restored = dequantize_rows(quantize_rows(rows, 8, symmetric=symmetric))
        assert np.all(np.isfinite(restored))
        assert restored[0].tolist() == [0.0, 0.0, 0.0] and restored[1, 0] == 0.0


def test_float16_scales_are_stored_without_clipping() -> None:
    rows = RNG.standard_normal((200, 16)) * 3
    quantized = quantize_rows(rows, 8, symmetric=True, scale_dtype=np.float16)
    assert quantized.scale.dtype == np.float16
    # never rounded down: the largest magnitude still fits in [-127, 127] without clipping
    assert np.all(np.abs(dequantize_rows(quantized) - rows) <= quantized.scale[:, None].astype(np.float64) / 2 + 1e-9)


def test_mse_search_never_does_worse_than_full_range() -> None:
    rows = RNG.standard_t(2, size=(100, 64))  # heavy tails: clipping pays off
    plain = np.square(dequantize_rows(quantize_rows(rows, 4)) - rows).sum(axis=1)
    searched = np.square(dequantize_rows(quantize_rows(rows, 4, search=True)) - rows).sum(axis=1)
    assert np.all(searched <= plain + 1e-12)
    assert searched.sum() < 0.95 * plain.sum()


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip_and_size(bits: int) -> None:
    codes = RNG.integers(0, 2**bits, size=(7, 37)).astype(np.uint8)
    packed = pack_codes(codes, bits)
    # each plane pads to a byte on its own: 37 codes of 3 bits take 10 + 5 bytes, not 14
    planes = {1: [1], 2: [2], 3: [2, 1], 4: [4], 5: [4, 1], 6: [4, 2], 7: [4, 2, 1], 8: [8]}[bits]
    assert packed.shape == (7, packed_width(37, bits)) == (7, sum(-(-37 * width // 8) for width in planes))
    np.testing.assert_array_equal(unpack_codes(packed, bits, 37), codes)


def test_three_bit_codes_are_a_two_bit_plane_then_a_one_bit_plane() -> None:
    codes = np.array([5, 2, 7, 0, 1, 6, 3, 4], np.uint8)  # 0b101, 0b010, 0b111, ...
    low = pack_codes(codes & 3, 2)
    high = pack_codes(codes >> 2, 1)
    assert (
        pack_codes(codes, 3).tolist()
        == [*low.tolist(), *high.tolist()]
        == [1 | 2 << 2 | 3 << 4, 1 | 2 << 2 | 3 << 4, 0b10100101]
    )
    assert code_planes(3) == ((0, 2), (2, 1)) and code_planes(4) == ((0, 4),)
    with pytest.raises(ValueError, match="1 to 8 bits"):
        code_planes(9)


def test_pack_layout_is_little_endian_within_a_byte() -> None:
    assert pack_codes(np.array([1, 2, 3, 0], np.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_codes(np.array([1, 0, 0, 0, 0, 0, 0, 1], np.uint8), 1).tolist() == [0b10000001]


def test_binarize_uses_the_l2_optimal_scale() -> None:
    rows = RNG.standard_normal((10, 100))
    bits, alpha = binarize_rows(rows)
    signs = np.where(bits == 1, 1.0, -1.0)
    best = [
        min(np.linspace(0.1, 2.0, 400), key=lambda a, r=r, s=s: np.square(a * s - r).sum())
        for r, s in zip(rows, signs, strict=True)
    ]
    np.testing.assert_allclose(alpha, best, atol=0.005)


def test_gptq_preserves_layer_outputs_better_than_rounding() -> None:
    x = RNG.standard_normal((512, 32)) @ RNG.standard_normal((32, 32))  # correlated inputs
    weight = RNG.standard_normal((16, 32))
    hessian = x.T @ x
    gptq = dequantize_rows(gptq_quantize(weight, hessian, 4)).reshape(16, 32)
    nearest = dequantize_rows(quantize_rows(weight, 4)).reshape(16, 32)
    error_gptq = np.square(x @ (gptq - weight).T).sum()
    error_nearest = np.square(x @ (nearest - weight).T).sum()
    assert error_gptq < 0.7 * error_nearest


def test_gptq_groups_give_one_scale_per_block() -> None:
    weight = RNG.standard_normal((4, 64))
    quantized = gptq_quantize(weight, np.eye(64), 4, group_size=16)
    assert quantized.codes.shape == (16, 16) and quantized.scale.shape == (16,)
    # with an identity Hessian there is no error to spread: GPTQ equals round-to-nearest per block
    nearest = quantize_rows(weight.reshape(16, 16), 4)
    np.testing.assert_array_equal(quantized.codes, nearest.codes)


def _gptq_column_by_column(
    weight: np.ndarray, hessian: np.ndarray, bits: int, group: int, act_order: bool = True
) -> np.ndarray:
    """The textbook GPTQ loop, every column's error applied to all later ones at once: with
    act-order, scales fixed from the original weight and columns in decreasing order of diag(H);
    without, columns in order and each group's scale taken from its columns when it starts."""
    weight = weight.astype(np.float64).copy()
    columns = weight.shape[1]
    top = 2 ** (bits - 1) - 1

    def scale_of(block: np.ndarray) -> np.ndarray:
        peak = np.abs(block).max(axis=1) / top
        scale = np.maximum(peak, np.finfo(np.float32).tiny).astype(np.float32).astype(np.float64)
        return np.where(scale < peak, np.nextafter(scale.astype(np.float32), np.float32(np.inf)), scale)

    scales = np.stack([scale_of(weight[:, i * group : (i + 1) * group]) for i in range(columns // group)], axis=1)
    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(columns)
    weight = weight[:, order]
    damped = hessian[np.ix_(order, order)] + np.eye(columns) * 0.01 * np.mean(np.diag(hessian))
    inverse = np.linalg.cholesky(np.linalg.inv(damped)).T
    codes = np.empty_like(weight)
    for position in range(columns):
        if not act_order and group < columns and position % group == 0:
            scales[:, position // group] = scale_of(weight[:, position : position + group])
        scale = scales[:, order[position] // group]
        code = np.clip(np.rint(weight[:, position] / scale), -top, top)
        codes[:, order[position]] = code
        error = (weight[:, position] - scale * code) / inverse[position, position]
        weight[:, position + 1 :] -= np.outer(error, inverse[position, position + 1 :])
    return codes


@pytest.mark.parametrize("group", [None, 32])
def test_gptq_rounds_the_most_energetic_inputs_first(group: int | None) -> None:
    """Correlated inputs whose energy rises towards the last columns: in natural order those would
    be rounded last, with no columns left to absorb their error (about 0.11 against 0.07)."""
    mixing = np.eye(128) + 0.3 * RNG.standard_normal((128, 128))
    x = (RNG.standard_normal((600, 128)) @ mixing) * np.geomspace(0.05, 5.0, 128)
    weight = RNG.standard_normal((32, 128))
    hessian = x.T @ x
    top = 7

    def output_error(codes: np.ndarray, scales: np.ndarray) -> float:
        restored = codes.reshape(32, -1) * np.repeat(scales.reshape(32, -1), group or 128, axis=1)
        return float(np.linalg.norm(x @ (restored - weight).T) / np.linalg.norm(x @ weight.T))

    quantized = gptq_quantize(weight, hessian, 4, group_size=group)
    scales = quantized.scale.astype(np.float64)
    natural = _gptq_column_by_column(weight, hessian, 4, group or 128, act_order=False)
    assert np.abs(quantized.codes).max() <= top
    assert output_error(quantized.codes.astype(np.float64), scales) < 0.8 * output_error(natural, scales)


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("group", [None, 32, 300])
def test_gptq_lazy_block_updates_match_the_column_by_column_algorithm(group: int | None, act_order: bool) -> None:
    x = RNG.standard_normal((400, 300)) @ RNG.standard_normal((300, 300))
    weight = RNG.standard_normal((24, 300 - 300 % (group or 1)))
    hessian = x[:, : weight.shape[1]].T @ x[:, : weight.shape[1]]
    quantized = gptq_quantize(weight, hessian, 4, group_size=group, act_order=act_order)
    blocked = quantized.codes.reshape(weight.shape)
    reference = _gptq_column_by_column(weight, hessian, 4, group or weight.shape[1], act_order)
    assert np.mean(blocked != reference) < 0.002  # the same up to float rounding at .5 ties


def _output_blocks_column_by_column(weight: np.ndarray, hessian: np.ndarray, block: int) -> np.ndarray:
    """Textbook GPTQ (act-order) with one 4-bit scale per input and block of outputs, fixed from the
    original weight; returns the restored weight."""
    weight = weight.astype(np.float64).copy()
    outputs, columns = weight.shape
    padded = -(-outputs // block) * block
    peaks = np.abs(np.pad(weight, ((0, padded - outputs), (0, 0)))).reshape(-1, block, columns).max(axis=1)
    scales = np.repeat(peaks / 7, block, axis=0)[:outputs].astype(np.float32).astype(np.float64)
    order = np.argsort(-np.diag(hessian), kind="stable")
    damped = hessian[np.ix_(order, order)] + np.eye(columns) * 0.01 * np.mean(np.diag(hessian))
    inverse = np.linalg.cholesky(np.linalg.inv(damped)).T
    weight, scales = weight[:, order], scales[:, order]
    restored = np.empty_like(weight)
    for position in range(columns):
        restored[:, position] = np.clip(np.rint(weight[:, position] / scales[:, position]), -7, 7) * scales[:, position]
        error = (weight[:, position] - restored[:, position]) / inverse[position, position]
        weight[:, position + 1 :] -= np.outer(error, inverse[position, position + 1 :])
    return restored[:, np.argsort(order)]


def test_output_blocks_give_one_scale_per_input_and_block_of_outputs() -> None:
    """40 outputs in blocks of 16 (the last padded), 24 inputs whose weights differ 30-fold in size and
    whose activations make up for it (every input moves the output alike): codes are rows of the
    transposed weight, they restore what the textbook loop computes, and a scale per input beats a
    scale per output and block of inputs on the layer output."""
    magnitudes = np.geomspace(0.1, 3.0, 24)
    weight = RNG.standard_normal((40, 24)) * magnitudes
    x = RNG.standard_normal((500, 24)) @ (np.eye(24) + 0.2 * RNG.standard_normal((24, 24))) / magnitudes
    hessian = x.T @ x
    quantized = gptq_quantize_output_blocks(weight, hessian, 4, 16)
    assert quantized.codes.shape == (24 * 3, 16) and quantized.scale.shape == (72,)
    restored = dequantize_rows(quantized).reshape(24, 48)[:, :40].T
    reference = _output_blocks_column_by_column(weight, hessian, 16)
    assert np.mean(~np.isclose(restored, reference)) < 0.002
    by_output = dequantize_rows(
        gptq_quantize(np.pad(weight, ((0, 0), (0, 8))), np.pad(hessian, ((0, 8), (0, 8))), 4, group_size=16)
    )
    by_output = by_output.reshape(40, 32)[:, :24]

    def error(candidate: np.ndarray) -> float:
        return float(np.linalg.norm(x @ (candidate - weight).T) / np.linalg.norm(x @ weight.T))

    assert error(restored) < 0.8 * error(by_output)


@pytest.mark.parametrize("symmetric", [True, False])
def test_row_codes_carry_the_rows_peak_for_a_one_scale_decision(symmetric: bool) -> None:
    rows = RNG.standard_normal((3000, 64)) * RNG.lognormal(0, 1, (3000, 1))
    quantized = quantize_rows(rows, 4, symmetric=symmetric, scale_dtype=np.float16)
    assert quantized.peak == float(np.abs(rows).max())
    assert tensor_scale(rows, 4, peak=quantized.peak) == tensor_scale(rows, 4)


@pytest.mark.parametrize("search", [False, True])
def test_quantizing_rows_leaves_the_callers_array_untouched(search: bool) -> None:
    rows = RNG.standard_normal((50, 16)).astype(np.float32)
    before = rows.copy()
    quantize_rows(rows, 4, symmetric=False, search=search)
    np.testing.assert_array_equal(rows, before)


@pytest.mark.parametrize(("bits", "symmetric"), [(8, False), (4, False), (4, True), (2, False)])
def test_a_scale_codebook_rounds_scales_up_and_costs_little_precision(bits: int, symmetric: bool) -> None:
    rows = RNG.standard_normal((3000, 16)) * RNG.lognormal(0, 1, (3000, 1))
    plain = quantize_rows(rows, bits, symmetric=symmetric, scale_dtype=np.float16)
    coded = with_scale_codebook(rows, plain)
    assert coded.scale_index.dtype == np.uint8 and coded.codebook.shape == (256,)
    assert np.all(np.diff(coded.codebook.astype(np.float64)) >= 0)
    np.testing.assert_array_equal(coded.scale, coded.codebook[coded.scale_index])
    assert np.all(coded.scale.astype(np.float64) >= plain.scale.astype(np.float64))  # nothing clips
    # consecutive entries are (max/min)^(1/255) apart: a few percent more error at most
    assert quantized_row_error(rows, coded) <= 1.05 * quantized_row_error(rows, plain)
    # the codes are re-rounded for the stored scale: within half a step of every value
    assert np.all(np.abs(dequantize_rows(coded) - rows) <= coded.scale.astype(np.float64)[:, None] * 0.5 + 1e-9)


def test_binary_rows_take_the_codebook_entry_nearest_their_alpha() -> None:
    rows = RNG.standard_normal((2000, 16)) * RNG.lognormal(0, 1, (2000, 1))
    codes, alpha = binarize_rows(rows, np.float16)
    coded = with_scale_codebook(rows, QuantizedRows(codes, alpha, None, 1))
    np.testing.assert_array_equal(coded.codes, codes)
    step = (coded.codebook[-1].astype(np.float64) / coded.codebook[0]) ** (1 / 255)
    ratio = coded.scale.astype(np.float64) / alpha.astype(np.float64)
    assert np.all(ratio <= np.sqrt(step) * 1.001) and np.all(ratio >= 1 / np.sqrt(step) / 1.001)


def _growth(codebook: np.ndarray, scales: np.ndarray) -> float:
    """Summed factor by which scales grow when raised to their codebook entry."""
    from onnxcompress.numerics.quant import _index_at_least

    return float(np.sum(codebook[_index_at_least(codebook, scales)].astype(np.float64) / scales - 1))


def test_a_fitted_codebook_is_the_cheapest_choice_from_its_grid() -> None:
    """Brute force over every 3-entry choice from the 256-entry grid (the top entry fixed) agrees
    with the dynamic programme."""
    from onnxcompress.numerics.quant import fitted_scale_codebook, scale_codebook

    scales = np.exp(np.concatenate([RNG.normal(-4, 0.3, 150), RNG.normal(-9, 1.0, 20)]))
    grid = scale_codebook(scales, 256, np.float64)
    fitted = fitted_scale_codebook(scales, 3, np.float64)
    assert fitted.shape == (3,) and np.all(np.diff(fitted) > 0) and fitted[-1] == grid[-1] >= scales.max()
    best = min(_growth(np.array([grid[a], grid[b], grid[-1]]), scales) for a in range(255) for b in range(a + 1, 255))
    assert _growth(fitted, scales) == pytest.approx(best, rel=1e-9)


def test_a_fitted_16_entry_codebook_costs_less_precision_than_log_spaced_entries() -> None:
    from onnxcompress.numerics.quant import fitted_scale_codebook, scale_codebook

    # most rows' scales in a narrow band, a few near-empty rows (cold ids) decades below
    scales = np.exp(np.concatenate([RNG.normal(-4, 0.5, 2000), RNG.normal(-10, 1, 50)])).astype(np.float16)
    fitted = fitted_scale_codebook(scales, 16, np.float16)
    spaced = scale_codebook(scales, 16, np.float16)
    assert fitted.shape == (16,) and fitted.dtype == np.float16
    assert _growth(fitted, scales.astype(np.float64)) < 0.4 * _growth(spaced, scales.astype(np.float64))
    rows = RNG.standard_normal((len(scales), 16)) * scales.astype(np.float64)[:, None]
    plain = quantize_rows(rows, 4, symmetric=True, scale_dtype=np.float16)
    coded = with_scale_codebook(rows, plain, 16)
    assert coded.codebook.shape == (16,) and np.all(coded.scale.astype(np.float64) >= plain.scale.astype(np.float64))
    assert quantized_row_error(rows, coded) < 1.15 * quantized_row_error(rows, plain)


def test_scale_storage_is_priced_at_one_halving_of_the_error_per_bit_a_value() -> None:
    from onnxcompress.numerics.quant import cheapest_scale_storage, scale_bits_per_row

    assert scale_bits_per_row(None, 1000) == 16
    assert scale_bits_per_row(16, 1000) == pytest.approx(4 + (16 * 16 + 400) / 1000)
    assert scale_bits_per_row(256, 1000) == pytest.approx(8 + (256 * 16 + 400) / 1000)
    # width 16, 10,000 rows: 4 bits a row fewer are worth 2^(4/16) = 1.19x the error
    errors = {None: 0.100, 256: 0.101, 16: 0.118}
    assert cheapest_scale_storage(errors, 10_000, 16) == 16
    assert cheapest_scale_storage({**errors, 16: 0.125}, 10_000, 16) == 256
    # few rows: the codebooks' shared entries cost more than the bytes they save
    assert cheapest_scale_storage(errors, 20, 16) is None


def test_int8_requantization_of_decoded_rows_spans_127_levels_per_pair_of_codes() -> None:
    plain = quantize_rows(RNG.standard_normal((40, 32)), 4, symmetric=True)
    decoded = dequantize_rows(plain).astype(np.float32)
    decoded[7] = 0.0
    codes, scale = int8_requantize(decoded)
    assert codes.dtype == np.int8 and scale.dtype == np.float32
    # The largest pair of each row spans the 127 levels (rounding can take it to 126 or 128).
    magnitudes = np.abs(codes.astype(np.int64))
    pair_sums = (magnitudes[:, 0::2] + magnitudes[:, 1::2]).max(axis=1)
    assert np.all(np.abs(pair_sums[np.arange(40) != 7] - 127) <= 1) and not codes[7].any()
    assert scale[7] > 0  # an all-zero row divides by a tiny scale, not by 0
    pairs = np.abs(decoded[:7, 0::2]) + np.abs(decoded[:7, 1::2])
    np.testing.assert_allclose(scale[:7], pairs.max(axis=1) / np.float32(127), rtol=1e-7)
    # (a value halfway between two codes, rounded in float32, may land a few ulps past the half)
    assert np.all(np.abs(codes * scale[:, None] - decoded) <= scale[:, None] / 2 * (1 + 1e-5))


@pytest.mark.parametrize("inputs", [32, 33])
def test_binary_rows_round_to_int8_exactly(inputs: int) -> None:
    """Signs times one alpha per row: over BINARY_PAIR_LEVELS every code is +-63 (+-64 for a row of
    odd length) and codes times scale give the rows back; over 127 they round +-63.5 and every
    output of the layer comes out 0.8% off."""
    from onnxcompress.numerics.quant import BINARY_PAIR_LEVELS

    alpha = RNG.uniform(0.01, 2.0, 24).astype(np.float32)
    rows = np.where(RNG.random((24, inputs)) < 0.5, -1.0, 1.0).astype(np.float32) * alpha[:, None]
    codes, scale = int8_requantize(rows, BINARY_PAIR_LEVELS)
    assert set(np.unique(np.abs(codes))) == {63 if inputs % 2 == 0 else 64}
    np.testing.assert_allclose(codes * scale[:, None], rows, rtol=1e-6)
    if inputs % 2 == 0:
        codes, scale = int8_requantize(rows)
        # +-63.5 in float32 lands on either side of the half: 0.8% off, one way or the other
        np.testing.assert_allclose(np.abs(np.abs(codes * scale[:, None]) / np.abs(rows) - 1), 0.5 / 63.5, rtol=1e-5)


def test_smoothing_scales_shrink_only_channels_above_the_median() -> None:
    from onnxcompress.numerics.quant import smoothing_scales

    activation_peaks = np.array([1.0, 2.0, 4.0, 400.0, 0.0, 0.001])
    weight_peaks = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    scales = smoothing_scales(activation_peaks, weight_peaks, 0.5)
    assert scales.min() >= 1.0  # no channel is amplified, not even the nearly dead one
    assert scales[4] == 1.0  # a channel that is zero on the calibration rows keeps 1
    live = np.array([0, 1, 2, 3, 5])
    assert np.median(np.sqrt(activation_peaks[live])) == pytest.approx(np.sqrt(2.0))
    assert scales[3] == pytest.approx(np.sqrt(400.0) / np.sqrt(2.0), rel=1e-6)


def test_smoothing_cuts_the_error_of_8_bit_activations_when_one_channel_dominates() -> None:
    from onnxcompress.numerics.quant import plan_activations

    rng = np.random.default_rng(3)
    x = rng.standard_normal((512, 32)).astype(np.float32)
    x[:, 5] *= 300.0  # dense feature next to embeddings: one channel sets the per-tensor step
    rows = rng.standard_normal((16, 32)).astype(np.float32)
    plan = plan_activations([x[:256], x[256:]], rows)
    assert plan.scales is not None and plan.scales.argmax() == 5
    assert plan.error < 0.5 * plan.error_unsmoothed
    np.testing.assert_allclose((x / plan.scales) @ (rows * plan.scales).T, x @ rows.T, rtol=1e-4, atol=1e-3)
    uniform = rng.standard_normal((512, 32)).astype(np.float32)
    assert plan_activations([uniform], rows).error <= plan_activations([uniform], rows).error_unsmoothed


@pytest.mark.parametrize("by_output", [False, True])
def test_gptq_scales_in_a_codebook_are_fixed_before_rounding(by_output: bool) -> None:
    """With a codebook every block's scale is raised to its entry before any code is chosen: the
    stored scale is the one rounded for, an all-zero block does not stretch the log spacing, and
    the layer output error stays within a few percent of free float scales."""
    x = RNG.standard_normal((800, 64)) @ (np.eye(64) + 0.3 * RNG.standard_normal((64, 64)))
    weight = RNG.standard_normal((96, 64)) * RNG.lognormal(0, 0.5, (96, 1))
    weight[:, 5] = 0.0  # a dead input: its blocks are all zero
    hessian = x.T @ x

    def quantize(size: int | None) -> QuantizedRows:
        if by_output:
            return gptq_quantize_output_blocks(weight, hessian, 4, 32, codebook_size=size)
        return gptq_quantize(weight, hessian, 4, group_size=32, codebook_size=size)

    def error(quantized: QuantizedRows) -> float:
        restored = dequantize_rows(quantized)
        restored = restored.reshape(64, 96).T if by_output else restored.reshape(96, 64)
        return float(np.linalg.norm(x @ (restored - weight).T) / np.linalg.norm(x @ weight.T))

    free, booked = quantize(None), quantize(256)
    assert booked.codebook is not None and booked.scale_index is not None and booked.scale_index.dtype == np.uint8
    np.testing.assert_array_equal(booked.scale, booked.codebook[booked.scale_index])
    live = free.scale[free.scale > np.finfo(np.float32).tiny]
    assert booked.codebook[0] == pytest.approx(live.min(), rel=1e-6)
    assert np.all(booked.scale[free.scale > np.finfo(np.float32).tiny] >= live)  # raised, never lowered
    assert error(booked) < 1.05 * error(free)


@pytest.mark.parametrize("variant", ["act_order", "natural", "output_blocks"])
def test_gptq_keeps_pruned_weights_at_zero_and_still_compensates(variant: str) -> None:
    """A weight pruned to 80% zeros: every zero decodes to exactly zero (the sparsity survives for
    `sparse` to store), and the kept weights still absorb the rounding error better than rounding
    to nearest does."""
    x = RNG.standard_normal((600, 64)) @ (np.eye(64) + 0.4 * RNG.standard_normal((64, 64)))
    weight = RNG.standard_normal((48, 64))
    weight[RNG.random(weight.shape) < 0.8] = 0.0
    hessian = x.T @ x
    if variant == "output_blocks":
        restored = dequantize_rows(gptq_quantize_output_blocks(weight, hessian, 4, 16)).reshape(64, 48).T
    else:
        quantized = gptq_quantize(weight, hessian, 4, group_size=32, act_order=variant == "act_order")
        restored = dequantize_rows(quantized).reshape(48, 64)
    assert np.all(restored[weight == 0] == 0)
    nearest = dequantize_rows(quantize_rows(weight.reshape(-1, 32), 4)).reshape(48, 64)

    def error(candidate: np.ndarray) -> float:
        return float(np.linalg.norm(x @ (candidate - weight).T))

    assert error(restored) < error(nearest)


def test_equalization_factors_give_every_unit_the_median_peak() -> None:
    peaks = np.array([1.0, 2.0, 4.0, 8.0, 3.0, 1e-36, 0.0])
    factors = equalization_factors(peaks)
    assert factors[:5] == pytest.approx(peaks[:5] / 2.5)  # the median of the six live peaks
    assert np.allclose(peaks[:5] / factors[:5], 2.5)
    # a unit trained to nothing is not blown up (its bias would leave float16), a dead one is left alone
    assert factors[5] == EQUALIZATION_MIN_FACTOR and factors[6] == 1.0
    assert np.all(equalization_factors(np.zeros(4)) == 1.0)


def test_equalized_layers_keep_the_product_and_one_scale_keeps_the_per_channel_error() -> None:
    """Units of very different ranges: dividing them by their factors and multiplying the next
    layer's rows back is exact through ReLU, and one 8-bit scale for the equalised layer then has
    the error per-channel scales have on the original (one scale without equalising does not)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((400, 24))
    first = rng.standard_normal((24, 32)) * np.geomspace(0.01, 10, 32)  # [inputs, units]
    second = rng.standard_normal((32, 8))
    bias = rng.standard_normal(32)
    reference = np.maximum(x @ first + bias, 0) @ second
    factors = equalization_factors(np.abs(first).max(axis=0))
    first_eq, bias_eq, second_eq = first / factors, bias / factors, second * factors[:, None]
    np.testing.assert_allclose(np.maximum(x @ first_eq + bias_eq, 0) @ second_eq, reference, rtol=1e-10, atol=1e-9)

    def error(layer: np.ndarray, quantized: QuantizedRows, bias: np.ndarray, after: np.ndarray) -> float:
        restored = dequantize_rows(quantized).reshape(layer.T.shape).T
        output = np.maximum(x @ restored + bias, 0) @ after
        return float(np.linalg.norm(output - reference) / np.linalg.norm(reference))

    per_channel = error(first, quantize_rows(first.T, 8), bias, second)
    one_scale = error(first, quantize_rows(first.T.reshape(1, -1), 8), bias, second)
    equalized = error(first_eq, quantize_rows(first_eq.T.reshape(1, -1), 8), bias_eq, second_eq)
    assert one_scale > 2.5 * per_channel
    assert equalized < 1.2 * per_channel, (equalized, per_channel)


def test_static_activation_range_clips_a_heavy_tail_and_keeps_zero_exact() -> None:
    """The MSE search narrows the range where a heavy tail would spend the 256 levels on a few
    values (less squared error than the full min/max range), zero stays a code, and the fake
    quantization is what ONNX QuantizeLinear + DequantizeLinear compute."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxcompress.numerics.quant import StaticActivation, _uint8_range, static_activation_range

    rng = np.random.default_rng(4)
    x = rng.standard_t(2, (4096, 16)).astype(np.float32)  # heavy tails, both signs
    chosen = static_activation_range([x[:2048], x[2048:]])
    full = _uint8_range(float(x.min()), float(x.max()))
    assert chosen.scale < 0.95 * full.scale
    assert np.square(chosen.fake_quantize(x) - x).sum() < np.square(full.fake_quantize(x) - x).sum()
    assert chosen.fake_quantize(np.zeros(3, np.float32)).tolist() == [0.0, 0.0, 0.0]
    relu = np.maximum(x, 0)
    assert static_activation_range([relu]).zero_point == 0  # ReLU outputs: the whole range above 0
    assert static_activation_range([np.zeros((4, 4), np.float32)]) == StaticActivation(1.0, 0)

    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4096, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4096, 16])],
        [
            numpy_helper.from_array(np.array(chosen.scale, np.float32), "s"),
            numpy_helper.from_array(np.array(chosen.zero_point, np.uint8), "z"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], chosen.fake_quantize(x), rtol=0, atol=1e-6)


def test_alpha_codebook_is_the_best_choice_of_entries_for_the_summed_squared_log_ratio() -> None:
    """Brute force over every way to cut nine weighted alphas (sorted) into three runs, each run's
    entry its weighted mean in log: the codebook's error is the smallest; each alpha takes its
    nearest entry (in log); an alpha alone keeps its own value."""
    import itertools

    from onnxcompress.numerics.quant import alpha_codebook

    for seed in range(4):
        rng = np.random.default_rng(seed)
        alphas = rng.lognormal(0, 1, 9)
        weights = rng.integers(1, 5, 9).astype(np.float64)
        logs = np.log(alphas)
        order = np.argsort(logs)
        best = min(
            sum(
                float((weights[run] * (logs[run] - np.average(logs[run], weights=weights[run])) ** 2).sum())
                for run in np.split(order, cuts)
            )
            for cuts in itertools.combinations(range(1, 9), 2)
        )
        codebook, index = alpha_codebook(alphas, weights, 3, np.float64)
        assert codebook.shape == (3,) and np.all(np.diff(codebook) > 0)
        taken = np.log(codebook[index])
        assert float((weights * (taken - logs) ** 2).sum()) == pytest.approx(best, rel=1e-9)
        nearest = np.abs(np.log(codebook)[None, :] - logs[:, None]).argmin(axis=1)
        np.testing.assert_array_equal(index, nearest)
    codebook, index = alpha_codebook(np.array([0.25, 0.25, 3.0]), np.ones(3), 16, np.float16)
    np.testing.assert_array_equal(codebook[index], np.array([0.25, 0.25, 3.0], np.float16))
    # Heavy weights (a table's signs: thousands per alpha) computed without an overflow warning,
    # which would reach the user's console.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        codebook, index = alpha_codebook(RNG.lognormal(0, 1, 300), np.full(300, 1e5), 16, np.float16)
    assert codebook.shape == (16,) and index.max() == 15


@pytest.mark.parametrize("symmetric", [False, True])
def test_refined_row_codes_keep_the_scales_and_weigh_the_error_by_the_hessian(symmetric: bool) -> None:
    """Codes rounded again against ``H`` with each row's scale and zero point kept: the same codes
    GPTQ gives for those scales (GPTQ's loop), a smaller ``delta H delta^T`` than nearest rounding,
    in the codes' range; a row whose every value is 0 stays 0 exactly."""
    from onnxcompress.numerics.quant import gptq_quantize, refine_row_codes

    rng = np.random.default_rng(11)
    rows = rng.standard_normal((300, 16))
    rows[7] = 0.0
    mixing = rng.standard_normal((16, 16)) * np.linspace(0.05, 3.0, 16)
    hessian = mixing.T @ mixing
    nearest = quantize_rows(rows, 4, symmetric=symmetric)
    refined = refine_row_codes(rows, nearest, hessian)
    np.testing.assert_array_equal(refined.scale, nearest.scale)
    gptq = gptq_quantize(rows, hessian, 4, symmetric=symmetric)
    np.testing.assert_array_equal(gptq.scale.astype(np.float64), nearest.scale.astype(np.float64))
    np.testing.assert_array_equal(refined.codes, gptq.codes.reshape(refined.codes.shape))

    def weighted(codes: QuantizedRows) -> float:
        delta = dequantize_rows(codes) - rows
        return float(np.einsum("ij,jk,ik->", delta, hessian, delta))

    assert weighted(refined) < 0.7 * weighted(nearest)
    assert refined.codes.dtype == nearest.codes.dtype
    low, high = (-7, 7) if symmetric else (0, 15)
    assert refined.codes.min() >= low and refined.codes.max() <= high
    assert np.all(dequantize_rows(refined)[7] == 0.0)
    with pytest.raises(ValueError, match="one scale per row"):
        refine_row_codes(rows[:10], nearest, hessian)


def _largest_pair_sum(codes: np.ndarray) -> int:
    magnitudes = np.abs(codes.astype(np.int64))
    return int((magnitudes[:, 0::2] + magnitudes[:, 1::2]).max())


def test_int8_codes_for_integer_kernels_keep_each_pair_within_16_bits() -> None:
    """onnxruntime's uint8 x int8 kernels without VNNI add two neighbouring products in 16 bits with
    saturation: with activations up to 255, |w 2j| + |w 2j+1| <= 128 keeps the sum exact. Codes at
    the plain scale max/127 break it (Gaussian rows: about 2% of pairs); the limited codes keep it
    at close to the plain codes' error (a scale widened where the limit costs least)."""
    rng = np.random.default_rng(11)
    rows = rng.standard_normal((64, 256)).astype(np.float32)
    plain = quantize_rows(rows, 8, symmetric=True)
    assert _largest_pair_sum(plain.codes) > INT8_PAIR_LIMIT
    plain_error = relative_error(rows, dequantize_rows(plain))
    for one_scale in (False, True):
        limited = quantize_pair_limited(rows, one_scale=one_scale)
        assert _largest_pair_sum(limited.codes) <= INT8_PAIR_LIMIT
        error = relative_error(rows, limited.codes * limited.scale.reshape(-1, 1).astype(np.float64))
        assert error < 1.5 * plain_error + 0.002, (one_scale, error, plain_error)
    # Cutting the pairs at the plain scale costs several times the rounding error.
    targets = rows / plain.scale[:, None]
    cut = limit_pair_sums(plain.codes, targets)
    assert _largest_pair_sum(cut) <= INT8_PAIR_LIMIT
    assert relative_error(rows, cut * plain.scale[:, None].astype(np.float64)) > 3 * plain_error


def test_gptq_under_the_pair_limit_keeps_pairs_and_its_output_error() -> None:
    rng = np.random.default_rng(12)
    inputs = rng.standard_normal((1024, 64)) @ rng.standard_normal((64, 64))
    weight = rng.standard_normal((32, 64))
    hessian = inputs.T @ inputs
    free = gptq_quantize(weight, hessian, 8)
    limited = gptq_quantize(weight, hessian, 8, pair_limit=INT8_PAIR_LIMIT)
    assert _largest_pair_sum(free.codes) > INT8_PAIR_LIMIT >= _largest_pair_sum(limited.codes)

    def output_error(quantized: QuantizedRows) -> float:
        return relative_error(inputs @ weight.T, inputs @ dequantize_rows(quantized).reshape(weight.shape).T)

    assert output_error(limited) < 1.5 * output_error(free)
    with pytest.raises(ValueError, match="pair_limit"):
        gptq_quantize(weight, hessian, 8, group_size=32, pair_limit=INT8_PAIR_LIMIT)


@pytest.mark.parametrize("inputs", [64, 63])
def test_int8_codes_computed_at_load_keep_each_pair_within_16_bits(inputs: int) -> None:
    """Codes a graph computes from decoded 4-bit weights take the largest pair sum over 127 as their
    scale (an odd row: the peak over 64 levels), so no pair can pass the limit."""
    rng = np.random.default_rng(13)
    rows = (rng.integers(-7, 8, (48, inputs)) * 0.05).astype(np.float32)
    codes, scale = int8_requantize(rows)
    padded = np.pad(codes, ((0, 0), (0, inputs % 2)))
    assert _largest_pair_sum(padded) <= INT8_PAIR_LIMIT
    assert np.abs(codes.astype(np.float32) * scale[:, None] - rows).max() <= scale.max() / 2 + 1e-6


def _layer_error(weight: np.ndarray, approximation: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm(x @ (approximation - weight).T) / np.linalg.norm(x @ weight.T))


def test_fitted_levels_beat_evenly_spaced_2_bit_blocks_at_fewer_bytes() -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1024, 64)) @ rng.standard_normal((64, 64))
    weight = rng.standard_normal((48, 64)) * rng.uniform(0.2, 2.0, (48, 1))
    hessian = x.T @ x
    leveled = gptq_levels(weight, hessian, 2)
    assert leveled.codes.shape == weight.shape and leveled.codes.dtype == np.uint8 and leveled.codes.max() < 4
    assert leveled.levels is not None and leveled.levels.shape == (4,) and np.all(np.diff(leveled.levels) > 0)
    assert leveled.scale.shape == (48,) and leveled.column_scale is None
    blocks = gptq_quantize(weight, hessian, 2, group_size=32, act_order=False, scale_dtype=np.float16)
    level_error = _layer_error(weight, dequantize_rows(leveled), x)
    block_error = _layer_error(weight, dequantize_rows(blocks).reshape(weight.shape), x)
    assert level_error < 0.6 * block_error
    # Levels store a scale a row and four levels; blocks a scale per 32 values.
    assert leveled.scale.size + leveled.levels.size < blocks.scale.size


def test_levels_with_an_identity_hessian_are_the_nearest_level_of_each_value() -> None:
    rng = np.random.default_rng(12)
    weight = rng.standard_normal((20, 40))
    leveled = gptq_levels(weight, np.eye(40), 3, damping=0.0)
    assert leveled.levels is not None
    normalized = weight / leveled.scale.astype(np.float64)[:, None]
    nearest = np.abs(normalized[..., None] - leveled.levels.astype(np.float64)).argmin(axis=-1)
    assert np.mean(leveled.codes == nearest) > 0.999  # ties aside


def test_refitted_levels_are_the_least_squares_optimum_for_the_codes() -> None:
    rng = np.random.default_rng(13)
    x = rng.standard_normal((300, 24)) @ rng.standard_normal((24, 24))
    weight = rng.standard_normal((10, 24))
    codes = rng.integers(0, 4, weight.shape).astype(np.uint8)
    scales = rng.uniform(0.5, 1.5, 10)
    levels = _refit_levels(weight, x.T @ x, codes, scales, np.zeros(4))
    # The same fit written out: the layer outputs x @ (S L[codes])^T are linear in the levels.
    design = np.stack([(x @ np.where(codes == level, scales[:, None], 0.0).T).ravel() for level in range(4)], axis=1)
    expected = np.linalg.lstsq(design, (x @ weight.T).ravel(), rcond=None)[0]
    np.testing.assert_allclose(levels, expected, rtol=1e-8, atol=1e-10)


def test_column_scales_follow_inputs_of_unlike_magnitude() -> None:
    rng = np.random.default_rng(14)
    magnitudes = np.geomspace(0.01, 10.0, 32)
    x = rng.standard_normal((512, 32)) / magnitudes  # small weights read large inputs, as one-hot next to dense
    weight = rng.standard_normal((16, 32)) * magnitudes
    hessian = x.T @ x
    rows_only = gptq_levels(weight, hessian, 2)
    with_columns = gptq_levels(weight, hessian, 2, column_scales=True)
    assert with_columns.column_scale is not None and with_columns.column_scale.shape == (32,)
    np.testing.assert_allclose(
        dequantize_rows(with_columns),
        with_columns.scale.astype(np.float64)[:, None]
        * with_columns.levels.astype(np.float64)[with_columns.codes]  # type: ignore[union-attr]
        * with_columns.column_scale.astype(np.float64),
    )
    assert _layer_error(weight, dequantize_rows(with_columns), x) < 0.5 * _layer_error(
        weight, dequantize_rows(rows_only), x
    )


def test_two_fitted_levels_with_error_feedback_beat_signs_times_the_mean_magnitude() -> None:
    rng = np.random.default_rng(16)
    x = rng.standard_normal((1024, 64)) @ rng.standard_normal((64, 64))
    weight = rng.standard_normal((48, 64)) * rng.uniform(0.2, 2.0, (48, 1))
    leveled = gptq_levels(weight, x.T @ x, 1)
    assert leveled.levels is not None and leveled.levels.shape == (2,) and leveled.codes.max() == 1
    signs, alpha = binarize_rows(weight)
    binary = (2.0 * signs - 1.0) * alpha[:, None]
    assert _layer_error(weight, dequantize_rows(leveled), x) < 0.9 * _layer_error(weight, binary, x)  # 0.52, 0.59


@pytest.mark.parametrize("bits", [0, 8])
def test_levels_take_1_to_7_bits(bits: int) -> None:
    with pytest.raises(ValueError, match="1 to 7 bits"):
        gptq_levels(np.ones((2, 4)), np.eye(4), bits)


def test_column_scales_of_inputs_apart_by_orders_of_magnitude_keep_the_hessian_invertible() -> None:
    """Column scales are stored in float16; their products (1e-4 squared) must not be formed in it,
    where they underflow to 0 and zero the Hessian's rows (a scikit-learn MLP's rarely set inputs)."""
    rng = np.random.default_rng(15)
    x = rng.standard_normal((256, 16))
    weight = 0.05 * rng.standard_normal((8, 16))
    weight[:, :3] *= 1e-4
    leveled = gptq_levels(weight, x.T @ x, 3, column_scales=True)
    assert leveled.column_scale is not None and leveled.column_scale.min() > 0
    assert _layer_error(weight, dequantize_rows(leveled), x) < 0.2
