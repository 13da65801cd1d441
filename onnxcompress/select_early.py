"""Compute only the position a model selects: a constant ``Gather`` moved up through row-wise ops.

A sequential recommender (SASRec) runs its transformer over the whole history and then scores only
the last position (``Gather(hidden, -1, axis=1)``). Every op of the last block that works row by row
(the query projection, the attention scores and softmax of each query, the output projection, the
residual adds, the norms, the feed-forward layers) then computes nineteen rows of twenty for nothing.
This rewrite moves the selection up the graph as far as the ops allow, so those ops run on the one
position; the keys and values, which every query reads, stay whole, and a ``Gather`` of a one-element index takes the
position from a value the rest of the graph still needs whole. The result is the same arithmetic on
fewer rows.

The selection is tracked as a *cut*: an axis and the position on it (the selected one), or, through a
``Reshape`` that merges the position's axis with the batch (``nn.MultiheadAttention`` computes on
``[positions * batch, width]``), the position on the outer factor of such a merged axis.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxcompress.graph import Dims, concrete_shapes, constant_array, constant_value, unique_name, value_dims

__all__ = ["select_early"]

_STANDARD = ("", "ai.onnx")
#: Ops computed element by element with numpy broadcasting: a cut of the output is the same cut of
#: every input that has the axis (an input of extent 1 there broadcasts and stays whole).
_ELEMENTWISE = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Mod", "Equal", "Greater", "Less",
        "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Not", "Relu", "LeakyRelu", "Sigmoid", "Tanh",
        "Elu", "Selu", "Softplus", "Gelu", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "Cast",
        "Identity", "HardSigmoid", "HardSwish", "Mish", "PRelu",
    }
)  # fmt: skip
_NORMALIZING = frozenset({"Softmax", "LogSoftmax", "LayerNormalization"})
_CUTTABLE = (
    _ELEMENTWISE
    | _NORMALIZING
    | {"Clip", "MatMul", "Gemm", "Transpose", "Reshape", "Concat", "Squeeze", "Unsqueeze", "Gather"}
)


@dataclass(frozen=True)
class _Cut:
    """The selected position of ``axis``; with ``outer``, the axis is read as ``[outer, rest]`` and the
    position is on ``outer`` (the cut keeps ``rest`` whole)."""

    axis: int
    outer: int | None = None


class _Product:
    """A product of dimensions: an integer times symbols (unknown dimensions are symbols of their own)."""

    def __init__(self, coefficient: int = 1, symbols: Counter[str] | None = None) -> None:
        self.coefficient = coefficient
        self.symbols: Counter[str] = symbols or Counter()

    def times(self, dim: int | str) -> _Product:
        if isinstance(dim, int):
            return _Product(self.coefficient * dim, self.symbols.copy())
        return _Product(self.coefficient, self.symbols + Counter([dim]))

    def divided(self, other: _Product) -> _Product | None:
        if other.coefficient == 0 or self.coefficient % other.coefficient or other.symbols - self.symbols:
            return None
        return _Product(self.coefficient // other.coefficient, self.symbols - other.symbols)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Product) and (self.coefficient, self.symbols) == (other.coefficient, other.symbols)

    __hash__ = None  # type: ignore[assignment]


def _product(dims: Dims) -> _Product:
    result = _Product()
    for dim in dims:
        result = result.times(dim)
    return result


def _reshape_groups(source: Dims, target: Dims) -> list[tuple[list[int], list[int]]] | None:
    """Axes of ``source`` and ``target`` grouped so each group holds the same elements (a merge,
    a split or one axis to one)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(source) or j < len(target):
        left: list[int] = []
        right: list[int] = []
        left_product, right_product = _Product(), _Product()
        if i < len(source):
            left.append(i)
            left_product, i = left_product.times(source[i]), i + 1
        if j < len(target):
            right.append(j)
            right_product, j = right_product.times(target[j]), j + 1
        while left_product != right_product:
            if j < len(target) and left_product.divided(right_product) is not None:
                right.append(j)
                right_product, j = right_product.times(target[j]), j + 1
            elif i < len(source) and right_product.divided(left_product) is not None:
                left.append(i)
                left_product, i = left_product.times(source[i]), i + 1
            else:
                return None
        groups.append((left, right))
    return groups


