"""Weight quantization in standard ONNX: linear layers, row-wise embedding tables, binary weights.

Three graph forms, chosen per weight by measured speed (see docs/QUANTIZATION.md):

* Linear layers with ``activations=dynamic``: DynamicQuantizeLinear + MatMulInteger on int8
  weights, so onnxruntime runs integer kernels (it fuses the pattern into DynamicQuantizeMatMul).
  Weights stored at 4 to 7 bits are rounded to int8 in the graph, which onnxruntime folds at load.
* Linear layers with float activations: integer codes decoded to float either with
  DequantizeLinear (``dequantize=linear``, the QDQ form other runtimes recognise, executed on every
  call by onnxruntime's CPU provider) or with Cast/Sub/Mul (``dequantize=fold``), which
  onnxruntime constant-folds at session load so the model runs at fp32 speed from int8 storage.
* Embedding tables: per-row scales. Large tables are looked up quantized — the Gather reads integer
  rows, then only the gathered rows are dequantized (DequantizeLinear on axis 0) — so the fp32 table
  never exists at run time. Tables under ``fold_tables_below`` bytes (fp32) are decoded once at
  session load instead, which keeps the fp32 lookup speed for a few hundred KB of memory.

Widths below 8 bits that standard ONNX cannot gather or cast are stored bit-packed in uint8 and
unpacked with BitShift and BitwiseAnd.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxcompress import runtime
from onnxcompress.channel_scale import POSITIVELY_HOMOGENEOUS, scale_last_axis, scaling_form
from onnxcompress.errors import UsageError
from onnxcompress.graph import (
    NO_WEIGHTS_HINT,
    OVERRIDABLE_WEIGHT,
    SPLIT_INPUT_OPSET,
    WEIGHT_SLOTS,
    WeightUse,
    constant_array,
    constant_value,
    mlp_links,
    replace_value,
    set_constant,
    weights_by_value,
)
from onnxcompress.io import ExternalRows, initializer_bytes
from onnxcompress.metrics import auc_difference
from onnxcompress.numerics.pq import ProductCodes, product_assign, product_dequantize, product_quantize
from onnxcompress.numerics.quant import (
    BINARY_PAIR_LEVELS,
    INT8_GRAPH_LEVELS,
    INT8_PAIR_LIMIT,
    SCALE_CODEBOOK_SIZE,
    SMALL_SCALE_CODEBOOK_SIZE,
    TINY_SCALE,
    ActivationPlan,
    QuantizedRows,
    StaticActivation,
    alpha_codebook,
    binarize_rows,
    cheapest_scale_storage,
    code_planes,
    dequantize_rows,
    equalization_factors,
    gptq_levels,
    gptq_quantize,
    gptq_quantize_output_blocks,
    int8_requantize,
    pack_codes,
    packed_width,
    plan_activations,
    quantize_pair_limited,
    quantize_rows,
    quantize_tensor_rows,
    quantized_row_error,
    refine_row_codes,
    relative_error,
    row_relative_error,
    sample_rows,
    scale_bits_per_row,
    static_activation_error,
    static_activation_range,
    tensor_scale,
    with_scale_codebook,
)
from onnxcompress.parity import LOSSY, Budget, Budgets, ParityResult, compare, score_column, scores_of
from onnxcompress.passes import register
from onnxcompress.passes.base import NON_FINITE_WEIGHT, CompressionPass, CompressionResult
from onnxcompress.speed import (
    LayerTiming,
    ModelTiming,
    choose_integer_layers,
    model_timing,
    model_timings,
    probe_dynamic_matmul,
    probe_static_matmul,
    rows_per_example,
)

if TYPE_CHECKING:
    from onnxcompress.calibration import Calibration

__all__ = ["Quantize"]

logger = logging.getLogger(__name__)

#: DequantizeLinear with block_size, float16 scales and BitwiseAnd need opset 21 (and IR version 10).
QUANT_OPSET = 21
QUANT_IR_VERSION = 10
BIT_CHOICES = (8, 7, 6, 5, 4, 3, 2, 1)
#: Weights up to this size are checked for NaN/infinity before anything is done to them.
FINITE_CHECK_MAX_ELEMENTS = 1 << 24
#: Rows sampled (in runs spread over the table) to choose a table's scale granularity.
DECISION_SAMPLE_ROWS = 1 << 16
#: Tables larger than this are rounded to nearest per row: the clip search costs 26 passes.
SEARCH_MAX_ELEMENTS = 1 << 24
#: Tables with fewer rows keep float16 scales: the byte a codebook saves per row must repay its
#: 512-byte table and the decoding nodes (about 560 rows), with a margin.
CODEBOOK_MIN_ROWS = 768
#: Binary weights' alphas (one float16 a column) go into one 16-entry codebook from this many: 4
#: bits an alpha, with a 32-byte codebook and four decode nodes (about 90 bytes) to pay for.
ALPHA_CODEBOOK_MIN = 96
#: GPTQ rounds in act-order only when its ``X^T X`` rests on this many calibration rows per input,
#: and not under the mixed-precision search: act-order fits the calibration rows closer than it
#: fits test rows where they are few (512 rows for the wide DLRM's 1024 inputs), and the search,
#: judging on those same rows, then spends more than test rows allow (mixed on the wide DLRM:
#: 11.5x at dAUC -0.0020 against 10.9x at +0.0014; max on Wide&Deep fails its gate).
ACT_ORDER_MIN_ROWS_PER_INPUT = 2
#: GPTQ spreads rounding error along what the calibration rows span; on a handful of rows (a model
#: traced at batch 1 given one row) that fits them and no others: a batch-1 MLP's int8 scored fresh
#: rows with Spearman 0.61 after GPTQ on one row, 1.000 rounded to nearest. Below this many rows a
#: layer is rounded without it.
GPTQ_MIN_ROWS = 32
#: The mixed-precision search judges every move on the calibration rows; on fewer than this the
#: configured widths are used instead.
MIXED_MIN_ROWS = 32
#: Weights of at least this many bits may feed integer kernels: below 8 bits they are decoded and
#: rounded to int8 per output channel at load (an int8-sized error on top of their own, small next
#: to 2 bits'; binary signs and alpha round to int8 exactly, as +-63). The wide DLRM's
#: mixed file takes its two 1024-wide layers to 1 bit, which onnxruntime times 5-6x faster as
#: integer kernels.
MIN_INTEGER_BITS = 1
#: Bytes of graph that decode an integer layer's 4-bit blocks and round them to int8 at load (Cast,
#: Cast, Mul, Reshape, Transpose, Abs, ReduceMax, Div, QuantizeLinear: 231 bytes in int4 SASRec,
#: less the Cast that codes with one scale per channel need too).
BLOCK_DECODE_BYTES = 207
#: Graph bytes of a level decode beyond the unpacking (Cast, Gather, one or two Mul).
LEVELS_DECODE_BYTES = 120
#: Widths at which linear weights may take fitted levels (``level_codes``; 1 bit against binary).
LEVEL_BITS = (2, 3)
#: A weight with more zeros than this is pruned: its codes stay evenly spaced, zero among them.
LEVELS_MAX_ZERO_FRACTION = 0.05
#: mixed with activations=auto: when layers the activation budget returned to float would each save
#: at least this share of the model's batch time, the widths are searched again with room left for
#: their activations (the wide DLRM: two 1024-wide 1-bit layers, 5-6x faster as integer kernels).
ACTIVATION_RESERVE_MIN_BATCH_SHARE = 0.1
#: ... and at most this share of the mixed budget is set aside for them, in at most this many searches
#: (each reserve is measured on the widths of the search before, and widths searched anew can leave
#: the activations less room than that: the wide DLRM needed a second try).
ACTIVATION_RESERVE_MAX_SHARE = 0.5
ACTIVATION_RESERVE_MAX_SEARCHES = 3
#: activations=auto: a layer that costs single-row latency must save at least this fraction of the
#: model's batch time to be worth it.
MIN_MODEL_BATCH_GAIN = 0.01
#: Above this many bytes of weights the original is not loaded a second time to be timed.
REFERENCE_TIMING_MAX_BYTES = 256 << 20
#: Tables narrower than this get one scale: a per-row scale and offset (3 bytes) would outweigh
#: the row's codes.
NARROW_TABLE_WIDTH = 4
#: Weights above this size keep their configured bits in the mixed-precision search, whose every
#: evaluation would otherwise hold them in float.
MIXED_SEARCH_MAX_BYTES = 64 << 20
#: Work spent on tables' output Hessians, as rows run through the model times its bytes of
#: weights: SASRec's item table (33 runs over 5 copies of 512 rows, 0.3 MB) takes 3e10, DeepFM's
#: tables 5e10; dlrm_wide's 1024-wide layers (8.4 MB; 7 tables, 15 s) are left out.
LOOKUP_HESSIAN_BUDGET = 1e11
#: ``max_auc_drop`` holds the AUC drop's one-sided 95% upper bound: a drop measured on a few hundred
#: rows is mostly noise, and a greedy search that keeps every move the noise allows spends it.
AUC_CONFIDENCE_Z = 1.645
#: Product quantization: centroids per sub-space (a 4-bit index) and the fewest rows to fit them on.
PQ_CENTROIDS = 16
PQ_MIN_ROWS = 256
#: Graph bytes (short names) of unpacking bit-packed codes with standard ops, per plane of
#: ``code_planes``, and of or-ing two planes together; 8 and 4 bits are read without unpacking.
#: Measured on DeepFM's linear layers: 2 bits 190 bytes a weight more than 4 bits, 3 bits 470.
UNPACK_PLANE_BYTES = 190
#: Binary codes are tested bit by bit against these (position i of a byte: 1 << i).
BIT_MASKS = (1 << np.arange(8)).astype(np.uint8)
PLANE_JOIN_BYTES = 90


@dataclass
class _Builder:
    """Adds initializers and nodes named after the weight they replace; keeps the initializers it made."""

    graph: ir.Graph
    prefix: str
    nodes: list[ir.Node] = field(default_factory=list)
    created: list[ir.Value] = field(default_factory=list)
    _small: dict[tuple[str, str, bytes], ir.Value] = field(default_factory=dict)
    _taken: set[str] | None = None

    def constant(self, suffix: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
        array = np.asarray(array)
        key = (suffix, str(array.dtype), array.tobytes()) if array.size <= 16 else None
        if key is not None and key in self._small:
            return self._small[key]
        name = self._unique(f"{self.prefix}_{suffix}")
        value = constant_value(name, array, dtype)
        self.graph.register_initializer(value)
        self.created.append(value)
        if key is not None:
            self._small[key] = value
        return value

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], outputs: int = 1, **attributes: Any) -> ir.Value:
        return self.multi(op_type, inputs, outputs, **attributes)[0]

    def multi(
        self, op_type: str, inputs: Sequence[ir.Value | None], outputs: int = 1, **attributes: Any
    ) -> Sequence[ir.Value]:
        name = self._unique(f"{self.prefix}/{op_type}")
        node = ir.node(op_type, list(inputs), attributes=attributes or None, num_outputs=outputs, name=name)
        self.nodes.append(node)
        return node.outputs

    def insert_before(self, node: ir.Node) -> None:
        """Insert the nodes built so far in front of ``node`` and start a new batch."""
        self.graph.insert_before(node, self.nodes)
        self.nodes = []

    def _unique(self, name: str) -> str:
        if self._taken is None:
            self._taken = {node.name for node in self.graph if node.name}
        candidate, index = name, 1
        while candidate in self.graph.initializers or candidate in self._taken:
            candidate, index = f"{name}_{index}", index + 1
        self._taken.add(candidate)
        return candidate


@dataclass(frozen=True)
class _Stored:
    """A quantized weight in the graph: codes (int8/uint8, or bit-packed uint8) and its parameters.

    Codes are rows ``[groups, elements]``; ``scale``/``zero`` hold one entry per row.
    """

    codes: ir.Value
    scale: ir.Value
    zero: ir.Value | None
    bits: int
    elements: int
    binary: bool = False
    #: With a scale codebook, ``scale`` holds uint8 indices into this float32 table of scales.
    codebook: ir.Value | None = None
    #: Scales are one per column of the codes (``[elements]``, broadcast along the rows as stored).
    along_rows: bool = False
    #: Codes index these values (then scaled per row, and per column by ``column_scale``).
    levels: ir.Value | None = None
    column_scale: ir.Value | None = None

    @property
    def per_row(self) -> bool:
        tensor = self.scale.const_value
        return tensor is not None and len(tensor.shape) > 0

    @property
    def packed(self) -> bool:
        tensor = self.codes.const_value
        return self.bits < 8 and tensor is not None and tensor.dtype == ir.DataType.UINT8


_PACK_CHUNK_ROWS = 1 << 16


def _pack_rows(codes: np.ndarray, bits: int, offset: int) -> np.ndarray:
    """``pack_codes(codes + offset)`` row chunk by row chunk (a 2M-row table needs no table-sized
    temporaries), with a trailing axis of one: the unpacking's shifts or masks broadcast over it,
    so no Unsqueeze node is stored."""
    rows, elements = codes.shape
    packed = np.empty((rows, packed_width(elements, bits), 1), np.uint8)
    for start in range(0, rows, _PACK_CHUNK_ROWS):
        chunk = codes[start : start + _PACK_CHUNK_ROWS]
        if offset or chunk.dtype != np.uint8:
            chunk = (chunk.astype(np.int16) + offset).astype(np.uint8)
        packed[start : start + _PACK_CHUNK_ROWS, :, 0] = pack_codes(chunk, bits)
    return packed


def _last(build: _Builder) -> ir.Value:
    return build.constant("last", np.array([-1], np.int64))


def _unpacking_bytes(bits: int) -> int:
    """Graph bytes that unpacking ``bits``-wide codes adds (none at 8 and 4 bits)."""
    if bits in (8, 4):
        return 0
    planes = len(code_planes(bits))
    return UNPACK_PLANE_BYTES * planes + PLANE_JOIN_BYTES * (planes - 1)


def _unpack(build: _Builder, packed: ir.Value, bits: int, count: int) -> ir.Value:
    """Standard-op unpacking of little-endian ``bits``-wide codes packed along axis 1 (uint8
    ``[rows, bytes, 1]``, see :func:`_pack_rows`) into ``[rows, count]``; codes stored as several
    planes (:func:`code_planes`) are sliced apart, unpacked and or-ed together."""
    planes = code_planes(bits)
    if len(planes) == 1:
        return _unpack_plane(build, packed, bits, count)
    axis = build.constant("axis1", np.array([1], np.int64))
    codes: ir.Value | None = None
    start = 0
    for shift, width in planes:
        stop = start + -(-count * width // 8)
        bounds = [
            build.constant(name, np.array([bound], np.int64)) for name, bound in (("start", start), ("stop", stop))
        ]
        plane = _unpack_plane(build, build.op("Slice", [packed, *bounds, axis]), width, count)
        if shift:
            amount = build.constant("plane_shift", np.array(shift, np.uint8))
            plane = build.op("BitShift", [plane, amount], direction="LEFT")
        codes = plane if codes is None else build.op("BitwiseOr", [codes, plane])
        start = stop
    assert codes is not None
    return codes


def _unpack_plane(build: _Builder, packed: ir.Value, bits: int, count: int) -> ir.Value:
    per_byte = 8 // bits
    shifts = build.constant("shifts", (np.arange(per_byte) * bits).astype(np.uint8))
    shifted = build.op("BitShift", [packed, shifts], direction="RIGHT")
    codes = build.op("BitwiseAnd", [shifted, build.constant("mask", np.array(2**bits - 1, np.uint8))])
    flat = build.op("Reshape", [codes, build.constant("merge", np.array([0, -1], np.int64))])
    if (count * bits) % 8:
        start = build.constant("start", np.array([0], np.int64))
        stop = build.constant("stop", np.array([count], np.int64))
        flat = build.op("Slice", [flat, start, stop, build.constant("axis1", np.array([1], np.int64))])
    return flat


def _store(
    build: _Builder,
    quantized: QuantizedRows,
    *,
    binary: bool = False,
    column: bool = False,
    native_int4: bool = False,
    rows_shape: tuple[int, int] | None = None,
    along_rows: bool = False,
) -> _Stored:
    """Put codes and parameters into initializers.

    Codes are int8/uint8 at 8 bits, INT4/UINT4 with ``native_int4`` (decoded whole, by Cast or
    DequantizeLinear: one node instead of an unpacking chain; a Gather cannot read int4), and
    bit-packed uint8 otherwise. ``column`` stores scales and zero points as ``[rows, 1]`` so that
    they broadcast over the codes without an Unsqueeze node; ``along_rows`` stores them as
    ``[elements]``, one per column of the codes (a vector: the final cleanup packs vectors).
    """
    bits = quantized.bits
    if rows_shape is not None:  # one scale for the whole tensor, codes kept as rows for lookups
        quantized = QuantizedRows(quantized.codes.reshape(rows_shape), quantized.scale, quantized.zero_point, bits)
    rows, elements = quantized.codes.shape
    shape: tuple[int, ...] = (elements,) if along_rows else (rows, 1) if column else (rows,)
    if quantized.scale.size == 1 and (rows != 1 or int(np.prod(shape)) != 1):
        shape = ()  # one scale for the tensor (a layer of one input feature stored as read: one row)
    offset = 0
    if quantized.levels is not None:
        scale, codebook = _store_scale(build, quantized, shape, native_int4)
        column_scale = None
        if quantized.column_scale is not None:
            column_scale = build.constant("column_scale", quantized.column_scale)
        return _Stored(
            build.constant("packed", _pack_rows(quantized.codes, bits, 0)),
            scale,
            None,
            bits,
            elements,
            codebook=codebook,
            levels=build.constant("levels", quantized.levels),
            column_scale=column_scale,
        )
    if bits == 8:
        codes = build.constant("q", quantized.codes)
    elif native_int4 and bits == 4:
        numpy_type = ml_dtypes.int4 if quantized.symmetric else ml_dtypes.uint4
        int4_type = ir.DataType.INT4 if quantized.symmetric else ir.DataType.UINT4
        codes = build.constant("q", quantized.codes.astype(numpy_type), int4_type)
        zero = None
        if quantized.zero_point is not None:
            zero = build.constant("zero_point", quantized.zero_point.astype(numpy_type).reshape(shape), int4_type)
        scale, codebook = _store_scale(build, quantized, shape, native_int4)
        return _Stored(codes, scale, zero, bits, elements, binary, codebook, along_rows)
    else:
        # Symmetric codes are stored offset by the zero point below, so every stored code is unsigned.
        offset = 2 ** (bits - 1) - 1 if quantized.symmetric and not binary else 0
        codes = build.constant("packed", _pack_rows(quantized.codes, bits, offset))
    scale, codebook = _store_scale(build, quantized, shape, native_int4)
    zero = None
    if not binary and (quantized.zero_point is not None or bits < 8):
        zero_array = quantized.zero_point
        if zero_array is None:
            # The offset of symmetric codes: one value, broadcast by the arithmetic decode; a
            # DequantizeLinear per row needs one per scale.
            zero_array = np.full(1 if column or along_rows else quantized.scale.size, offset, np.uint8)
            shape = () if column or along_rows else shape
        if column and native_int4 and bits <= 4 and zero_array.size > 1:
            # Read only by the Cast of the arithmetic decode: a 2- or 3-bit row's zero point in 4 bits
            # (4-bit codes take the branch above).
            zero = build.constant("zero_point", zero_array.astype(ml_dtypes.uint4).reshape(shape), ir.DataType.UINT4)
        else:
            zero = build.constant("zero_point", zero_array.reshape(shape))
    return _Stored(codes, scale, zero, bits, elements, binary, codebook, along_rows)


def _store_scale(
    build: _Builder, quantized: QuantizedRows, shape: tuple[int, ...], native_int4: bool
) -> tuple[ir.Value, ir.Value | None]:
    """The scales as stored: float values, or indices plus the codebook they index (uint8; uint4
    for a codebook of 16 with ``native_int4``)."""
    if quantized.codebook is None or quantized.scale_index is None or shape == ():
        return build.constant("scale", quantized.scale.reshape(shape)), None
    index = quantized.scale_index.reshape(shape)
    if native_int4 and len(quantized.codebook) <= SMALL_SCALE_CODEBOOK_SIZE:
        stored = build.constant("scale_index", index.astype(ml_dtypes.uint4), ir.DataType.UINT4)
    else:
        stored = build.constant("scale_index", index)
    return stored, build.constant("scale_codebook", quantized.codebook.astype(quantized.scale.dtype))


def _float(build: _Builder, value: ir.Value, stored_as: ir.Value) -> ir.Value:
    """``value`` (``stored_as`` or rows gathered from it) as float32."""
    tensor = stored_as.const_value
    if tensor is not None and tensor.dtype != ir.DataType.FLOAT:
        return build.op("Cast", [value], to=ir.DataType.FLOAT)
    return value


def _as_type(build: _Builder, value: ir.Value, dtype: ir.DataType | None) -> ir.Value:
    """Decoded float32 ``value`` in the type the replaced weight had (a float16 export's)."""
    if dtype is None or dtype == ir.DataType.FLOAT:
        return value
    return build.op("Cast", [value], to=dtype)


def _column(build: _Builder, value: ir.Value, stored: _Stored) -> ir.Value:
    """``value`` as ``[rows, 1]`` for broadcasting over ``[rows, elements]`` (as it is when the
    values are one per column)."""
    if stored.along_rows:
        return value
    tensor = value.const_value
    shape = tensor.shape if tensor is not None else value.shape
    if shape is not None and len(shape) in (0, 2):
        return value
    return build.op("Unsqueeze", [value, _last(build)])


def _decode_rows(
    build: _Builder, stored: _Stored, rows: ir.Value, scale: ir.Value, zero: ir.Value | None, form: str
) -> ir.Value:
    """Float rows ``[n, elements]`` from codes ``rows`` and per-row ``scale``/``zero``.

    ``form`` is ``linear`` (DequantizeLinear on axis 0; scale and zero of shape ``[n]``) or ``fold``
    (Cast, Sub, Mul: plain arithmetic that onnxruntime constant-folds when every input is an
    initializer; scale and zero of shape ``[n]`` or ``[n, 1]``).
    """
    if stored.binary and stored.packed:
        return _decode_signs(build, stored, rows, scale)
    codes = _unpack(build, rows, stored.bits, stored.elements) if stored.packed else rows
    scale, scale_source = _scale_values(build, stored, scale)
    if stored.levels is not None:
        index = build.op("Cast", [codes], to=ir.DataType.INT32)
        values = _float(build, build.op("Gather", [stored.levels, index], axis=0), stored.levels)
        values = build.op("Mul", [values, _float(build, _column(build, scale, stored), scale_source)])
        if stored.column_scale is not None:
            values = build.op("Mul", [values, _float(build, stored.column_scale, stored.column_scale)])
        return values
    if stored.binary:
        alpha = _float(build, _column(build, scale, stored), scale_source)
        doubled = build.op("Mul", [build.op("Cast", [codes], to=ir.DataType.FLOAT), build.op("Add", [alpha, alpha])])
        return build.op("Sub", [doubled, alpha])
    if form == "linear":
        scale = _float(build, scale, scale_source)
        return build.op("DequantizeLinear", [codes, scale, zero] if zero is not None else [codes, scale], axis=0)
    values = build.op("Cast", [codes], to=ir.DataType.FLOAT)
    if zero is not None:
        values = build.op("Sub", [values, build.op("Cast", [_column(build, zero, stored)], to=ir.DataType.FLOAT)])
    return build.op("Mul", [values, _float(build, _column(build, scale, stored), scale_source)])


def _scale_values(build: _Builder, stored: _Stored, scale: ir.Value) -> tuple[ir.Value, ir.Value]:
    """The scales ``scale`` stands for (looked up in the codebook when it holds indices) and the
    value whose type they have."""
    if stored.codebook is None:
        return scale, stored.scale
    # Gather indices must be int32/int64; the looked-up scales have the indices' shape.
    index = build.op("Cast", [scale], to=ir.DataType.INT32)
    rank = len(scale.const_value.shape) if scale.const_value is not None else 1  # gathered by ids: [n]
    looked_up = build.op("Gather", [stored.codebook, index], axis=0)
    looked_up.shape = ir.Shape([None] * rank)  # the indices' rank: [rows, 1] needs no Unsqueeze
    return looked_up, stored.codebook


def _decode_signs(build: _Builder, stored: _Stored, rows: ir.Value, scale: ir.Value) -> ir.Value:
    """Binary rows: each packed bit picks ``+alpha`` or ``-alpha`` of its row. The bits are tested
    with a mask per position and read as booleans (``Where``), which takes fewer nodes than
    shifting them down and computing ``(2 * bit - 1) * alpha``."""
    masks = build.constant("bit_masks", BIT_MASKS)
    flat = build.op("Reshape", [build.op("BitwiseAnd", [rows, masks]), build.constant("merge", np.array([0, -1]))])
    if stored.elements % 8:
        start = build.constant("start", np.array([0], np.int64))
        stop = build.constant("stop", np.array([stored.elements], np.int64))
        flat = build.op("Slice", [flat, start, stop, build.constant("axis1", np.array([1], np.int64))])
    scale, scale_source = _scale_values(build, stored, scale)
    alpha = _float(build, _column(build, scale, stored), scale_source)
    return build.op("Where", [build.op("Cast", [flat], to=ir.DataType.BOOL), alpha, build.op("Neg", [alpha])])


@dataclass(frozen=True)
class _SignChain:
    """One binary weight's decode as :func:`_decode_signs` writes it, and its bits."""

    where: ir.Value
    alpha: ir.Value
    bits: np.ndarray  # bool [rows, elements]
    nodes: tuple[ir.Node, ...]


def _sign_chain(where: ir.Node) -> _SignChain | None:
    """The decode ending in ``where`` when it reads a packed initializer: Where(Cast(Slice?(Reshape(
    BitwiseAnd(packed, masks)))), alpha, Neg(alpha))."""
    if len(where.inputs) != 3:
        return None
    condition, alpha, negated = where.inputs
    if condition is None or alpha is None or negated is None:
        return None
    neg, cast = negated.producer(), condition.producer()
    if neg is None or neg.op_type != "Neg" or neg.inputs[0] is not alpha or cast is None or cast.op_type != "Cast":
        return None
    nodes = [where, neg, cast]
    flat = cast.inputs[0]
    reshape = flat.producer() if flat is not None else None
    elements = None
    if reshape is not None and reshape.op_type == "Slice":
        stop = constant_array(reshape.inputs[2]) if len(reshape.inputs) > 2 else None
        elements = int(stop.reshape(-1)[0]) if stop is not None else None
        nodes.append(reshape)
        reshape = reshape.inputs[0].producer() if reshape.inputs[0] is not None else None
    if reshape is None or reshape.op_type != "Reshape" or reshape.inputs[0] is None:
        return None
    masked = reshape.inputs[0].producer()
    if masked is None or masked.op_type != "BitwiseAnd":
        return None
    packed, masks = (constant_array(value) for value in masked.inputs)
    if packed is None or masks is None or packed.dtype != np.uint8 or packed.ndim != 3:
        return None
    if not np.array_equal(masks, BIT_MASKS):
        return None
    nodes += [reshape, masked]
    if any(len(output.uses()) != 1 or output.is_graph_output() for node in nodes[1:] for output in node.outputs):
        return None
    bits = ((packed & masks) != 0).reshape(packed.shape[0], -1)
    return _SignChain(where.outputs[0], alpha, bits[:, :elements] if elements is not None else bits, tuple(nodes))


def _column_norms(value: ir.Value) -> np.ndarray:
    """The L2 norm of each column of a 2-D initializer."""
    tensor = value.const_value
    assert tensor is not None
    return np.linalg.norm(tensor.numpy().astype(np.float64), axis=0)


def _lookup_output_error(
    table: np.ndarray, restored: np.ndarray, lookups: list[tuple[int, np.ndarray | None]]
) -> float:
    """``sqrt(sum delta H delta^T / sum row H row^T)`` over the runs of rows that have an output
    Hessian ``H``: how far ``restored`` moves the outputs against how far the rows do."""
    error = reference = 0.0
    start = 0
    for count, hessian in lookups:
        stop = start + count
        if hessian is not None:
            rows = np.asarray(table[start:stop], dtype=np.float64)
            delta = np.asarray(restored[start:stop], dtype=np.float64).reshape(rows.shape) - rows
            error += float(np.einsum("ij,jk,ik->", delta, hessian, delta))
            reference += float(np.einsum("ij,jk,ik->", rows, hessian, rows))
        start = stop
    return float(np.sqrt(error / reference)) if reference else 0.0


def _cheaper_table_codes(
    table: np.ndarray,
    product: tuple[ProductCodes, str, dict[str, float]],
    scalar: tuple[QuantizedRows, str, dict[str, float]],
    lookups: list[tuple[int, np.ndarray | None]],
) -> tuple[QuantizedRows | ProductCodes, str, dict[str, float]]:
    """A 2-bit table's product codes or its scalar rows (refined against the lookups' Hessians),
    whichever moves the outputs less once priced: the scalar rows also store a scale (and maybe an
    offset) per row, ``b`` bits that count as ``2^(b / width)`` times their error (one more bit a
    value halves it, as ``cheapest_scale_storage`` prices scale storage). The errors of both are
    kept with the choice."""
    quantized = scalar[0]
    rows, width = table.shape
    codebook = None if quantized.codebook is None else len(quantized.codebook)
    row_bits = scale_bits_per_row(codebook, rows, 8 * quantized.scale.dtype.itemsize)
    row_bits += 0 if quantized.zero_point is None else 8
    product_error = _lookup_output_error(table, product_dequantize(product[0]), lookups)
    errors = {**scalar[2], **product[2], "lookup_output_pq": product_error}
    if scalar[2]["lookup_output_gptq"] * 2 ** (row_bits / width) < product_error:
        return quantized, scalar[1], errors
    return product[0], product[1], errors


def _refined_for_lookups(
    table: np.ndarray, quantized: QuantizedRows, lookups: list[tuple[int, np.ndarray | None]]
) -> tuple[QuantizedRows, dict[str, float]]:
    """Row codes rounded again run by run of rows against each run's output Hessian (runs without
    one keep theirs), with the output error (``_lookup_output_error``) of the codes before and after."""
    codes = quantized.codes.copy()
    start = 0
    for count, hessian in lookups:
        stop = start + count
        if hessian is not None:
            part = replace(
                quantized,
                codes=quantized.codes[start:stop],
                scale=quantized.scale[start:stop],
                zero_point=None if quantized.zero_point is None else quantized.zero_point[start:stop],
            )
            codes[start:stop] = refine_row_codes(np.asarray(table[start:stop], dtype=np.float64), part, hessian).codes
        start = stop
    refined = replace(quantized, codes=codes)
    errors = {
        f"lookup_output_{name}": _lookup_output_error(table, _dequantized(rounded), lookups)
        for name, rounded in (("nearest", quantized), ("gptq", refined))
    }
    return refined, errors


def _share_sign_decoding(graph: ir.Graph) -> list[tuple[ir.Value, int]]:
    """Binary weights decoded at load, each by five nodes of its own, become one bit stream decoded
    once into signs (BitwiseAnd, Cast, Where, Reshape, Split) and, per weight, a Reshape and a Mul by
    its alphas: 14 bytes of graph fewer a weight, and no row padding to whole bytes. The values are
    the same (a sign times alpha is exact). Returns the alphas of the weights that share the stream,
    each with its weight's number of signs."""
    chains = [chain for node in graph if node.op_type == "Where" and (chain := _sign_chain(node)) is not None]
    if len(chains) < 2:
        return []
    stream = np.concatenate([chain.bits.reshape(-1) for chain in chains])
    padding = -stream.size % 8
    packed = (np.concatenate([stream, np.zeros(padding, bool)]).reshape(-1, 8) * BIT_MASKS).sum(axis=1, dtype=np.uint8)
    build = _Builder(graph, "signs")
    masked = build.op(
        "BitwiseAnd", [build.constant("packed", packed.reshape(-1, 1)), build.constant("masks", BIT_MASKS)]
    )
    signs = build.op(
        "Where",
        [
            build.op("Cast", [masked], to=ir.DataType.BOOL),
            build.constant("plus", np.array(1, np.float32)),
            build.constant("minus", np.array(-1, np.float32)),
        ],
    )
    flat = build.op("Reshape", [signs, build.constant("flat", np.array([-1], np.int64))])
    sizes = [chain.bits.size for chain in chains] + ([padding] if padding else [])
    pieces = build.multi(
        "Split", [flat, build.constant("sizes", np.array(sizes, np.int64))], outputs=len(sizes), axis=0
    )
    build.insert_before(next(iter(graph)))
    for chain, piece in zip(chains, pieces, strict=False):
        where = chain.nodes[0]
        # [-1, width]: weights of one row width share the constant
        shape = build.constant("shape", np.array([-1, chain.bits.shape[1]], np.int64))
        decoded = build.op("Mul", [build.op("Reshape", [piece, shape]), chain.alpha])
        build.insert_before(where)
        replace_value(chain.where, decoded)
        read = {value for node in chain.nodes for value in node.inputs if value is not None}
        graph.remove(list(chain.nodes), safe=True)
        for value in read:  # the weight's packed bits and its decoding constants
            if value.is_initializer() and not value.uses() and not value.is_graph_output():
                graph.initializers.pop(value.name or "")
    return [(chain.alpha, chain.bits.size) for chain in chains]


def _stored_alphas(alpha: ir.Value, readers: int) -> tuple[np.ndarray, list[ir.Node]] | None:
    """A binary weight's alphas when they are one per column, stored as floats on their own and read
    by nothing but the ``readers`` sign decodes: the values (as stored) and the Cast to float32 that
    reads them, if any."""
    if len(alpha.uses()) != readers:
        return None
    cast = alpha.producer()
    casts = [cast] if cast is not None and cast.op_type == "Cast" else []
    stored = casts[0].inputs[0] if casts else alpha
    values = constant_array(stored)
    if stored is None or values is None or values.ndim != 1 or values.dtype.kind != "f" or np.any(values <= 0):
        return None
    if alpha.is_graph_output() or (casts and len(stored.uses()) != 1):
        return None
    return values, casts


def _alphas_from_one_codebook(graph: ir.Graph, alphas: Sequence[tuple[ir.Value, int]]) -> int:
    """Binary weights' alphas, one float per column (two bytes each), become 4-bit indices into one
    codebook of 16 fitted to all of them (:func:`alpha_codebook`), decoded once (Cast, Gather,
    Cast, Split). Only where at least ``ALPHA_CODEBOOK_MIN`` alphas share it, below which the
    decode nodes cost more than the indices save. ``alphas``: each with its weight's number of
    signs. Returns how many weights read the codebook."""
    readers = Counter(alpha for alpha, _ in alphas)
    signs = dict(alphas)
    found = [(alpha, stored) for alpha in readers if (stored := _stored_alphas(alpha, readers[alpha])) is not None]
    values = [stored[0] for _, stored in found]
    if len(found) < 2 or sum(len(part) for part in values) < ALPHA_CODEBOOK_MIN:
        return 0
    codebook, index = alpha_codebook(
        np.concatenate([part.astype(np.float64) for part in values]),
        np.concatenate(
            [np.full(len(part), signs[alpha] / len(part)) for (alpha, _), part in zip(found, values, strict=True)]
        ),
    )
    build = _Builder(graph, "alphas")
    stored_index = build.constant("index", index.astype(ml_dtypes.uint4), ir.DataType.UINT4)
    looked_up = build.op(
        "Gather", [build.constant("codebook", codebook), build.op("Cast", [stored_index], to=ir.DataType.INT32)], axis=0
    )
    sizes = build.constant("sizes", np.array([len(part) for part in values], np.int64))
    pieces = build.multi(
        "Split", [build.op("Cast", [looked_up], to=ir.DataType.FLOAT), sizes], outputs=len(found), axis=0
    )
    build.insert_before(next(iter(graph)))
    for (alpha, (_, casts)), piece in zip(found, pieces, strict=True):
        read = [value for node in casts for value in node.inputs if value is not None]
        replace_value(alpha, piece)
        graph.remove(casts, safe=True)
        for value in read or [alpha]:
            if value.is_initializer() and not value.uses():
                graph.initializers.pop(value.name or "")
    return len(found)


def _position(graph: ir.Graph, node: ir.Node) -> int:
    for index, candidate in enumerate(graph):
        if candidate is node:
            return index
    return len(graph)


def _first(graph: ir.Graph, uses: Sequence[WeightUse]) -> ir.Node:
    return _earliest(graph, [use.node for use in uses])


def _earliest(graph: ir.Graph, nodes: Sequence[ir.Node]) -> ir.Node:
    return min(nodes, key=lambda node: _position(graph, node))


def _round_readers(
    build: _Builder, value: ir.Value, static: StaticActivation
) -> tuple[list[ir.Node], list[tuple[ir.Node, int]]]:
    """Make every reader of ``value`` read it through QuantizeLinear and DequantizeLinear with
    ``static``'s parameters, inserted before the first of them (``build`` holds no other nodes).
    Returns the nodes inserted and the readers, with the input each read ``value`` at."""
    readers = [(reader, index) for reader, index in value.uses()]
    rounded = _round_statically(build, value, static)
    inserted = list(build.nodes)
    build.insert_before(_earliest(build.graph, [reader for reader, _ in readers]))
    for reader, index in readers:
        reader.replace_input_with(index, rounded)
    return inserted, readers


#: Why a model without a weight the pass reads is left as it was.
NOTHING_TO_QUANTIZE = (
    "no initializer is read as a weight (a MatMul's second input, a Gemm's B, a Conv's W) or as a "
    "Gather table; a weight computed at run time (W @ x, a Cast from float16) or kept in node "
    "attributes (a tree ensemble) is left as it is"
)


@register("quant")
class Quantize(CompressionPass):
    """Quantize weights to 1-8 bits in standard ONNX: linear layers per channel or block (integer
    kernels with activations=dynamic), embedding tables per row, looked up on the quantized table."""

    lossy = True
    #: Per linear weight, how 8-bit activations fare: smoothing and error (set by ``_hessians``).
    _activation_plans: dict[str, ActivationPlan]
    #: activations=static: each candidate layer's QuantizeLinear parameters (set by ``_hessians``).
    _static_activations: dict[str, StaticActivation]
    #: activations=static: for a candidate whose output goes through a Relu, that Relu's output and
    #: its parameters (a runtime fuses a QDQ layer with a quantized output; followed by a float
    #: Relu, onnxruntime fuses the Gemm and the Relu in float instead and dequantizes the weight on
    #: every call).
    _static_outputs: dict[str, tuple[ir.Value, StaticActivation]]
    #: Linear weights whose layers run on integer kernels (set by ``_hessians``, then
    #: ``_plan_activations`` keeps those the model as a whole can afford).
    _integer_layers: set[str]
    #: activations=auto: each candidate layer's float and integer timings, and the float model's
    #: (measured only when some layer would cost single-row latency).
    _layer_timings: dict[str, LayerTiming]
    _model_timing: ModelTiming | None
    #: The model file as the user gave it, timed beside the float model when earlier passes may
    #: have changed its one-row time (the latency budget is the original's).
    _reference_timing: ModelTiming | None
    #: Calibration rows behind each linear weight's ``X^T X`` (set by ``_hessians``).
    _hessian_rows: dict[str, int]
    #: ``_linear_codes`` results by (weight, bits, integer layer, smoothed), with the rows and Hessian they
    #: were computed from.
    _linear_cache: dict[tuple[str, int, bool, bool], tuple[np.ndarray, np.ndarray | None, Any]]
    #: Per table (or stack of tables), its runs of rows with the Hessian of the model's outputs in
    #: a looked-up row (None: not measured), for rounding with error feedback (``_table_hessians``).
    _lookup_hessians: dict[str, list[tuple[int, np.ndarray | None]]]
    #: Integer 4-bit layers: output error with blocks (after int8 rounding) and with channel scales.
    _integer_choices: dict[str, dict[str, float]]
    _level_choices: dict[tuple[str, int], dict[str, Any]]
    #: Equalised 8-bit weights: one scale for all their channels (set by ``_equalize``).
    _one_scale: set[str]

    @dataclass(frozen=True)
    class Config:
        bits: int = field(default=8, metadata={"help": "bits for linear-layer weights", "choices": BIT_CHOICES})
        granularity: str = field(
            default="channel",
            metadata={"help": "scale per tensor, output channel or block", "choices": ("tensor", "channel", "block")},
        )
        block_size: int = field(default=32, metadata={"help": "inputs per scale with granularity=block", "min": 2})
        block_axis: str = field(
            default="auto",
            metadata={
                "help": "granularity=block: blocks of inputs per output (reduction), of outputs per input "
                "(output), or with calibration data whichever has the smaller layer output error and no "
                "more scales (auto)",
                "choices": ("auto", "reduction", "output"),
            },
        )
        symmetric: bool = field(default=True, metadata={"help": "zero point 0 for linear weights (else min/max)"})
        level_codes: bool = field(
            default=False,
            metadata={
                "help": "linear weights of 1 to 3 bits with calibration data: codes index 2^bits levels fitted "
                "to the weight, one scale per output channel (and per input where that pays), where their "
                "output error, priced in bytes, is lower than evenly spaced codes in blocks (or than signs)"
            },
        )
        activations: str = field(
            default="none",
            metadata={
                "help": "none: float activations; dynamic: DynamicQuantizeLinear + MatMulInteger (weights "
                "of 2+ bits, below 8 rounded to int8 at load); auto: dynamic for the layers where onnxruntime "
                "measures it faster and the calibration rows allow it; static: QuantizeLinear/DequantizeLinear "
                "with a range fixed on the calibration rows (MSE search; int8 weights and an int32 bias through "
                "DequantizeLinear, the QDQ form runtimes fuse into integer kernels) for the same layers as auto, "
                "8-bit weights only; scores then do not depend on what else is in the batch",
                "choices": ("none", "dynamic", "auto", "static"),
            },
        )
        activation_tolerance: float = field(
            default=0.01,
            metadata={
                "help": "auto and static: largest relative output error a layer may take from 8-bit "
                "activations, measured on calibration rows after smoothing (without calibration data both "
                "keep float activations)",
                "min": 0.0,
            },
        )
        activation_min_rank_corr: float = field(
            default=0.9998,
            metadata={
                "help": "auto and static: Spearman of each score output with the original's on calibration rows, with "
                "every integer layer at once (layers are returned to float, largest error first, until it holds)",
                "min": 0.0,
                "max": 1.0,
            },
        )
        activation_min_cosine: float = field(
            default=0.9999,
            metadata={"help": "auto and static: the same for the cosine of each output", "min": 0.0, "max": 1.0},
        )
        activation_max_mismatch: float = field(
            default=0.005,
            metadata={
                "help": "auto and static: the same for the fraction of each integer output's values that differ",
                "min": 0.0,
                "max": 1.0,
            },
        )
        activation_max_latency: float = field(
            default=0.08,
            metadata={
                "help": "auto and static: how much slower than the original model (as given, before any pass) the "
                "integer layers may make one row, as a fraction (quantizing activations costs about a "
                "microsecond a layer on one row)",
                "min": 0.0,
            },
        )
        smoothing: bool = field(
            default=True,
            metadata={
                "help": "integer layers: move activation outliers into the weights per input channel "
                "(SmoothQuant; a Mul before DynamicQuantizeLinear) where it lowers the layer's error"
            },
        )
        equalize: bool = field(
            default=True,
            metadata={
                "help": "8-bit per-channel layers followed (through ReLU) by another selected linear layer "
                "hand their channel ranges to its input rows (cross-layer equalisation, exact in float): "
                "their channel scales then agree and one is stored, and an integer kernel runs with one "
                "weight scale (onnxruntime's faster form)"
            },
        )
        dequantize: str = field(
            default="fold",
            metadata={
                "help": "float-activation weights: fold (Cast/Mul, folded at load: fp32 speed) or linear "
                "(DequantizeLinear, run on every call by onnxruntime)",
                "choices": ("fold", "linear"),
            },
        )
        embedding_bits: int = field(
            default=8,
            metadata={
                "help": "bits for embedding tables, per-row scale; 0 leaves tables in float",
                "choices": (0, *BIT_CHOICES),
            },
        )
        embedding_granularity: str = field(
            default="auto",
            metadata={
                "help": "row: a scale per row; tensor: one scale (fastest lookup); auto: tensor when its "
                "relative error is within table_tolerance, else row",
                "choices": ("auto", "row", "tensor"),
            },
        )
        table_tolerance: float = field(
            default=0.03,
            metadata={"help": "median per-row relative error allowed for one scale per table (auto)", "min": 0.0},
        )
        embedding_symmetric: bool | str = field(
            default=False,
            metadata={
                "help": "zero point 0 for tables (false: per-row min/max offset as FBGEMM; auto: no offset "
                "where the error it adds is worth less than the offset's bits)",
                "choices": (False, True, "auto"),
            },
        )
        fold_tables_below: int = field(
            default=1 << 20,
            metadata={
                "help": "tables smaller than this (fp32 bytes) are decoded at load, larger ones are "
                "gathered quantized; 0 gathers every table quantized",
                "min": 0,
            },
        )
        table_codes: str = field(
            default="scalar",
            metadata={
                "help": "pq: tables at 2 and 1 bits are product-quantized (16 centroids per sub-vector of 2 or 4 "
                "dimensions, a 4-bit index each, no per-row scale) instead of scalar codes with a scale per row; "
                "auto: at 2 bits, whichever has the smaller output error once the scalar rows' scales are priced "
                "in (pq without calibration data)",
                "choices": ("scalar", "pq", "auto"),
            },
        )
        scale_codebook: bool = field(
            default=False,
            metadata={
                "help": "store scales as indices into a codebook (codes re-rounded to the stored scale): tables "
                "of 768+ rows and linear weights of 768+ blocks a uint8 index into 256 log-spaced scales; a table "
                "decoded at load a 4-bit index into 16 scales fitted to its rows where the error that adds is "
                "worth less than the bits"
            },
        )
        scale_dtype: str = field(
            default="float16",
            metadata={"help": "storage type of per-row table scales", "choices": ("float16", "float32")},
        )
        rounding: str = field(
            default="auto",
            metadata={
                "help": "nearest, mse (per-row clip search), gptq (error feedback on calibration inputs); "
                "auto = gptq for linear layers with calibration data, mse otherwise",
                "choices": ("auto", "nearest", "mse", "gptq"),
            },
        )
        mixed: bool = field(
            default=False,
            metadata={
                "help": "choose each weight's bits from mixed_bits on calibration data: lowest bytes "
                "that keep mixed_min_rank_corr, mixed_min_cosine and mixed_max_mismatch on every output",
            },
        )
        mixed_bits: tuple[int, ...] = field(
            default=(8, 4, 3, 2, 1),
            metadata={"help": "bit widths the mixed-precision search may assign", "item_choices": BIT_CHOICES},
        )
        mixed_min_rank_corr: float = field(
            default=0.998,
            metadata={
                "help": "mixed: Spearman of each score output with the original's on calibration rows",
                "min": 0.0,
                "max": 1.0,
            },
        )
        mixed_min_cosine: float = field(
            default=0.999,
            metadata={
                "help": "mixed: cosine of each output with the original's on calibration rows",
                "min": 0.0,
                "max": 1.0,
            },
        )
        mixed_max_mismatch: float = field(
            # Half the parity gate's 1%: labels near a decision threshold flip more often on rows
            # the search has not seen (the scikit-learn MLP searched at 1% flipped 1.49% of its test
            # labels and failed the gate; at 0.5%, 0.69%).
            default=0.005,
            metadata={
                "help": "mixed: fraction of each integer output's values (labels, ids) that may differ "
                "from the original's on calibration rows",
                "min": 0.0,
                "max": 1.0,
            },
        )
        max_auc_drop: float | None = field(
            default=None,
            metadata={
                "help": "mixed, with labels for the calibration rows (--calib-labels, or --labels when the "
                "feeds are the calibration rows): largest AUC drop of each score output, at the upper "
                "end of its one-sided 95% interval (paired DeLong error, so few rows allow little); "
                "score outputs then keep only the parity gate's rank and cosine defaults (0.99) in "
                "place of mixed_min_rank_corr and mixed_min_cosine",
                "min": 0.0,
                "max": 1.0,
            },
        )
        stack_tables: bool = field(
            default=True,
            metadata={
                "help": "tables decoded at load (under fold_tables_below) that share a width and their bits "
                "(under 8) are stacked into one table, split after decoding: one set of decode nodes and "
                "row scales; small tables held at 8 bits by low_bit_min_elements are stacked apart and "
                "take embedding_bits when their stack reaches it (with mixed: tables the search gave the "
                "same bits)"
            },
        )
        low_bit_min_elements: int = field(
            default=0,
            metadata={
                "help": "bits and embedding_bits under 8 apply to weights of at least this many values; "
                "smaller ones (a 25-input logit, a 7-row table) take 8 bits: under 512 bytes more, and "
                "their 4-bit error moves the score as much as a large layer's (not with mixed)",
                "min": 0,
            },
        )
        float_storage: str = field(
            default="float16",
            metadata={
                "help": "storage of the float tensors left (biases, norms, linear-layer scales): float16 "
                "(cast back at load) or float32",
                "choices": ("float16", "float32"),
            },
        )
        op_types: tuple[str, ...] = field(
            default=("MatMul", "Gemm", "Conv", "Gather", "Add", "LSTM", "GRU", "RNN"),
            metadata={
                "help": "ops whose weights are quantized (Add: a table of 256+ values added to activations, "
                "such as positional embeddings an exporter folded into a constant, quantized as a table; "
                "LSTM/GRU/RNN: their input and recurrent weights, one scale per gate row or block)"
            },
        )
        include: str = field(default="", metadata={"help": "regex: only weights or nodes whose name matches"})
        exclude: str = field(default="", metadata={"help": "regex: skip weights or nodes whose name matches"})
        min_elements: int = field(default=0, metadata={"help": "leave weights with fewer elements in float", "min": 0})

    def call(self, model: ir.Model) -> CompressionResult:
        self._linear_cache = {}
        self._integer_choices = {}
        self._level_choices = {}
        self._created: dict[str, list[ir.Value]] = {}
        selected, skipped = self._select(model)
        if not selected:
            # A tree ensemble keeps its thresholds in attributes: say so rather than "no change".
            reason = NOTHING_TO_QUANTIZE if model.graph.initializers else NO_WEIGHTS_HINT
            found = {"skipped": skipped} if skipped else {"nothing_to_quantize": reason}
            return CompressionResult(model, modified=False, stats=found)
        opset = model.opset_imports.get("", 1)
        converted = self._prepare_opset(model)
        if converted:
            # Conversion through the ONNX C API rebuilds the graph: select from the new one.
            selected, skipped = self._select(model)
        self._one_scale = set()
        # The pass's bytes are priced on the graph itself: what it removed against what it added.
        initial = {value: _stored_bytes(value) for value in model.graph.initializers.values()}
        hessians = self._hessians(model, selected)
        self._lookup_hessians = self._table_hessians(model, selected)
        # The bit widths are searched with every layer's float-activation codes: the activation
        # check that follows prices its integer layers' codes against those, and may return any
        # layer to float. Searched with the candidates' integer codes, the scikit-learn MLP's first
        # layer failed 4 bits there, stayed at 8, then went back to float anyway (mixed 7.16x -> 5.54x).
        candidates, self._integer_layers = self._integer_layers, set()
        try:
            plan, search = self._plan_bits(model, selected, hessians)
        finally:
            self._integer_layers = candidates
        activation_plans = dict(self._activation_plans)
        reserve: dict[str, float] = {}
        reserved_for: list[str] = []
        for searches in range(1, ACTIVATION_RESERVE_MAX_SEARCHES + 1):
            activations = self._plan_activations(
                model, selected, plan, hessians, reserve, may_reserve=searches < ACTIVATION_RESERVE_MAX_SEARCHES
            )
            needed = activations.get("reserve_needed")
            if needed is None:
                break
            # Integer layers that save much of the model's time did not fit the activation budget
            # on top of the widths: the widths are searched again leaving them that much room.
            reserve = {key: reserve.get(key, 0.0) + room for key, room in needed.items()}
            reserved_for = activations["reserve_for"]
            self._activation_plans, self._integer_layers = dict(activation_plans), set()
            try:
                plan, search = self._plan_bits(model, selected, hessians, reserve)
            finally:
                self._integer_layers = set(candidates)
        if reserve:
            activations["reserved_for"] = reserved_for
            search["searches"] = searches
        equalized = self._equalize(model, selected, hessians)
        # Smoothing before stacking: a stacked table is no longer a constant the factors can fold
        # into, and each part would get a Mul (MMoE int4 one row 0.89x the original's speed).
        smoothing = self._apply_smoothing(model.graph, selected)
        stacked = self._stack_tables(model, selected, plan)
        tensors: dict[str, dict[str, Any]] = {}
        tables = []
        for value, uses in selected.items():
            name = value.name or "weight"
            if plan[value] == 32:
                skipped[name] = "kept in float by the mixed-precision search"
            elif _is_table(uses):
                tables.append(value)
            else:
                # Before the tables' threads start: LAPACK's threads (GPTQ's Cholesky) slow down
                # tenfold when they compete with other busy threads for the cores.
                tensors[name] = self._quantize_linear(model.graph, value, uses, hessians.get(name), plan[value])
        # Tables' numerics run two at a time (numpy and file reads release the GIL); the graph is
        # then edited in order. Each table's codes are kept until save anyway.
        with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
            table_codes = {value: pool.submit(self._encode_table, value, plan[value]) for value in tables}
            for value in tables:
                encoded = table_codes.pop(value).result()
                tensors[value.name or "weight"] = self._quantize_table(
                    model.graph, value, selected[value], plan[value], encoded
                )
        order = {value.name or "weight": index for index, value in enumerate(selected)}
        tensors = dict(sorted(tensors.items(), key=lambda item: order[item[0]]))
        for name, parts in stacked.items():
            tensors[name]["stacked"] = parts
        for name, how in smoothing.items():
            tensors[name]["smoothing"] = how
        for name, next_layer in equalized.items():
            tensors[name]["equalized_into"] = next_layer
        shared_alphas = _share_sign_decoding(model.graph)
        coded_alphas = _alphas_from_one_codebook(model.graph, shared_alphas) if self.config.scale_codebook else 0
        halved = _store_floats_as_float16(model.graph) if self.config.float_storage == "float16" else {}
        final = set(model.graph.initializers.values())
        for name, entry in tensors.items():
            # Scales made float32 here and stored as float16 at the end are priced as stored.
            entry["bytes_after"] = sum(
                _stored_bytes(halved.get(value, value))
                for value in self._created.get(name, ())
                if value in final or value in halved
            )
        before = sum(size for value, size in initial.items() if value not in final)
        after = sum(_stored_bytes(value) for value in final if value not in initial)
        stats = {
            "weights_quantized": len(tensors),
            # The int4 types, block scales and float16 scales need opset 21: say the model moved.
            **({"opset_converted": f"{opset} -> {QUANT_OPSET}"} if converted else {}),
            "bytes_before": before,
            "bytes_after": after,
            "ratio": round(before / max(after, 1), 3),
            "float16_tensors": len(halved),
            **({"binary_weights_sharing_one_decode": len(shared_alphas)} if shared_alphas else {}),
            **({"binary_alphas_in_one_codebook": coded_alphas} if coded_alphas else {}),
            "integer_layers": sum(entry.get("form") == "dynamic" for entry in tensors.values()),
            **({"mixed_precision": search} if search else {}),
            **({"activations": activations} if activations else {}),
            "tensors": tensors,
            "skipped": skipped,
        }
        return CompressionResult(model, modified=True, stats=stats)

    # --- selection -------------------------------------------------------------------------------

    def _select(self, model: ir.Model) -> tuple[dict[ir.Value, list[WeightUse]], dict[str, str]]:
        config = self.config
        include = re.compile(config.include) if config.include else None
        exclude = re.compile(config.exclude) if config.exclude else None
        selected: dict[ir.Value, list[WeightUse]] = {}
        skipped: dict[str, str] = {}
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            slot = WEIGHT_SLOTS.get(node.op_type)
            weight = node.inputs[slot[0]] if slot is not None and slot[0] < len(node.inputs) else None
            if weight is None or not weight.is_initializer():
                continue
            if weight.is_graph_input():
                skipped[weight.name or ""] = OVERRIDABLE_WEIGHT
            elif node.graph is not model.graph:
                skipped[weight.name or ""] = (
                    "read inside an If/Loop/Scan body: only main-graph weights are quantized "
                    "(an embedding bag's Loop: run cleanup first, which replaces it)"
                )
        for value, uses in {**weights_by_value(model), **_added_tables(model.graph)}.items():
            name = value.name or ""
            names = [name, *(use.node.name or "" for use in uses)]
            tensor = value.const_value
            assert tensor is not None
            is_table = _is_table(uses)
            known = {(id(use.node), use.input_index) for use in uses}
            elsewhere = [(node, index) for node, index in value.uses() if (id(node), index) not in known]
            if elsewhere and is_table:
                # Also read as a plain tensor (a dynamo export slices a tied item table): those
                # readers get the table decoded whole, as a tied output layer does.
                uses = [*uses, *(WeightUse(node, index, value, "tensor", 0, None) for node, index in elsewhere)]
            if elsewhere and not is_table:
                skipped[name] = f"also read by {elsewhere[0][0].op_type} as a plain tensor: left in float"
            elif not any(use.node.op_type in config.op_types for use in uses):
                skipped[name] = "op type not in quant.op_types"
            elif include is not None and not any(include.search(n) for n in names):
                skipped[name] = "not matched by quant.include"
            elif exclude is not None and any(exclude.search(n) for n in names):
                skipped[name] = "matched by quant.exclude"
            elif tensor.size < config.min_elements:
                skipped[name] = f"fewer than quant.min_elements={config.min_elements} elements"
            elif tensor.size <= FINITE_CHECK_MAX_ELEMENTS and not np.isfinite(tensor.numpy()).all():
                skipped[name] = NON_FINITE_WEIGHT
            elif is_table and config.embedding_bits == 0:
                skipped[name] = "embedding table and quant.embedding_bits=0"
            elif is_table and any(use.kind != "embedding" and use.out_axis != 0 for use in uses):
                skipped[name] = "table also used as a weight whose channels are not its rows"
            else:
                selected[value] = uses
        return selected, skipped

    def _stack_tables(
        self, model: ir.Model, selected: dict[ir.Value, list[WeightUse]], plan: dict[ir.Value, int]
    ) -> dict[str, list[str]]:
        """Stack tables decoded at load that share a width, a dtype and their planned bits (under 8)
        into one, split back into the tables after it is decoded (folded at load): one set of decode
        nodes and row-scale parameters instead of one per table. Row-wise codes are the same stacked
        or not (with ``mixed``, the tables the search gave the same bits: their scale storage is then
        chosen for the stack, which the parity gate checks). Updates ``selected`` and ``plan`` in
        place; returns the stacks' names with the tables each holds."""
        config = self.config
        if not config.stack_tables or model.opset_imports.get("", 1) < SPLIT_INPUT_OPSET:
            return {}
        graph = model.graph
        groups: dict[tuple[int, ir.DataType, int, bool], list[ir.Value]] = {}
        for value, uses in selected.items():
            tensor = value.const_value
            assert tensor is not None
            shape = _static_shape(tensor)
            if (
                len(shape) == 2
                and shape[1] >= NARROW_TABLE_WIDTH
                and tensor.dtype.is_floating_point()
                and tensor.nbytes < config.fold_tables_below
                and 0 < plan[value] < 32
                and self._pq_dims(shape, plan[value]) is None
                and not value.is_graph_output()
                and all(use.kind == "embedding" and use.node.op_type == "Gather" for use in uses)
            ):
                # Small tables (every example reads one of a few rows: gender, age) stack apart, with
                # their own row scales: in the large tables' stack they shared its scale codebook
                # (mixed DLRM: the AUC bound on labelled rows 0.00050 planned, 0.00055 stacked).
                small = tensor.size < (SMALL_TABLE_ELEMENTS if config.mixed else config.low_bit_min_elements)
                groups.setdefault((shape[1], tensor.dtype, plan[value], small), []).append(value)
        stacked: dict[str, list[str]] = {}
        for (width, _, bits, small), tables in _stacks_under(groups, config.fold_tables_below):
            if len(tables) < 2:
                continue
            rows = np.array([_static_shape(table.const_value)[0] for table in tables], np.int64)  # type: ignore[arg-type]
            if small and not config.mixed and int(rows.sum()) * width >= config.low_bit_min_elements:
                # Held at 8 bits for their size alone; stacked, they are one table of that size,
                # in a stack of their own: their own row offsets and scales, which the few rows
                # every example reads (gender, age) need.
                bits = config.embedding_bits
            if bits >= 8:
                # 8-bit tables mostly take one scale each (enough at 8 bits); stacked, tables of
                # different ranges would share one, or each row would pay for its own.
                continue
            names = [table.name or "table" for table in tables]
            build = _Builder(graph, f"{names[0]}_stack")
            stack = build.constant("rows", np.concatenate([table.const_value.numpy() for table in tables]))  # type: ignore[union-attr]
            parts = build.multi("Split", [stack, build.constant("rows_each", rows)], outputs=len(tables), axis=0)
            build.insert_before(_first(graph, [use for table in tables for use in selected[table]]))
            self._lookup_hessians[stack.name or ""] = [
                segment
                for table, count in zip(tables, rows, strict=True)
                for segment in self._lookup_hessians.pop(table.name or "", [(int(count), None)])
            ]
            for table, part in zip(tables, parts, strict=True):
                for use in selected.pop(table):
                    use.node.replace_input_with(use.input_index, part)
                del plan[table]
                graph.initializers.pop(table.name)  # type: ignore[arg-type]
            split = parts[0].producer()
            assert split is not None
            selected[stack] = [WeightUse(split, 0, stack, "embedding", 0, None)]
            plan[stack] = bits
            stacked[stack.name or "stack"] = names
        return stacked

    def _prepare_opset(self, model: ir.Model) -> bool:
        """Convert the model to opset 21 with the ONNX version converter (never just relabel it).

        Returns whether the model was converted."""
        converted = model.opset_imports.get("", 1) < QUANT_OPSET
        if converted:
            import onnxscript.version_converter as version_converter

            converter_logger = logging.getLogger("onnxscript.version_converter")
            previous_level = converter_logger.level
            converter_logger.setLevel(logging.ERROR)
            try:
                version_converter.convert_version(model, QUANT_OPSET, fallback=True)
            finally:
                converter_logger.setLevel(previous_level)
        model.ir_version = max(model.ir_version or 0, QUANT_IR_VERSION)
        return converted

    # --- mixed precision -------------------------------------------------------------------------

    def _plan_bits(
        self,
        model: ir.Model,
        selected: dict[ir.Value, list[WeightUse]],
        hessians: dict[str, np.ndarray],
        reserve: dict[str, float] | None = None,
    ) -> tuple[dict[ir.Value, int], dict[str, Any]]:
        """Bits per weight: the configured widths, or with ``mixed`` a greedy search on calibration data.

        Each weight's sensitivity at each lower width is measured alone (the others in float); then
        moves are taken in order of bytes saved per unit of sensitivity, each kept only if the whole
        model, with every weight at its current width, still meets the fidelity budget. The
        sensitivity is 1 plus how far the weight alone misses the budget, so among the moves that
        fit alone the largest saving goes first: pricing moves by the share of the budget each uses
        alone was measured too, and spent the budget on many small moves (the EmbeddingBag DLRM's
        max preset 16.2x against 18.0x, mixed no better anywhere).
        """
        config = self.config
        plan = {value: (config.embedding_bits if _is_table(uses) else config.bits) for value, uses in selected.items()}
        calibration = self.context.calibration
        if config.max_auc_drop is not None and not config.mixed:
            raise UsageError("quant.max_auc_drop budgets the mixed-precision search; set quant.mixed=true too")
        if not config.mixed:
            for value, bits in plan.items():
                if 0 < bits < 8 and value.const_value.size < config.low_bit_min_elements:  # type: ignore[union-attr]
                    plan[value] = 8
            return plan, {}
        if calibration is None:
            return plan, {"skipped": "no calibration data: the configured bits were used"}
        if calibration.feeds.rows < MIXED_MIN_ROWS:
            # Its budget is a rank correlation and a cosine over the rows: on one row a cosine is 1
            # whatever the widths (a batch-1 MLP went to 2 bits and scored fresh rows at Spearman 0.41).
            skipped = (
                f"{calibration.feeds.rows} calibration rows, fewer than {MIXED_MIN_ROWS}: the configured bits were used"
            )
            return plan, {"skipped": skipped}
        ladder = sorted({bits for bits in config.mixed_bits if bits in BIT_CHOICES}, reverse=True)
        # ``reserve``: what integer layers' activations are to have left (see ``call``).
        min_rank_corr = config.mixed_min_rank_corr + (reserve or {}).get("min_rank_corr", 0.0)
        min_cosine = config.mixed_min_cosine + (reserve or {}).get("min_cosine", 0.0)
        budget = Budgets(
            Budget(min_rank_corr=min_rank_corr, min_cosine=min_cosine, max_mismatch=config.mixed_max_mismatch)
        )
        # Every evaluation hands the model with its simulated weights to onnxruntime: weights above
        # this size would be materialised in float each time, so they keep the configured bits.
        too_large = {value for value in selected if value.const_value.nbytes > MIXED_SEARCH_MAX_BYTES}  # type: ignore[union-attr]
        searched = {value: uses for value, uses in selected.items() if value not in too_large}
        reference = runtime.run(runtime.make_session(model, "disable"), calibration.feeds.arrays)
        originals = {value: value.const_value for value in searched}
        fakes: dict[tuple[ir.Value, int], ir.TensorProtocol] = {}

        def fake(value: ir.Value, bits: int) -> ir.TensorProtocol:
            if (value, bits) not in fakes:
                fakes[(value, bits)] = ir.tensor(self._simulate(value, selected[value], bits, hessians))
            return fakes[(value, bits)]

        labels = self._auc_labels(reference)

        def measure(state: dict[ir.Value, int]) -> tuple[float, dict[str, dict[str, float]]]:
            """How far the model with ``state`` is from the budget (> 0 means it fails), and each
            score output's AUC change on the labelled calibration rows."""
            try:
                for value, bits in state.items():
                    value.const_value = fake(value, bits)
                outputs = runtime.run(runtime.make_session(model, "disable"), calibration.feeds.arrays)
            finally:
                for value, tensor in originals.items():
                    value.const_value = tensor
            result = compare(reference, outputs, budget)
            worst = 0.0
            aucs: dict[str, dict[str, float]] = {}
            for output in result.outputs:
                needed = output.would_pass_with
                scored = labels is not None and output.name in labels
                cosine_floor = LOSSY.min_cosine if scored else min_cosine
                rank_floor = LOSSY.min_rank_corr if scored else min_rank_corr
                worst = max(worst, (cosine_floor or 0.0) - needed.get("min_cosine", 1.0))
                worst = max(worst, (rank_floor or 0.0) - needed.get("min_rank_corr", 1.0))
                if "max_mismatch" in needed:
                    rate = _flip_rate(needed["max_mismatch"], reference[output.name].size)
                    worst = max(worst, rate - config.mixed_max_mismatch)
                if scored:
                    assert labels is not None and config.max_auc_drop is not None
                    column, rows = labels[output.name]
                    delta, error = auc_difference(
                        rows, scores_of(reference[output.name], column), scores_of(outputs[output.name], column)
                    )
                    bound = max(-delta, 0.0) + AUC_CONFIDENCE_Z * error
                    aucs[output.name] = {"delta": delta, "standard_error": error, "drop_bound": bound}
                    worst = max(worst, bound - config.max_auc_drop)
            return worst, aucs

        def loss(state: dict[ir.Value, int]) -> float:
            return measure(state)[0]

        state = {value: ladder[0] for value in searched}
        evaluations = 1
        worst, state_aucs = measure(state)
        if worst > 0:
            return plan, {"skipped": f"already over budget at {ladder[0]} bits: the configured bits were used"}
        sensitivity: dict[tuple[ir.Value, int], float] = {}
        frozen: set[ir.Value] = set()
        while True:
            moves = []
            for value in searched:
                if value in frozen:
                    continue
                # The next width down that takes fewer bytes: on a small weight, 3 bits' unpacking
                # outweighs the codes it saves over 4 bits.
                current = self._estimated_bytes(value, selected[value], state[value])
                smaller = [
                    (bits, current - size)
                    for bits in ladder[ladder.index(state[value]) + 1 :]
                    if (size := self._estimated_bytes(value, selected[value], bits)) < current
                ]
                if not smaller:
                    continue
                lower, saved = smaller[0]
                if (value, lower) not in sensitivity:
                    sensitivity[(value, lower)] = loss({value: lower}) + 1.0
                    evaluations += 1
                moves.append((saved / sensitivity[(value, lower)], value, lower))
            if not moves:
                break
            _, value, lower = max(moves, key=lambda move: move[0])
            trial = {**state, value: lower}
            evaluations += 1
            worst, trial_aucs = measure(trial)
            if worst <= 0:
                state, state_aucs = trial, trial_aucs
            else:
                frozen.add(value)
        summary: dict[str, Any] = {
            "bits": {value.name: bits for value, bits in state.items()},
            "evaluations": evaluations,
            "budget": {
                "min_rank_corr": round(min_rank_corr, 6),
                "min_cosine": round(min_cosine, 6),
                "max_mismatch": config.mixed_max_mismatch,
                **({"max_auc_drop": config.max_auc_drop, "auc_confidence": 0.95} if labels else {}),
            },
            "calibration_rows": calibration.feeds.rows,
        }
        if labels:
            summary["calibration_auc"] = {
                name: {key: round(figure, 5) for key, figure in figures.items()} for name, figures in state_aucs.items()
            }
        if too_large:
            summary["not_searched"] = {
                value.name: f"{value.const_value.nbytes / 2**20:.0f} MiB, above the search's "  # type: ignore[union-attr]
                f"{MIXED_SEARCH_MAX_BYTES >> 20} MiB: kept at {plan[value]} bits"
                for value in too_large
            }
        return {**plan, **state}, summary

    def _auc_labels(self, reference: dict[str, np.ndarray]) -> dict[str, tuple[int, np.ndarray]] | None:
        """With ``max_auc_drop``: each score output's column and the calibration labels it is judged on."""
        config = self.config
        if config.max_auc_drop is None:
            return None
        calibration = self.context.calibration
        if calibration is None or calibration.labels is None:
            raise UsageError(
                "quant.max_auc_drop needs labels for the calibration rows: give --calib-labels (aligned with "
                "--calib), or --labels when the feeds are the calibration rows"
            )
        scored = {}
        for name, array in reference.items():
            column = score_column(array.shape) if array.dtype.kind == "f" else None
            labels = calibration.labels.get(name, calibration.labels.get(""))
            if column is not None and labels is not None and array.shape[0] == labels.size:
                scored[name] = (column, labels)
        if not scored:
            raise UsageError(
                "quant.max_auc_drop: no output gives one score per calibration row to judge against the labels; "
                "budget the search with mixed_min_rank_corr instead"
            )
        return scored

    def _simulate(
        self, value: ir.Value, uses: list[WeightUse], bits: int, hessians: dict[str, np.ndarray]
    ) -> np.ndarray:
        """The float weights this pass would produce for ``value`` at ``bits`` (same numerics), for
        the layer's unsmoothed input."""
        tensor = value.const_value
        assert tensor is not None
        weight = tensor.numpy().astype(np.float32)
        if _is_table(uses):
            quantized, _, _ = self._table_codes(
                weight, bits, tensor.nbytes < self.config.fold_tables_below, self._lookup_hessians.get(value.name or "")
            )
            return _dequantized(quantized).reshape(weight.shape).astype(tensor.dtype.numpy())
        use = uses[0]
        rows = _channel_rows(weight, use)
        quantized, granularity, dynamic, _ = self._linear_codes(rows, uses, bits, hessians.get(value.name or ""))
        restored = _restored(quantized, granularity, *rows.shape)
        if dynamic and bits < 8 and not _integer_codes(quantized, granularity, rows.shape[0]):
            codes, requantized = int8_requantize(restored, _pair_levels(quantized))
            restored = codes * requantized[:, None].astype(np.float64)
        scales = self._smoothing(uses, dynamic)
        if scales is not None:
            restored = restored / scales
        moved_shape = (weight.shape[use.out_axis], *[d for i, d in enumerate(weight.shape) if i != use.out_axis])
        restored = restored.reshape(moved_shape)
        return np.moveaxis(restored, 0, use.out_axis).astype(tensor.dtype.numpy())

    # --- calibration -----------------------------------------------------------------------------

    def _estimated_bytes(self, value: ir.Value, uses: list[WeightUse], bits: int) -> float:
        """Bytes a weight takes at ``bits``: codes plus roughly one scale per row (one byte in a scale
        codebook), or for product codes their codebooks (16 centroids of 2 bytes a value)."""
        tensor = value.const_value
        assert tensor is not None
        shape = _static_shape(tensor)
        rows = int(np.prod(shape[:-1])) if uses[0].kind == "recurrent" else shape[uses[0].out_axis]
        table = _is_table(uses)
        if table and self._pq_dims(shape, bits) is not None:
            return tensor.size * bits / 8 + PQ_CENTROIDS * shape[1] * 2
        if table and shape[1] < NARROW_TABLE_WIDTH:
            return tensor.size * bits / 8 + _unpacking_bytes(bits)
        scale_bytes = 1 if table and self.config.scale_codebook and rows >= CODEBOOK_MIN_ROWS else 2
        return tensor.size * bits / 8 + rows * scale_bytes + _unpacking_bytes(bits)

    def _table_hessians(
        self, model: ir.Model, selected: dict[ir.Value, list[WeightUse]]
    ) -> dict[str, list[tuple[int, np.ndarray | None]]]:
        """With calibration data and ``rounding`` auto or gptq, for tables that may go under 8 bits
        row by row: how the model's outputs move with a looked-up row (``Calibration.lookup_hessians``),
        so their codes are rounded with GPTQ's error feedback against it. A row's error then lies
        where the model reads little of it: SASRec's item table alone at 3 bits, ΔAUC -0.0012 -> -0.0002
        on the test rows, its output error 0.072 -> 0.033. Not for models above
        ``MIXED_SEARCH_MAX_BYTES`` of weights (a session and a run per column of each table)."""
        config = self.config
        calibration = self.context.calibration
        low_bits = config.mixed or 2 <= config.embedding_bits < 8
        if calibration is None or config.rounding not in ("auto", "gptq") or not low_bits:
            return {}
        if sum(value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value) > (
            MIXED_SEARCH_MAX_BYTES
        ):
            return {}
        tables = {
            value.name: shape[0]
            for value, uses in selected.items()
            if value.name
            and all(use.kind == "embedding" and use.node.op_type == "Gather" for use in uses)
            and len(shape := _static_shape(value.const_value)) == 2  # type: ignore[arg-type]
            and shape[1] >= NARROW_TABLE_WIDTH
            and value.const_value.dtype.is_floating_point()  # type: ignore[union-attr]
        }
        measured = calibration.lookup_hessians(model, list(tables), LOOKUP_HESSIAN_BUDGET) if tables else {}
        return {name: [(tables[name], hessian)] for name, hessian in measured.items()}

    def _wants_gptq(self, use: WeightUse) -> bool:
        rounding = self.config.rounding
        calibrated = self.context.calibration is not None
        return (
            use.kind == "linear"
            and (self.config.bits >= 2 or self.config.level_codes)
            and (rounding == "gptq" or (rounding == "auto" and calibrated))
        )

    def _hessians(self, model: ir.Model, selected: dict[ir.Value, list[WeightUse]]) -> dict[str, np.ndarray]:
        """``X^T X`` of each linear layer's input on the calibration rows (for GPTQ); for integer
        activations also each layer's smoothing and activation error (``self._activation_plans``) and
        the layers that go integer on their own merits (``self._integer_layers``)."""
        config = self.config
        calibration = self.context.calibration
        self._activation_plans = {}
        self._static_activations = {}
        self._static_outputs = {}
        self._integer_layers = set()
        self._layer_timings = {}
        self._model_timing = None
        self._reference_timing = None
        self._hessian_rows = {}
        gptq: dict[str, ir.Value] = {}
        dynamic: dict[str, tuple[ir.Value, np.ndarray]] = {}
        dynamic_values: dict[str, ir.Value] = {}
        shared: set[str] = set()
        for value, uses in selected.items():
            use = uses[0]
            x = use.node.inputs[0]
            if _is_table(uses) or x is None or (use.node.op_type == "Gemm" and use.node.attributes.get_int("transA")):
                continue
            if len(uses) == 1 and self._wants_gptq(use):
                gptq[value.name or ""] = x
            if config.activations in ("auto", "dynamic", "static") and _dynamic_ready(uses):
                dynamic[value.name or ""] = (x, _channel_rows(value.const_value.numpy(), use))  # type: ignore[union-attr]
                dynamic_values[value.name or ""] = value
                if len(uses) > 1:
                    shared.add(value.name or "")  # one smoothing cannot suit several inputs
        if config.activations == "dynamic":
            self._integer_layers = set(dynamic)
        if calibration is None or not (gptq or dynamic):
            return {}
        hessians: dict[str, np.ndarray] = {}
        batches: dict[str, list[np.ndarray]] = {name: [] for name in dynamic}
        captured = {value.name: value for value in [*gptq.values(), *(x for x, _ in dynamic.values())]}
        relu_outputs: dict[str, ir.Value] = {}
        if config.activations == "static":
            for weight_name, (x, _) in dynamic.items():
                node = selected[dynamic_values[weight_name]][0].node
                relu = _relu_after(node)
                # Only a Gemm (which onnxruntime makes of a 2-D MatMul and its bias Add) is fused
                # with its Relu in float before the QDQ fusion; a sequence layer's MatMul is not.
                two_dimensional = x.shape is None or len(x.shape) == 2
                if relu is not None and not relu.is_graph_output() and (node.op_type == "Gemm" or two_dimensional):
                    relu_outputs[weight_name] = captured.setdefault(relu.name, relu)
        relu_batches: dict[str, list[np.ndarray]] = {name: [] for name in relu_outputs}
        for batch in calibration.iter_capture(model, list(captured.values())):
            for weight_name, relu in relu_outputs.items():
                relu_batches[weight_name].append(batch[relu.name or ""])
            for weight_name, input_value in gptq.items():
                inputs = batch[input_value.name or ""].astype(np.float64)
                inputs = inputs.reshape(-1, inputs.shape[-1])
                hessians[weight_name] = hessians.get(weight_name, 0) + inputs.T @ inputs
                self._hessian_rows[weight_name] = self._hessian_rows.get(weight_name, 0) + len(inputs)
            for weight_name, (input_value, _) in dynamic.items():
                inputs = batch[input_value.name or ""].astype(np.float32)
                batches[weight_name].append(inputs.reshape(-1, inputs.shape[-1]))
        timings: dict[str, LayerTiming] = {}
        for weight_name, (_, rows) in dynamic.items():
            channels, inputs = rows.shape
            if config.activations == "static":
                # One range for every batch: no smoothing, whose factors a fixed range would have
                # to be measured after.
                samples = batches.pop(weight_name)
                static = self._static_activations[weight_name] = static_activation_range(samples)
                if weight_name in relu_outputs:
                    output = static_activation_range(relu_batches[weight_name])
                    self._static_outputs[weight_name] = (relu_outputs[weight_name], output)
                error = static_activation_error(samples, rows, static)
                self._activation_plans[weight_name] = ActivationPlan(None, error, error)
                if error <= config.activation_tolerance and _static_ready(selected[dynamic_values[weight_name]]):
                    use = selected[dynamic_values[weight_name]][0]
                    rows_each = rows_per_example(use.node.inputs[0])
                    timings[weight_name] = probe_static_matmul(inputs, channels, _feeds_relu(use.node), rows_each)
                continue
            plan = plan_activations(batches.pop(weight_name), rows)
            if not config.smoothing or weight_name in shared:
                plan = ActivationPlan(None, plan.error_unsmoothed, plan.error_unsmoothed)
            self._activation_plans[weight_name] = plan
            if config.activations == "auto" and plan.error <= config.activation_tolerance:
                use = selected[dynamic_values[weight_name]][0]
                x = use.node.inputs[0]
                timing = probe_dynamic_matmul(inputs, channels, _feeds_relu(use.node), rows_per_example(x))
                # A smoothing Mul that cannot be folded (a graph input, an input shared by the
                # query, key and value projections) is one more pass over the activations, which
                # the probe does not time: the layer goes without it when its error allows
                # (two-tower one-row latency 1.14x -> 1.04x the original's; SASRec batch 512
                # 1.03x -> 1.19x).
                needs_mul = (
                    plan.scales is not None
                    and x is not None
                    and scaling_form(model.graph, x, 1.0 / plan.scales) != "folded"
                )
                # Folded into the layer before, the factors cost that layer: below 8 bits they
                # scale output channels inside blocks that share a scale (Wide&Deep int4: the first
                # layer's error 0.039 -> 0.043, 0.0006 more AUC lost); at 8 bits they stop it from
                # being equalised (a float16 scale vector and a per-channel kernel: int8 DLRM
                # 3.885x -> 3.905x). Where the error allows, the layer goes without.
                lands_in_a_layer = plan.scales is not None and x is not None and _linear_producer(x) is not None
                if (needs_mul or lands_in_a_layer) and plan.error_unsmoothed <= config.activation_tolerance:
                    plan = ActivationPlan(None, plan.error_unsmoothed, plan.error_unsmoothed)
                    self._activation_plans[weight_name] = plan
                timings[weight_name] = timing
        if config.activations in ("auto", "static"):
            self._layer_timings = timings
            costly = any(timing.faster_on_batch and timing.single_cost > 0 for timing in timings.values())
            # The mixed search prices integer layers' time against the model's (binary layers, the
            # room reserved for activations), free ones too.
            if costly or (config.mixed and any(timing.faster_on_batch for timing in timings.values())):
                self._model_timing, self._reference_timing = self._model_timings(model, calibration)
            self._integer_layers = self._choose_integer_layers(timings)
        return hessians

    def _plan_activations(
        self,
        model: ir.Model,
        selected: dict[ir.Value, list[WeightUse]],
        plan: dict[ir.Value, int],
        hessians: dict[str, np.ndarray],
        reserve: dict[str, float] | None = None,
        may_reserve: bool = False,
    ) -> dict[str, Any]:
        """``activations=auto``: errors of 8-bit activations compound along a chain of layers, so the
        layers that pass alone are checked together. The model with every linear weight at its planned
        bits and every candidate layer's activations rounded as DynamicQuantizeLinear rounds them runs
        on the calibration rows; while it misses the activation budget, a smoothed candidate below 8
        bits goes without its smoothing, else the candidate with the largest error returns to float."""
        config = self.config
        calibration = self.context.calibration
        by_name = {value.name: value for value in selected}
        candidates = [name for name in self._integer_layers if self._integer_width(name, plan[by_name[name]])]
        self._integer_layers = set(candidates)
        if config.activations not in ("auto", "static") or calibration is None:
            return {}
        if not candidates:
            return {"integer_layers": 0, **self._timing_stats()} if self._layer_timings else {}
        simulated = [
            value
            for value, uses in selected.items()
            if not _is_table(uses) and plan[value] != 32 and value.const_value.nbytes <= MIXED_SEARCH_MAX_BYTES  # type: ignore[union-attr]
        ]
        originals = {value: value.const_value for value in simulated}
        reference = runtime.run(runtime.make_session(model, "disable"), calibration.feeds.arrays)
        # A weight's simulated values depend only on whether its own layer is integer, and smoothed.
        fakes: dict[tuple[ir.Value, bool, bool], ir.TensorProtocol] = {}

        def fake(value: ir.Value, integer: set[str]) -> ir.TensorProtocol:
            key = (value, value.name in integer, self._smoothing(selected[value], True) is not None)
            if key not in fakes:
                previous, self._integer_layers = self._integer_layers, integer
                try:
                    fakes[key] = ir.tensor(self._simulate(value, selected[value], plan[value], hessians))
                finally:
                    self._integer_layers = previous
            return fakes[key]

        def outputs_with(integer: set[str]) -> dict[str, np.ndarray]:
            """The calibration outputs with every weight at its planned bits and the activations of
            the ``integer`` layers rounded as DynamicQuantizeLinear (or, static, QuantizeLinear) rounds them."""
            build = _Builder(model.graph, "activation_probe")
            rewired: list[tuple[ir.Node, ir.Value]] = []
            rewired_outputs: list[tuple[ir.Node, int, ir.Value]] = []
            inserted: list[ir.Node] = []
            constants_before = set(model.graph.initializers)
            try:
                for value in simulated:
                    value.const_value = fake(value, integer)
                for name in integer:
                    scales = self._activation_plans[name].scales
                    for use in selected[by_name[name]]:
                        x = use.node.inputs[0]
                        assert x is not None
                        smoothed = x if scales is None else build.op("Mul", [x, build.constant("inverse", 1 / scales)])
                        static = self._static_activations.get(name)
                        if static is not None:
                            rounded = _round_statically(build, smoothed, static)
                        else:
                            codes, scale, zero = build.multi("DynamicQuantizeLinear", [smoothed], outputs=3)
                            rounded = build.op("DequantizeLinear", [codes, scale, zero])
                        if scales is not None:
                            rounded = build.op("Mul", [rounded, build.constant("scales", scales)])
                        inserted.extend(build.nodes)
                        build.insert_before(use.node)
                        use.node.replace_input_with(0, rounded)
                        rewired.append((use.node, x))
                    if name in self._static_outputs:
                        relu, static = self._static_outputs[name]
                        nodes, readers = _round_readers(build, relu, static)
                        inserted.extend(nodes)
                        rewired_outputs.extend((reader, index, relu) for reader, index in readers)
                return runtime.run(runtime.make_session(model, "disable"), calibration.feeds.arrays)
            finally:
                for node, x in rewired:
                    node.replace_input_with(0, x)
                for node, index, relu in rewired_outputs:
                    node.replace_input_with(index, relu)
                model.graph.remove(inserted, safe=True)
                for name in set(model.graph.initializers) - constants_before:
                    model.graph.initializers.pop(name)
                for value, tensor in originals.items():
                    value.const_value = tensor

        # The budget is what rounding the activations may cost on top of what the weights at their
        # planned bits already cost (4-bit weights alone take more than 8-bit activations may).
        weights_only = _figures(compare(reference, outputs_with(set()), Budgets(Budget())))
        ceilings = {
            "min_rank_corr": config.activation_min_rank_corr,
            "min_cosine": config.activation_min_cosine,
        }
        # With a reserve the widths left that much more room, which the activations may take.
        limits = {
            key: min(limit, weights_only.get(key, 1.0) - (1 - limit) - (reserve or {}).get(key, 0.0))
            for key, limit in ceilings.items()
        }
        limits["max_mismatch"] = weights_only.get("max_mismatch", 0.0) + config.activation_max_mismatch
        budget = Budgets(Budget(**limits))
        figures: dict[str, float] = {}
        dropped: list[str] = []
        eligible = {
            name: timing
            for name, timing in self._layer_timings.items()
            if self._integer_width(name, plan[by_name[name]])
        }
        unsmoothed: list[str] = []
        while self._integer_layers:
            result = compare(reference, outputs_with(self._integer_layers), budget)
            figures = _figures(result)
            if result.passed:
                break
            # Smoothing was chosen on the activations' error alone; below 8 bits a smoothed layer's
            # codes are rounded anew, on other rows, and can cost the model more than the
            # activations save. Before any layer returns to float, those go without it (the wide
            # DLRM's mixed file: none of five 2- and 3-bit layers integer with it, all five without).
            smoothed = [
                name
                for name in self._integer_layers
                if self._activation_plans[name].scales is not None
                and self._activation_plans[name].error_unsmoothed <= config.activation_tolerance
                and plan[by_name[name]] < 8
            ]
            if smoothed:
                name = max(smoothed, key=lambda name: self._activation_plans[name].error)
                error = self._activation_plans[name].error_unsmoothed
                self._activation_plans[name] = ActivationPlan(None, error, error)
                unsmoothed.append(name)
                continue
            worst = max(self._integer_layers, key=self._float_return_priority)
            self._integer_layers.discard(worst)
            dropped.append(worst)
            if self._model_timing is not None:
                # The one-row time the dropped layer would have spent may go to a layer the budget
                # left out (the scikit-learn MLP: its first layer flips labels, its second does not).
                self._integer_layers = self._choose_integer_layers(
                    {name: timing for name, timing in eligible.items() if name not in dropped}
                )
        readded = self._readd_dropped(dropped, eligible, outputs_with, reference, budget)
        if readded:
            figures = _figures(compare(reference, outputs_with(self._integer_layers), budget))
        if may_reserve:
            missed = [name for name in dropped if name not in readded]
            needed = self._activation_reserve(missed, eligible, outputs_with, reference, limits, reserve or {})
            if needed is not None:
                return {"reserve_needed": needed[0], "reserve_for": needed[1]}
        # At 8 bits an integer layer stores what a folded one does; below, it adds channel scales
        # (Wide&Deep int4 with a third integer layer: 7.02x -> 6.99x), so only the probe's choice.
        eight_bit = {name: timing for name, timing in eligible.items() if plan[by_name[name]] == 8}
        added = self._add_measured_layers(model, selected, eight_bit, dropped, outputs_with, reference, budget)
        confirmed = self._confirm_by_model_timing(model, selected)
        return {
            "integer_layers": len(self._integer_layers),
            **self._timing_stats(),
            **added,
            **confirmed,
            "returned_to_float": [name for name in dropped if name not in readded],
            **({"integer_again": readded} if readded else {}),
            **({"unsmoothed": unsmoothed} if unsmoothed else {}),
            "budget": {key: round(limit, 6) for key, limit in limits.items()},
            **({"reserve": {key: round(room, 6) for key, room in reserve.items()}} if reserve else {}),
            "weights_only": {key: round(figure, 6) for key, figure in weights_only.items()},
            "measured": {key: round(figure, 6) for key, figure in figures.items()},
        }

    def _activation_reserve(
        self,
        missed: list[str],
        eligible: dict[str, LayerTiming],
        outputs_with: Callable[[set[str]], dict[str, np.ndarray]],
        reference: dict[str, np.ndarray],
        limits: dict[str, float],
        reserved: dict[str, float],
    ) -> tuple[dict[str, float], list[str]] | None:
        """With ``mixed``: how much more room (Spearman, cosine) the widths must leave for the layers
        the activation budget returned to float (``missed``) that each save at least
        ``ACTIVATION_RESERVE_MIN_BATCH_SHARE`` of the model's batch time to fit beside the integer
        layers kept, and those layers; when the one-row latency allows them, they flip no more labels
        than the budget allows, and the room, with what was ``reserved`` before, is at most
        ``ACTIVATION_RESERVE_MAX_SHARE`` of the mixed budget. Else None."""
        config = self.config
        if not config.mixed or self._model_timing is None:
            return None
        worth = ACTIVATION_RESERVE_MIN_BATCH_SHARE * self._model_timing.batch
        missed = [name for name in missed if self._batch_gain(name) >= worth]
        if not missed:
            return None
        trial = self._integer_layers | set(missed)
        if not trial <= self._choose_integer_layers({name: eligible[name] for name in trial if name in eligible}):
            return None
        result = compare(reference, outputs_with(trial), Budgets(Budget(max_mismatch=limits["max_mismatch"])))
        if not result.passed:
            return None
        figures = _figures(result)
        needed = {key: max(limits[key] - figures.get(key, 1.0), 0.0) for key in ("min_rank_corr", "min_cosine")}
        floors = {"min_rank_corr": config.mixed_min_rank_corr, "min_cosine": config.mixed_min_cosine}
        if not any(needed.values()) or any(
            reserved.get(key, 0.0) + needed[key] > ACTIVATION_RESERVE_MAX_SHARE * (1 - floors[key]) for key in needed
        ):
            return None
        return needed, missed

    def _readd_dropped(
        self,
        dropped: list[str],
        eligible: dict[str, LayerTiming],
        outputs_with: Callable[[set[str]], dict[str, np.ndarray]],
        reference: dict[str, np.ndarray],
        budget: Budgets,
    ) -> list[str]:
        """Layers returned to float one at a time may not all have needed to go: the last to go can
        have been the one over budget, the others dropped before it would fit beside the rest. Each
        is tried again, most batch time saved first, and kept if the model still meets the budget
        (and, with timings, the one-row latency allows it)."""
        readded: list[str] = []
        for name in sorted(dropped, key=lambda name: -self._batch_gain(name)):
            trial = self._integer_layers | {name}
            if self._model_timing is not None and not trial <= self._choose_integer_layers(
                {layer: eligible[layer] for layer in trial if layer in eligible}
            ):
                continue
            if compare(reference, outputs_with(trial), budget).passed:
                self._integer_layers = trial
                readded.append(name)
        return readded

    def _integer_width(self, name: str, bits: int) -> bool:
        """Whether a layer at ``bits`` may run as an integer kernel. A binary layer's integer form adds
        the graph that rounds its signs to int8 (about 150 bytes) to a weight that may be a few
        hundred: with ``activations=auto``, only where it saves ``ACTIVATION_RESERVE_MIN_BATCH_SHARE``
        of the model's batch time (SASRec's 32x32 projections at 1 bit: 1.19x faster each, 2% larger
        file)."""
        if not MIN_INTEGER_BITS <= bits <= 8:
            return False
        if bits > 1 or self.config.activations != "auto":
            return True
        return (
            self._model_timing is not None
            and self._batch_gain(name) >= ACTIVATION_RESERVE_MIN_BATCH_SHARE * self._model_timing.batch
        )

    def _batch_gain(self, name: str) -> float:
        timing = self._layer_timings.get(name)
        return 0.0 if timing is None else timing.batch_gain

    def _float_return_priority(self, name: str) -> float:
        """Which integer layer returns to float first when the model misses the activation budget:
        the largest activation error per second it saves on a batch, so a layer that saves most of
        the model's time stays before one that saves little (the wide DLRM's 1024-wide 1-bit layer:
        6x faster integer, returned first by error alone). Without timings, the largest error."""
        error = self._activation_plans[name].error
        if name not in self._layer_timings:
            return error
        return error / max(self._batch_gain(name), 1e-9)

    def _confirm_by_model_timing(self, model: ir.Model, selected: dict[ir.Value, list[WeightUse]]) -> dict[str, Any]:
        """Keep the smoothed integer layers whose factors need a ``Mul`` (not folded upstream) only if
        the model timed with them, their inputs divided by their factors as written, is faster on a
        batch than with them in float (the other integer layers integer in both). The probe timed
        each layer alone and without its smoothing: the distilled DeepFM's first layer, 1.49x faster
        alone on a VNNI host, left the written model no faster at batch 512 (Muls over its 137
        inputs) and slower on one row, while it cost 0.0003 AUC. Returns the report's entry when
        they went back to float."""
        calibration = self.context.calibration
        if self.config.activations != "auto" or calibration is None:
            return {}
        if initializer_bytes(model) > REFERENCE_TIMING_MAX_BYTES:
            return {}
        by_name = {value.name: value for value in selected}
        factors = {
            name: scales
            for name in sorted(self._integer_layers)
            if (scales := self._activation_plans[name].scales) is not None
            and (x := selected[by_name[name]][0].node.inputs[0]) is not None
            and scaling_form(model.graph, x, 1.0 / scales) != "folded"
        }
        if not factors:
            return {}

        def uses(names: set[str]) -> list[WeightUse]:
            return [use for name in names for use in selected[by_name[name]]]

        smoothing = {id(use.node): scales for name, scales in factors.items() for use in selected[by_name[name]]}
        without = _integer_variant(model, uses(self._integer_layers - set(factors)))
        with_them = _integer_variant(model, uses(self._integer_layers), smoothing)
        if without is None or with_them is None:
            return {}
        floating, integer = model_timings([without, with_them], calibration.feeds.arrays)
        if integer.batch <= (1 - CONFIRM_MIN_BATCH_GAIN) * floating.batch:
            return {}
        self._integer_layers -= set(factors)
        timed = {"float_batch": round(floating.batch * 1e6, 1), "integer_batch": round(integer.batch * 1e6, 1)}
        return {"returned_to_float_by_model_timing": list(factors), "model_timing_us": timed}

    def _add_measured_layers(
        self,
        model: ir.Model,
        selected: dict[ir.Value, list[WeightUse]],
        eligible: dict[str, LayerTiming],
        dropped: list[str],
        outputs_with: Callable[[set[str]], dict[str, np.ndarray]],
        reference: dict[str, np.ndarray],
        budget: Budgets,
    ) -> dict[str, Any]:
        """More integer layers where the whole model, timed with them, keeps the one-row budget.

        A layer's one-row cost probed alone overstates what it costs inside the model (Wide&Deep's
        256- and 128-unit layers: 2.2 µs probed, 0.2 µs in the model), so the probe's choice can
        leave budget unspent. The layers it left out (those faster on a batch, in order of batch
        time saved per probed microsecond) are added one at a time to a copy of the model written
        with integer kernels of their shapes; the longest run of them whose timed one-row latency
        stays within the budget, against the original file timed beside it, is taken, less any
        that the calibration check then returns to float. Only with activations=auto, a reference
        file and layers at 8 bits (``eligible``). Returns the report's entries: the names added and
        the one-row time of the copy they were timed in, or nothing."""
        source = self.context.source
        calibration = self.context.calibration
        if self.config.activations != "auto" or self._model_timing is None or self._reference_timing is None:
            return {}
        if source is None or calibration is None or initializer_bytes(model) > REFERENCE_TIMING_MAX_BYTES:
            return {}
        chosen = set(self._integer_layers)
        left = sorted(
            (
                (name, timing)
                for name, timing in eligible.items()
                if name not in chosen
                and name not in dropped
                and timing.faster_on_batch
                and timing.batch_gain >= MIN_MODEL_BATCH_GAIN * self._model_timing.batch
            ),
            key=lambda item: item[1].batch_gain / max(item[1].single_cost, 1e-9),
            reverse=True,
        )[:MEASURED_MAX_ADDED]
        if not left:
            return {}
        by_name = {value.name: value for value in selected}
        sets = [chosen | {name for name, _ in left[: count + 1]} for count in range(len(left))]
        variants = [
            _integer_variant(model, [use for name in layers for use in selected[by_name[name]]]) for layers in sets
        ]
        if any(variant is None for variant in variants):
            return {}
        timings = model_timings([source, *variants], calibration.feeds.arrays)  # type: ignore[list-item]
        allowed = (1 + self.config.activation_max_latency) * timings[0].single
        fitting = [
            (layers, timing) for layers, timing in zip(sets, timings[1:], strict=True) if timing.single <= allowed
        ]
        if not fitting:
            return {}
        extended, timing = max(fitting, key=lambda item: len(item[0]))
        added = [name for name, _ in left if name in extended]
        while added and not compare(reference, outputs_with(chosen | set(added)), budget).passed:
            added.pop()
        self._integer_layers = chosen | set(added)
        if not added:
            return {}
        timed = {"single_row": round(timing.single * 1e6, 1), "original_single_row": round(timings[0].single * 1e6, 1)}
        return {"added_by_model_timing": added, "timed_with_added_us": timed}

    def _choose_integer_layers(self, timings: dict[str, LayerTiming]) -> set[str]:
        return choose_integer_layers(
            timings,
            self._model_timing,
            self.config.activation_max_latency,
            MIN_MODEL_BATCH_GAIN,
            self._reference_timing,
        )

    def _model_timings(self, model: ir.Model, calibration: Calibration) -> tuple[ModelTiming, ModelTiming | None]:
        """The float model's timing and, beside it, the original file's: earlier passes (pruning,
        distillation, cleanup) may have made it faster, and what they saved on one row integer
        layers may spend (the scikit-learn MLP after the max preset's pruning: 5.6 against 6.3 µs)."""
        source = self.context.source
        if source is None or not source.is_file() or initializer_bytes(model) > REFERENCE_TIMING_MAX_BYTES:
            return model_timing(model, calibration.feeds.arrays), None
        current, reference = model_timings([model, source], calibration.feeds.arrays)
        return current, reference

    def _timing_stats(self) -> dict[str, Any]:
        if self._model_timing is None:
            return {}
        figures = {"float_model_us": self._model_timing, "original_model_us": self._reference_timing}
        return {
            **{
                key: {"single_row": round(timing.single * 1e6, 1), "batch": round(timing.batch * 1e6, 1)}
                for key, timing in figures.items()
                if timing is not None
            },
            "max_latency_increase": self.config.activation_max_latency,
        }

    def _equalize(
        self, model: ir.Model, selected: dict[ir.Value, list[WeightUse]], hessians: dict[str, np.ndarray]
    ) -> dict[str, str]:
        """Cross-layer equalisation of 8-bit per-channel layers.

        Each hidden link ``P -> ReLU -> Q`` whose units can be rescaled exactly (``P``'s columns and
        bias, nothing but positively homogeneous ops between) divides ``P``'s units by their peaks
        relative to the median unit's and multiplies ``Q``'s input rows back: the same function,
        and ``P``'s channels can share one scale (``_one_scale``). Links are taken in graph order, so
        a layer both receives its input rows' factors and hands its own units on.

        This runs after the activation plan, and links into a smoothed integer layer are left
        alone: its smoothing factors would fold into ``P`` and undo the equalisation, and run first,
        equalisation changed what the plan measured (DeepFM int8: a layer then failed the
        whole-model check and went back to float, batch 512 1.94x -> 1.74x). An unsmoothed integer
        ``Q`` reads its rescaled input with one activation scale as before (its reported activation
        error is the one measured before). ``Q``'s ``X^T X`` is rescaled with its input.
        Returns ``{P's weight: Q's weight}``."""
        config = self.config
        if not config.equalize or config.bits != 8 or config.granularity != "channel" or config.mixed:
            return {}
        if not config.symmetric:  # one scale for asymmetric codes would also need one zero point
            return {}
        equalized: dict[str, str] = {}
        links, _ = mlp_links(model)
        for link in links:
            producer, consumer = link.producer, link.consumer
            if producer.weight not in selected or consumer.weight not in selected:
                continue
            plan = self._activation_plans.get(consumer.weight.name or "")
            smoothed = plan is not None and plan.scales is not None
            # A static layer's range was fixed on its inputs as they were.
            if (consumer.weight.name or "") in self._integer_layers and (smoothed or config.activations == "static"):
                continue
            if any(node.op_type not in POSITIVELY_HOMOGENEOUS or node.domain != "" for node in link.between):
                continue
            weight = constant_array(producer.weight)
            assert weight is not None
            peaks = np.abs(weight).max(axis=1 - producer.out_axis)
            factors = equalization_factors(peaks).astype(np.float32)
            x = consumer.data
            if scaling_form(model.graph, x, 1.0 / factors) != "folded":
                continue
            scale_last_axis(model.graph, x, 1.0 / factors, consumer.node)
            consumer_weight = constant_array(consumer.weight)
            assert consumer_weight is not None
            rows = factors[:, None] if consumer.out_axis == 1 else factors[None, :]
            set_constant(consumer.weight, (consumer_weight * rows).astype(consumer_weight.dtype))
            name = consumer.weight.name or ""
            if name in hessians:
                hessians[name] = hessians[name] / np.outer(factors, factors)
            equalized[producer.weight.name or ""] = name
        self._one_scale = set(equalized)
        return equalized

    def _apply_smoothing(self, graph: ir.Graph, selected: dict[ir.Value, list[WeightUse]]) -> dict[str, str]:
        """Divide each smoothed integer layer's input by its factors, folded into the ops upstream where
        they allow it (before any weight is quantized, so the folded weights are quantized as such)."""
        smoothed = []
        for value, uses in selected.items():
            scales = self._smoothing(uses, dynamic=(value.name or "") in self._integer_layers)
            if scales is not None and uses[0].node.inputs[0] is not None:
                smoothed.append((value.name or "", uses[0].node, scales))
        if not smoothed:
            return {}
        tables = {value.name: value for value in selected if value.name in self._lookup_hessians}
        columns = {name: _column_norms(value) for name, value in tables.items()}
        applied = {
            name: scale_last_axis(graph, node.inputs[0], 1.0 / scales, node)  # type: ignore[arg-type]
            for name, node, scales in smoothed
        }
        for name, value in tables.items():
            # A table whose columns took factors f: a change d of a scaled row is d / f of the
            # original's, so the outputs read it through diag(1/f) H diag(1/f).
            before = columns[name]
            factors = np.divide(_column_norms(value), before, out=np.ones_like(before), where=before > 0)
            if not np.allclose(factors, 1.0):
                self._lookup_hessians[name] = [
                    (count, None if hessian is None else hessian / np.outer(factors, factors))
                    for count, hessian in self._lookup_hessians[name]
                ]
        return applied

    # --- linear layers ---------------------------------------------------------------------------

    def _linear_plan(self, uses: list[WeightUse], shape: tuple[int, int], bits: int) -> tuple[str, int, bool]:
        """(granularity, inputs per scale, dynamic activations) for a linear weight at ``bits``."""
        config = self.config
        channels, inputs = shape
        granularity = config.granularity if bits > 1 else "channel"
        if bits == 8 and config.mixed:
            # The search's blocks are for the low widths: at 8 bits one scale per channel is as
            # close (a probe's DCN: mixed wrote 3.50x against int8's 3.58x with 8-bit blocks).
            granularity = "channel"
        if bits == 8 and not config.mixed and channels * inputs < config.low_bit_min_elements:
            # Kept at 8 bits for being small (a logit layer): one scale per channel, as the int8
            # preset stores it, needs no block Reshape or Transpose (about 60 bytes a weight).
            granularity = "channel"
        group = {"tensor": channels * inputs, "channel": inputs, "block": config.block_size}[granularity]
        if granularity == "block" and inputs % group:
            # First layers read concatenated features (137, 75, 52 inputs): equal blocks of at most
            # block_size, the last few columns padded with zeros, instead of one scale per channel.
            group = -(-inputs // -(-inputs // group))
        # Static activations read 8-bit weight codes through DequantizeLinear, which no runtime folds.
        min_bits = 8 if config.activations == "static" else MIN_INTEGER_BITS
        dynamic = bits >= min_bits and _dynamic_ready(uses) and (uses[0].value.name or "") in self._integer_layers
        if dynamic and bits == 8:
            granularity, group = "channel", inputs
        return granularity, group, dynamic

    def _smoothing(self, uses: list[WeightUse], dynamic: bool) -> np.ndarray | None:
        """The per-input-channel smoothing of an integer layer, if it has one."""
        plan = self._activation_plans.get(uses[0].value.name or "") if dynamic else None
        return None if plan is None else plan.scales

    def _linear_codes(
        self, rows: np.ndarray, uses: list[WeightUse], bits: int, hessian: np.ndarray | None
    ) -> tuple[QuantizedRows, str, bool, str]:
        """Quantize ``rows`` ``[channels, inputs]``: (codes, granularity, dynamic, rounding). The
        codes of a smoothed integer layer are those of ``rows * scales``."""
        dynamic = self._linear_plan(uses, rows.shape, bits)[2]
        key = (uses[0].value.name or "", bits, dynamic, self._smoothing(uses, dynamic) is not None)
        cached = self._linear_cache.get(key)
        if cached is not None and cached[1] is hessian and np.array_equal(cached[0], rows):
            return cached[2]
        result = self._compute_linear_codes(rows, uses, bits, hessian)
        # The whole-model activation check quantizes each weight once already: GPTQ is the slow
        # part, and the weight is unchanged unless smoothing folded factors into its outputs since.
        self._linear_cache[key] = (rows.copy(), hessian, result)
        return result

    def _compute_linear_codes(
        self, rows: np.ndarray, uses: list[WeightUse], bits: int, hessian: np.ndarray | None
    ) -> tuple[QuantizedRows, str, bool, str]:
        config = self.config
        channels, inputs = rows.shape
        granularity, group, dynamic = self._linear_plan(uses, (channels, inputs), bits)
        symmetric = config.symmetric or dynamic
        scales = self._smoothing(uses, dynamic)
        if scales is not None:
            rows = rows * scales
            hessian = None if hessian is None else hessian / np.outer(scales, scales)
        name = uses[0].value.name or ""
        samples = self._hessian_rows.get(name, 0)
        if bits == 1:
            codes, alpha = binarize_rows(rows)
            binary = QuantizedRows(codes, alpha, None, 1)
            calibrated = hessian is not None and hessian.shape == (inputs, inputs) and samples >= GPTQ_MIN_ROWS
            if config.level_codes and calibrated and hessian is not None:
                leveled = self._level_choice(name, rows, hessian, binary, granularity)
                if leveled is not None:
                    return leveled, "channel", dynamic, "gptq_levels"
            return binary, granularity, dynamic, "binary"
        unpadded_rows, unpadded_hessian = rows, hessian
        padding = -inputs % group if granularity == "block" else 0
        if padding:
            rows = np.pad(rows, ((0, 0), (0, padding)))
            hessian = None if hessian is None else np.pad(hessian, ((0, padding), (0, padding)))
            inputs += padding
        one_scale = granularity == "channel" and bits == 8 and name in self._one_scale
        if (
            hessian is not None
            and hessian.shape == (inputs, inputs)
            and granularity != "tensor"
            and samples >= GPTQ_MIN_ROWS
        ):
            act_order = not config.mixed and samples >= ACT_ORDER_MIN_ROWS_PER_INPUT * inputs
            # An equalised layer: a codebook of one entry is one scale, fixed before GPTQ rounds.
            codebook = 1 if one_scale else self._codebook_size(rows.size // group, bits)
            quantized = gptq_quantize(
                rows,
                hessian,
                bits,
                group_size=group,
                symmetric=symmetric,
                act_order=act_order,
                codebook_size=codebook,
                pair_limit=INT8_PAIR_LIMIT if dynamic and bits == 8 else None,
            )
            if one_scale and quantized.codebook is not None:
                quantized = QuantizedRows(quantized.codes, quantized.codebook[:1].astype(np.float32), None, bits)
            if granularity == "block" and config.block_axis != "reduction" and unpadded_hessian is not None:
                by_output = self._output_blocks(unpadded_rows, unpadded_hessian, quantized, bits, symmetric, act_order)
                if by_output is not None:
                    quantized, granularity = by_output, "block_outputs"
            if dynamic and bits == 4 and group < inputs and unpadded_hessian is not None:
                chosen = self._integer_scales(name, unpadded_rows, unpadded_hessian, quantized, granularity, act_order)
                return (*chosen, dynamic, "gptq")
            if config.level_codes and bits in LEVEL_BITS and unpadded_hessian is not None and not one_scale:
                leveled = self._level_choice(name, unpadded_rows, unpadded_hessian, quantized, granularity)
                if leveled is not None:
                    return leveled, "channel", dynamic, "gptq_levels"
            return quantized, granularity, dynamic, "gptq"
        search = config.rounding in ("mse", "auto")
        if dynamic and bits == 8:
            quantized = quantize_pair_limited(rows, one_scale=one_scale)
            return quantized, granularity, dynamic, "nearest"
        if one_scale:
            quantized = quantize_tensor_rows(rows, bits, search=search)
            return quantized, granularity, dynamic, "mse" if search else "nearest"
        quantized = quantize_rows(rows.reshape(-1, group), bits, symmetric=symmetric, search=search)
        return quantized, granularity, dynamic, "mse" if search else "nearest"

    def _integer_scales(
        self, name: str, rows: np.ndarray, hessian: np.ndarray, blocks: QuantizedRows, granularity: str, act_order: bool
    ) -> tuple[QuantizedRows, str]:
        """An integer layer's 4-bit codes in blocks are decoded and rounded to int8 per output
        channel at load; codes with one scale per channel feed the kernel as they are (no scales
        per block, no decoding nodes). Those are kept when their output error on the calibration
        inputs is no larger than the blocks' after that rounding, once the bytes the blocks cost
        beyond them are priced in: each bit a weight they add counts as halving their squared error
        (half what a bit more of code would buy; at a bit's full price, DeepFM student's first layer
        went per channel, 33% more error, and its int4 AUC 0.0011 down). SASRec's 64x32 FFN layers:
        blocks 0.033 against 0.035, their 32 more scales and decoding graph 1.06 bits a weight."""
        channels, inputs = rows.shape
        decoded = _restored(blocks, granularity, channels, inputs)
        codes, requantized = int8_requantize(decoded)
        block_error = _weighted_error(codes * requantized[:, None].astype(np.float64) - rows, hessian)
        per_channel = gptq_quantize(rows, hessian, 4, symmetric=True, act_order=act_order)
        channel_error = _weighted_error(_restored(per_channel, "channel", channels, inputs) - rows, hessian)
        reference = max(_weighted_error(rows, hessian), 1e-30)
        scale_bytes = np.dtype(self.config.scale_dtype).itemsize
        block_scale_bytes = _stored_scale_bytes(blocks, scale_bytes)
        extra_bits = 8 * (block_scale_bytes - channels * scale_bytes + BLOCK_DECODE_BYTES) / rows.size
        self._integer_choices[name] = {
            "blocks": round(float(np.sqrt(block_error / reference)), 5),
            "channel": round(float(np.sqrt(channel_error / reference)), 5),
            "bits_the_blocks_add": round(extra_bits, 3),
        }
        if channel_error <= block_error * 2.0**extra_bits:
            return per_channel, "channel"
        return blocks, granularity

    def _level_choice(
        self, name: str, rows: np.ndarray, hessian: np.ndarray, blocks: QuantizedRows, granularity: str
    ) -> QuantizedRows | None:
        """Codes indexing fitted levels (``gptq_levels``, with and without a scale per input) in
        place of ``blocks``, when one of them has the smallest output error on the calibration
        inputs once bytes are priced in: each bit a weight stored beyond the cheapest counts as
        halving the squared error, as for integer layers' scales. None for a pruned weight (a level
        need not be zero, so its zeros would not stay zeros)."""
        if np.count_nonzero(rows == 0) > LEVELS_MAX_ZERO_FRACTION * rows.size:
            return None
        channels, inputs = rows.shape
        scale_bytes = np.dtype(self.config.scale_dtype).itemsize
        candidates: dict[str, tuple[QuantizedRows, float]] = {}
        block_bytes = _stored_scale_bytes(blocks, scale_bytes)
        if blocks.zero_point is not None:
            block_bytes += blocks.zero_point.size
        candidates["blocks"] = (blocks, block_bytes + BLOCK_DECODE_BYTES)
        for key, column_scales in (("levels", False), ("levels_columns", True)):
            leveled = gptq_levels(
                rows, hessian, blocks.bits, column_scales=column_scales, scale_dtype=self.config.scale_dtype
            )
            stored = channels + (inputs if column_scales else 0) + leveled.levels.size  # type: ignore[union-attr]
            extra = stored * scale_bytes
            candidates[key] = (leveled, extra + LEVELS_DECODE_BYTES)
        reference = max(_weighted_error(rows, hessian), 1e-30)
        scores = {}
        errors = {}
        for key, (quantized, extra_bytes) in candidates.items():
            restored = _restored(quantized, granularity if key == "blocks" else "channel", channels, inputs)
            error = _weighted_error(restored - rows, hessian) / reference
            errors[key] = round(float(np.sqrt(error)), 5)
            scores[key] = error * 2.0 ** (8 * extra_bytes / rows.size)
        best = min(scores, key=scores.__getitem__)
        self._level_choices[(name, blocks.bits)] = {"chosen": best, "output_error": errors}
        return None if best == "blocks" else candidates[best][0]

    def _rounding_errors(
        self,
        rows: np.ndarray,
        uses: list[WeightUse],
        bits: int,
        hessian: np.ndarray,
        quantized: QuantizedRows,
        granularity: str,
        dynamic: bool,
    ) -> dict[str, float]:
        """The layer's relative output error on the calibration rows with the codes written and with
        round-to-nearest at the same granularity, for the report (computed once, when the layer is
        written, not for every candidate the mixed search tries)."""
        channels, inputs = rows.shape
        scales = self._smoothing(uses, dynamic)
        if scales is not None:
            rows, hessian = rows * scales, hessian / np.outer(scales, scales)
        restored = _restored(quantized, granularity, channels, inputs)
        group = inputs if granularity == "channel" else self._linear_plan(uses, (channels, inputs), bits)[1]
        padded = np.pad(rows, ((0, 0), (0, -inputs % group)))
        nearest = _dequantized(quantize_rows(padded.reshape(-1, group), bits, symmetric=quantized.symmetric))
        return {
            "gptq": _output_error(restored, rows, hessian),
            "nearest": _output_error(nearest.reshape(channels, -1)[:, :inputs], rows, hessian),
        }

    def _codebook_size(self, scales: int, bits: int) -> int | None:
        """A scale codebook's size for a linear weight with this many scales, or None: only with
        ``scale_codebook``, below 8 bits, and from ``CODEBOOK_MIN_ROWS`` scales (where one byte an
        index pays for the 256 stored scales)."""
        if not self.config.scale_codebook or bits >= 8 or scales < CODEBOOK_MIN_ROWS:
            return None
        return SCALE_CODEBOOK_SIZE

    def _output_blocks(
        self,
        rows: np.ndarray,
        hessian: np.ndarray,
        by_input: QuantizedRows,
        bits: int,
        symmetric: bool,
        act_order: bool,
    ) -> QuantizedRows | None:
        """Blocks of outputs per input (``block_axis``), when they need no more scales than blocks of
        inputs and (``auto``) give a smaller output error ``tr(E H E^T)`` on the calibration inputs."""
        channels, inputs = rows.shape
        size = min(self.config.block_size, channels)
        if inputs * -(-channels // size) > by_input.scale.size:
            return None
        by_output = gptq_quantize_output_blocks(
            rows,
            hessian,
            bits,
            size,
            symmetric=symmetric,
            act_order=act_order,
            codebook_size=self._codebook_size(inputs * -(-channels // size), bits),
        )
        if self.config.block_axis == "output":
            return by_output
        input_error = _weighted_error(_dequantized(by_input).reshape(channels, -1)[:, :inputs] - rows, hessian)
        output_error = _weighted_error(_restore_output_blocks(by_output, channels, inputs) - rows, hessian)
        return by_output if output_error < input_error else None

    def _quantize_linear(
        self, graph: ir.Graph, value: ir.Value, uses: list[WeightUse], hessian: np.ndarray | None, bits: int
    ) -> dict[str, Any]:
        config = self.config
        use = uses[0]
        tensor = value.const_value
        assert tensor is not None and value.name is not None
        weight = tensor.numpy().astype(np.float32)
        rows = _channel_rows(weight, use)
        channels, inputs = rows.shape
        quantized, granularity, dynamic, method = self._linear_codes(rows, uses, bits, hessian)
        shared_scale = granularity == "channel" and quantized.scale.size == 1 and channels > 1
        build = _Builder(graph, value.name)
        self._created[value.name] = build.created
        # Codes rounded to int8 for an integer kernel must be decoded by ops onnxruntime folds at load:
        # it never folds DequantizeLinear, which would rerun the whole rounding on every call.
        dequantize = "fold" if dynamic or quantized.levels is not None else config.dequantize
        decoded_as_read = use.out_axis == 1  # the decoded weight is [inputs, outputs], as the kernels read
        if dynamic and bits == 8:
            weight_kn = build.constant("q", quantized.codes.reshape(channels, inputs).T.copy())
            scale_shape = () if shared_scale else (channels,)
            scale = build.constant("scale", quantized.scale.astype(np.float32).reshape(scale_shape))
            self._integer_matmuls(build, graph, uses, weight_kn, scale)
            form = "static" if value.name in self._static_activations else "dynamic"
        elif dynamic and _integer_codes(quantized, granularity, channels):
            # 4-bit codes with one scale per output channel are the integer kernel's own: widened to
            # int8 at load, exactly, instead of decoded and rounded again (six nodes fewer a layer).
            codes_kn = quantized.codes.reshape(channels, inputs).T.astype(ml_dtypes.int4)
            weight_kn = build.op("Cast", [build.constant("q", codes_kn, ir.DataType.INT4)], to=ir.DataType.INT8)
            scale = build.constant("scale", quantized.scale.astype(np.float32).reshape(channels))
            self._integer_matmuls(build, graph, uses, weight_kn, scale)
            form = "dynamic"
        elif _stored_as_read(quantized, granularity, uses, weight.shape, dequantize):
            # Codes kept in the [inputs, outputs] layout MatMul reads, scales as an [outputs] vector:
            # no Transpose node to store.
            _read_as_stored(uses)
            by_column = QuantizedRows(
                quantized.codes.reshape(channels, inputs).T.copy(),
                quantized.scale,
                quantized.zero_point,
                bits,
            )
            stored = _store(build, by_column, binary=bits == 1, native_int4=True, along_rows=True)
            output = _decode_rows(build, stored, stored.codes, stored.scale, stored.zero, "fold")
            decoded_as_read = True
            form = "fold"
        else:
            linear_form = dequantize == "linear"
            stored = _store(build, quantized, binary=bits == 1, column=not linear_form, native_int4=True)
            form = "dequantize_linear" if linear_form else "fold"
            flat = _decode_rows(build, stored, stored.codes, stored.scale, stored.zero, dequantize)
            if granularity == "block_outputs":
                # Rows of the codes are (input, block of outputs): decoded, they are the
                # [inputs, outputs] layout MatMul reads, once the padding outputs are sliced off.
                output = _without_padding(build, flat, (inputs, quantized.codes.size // inputs), channels)
                decoded_as_read = True
                if use.out_axis == 0 and not dynamic:  # the integer kernel reads [inputs, outputs]
                    if all(_gemm_transposed(weight_use) for weight_use in uses):
                        _read_as_stored(uses)
                    else:
                        output = build.op("Transpose", [output], perm=[1, 0])
            else:
                decoded_shape = quantized.codes.shape
                if quantized.codes.size != rows.size:  # blocks padded: drop the padding columns
                    flat = _without_padding(build, flat, (channels, quantized.codes.size // channels), inputs)
                    decoded_shape = rows.shape
                output = self._to_weight_layout(build, flat, decoded_shape, weight.shape, use)
        if dynamic and bits < 8 and not _integer_codes(quantized, granularity, channels):
            # Stored at its own width; decoded and rounded to int8 per output channel at load (every
            # input is constant, so onnxruntime folds it, scales included: none is stored), then
            # read by the integer kernel. numerics.quant.int8_requantize computes the same.
            weight_kn = output if decoded_as_read else build.op("Transpose", [output], perm=[1, 0])
            axis = build.constant("axis", np.array([0]))
            magnitudes = build.op("Abs", [weight_kn])
            if inputs % 2 == 0:  # each channel's largest pair sum, as numerics.quant.int8_requantize
                pairs = build.op("Reshape", [magnitudes, build.constant("pairs", np.array([-1, 2, channels]))])
                sums = build.op("ReduceSum", [pairs, build.constant("pair_axis", np.array([1]))], keepdims=0)
                peak, levels = build.op("ReduceMax", [sums, axis], keepdims=0), _pair_levels(quantized)
            else:
                peak, levels = build.op("ReduceMax", [magnitudes, axis], keepdims=0), INT8_GRAPH_LEVELS
            if not np.abs(_restored(quantized, granularity, channels, inputs)).max(axis=1).all():
                peak = build.op("Max", [peak, build.constant("tiny", np.array(TINY_SCALE, np.float32))])
            scale = build.op("Div", [peak, build.constant("int8_levels", np.array(levels, np.float32))])
            codes = build.op("QuantizeLinear", [weight_kn, scale], axis=1, output_dtype=ir.DataType.INT8)
            self._integer_matmuls(build, graph, uses, codes, scale)
            form = "dynamic"
        elif not dynamic:
            output = _as_type(build, output, tensor.dtype)
            build.insert_before(_first(graph, uses))
            for weight_use in uses:
                weight_use.node.replace_input_with(weight_use.input_index, output)
        graph.initializers.pop(value.name)
        return {
            "kind": use.kind,
            "bits": bits,
            **self._activation_stats(value.name),
            "granularity": "tensor" if shared_scale else granularity,
            **({"scale_codebook": len(quantized.codebook)} if quantized.codebook is not None else {}),
            "rounding": method,
            **(
                {
                    "calibration_output_error": self._rounding_errors(
                        rows, uses, bits, hessian, quantized, granularity, dynamic
                    )
                }
                if method == "gptq" and hessian is not None
                else {}
            ),
            **(
                {"integer_scale_errors": self._integer_choices[value.name]}
                if dynamic and value.name in self._integer_choices
                else {}
            ),
            **(
                {"level_choice": self._level_choices[(value.name, bits)]}
                if (value.name, bits) in self._level_choices
                else {}
            ),
            **({"levels": len(quantized.levels)} if quantized.levels is not None else {}),
            "form": form,
            "bytes_before": tensor.nbytes,
            "bytes_after": 0,  # priced in call(), once the storage is final
        }

    def _activation_stats(self, name: str) -> dict[str, Any]:
        plan = self._activation_plans.get(name)
        if plan is None:
            return {}
        stats: dict[str, Any] = {"activation_error": round(plan.error, 5)}
        if plan.scales is not None:
            stats["activation_error_unsmoothed"] = round(plan.error_unsmoothed, 5)
        timing = self._layer_timings.get(name)
        if timing is not None:
            stats["integer_speedup"] = {
                "batch": round(timing.float_batch / timing.integer_batch, 2),
                "single_row_cost_us": round(timing.single_cost * 1e6, 2),
            }
        return stats

    def _to_weight_layout(
        self, build: _Builder, flat: ir.Value, decoded: tuple[int, ...], shape: tuple[int, ...], use: WeightUse
    ) -> ir.Value:
        """From decoded rows (one per scale group) back to the layout the consuming op reads."""
        moved_shape = (shape[use.out_axis], *[d for i, d in enumerate(shape) if i != use.out_axis])
        value = flat
        if tuple(decoded) != moved_shape:
            value = build.op("Reshape", [value, build.constant("shape", np.array(moved_shape, np.int64))])
        if use.out_axis != 0:
            perm = list(range(1, len(shape)))
            perm.insert(use.out_axis, 0)
            value = build.op("Transpose", [value], perm=perm)
        return value

    def _integer_matmuls(
        self, build: _Builder, graph: ir.Graph, uses: list[WeightUse], weight_kn: ir.Value, scale: ir.Value
    ) -> None:
        """Every use of the weight as an integer product with the int8 codes ``weight_kn``."""
        for weight_use in uses:
            if weight_use.value.name in self._static_activations:
                self._static_matmul(build, weight_use, weight_kn, scale)
            else:
                _dynamic_matmul(build, weight_use.node, weight_kn, scale)
            build.insert_before(weight_use.node)
            graph.remove(weight_use.node, safe=True)

    def _static_matmul(self, build: _Builder, use: WeightUse, weight_kn: ir.Value, scale: ir.Value) -> None:
        """``y = x @ W (+ b)`` in QDQ form: ``x`` through QuantizeLinear and DequantizeLinear with
        the range fixed on the calibration rows, ``W`` (int8 codes ``[K, N]``, one scale per output
        or one for all) and the bias (int32 at the product's scale) through DequantizeLinear. The
        runtime fuses them into one integer kernel (onnxruntime: QGemm, or MatMulIntegerToFloat
        without a bias) and only where the zero points are explicit, so they are."""
        node = use.node
        x = node.inputs[0]
        assert x is not None and scale.const_value is not None
        static = self._static_activations[use.value.name or ""]
        weight_scale = scale.const_value.numpy().astype(np.float32)
        alpha = node.attributes.get_float("alpha", 1.0) if node.op_type == "Gemm" else 1.0
        if alpha != 1.0:
            weight_scale = weight_scale * np.float32(alpha)
            scale = build.constant("scale", weight_scale)
        x_rounded = _round_statically(build, x, static)
        weight_zero = build.constant("zero_point", np.zeros(weight_scale.shape, np.int8))
        weight = build.op("DequantizeLinear", [weight_kn, scale, weight_zero], axis=1)
        product_scale = np.float32(static.scale) * weight_scale
        if node.op_type == "Gemm":
            bias = _vector(node.inputs[2]) if len(node.inputs) > 2 else None
            beta = node.attributes.get_float("beta", 1.0)
            inputs = [x_rounded, weight]
            if bias is not None:
                inputs.append(_static_bias(build, bias * np.float32(beta), product_scale))
            replace_value(node.outputs[0], build.op("Gemm", inputs))
        else:
            product = build.op("MatMul", [x_rounded, weight])
            replace_value(node.outputs[0], product)
            add = _bias_add(product)
            if add is not None:
                index, bias = add
                add_node = next(user for user, _ in product.uses())
                add_node.replace_input_with(index, _static_bias(build, bias, product_scale))
        if (use.value.name or "") in self._static_outputs:
            build.insert_before(node)  # the layer's nodes; the output's go after its Relu
            _round_readers(build, *self._static_outputs[use.value.name or ""])

    # --- embedding tables ------------------------------------------------------------------------

    def _pq_dims(self, shape: Sequence[int], bits: int) -> int | None:
        """Dimensions per sub-vector when this table is product-quantized at ``bits``, else None:
        a 4-bit index per 2 values is 2 bits a value, per 4 values 1 bit."""
        if self.config.table_codes == "scalar" or bits not in (2, 1) or len(shape) != 2:
            return None
        dims = 4 // bits
        rows, width = int(shape[0]), int(shape[1])
        return dims if width % dims == 0 and rows >= PQ_MIN_ROWS else None

    def _table_codes(
        self,
        table: np.ndarray | ExternalRows,
        bits: int,
        whole: bool,
        lookups: list[tuple[int, np.ndarray | None]] | None = None,
    ) -> tuple[QuantizedRows | ProductCodes, str, dict[str, float]]:
        """Quantize a table: (codes, granularity "row", "tensor" or "pq", the relative errors compared),
        row scales in a codebook when ``scale_codebook`` is set. ``whole``: the table is decoded
        whole (folded at load), so its scale indices may be int4. ``lookups``: runs of rows with
        the Hessian of the outputs in a looked-up row, against which row codes of 2-7 bits are
        rounded with error feedback (scales as chosen)."""
        measured = lookups is not None and any(hessian is not None for _, hessian in lookups)
        dims = self._pq_dims(table.shape, bits)
        product: tuple[ProductCodes, str, dict[str, float]] | None = None
        if dims is not None:
            codes = product_quantize(table, dims, PQ_CENTROIDS)
            sample = sample_rows(table, DECISION_SAMPLE_ROWS)
            on_sample = ProductCodes(product_assign(sample, codes.codebooks), codes.codebooks)
            product = (codes, "pq", {"pq": row_relative_error(sample, product_dequantize(on_sample))})
            scalar_possible = bits == 2 and lookups and measured and isinstance(table, np.ndarray)
            if self.config.table_codes == "pq" or not scalar_possible:
                return product
        quantized, granularity, errors = self._row_or_tensor_codes(table, bits)
        if granularity == "row" and self.config.scale_codebook:
            quantized, storage_errors = self._row_scale_storage(table, quantized, whole)
            errors.update(storage_errors)
        if granularity == "row" and 2 <= bits < 8 and lookups and measured and isinstance(table, np.ndarray):
            quantized, output_errors = _refined_for_lookups(table, quantized, lookups)
            errors.update(output_errors)
            if product is not None:
                return _cheaper_table_codes(table, product, (quantized, granularity, errors), lookups)
        return quantized, granularity, errors

    def _row_scale_storage(
        self, table: np.ndarray | ExternalRows, quantized: QuantizedRows, whole: bool
    ) -> tuple[QuantizedRows, dict[str, float]]:
        """A table's row scales as float16, or as indices into a codebook of 256 (from
        ``CODEBOOK_MIN_ROWS`` rows) or, for a table decoded whole, 16 scales (a 4-bit index): the
        storage with the least error once its bits are priced in, with the errors compared."""
        rows, width = table.shape[0], table.shape[1]
        if not whole:  # looked up quantized: uint8 indices (a Gather cannot read int4)
            return (with_scale_codebook(table, quantized), {}) if rows >= CODEBOOK_MIN_ROWS else (quantized, {})
        candidates: dict[int | None, QuantizedRows] = {None: quantized}
        if rows >= CODEBOOK_MIN_ROWS:
            candidates[SCALE_CODEBOOK_SIZE] = with_scale_codebook(table, quantized)
        candidates[SMALL_SCALE_CODEBOOK_SIZE] = with_scale_codebook(table, quantized, SMALL_SCALE_CODEBOOK_SIZE)
        reference = np.asarray(table[0:rows], dtype=np.float32)  # decoded whole: at most fold_tables_below
        errors = {size: row_relative_error(reference, _dequantized(codes)) for size, codes in candidates.items()}
        chosen = cheapest_scale_storage(errors, rows, width, 8 * np.dtype(self.config.scale_dtype).itemsize)
        named = {f"scales_{'float' if size is None else f'codebook_{size}'}": error for size, error in errors.items()}
        return candidates[chosen], named

    def _row_or_tensor_codes(
        self, table: np.ndarray | ExternalRows, bits: int
    ) -> tuple[QuantizedRows, str, dict[str, float]]:
        """Quantize a table: (codes, granularity "row" or "tensor", the relative errors compared).

        Works on row chunks of ``table`` (which may be memory-mapped); the clip search, 26 passes
        per row, is used only below ``SEARCH_MAX_ELEMENTS`` where it is cheap.
        """
        config = self.config
        scale_dtype = np.dtype(config.scale_dtype)
        # A row narrower than this holds fewer code bytes than its own scale and offset would
        # cost (a DeepFM/Wide&Deep first-order table is one value wide): one scale for the table.
        narrow = table.shape[1] < NARROW_TABLE_WIDTH
        if bits == 1:
            codes, alpha = binarize_rows(np.asarray(table), scale_dtype)
            if narrow:
                alpha = np.array([np.abs(np.asarray(table, dtype=np.float64)).mean()], dtype=scale_dtype)
                return QuantizedRows(codes, alpha, None, 1), "tensor", {}
            return QuantizedRows(codes, alpha, None, 1), "row", {}
        if narrow:
            return quantize_tensor_rows(table, bits, search=config.rounding != "nearest"), "tensor", {}
        search = config.rounding != "nearest" and table.size <= SEARCH_MAX_ELEMENTS
        offsets: dict[str, float] = {}
        if config.embedding_symmetric == "auto":
            # One more bit a value halves the rounding error; a row's 8-bit offset costs 8/width
            # bits a value. So the offset is dropped when the error that adds is a smaller factor
            # than 2^(8/width): at width 16 (4 bits: 8 bytes of codes) when under 1.41x, at 64
            # only under 1.09x (centred Gaussian rows at 4 bits: about 1.15x).
            sample = sample_rows(table, DECISION_SAMPLE_ROWS)
            offsets = {
                f"row_{name}": quantized_row_error(
                    sample, quantize_rows(sample, bits, symmetric=name == "symmetric", scale_dtype=scale_dtype)
                )
                for name in ("symmetric", "offset")
            }
            symmetric = offsets["row_symmetric"] < offsets["row_offset"] * 2 ** (8 / table.shape[1])
        else:
            symmetric = bool(config.embedding_symmetric)

        def per_row(rows: Any) -> QuantizedRows:
            return quantize_rows(rows, bits, symmetric=symmetric, search=search, scale_dtype=scale_dtype)

        if config.embedding_granularity == "row":
            return per_row(table), "row", offsets
        # Decide on a sample of rows (the whole table when small). Without the clip search the
        # row-wise codes come first and carry the table's peak: when rows win (the usual case on
        # trained tables) a 2M-row table is read once. The one scale is the whole table's.
        rowwise = per_row(table) if config.embedding_granularity == "auto" and not search else None
        peak = rowwise.peak if rowwise is not None else None
        scale = tensor_scale(table, bits, search=config.rounding != "nearest", peak=peak)
        sample = sample_rows(table, DECISION_SAMPLE_ROWS)
        errors = {
            "row": quantized_row_error(sample, per_row(sample)),
            "tensor": quantized_row_error(sample, quantize_tensor_rows(sample, bits, scale=scale)),
            **offsets,
        }
        if config.embedding_granularity == "tensor" or errors["tensor"] <= config.table_tolerance:
            return quantize_tensor_rows(table, bits, scale=scale), "tensor", errors
        return rowwise if rowwise is not None else per_row(table), "row", errors

    def _encode_table(self, value: ir.Value, bits: int) -> tuple[QuantizedRows | ProductCodes, str, dict[str, float]]:
        """The table's codes (no graph change, so tables can be encoded in parallel)."""
        tensor = value.const_value
        assert tensor is not None
        # An external table is read in row chunks with file reads: mapped, a 512 MB table would
        # count whole towards the process's resident memory once read.
        table: np.ndarray | ExternalRows = (
            tensor.numpy() if not isinstance(tensor, ir.ExternalTensor) else ExternalRows(tensor)
        )
        if isinstance(table, ExternalRows) and bits == 1 and self._pq_dims(table.shape, bits) is None:
            table = tensor.numpy()  # binary rows are signs and one mean: read whole
        return self._table_codes(
            table, bits, tensor.nbytes < self.config.fold_tables_below, self._lookup_hessians.get(value.name or "")
        )

    def _quantize_table(
        self,
        graph: ir.Graph,
        value: ir.Value,
        uses: list[WeightUse],
        bits: int,
        encoded: tuple[QuantizedRows | ProductCodes, str, dict[str, float]],
    ) -> dict[str, Any]:
        config = self.config
        tensor = value.const_value
        assert tensor is not None and value.name is not None
        build = _Builder(graph, value.name)
        self._created[value.name] = build.created
        quantized, granularity, errors = encoded
        folded = tensor.nbytes < config.fold_tables_below
        lookups = [use for use in uses if use.kind == "embedding"]
        if isinstance(quantized, ProductCodes):
            return self._product_table(graph, value, uses, bits, quantized, errors)
        rows, width = _static_shape(tensor)[:2]
        # A narrow table decoded whole is packed as one long row: sub-byte codes of a one-value row
        # would each fill a byte.
        flat = folded and granularity == "tensor" and width < NARROW_TABLE_WIDTH
        stored = _store(
            build,
            quantized,
            binary=bits == 1,
            column=folded,
            native_int4=folded,
            rows_shape=((1, rows * width) if flat else (rows, width)) if granularity == "tensor" else None,
        )
        others = [use for use in uses if use.kind != "embedding"]
        if folded or others:
            # Decoded once: constant-folded at load for the lookups of a small table, or for a
            # table tied to an output layer (whose weight must be dense anyway).
            whole = _decode_rows(build, stored, stored.codes, stored.scale, stored.zero, "fold")
            if flat:
                whole = build.op("Reshape", [whole, build.constant("shape", np.array([rows, width], np.int64))])
            whole = _as_type(build, whole, tensor.dtype)
            build.insert_before(_first(graph, uses))
            for use in others + (lookups if folded else []):
                use.node.replace_input_with(use.input_index, whole)
        if not folded:
            for use in lookups:
                self._gathered_lookup(build, use, stored)
        graph.initializers.pop(value.name)
        return {
            "kind": "embedding",
            "bits": bits,
            "granularity": granularity,
            "relative_error": {key: round(value, 6) for key, value in errors.items()},
            **({"scale_codebook": len(quantized.codebook)} if quantized.codebook is not None else {}),
            "rounding": "binary"
            if bits == 1
            else "gptq"
            if "lookup_output_gptq" in errors
            else ("mse" if config.rounding != "nearest" and tensor.size <= SEARCH_MAX_ELEMENTS else "nearest"),
            "form": "fold" if folded else "gathered",
            "bytes_before": tensor.nbytes,
            "bytes_after": 0,  # priced in call(), once the storage is final
            "lookups": len(lookups),
        }

    def _product_table(
        self,
        graph: ir.Graph,
        value: ir.Value,
        uses: list[WeightUse],
        bits: int,
        codes: ProductCodes,
        errors: dict[str, float],
    ) -> dict[str, Any]:
        """Store product codes (two 4-bit indices a byte) and the codebooks; a small or tied table is
        decoded whole (constant-folded at load), a large one after the Gather of its code rows."""
        tensor = value.const_value
        assert tensor is not None and value.name is not None
        build = _Builder(graph, value.name)
        self._created[value.name] = build.created
        width = _static_shape(tensor)[1]
        sub_vectors = codes.codes.shape[1]
        packed = build.constant("pq_codes", _pack_rows(codes.codes, 4, 0))
        books = codes.codebooks.reshape(sub_vectors * codes.centroids, codes.dims)
        codebook = build.constant("pq_codebook", books)
        offsets = build.constant("pq_offsets", (np.arange(sub_vectors) * codes.centroids).astype(np.int32))

        def decode(code_rows: ir.Value) -> ir.Value:
            index = _unpack(build, code_rows, 4, sub_vectors)  # [n, sub_vectors] uint8
            index = build.op("Add", [build.op("Cast", [index], to=ir.DataType.INT32), offsets])
            parts = build.op("Gather", [codebook, index], axis=0)  # [n, sub_vectors, dims]
            if codebook.const_value is not None and codebook.const_value.dtype != ir.DataType.FLOAT:
                parts = build.op("Cast", [parts], to=ir.DataType.FLOAT)
            return build.op("Reshape", [parts, build.constant("pq_row", np.array([-1, width], np.int64))])

        folded = tensor.nbytes < self.config.fold_tables_below
        lookups = [use for use in uses if use.kind == "embedding"]
        others = [use for use in uses if use.kind != "embedding"]
        if folded or others:
            whole = _as_type(build, decode(packed), tensor.dtype)
            build.insert_before(_first(graph, uses))
            for use in others + (lookups if folded else []):
                use.node.replace_input_with(use.input_index, whole)
        if not folded:
            for use in lookups:
                _replace_lookup(
                    build, use, width, lambda flat_ids: decode(build.op("Gather", [packed, flat_ids], axis=0))
                )
        graph.initializers.pop(value.name)
        return {
            "kind": "embedding",
            "bits": bits,
            "granularity": "pq",
            "pq": {"dims": codes.dims, "centroids": codes.centroids, "sub_vectors": sub_vectors},
            "relative_error": {key: round(value, 6) for key, value in errors.items()},
            "rounding": "k-means",
            "form": "fold" if folded else "gathered",
            "bytes_before": tensor.nbytes,
            "bytes_after": 0,  # priced in call(), once the storage is final
            "lookups": len(lookups),
        }

    def _gathered_lookup(self, build: _Builder, use: WeightUse, stored: _Stored) -> None:
        """Replace ``Gather(table, ids)`` by Gathers of quantized rows and their scales, then a per-row
        dequantization of only the gathered rows."""

        def rows_of(flat_ids: ir.Value) -> ir.Value:
            rows = build.op("Gather", [stored.codes, flat_ids], axis=0)
            scale, zero = stored.scale, stored.zero
            if stored.per_row:
                scale = build.op("Gather", [scale, flat_ids], axis=0)
                zero = build.op("Gather", [zero, flat_ids], axis=0) if zero is not None else None
            return _decode_rows(build, stored, rows, scale, zero, "linear")

        _replace_lookup(build, use, stored.elements, rows_of)


def _replace_lookup(build: _Builder, use: WeightUse, width: int, rows_of: Callable[[ir.Value], ir.Value]) -> None:
    """Replace the lookup ``Gather(table, ids)`` by ``rows_of(ids flattened)`` (float rows
    ``[n, width]``) reshaped to the ids' shape + ``[width]``, in front of it; the Gather goes."""
    node = use.node
    ids = node.inputs[1]
    assert ids is not None
    one_dimensional = ids.shape is not None and len(ids.shape) == 1
    flat_ids = ids if one_dimensional else build.op("Reshape", [ids, build.constant("flat", np.array([-1], np.int64))])
    values = _as_type(build, rows_of(flat_ids), node.outputs[0].dtype)
    if not one_dimensional:
        dim = build.constant("dim", np.array([width], np.int64))
        values = build.op("Reshape", [values, build.op("Concat", [build.op("Shape", [ids]), dim], axis=0)])
    replace_value(node.outputs[0], values)
    build.insert_before(node)
    build.graph.remove(node, safe=True)


def _dequantized(quantized: QuantizedRows | ProductCodes) -> np.ndarray:
    """Float values of codes; binary codes {0, 1} stand for ``-alpha`` and ``+alpha``."""
    if isinstance(quantized, ProductCodes):
        return product_dequantize(quantized)
    if quantized.bits == 1 and quantized.levels is None:
        return (2.0 * quantized.codes.astype(np.float64) - 1.0) * quantized.scale.astype(np.float64)[:, None]
    return dequantize_rows(quantized)


def _pair_levels(quantized: QuantizedRows) -> int:
    """The levels an integer layer's largest pair sum is spread over when its decoded weights are
    rounded to int8 (``numerics.quant.int8_requantize``): binary rows round exactly over 126."""
    return BINARY_PAIR_LEVELS if quantized.bits == 1 and quantized.levels is None else 127


def _integer_codes(quantized: QuantizedRows, granularity: str, channels: int) -> bool:
    """Whether an integer layer's codes can feed MatMulInteger as they are: native int4, symmetric,
    one scale per output channel (a block as wide as the layer's inputs), no scale codebook."""
    return (
        granularity in ("channel", "block")
        and quantized.bits == 4
        and quantized.symmetric
        and quantized.codes.shape[0] == channels
        and quantized.scale.size == channels
        and quantized.codebook is None
        and quantized.levels is None
    )


def _figures(result: ParityResult) -> dict[str, float]:
    """The worst cosine, rank correlation and mismatch over a comparison's outputs."""
    figures: dict[str, float] = {}
    for output in result.outputs:
        for key, figure in output.would_pass_with.items():
            if key in ("min_cosine", "min_rank_corr"):
                figures[key] = min(figures.get(key, 1.0), figure)
            elif key == "max_mismatch":
                figures[key] = max(figures.get(key, 0.0), figure)
    return figures


def _stored_scale_bytes(quantized: QuantizedRows, scale_bytes: int) -> int:
    """Bytes of ``quantized``'s scales as stored: float values, or a byte an index and the codebook."""
    if quantized.codebook is None:
        return quantized.scale.size * scale_bytes
    return quantized.scale.size + quantized.codebook.size * scale_bytes


def _flip_rate(measured: float, elements: int) -> float:
    """The rate of differing values that ``measured`` (a fraction of ``elements``) stands for, by
    the rule of succession, ``(k + 1) / (n + 2)``: a few flips in a few hundred calibration rows say
    little (the scikit-learn MLP's search saw 2 flipped labels of 512, 0.39% against its 0.5%, and
    1.07% of the test labels flipped, past the gate's 1%)."""
    return (measured * elements + 1.0) / (elements + 2.0)


def _weighted_error(difference: np.ndarray, hessian: np.ndarray) -> float:
    """``||X D^T||^2 = tr(D H D^T)`` for ``D`` ``[outputs, inputs]`` and ``H = X^T X``."""
    return float(np.einsum("ij,ij->", difference @ hessian, difference))


def _output_error(restored: np.ndarray, rows: np.ndarray, hessian: np.ndarray) -> float:
    """``||X (restored - rows)^T|| / ||X rows^T||`` on the calibration inputs behind ``hessian``,
    rounded for the report."""
    reference = _weighted_error(rows, hessian)
    return round(float(np.sqrt(_weighted_error(restored - rows, hessian) / reference)) if reference > 0 else 0.0, 5)


def _without_padding(build: _Builder, flat: ir.Value, shape: tuple[int, int], kept: int) -> ir.Value:
    """Decoded codes reshaped to ``shape`` (rows, padded width), columns from ``kept`` on (zero
    padding of the last block) sliced off."""
    value = build.op("Reshape", [flat, build.constant("shape", np.array(shape, np.int64))])
    if shape[1] == kept:
        return value
    bounds = [build.constant(name, np.array([bound], np.int64)) for name, bound in (("start", 0), ("end", kept))]
    return build.op("Slice", [value, *bounds, build.constant("axis", np.array([1], np.int64))])


def _restored(quantized: QuantizedRows, granularity: str, channels: int, inputs: int) -> np.ndarray:
    """The float rows ``[channels, inputs]`` that a linear weight's codes stand for."""
    if granularity == "block_outputs":
        return _restore_output_blocks(quantized, channels, inputs)
    return _dequantized(quantized).reshape(channels, -1)[:, :inputs]


def _restore_output_blocks(quantized: QuantizedRows, channels: int, inputs: int) -> np.ndarray:
    """The ``[channels, inputs]`` weight from codes in blocks of outputs per input."""
    return _dequantized(quantized).reshape(inputs, -1)[:, :channels].T


def _static_shape(tensor: ir.TensorProtocol) -> tuple[int, ...]:
    """An initializer's dimensions (always static) as plain ints."""
    return tuple(int(dim) for dim in tensor.shape.numpy())


def _stacks_under(
    groups: dict[tuple[int, ir.DataType, int, bool], list[ir.Value]], limit: int
) -> Iterator[tuple[tuple[int, ir.DataType, int, bool], list[ir.Value]]]:
    """Each group's tables in runs whose bytes together stay under ``limit`` (a stack is decoded at
    load as its tables were)."""
    for key, tables in groups.items():
        run: list[ir.Value] = []
        total = 0
        for table in tables:
            nbytes = int(table.const_value.nbytes)  # type: ignore[union-attr]
            if run and total + nbytes >= limit:
                yield key, run
                run, total = [], 0
            run.append(table)
            total += nbytes
        yield key, run


def _is_table(uses: list[WeightUse]) -> bool:
    return any(use.kind in ("embedding", "added") for use in uses)


#: Under ``mixed``, tables below this many values stack apart from larger ones (as ``int4``'s
#: ``low_bit_min_elements`` of 512 has them).
SMALL_TABLE_ELEMENTS = 512

#: Constants added to activations are quantized as tables from this many values.
ADDED_TABLE_MIN_ELEMENTS = 256


def _added_tables(graph: ir.Graph) -> dict[ir.Value, list[WeightUse]]:
    """Float ``[rows, width]`` constants that only ever get added to activations, such as SASRec's
    positional embeddings (the exporter folds the lookup of positions ``0..T-1`` into a constant):
    a table decoded whole, quantized per row like any other. Biases (one row) are not tables."""
    found: dict[ir.Value, list[WeightUse]] = {}
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None or not tensor.dtype.is_floating_point() or value.is_graph_input() or value.is_graph_output():
            continue
        shape = _static_shape(tensor)
        if len(shape) != 2 or shape[0] < 2 or tensor.size < ADDED_TABLE_MIN_ELEMENTS:
            continue
        uses = value.uses()
        if uses and all(
            node.op_type == "Add"
            and node.domain == ""
            and len(node.inputs) == 2
            and (other := node.inputs[1 - index]) is not None
            and other.const_value is None
            for node, index in uses
        ):
            found[value] = [WeightUse(node, index, value, "added", 0, None) for node, index in uses]
    return found


def _channel_rows(weight: np.ndarray, use: WeightUse) -> np.ndarray:
    """The weight as ``[output channels, inputs]`` (Conv kernels flattened into the inputs; a
    recurrent weight's directions and gate rows flattened into the channels)."""
    if use.kind == "recurrent":
        return weight.reshape(-1, weight.shape[-1])
    moved = np.moveaxis(weight, use.out_axis, 0)
    return moved.reshape(moved.shape[0], -1)


def _stored_as_read(
    quantized: QuantizedRows, granularity: str, uses: Sequence[WeightUse], shape: tuple[int, ...], dequantize: str
) -> bool:
    """Whether a per-channel linear weight can be stored as ``[inputs, outputs]``, the layout MatMul
    and Gemm without transB read, with one scale per column: at a width stored without packing, or
    binary (the signs of each input's row packed along the outputs). A Gemm with transB reads it
    once its transB is cleared (``_read_as_stored``)."""
    if len(shape) != 2 or dequantize != "fold" or granularity != "channel" or quantized.bits not in (8, 4, 1):
        return False
    if quantized.levels is not None:
        return False
    if not all(use.out_axis == 1 for use in uses) and not all(_gemm_transposed(use) for use in uses):
        return False
    return quantized.codes.size == shape[0] * shape[1] and quantized.scale.size in (1, shape[uses[0].out_axis])


def _gemm_transposed(use: WeightUse) -> bool:
    """A Gemm weight read with transB (output channels first), which reads ``[inputs, outputs]``
    once transB is cleared."""
    node = use.node
    return node.op_type == "Gemm" and use.input_index == 1 and bool(node.attributes.get_int("transB", 0))


def _read_as_stored(uses: Sequence[WeightUse]) -> None:
    """Gemms of a weight now stored as ``[inputs, outputs]`` read it without transB."""
    for use in uses:
        if _gemm_transposed(use):
            use.node.attributes.pop("transB")


def _round_statically(build: _Builder, x: ir.Value, static: StaticActivation) -> ir.Value:
    """``x`` through QuantizeLinear and DequantizeLinear with ``static``'s parameters; an ``x``
    that is already the output of that pair (the Relu of a static layer before) is returned as is."""
    producer = x.producer()
    if producer is not None and producer.op_type == "DequantizeLinear" and len(producer.inputs) == 3:
        stored_scale, stored_zero = (constant_array(value) for value in producer.inputs[1:])
        if (
            stored_scale is not None
            and stored_zero is not None
            and stored_zero.dtype == np.uint8
            and float(stored_scale) == np.float32(static.scale)
            and int(stored_zero) == static.zero_point
        ):
            return x
    scale, zero = _static_parameters(build, static)
    return build.op("DequantizeLinear", [build.op("QuantizeLinear", [x, scale, zero]), scale, zero])


def _static_parameters(build: _Builder, static: StaticActivation) -> tuple[ir.Value, ir.Value]:
    """QuantizeLinear's scale (float32) and zero point (uint8) for ``static``."""
    return (
        build.constant("x_scale", np.array(static.scale, np.float32)),
        build.constant("x_zero_point", np.array(static.zero_point, np.uint8)),
    )


def _vector(value: ir.Value | None) -> np.ndarray | None:
    """The constant 1-D float array ``value`` holds, else None."""
    array = constant_array(value) if value is not None else None
    return array.astype(np.float32) if array is not None and array.ndim == 1 and array.dtype.kind == "f" else None


def _bias_add(product: ir.Value) -> tuple[int, np.ndarray] | None:
    """(input index, bias) of the Add that is ``product``'s only reader and adds a constant vector
    to it (a MatMul's bias as dynamo and tf2onnx export it), else None."""
    readers = list(product.uses())
    if len(readers) != 1 or readers[0][0].op_type != "Add" or readers[0][0].domain not in ("", "ai.onnx"):
        return None
    add = readers[0][0]
    index = 1 - readers[0][1]
    bias = _vector(add.inputs[index]) if len(add.inputs) == 2 else None
    return None if bias is None else (index, bias)


def _static_bias(build: _Builder, bias: np.ndarray, product_scale: np.ndarray) -> ir.Value:
    """``bias`` as int32 codes at the product's scale (one, or one per output, as the weight's)
    through DequantizeLinear, as the QDQ form stores it; float where a code would not fit in int32.
    The scale is the float32 product of the two, which the runtime's fusion checks."""
    step = np.asarray(product_scale, np.float32)
    codes = np.rint(bias / np.where(step > 0, step, 1.0))
    if not np.all(step > 0) or np.abs(codes).max(initial=0) >= 2**31 - 1:
        return build.constant("bias", bias)
    stored = build.constant("bias_q", codes.astype(np.int32))
    if step.ndim == 0:
        return build.op("DequantizeLinear", [stored, build.constant("bias_scale", step)])
    return build.op("DequantizeLinear", [stored, build.constant("bias_scale", step)], axis=0)


def _static_ready(uses: list[WeightUse]) -> bool:
    """The static form covers one MatMul, or one Gemm whose bias (if any) is a vector."""
    if len(uses) != 1:
        return False
    node = uses[0].node
    return node.op_type == "MatMul" or len(node.inputs) < 3 or _vector(node.inputs[2]) is not None


def _dynamic_ready(uses: list[WeightUse]) -> bool:
    """MatMulInteger covers MatMul and Gemm (without transA) on a float input; not Conv."""
    for use in uses:
        node = use.node
        if use.kind != "linear" or node.op_type not in ("MatMul", "Gemm") or use.input_index != 1:
            return False
        if node.op_type == "Gemm" and node.attributes.get_int("transA"):
            return False
        x = node.inputs[0]
        if x is None or (x.dtype is not None and x.dtype != ir.DataType.FLOAT):
            return False
    return True


def _linear_producer(value: ir.Value) -> ir.Node | None:
    """The MatMul or Gemm with a constant weight whose output reaches ``value`` through
    per-unit ops (activations, constant bias Adds), if any."""
    node = value.producer()
    while node is not None:
        if node.op_type in ("MatMul", "Gemm") and node.domain == "":
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            return node if weight is not None and weight.const_value is not None else None
        if node.op_type in POSITIVELY_HOMOGENEOUS and node.domain == "":
            source = node.inputs[0]
        elif node.op_type == "Add" and node.domain == "" and len(node.inputs) == 2:
            variable = [v for v in node.inputs if v is not None and v.const_value is None]
            source = variable[0] if len(variable) == 1 else None
        else:
            return None
        node = source.producer() if source is not None else None
    return None


def _dynamic_matmul(build: _Builder, node: ir.Node, weight_kn: ir.Value, scale: ir.Value) -> None:
    """``y = x @ W`` as DynamicQuantizeLinear(x) -> MatMulInteger(x, ``weight_kn``: int8 codes
    ``[K, N]``) -> Cast -> Mul(x_scale * ``scale``, one per output) (+ bias), the pattern
    onnxruntime fuses into its integer DynamicQuantizeMatMul kernel."""
    x = node.inputs[0]
    assert x is not None
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    alpha = node.attributes.get_float("alpha", 1.0) if node.op_type == "Gemm" else 1.0
    if alpha != 1.0:
        scale = build.op("Mul", [scale, build.constant("alpha", np.array(alpha, np.float32))])
    x_q, x_scale, x_zero = build.multi("DynamicQuantizeLinear", [x], outputs=3)
    product = build.op("MatMulInteger", [x_q, weight_kn, x_zero])
    scales = build.op("Mul", [x_scale, scale])
    result = build.op("Mul", [build.op("Cast", [product], to=ir.DataType.FLOAT), scales])
    if bias is not None:
        beta = node.attributes.get_float("beta", 1.0)
        if beta != 1.0:
            bias = build.op("Mul", [bias, build.constant("beta", np.array(beta, np.float32))])
        result = build.op("Add", [result, bias])
    replace_value(node.outputs[0], result)


#: activations=auto: the model with its smoothed integer layers must be this much faster on a batch
#: than with them in float, beyond the timing's noise (they change its scores; a gain within the
#: noise is not worth that).
CONFIRM_MIN_BATCH_GAIN = 0.03
#: activations=auto: at most this many layers beyond the probe's choice are timed in the model.
MEASURED_MAX_ADDED = 6


def _integer_variant(
    model: ir.Model, uses: list[WeightUse], smoothing: Mapping[int, np.ndarray] | None = None
) -> ir.Model | None:
    """A copy of ``model`` whose MatMul/Gemm ``uses`` run as DynamicQuantizeLinear + MatMulInteger
    with int8 weights of their shapes (values do not matter: it is only timed), or None when one of
    them is not a plain 2-D weight. A use whose node (by ``id``) has ``smoothing`` factors reads its
    input divided by them as the written layer does (folded upstream where it can be, else a
    ``Mul``). ``clone`` keeps external tensors' folder, which a round trip through the proto loses
    (the copy then looked for the data file in the working directory)."""
    copy = model.clone()
    order = {id(node): index for index, node in enumerate(model.graph)}
    nodes = list(copy.graph)
    rng = np.random.default_rng(0)
    for use in uses:
        if id(use.node) not in order:
            return None
        node = nodes[order[id(use.node)]]
        weight = constant_array(node.inputs[1])
        if weight is None or weight.ndim != 2 or node.op_type not in ("MatMul", "Gemm") or node.inputs[0] is None:
            return None
        if node.op_type == "Gemm" and node.attributes.get_int("transA"):
            return None
        transposed = node.op_type == "Gemm" and bool(node.attributes.get_int("transB"))
        inputs, outputs = (weight.shape[1], weight.shape[0]) if transposed else weight.shape
        build = _Builder(copy.graph, "timed")
        factors = (smoothing or {}).get(id(use.node))
        if factors is not None:
            scale_last_axis(copy.graph, node.inputs[0], 1.0 / factors, node)
        integer_weight = build.constant("w", rng.integers(-127, 128, (inputs, outputs), dtype=np.int8))
        _dynamic_matmul(build, node, integer_weight, build.constant("s", np.full(outputs, 0.01, np.float32)))
        build.insert_before(node)
        copy.graph.remove(node, safe=True)
    RemoveUnusedNodesPass()(copy)  # the replaced weights: onnxruntime rejects an initializer no node reads
    return copy


def _feeds_relu(node: ir.Node) -> bool:
    """Whether the layer's output (after its bias Add, for a MatMul) goes only into a Relu: the
    float form then runs as one fused kernel, which the speed probe must time against."""
    return _relu_after(node) is not None


def _relu_after(node: ir.Node) -> ir.Value | None:
    """The output of the Relu that alone reads the layer's output (after its bias Add, for a
    MatMul), if there is one."""
    value = node.outputs[0]
    for _ in range(2):
        consumers = [user for user, _ in value.uses()]
        if len(consumers) != 1:
            return None
        (consumer,) = consumers
        if consumer.op_type == "Relu" and consumer.domain in ("", "ai.onnx"):
            return consumer.outputs[0]
        if consumer.op_type != "Add" or node.op_type != "MatMul":
            return None
        value = consumer.outputs[0]
    return None


#: Consumers whose float inputs must stay float32 tensors of their own (quantization parameters).
_KEEP_FLOAT32_FOR = frozenset({"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"})
_FLOAT16_MAX = 65504.0
#: A Cast node with short names takes about 25 bytes: from 16 values (32 bytes saved) float16 pays,
#: and the final cleanup's ``pack_casts`` shares one Cast among vectors.
FLOAT16_MIN_VALUES = 16


def _stored_bytes(value: ir.Value) -> int:
    return value.const_value.nbytes if value.const_value is not None else 0


def _store_floats_as_float16(graph: ir.Graph) -> dict[ir.Value, ir.Value]:
    """Store the remaining float32 initializers as float16 + a Cast that runtimes fold at load.

    Their float16 rounding (relative 5e-4) is far below the int8 weight error next to them. Tensors
    that would overflow or lose their small values, or that feed quantization ops, stay float32.
    Returns ``{float32 initializer: its float16 replacement}``.
    """
    converted: dict[ir.Value, ir.Value] = {}
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        # Below FLOAT16_MIN_VALUES the Cast node costs about what the halving saves.
        if tensor is None or tensor.dtype != ir.DataType.FLOAT or tensor.size < FLOAT16_MIN_VALUES or not value.uses():
            continue
        if value.is_graph_input() or value.is_graph_output():
            continue
        if any(node.op_type in _KEEP_FLOAT32_FOR or node.graph is not graph for node, _ in value.uses()):
            continue  # quantization parameters, or read inside a subgraph where no Cast can go first
        array = tensor.numpy()
        peak = float(np.abs(array).max())
        half = array.astype(np.float16)
        if peak >= _FLOAT16_MAX or relative_error(array, half) > 1e-3:
            continue
        assert value.name is not None
        build = _Builder(graph, value.name)
        stored = build.constant("f16", half)
        restored = build.op("Cast", [stored], to=ir.DataType.FLOAT)
        first = min((node for node, _ in value.uses()), key=lambda node: _position(graph, node))
        build.insert_before(first)
        value.replace_all_uses_with(restored)
        graph.initializers.pop(value.name)
        converted[value] = stored
    return converted
