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

from onnxcompress.graph import is_constant_initializer
from onnxcompress.numerics.prune import pack_bits
from onnxcompress.passes import register
from onnxcompress.passes.base import CompressionPass, CompressionResult

__all__ = ["SparseStorage", "encoded_bytes"]

logger = logging.getLogger(__name__)

#: Element types stored this way (Gather copies any type; these are what passes produce).
DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.INT8, ir.DataType.UINT8})
#: BitShift and CumSum exist from opset 11.
MIN_OPSET = 11
#: Serialized bytes of one tensor's decode nodes and small constants (measured about 420 with
#: typical names); the saving must exceed it for a tensor to be re-stored.
NODE_OVERHEAD = 512


def encoded_bytes(size: int, nonzeros: int, itemsize: int) -> int:
    """Bytes of the stored form: the bitmask plus the nonzero values after one leading zero.

    The decode nodes and their small constants (``NODE_OVERHEAD``) come on top.
    """
    return -(-size // 8) + (nonzeros + 1) * itemsize


def _nonzero_mask(array: np.ndarray) -> np.ndarray:
    """Elements whose bit pattern is not all zeros (so -0.0 and NaN are kept as values)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    return flat.view(f"u{flat.dtype.itemsize}") != 0


class _Decoder:
    """Builds the decode nodes, sharing the shift and modulus constants between tensors."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.nodes: list[ir.Node] = []
        self._shared: dict[str, ir.Value] = {}

    def _initializer(self, name: str, array: np.ndarray) -> ir.Value:
        unique, suffix = name, 1
        while unique in self.graph.initializers:
            unique, suffix = f"{name}_{suffix}", suffix + 1
        value = ir.Value(
            name=unique,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            const_value=ir.tensor(array, name=unique),
        )
        self.graph.register_initializer(value)
        return value

    def _shared_constant(self, name: str, array: np.ndarray) -> ir.Value:
        if name not in self._shared:
            self._shared[name] = self._initializer(f"onnxcompress_sparse_{name}", array)
        return self._shared[name]

    def _op(self, op_type: str, inputs: list[ir.Value], name: str, **attributes: Any) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attributes or None, name=name)
        node.outputs[0].name = name
        self.nodes.append(node)
        return node.outputs[0]

    def decode(self, name: str, array: np.ndarray, keep: np.ndarray) -> tuple[ir.Value, int]:
        """Nodes rebuilding ``array`` from its mask and values; the output value and the stored bytes."""
        bits = self._initializer(f"{name}_sparse_bits", pack_bits(keep).reshape(-1, 1))
        stored = np.ascontiguousarray(array).reshape(-1)[keep]
        values = self._initializer(f"{name}_sparse_values", np.concatenate([np.zeros(1, array.dtype), stored]))
        shifts = self._shared_constant("shifts", np.arange(8, dtype=np.uint8))
        two = self._shared_constant("two", np.array(2, dtype=np.uint8))
        flat_shape = self._shared_constant("flat", np.array([-1], dtype=np.int64))
        axis = self._shared_constant("axis", np.array(0, dtype=np.int64))
        axis1 = self._shared_constant("axes", np.array([0], dtype=np.int64))
        start0 = axis1
        size = self._initializer(f"{name}_sparse_size", np.array([array.size], dtype=np.int64))
        shape = self._initializer(f"{name}_sparse_shape", np.array(array.shape, dtype=np.int64))
        prefix = f"{name}_sparse"
        shifted = self._op("BitShift", [bits, shifts], f"{prefix}/shift", direction="RIGHT")
        flags = self._op("Reshape", [self._op("Mod", [shifted, two], f"{prefix}/bit"), flat_shape], f"{prefix}/flags")
        flags64 = self._op("Cast", [flags], f"{prefix}/flags64", to=ir.DataType.INT64)
        # Position of each element among the stored values, counted from 1; 0 picks the leading zero.
        rank = self._op("CumSum", [flags64, axis], f"{prefix}/rank")
        index = self._op("Mul", [rank, flags64], f"{prefix}/index")
        padded = self._op("Gather", [values, index], f"{prefix}/gather")
        dense = self._op("Slice", [padded, start0, size, axis1], f"{prefix}/slice")
        decoded = self._op("Reshape", [dense, shape], f"{prefix}/decoded")
        return decoded, bits.const_value.nbytes + values.const_value.nbytes  # type: ignore[union-attr]


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
        before = after = 0
        for value in candidates:
            tensor = value.const_value
            assert tensor is not None and value.name is not None
            # Decide from dtype, shape and bytes first: reading a tensor is I/O.
            if tensor.dtype not in DTYPES or tensor.size < self.config.min_elements:
                continue
            if opset < MIN_OPSET:
                skipped[value.name] = f"opset {opset} < {MIN_OPSET} (no BitShift/CumSum)"
                continue
            best = encoded_bytes(tensor.size, 0, tensor.dtype.itemsize) + NODE_OVERHEAD
            if best >= tensor.nbytes:
                skipped[value.name] = "too small for the mask and decode nodes to pay off"
                continue
            array = tensor.numpy()
            keep = _nonzero_mask(array)
            nonzeros = int(keep.sum())
            zero_fraction = 1.0 - nonzeros / array.size
            stored = encoded_bytes(array.size, nonzeros, tensor.dtype.itemsize)
            if zero_fraction < self.config.min_sparsity:
                skipped[value.name] = f"{zero_fraction:.1%} zeros, below min_sparsity"
                continue
            if stored + NODE_OVERHEAD >= tensor.nbytes:
                skipped[value.name] = f"{zero_fraction:.1%} zeros do not pay for the mask and decode nodes"
                continue
            decoded, stored = decoder.decode(value.name, array, keep)
            value.replace_all_uses_with(decoded)
            graph.initializers.pop(value.name)
            decoded.name = value.name  # later tools and reports find the tensor under its own name
            encoded[value.name] = {
                "bytes_before": tensor.nbytes,
                "bytes_after": stored,
                "zero_fraction": round(zero_fraction, 6),
            }
            before += tensor.nbytes
            after += stored
        if decoder.nodes:
            graph.insert_before(graph[0], decoder.nodes)
        stats = {
            "tensors_encoded": len(encoded),
            "bytes_before": before,
            "bytes_after": after,
            "bytes_saved": before - after,
            "tensors": encoded,
            "skipped": skipped,
        }
        return CompressionResult(model, modified=bool(encoded), stats=stats)
