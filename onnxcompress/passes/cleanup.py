"""Lossless graph cleanup: dead code, Identity/Dropout, duplicate initializers, optional metadata."""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import string
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import (
    CommonSubexpressionEliminationPass,
    LiftConstantsToInitializersPass,
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)

from onnxcompress import runtime
from onnxcompress.bags import vectorize_bags
from onnxcompress.graph import (
    SPLIT_INPUT_OPSET,
    Dims,
    concrete_shapes,
    constant_array,
    constant_axes,
    constant_value,
    detach_subgraphs,
    inferred_shapes,
    is_constant_initializer,
    linear_layers,
    replace_value,
    set_constant,
    unique_name,
    value_dims,
    varies_with_inputs,
    weight_slots,
)
from onnxcompress.layouts import head_transposes_for_products, merge_transposes
from onnxcompress.passes import register
from onnxcompress.passes.base import CompressionPass, CompressionResult
from onnxcompress.passes.prune import remove_dead_units
from onnxcompress.select_early import select_early
from onnxcompress.static_shapes import fold_shape_arithmetic

__all__ = [
    "Cleanup",
    "drop_default_attributes",
    "merge_identical_initializers",
    "remove_inference_dropout",
    "simplify_class_labels",
    "strip_metadata",
]

logger = logging.getLogger(__name__)


def _is_false_constant(value: ir.Value | None) -> bool:
    if value is None:
        return True
    array = constant_array(value)
    return array is not None and array.size == 1 and not bool(array.reshape(()))


def _bypass(node: ir.Node) -> bool:
    """Remove a node whose first output equals its first input; False when that is impossible.

    When the output is a graph output, the input takes its name, so the interface is unchanged;
    that cannot be done when the input is itself a graph input, output or initializer (two graph
    outputs would share one value), so such a node stays; so does one returning a value of an
    enclosing graph from a subgraph, which onnxruntime refuses.
    """
    source, result = node.inputs[0], node.outputs[0]
    graph = node.graph
    if source is None or graph is None:
        return False
    if result.is_graph_output() and (
        source.is_graph_input() or source.is_graph_output() or source.is_initializer() or source.graph is not graph
    ):
        return False
    was_graph_output = result.is_graph_output()
    ir.convenience.replace_all_uses_with(result, source, replace_graph_outputs=True)
    if was_graph_output:
        name, result.name = result.name, None
        source.name = name
        # The interface keeps its declared type and shape (the checker requires an output's shape).
        source.type, source.shape = source.type or result.type, source.shape or result.shape
    graph.remove(node, safe=True)
    return True


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
        removed += _bypass(node)
    return removed


def remove_identities(model: ir.Model) -> int:
    """Bypass Identity nodes in every graph and function body; return how many were removed.

    onnx-ir's IdentityEliminationPass would rename one graph output onto another when an Identity
    joins two of them; ``_bypass`` keeps that Identity.
    """
    removed = 0
    bodies: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    for body in bodies:
        for node in list(ir.traversal.RecursiveGraphIterator(body)):
            if node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
                continue
            if node.op_type == "Identity" or (node.op_type == "Cast" and _casts_to_own_type(node)):
                removed += _bypass(node)
    return removed


#: FusedGemm activations with a standard op, and the activation_* attributes each one reads.
_FUSED_ACTIVATIONS: dict[str, tuple[str, ...]] = {
    "Relu": (),
    "Sigmoid": (),
    "Tanh": (),
    "LeakyRelu": ("alpha",),
    "HardSigmoid": ("alpha", "beta"),
}


def _replace_node(graph: ir.Graph, node: ir.Node, nodes: list[ir.Node]) -> None:
    """Put ``nodes`` where ``node`` was, the last one's output taking over its (single) output."""
    graph.insert_before(node, nodes)
    replace_value(node.outputs[0], nodes[-1].outputs[0])
    graph.remove(node, safe=True)


def _unfused_gemm(node: ir.Node) -> list[ir.Node] | None:
    activation = node.attributes.get_string("activation", "")
    if activation not in _FUSED_ACTIVATIONS:
        return None
    kept = [attr for key, attr in node.attributes.items() if key in ("alpha", "beta", "transA", "transB")]
    gemm = ir.Node("", "Gemm", list(node.inputs), attributes=kept, name=node.name)
    extra = [
        ir.AttrFloat32(key, node.attributes.get_float(f"activation_{key}"))
        for key in _FUSED_ACTIVATIONS[activation]
        if f"activation_{key}" in node.attributes
    ]
    return [gemm, ir.Node("", activation, [gemm.outputs[0]], attributes=extra)]


def _transposed(graph: ir.Graph, value: ir.Value) -> tuple[ir.Value | None, list[ir.Node]]:
    """``value`` with its last two axes swapped: a transposed copy of a constant matrix read only
    here, else a Transpose node (None when the rank is unknown)."""
    array = constant_array(value)
    if array is not None and array.ndim == 2 and len(value.uses()) == 1 and value.is_initializer():
        copy = constant_value(unique_name(graph, f"{value.name}_t"), np.ascontiguousarray(array.T))
        graph.register_initializer(copy)
        return copy, []
    rank = len(value.shape) if value.shape is not None else (array.ndim if array is not None else None)
    if rank is None or rank < 2:
        return None, []
    perm = [*range(rank - 2), rank - 1, rank - 2]
    transpose = ir.Node("", "Transpose", [value], attributes=[ir.AttrInt64s("perm", perm)])
    return transpose.outputs[0], [transpose]


def _unfused_matmul(graph: ir.Graph, node: ir.Node) -> list[ir.Node] | None:
    attributes = node.attributes
    if attributes.get_int("transBatchA", 0) or attributes.get_int("transBatchB", 0):
        return None
    a, b = node.inputs[0], node.inputs[1]
    if a is None or b is None:
        return None
    nodes: list[ir.Node] = []
    operands = []
    for operand, flag in ((a, "transA"), (b, "transB")):
        if attributes.get_int(flag, 0):
            swapped, added = _transposed(graph, operand)
            if swapped is None:
                return None
            operand, nodes = swapped, nodes + added
        operands.append(operand)
    nodes.append(ir.Node("", "MatMul", operands, name=node.name))
    alpha = attributes.get_float("alpha", 1.0)
    if alpha != 1.0:
        dtype = a.dtype or ir.DataType.FLOAT
        scale = constant_value(unique_name(graph, f"{node.name or 'matmul'}_alpha"), np.array(alpha, dtype.numpy()))
        graph.register_initializer(scale)
        nodes.append(ir.Node("", "Mul", [nodes[-1].outputs[0], scale]))
    return nodes


#: Ops that only move data: a chain of them over constants is a weight in another layout.
_LAYOUT_OPS = frozenset({"Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Transpose", "Identity", "Flatten"})
#: Bytes a folded weight may add to the file (its new initializer's header, index constants kept).
_FOLD_SLACK_BYTES = 256


def _layout_chain(value: ir.Value) -> tuple[list[ir.Node], list[ir.Value]] | None:
    """The layout nodes computing ``value`` from constants and the constants they read, or None
    when anything else feeds it."""
    nodes: list[ir.Node] = []
    leaves: list[ir.Value] = []
    stack = [value]
    while stack:
        current = stack.pop()
        if constant_array(current) is not None:
            if current not in leaves:
                leaves.append(current)
            continue
        producer = current.producer()
        if producer is None or producer.op_type not in _LAYOUT_OPS or producer.domain not in ("", "ai.onnx"):
            return None
        if producer not in nodes:
            nodes.append(producer)
            stack += [item for item in producer.inputs if item is not None]
    return (nodes, leaves) if nodes else None


def _evaluate(model: ir.Model, nodes: list[ir.Node], leaves: list[ir.Value], value: ir.Value) -> np.ndarray:
    """``value`` computed by onnxruntime from a copy of ``nodes`` fed the constants."""
    order = {node: index for index, node in enumerate(model.graph)}
    copies: dict[ir.Value, ir.Value] = {}
    feeds: dict[str, np.ndarray] = {}
    for index, leaf in enumerate(leaves):
        array = constant_array(leaf)
        assert array is not None
        name = f"leaf{index}"
        copies[leaf] = ir.Value(
            name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape)
        )
        feeds[name] = array
    body: list[ir.Node] = []
    for node in sorted(nodes, key=order.__getitem__):
        inputs = [copies[item] if item is not None else None for item in node.inputs]
        copy = ir.Node(
            node.domain, node.op_type, inputs, attributes=list(node.attributes.values()), num_outputs=len(node.outputs)
        )
        for index, (old, new) in enumerate(zip(node.outputs, copy.outputs, strict=True)):
            new.name = f"{len(body)}_{index}"
            copies[old] = new
        body.append(copy)
    graph = ir.Graph(
        list(copies[leaf] for leaf in leaves), [copies[value]], nodes=body, opset_imports=dict(model.opset_imports)
    )
    session = runtime.make_session(ir.Model(graph, ir_version=model.ir_version), "disable")
    return np.asarray(session.run(None, feeds)[0])


def fold_weight_layouts(model: ir.Model) -> int:
    """Store as one initializer a weight an exporter computes from initializers by layout ops only
    (dynamo reorders a GRU's gates with Slice and Concat), so the passes see a weight; returns how
    many were folded.

    Only where the file does not grow: the folded weight may not take more bytes than the
    initializers that only its computation read (which then go). onnxruntime folds the same chain
    at load, so what runs is unchanged.
    """
    graph = model.graph
    folded = 0
    for node in list(graph):
        for slot in weight_slots(node):
            value = node.inputs[slot[0]] if slot[0] < len(node.inputs) else None
            # Initializers and graph inputs have no producer (and their data is not read here).
            if value is None or value.producer() is None:
                continue
            chain = _layout_chain(value)
            if chain is None:
                continue
            nodes, leaves = chain
            inside = set(nodes)
            if (
                any(
                    user not in inside
                    for member in nodes
                    for output in member.outputs
                    if output is not value
                    for user, _ in output.uses()
                )
                or value.is_graph_output()
            ):
                continue
            freed = sum(
                int(leaf.const_value.nbytes)
                for leaf in leaves
                if leaf.const_value is not None
                and leaf.is_initializer()
                and all(user in inside for user, _ in leaf.uses())
            )
            array = _evaluate(model, nodes, leaves, value)
            if array.nbytes > freed + _FOLD_SLACK_BYTES:
                continue
            weight = constant_value(unique_name(graph, value.name or "weight"), array)
            graph.register_initializer(weight)
            value.replace_all_uses_with(weight)
            folded += 1
    return folded


def unfuse_contrib_ops(model: ir.Model) -> int:
    """Standard ops for what onnxruntime fused when it saved an optimised model: ``FusedGemm`` (a
    Gemm and its activation) and ``FusedMatMul`` (a MatMul with transposed operands and a scale);
    return how many were replaced.

    The passes know the standard ops (a FusedGemm's weight would stay in float), and onnxruntime
    fuses them again when it loads the result. Batch-transposing FusedMatMuls and activations
    without a standard op stay.
    """
    replaced = 0
    graph = model.graph
    for node in list(graph):
        if node.domain != "com.microsoft" or len(node.outputs) != 1:
            continue
        if node.op_type == "FusedGemm":
            nodes = _unfused_gemm(node)
        elif node.op_type == "FusedMatMul":
            nodes = _unfused_matmul(graph, node)
        else:
            continue
        if nodes is not None:
            _replace_node(graph, node, nodes)
            replaced += 1
    return replaced


def _casts_to_own_type(node: ir.Node) -> bool:
    """A Cast to the type its input already has (skl2onnx casts float features to float)."""
    source = node.inputs[0]
    known = source.dtype if source is not None else None
    return known is not None and node.attributes.get_int("to", 0) == known.value


#: Ops whose input 1 is gather indices: int32 or int64, by their type constraint.
# GatherND (and ScatterND) take int64 indices only.
_INDEX_INPUTS = frozenset({"Gather", "GatherElements"})
_INT32 = np.iinfo(np.int32)


def narrow_indices(model: ir.Model) -> int:
    """Store int64 gather indices that fit int32 as int32 (half the bytes; both are allowed).
    Returns the number of initializers narrowed."""
    narrowed = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or tensor.dtype != ir.DataType.INT64 or value.is_graph_input() or value.is_graph_output():
                continue
            uses = value.uses()
            if not uses or any(
                node.op_type not in _INDEX_INPUTS or node.domain not in ("", "ai.onnx") or index != 1
                for node, index in uses
            ):
                continue
            array = tensor.numpy()
            if array.size and (array.min() < _INT32.min or array.max() > _INT32.max):
                continue
            value.const_value = ir.tensor(array.astype(np.int32), name=value.name)
            value.dtype = ir.DataType.INT32
            narrowed += 1
    return narrowed


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
                tensor = value.const_value
                assert tensor is not None  # grouped above
                digest = _full_digest(tensor)
                if digest in kept:
                    value.replace_all_uses_with(kept[digest])
                    assert value.name is not None
                    graph.initializers.pop(value.name)
                    merged += 1
                    saved += tensor.nbytes
                else:
                    kept[digest] = value
    return merged, saved


