"""A convolution as patches times filters: the same numbers onnxruntime's Conv computes."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import text_model

from onnxcompress import runtime
from onnxcompress.numerics.conv import ConvGeometry, conv_patches, filters, from_filters

CASES = [
    # shape, kernel, strides, pads, dilations
    ((3, 4, 11), (3,), (1,), (1, 1), (1,)),
    ((2, 3, 9, 8), (3, 2), (2, 1), (1, 0, 2, 1), (1, 2)),
    ((1, 2, 7, 7), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
]


@pytest.mark.parametrize(("shape", "kernel", "strides", "pads", "dilations"), CASES)
def test_patches_times_filters_is_the_convolution(
    shape: tuple[int, ...],
    kernel: tuple[int, ...],
    strides: tuple[int, ...],
    pads: tuple[int, ...],
    dilations: tuple[int, ...],
) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    weight = rng.standard_normal((5, shape[1], *kernel)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    rank = len(shape)
    attributes = (
        f"kernel_shape = {list(kernel)}, strides = {list(strides)}, pads = {list(pads)}, dilations = {list(dilations)}"
    )
    model = text_model(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[{",".join(map(str, shape))}] x, float[{",".join(map(str, weight.shape))}] w, float[5] b) => (float{"[" + ",".join("?" * rank) + "]"} y) {{
          y = Conv <{attributes}> (x, w, b)
        }}""".replace("?", "_"),
        {"w": weight, "b": bias},
    )
    (expected,) = runtime.make_session(model, "disable").run(None, {"x": x})
    geometry = ConvGeometry.of(kernel, strides, pads, dilations)
    assert list(expected.shape[2:]) == geometry.output_sizes(shape[2:])
    got = conv_patches(x.astype(np.float64), geometry) @ filters(weight.astype(np.float64)) + bias
    by_position = np.moveaxis(expected.reshape(*expected.shape[:2], -1), 1, 2).reshape(-1, 5)
    np.testing.assert_allclose(got, by_position, rtol=1e-5, atol=1e-5)


def test_filters_put_input_channels_next_to_each_other_and_invert() -> None:
    weight = np.arange(2 * 3 * 2, dtype=np.float64).reshape(2, 3, 2)  # [out, in, kernel]
    matrix = filters(weight)
    assert matrix.shape == (6, 2)
    # Rows: offset 0 for channels 0, 1, 2, then offset 1 for channels 0, 1, 2.
    np.testing.assert_array_equal(matrix[:, 0], [0, 2, 4, 1, 3, 5])
    np.testing.assert_array_equal(from_filters(matrix, weight.shape), weight)