class _Rewrite:
    """One selection moved up: which nodes run cut (``requests``: the cut each of their inputs needs,
    None for an input read whole) and the rewrite that follows."""

    def __init__(self, model: ir.Model, root: ir.Node, position: int, shapes: dict[ir.Value, Dims | None]) -> None:
        self.model = model
        self.graph = model.graph
        self.root = root
        self.position = position
        self.index: ir.Value | None = None
        self.shapes = shapes
        self.demand: dict[ir.Value, _Cut | None] = {}
        self.requests: dict[ir.Node, dict[int, _Cut | None]] = {}
        opsets = model.opset_imports
        self.opset = opsets.get("", opsets.get("ai.onnx", 1))

    def dims(self, value: ir.Value | None) -> Dims | None:
        return value_dims(value, self.shapes)

    # --- which nodes can run cut ------------------------------------------------------------------

    def plan(self) -> bool:
        """Walk the graph backwards from the selection; False when nothing before it can run cut."""
        nodes = list(self.graph)
        root_index = nodes.index(self.root)
        dims = self.dims(self.root.inputs[0])
        axis = _normalized(self.root.attributes.get_int("axis", 0), dims)
        if axis is None or dims is None or dims[axis] == 1:
            return False  # a position of one: nothing to cut, or cut already (a second cleanup)
        self.requests[self.root] = {0: _Cut(axis), 1: None}
        for node in reversed(nodes[:root_index]):
            if len(node.outputs) < 1 or node.domain not in _STANDARD:
                continue
            output = node.outputs[0]
            cut = self._demanded(output)
            if cut is None or any(extra.uses() or extra.is_graph_output() for extra in node.outputs[1:]):
                continue
            requests = self._inputs_cut(node, cut)
            if requests is not None and self._materializable(node, requests):
                self.demand[output] = cut
                self.requests[node] = requests
        self._demote_reshapes()
        return any(node is not self.root for node in self.requests)

    def _demote_reshapes(self) -> None:
        """A Reshape whose input stays whole is cut after it instead: its view of the whole input
        costs nothing, while cutting before it needs a target of its own (bytes in the file)."""
        for node in self.graph:
            output_cut = self.demand.get(node.outputs[0]) if node.outputs else None
            if node is self.root or node.op_type != "Reshape" or output_cut is None or output_cut.outer is not None:
                continue
            source, wanted = node.inputs[0], self.requests[node][0]
            if source is not None and self.demand.get(source) == wanted and source.producer() in self.requests:
                continue
            del self.requests[node]
            del self.demand[node.outputs[0]]

    def _demanded(self, value: ir.Value) -> _Cut | None:
        """The cut every reader of ``value`` needs, or None when one needs it whole."""
        if value.is_graph_output():
            return None
        cuts = set()
        for use in value.uses():
            requests = self.requests.get(use.node)
            cut = None if requests is None else requests.get(use.idx)
            if cut is None:
                return None
            cuts.add(cut)
        return cuts.pop() if len(cuts) == 1 else None

    def _materializable(self, node: ir.Node, requests: dict[int, _Cut | None]) -> bool:
        """Every input the node needs cut can be cut (an outer cut needs the axes after it static)."""
        for index, cut in requests.items():
            if cut is None or cut.outer is None:
                continue
            dims = self.dims(node.inputs[index])
            if dims is None or not all(isinstance(dim, int) for dim in dims[cut.axis + 1 :]):
                return False
        return True

    def _inputs_cut(self, node: ir.Node, cut: _Cut) -> dict[int, _Cut | None] | None:
        out = self.dims(node.outputs[0])
        if out is None or cut.axis >= len(out):
            return None
        op = node.op_type
        if op in _ELEMENTWISE:
            return self._broadcast(node, list(range(len(node.inputs))), cut, out)
        if op == "Clip":
            return self._broadcast(node, [0], cut, out)
        if op in _NORMALIZING:
            default = -1 if op == "LayerNormalization" or self.opset >= 13 else 1
            normalized = _normalized(node.attributes.get_int("axis", default), out)
            if normalized is None:
                return None
            if op == "LayerNormalization" or self.opset < 13:
                # normalised over [axis, rank): the cut axis must come before
                if cut.axis >= normalized:
                    return None
            elif cut.axis == normalized:
                return None
            return {0: cut, **{index: None for index in range(1, len(node.inputs))}}
        if op == "MatMul":
            return self._matmul(node, cut, out)
        if op == "Gemm":
            if node.attributes.get_int("transA", 0) or cut.axis != 0:
                return None
            requests: dict[int, _Cut | None] = {0: cut, 1: None}
            if len(node.inputs) > 2:
                bias = self.dims(node.inputs[2])
                if bias is None or (len(bias) == 2 and bias[0] != 1):
                    return None
                requests[2] = None
            return requests
        if op == "Transpose":
            perm = node.attributes.get_ints("perm", list(reversed(range(len(out)))))
            return {0: _Cut(perm[cut.axis], cut.outer)}
        if op == "Reshape":
            return self._reshape(node, cut, out)
        if op == "Concat":
            concat_axis = _normalized(node.attributes.get_int("axis", 0), out)
            if concat_axis is None or concat_axis == cut.axis:
                return None
            return {index: cut for index in range(len(node.inputs))}
        if op in ("Squeeze", "Unsqueeze"):
            return self._squeeze(node, cut, out)
        if op == "Gather":
            return self._gather(node, cut)
        return None

    def _broadcast(self, node: ir.Node, cut_inputs: list[int], cut: _Cut, out: Dims) -> dict[int, _Cut | None] | None:
        requests: dict[int, _Cut | None] = {index: None for index in range(len(node.inputs))}
        for index in cut_inputs:
            if node.inputs[index] is None:
                continue
            dims = self.dims(node.inputs[index])
            if dims is None:
                return None
            known, requests[index] = self._aligned(dims, cut, out, unknown_extent_ok=True)
            if not known:
                return None
        return requests

    def _aligned(self, dims: Dims, cut: _Cut, out: Dims, *, unknown_extent_ok: bool) -> tuple[bool, _Cut | None]:
        """Whether an operand broadcast against the output ``out`` can follow the cut, and its cut:
        None when it lacks the axis or has extent 1 there (read whole). With
        ``unknown_extent_ok`` and the last position, an unknown extent is cut anyway: the last of one
        is itself, right whether it broadcasts or not."""
        aligned = cut.axis - (len(out) - len(dims))
        if aligned < 0 or dims[aligned] == 1:
            return True, None
        if dims[aligned] == out[cut.axis] and not str(dims[aligned]).startswith("?"):
            return True, _Cut(aligned, cut.outer)
        if unknown_extent_ok and self.position == -1 and cut.outer is None:
            return True, _Cut(aligned)
        return False, None

    def _matmul(self, node: ir.Node, cut: _Cut, out: Dims) -> dict[int, _Cut | None] | None:
        left, right = self.dims(node.inputs[0]), self.dims(node.inputs[1])
        if left is None or right is None or len(left) < 2 or len(right) < 2:
            return None
        rank = len(out)
        if cut.axis == rank - 2:
            return {0: _Cut(len(left) - 2, cut.outer), 1: None}
        if cut.axis == rank - 1:
            return {0: None, 1: _Cut(len(right) - 1, cut.outer)}
        requests: dict[int, _Cut | None] = {}
        for index, dims in ((0, left), (1, right)):
            known, requests[index] = self._aligned(dims, cut, out, unknown_extent_ok=False)
            if not known:
                return None
        return requests

    def _reshape(self, node: ir.Node, cut: _Cut, out: Dims) -> dict[int, _Cut | None] | None:
        source = self.dims(node.inputs[0])
        target = constant_array(node.inputs[1])
        if source is None or target is None:
            return None
        reshaped = _reshaped(source, target.tolist(), bool(node.attributes.get_int("allowzero", 0)))
        if reshaped is None or len(reshaped) != len(out):
            return None
        out = reshaped
        groups = _reshape_groups(source, out)
        if groups is None:
            return None
        left, right = next((left, right) for left, right in groups if cut.axis in right)
        if len(left) == 1 and len(right) == 1:
            source_cut = _Cut(left[0], cut.outer)
        elif len(left) == 1 and cut.axis == right[0]:
            outer = cut.outer if cut.outer is not None else out[cut.axis]
            if not isinstance(outer, int):
                return None
            source_cut = _Cut(left[0], outer)
        elif len(right) == 1 and cut.outer is not None and source[left[0]] == cut.outer:
            source_cut = _Cut(left[0])
        else:
            return None
        if self._cut_target(node, cut, source_cut) is None:
            return None
        return {0: source_cut, 1: None}

    def _cut_target(self, node: ir.Node, cut: _Cut, source_cut: _Cut) -> np.ndarray | None:
        """The Reshape's target for its cut input, or None when the target cannot say it."""
        target = constant_array(node.inputs[1])
        assert target is not None
        allowzero = node.attributes.get_int("allowzero", 0)
        result = target.astype(np.int64).copy()
        for index, entry in enumerate(target.tolist()):
            if entry == 0 and not allowzero and index == source_cut.axis and index != cut.axis:
                return None  # copies the cut extent into an axis that is not cut
        entry = int(target[cut.axis])
        if entry == -1:
            return result
        if entry == 0 and not allowzero:
            return result if source_cut == cut else None
        if cut.outer is None:
            result[cut.axis] = 1
        elif entry % cut.outer == 0:
            result[cut.axis] = entry // cut.outer
        else:
            return None
        return result

    def _squeeze(self, node: ir.Node, cut: _Cut, out: Dims) -> dict[int, _Cut | None] | None:
        axes_value = node.inputs[1] if len(node.inputs) > 1 else None
        axes_array = constant_array(axes_value) if axes_value is not None else None
        if axes_array is not None:
            axes = [int(axis) for axis in axes_array.reshape(-1)]
        elif "axes" in node.attributes:
            axes = list(node.attributes.get_ints("axes", []))
        else:
            return None
        requests: dict[int, _Cut | None] = {index: None for index in range(len(node.inputs))}
        if node.op_type == "Unsqueeze":
            rank = len(out)
            inserted = sorted(axis % rank for axis in axes)
            if cut.axis in inserted:
                return None
            requests[0] = _Cut(cut.axis - sum(axis < cut.axis for axis in inserted), cut.outer)
        else:
            source = self.dims(node.inputs[0])
            if source is None:
                return None
            removed = sorted(axis % len(source) for axis in axes)
            kept = [axis for axis in range(len(source)) if axis not in removed]
            requests[0] = _Cut(kept[cut.axis], cut.outer)
        return requests

    def _gather(self, node: ir.Node, cut: _Cut) -> dict[int, _Cut | None] | None:
        """Through a lookup (ids computed or fed), not through a selection of constant positions:
        cutting above one saves nothing unless its source is cut too, and a cut's own Gather would
        otherwise move up again in every later cleanup."""
        data, indices = self.dims(node.inputs[0]), self.dims(node.inputs[1])
        if data is None or indices is None or constant_array(node.inputs[1]) is not None:
            return None
        axis = _normalized(node.attributes.get_int("axis", 0), data)
        if axis is None:
            return None
        if cut.axis < axis:
            return {0: cut, 1: None}
        if cut.axis < axis + len(indices):
            return {0: None, 1: _Cut(cut.axis - axis, cut.outer)}
        return {0: _Cut(cut.axis - len(indices) + 1, cut.outer), 1: None}

    # --- the rewrite ------------------------------------------------------------------------------

    def apply(self) -> int:
        """Rewrite the planned nodes in place (their inputs cut, Reshape targets adjusted) and cut
        what they read whole; returns how many nodes now run cut."""
        cut_values: dict[tuple[ir.Value, _Cut], ir.Value] = {}
        rewritten = 0
        for node in list(self.graph):
            requests = self.requests.get(node)
            if requests is None:
                continue
            if node.op_type == "Reshape" and node is not self.root:
                output_cut = self.demand[node.outputs[0]]
                source_cut = requests[0]
                assert output_cut is not None and source_cut is not None
                target = self._cut_target(node, output_cut, source_cut)
                assert target is not None
                node.replace_input_with(1, self._initializer("cut_shape", target))
            for index, cut in requests.items():
                value = node.inputs[index]
                if cut is None or value is None:
                    continue
                if self.demand.get(value) == cut and value.producer() in self.requests:
                    continue  # rewritten in place
                key = (value, cut)
                if key not in cut_values:
                    cut_values[key] = self._cut(node, value, cut)
                node.replace_input_with(index, cut_values[key])
            if node is not self.root:
                node.outputs[0].shape = None
                rewritten += 1
        if self.position != -1:  # the last of one position is position 0 too
            index_value = self.root.inputs[1]
            assert index_value is not None
            dtype = constant_array(index_value).dtype  # type: ignore[union-attr]
            self.root.replace_input_with(1, self._initializer("cut_index", np.zeros((), dtype)))
        return rewritten

    def _position_index(self) -> ir.Value:
        if self.index is None:
            self.index = self._initializer("cut_position", np.array([self.position], np.int64))
        return self.index

    def _initializer(self, base: str, array: np.ndarray) -> ir.Value:
        value = constant_value(unique_name(self.graph, base), array)
        self.graph.register_initializer(value)
        return value

    def _cut(self, reader: ir.Node, value: ir.Value, cut: _Cut) -> ir.Value:
        """``value`` cut by nodes inserted before ``reader``."""
        # A Gather of a one-element index keeps the axis, in one small initializer every cut shares.
        gather = ir.node("Gather", [value, self._position_index()], attributes={"axis": cut.axis})
        nodes = [gather]
        if cut.outer is not None:
            # Read the axis as [outer, rest], take the position on outer, merge back.
            dims = self.dims(value)
            assert dims is not None
            before, after = [0] * cut.axis, [int(dim) for dim in dims[cut.axis + 1 :]]
            split = self._initializer("cut_split", np.array([*before, cut.outer, -1, *after], np.int64))
            merge = self._initializer("cut_merge", np.array([*before, -1, *after], np.int64))
            nodes = [ir.node("Reshape", [value, split])]
            gather.replace_input_with(0, nodes[0].outputs[0])
            nodes += [gather, ir.node("Reshape", [gather.outputs[0], merge])]
        for inserted in nodes:
            inserted.outputs[0].name = unique_name(self.graph, "cut")
        self.graph.insert_before(reader, nodes)
        return nodes[-1].outputs[0]