def merge_identical_constants(model: ir.Model) -> int:
    """Point every use of a Constant node's output at the first Constant node with the same tensor
    (exporters write one axes or shape constant per Unsqueeze or Reshape); return the count merged.
    The first comes before every later one, so before all of their uses."""
    merged = 0
    for graph in model.graphs():
        kept: dict[tuple[Any, ...], ir.Value] = {}
        for node in list(graph):
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or list(node.attributes) != ["value"]:
                continue
            output = node.outputs[0]
            tensor = node.attributes["value"].as_tensor()
            if output.is_graph_output() or tensor.nbytes > _CONSTANT_MERGE_MAX_BYTES:
                continue
            key = (tensor.dtype, tuple(tensor.shape), tensor.tobytes())
            if key in kept:
                output.replace_all_uses_with(kept[key])
                graph.remove(node, safe=True)
                merged += 1
            else:
                kept[key] = output
    return merged


#: Constant nodes are small (shapes, axes, indices): larger tensors are initializers.
_CONSTANT_MERGE_MAX_BYTES = 1 << 16


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
    data: bytes | memoryview
    if tensor.dtype == ir.DataType.STRING:
        data = b"\0".join(tensor.string_data())  # type: ignore[attr-defined]
    else:
        # Sub-byte types (int4, ...) as their packed bytes, so ranges match ``nbytes``.
        data = (
            tensor.tobytes()
            if tensor.dtype.bitwidth < 8
            else memoryview(np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        )
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


def drop_initializer_types(model: ir.Model) -> int:
    """Clear the declared type and shape of initializers outside the graph's interface: the tensor
    carries both, and onnx-ir would write them again as a value_info entry each (tf2onnx's files
    have none: a lossless cleanup made them 1-2% larger). Returns how many were cleared."""
    cleared = 0
    for graph in model.graphs():
        interface = {*graph.inputs, *graph.outputs}
        for value in graph.initializers.values():
            if value not in interface and (value.type is not None or value.shape is not None):
                value.type = None
                value.shape = None
                cleared += 1
    return cleared


def constant_initializer_inputs(model: ir.Model) -> int:
    """Drop the initializers from the graph inputs when every one of them is listed there.

    Old exporters listed every weight as a graph input with a default (``torch.onnx.export(...,
    keep_initializers_as_inputs=True)``, the default below opset 9): a caller could feed another
    value, so no pass may rewrite them. A model that lists only some initializers means them as
    overridable defaults and keeps them; IR version 3 requires the listing and keeps it too.
    """
    initializers = model.graph.initializers
    listed = [value for value in model.graph.inputs if value.name in initializers]
    if model.ir_version < 4 or not listed or len(listed) < len(initializers):
        return 0
    for value in listed:
        model.graph.inputs.remove(value)
    return len(listed)


def strip_metadata(model: ir.Model) -> int:
    """Drop what no runtime reads: doc strings, node and value metadata, intermediate value_info,
    the exporter's producer name and version.

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
        initializers = graph.initializers.values() if isinstance(graph, ir.Graph) else ()
        # A dynamo export keeps metadata on its inputs and parameters too (about 100 bytes each),
        # which onnx-ir writes back as value_info entries.
        for value in [*interface, *initializers]:
            if value.metadata_props or value.doc_string:
                value.metadata_props.clear()
                value.doc_string = None
                cleared += 1
            tensor = value.const_value
            if tensor is not None and (tensor.metadata_props or tensor.doc_string):
                tensor.metadata_props.clear()
                tensor.doc_string = None
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
    if model.producer_name or model.producer_version:  # the exporter's name and version
        model.producer_name = model.producer_version = None
        cleared += 1
    return cleared


#: The shared Cast, Split and sizes cost about 60 bytes: from this many vectors packing pays.
PACK_MIN_VECTORS = 4


def pack_cast_vectors(model: ir.Model) -> int:
    """Constant vectors each read by a Cast of their own (float16 biases and scales cast back to
    float) become one vector, one Cast and one Split: a Cast node and an initializer header cost
    about 33 bytes a vector, a Split output and its size about 11. Folded back at load. Returns the
    number of vectors packed."""
    graph = model.graph
    if model.opset_imports.get("", 1) < SPLIT_INPUT_OPSET or not len(graph):
        return 0
    groups: dict[tuple[ir.DataType, int], list[ir.Node]] = defaultdict(list)
    for node in graph:
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
            continue
        source = node.inputs[0]
        if source is None or not source.is_initializer() or source.is_graph_input() or source.is_graph_output():
            continue
        tensor = source.const_value
        if tensor is None or len(tensor.shape) != 1 or len(source.uses()) != 1 or node.outputs[0].is_graph_output():
            continue
        if not tensor.dtype.is_floating_point():
            continue
        groups[(tensor.dtype, node.attributes.get_int("to", 0))].append(node)
    packed = 0
    first = next(iter(graph))
    for (dtype, to), casts in groups.items():
        if len(casts) < PACK_MIN_VECTORS:
            continue
        sources = [source for cast in casts if (source := cast.inputs[0]) is not None]
        arrays = [source.const_value.numpy() for source in sources]  # type: ignore[union-attr]
        stored = constant_value(unique_name(graph, "packed"), np.concatenate(arrays), dtype)
        sizes = constant_value(unique_name(graph, "packed_sizes"), np.array([a.size for a in arrays], np.int64))
        graph.register_initializer(stored)
        graph.register_initializer(sizes)
        cast = ir.node("Cast", [stored], attributes={"to": to})
        split = ir.node("Split", [cast.outputs[0], sizes], num_outputs=len(casts))
        graph.insert_before(first, [cast, split])
        for old, piece, source in zip(casts, split.outputs, sources, strict=True):
            if old.outputs[0].type is not None:  # a shape without a type is not written (onnx-ir warns)
                piece.type, piece.shape = old.outputs[0].type, source.shape
            old.outputs[0].replace_all_uses_with(piece)
            graph.remove(old, safe=True)
            graph.initializers.pop(source.name or "")
        packed += len(casts)
    return packed


def triangle_of(mask: np.ndarray) -> tuple[bool, int] | None:
    """``(upper, k)`` when the 2-D boolean ``mask`` is ``Trilu(ones, k, upper)`` (a causal attention
    mask: true above or below a diagonal), else None."""
    if mask.ndim != 2 or mask.dtype != np.bool_ or not mask.any() or mask.all():
        return None
    rows, columns = mask.shape
    offset = np.arange(columns)[None, :] - np.arange(rows)[:, None]
    upper_k = int(offset[mask].min())
    if np.array_equal(mask, offset >= upper_k):
        return True, upper_k
    lower_k = int(offset[mask].max())
    if np.array_equal(mask, offset <= lower_k):
        return False, lower_k
    return None


#: Below this many values a mask costs about what the nodes that build it do.
MASK_MIN_ELEMENTS = 128
_TRILU_OPSET = 14


def _triangle_levels(array: np.ndarray) -> tuple[bool, int, np.ndarray | None, np.ndarray | None] | None:
    """``(upper, k, inside, outside)`` when ``array``, past leading axes of one, is a triangle: a
    boolean mask (``inside``/``outside`` None), or a tensor of two values, ``inside`` on the
    triangle and ``outside`` off it (an additive attention mask of 0 and -inf)."""
    if array.ndim < 2 or any(dim != 1 for dim in array.shape[:-2]):
        return None
    square = array.reshape(array.shape[-2:])
    if square.dtype == np.bool_:
        triangle = triangle_of(square)
        return None if triangle is None else (*triangle, None, None)
    if square.dtype.kind not in "fiu" or (square.dtype.kind == "f" and np.isnan(square).any()):
        return None
    levels = np.unique(square)
    if levels.size != 2:
        return None
    for inside, outside in (levels, levels[::-1]):
        triangle = triangle_of(square == inside)
        if triangle is not None:
            return (*triangle, np.array(inside, square.dtype), np.array(outside, square.dtype))
    return None


def compact_masks(model: ir.Model) -> int:
    """Store triangular constants (causal attention masks, ``T * T`` values) as
    ``Trilu(Expand(true, [T, T]), k)``, and two-valued ones (PyTorch's additive mask of 0 and -inf)
    as a ``Where`` of that between the two values: about 100 bytes at any ``T``, folded back by the
    runtime at load. Returns the number of masks rewritten."""
    if model.opset_imports.get("", 1) < _TRILU_OPSET:
        return 0
    rewritten = 0
    graph = model.graph
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor is None or tensor.size < MASK_MIN_ELEMENTS:
            continue
        if value.is_graph_input() or value.is_graph_output() or not value.uses():
            continue
        if any(node.graph is not graph for node, _ in value.uses()):
            continue
        found = _triangle_levels(tensor.numpy())
        if found is None:
            continue
        upper, k, inside, outside = found
        name = value.name or "mask"
        constants = [
            constant_value(unique_name(graph, f"{name}_true"), np.array(True)),
            constant_value(unique_name(graph, f"{name}_shape"), np.array(tensor.shape.numpy(), np.int64)),
            constant_value(unique_name(graph, f"{name}_k"), np.array(k, np.int64)),
        ]
        nodes = [ir.node("Expand", constants[:2])]
        nodes.append(ir.node("Trilu", [nodes[0].outputs[0], constants[2]], attributes={} if upper else {"upper": 0}))
        if inside is not None and outside is not None:
            constants += [
                constant_value(unique_name(graph, f"{name}_inside"), inside),
                constant_value(unique_name(graph, f"{name}_outside"), outside),
            ]
            nodes.append(ir.node("Where", [nodes[1].outputs[0], *constants[3:]]))
        for constant in constants:
            graph.register_initializer(constant)
        users = {node for node, _ in value.uses()}
        graph.insert_before(next(node for node in graph if node in users), nodes)
        mask = nodes[-1].outputs[0]
        mask.name = unique_name(graph, f"{name}_trilu")
        mask.type, mask.shape = ir.TensorType(tensor.dtype), value.shape
        value.replace_all_uses_with(mask)
        graph.initializers.pop(name)
        rewritten += 1
    return rewritten


def _reshapes_to_vector(value: ir.Value) -> bool:
    """Every use of ``value`` is a Reshape to the constant shape ``[-1]`` (so its own shape is
    irrelevant) and it is not a graph output."""
    uses = value.uses()
    if not uses or value.is_graph_output():
        return False
    for node, index in uses:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or index != 0:
            return False
        shape = constant_array(node.inputs[1] if len(node.inputs) > 1 else None)
        if shape is None or shape.tolist() != [-1]:
            return False
    return True


def _two_scores(argmax: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    """``(a, b)`` when ``argmax`` picks between ``Concat(a, b)`` of width one each along its axis
    (a binary classifier's two class probabilities), keeping that axis, first index on ties."""
    source = argmax.inputs[0]
    concat = source.producer() if source is not None else None
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2 or source is None:
        return None
    if argmax.attributes.get_int("keepdims", 1) != 1 or argmax.attributes.get_int("select_last_index", 0) != 0:
        return None
    shape = source.shape
    if shape is None or not all(isinstance(dim, int) for dim in shape.dims[1:]) or len(shape) < 1:
        return None
    rank = len(shape)
    axis = argmax.attributes.get_int("axis", 0) % rank
    if concat.attributes.get_int("axis", 0) % rank != axis or axis != rank - 1 or shape[axis] != 2:
        return None
    first, second = concat.inputs
    if first is None or second is None or 1 not in (_last_dim(first), _last_dim(second)):
        return None  # widths 1 + 1, not 2 + 0
    return first, second


def _reshaped_label_type(result: ir.Value) -> ir.DataType | None:
    """The integer type every reshaped label is cast to, when each Reshape's only use is that Cast
    (scikit-learn casts int32 classes to int64): the label can be made in it directly."""
    types = set()
    for reshape, _ in result.uses():
        reshaped = reshape.outputs[0]
        if not reshaped.uses() or reshaped.is_graph_output():
            return None
        for cast, _ in reshaped.uses():
            if cast.op_type != "Cast" or cast.domain not in ("", "ai.onnx"):
                return None
            types.add(cast.attributes.get_int("to", 0))
    if len(types) != 1:
        return None
    dtype = ir.DataType(types.pop())
    return dtype if np.issubdtype(dtype.numpy(), np.integer) else None


def _is_one(value: ir.Value | None, rank: int) -> bool:
    """A floating-point constant 1 that broadcasts to no more than ``rank`` axes of size 1."""
    array = constant_array(value)
    return (
        array is not None and array.dtype.kind == "f" and array.size == 1 and array.ndim <= rank and array.item() == 1
    )


def complementary_sigmoids(model: ir.Model) -> int:
    """A binary classifier's probabilities ``Concat(1 - Sigmoid(z), Sigmoid(z))`` (scikit-learn's
    MLPClassifier), ``z`` one column of a linear layer, become ``Sigmoid`` of that layer made two
    columns wide, ``[-w, w]`` and ``[-b, b]``: ``Sigmoid(-z)`` is ``1 - Sigmoid(z)``, so the Sub and
    the Concat go, and the label is then an ``ArgMax`` of the probabilities as exported
    (scikit-learn MLP batch 512 182 -> 176 µs, one row 9.2 -> 8.0 µs). Equal to float32 rounding
    (up to 6e-8 on the probabilities; a label differs only where both round to 0.5). Runs before
    ``simplify_class_labels``. Returns the pairs rewritten."""
    graph = model.graph
    candidates: list[tuple[ir.Node, ir.Node, ir.Node, ir.Value]] = []
    for concat in graph:
        if concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx") or len(concat.inputs) != 2:
            continue
        complement, score = concat.inputs
        sub = complement.producer() if complement is not None else None
        sigmoid = score.producer() if score is not None else None
        if sub is None or sigmoid is None or sub.op_type != "Sub" or sigmoid.op_type != "Sigmoid":
            continue
        if sub.domain not in ("", "ai.onnx") or sigmoid.domain not in ("", "ai.onnx") or sub.inputs[1] is not score:
            continue
        assert complement is not None and score is not None
        if {node for node, _ in complement.uses()} != {concat} or complement.is_graph_output():
            continue
        if {node for node, _ in score.uses()} != {sub, concat} or score.is_graph_output():
            continue
        logit = sigmoid.inputs[0]
        if logit is None or len(logit.uses()) != 1 or logit.is_graph_output():
            continue
        candidates.append((concat, sub, sigmoid, logit))
    if not candidates:
        return 0
    inferred = inferred_shapes(model, [concat.outputs[0] for concat, *_ in candidates])
    # One output column, its bias (Gemm's C, or the Add that alone reads a MatMul) one value.
    layers = {
        layer.output: layer
        for layer in linear_layers(model)
        if layer.d_out == 1 and (layer.bias is None or layer.bias.const_value.size == 1)  # type: ignore[union-attr]
    }
    rewritten = 0
    for concat, sub, sigmoid, logit in candidates:
        shape = inferred[concat.outputs[0]][0]
        if shape is None or len(shape) < 1 or shape[-1] != 2:
            continue
        rank = len(shape)
        layer = layers.get(logit)
        if concat.attributes.get_int("axis", 0) % rank != rank - 1 or layer is None or not _is_one(sub.inputs[0], rank):
            continue
        node, weight = layer.node, layer.weight.const_value.numpy()  # type: ignore[union-attr]
        name = layer.weight.name or "weight"
        both = constant_value(unique_name(graph, f"{name}_both"), np.concatenate([-weight, weight], layer.out_axis))
        graph.register_initializer(both)
        node.replace_input_with(1, both)
        if layer.bias is not None:
            holder = layer.bias_node or node
            bias = layer.bias.const_value.numpy()  # type: ignore[union-attr]
            # The bias keeps the rank the exporter gave it: [1, 1] becomes [1, 2].
            paired = np.array([-bias.item(), bias.item()], bias.dtype).reshape(*bias.shape[:-1], 2)
            pair = constant_value(unique_name(graph, f"{name}_both_bias"), paired)
            graph.register_initializer(pair)
            holder.replace_input_with(next(i for i, v in enumerate(holder.inputs) if v is layer.bias), pair)
        for value in {node.outputs[0], logit}:
            if value.shape is not None and len(value.shape) >= 1:
                value.shape = ir.Shape([*value.shape[:-1], 2])
        probabilities = ir.node("Sigmoid", [logit])
        graph.insert_before(concat, probabilities)
        replace_value(concat.outputs[0], probabilities.outputs[0])
        graph.remove([concat, sub, sigmoid], safe=True)
        rewritten += 1
    return rewritten


def simplify_class_labels(model: ir.Model) -> int:
    """Compute a classifier's label without ``ai.onnx.ml.ArrayFeatureExtractor`` (which TensorRT and
    other runtimes lack, and which onnxruntime runs as a kernel of its own).

    scikit-learn exports ``label = Reshape(ArrayFeatureExtractor(classes, ArgMax(probabilities)), [-1])``.
    With classes ``0..C-1`` the extractor returns the index itself; for two classes whose scores are
    concatenated, ``ArgMax`` is ``Greater(second, first)`` (the first index on ties, as ArgMax
    picks), and other numeric classes are a ``Where`` between them. A label cast to another integer
    type after its Reshape is made in that type (the Cast then goes as one to its own type). Exact.
    Returns the labels rewritten."""
    rewritten = 0
    graph = model.graph
    for node in list(graph):
        if node.op_type != "ArrayFeatureExtractor" or node.domain != "ai.onnx.ml" or len(node.inputs) != 2:
            continue
        classes = constant_array(node.inputs[0])
        index, result = node.inputs[1], node.outputs[0]
        argmax = index.producer() if index is not None else None
        if classes is None or classes.ndim != 1 or classes.dtype.kind not in "iub" or argmax is None:
            continue
        if argmax.op_type != "ArgMax" or argmax.domain not in ("", "ai.onnx") or not _reshapes_to_vector(result):
            continue
        dtype = ir.DataType.from_numpy(classes.dtype)
        final = _reshaped_label_type(result)
        if final is not None and np.array_equal(classes.astype(final.numpy()), classes):
            dtype, classes = final, classes.astype(final.numpy())
            for reshape, _ in result.uses():
                reshape.outputs[0].type = ir.TensorType(dtype)
        scores = _two_scores(argmax) if len(classes) == 2 else None
        if scores is not None:
            greater = ir.node("Greater", [scores[1], scores[0]])
            if classes.tolist() == [0, 1]:
                new_nodes = [greater, ir.node("Cast", greater.outputs, attributes={"to": dtype})]
            else:
                name = unique_name(graph, "class")
                picks = [constant_value(unique_name(graph, f"{name}_{k}"), classes[k]) for k in (1, 0)]
                for pick in picks:
                    graph.register_initializer(pick)
                new_nodes = [greater, ir.node("Where", [greater.outputs[0], *picks])]
        elif classes.tolist() == list(range(len(classes))):
            # ArgMax gives int64: a label of that type is its index as it is.
            new_nodes = [] if dtype == ir.DataType.INT64 else [ir.node("Cast", [index], attributes={"to": dtype})]
        else:
            continue
        if new_nodes:
            graph.insert_before(node, new_nodes)
            label = new_nodes[-1].outputs[0]
            label.name = unique_name(graph, f"{result.name or 'label'}_simplified")
        else:
            assert index is not None  # it has an ArgMax producer
            label = index
        result.replace_all_uses_with(label)
        graph.remove(node, safe=True)
        rewritten += 1
    return rewritten


def drop_default_attributes(model: ir.Model) -> int:
    """Remove attributes whose value equals the operator schema's default (``alpha=1`` on a Gemm,
    ``allowzero=0`` on a Reshape), or that say nothing about this node (``allowzero=1`` where the
    target holds no 0): the runtime computes the same either way. Returns how many."""
    dropped = 0
    opsets = model.graph.opset_imports
    nodes = [*ir.traversal.RecursiveGraphIterator(model.graph)]
    nodes += [node for function in model.functions.values() for node in ir.traversal.RecursiveGraphIterator(function)]
    for node in nodes:
        version = node.version if node.version is not None else opsets.get(node.domain)
        if version is None:
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, version, domain=node.domain)
        except onnx.defs.SchemaError:
            continue
        for name, attr in list(node.attributes.items()):
            definition = schema.attributes.get(name)
            if definition is None or definition.required or attr.is_ref():
                continue
            default = definition.default_value
            if default is None or default.type == onnx.AttributeProto.UNDEFINED:
                continue
            if ir.serde.serialize_attribute(attr).SerializeToString() == default.SerializeToString():
                del node.attributes[name]
                dropped += 1
    return dropped + _drop_last_axis_attributes(model) + _drop_idle_allowzero(model)


def _drop_idle_allowzero(model: ir.Model) -> int:
    """``allowzero=1`` on a Reshape whose constant target holds no 0 (what dynamo writes on every
    view): it only says what a 0 in the target means."""
    dropped = 0
    for node in model.graph:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or "allowzero" not in node.attributes:
            continue
        target = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if target is not None and bool(np.all(target != 0)):
            del node.attributes["allowzero"]
            dropped += 1
    return dropped


#: Ops whose ``axis`` defaults to the last axis from opset 13 (before, 1 with 2-D coercion).
_LAST_AXIS_DEFAULT = frozenset({"Softmax", "LogSoftmax", "Hardmax"})


def _drop_last_axis_attributes(model: ir.Model) -> int:
    """Remove ``axis`` from a Softmax (LogSoftmax, Hardmax) of opset 13+ when it names the last
    axis (TorchScript writes ``axis=1`` on a [batch, n] input): the default is -1."""
    opset = model.graph.opset_imports.get("", 1)
    nodes = [
        node
        for node in model.graph
        if node.op_type in _LAST_AXIS_DEFAULT
        and node.domain in ("", "ai.onnx")
        and (node.version or opset) >= 13
        and node.attributes.get_int("axis", -1) >= 0
        and node.inputs[0] is not None
    ]
    if not nodes:
        return 0
    inferred = inferred_shapes(model, [node.inputs[0] for node in nodes])  # type: ignore[misc]
    dropped = 0
    for node in nodes:
        shape = inferred[node.inputs[0]][0]  # type: ignore[index]
        if shape is not None and node.attributes.get_int("axis") == len(shape) - 1:
            del node.attributes["axis"]
            dropped += 1
    return dropped


def _linear_weights(node: ir.Node) -> tuple[ir.Value, int, ir.Value | None] | None:
    """(weight, output-channel axis, bias) of a Gemm/MatMul with constant 2-D weight, else None."""
    if node.op_type == "Gemm" and node.domain in ("", "ai.onnx"):
        if node.attributes.get_int("transA", 0) or node.attributes.get_float("alpha", 1.0) != 1.0:
            return None
        if node.attributes.get_float("beta", 1.0) != 1.0:
            return None
        axis = 0 if node.attributes.get_int("transB", 0) else 1
        bias = node.inputs[2] if len(node.inputs) > 2 else None
    elif node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
        axis, bias = 1, None
    else:
        return None
    weight = node.inputs[1]
    if not is_constant_initializer(weight) or len(weight.const_value.shape) != 2:  # type: ignore[union-attr]
        return None
    if bias is not None and not is_constant_initializer(bias):
        return None
    assert weight is not None  # is_constant_initializer checked it
    return weight, axis, bias


def _channel_vector(value: ir.Value | None, channels: int) -> np.ndarray | None:
    """A constant that acts per output channel on ``[..., channels]``: scalar, [C] or [1, C]."""
    if value is None:
        return None
    array = constant_array(value)
    if array is None or array.dtype != np.float32:
        return None
    if array.size == 1:
        return np.full(channels, array.reshape(()), np.float32)
    if array.size == channels and array.shape[-1] == channels and array.ndim <= 2:
        return array.reshape(channels)
    return None


def _affine_after(node: ir.Node, channels: int, rank: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """``y = x * scale + shift`` per channel (last axis) for a BatchNormalization (rank 2 only, where
    its channel axis 1 is the last one), or a Mul or Add by a constant."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "BatchNormalization" and rank == 2:
        if len(node.outputs) > 1 and any(out.uses() for out in node.outputs[1:]):
            return None
        if node.attributes.get_int("training_mode", 0):
            return None
        params = [_channel_vector(value, channels) for value in node.inputs[1:5]]
        if any(param is None for param in params):
            return None
        gamma, beta, mean, var = (param.astype(np.float64) for param in params)  # type: ignore[union-attr]
        factor = gamma / np.sqrt(var + node.attributes.get_float("epsilon", 1e-5))
        return factor, beta - mean * factor
    if node.op_type in ("Mul", "Add") and len(node.inputs) == 2:
        constant = next((v for v in node.inputs if v is not None and constant_array(v) is not None), None)
        vector = _channel_vector(constant, channels)
        if vector is None:
            return None
        ones, zeros = np.ones(channels), np.zeros(channels)
        return (vector.astype(np.float64), zeros) if node.op_type == "Mul" else (ones, vector.astype(np.float64))
    return None


def fold_affine_into_linear(model: ir.Model) -> int:
    """Fold per-channel affine ops after a linear layer (inference BatchNormalization, constant Mul/Add
    such as tf2onnx's folded batch norm or a separate bias Add) into its weight and bias.

    Exact algebra (up to float rounding): ``(x W + b) * s + t = x (W * s) + (b * s + t)``. Returns the
    number of nodes folded away. Only 2-D outputs ([rows, channels]) are folded, where the channel
    axis is unambiguous.
    """
    folded = 0
    graph = model.graph
    for node in list(graph):
        found = _linear_weights(node)
        if found is None or node.graph is None:
            continue
        weight, axis, bias = found
        output = node.outputs[0]
        source = node.inputs[0]
        rank = 2 if node.op_type == "Gemm" else None  # Gemm's input and output are always 2-D
        if rank is None and source is not None and source.shape is not None:
            rank = len(source.shape)
        channels = int(weight.const_value.shape.numpy()[axis])  # type: ignore[union-attr]
        b = bias.const_value.numpy().astype(np.float64).reshape(-1) if bias is not None else np.zeros(channels)  # type: ignore[union-attr]
        if b.size != channels:
            continue
        # The weight is read (in float64) only once an affine op to fold is found.
        total_scale = np.ones(channels)
        changed = 0
        bias_rank = 1
        while len(output.uses()) == 1 and not output.is_graph_output():
            ((consumer, _),) = output.uses()
            affine = _affine_after(consumer, channels, rank)
            if affine is None:
                break
            if consumer.op_type in ("Add", "Mul"):  # the output has at least this constant's rank
                constants = [array for array in map(constant_array, consumer.inputs) if array is not None]
                bias_rank = max([bias_rank, *(array.ndim for array in constants)])
            scale, shift = affine
            total_scale = total_scale * scale
            b = b * scale + shift
            # A graph output keeps its name, type and shape (the checker requires the type).
            replace_value(consumer.outputs[0], output)
            graph.remove(consumer, safe=True)
            changed += 1
        if not changed:
            continue
        folded += changed
        w = weight.const_value.numpy().astype(np.float64)  # type: ignore[union-attr]
        w = w * (total_scale[None, :] if axis == 1 else total_scale[:, None])
        _rewrite_linear(graph, node, weight, w, b, rank, bias_rank)
    return folded


def _rewrite_linear(
    graph: ir.Graph,
    node: ir.Node,
    weight: ir.Value,
    w: np.ndarray,
    b: np.ndarray,
    rank: int | None,
    bias_rank: int = 1,
) -> None:
    """Give linear ``node`` the weight ``w`` and bias ``b`` as new initializers (a MatMul becomes a
    Gemm on 2-D inputs, else MatMul + Add, the bias of rank ``bias_rank``)."""
    output = node.outputs[0]
    new_weight = constant_value(unique_name(graph, f"{weight.name}_folded"), w.astype(np.float32))
    if node.op_type == "MatMul" and rank != 2 and bias_rank > 1 and b.size == 1:
        # One output column: onnxruntime adds a [1] bias to [N, 1] by its scalar path, twice as
        # slow as the [1, 1] the exporter wrote (3 us of a 65 us batch of 512 on the skl2onnx MLP).
        b = b.reshape((1,) * bias_rank)
    new_bias = constant_value(unique_name(graph, f"{new_weight.name}_bias"), b.astype(np.float32))
    graph.register_initializer(new_weight)
    graph.register_initializer(new_bias)
    if node.op_type == "MatMul":
        # Gemm needs a 2-D input; otherwise the folded bias follows as one Add.
        if rank == 2:
            replacement = ir.node("Gemm", [node.inputs[0], new_weight, new_bias], name=node.name)
            added = [replacement]
        else:
            matmul = ir.node("MatMul", [node.inputs[0], new_weight], name=node.name)
            replacement = ir.node("Add", [matmul.outputs[0], new_bias])
            added = [matmul, replacement]
        graph.insert_before(node, added)
        ir.convenience.replace_all_uses_with(output, replacement.outputs[0], replace_graph_outputs=True)
        replacement.outputs[0].name, output.name = output.name, None
        replacement.outputs[0].type, replacement.outputs[0].shape = output.type, output.shape
        graph.remove(node, safe=True)
    else:
        node.replace_input_with(1, new_weight)
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        node.replace_input_with(2, new_bias)


def _private_initializer(value: ir.Value | None) -> np.ndarray | None:
    """The array of a float initializer that one node alone reads, else None."""
    if value is None or not value.is_initializer() or value.is_graph_input() or value.is_graph_output():
        return None
    if len(value.uses()) != 1 or value.const_value is None or not value.const_value.dtype.is_floating_point():
        return None
    return value.const_value.numpy()


def merge_constant_adds(model: ir.Model) -> int:
    """``(x + a) + b`` with constants ``a`` and ``b`` becomes ``x + (a + b)``: a bias followed by a
    shift that folding moved next to it (tf2onnx's batch norm after an activation, folded forward
    into the next layer) is one vector and one node. Returns the number of Adds removed."""
    merged = 0
    graph = model.graph
    for node in list(graph):
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        for index in (0, 1):
            inner_value = node.inputs[index]
            inner = inner_value.producer() if inner_value is not None else None
            if inner is None or inner.op_type != "Add" or inner.domain not in ("", "ai.onnx") or len(inner.inputs) != 2:
                continue
            assert inner_value is not None
            if len(inner_value.uses()) != 1 or inner_value.is_graph_output():
                continue
            second = _private_initializer(node.inputs[1 - index])
            found = next(
                ((i, array) for i in (0, 1) if (array := _private_initializer(inner.inputs[i])) is not None), None
            )
            if second is None or found is None:
                continue
            constant_index, first = found
            first_value, x = inner.inputs[constant_index], inner.inputs[1 - constant_index]
            if first.dtype != second.dtype or x is None or first_value is None:
                continue
            target = node.inputs[1 - index]
            assert target is not None
            set_constant(target, (first.astype(np.float64) + second.astype(np.float64)).astype(first.dtype))
            node.replace_input_with(index, x)
            graph.remove(inner, safe=True)
            graph.initializers.pop(first_value.name or "")
            merged += 1
            break
    return merged


def fold_affine_into_next_linear(model: ir.Model) -> int:
    """Fold per-channel affine ops whose only consumer is a linear layer into that layer's weight and
    bias: tf2onnx writes a batch norm after an activation as Mul + Add in front of the next Dense.

    Exact algebra (up to float rounding): ``(x * s + t) W + b = x (diag(s) W) + (t W + b)``. Returns
    the number of nodes folded away.
    """
    folded = 0
    graph = model.graph
    for node in list(graph):
        found = _linear_weights(node)
        if found is None or node.graph is None or node.inputs[0] is None:
            continue
        weight, axis, bias = found
        inputs = int(weight.const_value.shape.numpy()[1 - axis])  # type: ignore[union-attr]
        rank = 2 if node.op_type == "Gemm" else None
        source = node.inputs[0]
        if rank is None and source.shape is not None:
            rank = len(source.shape)
        # input = scale * source + shift, walking back through affine producers used only here
        scale, shift = np.ones(inputs), np.zeros(inputs)
        removed: list[ir.Node] = []
        while True:
            producer = source.producer()
            if producer is None or len(source.uses()) != 1 or source.is_graph_output():
                break
            affine = _affine_after(producer, inputs, rank)
            upstream = _variable_input(producer)
            # The data input must already be [..., inputs]: a [rows, 1] input broadcast by a
            # [inputs] constant cannot move past the matrix product.
            if affine is None or upstream is None or _last_dim(upstream) != inputs:
                break
            factor, offset = affine
            scale, shift = scale * factor, scale * offset + shift
            removed.append(producer)
            source = upstream
        if not removed:
            continue
        w = weight.const_value.numpy().astype(np.float64)  # type: ignore[union-attr]
        channels = w.shape[axis]
        b = bias.const_value.numpy().astype(np.float64).reshape(-1) if bias is not None else np.zeros(channels)  # type: ignore[union-attr]
        if b.size != channels:
            continue
        b = b + (shift @ w if axis == 1 else w @ shift)
        w = w * (scale[:, None] if axis == 1 else scale[None, :])
        node.replace_input_with(0, source)
        graph.remove(removed, safe=True)
        folded += len(removed)
        _rewrite_linear(graph, node, weight, w, b, rank)
    return folded


@dataclass
class _ParallelLinear:
    """One linear layer reading a shared input: its nodes (the MatMul's bias Add too, if any), the
    stored weight and its output-channel axis, the bias, and the value carrying the biased output."""

    nodes: list[ir.Node]
    stored: ir.Value
    axis: int
    bias: np.ndarray | None
    output: ir.Value

    @property
    def shape(self) -> tuple[int, int]:
        """``[K, N]``."""
        rows, columns = (int(d) for d in self.stored.const_value.shape.numpy())  # type: ignore[union-attr]
        return (rows, columns) if self.axis == 1 else (columns, rows)

    @property
    def nbytes(self) -> int:
        return int(self.stored.const_value.nbytes)  # type: ignore[union-attr]

    def weight(self) -> np.ndarray:
        """The weight as ``[K, N]``, read now (a large weight is read only once a rewrite needs it)."""
        array = self.stored.const_value.numpy()  # type: ignore[union-attr]
        return array if self.axis == 1 else array.T


#: Rewrites that concatenate or rescale weights make new in-memory tensors; above this a layer is
#: left as it is, so a multi-gigabyte model is not copied for a small speed-up.
REWRITE_MAX_BYTES = 64 << 20


def _parallel_member(node: ir.Node) -> _ParallelLinear | None:
    found = _linear_weights(node)
    if found is None or node.inputs[0] is None:
        return None
    weight, axis, bias_value = found
    if weight.const_value.dtype != ir.DataType.FLOAT:  # type: ignore[union-attr]
        return None
    member = _ParallelLinear([node], weight, axis, None, node.outputs[0])
    channels = member.shape[1]
    nodes, output = [node], node.outputs[0]
    bias = None
    if bias_value is not None:
        bias = _channel_vector(bias_value, channels)
        if bias is None:
            return None
    elif node.op_type == "MatMul" and len(output.uses()) == 1 and not output.is_graph_output():
        ((consumer, _),) = output.uses()
        if consumer.op_type == "Add" and consumer.domain in ("", "ai.onnx") and len(consumer.inputs) == 2:
            other = consumer.inputs[1] if consumer.inputs[0] is output else consumer.inputs[0]
            array = constant_array(other)
            if array is not None and array.ndim <= 1 and array.dtype == np.float32:
                bias = _channel_vector(other, channels)
                if bias is not None:
                    nodes.append(consumer)
                    output = consumer.outputs[0]
    member.nodes, member.bias, member.output = nodes, bias, output
    return member


def fuse_parallel_linear(model: ir.Model, sources: Collection[ir.Value] | None = None) -> int:
    """Make linear layers that read the same input one wider layer followed by a Split: a
    transformer's query, key and value projections become one product (one weight read, one
    activation quantization when it runs as an integer kernel). With ``sources``, only layers
    reading one of those values.

    Exact algebra: ``[x W1 + b1, x W2 + b2] = x [W1 W2] + [b1 b2]``. Returns the number of layers
    fused away.
    """
    graph = model.graph
    opset = graph.opset_imports.get("", 0)
    if opset < 13:  # Split takes its sizes as an input from opset 13
        return 0
    readers: dict[ir.Value, dict[str, list[_ParallelLinear]]] = defaultdict(lambda: defaultdict(list))
    for node in graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        member = _parallel_member(node)
        if member is not None and (sources is None or node.inputs[0] in sources):
            readers[node.inputs[0]][node.op_type].append(member)  # type: ignore[index]
    fused = 0
    for source, groups in readers.items():
        for op_type, members in groups.items():
            weights = {id(member.nodes[0].inputs[1]) for member in members}
            if len(members) < 2 or len(weights) < len(members):
                continue
            widths = [member.shape[1] for member in members]
            if len({member.shape[0] for member in members}) != 1:
                continue
            if sum(member.nbytes for member in members) > REWRITE_MAX_BYTES:
                continue
            first_weight = members[0].nodes[0].inputs[1]
            assert first_weight is not None  # _parallel_member read it
            weight = constant_value(
                unique_name(graph, f"{first_weight.name}_fused"), np.concatenate([m.weight() for m in members], axis=1)
            )
            graph.register_initializer(weight)
            any_bias = any(member.bias is not None for member in members)
            bias = None
            if any_bias:
                parts = [
                    m.bias if m.bias is not None else np.zeros(w, np.float32)
                    for m, w in zip(members, widths, strict=True)
                ]
                bias = constant_value(
                    unique_name(graph, f"{weight.name}_bias"), np.concatenate(parts).astype(np.float32)
                )
                graph.register_initializer(bias)
            sizes = constant_value(unique_name(graph, f"{weight.name}_split"), np.array(widths, np.int64))
            graph.register_initializer(sizes)
            added = _linear_nodes(op_type, source, weight, bias)
            split = ir.node("Split", [added[-1].outputs[0], sizes], attributes={"axis": -1}, num_outputs=len(members))
            added.append(split)
            first = min((member.nodes[0] for member in members), key=_position(graph))
            graph.insert_before(first, added)
            for member, piece in zip(members, split.outputs, strict=True):
                replace_value(member.output, piece)
                _remove_with_constants(graph, member.nodes[::-1])
            fused += len(members) - 1
    return fused


def split_fused_linear(model: ir.Model) -> list[ir.Value]:
    """Undo ``fuse_parallel_linear``: a linear layer whose output only a Split on its last axis reads
    (constant sizes) becomes one layer per piece, so that each piece's hidden units can be pruned on
    their own (a fused MMoE's experts and gates: the gates' units feed a Softmax and stay, the
    experts' can go). Returns the inputs of the layers split, for ``fuse_parallel_linear`` to join
    them again.

    Exact algebra, as the fusion's. A Split whose sizes are not constant, or on another axis, is
    left alone.
    """
    graph = model.graph
    sources: list[ir.Value] = []
    for node in list(graph):
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        member = _parallel_member(node)
        if member is None or member.output.is_graph_output() or len(member.output.uses()) != 1:
            continue
        ((split, index),) = member.output.uses()
        if split.op_type != "Split" or split.domain not in ("", "ai.onnx") or index != 0:
            continue
        sizes = _split_sizes(split, member.shape[1])
        if sizes is None:
            continue
        weight, bias = member.weight(), member.bias
        source = node.inputs[0]
        assert source is not None  # _parallel_member checked it
        added: list[ir.Node] = []
        pieces: list[ir.Value] = []
        start = 0
        for piece, size in enumerate(sizes):
            columns = slice(start, start + size)
            start += size
            part = weight[:, columns] if member.axis == 1 else weight[:, columns].T
            stored = constant_value(unique_name(graph, f"{member.stored.name}_part{piece}"), np.ascontiguousarray(part))
            graph.register_initializer(stored)
            part_bias = None
            if bias is not None:
                part_bias = constant_value(unique_name(graph, f"{stored.name}_bias"), bias[columns].astype(np.float32))
                graph.register_initializer(part_bias)
            layer = _linear_nodes(node.op_type, source, stored, part_bias, transposed=member.axis == 0)
            added += layer
            pieces.append(layer[-1].outputs[0])
        graph.insert_before(node, added)
        for old, new in zip(split.outputs, pieces, strict=True):
            replace_value(old, new)
        _remove_with_constants(graph, [split, *member.nodes[::-1]])
        sources.append(source)
    return sources


def _remove_with_constants(graph: ir.Graph, nodes: Sequence[ir.Node]) -> None:
    """Remove ``nodes`` and the initializers they read that nothing else reads."""
    held = [value for node in nodes for value in node.inputs if value is not None and is_constant_initializer(value)]
    graph.remove(nodes, safe=True)
    for value in held:
        if value.name is not None and not value.uses() and not value.is_graph_input() and not value.is_graph_output():
            graph.initializers.pop(value.name, None)


def _linear_nodes(
    op_type: str, source: ir.Value, weight: ir.Value, bias: ir.Value | None, *, transposed: bool = False
) -> list[ir.Node]:
    """``source @ weight + bias`` as a Gemm (``transposed``: the weight stored ``[N, K]``) or as a
    MatMul and its bias Add; the last node's output is the layer's."""
    if op_type == "Gemm":
        inputs = [source, weight] if bias is None else [source, weight, bias]
        return [ir.node("Gemm", inputs, attributes={"transB": 1} if transposed else None)]
    nodes = [ir.node("MatMul", [source, weight])]
    if bias is not None:
        nodes.append(ir.node("Add", [nodes[0].outputs[0], bias]))
    return nodes


def _split_sizes(split: ir.Node, width: int) -> list[int] | None:
    """The sizes a Split on the last axis of ``[..., width]`` cuts, if constant; else None."""
    axis = split.attributes.get_int("axis", 0)
    rank = split.inputs[0].shape.rank() if split.inputs[0] is not None and split.inputs[0].shape else None
    if axis != -1 and (rank is None or axis != rank - 1):
        return None
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        sizes = constant_array(split.inputs[1])
        if sizes is None:
            return None
        result = [int(size) for size in sizes.reshape(-1)]
    elif "split" in split.attributes:
        result = list(split.attributes.get_ints("split") or [])
    else:
        count = len(split.outputs)
        if width % count:
            return None
        result = [width // count] * count
    return result if len(result) == len(split.outputs) and sum(result) == width and min(result) > 0 else None


def fold_norm_into_next_linear(model: ir.Model) -> int:
    """Fold a LayerNormalization's scale and shift into the linear layers that read it, when those
    are all its readers: the norm keeps unit scale and zero shift, which every norm then shares.

    Exact algebra (up to float rounding): ``(n * g + t) W + b = n (diag(g) W) + (t W + b)``. Returns
    the number of norms folded.
    """
    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        if node.attributes.get_int("axis", -1) != -1 or any(out.uses() for out in node.outputs[1:]):
            continue
        output = node.outputs[0]
        gamma = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        shift = node.inputs[2] if len(node.inputs) > 2 else None
        beta = constant_array(shift) if shift is not None else None
        if gamma is None or gamma.dtype != np.float32 or gamma.ndim != 1 or output.is_graph_output():
            continue
        if shift is not None and (beta is None or beta.shape != gamma.shape):
            continue
        readers = [consumer for consumer, _ in output.uses()]
        members = [_parallel_member(reader) if reader.op_type in ("MatMul", "Gemm") else None for reader in readers]
        if not members or any(m is None or m.nodes[0].inputs[0] is not output for m in members):
            continue
        if any(m.shape[0] != gamma.size or m.nbytes > REWRITE_MAX_BYTES for m in members):  # type: ignore[union-attr]
            continue
        for member in members:
            assert member is not None
            weight = member.weight().astype(np.float64)
            bias = None if member.bias is None else member.bias.astype(np.float64)
            if beta is not None and beta.any():
                bias = (0.0 if bias is None else bias) + beta.astype(np.float64) @ weight
            _set_linear(graph, member, weight * gamma.astype(np.float64)[:, None], bias)
        ones = constant_value(unique_name(graph, f"{node.inputs[1].name}_unit"), np.ones_like(gamma))  # type: ignore[union-attr]
        graph.register_initializer(ones)
        node.replace_input_with(1, ones)
        if shift is not None:
            zeros = constant_value(unique_name(graph, f"{shift.name}_zero"), np.zeros_like(gamma))
            graph.register_initializer(zeros)
            node.replace_input_with(2, zeros)
        folded += 1
    return folded


def _set_linear(graph: ir.Graph, member: _ParallelLinear, weight: np.ndarray, bias: np.ndarray | None) -> None:
    """Give a linear layer the weight ``[K, N]`` and bias ``[N]`` (new initializers: the old ones may
    have other readers), keeping its layout: a Gemm's transB, a MatMul's bias Add (added if missing;
    none when ``bias`` is None)."""
    node = member.nodes[0]
    found = _linear_weights(node)
    assert found is not None  # _parallel_member accepted the node
    old_weight, axis, _ = found
    stored = weight if axis == 1 else weight.T
    new_weight = constant_value(unique_name(graph, f"{old_weight.name}_normed"), stored.astype(np.float32))
    graph.register_initializer(new_weight)
    node.replace_input_with(1, new_weight)
    if bias is None:
        return
    new_bias = constant_value(unique_name(graph, f"{new_weight.name}_bias"), bias.astype(np.float32))
    graph.register_initializer(new_bias)
    if node.op_type == "Gemm":
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        node.replace_input_with(2, new_bias)
    elif len(member.nodes) > 1:
        add = member.nodes[1]
        slot = 1 if add.inputs[0] is node.outputs[0] else 0
        add.replace_input_with(slot, new_bias)
    else:
        output = node.outputs[0]
        add = ir.node("Add", [output, new_bias])
        graph.insert_after(node, add)
        replace_value(output, add.outputs[0])
        add.replace_input_with(0, output)


def _position(graph: ir.Graph) -> Callable[[ir.Node], int]:
    """A sort key: a node's index in graph order."""
    order = {id(node): index for index, node in enumerate(graph)}
    return lambda node: order[id(node)]


_ELEMENTWISE = frozenset(
    {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus", "Gelu", "Clip", "Identity"}
)


#: Binary ops that keep their variable input's last axis when the constant is a scalar or a vector of it.
_BROADCASTING = ("Add", "Sub", "Mul", "Div")


def _last_dim(value: ir.Value, depth: int = 0) -> int | None:
    """The static size of ``value``'s last axis: from its shape, else through elementwise ops and
    per-channel affine ops back to the linear layer or BatchNormalization that set it."""
    if value.shape is not None and len(value.shape) >= 1 and isinstance(value.shape[-1], int):
        return value.shape[-1]
    producer = value.producer()
    if producer is None or depth > 16:
        return None
    found = _linear_weights(producer)
    if found is not None:
        weight, axis, _ = found
        return int(weight.const_value.shape.numpy()[axis])  # type: ignore[union-attr]
    if producer.op_type in _ELEMENTWISE or producer.op_type in (*_BROADCASTING, "BatchNormalization"):
        upstream = _variable_input(producer) if producer.op_type not in _ELEMENTWISE else producer.inputs[0]
        if upstream is None:
            return None
        size = _last_dim(upstream, depth + 1)
        constants = [
            v for v in producer.inputs if v is not None and v is not upstream and constant_array(v) is not None
        ]
        if producer.op_type in _BROADCASTING and any(_channel_vector(c, size or 0) is None for c in constants):
            return None  # a constant that broadcasts the last axis
        return size
    return None


def _only_output_op(branch: ir.Graph, op_type: str) -> ir.Node | None:
    """The node of ``op_type`` that computes a one-output branch's output, if it does."""
    if len(branch.outputs) != 1:
        return None
    producer = branch.outputs[0].producer()
    return producer if producer is not None and producer.op_type == op_type else None


def _squeeze_if(node: ir.Node) -> tuple[ir.Value, int] | None:
    """(x, axis) when ``node`` is TorchScript's ``x.squeeze(axis)`` of a size it could not prove:
    ``If(Shape(x)[axis] == 1, then Squeeze(x, axis), else Identity(x))``."""
    if node.op_type != "If" or len(node.outputs) != 1 or node.inputs[0] is None:
        return None
    equal = node.inputs[0].producer()
    if equal is None or equal.op_type != "Equal":
        return None
    sizes = [value for value in equal.inputs if value is not None and constant_array(value) is None]
    ones = [array for value in equal.inputs if (array := constant_array(value)) is not None]
    gather = sizes[0].producer() if len(sizes) == 1 else None
    if gather is None or gather.op_type != "Gather" or len(ones) != 1 or ones[0].size != 1 or ones[0].item() != 1:
        return None
    shape, index = (
        gather.inputs[0].producer() if gather.inputs[0] is not None else None,
        constant_array(gather.inputs[1]),
    )
    if shape is None or shape.op_type != "Shape" or shape.attributes or index is None or index.size != 1:
        return None
    x, axis = shape.inputs[0], int(index.item())
    squeeze = _only_output_op(node.attributes["then_branch"].as_graph(), "Squeeze")
    identity = _only_output_op(node.attributes["else_branch"].as_graph(), "Identity")
    if x is None or squeeze is None or identity is None or squeeze.inputs[0] is not x or identity.inputs[0] is not x:
        return None
    if constant_axes(squeeze) != [axis]:
        return None
    return x, axis


def fold_static_squeezes(model: ir.Model) -> int:
    """Replace TorchScript's squeeze-if-one (see ``_squeeze_if``) by a plain Squeeze where the size
    is known to be 1: the last axis of a Gemm's output, through elementwise ops (a score's
    ``[batch, 1]``). The If costs a branch on every call. Returns how many were folded."""
    folded = 0
    graph = model.graph
    for node in list(graph):
        found = _squeeze_if(node)
        if found is None:
            continue
        x, axis = found
        if axis not in (1, -1) or _last_dim(x) != 1 or _rank_two_source(x) is not True:
            continue
        if model.opset_imports.get("", 1) >= 13:
            axes = constant_value(unique_name(graph, "squeeze_axes"), np.array([axis], np.int64))
            graph.register_initializer(axes)
            squeeze = ir.Node("", "Squeeze", [x, axes])
        else:
            squeeze = ir.Node("", "Squeeze", [x], attributes=[ir.AttrInt64s("axes", [axis])])
        detach_subgraphs(node)
        _replace_node(graph, node, [squeeze])
        folded += 1
    return folded


def merge_unsqueezes(model: ir.Model) -> int:
    """Make an Unsqueeze of an Unsqueeze one Unsqueeze of both axes (a transformer's padding mask,
    ``mask[:, None, None, :]``): one node less on every call and in the file. Axes must be constant
    and non-negative (their places are then known without the rank). Returns how many were merged."""
    graph = model.graph
    merged = 0
    for outer in list(graph):
        if outer.op_type != "Unsqueeze" or outer.domain not in ("", "ai.onnx"):
            continue
        middle = outer.inputs[0]
        inner = middle.producer() if middle is not None else None
        if middle is None or inner is None or inner.op_type != "Unsqueeze" or inner.domain not in ("", "ai.onnx"):
            continue
        if middle.is_graph_output() or len(middle.uses()) != 1:
            continue
        first, second = constant_axes(inner), constant_axes(outer)
        if first is None or second is None or min(first + second, default=-1) < 0:
            continue
        # The k-th axis of the middle value is the k-th place of the result the second one leaves free.
        taken = set(second)
        free = (place for place in itertools.count() if place not in taken)
        places = list(itertools.islice(free, max(first) + 1))
        axes = sorted({*second, *(places[axis] for axis in first)})
        outer.replace_input_with(0, inner.inputs[0])
        if len(outer.inputs) > 1:
            constant = constant_value(unique_name(graph, "unsqueeze_axes"), np.array(axes, np.int64))
            graph.register_initializer(constant)
            outer.replace_input_with(1, constant)
        else:
            outer.attributes["axes"] = ir.AttrInt64s("axes", axes)
        merged += 1
    return merged


#: Ops that broadcast their inputs against each other, numpy-style.
_BROADCASTING_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Equal", "Greater", "Less"})


def drop_broadcast_expands(model: ir.Model) -> int:
    """Bypass an Expand whose readers broadcast anyway: ``x / Expand(norm, shape)`` is ``x / norm``
    when the other operands already have the expanded shape (F.normalize's ``clamp_min(...).expand_as(x)``
    in the two-tower's towers; an Expand is a kernel call and a copy). Checked on concrete shapes: the
    reader's output must come out the same without it. Returns how many were bypassed."""
    graph = model.graph

    def read_by_broadcasts(node: ir.Node) -> bool:
        readers = [reader.op_type for reader, _ in node.outputs[0].uses()]
        return bool(readers) and not node.outputs[0].is_graph_output() and set(readers) <= _BROADCASTING_OPS

    candidates = [node for node in graph if node.op_type == "Expand" and node.domain in ("", "ai.onnx")]
    candidates = [node for node in candidates if read_by_broadcasts(node)]
    if not candidates:
        return 0
    shapes = concrete_shapes(model)

    def dims(value: ir.Value | None) -> tuple[int, ...] | None:
        found = value_dims(value, shapes)
        return tuple(found) if found is not None and all(isinstance(dim, int) for dim in found) else None  # type: ignore[arg-type]

    def same_without(reader: ir.Node, expanded: ir.Value, source: ir.Value) -> bool:
        """Whether ``reader`` gives the same shape reading ``source`` in place of ``expanded``."""
        operands = [dims(source if value is expanded else value) for value in reader.inputs]
        result = dims(reader.outputs[0])
        if result is None or any(operand is None for operand in operands):
            return False
        try:
            return np.broadcast_shapes(*operands) == result  # type: ignore[arg-type]
        except ValueError:
            return False

    bypassed = 0
    for node in candidates:
        source, expanded = node.inputs[0], node.outputs[0]
        if source is None or not all(same_without(reader, expanded, source) for reader, _ in expanded.uses()):
            continue
        for reader, index in list(expanded.uses()):
            reader.replace_input_with(index, source)
        bypassed += 1
    return bypassed


def _unsqueezed_axis(value: ir.Value, concat: ir.Node) -> int | None:
    """The one axis an Unsqueeze inserted to make ``value``, when ``concat`` is its only reader."""
    producer = value.producer()
    if producer is None or producer.op_type != "Unsqueeze" or producer.domain not in ("", "ai.onnx"):
        return None
    if any(reader is not concat for reader, _ in value.uses()) or value.is_graph_output():
        return None
    found = constant_axes(producer)
    return found[0] if found is not None and len(found) == 1 else None


def concat_stacks(model: ir.Model) -> int:
    """Replace a stack exported as Unsqueeze per tensor and a Concat (``torch.stack``: DLRM's
    interaction input, MMoE's experts) by one Concat of the tensors and a Reshape (exact). Each
    node costs onnxruntime a fixed time a call: DLRM on one row 21.4 → 19.0 µs. Needs the stacked
    tensors' shapes from the inserted axis on; returns how many stacks were rewritten."""
    graph = model.graph
    stacks: list[tuple[ir.Node, int, list[int]]] = []
    for node in graph:
        if node.op_type != "Concat" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        axis = node.attributes.get_int("axis")
        axes = [None if value is None else _unsqueezed_axis(value, node) for value in node.inputs]
        if axis is not None and all(found is not None for found in axes):
            stacks.append((node, axis, [found for found in axes if found is not None]))
    if not stacks:
        return 0
    sources: dict[ir.Node, list[ir.Value]] = {
        node: [value.producer().inputs[0] for value in node.inputs]  # type: ignore[union-attr,misc]
        for node, _, _ in stacks
    }
    inferred = inferred_shapes(model, [value for values in sources.values() for value in values])
    rewritten = 0
    for node, axis, unsqueezed in stacks:
        found = [inferred[value][0] for value in sources[node]]
        if any(shape is None for shape in found):
            continue
        rank = len(found[0])  # type: ignore[arg-type]
        if any(len(shape) != rank for shape in found) or rank == 0:  # type: ignore[arg-type]
            continue
        inserted = {each + rank + 1 if each < 0 else each for each in (axis, *unsqueezed)}
        if len(inserted) != 1:
            continue
        (inserted_axis,) = inserted
        # The stacked axis merges with the one after it; the sizes from there on must be known.
        trailing = [tuple(shape[inserted_axis:]) for shape in found]  # type: ignore[index]
        if not 0 <= inserted_axis < rank or len(set(trailing)) != 1 or not all(isinstance(d, int) for d in trailing[0]):
            continue
        target = [0] * inserted_axis + [len(found)] + [int(d) for d in trailing[0]]
        shape = constant_value(unique_name(graph, "stack_shape"), np.array(target, np.int64))
        graph.register_initializer(shape)
        concat = ir.Node("", "Concat", list(sources[node]), attributes=[ir.AttrInt64("axis", inserted_axis)])
        _replace_node(graph, node, [concat, ir.Node("", "Reshape", [concat.outputs[0], shape])])
        rewritten += 1
    return rewritten


#: Columns up to which a column Gather becomes a MatMul: its multiply-adds grow with the columns,
#: the Gather's cost does not (measured at batch 512: 64 columns 24 against 109 µs, 1,024 columns
#: 5.2 against 1.8 ms; even near 300).
SELECTION_MAX_COLUMNS = 256


def dots_fields_major(model: ir.Model) -> int:
    """Compute chosen pairwise dot products of ``F`` small vectors per example (DLRM's interaction:
    a batched ``MatMul`` of ``[batch, F, D]`` with its transpose, flattened, some columns gathered)
    field-major with elementwise ops: the vectors transposed to ``[F, D, batch]``, each pair
    ``(i, i + s)`` a product of rows ``i`` and ``(i + s) mod F`` summed over ``D``, one shift ``s``
    (at most ``F / 2``) a slice, then the chosen ``[pairs, batch]`` rows transposed back. onnxruntime runs the batched
    ``MatMul`` as one tiny product per example: for DLRM's 28 pairs of 8 fields of 16 at batch 512,
    131 µs against 112 µs, but on one row 6.6 µs against 13.6 µs (more nodes, a slow reduction),
    so this is for serving large batches. Exact up to the order of the sums. Returns how many
    interactions were rewritten."""
    graph = model.graph
    candidates = []
    for node in graph:
        if (
            node.op_type != "Gather"
            or node.domain not in ("", "ai.onnx")
            or node.attributes.get_int("axis", 0) not in (1, -1)
        ):
            continue
        columns = constant_array(node.inputs[1])
        flat = node.inputs[0].producer() if node.inputs[0] is not None else None
        if columns is None or columns.ndim != 1 or flat is None or flat.op_type not in ("Flatten", "Reshape"):
            continue
        if flat.op_type == "Flatten" and flat.attributes.get_int("axis", 1) != 1:
            continue
        product = flat.inputs[0].producer() if flat.inputs[0] is not None else None
        if product is None or product.op_type != "MatMul" or product.domain not in ("", "ai.onnx"):
            continue
        vectors, transposed = product.inputs
        turn = transposed.producer() if transposed is not None else None
        if turn is None or turn.op_type != "Transpose" or turn.inputs[0] is not vectors:
            continue
        if list(turn.attributes.get_ints("perm") or []) != [0, 2, 1]:
            continue
        if len(product.outputs[0].uses()) != 1 or len(flat.outputs[0].uses()) != 1:
            continue
        candidates.append((node, columns, flat, product, turn))
    if not candidates or model.opset_imports.get("", 1) < 13:
        return 0
    inferred = inferred_shapes(model, [product.inputs[0] for _, _, _, product, _ in candidates])  # type: ignore[misc]
    rewritten = 0
    for gather, columns, flat, product, turn in candidates:
        vectors = product.inputs[0]
        shape, dtype = inferred[vectors]  # type: ignore[index]
        if shape is None or len(shape) != 3 or dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE):
            continue
        fields, width = shape[1], shape[2]
        if not isinstance(fields, int) or not isinstance(width, int) or fields < 2:
            continue
        if flat.op_type == "Reshape" and constant_array(flat.inputs[1]) is None:
            continue
        positive = np.where(columns < 0, columns + fields * fields, columns)
        if positive.min() < 0 or positive.max() >= fields * fields:
            continue
        first, second = np.divmod(positive, fields)
        shift_of = (second - first) % fields
        # x_i . x_j = x_j . x_i: each pair from the end whose shift is the smaller (DLRM's upper
        # triangle takes 4 shifts of 8 fields instead of 7)
        turned = shift_of > fields - shift_of
        first = np.where(turned, second, first)
        shift_of = np.where(turned, fields - shift_of, shift_of)
        shifts = sorted({int(s) for s in shift_of})
        partner = np.array([[(i + s) % fields for i in range(fields)] for s in shifts], np.int64)
        rows = np.array([shifts.index(int(s)) * fields + int(i) for i, s in zip(first, shift_of, strict=True)])
        constants = {
            "partners": partner,
            "axis": np.array([2], np.int64),
            "rows": np.array([len(shifts) * fields, -1], np.int64),
            "chosen": rows.astype(np.int64),
        }
        held = {}
        for suffix, array in constants.items():
            held[suffix] = constant_value(unique_name(graph, f"dots_{suffix}"), array)
            graph.register_initializer(held[suffix])
        by_field = ir.node("Transpose", [vectors], attributes={"perm": [1, 2, 0]})
        moved = ir.node("Gather", [by_field.outputs[0], held["partners"]], attributes={"axis": 0})
        times = ir.node("Mul", [moved.outputs[0], by_field.outputs[0]])
        sums = ir.node("ReduceSum", [times.outputs[0], held["axis"]], attributes={"keepdims": 0})
        flat_sums = ir.node("Reshape", [sums.outputs[0], held["rows"]])
        picked = ir.node("Gather", [flat_sums.outputs[0], held["chosen"]], attributes={"axis": 0})
        back = ir.node("Transpose", [picked.outputs[0]], attributes={"perm": [1, 0]})
        _replace_node(graph, gather, [by_field, moved, times, sums, flat_sums, picked, back])
        graph.remove([flat, product], safe=True)
        if not turn.outputs[0].uses():
            graph.remove(turn, safe=True)
        rewritten += 1
    return rewritten


def gathers_as_selections(model: ir.Model) -> int:
    """Replace a Gather of constant columns from a float matrix (DLRM's upper triangle of pairwise
    dots) by a MatMul with a 0/1 selection matrix that onnxruntime builds at load (a OneHot of
    the column numbers: a few bytes stored). Its Gather along axis 1 copies element by
    element: 109 µs for 28 of 64 columns at batch 512, the MatMul 24 µs, one row alike. Exact for
    finite values (each output is one input times 1 plus zeros). Returns how many were replaced."""
    graph = model.graph
    candidates = []
    for node in graph:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
            continue
        indices = constant_array(node.inputs[1])
        if indices is None or indices.ndim != 1 or indices.size == 0 or constant_array(node.inputs[0]) is not None:
            continue
        if node.attributes.get_int("axis", 0) in (1, -1):
            candidates.append((node, indices))
    if not candidates or model.opset_imports.get("", 1) < 11:
        return 0
    inferred = inferred_shapes(model, [node.inputs[0] for node, _ in candidates])  # type: ignore[misc]
    replaced = 0
    for node, indices in candidates:
        shape, dtype = inferred[node.inputs[0]]  # type: ignore[index]
        if shape is None or len(shape) != 2 or dtype not in _SELECTABLE:
            continue
        columns = shape[1]
        if not isinstance(columns, int) or not 0 < columns <= SELECTION_MAX_COLUMNS:
            continue
        if indices.min() < -columns or indices.max() >= columns:
            continue
        positive = np.where(indices < 0, indices + columns, indices)
        # onnxruntime's OneHot reads int32 or int64 column numbers, not uint8: a byte each and a
        # Cast (about 20 bytes, folded at load) where that is smaller.
        as_bytes = columns <= 256 and positive.size * 3 > SELECTION_CAST_BYTES
        picked = constant_value(
            unique_name(graph, "selection_columns"), positive.astype(np.uint8 if as_bytes else np.int32)
        )
        depth = constant_value(unique_name(graph, "selection_rows"), np.array(columns, np.int32))
        values = constant_value(unique_name(graph, "selection_values"), np.array([0, 1], dtype.numpy()))  # type: ignore[union-attr]
        for constant in (picked, depth, values):
            graph.register_initializer(constant)
        nodes = [ir.Node("", "Cast", [picked], attributes=[ir.AttrInt64("to", ir.DataType.INT32)])] if as_bytes else []
        column_numbers = nodes[0].outputs[0] if nodes else picked
        selection = ir.Node("", "OneHot", [column_numbers, depth, values], attributes=[ir.AttrInt64("axis", 0)])
        nodes += [selection, ir.Node("", "MatMul", [node.inputs[0], selection.outputs[0]])]
        _replace_node(graph, node, nodes)
        replaced += 1
    return replaced


_SELECTABLE = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16})
#: Bytes of a Cast node in a saved graph with short names.
SELECTION_CAST_BYTES = 20

#: A middle-axis ReduceSum becomes a MatMul while ``summed * width * width`` (its multiply-adds a
#: row) is at most this. Measured at batch 512: [7, 16] 84 → 22 µs, [3, 32] 74 → 35 µs, [20, 16]
#: 87 → 55 µs, but [2, 64] 76 → 81 µs and [20, 32] 94 → 196 µs; one row alike (+0.3 µs).
SUM_MATMUL_MAX_PRODUCT = 6144


def sums_as_matmul(model: ir.Model) -> int:
    """Replace a ReduceSum over the middle axis of a ``[batch, n, width]`` tensor (DeepFM's sums over
    fields, MMoE's gate-weighted experts, a pooled history) by a MatMul of the rows flattened to
    ``[batch, n * width]`` with ``n`` stacked identity matrices, built at load (ConstantOfShape,
    EyeLike, Tile). onnxruntime's middle-axis reduction costs about 75 µs at batch 512 whatever its
    size; the MatMul is cheaper while small (``SUM_MATMUL_MAX_PRODUCT``). The same n terms are
    added in another order: equal to float32 rounding. Returns how many were replaced."""
    graph = model.graph
    candidates = [
        node
        for node in graph
        if node.op_type == "ReduceSum"
        and node.domain in ("", "ai.onnx")
        and node.inputs[0] is not None
        and constant_axes(node) in ([1], [-2])
    ]
    if not candidates or model.opset_imports.get("", 1) < 9:
        return 0
    inferred = inferred_shapes(model, [node.inputs[0] for node in candidates])  # type: ignore[misc]
    sums: dict[tuple[int, int, ir.DataType], ir.Value] = {}
    replaced = 0
    for node in candidates:
        shape, dtype = inferred[node.inputs[0]]  # type: ignore[index]
        if shape is None or len(shape) != 3 or dtype not in _SELECTABLE:
            continue
        summed, width = shape[1], shape[2]
        if not isinstance(summed, int) or not isinstance(width, int) or summed < 2 or width < 1:
            continue
        if summed * width * width > SUM_MATMUL_MAX_PRODUCT:
            continue
        built: list[ir.Node] = []
        if (summed, width, dtype) not in sums:
            square = constant_value(unique_name(graph, "sum_square"), np.array([width, width], np.int64))
            repeats = constant_value(unique_name(graph, "sum_repeats"), np.array([summed, 1], np.int64))
            graph.register_initializer(square)
            graph.register_initializer(repeats)
            # ConstantOfShape fills float32 zeros by default: the value is written only for another type.
            zero = ir.tensor(np.zeros(1, dtype.numpy()))  # type: ignore[union-attr]
            filled = [] if dtype == ir.DataType.FLOAT else [ir.AttrTensor("value", zero)]
            zeros = ir.Node("", "ConstantOfShape", [square], attributes=filled)
            identity = ir.Node("", "EyeLike", [zeros.outputs[0]])
            stacked = ir.Node("", "Tile", [identity.outputs[0], repeats])
            built = [zeros, identity, stacked]
            sums[(summed, width, dtype)] = stacked.outputs[0]
        flat = ir.Node("", "Flatten", [node.inputs[0]], attributes=[ir.AttrInt64("axis", 1)])
        product = ir.Node("", "MatMul", [flat.outputs[0], sums[(summed, width, dtype)]])
        built += [flat, product]
        if node.attributes.get_int("keepdims", 1):
            kept = constant_value(unique_name(graph, "sum_kept"), np.array([0, 1, width], np.int64))
            graph.register_initializer(kept)
            built.append(ir.Node("", "Reshape", [product.outputs[0], kept]))
        _replace_node(graph, node, built)
        replaced += 1
    return replaced


def fold_sums_into_linear(model: ir.Model) -> int:
    """Fold ``sums_as_matmul``'s product (the rows of ``[batch, n, width]`` flattened, times ``n``
    stacked identities) into the linear layer that alone reads it: that layer then reads the ``n``
    vectors side by side, its weight stacked ``n`` times by a ``Tile`` onnxruntime folds at load
    (no bytes stored; the weight itself stays as it is, quantized or not). MMoE's sum of the
    gate-weighted experts before each tower: one product less a task. Exact algebra, ``(x S) W =
    x (S W)``. For a final cleanup: the layer's weight is no longer an initializer of its own for
    the passes after. Returns how many sums were folded."""
    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.outputs[0].uses()) != 1:
            continue
        stacked = node.inputs[1].producer() if node.inputs[1] is not None else None
        if stacked is None or stacked.op_type != "Tile":
            continue
        identity = stacked.inputs[0].producer() if stacked.inputs[0] is not None else None
        repeats = constant_array(stacked.inputs[1])
        if identity is None or identity.op_type != "EyeLike" or repeats is None or repeats.shape != (2,):
            continue
        if node.outputs[0].is_graph_output() or int(repeats[1]) != 1:
            continue
        ((layer, index),) = node.outputs[0].uses()
        if index != 0 or layer.domain not in ("", "ai.onnx") or layer.inputs[1] is None:
            continue
        if layer.op_type == "Gemm":
            if layer.attributes.get_int("transA", 0) or layer.attributes.get_float("alpha", 1.0) != 1.0:
                continue
            along = [1, int(repeats[0])] if layer.attributes.get_int("transB", 0) else [int(repeats[0]), 1]
        elif layer.op_type == "MatMul" and layer.inputs[1].shape is not None and len(layer.inputs[1].shape) == 2:
            along = [int(repeats[0]), 1]
        else:
            continue
        times = constant_value(unique_name(graph, "sum_weight_repeats"), np.array(along, np.int64))
        graph.register_initializer(times)
        tile = ir.Node("", "Tile", [layer.inputs[1], times])
        graph.insert_before(layer, [tile])
        layer.replace_input_with(1, tile.outputs[0])
        layer.replace_input_with(0, node.inputs[0])
        graph.remove(node, safe=True)
        folded += 1
    return folded


def _computed_at_load(graph: ir.Graph) -> set[ir.Value]:
    """Values that depend on no graph input: constants and what standard ops compute from them
    alone (a weight decoded from its codes, a bias cast from float16), which onnxruntime folds
    when it loads the model."""
    found = {value for value in graph.initializers.values() if is_constant_initializer(value)}
    for node in graph:
        subgraphs = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        if node.domain not in ("", "ai.onnx") or any(attr.type in subgraphs for attr in node.attributes.values()):
            continue
        if all(value is None or value in found for value in node.inputs):
            found.update(node.outputs)
    return found


def _flat_rows_before(
    rows: ir.Value, width: int, shapes: dict[ir.Value, Dims | None]
) -> tuple[ir.Value, list[ir.Node]] | None:
    """The ``[n, width]`` rows a Reshape made ``rows`` from, possibly before elementwise ops that
    only this chain reads (a ReLU between two layers), and those ops, nearest first."""
    chain: list[ir.Node] = []
    value = rows
    while (producer := value.producer()) is not None and producer.op_type in _ELEMENTWISE:
        if len(value.uses()) != 1 or value.is_graph_output() or producer.inputs[0] is None:
            return None
        chain.append(producer)
        value = producer.inputs[0]
    if producer is None or producer.op_type != "Reshape" or producer.domain not in ("", "ai.onnx"):
        return None
    if chain and (len(value.uses()) != 1 or value.is_graph_output()):
        return None
    source = producer.inputs[0]
    dims = value_dims(source, shapes)
    if source is None or dims is None or len(dims) != 2 or dims[1] != width:
        return None
    return source, chain


def linear_rows_as_gemm(model: ir.Model) -> int:
    """Make a layer applied to several rows of each example, ``MatMul(x, W) + b`` on a ``[batch,
    rows, k]`` tensor with W and b fixed at load, a ``Gemm`` on the rows flattened to ``[n, k]``
    and reshaped back. onnxruntime makes a two-dimensional MatMul and Add one Gemm, which writes
    the bias into its output before the product, but leaves the Add of a batched MatMul as a pass
    of its own over the output (SASRec's projections over twenty positions: 0.26 ms of 8.7 ms at
    batch 512). The result is reshaped back with -1 where the batch is, so only one leading
    dimension may vary; a layer reading one row per example is left alone (its Add is cheap and
    two more nodes are not). Rows a Reshape made from flat rows, possibly through elementwise ops
    (the ReLU between two layers), are read flat. Returns how many layers were rewritten."""
    graph = model.graph
    candidates = [
        node
        for node in graph
        if node.op_type == "MatMul"
        and node.domain in ("", "ai.onnx")
        and len(node.outputs[0].uses()) == 1
        and not node.outputs[0].is_graph_output()
        and next(iter(node.outputs[0].uses()))[0].op_type == "Add"
    ]
    if not candidates:
        return 0
    at_load = _computed_at_load(graph)
    candidates = [node for node in candidates if node.inputs[1] in at_load]
    if not candidates:
        return 0
    shapes = concrete_shapes(model)
    types = inferred_shapes(model, [node.outputs[0] for node in candidates])
    targets: dict[tuple[int, ...], ir.Value] = {}
    rewritten = 0
    for node in candidates:
        rows, weight = node.inputs
        ((add, _),) = node.outputs[0].uses()
        bias = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
        row_dims, weight_dims = value_dims(rows, shapes), value_dims(weight, shapes)
        bias_dims, out_dims = value_dims(bias, shapes), value_dims(add.outputs[0], shapes)
        if rows is None or bias not in at_load or types[node.outputs[0]][1] != ir.DataType.FLOAT:
            continue
        if row_dims is None or weight_dims is None or bias_dims is None or out_dims is None:
            continue
        if len(row_dims) < 3 or len(weight_dims) != 2 or not all(isinstance(dim, int) for dim in weight_dims):
            continue
        inner, width = int(weight_dims[0]), int(weight_dims[1])
        if row_dims[-1] != inner or bias_dims not in ([width], [1, width]) or out_dims != [*row_dims[:-1], width]:
            continue
        varying = [axis for axis, dim in enumerate(row_dims[:-1]) if varies_with_inputs(dim)]
        fixed = [int(dim) for axis, dim in enumerate(row_dims[:-1]) if axis not in varying]
        if len(varying) > 1 or math.prod(fixed) < 2:
            continue
        target: tuple[int, ...] = (
            *(-1 if axis in varying else int(dim) for axis, dim in enumerate(row_dims[:-1])),
            width,
        )
        flat_nodes: list[ir.Node] = []
        found = _flat_rows_before(rows, inner, shapes)
        if found is None:
            flatten = ir.Node("", "Flatten", [rows], attributes=[ir.AttrInt64("axis", len(row_dims) - 1)])
            flat_nodes.append(flatten)
            flat = flatten.outputs[0]
        elif found[1]:
            source, chain = found
            reshape = chain[-1].inputs[0].producer()  # type: ignore[union-attr]
            chain[-1].replace_input_with(0, source)
            for step in chain:
                step.outputs[0].shape = None
            if reshape is not None and not reshape.outputs[0].uses():
                graph.remove(reshape, safe=True)
            flat = rows
        else:
            flat = found[0]
        if target not in targets:
            targets[target] = constant_value(unique_name(graph, "rows_shape"), np.array(target, np.int64))
            graph.register_initializer(targets[target])
        gemm = ir.Node("", "Gemm", [flat, weight, bias])
        back = ir.Node("", "Reshape", [gemm.outputs[0], targets[target]])
        graph.insert_before(node, [*flat_nodes, gemm, back])
        shapes[gemm.outputs[0]] = ["rows", width]
        replace_value(add.outputs[0], back.outputs[0])
        graph.remove([add, node], safe=True)
        rewritten += 1
    return rewritten


def _rank_two_source(value: ir.Value, depth: int = 0) -> bool | None:
    """Whether ``value`` is a Gemm's output (always two-dimensional), through elementwise ops."""
    producer = value.producer()
    if producer is None or depth > 16:
        return None
    if producer.op_type == "Gemm":
        return True
    if producer.op_type in _ELEMENTWISE and producer.inputs[0] is not None:
        return _rank_two_source(producer.inputs[0], depth + 1)
    return None


def _variable_input(node: ir.Node) -> ir.Value | None:
    """The one non-constant input of an affine node (its data input)."""
    if node.op_type == "BatchNormalization":
        return node.inputs[0]
    variable = [value for value in node.inputs if value is not None and constant_array(value) is None]
    return variable[0] if len(variable) == 1 else None


_NAME_FIRST = string.ascii_letters + "_"
_NAME_REST = _NAME_FIRST + string.digits


def identifier_names() -> Iterator[str]:
    """Every C identifier (what ONNX names must be), shortest first: 53 of one character, then
    3,339 of two, ..."""
    for length in itertools.count(1):
        for first in _NAME_FIRST:
            for rest in itertools.product(_NAME_REST, repeat=length - 1):
                yield first + "".join(rest)


def shorten_names(model: ir.Model) -> int:
    """Give nodes no name, graphs a one-letter one and internal values short ones; graph inputs and
    outputs keep theirs.

    Names are labels no runtime reads; exporters' long scoped names can be a tenth of a small file.
    A name is written once where its value is made and once per use, so the most used values take
    the shortest names. Returns the number of names changed.
    """
    changed = 0
    graphs = list(model.graphs())
    interface = {value for graph in graphs for value in (*graph.inputs, *graph.outputs)}
    taken = {value.name for value in interface if value.name}
    internal: list[ir.Value] = []
    for graph in graphs:
        if graph.name and graph.name != "g":  # a graph's name must not be empty
            graph.name = "g"
            changed += 1
        for node in graph:
            if node.name:
                node.name = None
                changed += 1
        values = [*graph.initializers.values(), *(out for node in graph for out in node.outputs)]
        internal.extend(value for value in values if value not in interface and value.name)
    # Sorted by how often the name is written (stable: graph order among equals).
    internal.sort(key=lambda value: -(len(value.uses()) + 1 + (value.const_value is not None)))
    names = (name for name in identifier_names() if name not in taken)
    for value, name in zip(internal, names, strict=False):  # names never run out
        if value.const_value is not None:
            value.const_value.name = name
        value.name = name
        changed += 1
    return changed


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
            default=True,
            metadata={"help": "make duplicated initializers and Constant nodes (same dtype, shape, bytes) one"},
        )
        strip_metadata: bool = field(
            default=False,
            metadata={"help": "drop doc strings, exporter metadata and intermediate value_info"},
        )
        fold_affine: bool = field(
            default=True,
            metadata={
                "help": "fold inference BatchNormalization and per-channel Mul/Add into the linear layer "
                "before them, or after them when it is their only consumer"
            },
        )
        remove_dead_units: bool = field(
            default=True,
            metadata={
                "help": "remove hidden units whose weights in or out are all (nearly) zero, their constant "
                "output added to the next layer's bias (lossless to float32 rounding)"
            },
        )
        unfuse_contrib: bool = field(
            default=True,
            metadata={
                "help": "replace onnxruntime's com.microsoft FusedGemm and FusedMatMul (in models it saved "
                "optimised) by the standard Gemm + activation and MatMul the passes work on"
            },
        )
        initializer_inputs: bool = field(
            default=True,
            metadata={
                "help": "when every initializer is also a graph input (keep_initializers_as_inputs, the default "
                "of old exporters), make them plain constants the passes may rewrite; a model listing only "
                "some (defaults meant to be overridden) keeps them"
            },
        )
        vectorize_bags: bool = field(
            default=True,
            metadata={
                "help": "replace an embedding bag exported as a Loop (PyTorch EmbeddingBag over (batch, length) "
                "ids) by one Gather and a reduction, after checking both agree on the calibration rows"
            },
        )
        simplify_labels: bool = field(
            default=True,
            metadata={
                "help": "compute a classifier's label from its scores with standard ops instead of "
                "ai.onnx.ml.ArrayFeatureExtractor (scikit-learn exports; exact)"
            },
        )
        complementary_sigmoids: bool = field(
            default=True,
            metadata={
                "help": "a binary classifier's Concat(1 - Sigmoid(z), Sigmoid(z)) becomes the Sigmoid of its last "
                "layer made two columns wide, [-w, w] (scikit-learn MLPs; equal to float32 rounding)"
            },
        )
        static_shapes: bool = field(
            default=True,
            metadata={
                "help": "shape arithmetic whose values do not change with the input sizes becomes constants, "
                "and a Reshape target that changes in one entry (the batch) a constant with -1 there "
                "(TorchScript's attention); measured by running the shape nodes at four input sizes"
            },
        )
        concat_stacks: bool = field(
            default=True,
            metadata={
                "help": "make a stack exported as an Unsqueeze per tensor and a Concat one Concat and a Reshape "
                "(fewer nodes: faster on one row)"
            },
        )
        select_columns: bool = field(
            default=True,
            metadata={
                "help": "a Gather of constant columns from a matrix of at most 256 columns becomes a MatMul "
                "with a selection matrix built at load (onnxruntime's column Gather is slow in batches)"
            },
        )
        dots_fields_major: bool = field(
            default=False,
            metadata={
                "help": "pairwise dot products of a few vectors per example (DLRM's interaction: a batched MatMul "
                "and a column Gather) computed field-major with elementwise ops: faster in large batches "
                "(DLRM at batch 512 131 -> 112 us), slower on one row (6.6 -> 13.6 us)"
            },
        )
        drop_expands: bool = field(
            default=True,
            metadata={
                "help": "bypass an Expand whose readers broadcast to the same shape without it (F.normalize's "
                "expand_as in a two-tower model), checked on shapes inferred with the batch set"
            },
        )
        select_early: bool = field(
            default=True,
            metadata={
                "help": "a Gather of one constant position (SASRec's last state) moves up through the ops that "
                "work row by row, so they compute that position only (SASRec at batch 512: 1.45x)"
            },
        )
        gemm_rows: bool = field(
            default=False,
            metadata={
                "help": "a layer with a bias over several rows of each example ([batch, rows, k]: SASRec's "
                "projections) runs as one Gemm on the flattened rows (onnxruntime adds a batched MatMul's bias in "
                "a pass of its own; SASRec at batch 512: 1.42x -> 1.52x); exact. The lossless preset sets it; "
                "before quant it took max SASRec from 13.9x to 9.0x, and after quant it saves 1-2% and costs bytes"
            },
        )
        merge_transposes: bool = field(
            default=True,
            metadata={
                "help": "data movement between computing ops as one reshape, selection and transpose per value read, "
                "with a linear layer's row order moved to where it cancels (nn.MultiheadAttention's transposes "
                "into and out of [positions, batch, width]: 16 -> 6 in SASRec's two blocks); exact"
            },
        )
        head_transposes: bool = field(
            default=True,
            metadata={
                "help": "a transpose of attention heads ([batch, positions, heads, width] -> [batch, heads, positions, "
                "width], width <= 16) read by MatMuls becomes a 3-d transpose and one of the last two axes that "
                "onnxruntime folds into the product (it moves small blocks slowly); exact"
            },
        )
        fold_sums: bool = field(
            default=False,
            metadata={
                "help": "a sum over stacked vectors done as a MatMul (sums_as_matmul) folds into the linear layer "
                "that alone reads it, its weight tiled at load (MMoE's towers); the layer's weight is then no "
                "longer an initializer of its own, so the presets set it in their final cleanup only"
            },
        )
        sums_as_matmul: bool = field(
            default=True,
            metadata={
                "help": "a ReduceSum over the middle axis of a small [batch, n, width] tensor becomes a MatMul "
                "with stacked identities built at load (onnxruntime's middle-axis reduction is slow in batches)"
            },
        )
        fuse_parallel: bool = field(
            default=True,
            metadata={"help": "make linear layers that read the same input one wider layer and a Split (Q/K/V)"},
        )
        common_subexpressions: bool = field(
            default=True,
            metadata={
                "help": "compute once what several nodes compute alike (the same op on the same inputs: an "
                "exporter's repeated Shape, Gather and Unsqueeze of one tensor)"
            },
        )
        short_names: bool = field(
            default=False, metadata={"help": "drop node names and give internal values short names"}
        )
        drop_default_attributes: bool = field(
            default=False,
            metadata={"help": "remove attributes equal to the operator's default (Gemm alpha=1, Reshape allowzero=0)"},
        )
        lift_constants: bool = field(
            default=False, metadata={"help": "store Constant nodes as initializers (fewer bytes per constant)"}
        )
        narrow_indices: bool = field(
            default=False, metadata={"help": "store constant int64 gather indices that fit as int32 (half the bytes)"}
        )
        compact_masks: bool = field(
            default=False,
            metadata={
                "help": "store triangular constants (causal attention masks: boolean, or additive 0/-inf) as "
                "Trilu of a broadcast"
            },
        )
        pack_casts: bool = field(
            default=False,
            metadata={
                "help": "constant vectors each cast by a node of their own (float16 biases) become one Cast and a Split"
            },
        )

    def call(self, model: ir.Model) -> CompressionResult:
        before = _op_counts(model)
        initializers_before = set(model.graph.initializers.values())  # values: short_names renames them
        inputs_made_constant = constant_initializer_inputs(model) if self.config.initializer_inputs else 0
        dropout = remove_inference_dropout(model) if self.config.remove_dropout else 0
        unfused = unfuse_contrib_ops(model) if self.config.unfuse_contrib else 0
        weights_folded = fold_weight_layouts(model)
        sigmoids = complementary_sigmoids(model) if self.config.complementary_sigmoids else 0
        labels = simplify_class_labels(model) if self.config.simplify_labels else 0
        remove_identities(model)
        bags = vectorize_bags(model, self.context.calibration) if self.config.vectorize_bags else {}
        squeezes = fold_static_squeezes(model)
        unsqueezes = merge_unsqueezes(model)
        expands = drop_broadcast_expands(model) if self.config.drop_expands else 0
        shape_values, shape_targets = fold_shape_arithmetic(model) if self.config.static_shapes else (0, 0)
        stacks = concat_stacks(model) if self.config.concat_stacks else 0
        dots = dots_fields_major(model) if self.config.dots_fields_major else 0
        selections = gathers_as_selections(model) if self.config.select_columns else 0
        sums = sums_as_matmul(model) if self.config.sums_as_matmul else 0
        sums_folded = fold_sums_into_linear(model) if self.config.fold_sums else 0
        affine = fold_affine_into_linear(model) + fold_affine_into_next_linear(model) if self.config.fold_affine else 0
        fused = fuse_parallel_linear(model) if self.config.fuse_parallel else 0
        norms = fold_norm_into_next_linear(model) if self.config.fold_affine else 0
        dead_units = remove_dead_units(model) if self.config.remove_dead_units else 0
        adds_merged = merge_constant_adds(model) if self.config.fold_affine else 0
        selected = select_early(model) if self.config.select_early else 0
        gemm_rows = linear_rows_as_gemm(model) if self.config.gemm_rows else 0
        transposes = merge_transposes(model) if self.config.merge_transposes else 0
        heads = head_transposes_for_products(model) if self.config.head_transposes else 0
        RemoveUnusedNodesPass()(model)
        RemoveUnusedFunctionsPass()(model)
        merged, merged_bytes = merge_identical_initializers(model) if self.config.merge_initializers else (0, 0)
        constants_merged = merge_identical_constants(model) if self.config.merge_initializers else 0
        nodes_before_cse = len(model.graph)
        if self.config.common_subexpressions:
            CommonSubexpressionEliminationPass()(model)
        common = nodes_before_cse - len(model.graph)
        RemoveUnusedNodesPass()(model)
        RemoveUnusedOpsetsPass()(model)
        lifted = 0
        if self.config.lift_constants:
            constants = _op_counts(model).get("Constant", 0)
            LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
            lifted = constants - _op_counts(model).get("Constant", 0)
            if self.config.merge_initializers:  # a lifted constant may equal an initializer
                more, more_bytes = merge_identical_initializers(model)
                merged, merged_bytes = merged + more, merged_bytes + more_bytes
        defaults = drop_default_attributes(model) if self.config.drop_default_attributes else 0
        narrowed = narrow_indices(model) if self.config.narrow_indices else 0
        masks = compact_masks(model) if self.config.compact_masks else 0
        casts_packed = pack_cast_vectors(model) if self.config.pack_casts else 0
        stripped = strip_metadata(model) if self.config.strip_metadata else 0
        drop_initializer_types(model)
        renamed = shorten_names(model) if self.config.short_names else 0
        after = _op_counts(model)
        initializers_after = set(model.graph.initializers.values())
        removed_by_op = {op: before[op] - after.get(op, 0) for op in before if before[op] > after.get(op, 0)}
        # The rewrites add nodes too (a MatMul for a ReduceSum, a Reshape for a Gather): both sides.
        added_by_op = {op: after[op] - before.get(op, 0) for op in after if after[op] > before.get(op, 0)}
        stats = {
            "nodes_removed": sum(removed_by_op.values()),
            "removed_by_op": dict(sorted(removed_by_op.items())),
            "nodes_added": sum(added_by_op.values()),
            "added_by_op": dict(sorted(added_by_op.items())),
            "dropout_removed": dropout,
            "initializer_inputs_made_constant": inputs_made_constant,
            # initializers before - removed + added = after (a duplicate merged away counts as removed)
            "initializers_removed": len(initializers_before - initializers_after),
            # the rewrites' constants (reshape targets, selection indices) and lifted Constant nodes
            "initializers_added": len(initializers_after - initializers_before),
            "initializers_merged": merged,
            "constants_merged": constants_merged,
            "common_subexpressions": common,
            "bytes_merged": merged_bytes,
            "affine_folded": affine,
            "linear_layers_fused": fused,
            "norms_folded": norms,
            "constant_adds_merged": adds_merged,
            "dead_units_removed": dead_units,
            "labels_simplified": labels,
            "complementary_sigmoids": sigmoids,
            "contrib_ops_unfused": unfused,
            "weight_layouts_folded": weights_folded,
            "squeeze_ifs_folded": squeezes,
            "unsqueezes_merged": unsqueezes,
            "expands_bypassed": expands,
            "shape_values_folded": shape_values,
            "reshape_targets_folded": shape_targets,
            "stacks_concatenated": stacks,
            "dots_fields_major": dots,
            "column_gathers_as_matmul": selections,
            "sums_as_matmul": sums,
            "sums_folded_into_layers": sums_folded,
            "nodes_computing_selection_only": selected,
            "row_layers_as_gemm": gemm_rows,
            "transposes_merged": transposes,
            "head_transposes_for_products": heads,
            **({"embedding_bag_loops": bags} if bags else {}),
            "metadata_items_stripped": stripped,
            "names_shortened": renamed,
            "constants_lifted": lifted,
            "default_attributes_dropped": defaults,
            "indices_narrowed": narrowed,
            "masks_compacted": masks,
            "cast_vectors_packed": casts_packed,
        }
        modified = bool(
            stats["nodes_removed"]
            or inputs_made_constant
            or stats["initializers_removed"]
            or merged
            or constants_merged
            or common
            or stripped
            or renamed
            or lifted
            or defaults
            or narrowed
            or masks
            or casts_packed
            or fused
            or norms
            or adds_merged
            or dead_units
            or labels
            or unfused
            or weights_folded
            or squeezes
            or unsqueezes
            or expands
            or shape_values
            or shape_targets
            or stacks
            or selections
            or dots
            or sums_folded
            or selected
            or sums
            or any(not outcome.startswith("kept") for outcome in bags.values())
        )
        return CompressionResult(model, modified=modified, stats=stats)
