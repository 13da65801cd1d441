"""Embedding bags exported as loops, recognised and rewritten as one Gather and one reduction.

PyTorch exports ``nn.EmbeddingBag`` as an ONNX ``Loop`` over the bags: each iteration slices the
bag's ids, gathers their rows and reduces them (TorchScript yields a scan output, dynamo a
sequence joined by ``ConcatFromSequence``). onnxruntime runs that loop one bag at a time, 30-100x
slower than a Gather of all the ids and a reduction over the bag axis, and the table read inside
the loop body is out of reach of the quantizer. With fixed-length bags (a ``[batch, length]`` id
input, the usual export of multi-hot history features) the loop computes exactly
``Reduce(Gather(table, ids), axis=1)``; a mean with a padding id (``padding_idx``, whose row
PyTorch keeps at zero) is the sum over the ids divided by the count of the others.

The exporters' loop bodies differ and change between versions, so the loop is not matched node by
node. A loop is a candidate when it reads one float table through Gather and a two-dimensional
integer graph input reaches it; the rewrite is made only when the loop's result equals
``sum``, ``mean`` or ``max`` of the gathered rows on the calibration rows *and* on the same rows
with every id drawn at random over the whole table (which catches what the calibration ids may
not exercise: a padding id left out of a mean, per-id weights, renormalised rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxcompress import runtime
from onnxcompress.calibration import Calibration
from onnxcompress.errors import UnsupportedModelError, UsageError
from onnxcompress.graph import detach_subgraphs, replace_value

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["BagLoop", "find_bag_loops", "vectorize_bags"]

#: Calibration rows used to check a rewrite (two runs of the model with the loop's values exposed).
CHECK_ROWS = 256
#: Relative tolerance of the check: the loop and the reduction add the same rows in other orders.
CHECK_RTOL = 1e-5

#: Ops that pass a bag result on unchanged in value (the dynamo form joins a sequence, then casts).
_PASS_THROUGH = frozenset({"ConcatFromSequence", "Cast", "Identity"})

_REDUCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sum": lambda rows: rows.sum(axis=1),
    "mean": lambda rows: rows.mean(axis=1),
    "max": lambda rows: rows.max(axis=1),
}
_REDUCE_OPS = {"sum": "ReduceSum", "mean": "ReduceMean", "max": "ReduceMax"}
#: Zero rows tried as the padding id of a mean (PyTorch's ``padding_idx`` row stays zero).
PADDING_CANDIDATES = 2


@dataclass(frozen=True)
class Reduction:
    """What a bag computes from its rows: ``sum``, ``mean`` or ``max``; a mean or a max may leave
    out a padding id (PyTorch's ``padding_idx``: its row is zero and it does not count; a bag of
    padding only gives 0)."""

    kind: str
    padding: int | None = None

    def expected(self, table: np.ndarray, ids: np.ndarray) -> np.ndarray:
        rows = table[ids]
        if self.padding is None:
            return _REDUCTIONS[self.kind](rows)
        counted = ids != self.padding
        if self.kind == "max":  # the counted rows' maximum, 0 for a bag of padding only
            largest = np.where(counted[..., None], rows, -np.inf).max(axis=1)
            return np.where(counted.any(axis=1)[:, None], largest, 0.0)
        return rows.sum(axis=1) / np.maximum(counted.sum(axis=1, keepdims=True), 1)

    def describe(self) -> str:
        return self.kind if self.padding is None else f"{self.kind} without id {self.padding}"


def _candidates(table: np.ndarray) -> list[Reduction]:
    zero_rows = np.flatnonzero(~table.any(axis=1))[:PADDING_CANDIDATES]
    padded = [Reduction(kind, int(row)) for row in zero_rows for kind in ("mean", "max")]
    return [*(Reduction(kind) for kind in _REDUCTIONS), *padded]


@dataclass(frozen=True)
class BagLoop:
    """A loop that may compute an embedding bag: its table, the id inputs that reach it, and the
    values that may hold its result (the loop's outputs and what they pass through)."""

    loop: ir.Node
    table: ir.Value
    ids: tuple[ir.Value, ...]
    results: tuple[ir.Value, ...]


def _outer_reads(node: ir.Node) -> list[ir.Value]:
    """Values of the main graph that ``node`` or any subgraph inside it reads."""
    main = node.graph
    reads = [value for value in node.inputs if value is not None]
    for attribute in node.attributes.values():
        if attribute.type != ir.AttributeType.GRAPH:
            continue
        for inner in ir.traversal.RecursiveGraphIterator(attribute.as_graph()):
            reads += [value for value in inner.inputs if value is not None and value.graph is main]
    return reads


def _ancestors(start: list[ir.Value]) -> tuple[set[ir.Value], list[ir.Node]]:
    """The values ``start`` is computed from (main graph) and the nodes that compute them."""
    seen: set[ir.Value] = set()
    nodes: list[ir.Node] = []
    stack = list(start)
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        producer = value.producer()
        if producer is not None:
            nodes.append(producer)
            stack += _outer_reads(producer)
    return seen, nodes


def _table_read_by(node: ir.Node) -> ir.Value | None:
    """The float matrix initializer ``node`` gathers rows of, if any."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.attributes.get_int("axis", 0) != 0:
        return None
    table = node.inputs[0]
    tensor = table.const_value if table is not None else None
    if table is None or tensor is None or not table.is_initializer() or table.is_graph_input():
        return None
    if len(tensor.shape) != 2 or not tensor.dtype.is_floating_point():
        return None
    return table


def find_bag_loops(model: ir.Model) -> list[BagLoop]:
    """Main-graph loops reading exactly one float table, with 2-D integer graph inputs upstream."""
    found = []
    for loop in model.graph:
        if loop.op_type != "Loop" or loop.domain not in ("", "ai.onnx"):
            continue
        body = loop.attributes["body"].as_graph()
        readers = [*ir.traversal.RecursiveGraphIterator(body)]
        values, upstream = _ancestors(_outer_reads(loop))
        tables = {table for node in [*readers, *upstream] if (table := _table_read_by(node)) is not None}
        ids = tuple(
            value
            for value in model.graph.inputs
            if value in values
            and value.dtype is not None
            and value.dtype.is_integer()
            and value.shape is not None
            and len(value.shape) == 2
        )
        if len(tables) != 1 or not ids:
            continue
        # Loop-carried outputs (a dynamo export's sequence of rows) only lead to results; scan
        # outputs and what passes them on are tensors.
        carried = len(loop.inputs) - 2
        results: list[ir.Value] = list(loop.outputs[carried:])
        frontier = list(loop.outputs)
        while frontier:
            value = frontier.pop()
            if value.producer() is not loop:
                results.append(value)
            frontier += [
                node.outputs[0]
                for node, _ in value.uses()
                if node.op_type in _PASS_THROUGH and node.graph is model.graph and len(node.inputs) == 1
            ]
        found.append(BagLoop(loop, tables.pop(), ids, tuple(results)))
    return found


def _random_ids(feeds: dict[str, np.ndarray], ids: ir.Value, rows: int, seed: int) -> dict[str, np.ndarray]:
    """``feeds`` with the input ``ids`` drawn uniformly over the table's rows."""
    name = ids.name or ""
    drawn = np.random.default_rng(seed).integers(0, rows, size=feeds[name].shape)
    return {**feeds, name: drawn.astype(feeds[name].dtype)}


def _matches(result: np.ndarray | None, expected: np.ndarray) -> bool:
    if result is None or result.shape != expected.shape or not np.issubdtype(result.dtype, np.floating):
        return False
    tolerance = CHECK_RTOL * np.abs(expected).max(initial=1.0)
    return bool(np.all(np.abs(result.astype(np.float64) - expected) <= tolerance))


def _session_exposing(model: ir.Model, values: tuple[ir.Value, ...]) -> ort.InferenceSession:
    """A session on ``model`` with ``values`` as extra outputs."""
    added = [value for value in values if not value.is_graph_output()]
    model.graph.outputs.extend(added)
    try:
        return runtime.make_session(model, "disable")
    finally:
        for value in added:
            model.graph.outputs.remove(value)


def _verified(model: ir.Model, bag: BagLoop, calibration: Calibration) -> tuple[ir.Value, ir.Value, Reduction] | None:
    """(result value, id input, reduction) the loop provably computes on the checked rows, the
    result furthest downstream first; None when no combination matches."""
    tensor = bag.table.const_value
    assert tensor is not None
    table = tensor.numpy().astype(np.float64)
    rows = min(CHECK_ROWS, calibration.feeds.rows)
    base = {name: array[:rows] for name, array in calibration.feeds.arrays.items()}
    named = tuple(value for value in bag.results if value.name)
    names = [value.name or "" for value in named]
    session = _session_exposing(model, named)
    for ids in bag.ids:
        checks = [base, _random_ids(base, ids, len(table), seed=len(table))]
        try:
            captured = [runtime.run(session, feeds, names, batch_size=None) for feeds in checks]
        except (UsageError, UnsupportedModelError):  # ids it rejects (a narrower range): not this input
            continue
        for value in reversed(named):
            for reduction in _candidates(table):
                if all(
                    _matches(found.get(value.name or ""), reduction.expected(table, feeds[ids.name or ""]))
                    for found, feeds in zip(captured, checks, strict=True)
                ):
                    return value, ids, reduction
    return None


def _constant(array: np.ndarray) -> ir.Node:
    return ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", ir.tensor(array))])


def _reduce(model: ir.Model, op: str, data: ir.Value, keepdims: int, nodes: list[ir.Node]) -> ir.Value:
    """``op`` over axis 1 of ``data``, its nodes appended to ``nodes``."""
    # Axes became an input of ReduceSum at opset 13 and of the other reductions at opset 18.
    if model.opset_imports.get("", 1) >= (13 if op == "ReduceSum" else 18):
        axes = _constant(np.array([1], np.int64))
        nodes.append(axes)
        reduced = ir.Node("", op, [data, axes.outputs[0]], attributes=[ir.AttrInt64("keepdims", keepdims)])
    else:
        attributes = [ir.AttrInt64("keepdims", keepdims), ir.AttrInt64s("axes", [1])]
        reduced = ir.Node("", op, [data], attributes=attributes)
    nodes.append(reduced)
    return reduced.outputs[0]


def _max_without(
    model: ir.Model, bag: BagLoop, ids: ir.Value, rows: ir.Value, padding: int, nodes: list[ir.Node]
) -> ir.Value:
    """The maximum over axis 1 of ``rows`` leaving out the rows of id ``padding`` (set to -inf
    first), 0 where a bag holds nothing else (its maximum is then -inf, which no row can be)."""
    dtype = bag.table.dtype or ir.DataType.FLOAT
    pad = _constant(np.array(padding, (ids.dtype or ir.DataType.INT64).numpy()))
    lowest = _constant(np.array(-np.inf, dtype.numpy()))
    zero = _constant(np.array(0, dtype.numpy()))
    same = ir.Node("", "Equal", [ids, pad.outputs[0]])
    nodes += [pad, lowest, zero, same]
    if model.opset_imports.get("", 1) >= 13:  # Unsqueeze's axes became an input at opset 13
        last = _constant(np.array([-1], np.int64))
        nodes.append(last)
        column = ir.Node("", "Unsqueeze", [same.outputs[0], last.outputs[0]])
    else:
        column = ir.Node("", "Unsqueeze", [same.outputs[0]], attributes=[ir.AttrInt64s("axes", [-1])])
    masked = ir.Node("", "Where", [column.outputs[0], lowest.outputs[0], rows])
    nodes += [column, masked]
    largest = _reduce(model, "ReduceMax", masked.outputs[0], 0, nodes)
    empty = ir.Node("", "Equal", [largest, lowest.outputs[0]])
    result = ir.Node("", "Where", [empty.outputs[0], zero.outputs[0], largest])
    nodes += [empty, result]
    return result.outputs[0]


def _rewrite(model: ir.Model, bag: BagLoop, result: ir.Value, ids: ir.Value, reduction: Reduction) -> None:
    graph = model.graph
    name = result.name or "bag"
    gathered = ir.Node("", "Gather", [bag.table, ids], attributes=[ir.AttrInt64("axis", 0)], name=f"{name}/gather")
    nodes = [gathered]
    if reduction.padding is None:
        output = _reduce(model, _REDUCE_OPS[reduction.kind], gathered.outputs[0], 0, nodes)
    elif reduction.kind == "max":
        output = _max_without(model, bag, ids, gathered.outputs[0], reduction.padding, nodes)
    else:
        # The padding row is zero: the sum over every id is the sum over the counted ones.
        total = _reduce(model, "ReduceSum", gathered.outputs[0], 0, nodes)
        dtype = bag.table.dtype or ir.DataType.FLOAT
        padding = _constant(np.array(reduction.padding, (ids.dtype or ir.DataType.INT64).numpy()))
        one = _constant(np.array(1, dtype.numpy()))
        same = ir.Node("", "Equal", [ids, padding.outputs[0]])
        counted = ir.Node("", "Not", [same.outputs[0]])
        as_float = ir.Node("", "Cast", [counted.outputs[0]], attributes=[ir.AttrInt64("to", dtype.value)])
        nodes += [padding, one, same, counted, as_float]
        count = _reduce(model, "ReduceSum", as_float.outputs[0], 1, nodes)
        at_least_one = ir.Node("", "Max", [count, one.outputs[0]])
        mean = ir.Node("", "Div", [total, at_least_one.outputs[0]])
        nodes += [at_least_one, mean]
        output = mean.outputs[0]
    if result.dtype is not None and bag.table.dtype != result.dtype:
        cast = ir.Node("", "Cast", [output], attributes=[ir.AttrInt64("to", result.dtype.value)])
        nodes.append(cast)
        output = cast.outputs[0]
    graph.insert_before(bag.loop, nodes)
    replace_value(result, output)
    _remove_if_dead(graph, bag.loop)


def _remove_if_dead(graph: ir.Graph, loop: ir.Node) -> None:
    """Remove the loop once nothing reads it, with its body's reads of the main graph: a removed
    node's subgraph still counts as a reader, which would keep the ids' offsets alive."""
    downstream = [loop]
    for node in downstream:
        for output in node.outputs:
            downstream += [user for user, _ in output.uses() if user.op_type in _PASS_THROUGH]
    if any(
        output.is_graph_output() or any(user not in downstream for user, _ in output.uses())
        for node in downstream
        for output in node.outputs
    ):
        return
    for node in reversed(downstream):
        detach_subgraphs(node)
        graph.remove(node, safe=True)


def vectorize_bags(model: ir.Model, calibration: Calibration | None) -> dict[str, str]:
    """Rewrite every embedding-bag loop that checks out (see the module docstring).

    Returns, per loop (by node name), the reduction it was replaced by or why it was kept. The
    loop itself is left to dead-code removal.
    """
    outcome: dict[str, str] = {}
    for bag in find_bag_loops(model):
        label = bag.loop.name or bag.table.name or "Loop"
        if calibration is None:
            outcome[label] = "kept: no calibration rows to check the rewrite on"
            continue
        dtype = bag.table.dtype
        if dtype is not None and dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE):
            # Summed in another order, float16 rows round differently: not lossless.
            outcome[label] = f"kept: {bag.table.name} is {dtype.name}, whose sums depend on their order"
            continue
        verified = _verified(model, bag, calibration)
        if verified is None:
            outcome[label] = f"kept: its result is not a sum, mean or max of {bag.table.name} rows on the checked ids"
            continue
        result, ids, reduction = verified
        _rewrite(model, bag, result, ids, reduction)
        outcome[label] = f"{reduction.describe()} of {bag.table.name} rows gathered by {ids.name}"
    return outcome
