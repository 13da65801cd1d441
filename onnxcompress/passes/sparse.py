"""Lossless sparse storage: mostly-zero constant tensors stored as packed nonzeros plus a 1-bit mask.

A dense ONNX file does not shrink when values are zero. This pass re-stores each eligible
initializer as its nonzero values (in order) and a bitmask (one bit per element, uint8, least
significant bit first), followed by a small subgraph of standard ops that rebuilds the dense tensor:

    bits[B,1] -BitShift(0..7)-> [B,8] -Mod 2-> Reshape[-1] -Cast int64-> flags
    index = CumSum(flags) * flags          (k for the k-th stored value, 0 for a zero)
    Gather([0, values...], index) -Slice[0:size]-> -Reshape(shape)-> the original tensor

Every input of that subgraph is constant, so onnxruntime folds it back into the dense initializer
when the session loads (its basic optimisation level): run time is unchanged, the file is smaller.
(A NonZero + ScatterND decoder is not folded by onnxruntime 1.32; this one is, entirely.)
The values are copied bit for bit (``-0.0`` and NaN count as nonzero), so the result is exact.
Run it last: later passes would see a computed value where they expect an initializer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcompress.graph import constant_value, is_constant_initializer
from onnxcompress.io import ExternalRows
from onnxcompress.numerics.prune import pack_bits
from onnxcompress.passes import register
from onnxcompress.passes.base import CompressionPass, CompressionResult

__all__ = ["SparseStorage", "encoded_bytes"]

logger = logging.getLogger(__name__)

#: Element types stored this way (Gather copies any type; these are what passes produce).
DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.INT8, ir.DataType.UINT8})
#: BitShift and CumSum exist from opset 11.
MIN_OPSET = 11
#: Fewest serialized bytes one tensor's decode nodes and small constants take: tensors whose mask
#: alone plus this cannot beat the dense form are skipped without reading them. Whether the rest
#: pay off is decided on the exact serialized size of the encoding.
NODE_OVERHEAD = 256


def encoded_bytes(size: int, nonzeros: int, itemsize: int) -> int:
    """Bytes of the stored form: the bitmask plus the nonzero values after one leading zero.

    The decode nodes and their small constants (``NODE_OVERHEAD``) come on top.
    """
    return -(-size // 8) + (nonzeros + 1) * itemsize


def _nonzero_mask(array: np.ndarray) -> np.ndarray:
    """Elements whose bit pattern is not all zeros (so -0.0 and NaN are kept as values)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    return flat.view(f"u{flat.dtype.itemsize}") != 0


@dataclass
class _Encoding:
    """One tensor's stored form: the decoded value, the nodes and initializers that make it."""

    decoded: ir.Value
    nodes: list[ir.Node]
    initializers: list[ir.Value]
    stored_bytes: int

    def serialized_bytes(self) -> int:
        """What the encoding adds to the file: its nodes and initializers as serialized protobuf."""
        nodes = sum(ir.serde.serialize_node(node).ByteSize() for node in self.nodes)
        return nodes + sum(ir.serde.serialize_tensor(v.const_value).ByteSize() for v in self.initializers)  # type: ignore[arg-type]


