"""Lossless graph cleanup: dead code, Identity/Dropout, duplicate initializers, optional metadata."""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import (
    IdentityEliminationPass,
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)

from onnxcompress.passes import register
from onnxcompress.passes.base import CompressionPass, CompressionResult

__all__ = ["Cleanup", "merge_identical_initializers", "remove_inference_dropout", "strip_metadata"]

logger = logging.getLogger(__name__)


def _is_false_constant(value: ir.Value | None) -> bool:
    if value is None:
        return True
    tensor = value.const_value
    if tensor is None and value.producer() is not None and value.producer().op_type == "Constant":
        attribute = value.producer().attributes.get("value")
        tensor = attribute.as_tensor() if attribute is not None else None
    return tensor is not None and tensor.size == 1 and not bool(tensor.numpy().reshape(()))


def remove_inference_dropout(model: ir.Model) -> int:
    """Bypass Dropout nodes that are no-ops at inference; return how many were removed.

    A Dropout stays when its mask output is used or its ``training_mode`` input is not a constant
    false, because then it changes what the model computes.
    """
    removed = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx"):
            continue
        training_mode = node.inputs[2] if len(node.inputs) > 2 else None
        mask = node.outputs[1] if len(node.outputs) > 1 else None
        if (mask is not None and (mask.uses() or mask.is_graph_output())) or not _is_false_constant(training_mode):
            continue
        source, result = node.inputs[0], node.outputs[0]
        if source is None:
            continue
        if result.is_graph_output() and (source.is_graph_input() or source.is_initializer()):
            node.op_type = "Identity"
            node.resize_inputs(1)
            node.resize_outputs(1)
            node.attributes.clear()
            continue
        was_graph_output = result.is_graph_output()
        ir.convenience.replace_all_uses_with(result, source, replace_graph_outputs=True)
        if was_graph_output:
            source.name = result.name
        node.graph.remove(node, safe=True)
        removed += 1
    return removed


def merge_identical_initializers(model: ir.Model) -> tuple[int, int]:
    """Point every use of a duplicated initializer at one copy; return (merged count, bytes saved).

    Tensors are grouped by dtype and shape, then by a digest of their first and last bytes, and
    only tensors still tied after that are read whole: reading an external tensor is I/O, and most
    same-shaped tables (one per sparse feature) differ in their first bytes.
    """
    merged = saved = 0
    for graph in model.graphs():
        groups: dict[tuple[Any, ...], list[ir.Value]] = defaultdict(list)
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or value.is_graph_input() or value.is_graph_output():
                continue
            groups[(tensor.dtype, tuple(tensor.shape))].append(value)
        for group in groups.values():
            kept: dict[bytes, ir.Value] = {}
            for value in _still_tied(group, _edge_digest):
                digest = _full_digest(value.const_value)
                if digest in kept:
                    value.replace_all_uses_with(kept[digest])
                    assert value.name is not None
                    graph.initializers.pop(value.name)
                    merged += 1
                    saved += value.const_value.nbytes
                else:
                    kept[digest] = value
    return merged, saved


def _still_tied(values: list[ir.Value], digest_of: Any) -> list[ir.Value]:
    if len(values) < 2:
        return []
    by_digest: dict[bytes, list[ir.Value]] = defaultdict(list)
    for value in values:
        by_digest[digest_of(value.const_value)].append(value)
    return [value for tied in by_digest.values() if len(tied) > 1 for value in tied]


_EDGE_BYTES = 64 * 1024
_READ_BYTES = 16 * 1024 * 1024


def _byte_ranges(tensor: ir.TensorProtocol, ranges: list[tuple[int, int]]) -> Iterator[bytes | memoryview]:
    """Yield the tensor's raw bytes in the given (start, stop) ranges without mapping the whole tensor.

    External tensors are read with plain file reads, so the page cache holds the data instead of
    this process's resident memory (a memory-mapped table counts fully towards RSS once read).
    """
    if isinstance(tensor, ir.ExternalTensor):
        with open(tensor.path, "rb") as handle:
            for start, stop in ranges:
                handle.seek((tensor.offset or 0) + start)
                remaining = stop - start
                while remaining > 0:
                    chunk = handle.read(min(remaining, _READ_BYTES))
                    if not chunk:
                        return
                    remaining -= len(chunk)
                    yield chunk
        return
    if tensor.dtype == ir.DataType.STRING:
        data = b"\0".join(tensor.string_data())  # type: ignore[attr-defined]
    else:
        data = memoryview(np.ascontiguousarray(tensor.numpy())).cast("B")
    for start, stop in ranges:
        yield data[start:stop]


