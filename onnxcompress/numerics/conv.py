"""A convolution as a matrix product, so that its refit is the same least squares as a linear layer's.

``Conv(x, W) + b`` (one group) computes, at every output position, the dot product of one patch of
``x`` (every input channel at every kernel offset) with each output channel's filter. Written as
rows of patches, ``y = patches(x) @ filters(W) + b``: the refit of a pruned convolution is then the
ridge system of :mod:`onnxcompress.numerics.lstsq` over those rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ConvGeometry", "conv_patches", "filters", "from_filters"]


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel size, strides, pads (begins then ends, as ONNX lists them) and dilations per spatial axis."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]

    @classmethod
    def of(
        cls,
        kernel: Sequence[int],
        strides: Sequence[int] | None = None,
        pads: Sequence[int] | None = None,
        dilations: Sequence[int] | None = None,
    ) -> ConvGeometry:
        """ONNX's defaults: stride 1, no padding, dilation 1."""
        axes = len(kernel)
        return cls(
            tuple(kernel),
            tuple(strides or [1] * axes),
            tuple(pads or [0] * (2 * axes)),
            tuple(dilations or [1] * axes),
        )

    def output_sizes(self, spatial: Sequence[int]) -> list[int]:
        axes = len(self.kernel)
        return [
            (spatial[i] + self.pads[i] + self.pads[i + axes] - self.dilations[i] * (self.kernel[i] - 1) - 1)
            // self.strides[i]
            + 1
            for i in range(axes)
        ]


def conv_patches(x: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """Rows ``[N * output positions, kernel positions * C]`` of the patches of ``x`` ``[N, C, *spatial]``:
    kernel offsets major and channels minor, the column order of :func:`filters`."""
    batch, channels = x.shape[:2]
    axes = len(geometry.kernel)
    padded = np.pad(x, [(0, 0), (0, 0), *((geometry.pads[i], geometry.pads[i + axes]) for i in range(axes))])
    sizes = geometry.output_sizes(x.shape[2:])
    columns = []
    for offset in itertools.product(*(range(k) for k in geometry.kernel)):
        window = tuple(
            slice(
                offset[i] * geometry.dilations[i],
                offset[i] * geometry.dilations[i] + geometry.strides[i] * (sizes[i] - 1) + 1,
                geometry.strides[i],
            )
            for i in range(axes)
        )
        columns.append(padded[(slice(None), slice(None), *window)])
    stacked = np.stack(columns, axis=1).reshape(batch, len(columns) * channels, -1)  # [N, K * C, positions]
    return np.moveaxis(stacked, 2, 1).reshape(-1, len(columns) * channels)


def filters(weight: np.ndarray) -> np.ndarray:
    """A Conv weight ``[C_out, C_in, *kernel]`` as ``[kernel positions * C_in, C_out]``: channels
    consecutive within each kernel offset, so N:M groups run along input channels."""
    return np.moveaxis(weight, 1, -1).reshape(weight.shape[0], -1).T


def from_filters(matrix: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The inverse of :func:`filters`: back to the Conv weight layout ``shape``."""
    out_channels, in_channels, *kernel = shape
    return np.moveaxis(matrix.T.reshape(out_channels, *kernel, in_channels), -1, 1)