class _Decoder:
    """Builds decode subgraphs with short value names, sharing the shift and axis constants."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.nodes: list[ir.Node] = []
        self._shared: dict[str, ir.Value] = {}
        self._names = {value.name for node in graph for value in node.outputs} | set(graph.initializers)
        self._names |= {value.name for value in graph.inputs}
        self._count = 0

    def _fresh(self, base: str) -> str:
        name, suffix = base, 1
        while name in self._names:
            name, suffix = f"{base}_{suffix}", suffix + 1
        self._names.add(name)
        return name

    def _initializer(self, name: str, array: np.ndarray, created: list[ir.Value]) -> ir.Value:
        unique = self._fresh(name)
        # No type or shape on the value: the tensor carries both, and a value_info entry would
        # only add bytes to the file.
        value = constant_value(unique, array)
        self.graph.register_initializer(value)
        created.append(value)
        return value

    def _shared_constant(self, name: str, array: np.ndarray, created: list[ir.Value]) -> ir.Value:
        if name not in self._shared:
            self._shared[name] = self._initializer(f"sparse.{name}", array, created)
        return self._shared[name]

    def encode(self, array: np.ndarray, keep: np.ndarray) -> _Encoding:
        """Initializers and nodes rebuilding ``array`` from its mask and its nonzero values."""
        self._count += 1
        prefix = f"sparse{self._count}"
        created: list[ir.Value] = []
        nodes: list[ir.Node] = []

        def op(op_type: str, inputs: list[ir.Value], **attributes: Any) -> ir.Value:
            name = self._fresh(f"{prefix}.{len(nodes)}")
            # Named like its output: an unnamed node would get a longer generated name on insertion.
            node = ir.node(op_type, inputs, attributes=attributes or None, name=name)
            node.outputs[0].name = name
            nodes.append(node)
            return node.outputs[0]

        values = np.concatenate([np.zeros(1, array.dtype), np.ascontiguousarray(array).reshape(-1)[keep]])
        bits = self._initializer(f"{prefix}.bits", pack_bits(keep).reshape(-1, 1), created)
        stored = self._initializer(f"{prefix}.values", values, created)
        size = self._initializer(f"{prefix}.size", np.array([array.size], dtype=np.int64), created)
        shape = self._initializer(f"{prefix}.shape", np.array(array.shape, dtype=np.int64), created)
        shifts = self._shared_constant("shifts", np.arange(8, dtype=np.uint8), created)
        two = self._shared_constant("two", np.array(2, dtype=np.uint8), created)
        flat = self._shared_constant("flat", np.array([-1], dtype=np.int64), created)
        axis = self._shared_constant("axis", np.array(0, dtype=np.int64), created)
        zero = self._shared_constant("zero", np.array([0], dtype=np.int64), created)
        flags = op("Reshape", [op("Mod", [op("BitShift", [bits, shifts], direction="RIGHT"), two]), flat])
        flags64 = op("Cast", [flags], to=ir.DataType.INT64)
        # Position of each element among the stored values, counted from 1; 0 picks the leading zero.
        index = op("Mul", [op("CumSum", [flags64, axis]), flags64])
        dense = op("Slice", [op("Gather", [stored, index]), zero, size, zero])
        decoded = op("Reshape", [dense, shape])
        return _Encoding(decoded, nodes, created, bits.const_value.nbytes + stored.const_value.nbytes)  # type: ignore[union-attr]

    def discard(self, encoding: _Encoding) -> None:
        """Forget an encoding that does not pay off: its nodes let go of their inputs, its initializers leave."""
        for node in encoding.nodes:
            for index in range(len(node.inputs)):
                node.replace_input_with(index, None)
        for value in encoding.initializers:
            assert value.name is not None
            self.graph.initializers.pop(value.name)
            self._shared = {key: shared for key, shared in self._shared.items() if shared is not value}

    def accept(self, encoding: _Encoding) -> None:
        self.nodes.extend(encoding.nodes)


@register("sparse")
class SparseStorage(CompressionPass):
    """Lossless: store mostly-zero constant tensors (float, or int8/uint8 from quantization) as packed
    nonzero values plus a 1-bit mask, decoded by standard ops that onnxruntime folds at load. Run last."""

    @dataclass(frozen=True)
    class Config:
        min_sparsity: float = field(
            default=0.3,
            metadata={"help": "re-store tensors with at least this fraction of exact zeros", "min": 0.0, "max": 1.0},
        )
        min_elements: int = field(default=1024, metadata={"help": "skip tensors with fewer elements", "min": 1})

    def call(self, model: ir.Model) -> CompressionResult:
        graph = model.graph
        opset = model.opset_imports.get("", 1)
        candidates = [value for value in graph.initializers.values() if is_constant_initializer(value) and value.uses()]
        skipped: dict[str, str] = {}
        encoded: dict[str, dict[str, Any]] = {}
        decoder = _Decoder(graph)
        before = after = file_before = file_after = 0
        for value in candidates:
            tensor = value.const_value
            assert tensor is not None and value.name is not None
            # Decide from dtype, shape and bytes first: reading a tensor is I/O.
            if tensor.dtype not in DTYPES or tensor.size < self.config.min_elements:
                continue
            if opset < MIN_OPSET:
                skipped[value.name] = f"opset {opset} < {MIN_OPSET} (no BitShift/CumSum)"
                continue
            best = encoded_bytes(tensor.size, 0, int(tensor.dtype.itemsize)) + NODE_OVERHEAD
            if best >= tensor.nbytes:
                skipped[value.name] = "too small for the mask and decode nodes to pay off"
                continue
            if isinstance(tensor, ir.ExternalTensor) and tensor.dtype.bitwidth >= 8:
                # Count zeros with plain reads first: a dense table is then never mapped.
                rows = ExternalRows(tensor)
                step = max(1, (1 << 24) // max(rows.shape[1], 1))
                zeros = sum(
                    int((~_nonzero_mask(rows[start : start + step])).sum()) for start in range(0, len(rows), step)
                )
                if zeros / tensor.size < self.config.min_sparsity:
                    skipped[value.name] = f"{zeros / tensor.size:.1%} zeros, below min_sparsity"
                    continue
            array = tensor.numpy()
            keep = _nonzero_mask(array)
            nonzeros = int(keep.sum())
            zero_fraction = 1.0 - nonzeros / array.size
            stored = encoded_bytes(array.size, nonzeros, int(tensor.dtype.itemsize))
            if zero_fraction < self.config.min_sparsity:
                skipped[value.name] = f"{zero_fraction:.1%} zeros, below min_sparsity"
                continue
            if stored + NODE_OVERHEAD >= tensor.nbytes:
                skipped[value.name] = f"{zero_fraction:.1%} zeros do not pay for the mask and decode nodes"
                continue
            encoding = decoder.encode(array, keep)
            dense_bytes = ir.serde.serialize_tensor(tensor).ByteSize()
            added = encoding.serialized_bytes()
            if added >= dense_bytes:
                decoder.discard(encoding)
                skipped[value.name] = f"{zero_fraction:.1%} zeros; stored form {added} bytes >= dense {dense_bytes}"
                continue
            decoder.accept(encoding)
            decoded = encoding.decoded
            value.replace_all_uses_with(decoded)
            graph.initializers.pop(value.name)
            decoded.name = value.name  # later tools and reports find the tensor under its own name
            encoded[value.name] = {
                "bytes_before": tensor.nbytes,
                "bytes_after": encoding.stored_bytes,
                "serialized_bytes_before": dense_bytes,
                "serialized_bytes_after": added,
                "zero_fraction": round(zero_fraction, 6),
            }
            file_before += dense_bytes
            file_after += added
            before += tensor.nbytes
            after += encoding.stored_bytes
        if decoder.nodes:
            graph.insert_before(graph[0], decoder.nodes)
        stats = {
            "tensors_encoded": len(encoded),
            "bytes_before": before,
            "bytes_after": after,
            "bytes_saved": before - after,
            "serialized_bytes_saved": file_before - file_after,
            "tensors": encoded,
            "skipped": skipped,
        }
        return CompressionResult(model, modified=bool(encoded), stats=stats)
