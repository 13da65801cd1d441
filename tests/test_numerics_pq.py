"""Product quantization numerics: k-means codebooks, assignment, sizes and error against scalar codes."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.numerics.pq import product_dequantize, product_quantize
from onnxcompress.numerics.quant import binarize_rows, quantize_rows, quantized_row_error, row_relative_error

RNG = np.random.default_rng(0)


def clustered_rows(rows: int = 3000, width: int = 16) -> np.ndarray:
    """Rows near a few directions with log-normal norms, like trained embedding tables."""
    directions = RNG.standard_normal((12, width))
    return (directions[RNG.integers(0, 12, rows)] + 0.3 * RNG.standard_normal((rows, width))) * RNG.lognormal(
        0, 0.5, (rows, 1)
    )


@pytest.mark.parametrize("dims", [2, 4])
def test_every_sub_vector_gets_its_nearest_centroid(dims: int) -> None:
    rows = clustered_rows()
    codes = product_quantize(rows, dims, 16, dtype=np.float64)
    assert codes.codes.shape == (3000, 16 // dims) and codes.codes.dtype == np.uint8
    assert codes.codebooks.shape == (16 // dims, 16, dims) and int(codes.codes.max()) < 16
    for sub in range(16 // dims):
        part = rows[:, sub * dims : (sub + 1) * dims]
        distances = ((part[:, None, :] - codes.codebooks[sub][None]) ** 2).sum(-1)
        np.testing.assert_array_equal(codes.codes[:, sub], distances.argmin(axis=1))


def test_at_equal_bytes_a_row_product_codes_beat_binary_rows() -> None:
    """16 values a row: binary rows cost 2 bytes of signs + a 2-byte alpha; product codes at 2 bits
    a value cost the same 4 bytes (no per-row scale) and at 1 bit half of it, both with less error."""
    rows = clustered_rows()
    codes, alpha = binarize_rows(rows)
    binary = row_relative_error(rows, (2.0 * codes - 1.0) * alpha[:, None])
    two_bit = row_relative_error(rows, product_dequantize(product_quantize(rows, 2, 16)))
    one_bit = row_relative_error(rows, product_dequantize(product_quantize(rows, 4, 16)))
    assert two_bit < 0.6 * binary and one_bit < 0.8 * binary
    # scalar 2-bit codes are more precise, at 7 bytes a row (4 of codes, a scale and an offset)
    assert quantized_row_error(rows, quantize_rows(rows, 2, symmetric=False, search=True)) < two_bit


def test_fitting_is_seeded_and_a_table_with_few_rows_pads_its_codebook() -> None:
    rows = clustered_rows(rows=10)
    first, second = product_quantize(rows, 4, 16), product_quantize(rows, 4, 16)
    np.testing.assert_array_equal(first.codes, second.codes)
    assert first.codebooks.shape == (4, 16, 4) and int(first.codes.max()) < 10
    with pytest.raises(ValueError, match="do not split"):
        product_quantize(rows[:, :6], 4)
