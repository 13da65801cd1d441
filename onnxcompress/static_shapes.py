"""Shape arithmetic that exporters leave in graphs, replaced by constants where its values are static.

TorchScript writes every ``view``/``reshape`` of PyTorch's attention as ``Shape``, ``Gather``,
``Unsqueeze`` and ``Concat`` nodes computing the target at run time (SASRec's two encoder layers: about
a hundred such nodes, each a kernel call on every request). Where the computed values do not change
with the input sizes they are constants, and a ``Reshape`` target in which only one entry changes
(the batch) is a constant with ``-1`` there. Whether a value changes is measured, not derived: the
values computed from shapes alone are read from onnxruntime at several input sizes, on inputs drawn
afresh each time, so a shape that follows the data (``NonZero``, ``Unique``) changes between the
runs too and stays computed. The parity gate then checks the result on the real feeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxcompress import runtime
from onnxcompress.calibration import session_reading, synthesize_feeds
from onnxcompress.errors import CompressError
from onnxcompress.graph import constant_array, constant_value, is_constant_initializer, unique_name

#: Each symbolic input dimension takes these sizes in turn (plus a step per symbol, so that no two
#: symbols are ever equal): a value equal in all four runs is taken as static.
SAMPLE_SIZES = (2, 3, 5, 8)
SYMBOL_STEP = 7
#: Static values up to this many elements become initializers (a larger one, such as a causal mask
#: built at load, stays as the few nodes that build it).
MAX_FOLDED_ELEMENTS = 64
#: Models with more weight bytes than this are not sampled (a session each run): the shape nodes of
#: a table-heavy model are few, its sessions are not.
MAX_SAMPLED_WEIGHT_BYTES = 64 << 20
_STANDARD = ("", "ai.onnx")
_SHAPE_OPS = frozenset({"Shape", "Size"})
_RANDOM_OPS = frozenset({"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial"})


def _is_constant(value: ir.Value) -> bool:
    """What :func:`constant_array` reads, without reading it."""
    if is_constant_initializer(value):
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain in _STANDARD


def shape_derived_values(graph: ir.Graph) -> list[ir.Value]:
    """Outputs of nodes that read input shapes (``Shape``, ``Size``) or such outputs, and otherwise
    only constants (or values computed from constants alone), never an input's data; in graph
    order. Values computed from constants alone are not among them: folding those could undo a
    compact form (codes decoded at load)."""
    derived: set[ir.Value] = set()
    from_constants: set[ir.Value] = set()
    ordered: list[ir.Value] = []
    for node in graph:
        if node.domain not in _STANDARD or node.op_type in _RANDOM_OPS:
            continue
        if any(
            attribute.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for attribute in node.attributes.values()
        ):
            continue
        inputs = [value for value in node.inputs if value is not None]
        if node.op_type in _SHAPE_OPS:
            reads_shapes, reads_data = True, False
        else:
            reads_shapes = any(value in derived for value in inputs)
            reads_data = any(
                value not in derived and value not in from_constants and not _is_constant(value) for value in inputs
            )
        if reads_data:
            continue
        if reads_shapes:
            derived.update(node.outputs)
            ordered.extend(node.outputs)
        else:
            from_constants.update(node.outputs)
    return ordered


def _sample_shapes(model: ir.Model, round_index: int) -> tuple[dict[str, list[int]], int]:
    """Concrete input shapes for one run: a symbolic first dimension is the batch, one size for every
    input (tf2onnx names each input's batch apart: ``unk__6``, ``unk__7``); each other symbolic
    dimension a size of its own."""
    symbols: dict[str, int] = {"": 0}
    shapes: dict[str, list[int]] = {}
    base = SAMPLE_SIZES[round_index]
    for value in model.graph.inputs:
        if value.shape is None or value.is_initializer():
            continue
        dims = []
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int):
                dims.append(dim)
            else:
                key = "" if axis == 0 else str(dim.value) if dim.value is not None else f"{value.name}/{axis}"
                symbols.setdefault(key, len(symbols))
                dims.append(base + SYMBOL_STEP * symbols[key])
        shapes[value.name or ""] = dims
    return shapes, base


def _sampled(model: ir.Model, values: Sequence[ir.Value]) -> list[dict[str, np.ndarray]] | None:
    """The arrays of ``values`` on synthesized inputs at each of the sample sizes, or None when the
    model cannot be run that way (its own shapes fixed, inputs it cannot synthesize)."""
    names = [value.name or "" for value in values]
    try:
        session = session_reading(model, values, "disable")
    except CompressError:
        return None
    samples = []
    for round_index in range(len(SAMPLE_SIZES)):
        shapes, rows = _sample_shapes(model, round_index)
        try:
            feeds = synthesize_feeds(model, shapes, rows=rows, seed=round_index).arrays
            samples.append(runtime.run(session, feeds, names, batch_size=None))
        except CompressError:
            return None
    return samples


def _static(arrays: Sequence[np.ndarray]) -> bool:
    first = arrays[0]
    return all(
        array.shape == first.shape and array.dtype == first.dtype and np.array_equal(array, first) for array in arrays
    )


def _reshape_target(arrays: Sequence[np.ndarray]) -> np.ndarray | None:
    """A Reshape's output shapes, as a constant target where they change with the inputs in one entry
    only (``-1`` there); None if more change or a static size is 0 (a 0 in a target copies)."""
    if any(array.ndim != 1 or array.shape != arrays[0].shape for array in arrays):
        return None
    stacked = np.stack(arrays)
    varying = np.flatnonzero((stacked != stacked[0]).any(axis=0))
    if len(varying) != 1:
        return None
    target = stacked[0].astype(np.int64)
    static = np.delete(target, varying)
    if (static <= 0).any():
        return None
    target[varying[0]] = -1
    return target


def fold_shape_arithmetic(model: ir.Model) -> tuple[int, int]:
    """Replace static values computed from shapes by constants and Reshape targets that change in
    one entry by constants with ``-1`` there. Returns (values folded, Reshape targets made constant);
    the nodes left unused go with the cleanup's dead-code removal."""
    graph = model.graph
    if not any(node.op_type in _SHAPE_OPS and node.domain in _STANDARD for node in graph):
        return 0, 0
    weight_bytes = sum(
        value.const_value.nbytes for value in graph.initializers.values() if value.const_value is not None
    )
    if weight_bytes > MAX_SAMPLED_WEIGHT_BYTES:
        return 0, 0
    derived = shape_derived_values(graph)
    for value in derived:
        if value.name is None:
            value.name = unique_name(graph, "shape_value")
    # A Reshape's target may hold a -1 of its own: what is sampled is the shape of its output.
    computed = set(derived)
    reshapes = [
        node
        for node in graph
        if node.op_type == "Reshape"
        and node.domain in _STANDARD
        and len(node.inputs) > 1
        and node.inputs[1] in computed
    ]
    probes = [ir.node("Shape", [node.outputs[0]]) for node in reshapes]
    for index, probe in enumerate(probes):
        probe.outputs[0].name = unique_name(graph, f"reshaped_shape_{index}")
    graph.extend(probes)
    try:
        samples = _sampled(model, [*derived, *(probe.outputs[0] for probe in probes)])
    finally:
        for probe in probes:
            graph.remove(probe)
            probe.replace_input_with(0, None)  # a removed node still counts as its input's reader
    if samples is None:
        return 0, 0
    arrays: Mapping[ir.Value, list[np.ndarray]] = {
        value: [sample[value.name or ""] for sample in samples] for value in derived
    }
    static = {value for value in derived if _static(arrays[value])}
    folded = 0
    for value in derived:
        if value not in static or value.is_graph_output() or arrays[value][0].size > MAX_FOLDED_ELEMENTS:
            continue
        readers = [node for node, _ in value.uses()]
        if not readers or all(output in static for node in readers for output in node.outputs):
            continue  # only read by static values: folded with them
        value.replace_all_uses_with(constant_initializer(graph, arrays[value][0]))
        folded += 1
    targets = 0
    for node, probe in zip(reshapes, probes, strict=True):
        if constant_array(node.inputs[1]) is not None:
            continue  # static: folded above
        target = _reshape_target([sample[probe.outputs[0].name or ""] for sample in samples])
        if target is not None:
            node.replace_input_with(1, constant_initializer(graph, target))
            targets += 1
    return folded, targets


def constant_initializer(graph: ir.Graph, array: np.ndarray) -> ir.Value:
    value = constant_value(unique_name(graph, "shape_constant"), array)
    graph.register_initializer(value)
    return value