def _reshaped(source: Dims, target: list[int], allowzero: bool) -> Dims | None:
    """What a Reshape to ``target`` makes of ``source``'s dimensions (symbols carried through)."""
    dims: list[int | str | None] = []
    for index, entry in enumerate(target):
        if entry == 0 and not allowzero:
            if index >= len(source):
                return None
            dims.append(source[index])
        else:
            dims.append(None if entry == -1 else int(entry))
    if None in dims:
        rest = _product(source).divided(_product([dim for dim in dims if dim is not None]))
        if rest is None:
            return None
        if not rest.symbols:
            inferred: int | str = rest.coefficient
        elif rest.coefficient == 1 and sum(rest.symbols.values()) == 1:
            inferred = next(iter(rest.symbols))
        else:
            return None
        dims = [inferred if dim is None else dim for dim in dims]
    return [dim for dim in dims if dim is not None]


def _normalized(axis: int, dims: Dims | None) -> int | None:
    if dims is None or not -len(dims) <= axis < len(dims):
        return None
    return axis % len(dims)


def _selections(graph: ir.Graph) -> list[tuple[ir.Node, int]]:
    """Gathers of one constant position from a computed value (not from a table)."""
    found = []
    for node in graph:
        if node.op_type != "Gather" or node.domain not in _STANDARD or len(node.inputs) != 2:
            continue
        data, index = node.inputs
        array = constant_array(index)
        producer = data.producer() if data is not None else None
        if producer is None or array is None or array.shape != () or producer.op_type not in _CUTTABLE:
            continue
        found.append((node, int(array)))
    return found


def select_early(model: ir.Model) -> int:
    """Move each constant-position Gather up through the row-wise ops before it; returns how many
    nodes now compute the selected position only."""
    # A dead reader (the Shape of a Reshape target folded to a constant) would keep its value whole.
    RemoveUnusedNodesPass()(model)
    total = 0
    shapes: dict[ir.Value, Dims | None] | None = None
    for root, position in _selections(model.graph):
        if shapes is None:
            shapes = concrete_shapes(model)
        rewrite = _Rewrite(model, root, position, shapes)
        if rewrite.plan():
            total += rewrite.apply()
            shapes = None  # the cut values' shapes changed
    return total
