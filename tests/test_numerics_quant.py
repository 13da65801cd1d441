from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.numerics.quant import (
    binarize_rows,
    dequantize_rows,
    gptq_quantize,
    pack_codes,
    quantize_rows,
    unpack_codes,
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


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_unpack_round_trip_and_size(bits: int) -> None:
    codes = RNG.integers(0, 2**bits, size=(7, 37)).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (7, -(-37 * bits // 8))
    np.testing.assert_array_equal(unpack_codes(packed, bits, 37), codes)


def test_pack_layout_is_little_endian_within_a_byte() -> None:
    assert pack_codes(np.array([1, 2, 3, 0], np.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_codes(np.array([1, 0, 0, 0, 0, 0, 0, 1], np.uint8), 1).tolist() == [0b10000001]


def test_binarize_uses_the_l2_optimal_scale() -> None:
    rows = RNG.standard_normal((10, 100))
    bits, alpha = binarize_rows(rows)
    signs = np.where(bits == 1, 1.0, -1.0)
    best = [min(np.linspace(0.1, 2.0, 400), key=lambda a, r=r, s=s: np.square(a * s - r).sum()) for r, s in zip(rows, signs, strict=True)]
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
