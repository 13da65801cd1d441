"""Weight quantization with standard DequantizeLinear: linear layers, row-wise embedding tables, binary.

Linear weights (MatMul, Gemm, Conv) become integer initializers + DequantizeLinear, which any ONNX
runtime constant-folds at load. Embedding tables are quantized per row and looked up quantized:
the Gather reads integer rows and only the gathered rows are dequantized (dequantizing the whole
table first would make onnxruntime materialise the fp32 table at run time). Widths below 8 bits
that standard ONNX cannot gather are stored bit-packed in uint8 and unpacked with BitShift and
BitwiseAnd after the Gather.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxcompress.graph import WeightUse, weights_by_value
from onnxcompress.numerics.quant import (
    QuantizedRows,
    binarize_rows,
    gptq_quantize,
    pack_codes,
    quantize_rows,
)
from onnxcompress.passes import register
from onnxcompress.passes.base import CompressionPass, CompressionResult

__all__ = ["Quantize"]

logger = logging.getLogger(__name__)

#: DequantizeLinear with block_size and int4 types need opset 21 (and IR version 10).
QUANT_OPSET = 21
QUANT_IR_VERSION = 10
BIT_CHOICES = (8, 4, 2, 1)


@dataclass
class _Builder:
    """Adds initializers and nodes to a graph with names derived from the weight they replace."""

    graph: ir.Graph
    prefix: str
    nodes: list[ir.Node] = field(default_factory=list)
    _small: dict[tuple[str, str, bytes], ir.Value] = field(default_factory=dict)
    _taken: set[str] | None = None
    stored_bytes: int = 0

    def constant(self, suffix: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
        array = np.asarray(array)
        key = (suffix, str(array.dtype), array.tobytes()) if array.size <= 16 else None
        if key is not None and key in self._small:
            return self._small[key]
        name = self._unique(f"{self.prefix}_{suffix}")
        value = ir.Value(name=name, const_value=ir.tensor(array, dtype=dtype, name=name))
        self.graph.register_initializer(value)
        self.stored_bytes += value.const_value.nbytes  # type: ignore[union-attr]
        if key is not None:
            self._small[key] = value
        return value

    def insert_before(self, node: ir.Node) -> None:
        """Insert the nodes built so far in front of ``node`` and start a new batch."""
        self.graph.insert_before(node, self.nodes)
        self.nodes = []

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], **attributes: Any) -> ir.Value:
        node = ir.node(
            op_type, list(inputs), attributes=attributes or None, name=self._unique(f"{self.prefix}/{op_type}")
        )
        self.nodes.append(node)
        return node.outputs[0]

    def _unique(self, name: str) -> str:
        if self._taken is None:
            self._taken = {node.name for node in self.graph if node.name}
        candidate, index = name, 1
        while candidate in self.graph.initializers or candidate in self._taken:
            candidate, index = f"{name}_{index}", index + 1
        self._taken.add(candidate)
        return candidate


def _rows_layout(weight: np.ndarray, use: WeightUse) -> np.ndarray:
    """The weight as ``[output channels, inputs]`` (Conv kernels flattened into the inputs)."""
    moved = np.moveaxis(weight, use.out_axis, 0)
    return moved.reshape(moved.shape[0], -1)


def _int_dtype(bits: int, symmetric: bool) -> tuple[ir.DataType, Any]:
    if bits == 8:
        return (ir.DataType.INT8, np.int8) if symmetric else (ir.DataType.UINT8, np.uint8)
    return (ir.DataType.INT4, ml_dtypes.int4) if symmetric else (ir.DataType.UINT4, ml_dtypes.uint4)


@register("quant")
class Quantize(CompressionPass):
    """Quantize weights to 8/4/2/1 bits with DequantizeLinear: linear layers per channel or block,
    embedding tables per row with the lookup done on the quantized table."""

    lossy = True

    @dataclass(frozen=True)
    class Config:
        bits: int = field(default=8, metadata={"help": "bits for linear-layer weights", "choices": BIT_CHOICES})
        granularity: str = field(
            default="channel",
            metadata={"help": "scale per tensor, output channel or block", "choices": ("tensor", "channel", "block")},
        )
        block_size: int = field(default=32, metadata={"help": "inputs per scale with granularity=block", "min": 2})
        symmetric: bool = field(default=True, metadata={"help": "zero point 0 for linear weights (else min/max)"})
        embedding_bits: int = field(
            default=8,
            metadata={
                "help": "bits for embedding tables, per-row scale; 0 leaves tables in float",
                "choices": (0, *BIT_CHOICES),
            },
        )
        embedding_symmetric: bool = field(
            default=False, metadata={"help": "zero point 0 for tables (default: per-row min/max offset as FBGEMM)"}
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
        op_types: tuple[str, ...] = field(
            default=("MatMul", "Gemm", "Conv", "Gather"), metadata={"help": "ops whose weights are quantized"}
        )
        include: str = field(default="", metadata={"help": "regex: only weights or nodes whose name matches"})
        exclude: str = field(default="", metadata={"help": "regex: skip weights or nodes whose name matches"})
        min_elements: int = field(default=0, metadata={"help": "leave weights with fewer elements in float", "min": 0})

    def call(self, model: ir.Model) -> CompressionResult:
        selected, skipped = self._select(model)
        if not selected:
            return CompressionResult(model, modified=False, stats={"skipped": skipped})
        if self._prepare_opset(model):
            # Conversion through the ONNX C API rebuilds the graph: select from the new one.
            selected, skipped = self._select(model)
        quantized: dict[str, dict[str, Any]] = {}
        hessians = self._hessians(model, selected)
        for value, uses in selected.items():
            kind = "embedding" if all(use.kind == "embedding" for use in uses) else uses[0].kind
            name = value.name or "weight"
            if kind == "embedding" or any(use.kind == "embedding" for use in uses):
                quantized[name] = self._quantize_table(model.graph, value, uses)
            else:
                quantized[name] = self._quantize_linear(model.graph, value, uses, hessians.get(name))
        total_before = sum(entry["bytes_before"] for entry in quantized.values())
        total_after = sum(entry["bytes_after"] for entry in quantized.values())
        stats = {
            "weights_quantized": len(quantized),
            "bytes_before": total_before,
            "bytes_after": total_after,
            "ratio": round(total_before / max(total_after, 1), 3),
            "tensors": quantized,
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
        for value, uses in weights_by_value(model).items():
            name = value.name or ""
            names = [name, *(use.node.name or "" for use in uses)]
            tensor = value.const_value
            assert tensor is not None
            is_table = any(use.kind == "embedding" for use in uses)
            if not any(use.node.op_type in config.op_types for use in uses):
                skipped[name] = "op type not in quant.op_types"
            elif include is not None and not any(include.search(n) for n in names):
                skipped[name] = "not matched by quant.include"
            elif exclude is not None and any(exclude.search(n) for n in names):
                skipped[name] = "matched by quant.exclude"
            elif tensor.size < config.min_elements:
                skipped[name] = f"fewer than quant.min_elements={config.min_elements} elements"
            elif is_table and config.embedding_bits == 0:
                skipped[name] = "embedding table and quant.embedding_bits=0"
            elif not is_table and len(tensor.shape) < 2:
                skipped[name] = "not a matrix"
            else:
                selected[value] = uses
        return selected, skipped

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

    # --- calibration -----------------------------------------------------------------------------

    def _wants_gptq(self, use: WeightUse) -> bool:
        rounding = self.config.rounding
        calibrated = self.context.calibration is not None
        return (
            use.kind == "linear"
            and self.config.bits >= 2
            and (rounding == "gptq" or (rounding == "auto" and calibrated))
        )

    def _hessians(self, model: ir.Model, selected: dict[ir.Value, list[WeightUse]]) -> dict[str, np.ndarray]:
        """``X^T X`` of each linear layer's input on the calibration rows (for GPTQ)."""
        calibration = self.context.calibration
        targets: dict[str, ir.Value] = {}
        for value, uses in selected.items():
            use = uses[0]
            if len(uses) == 1 and self._wants_gptq(use) and use.node.inputs[0] is not None:
                if use.node.op_type == "Gemm" and use.node.attributes.get_int("transA", 0):
                    continue
                targets[value.name or ""] = use.node.inputs[0]
        if calibration is None or not targets:
            return {}
        hessians: dict[str, np.ndarray] = {}
        unique_inputs = {value.name: value for value in targets.values()}
        for batch in calibration.iter_capture(model, list(unique_inputs.values())):
            for weight_name, input_value in targets.items():
                x = batch[input_value.name].astype(np.float64)
                x = x.reshape(-1, x.shape[-1])
                contribution = x.T @ x
                hessians[weight_name] = hessians.get(weight_name, 0) + contribution
        return hessians

    # --- linear layers ---------------------------------------------------------------------------

    def _quantize_linear(
        self, graph: ir.Graph, value: ir.Value, uses: list[WeightUse], hessian: np.ndarray | None
    ) -> dict[str, Any]:
        config = self.config
        use = uses[0]
        tensor = value.const_value
        assert tensor is not None and value.name is not None
        weight = tensor.numpy().astype(np.float32)
        rows = _rows_layout(weight, use)
        channels, inputs = rows.shape
        granularity = config.granularity
        group = inputs
        if granularity == "block":
            group = config.block_size
            if inputs % group or use.kind == "conv":
                granularity, group = "channel", inputs
        build = _Builder(graph, value.name)
        method = "nearest"
        if config.bits == 1:
            codes, alpha = binarize_rows(rows.reshape(-1, group))
            output = self._binary_constant(build, codes, alpha, rows.shape)
            method = "binary"
        else:
            if granularity == "tensor":
                quantized = quantize_rows(
                    rows.reshape(1, -1),
                    config.bits,
                    symmetric=config.symmetric,
                    search=config.rounding in ("mse", "auto"),
                )
                method = "mse" if config.rounding in ("mse", "auto") else "nearest"
            elif hessian is not None and hessian.shape == (inputs, inputs) and use.kind == "linear":
                quantized = gptq_quantize(rows, hessian, config.bits, group_size=group, symmetric=config.symmetric)
                method = "gptq"
            else:
                search = config.rounding in ("mse", "auto")
                quantized = quantize_rows(
                    rows.reshape(-1, group), config.bits, symmetric=config.symmetric, search=search
                )
                method = "mse" if search else "nearest"
            output = self._linear_constant(build, quantized, (channels, inputs), granularity, group)
        output = self._to_weight_layout(build, output, weight.shape, use)
        build.insert_before(min((u.node for u in uses), key=lambda node: _position(graph, node)))
        for weight_use in uses:
            weight_use.node.replace_input_with(weight_use.input_index, output)
        graph.initializers.pop(value.name)
        return {
            "kind": use.kind,
            "bits": config.bits,
            "granularity": granularity if config.bits != 1 else "channel",
            "rounding": method,
            "bytes_before": tensor.nbytes,
            "bytes_after": build.stored_bytes,
        }

    def _linear_constant(
        self, build: _Builder, quantized: QuantizedRows, shape: tuple[int, int], granularity: str, group: int
    ) -> ir.Value:
        """DequantizeLinear over the ``[channels, inputs]`` codes: per tensor, channel or block."""
        channels, inputs = shape
        bits = quantized.bits
        symmetric = quantized.symmetric
        codes = quantized.codes.reshape(channels, inputs)
        if bits in (8, 4):
            dtype, numpy_type = _int_dtype(bits, symmetric)
            q = build.constant("q", codes.astype(numpy_type), dtype)
            zero = None
            if not symmetric:
                zero_array = quantized.zero_point.astype(numpy_type)  # type: ignore[union-attr]
                zero = build.constant(
                    "zero_point", _group_shape(zero_array, granularity, channels, inputs, group), dtype
                )
            scale = build.constant("scale", _group_shape(quantized.scale, granularity, channels, inputs, group))
            attributes: dict[str, Any] = {}
            if granularity == "channel":
                attributes["axis"] = 0
            elif granularity == "block":
                attributes.update(axis=1, block_size=group)
            return build.op("DequantizeLinear", [q, scale, zero] if zero is not None else [q, scale], **attributes)
        # 2-bit: packed uint8 codes, unpacked by standard ops (folded to a constant at load).
        unsigned = codes.astype(np.int16) - (0 if not symmetric else -(2 ** (bits - 1) - 1))
        packed = build.constant("packed", pack_codes(unsigned.astype(np.uint8), bits))
        unpacked = _unpack(build, packed, bits, inputs)
        zero_point = (
            np.full(channels * (inputs // group), 2 ** (bits - 1) - 1, np.uint8) if symmetric else quantized.zero_point
        )
        scale = quantized.scale
        if granularity == "tensor":
            scale = np.repeat(scale, channels)
            zero_point = np.repeat(zero_point, channels)  # type: ignore[arg-type]
        if granularity == "block":
            scale_value = build.constant("scale", scale.reshape(channels, inputs // group))
            zero_value = build.constant("zero_point", zero_point.reshape(channels, inputs // group))  # type: ignore[union-attr]
            return build.op("DequantizeLinear", [unpacked, scale_value, zero_value], axis=1, block_size=group)
        scale_value = build.constant("scale", scale.reshape(-1))
        zero_value = build.constant("zero_point", np.asarray(zero_point, np.uint8).reshape(-1))
        return build.op("DequantizeLinear", [unpacked, scale_value, zero_value], axis=0)

    def _binary_constant(
        self, build: _Builder, codes: np.ndarray, alpha: np.ndarray, shape: tuple[int, int]
    ) -> ir.Value:
        """``sign(w) * alpha``: 1-bit codes packed 8 to a byte, decoded as ``2*alpha*bit - alpha``."""
        channels, inputs = shape
        packed = build.constant("packed", pack_codes(codes.reshape(channels, inputs), 1))
        bits = _unpack(build, packed, 1, inputs)
        groups = alpha.reshape(channels, -1)
        repeat = inputs // groups.shape[1]
        alpha_full = np.repeat(groups, repeat, axis=1).astype(np.float32) if groups.shape[1] > 1 else groups
        scaled = build.op(
            "Mul",
            [
                build.op("Cast", [bits], to=ir.DataType.FLOAT),
                build.constant("two_alpha", (2 * alpha_full).astype(np.float32)),
            ],
        )
        return build.op("Sub", [scaled, build.constant("alpha", alpha_full.astype(np.float32))])

    def _to_weight_layout(
        self, build: _Builder, rows_value: ir.Value, shape: tuple[int, ...], use: WeightUse
    ) -> ir.Value:
        """From ``[channels, inputs]`` back to the layout the consuming op reads."""
        moved_shape = (shape[use.out_axis], *[d for i, d in enumerate(shape) if i != use.out_axis])
        value = rows_value
        if len(shape) > 2:
            value = build.op("Reshape", [value, build.constant("shape", np.array(moved_shape, np.int64))])
        if use.out_axis != 0:
            perm = list(range(1, len(shape)))
            perm.insert(use.out_axis, 0)
            value = build.op("Transpose", [value], perm=perm)
        return value

    # --- embedding tables ------------------------------------------------------------------------

    def _quantize_table(self, graph: ir.Graph, value: ir.Value, uses: list[WeightUse]) -> dict[str, Any]:
        config = self.config
        tensor = value.const_value
        assert tensor is not None and value.name is not None
        table = tensor.numpy()
        rows, dim = table.shape
        bits = config.embedding_bits
        scale_dtype = np.dtype(config.scale_dtype)
        build = _Builder(graph, value.name)
        if bits == 1:
            codes, alpha = binarize_rows(table, scale_dtype)
            quantized = QuantizedRows(codes, alpha, None, 1)
        else:
            quantized = quantize_rows(
                table,
                bits,
                symmetric=config.embedding_symmetric,
                search=config.rounding in ("mse", "auto", "gptq"),
                scale_dtype=scale_dtype,
            )
        if bits == 8:
            stored = build.constant("q", quantized.codes)
        else:
            unsigned = quantized.codes.astype(np.int16)
            if quantized.symmetric and bits > 1:
                unsigned = unsigned + (2 ** (bits - 1) - 1)
            stored = build.constant("packed", pack_codes(unsigned.astype(np.uint8), bits))
        scale = build.constant("scale", quantized.scale)
        zero = None
        if bits > 1 and (not quantized.symmetric or bits < 8):
            zero_array = (
                quantized.zero_point
                if quantized.zero_point is not None
                else np.full(rows, 2 ** (bits - 1) - 1, np.uint8)
            )
            zero = build.constant("zero_point", zero_array)
        other_uses = [use for use in uses if use.kind != "embedding"]
        if other_uses:
            table_value = self._whole_table(build, stored, scale, zero, bits, dim)
            build.insert_before(min((u.node for u in other_uses), key=lambda node: _position(graph, node)))
            for use in other_uses:
                use.node.replace_input_with(use.input_index, table_value)
        for use in uses:
            if use.kind == "embedding":
                self._gathered_lookup(build, use, stored, scale, zero, bits, dim)
                build.insert_before(use.node)
                graph.remove(use.node, safe=True)
        graph.initializers.pop(value.name)
        return {
            "kind": "embedding",
            "bits": bits,
            "granularity": "row",
            "rounding": "binary" if bits == 1 else ("mse" if config.rounding != "nearest" else "nearest"),
            "bytes_before": tensor.nbytes,
            "bytes_after": build.stored_bytes,
            "lookups": sum(1 for use in uses if use.kind == "embedding"),
        }

    def _gathered_lookup(
        self,
        build: _Builder,
        use: WeightUse,
        stored: ir.Value,
        scale: ir.Value,
        zero: ir.Value | None,
        bits: int,
        dim: int,
    ) -> None:
        """Replace ``Gather(table, ids)`` by a Gather of quantized rows and their scales, then a
        per-row DequantizeLinear (axis 0) of only the gathered rows."""
        node = use.node
        ids = node.inputs[1]
        assert ids is not None
        output = node.outputs[0]
        one_dimensional = ids.shape is not None and len(ids.shape) == 1
        flat_ids = (
            ids if one_dimensional else build.op("Reshape", [ids, build.constant("flat", np.array([-1], np.int64))])
        )
        rows = build.op("Gather", [stored, flat_ids], axis=0)
        row_scale = build.op("Gather", [scale, flat_ids], axis=0)
        if scale.const_value is not None and scale.const_value.dtype != ir.DataType.FLOAT:
            row_scale = build.op("Cast", [row_scale], to=ir.DataType.FLOAT)
        if bits < 8:
            rows = _unpack(build, rows, bits, dim)
        if bits == 1:
            alpha = build.op("Unsqueeze", [row_scale, build.constant("last", np.array([-1], np.int64))])
            signs = build.op("Cast", [rows], to=ir.DataType.FLOAT)
            doubled = build.op("Mul", [signs, build.op("Add", [alpha, alpha])])
            values = build.op("Sub", [doubled, alpha])
        else:
            row_zero = build.op("Gather", [zero, flat_ids], axis=0) if zero is not None else None
            inputs = [rows, row_scale, row_zero] if row_zero is not None else [rows, row_scale]
            values = build.op("DequantizeLinear", inputs, axis=0)
        if not one_dimensional:
            shape = build.op(
                "Concat", [build.op("Shape", [ids]), build.constant("dim", np.array([dim], np.int64))], axis=0
            )
            values = build.op("Reshape", [values, shape])
        was_graph_output = output.is_graph_output()
        ir.convenience.replace_all_uses_with(output, values, replace_graph_outputs=True)
        values.type, values.shape = output.type, output.shape
        if was_graph_output:
            name, output.name = output.name, None
            values.name = name

    def _whole_table(
        self, build: _Builder, stored: ir.Value, scale: ir.Value, zero: ir.Value | None, bits: int, dim: int
    ) -> ir.Value:
        """The dequantized table for non-lookup uses (a tied output layer): constant-folded at load."""
        rows = _unpack(build, stored, bits, dim) if bits < 8 else stored
        row_scale = scale
        if scale.const_value is not None and scale.const_value.dtype != ir.DataType.FLOAT:
            row_scale = build.op("Cast", [scale], to=ir.DataType.FLOAT)
        if bits == 1:
            alpha = build.op("Unsqueeze", [row_scale, build.constant("last", np.array([-1], np.int64))])
            doubled = build.op("Mul", [build.op("Cast", [rows], to=ir.DataType.FLOAT), build.op("Add", [alpha, alpha])])
            return build.op("Sub", [doubled, alpha])
        inputs = [rows, row_scale, zero] if zero is not None else [rows, row_scale]
        return build.op("DequantizeLinear", inputs, axis=0)


def _group_shape(array: np.ndarray, granularity: str, channels: int, inputs: int, group: int) -> np.ndarray:
    if granularity == "tensor":
        return array.reshape(())
    if granularity == "block":
        return array.reshape(channels, inputs // group)
    return array.reshape(channels)


def _unpack(build: _Builder, packed: ir.Value, bits: int, count: int) -> ir.Value:
    """Standard-op unpacking of little-endian ``bits``-wide codes along the last axis (uint8)."""
    per_byte = 8 // bits
    expanded = build.op("Unsqueeze", [packed, build.constant("last", np.array([-1], np.int64))])
    shifts = build.constant("shifts", (np.arange(per_byte) * bits).astype(np.uint8))
    shifted = build.op("BitShift", [expanded, shifts], direction="RIGHT")
    codes = build.op("BitwiseAnd", [shifted, build.constant("mask", np.array(2**bits - 1, np.uint8))])
    flat = build.op("Reshape", [codes, build.constant("merge", np.array([0, -1], np.int64))])
    if (count * bits) % 8:
        flat = build.op(
            "Slice",
            [
                flat,
                build.constant("start", np.array([0], np.int64)),
                build.constant("stop", np.array([count], np.int64)),
                build.constant("axis", np.array([1], np.int64)),
            ],
        )
    return flat


def _position(graph: ir.Graph, node: ir.Node) -> int:
    for index, candidate in enumerate(graph):
        if candidate is node:
            return index
    return len(graph)