def _digest(tensor: ir.TensorProtocol, ranges: list[tuple[int, int]]) -> bytes:
    hasher = hashlib.blake2b(digest_size=32)
    for chunk in _byte_ranges(tensor, ranges):
        hasher.update(chunk)
    return hasher.digest()


def _edge_digest(tensor: ir.TensorProtocol) -> bytes:
    size = tensor.nbytes
    return _digest(tensor, [(0, min(size, _EDGE_BYTES)), (max(size - _EDGE_BYTES, 0), size)])


def _full_digest(tensor: ir.TensorProtocol) -> bytes:
    return _digest(tensor, [(0, tensor.nbytes)])


def strip_metadata(model: ir.Model) -> int:
    """Drop what no runtime reads: doc strings, node and value metadata, intermediate value_info.

    Returns the number of items cleared. Graph inputs and outputs keep their types and shapes.
    """
    cleared = 0
    graphs: list[ir.Graph | ir.Function] = [*model.graphs(), *model.functions.values()]
    for graph in graphs:
        if graph.doc_string:
            graph.doc_string = None
            cleared += 1
        if graph.metadata_props:
            graph.metadata_props.clear()
            cleared += 1
        interface = {*graph.inputs, *graph.outputs}
        if isinstance(graph, ir.Graph):
            for value in graph.initializers.values():
                # The tensor carries dtype and shape; a value_info entry for it is redundant.
                if value not in interface and (value.type is not None or value.shape is not None):
                    value.type = None
                    value.shape = None
                    cleared += 1
        for node in graph:
            if node.doc_string or node.metadata_props:
                node.doc_string = None
                node.metadata_props.clear()
                cleared += 1
            for value in node.outputs:
                if value.metadata_props:
                    value.metadata_props.clear()
                    cleared += 1
                if value not in interface and (value.type is not None or value.shape is not None):
                    value.type = None
                    value.shape = None
                    cleared += 1
    if model.doc_string:
        model.doc_string = None
        cleared += 1
    return cleared


def _op_counts(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        counts[node.op_type] += 1
    return counts


@register("cleanup")
class Cleanup(CompressionPass):
    """Lossless cleanup: remove dead nodes and unused initializers, eliminate Identity and
    inference Dropout, merge identical initializers, optionally strip metadata."""

    @dataclass(frozen=True)
    class Config:
        remove_dropout: bool = field(
            default=True, metadata={"help": "bypass Dropout nodes that do nothing at inference"}
        )
        merge_initializers: bool = field(
            default=True, metadata={"help": "make duplicated initializers (same dtype, shape, bytes) one"}
        )
        strip_metadata: bool = field(
            default=False,
            metadata={"help": "drop doc strings, exporter metadata and intermediate value_info"},
        )

    def call(self, model: ir.Model) -> CompressionResult:
        before = _op_counts(model)
        initializers_before = len(model.graph.initializers)
        dropout = remove_inference_dropout(model) if self.config.remove_dropout else 0
        IdentityEliminationPass()(model)
        RemoveUnusedNodesPass()(model)
        RemoveUnusedFunctionsPass()(model)
        merged, merged_bytes = merge_identical_initializers(model) if self.config.merge_initializers else (0, 0)
        RemoveUnusedNodesPass()(model)
        RemoveUnusedOpsetsPass()(model)
        stripped = strip_metadata(model) if self.config.strip_metadata else 0
        after = _op_counts(model)
        removed_by_op = {op: before[op] - after.get(op, 0) for op in before if before[op] > after.get(op, 0)}
        stats = {
            "nodes_removed": sum(removed_by_op.values()),
            "removed_by_op": dict(sorted(removed_by_op.items())),
            "dropout_removed": dropout,
            "initializers_removed": initializers_before - len(model.graph.initializers) - merged,
            "initializers_merged": merged,
            "bytes_merged": merged_bytes,
            "metadata_items_stripped": stripped,
        }
        modified = bool(stats["nodes_removed"] or stats["initializers_removed"] or merged or stripped)
        return CompressionResult(model, modified=modified, stats=stats)
