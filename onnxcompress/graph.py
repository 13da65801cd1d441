"""Recognising recommender structure in a graph: which initializers are weights, and of what kind.

Which input of an op is its weight, and along which axes it has output channels and its reduction,
is a data table (``WEIGHT_SLOTS``) rather than if-chains, so a new op is one row.
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

__all__ = [
    "NO_WEIGHTS_HINT",
    "OVERRIDABLE_WEIGHT",
    "RECURRENT_OPS",
    "RECURRENT_SLOTS",
    "WEIGHT_SLOTS",
    "ChainPair",
    "Dims",
    "HiddenLink",
    "LinearLayer",
    "ReluChain",
    "WeightUse",
    "concrete_shapes",
    "constant_axes",
    "constant_value",
    "detach_subgraphs",
    "dot_product_pairs",
    "inferred_shapes",
    "is_constant_initializer",
    "linear_layers",
    "mlp_links",
    "relu_chains",
    "replace_contents",
    "replace_value",
    "set_constant",
    "value_dims",
    "weight_slots",
    "weight_uses",
    "weights_by_value",
]

#: From this opset Split takes its sizes as an input (before, as an attribute).
SPLIT_INPUT_OPSET = 13

#: Why a model that stores no weights has nothing to compress and feeds that miss its parameters.
NO_WEIGHTS_HINT = (
    "the model stores no weights, so its parameters are graph inputs (torch.onnx.export(..., "
    "export_params=False)); re-export it with export_params=True"
)

#: Why a pass leaves a weight that is also a graph input alone.
OVERRIDABLE_WEIGHT = (
    "a graph input: callers may override it (when every weight is one, cleanup.initializer_inputs makes them constants)"
)


@dataclass(frozen=True)
class WeightUse:
    """One node reading an initializer as a weight.

    ``out_axis`` is the axis of output channels (rows for an embedding table); ``reduce_axis`` the
    axis summed over by a linear op (None for lookups).
    """

    node: ir.Node
    input_index: int
    value: ir.Value
    kind: str  # "linear", "conv", "recurrent" or "embedding"
    out_axis: int
    reduce_axis: int | None


# op type -> (weight input index, kind, rank required, (out_axis, reduce_axis) from the node)
Slot = tuple[int, str, int | None, Callable[[ir.Node], tuple[int, int | None] | None]]


def _gemm_axes(node: ir.Node) -> tuple[int, int | None]:
    return (0, 1) if node.attributes.get_int("transB", 0) else (1, 0)


def _gather_axes(node: ir.Node) -> tuple[int, int | None] | None:
    return (0, None) if node.attributes.get_int("axis", 0) == 0 else None


WEIGHT_SLOTS: dict[str, Slot] = {
    "MatMul": (1, "linear", 2, lambda node: (1, 0)),
    "Gemm": (1, "linear", 2, _gemm_axes),
    "Conv": (1, "conv", None, lambda node: (0, 1)),
    "Gather": (0, "embedding", 2, _gather_axes),
}
#: Recurrent ops read two weights: W (input 1, ``[directions, gates x hidden, inputs]``) and R
#: (input 2, ``[directions, gates x hidden, hidden]``). Each direction's gate row is an output
#: channel: kind ``recurrent`` flattens the two leading axes into rows (``out_axis`` 0).
RECURRENT_SLOTS: tuple[Slot, ...] = tuple((index, "recurrent", 3, lambda node: (0, 2)) for index in (1, 2))
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})


def weight_slots(node: ir.Node) -> tuple[Slot, ...]:
    """The weight inputs ``node`` reads (none for an op outside the standard domain)."""
    if node.domain not in ("", "ai.onnx"):
        return ()
    if node.op_type in RECURRENT_OPS:
        return RECURRENT_SLOTS
    slot = WEIGHT_SLOTS.get(node.op_type)
    return () if slot is None else (slot,)


def is_constant_initializer(value: ir.Value | None) -> bool:
    """An initializer with data that the caller cannot override (so not also a graph input)."""
    return (
        value is not None
        and value.is_initializer()
        and value.const_value is not None
        and not value.is_graph_input()
        and not value.is_graph_output()
    )


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's data when it is fixed: a non-overridable initializer or a Constant node's output."""
    if value is None:
        return None
    if is_constant_initializer(value):
        return value.const_value.numpy()  # type: ignore[union-attr]
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor().numpy()
    return None


def constant_value(name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    """A value holding ``array`` with its type and shape set, ready to register as an initializer.

    onnx-ir serialises a value's shape only when its type is known (it logs a warning per value
    otherwise), so a constant is never created without both.
    """
    tensor = ir.tensor(array, dtype=dtype, name=name)
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)


def detach_subgraphs(node: ir.Node) -> None:
    """Drop every input of the nodes inside ``node``'s subgraphs: a removed If or Loop would
    otherwise still count as a reader of the enclosing graph's values its body reads."""
    for attribute in node.attributes.values():
        if attribute.type != ir.AttributeType.GRAPH:
            continue
        for inner in ir.traversal.RecursiveGraphIterator(attribute.as_graph()):
            for index in range(len(inner.inputs)):
                inner.replace_input_with(index, None)


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Make every reader of ``old`` read ``new``, which takes its type and shape and, when ``old`` is
    a graph output, its name: the interface is unchanged."""
    was_graph_output = old.is_graph_output()
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    new.type, new.shape = old.type, old.shape
    if was_graph_output:
        name, old.name = old.name, None
        new.name = name


def unique_name(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ...: the first not yet used by an initializer, a node
    or a node's output in ``graph``."""
    taken = set(graph.initializers) | {node.name for node in graph}
    taken |= {value.name for node in graph for value in node.outputs}
    name, suffix = base, 1
    while name in taken:
        name, suffix = f"{base}_{suffix}", suffix + 1
    return name


def set_constant(value: ir.Value, array: np.ndarray) -> None:
    """Replace the contents of initializer ``value`` by ``array``, keeping its type and shape in step."""
    tensor = ir.tensor(array, name=value.name)
    value.const_value = tensor
    value.type = ir.TensorType(tensor.dtype)
    value.shape = ir.Shape(array.shape)


def weight_uses(model: ir.Model) -> list[WeightUse]:
    """Every (node, weight) pair of the main graph, in graph order, for float weights only."""
    uses = []
    for node in model.graph:
        for index, kind, rank, axes_of in weight_slots(node):
            value = node.inputs[index] if index < len(node.inputs) else None
            if not is_constant_initializer(value):
                continue
            assert value is not None and value.const_value is not None
            tensor = value.const_value
            if not tensor.dtype.is_floating_point() or (rank is not None and len(tensor.shape) != rank):
                continue
            axes = axes_of(node)
            if axes is None:
                continue
            uses.append(WeightUse(node, index, value, kind, axes[0], axes[1]))
    return uses


def weights_by_value(model: ir.Model) -> dict[ir.Value, list[WeightUse]]:
    """Weight uses grouped by initializer, so a shared (tied) weight is transformed once."""
    grouped: dict[ir.Value, list[WeightUse]] = defaultdict(list)
    for use in weight_uses(model):
        grouped[use.value].append(use)
    return dict(grouped)


# --- MLP chains -------------------------------------------------------------------------------------

#: Ops that act on each element alone, so they commute with removing hidden units.
ELEMENTWISE_UNARY = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "Elu",
        "Selu",
        "Celu",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Softplus",
        "Softsign",
        "Gelu",
        "Erf",
        "Mish",
        "ThresholdedRelu",
        "Identity",
        "Dropout",
        "Abs",
        "Neg",
    }
)
#: Binary ops that stay per-unit when their other input is a per-unit (or scalar) constant.
ELEMENTWISE_BINARY = frozenset({"Add", "Sub", "Mul", "Div"})
#: BatchNormalization inputs holding one value per channel (scale, bias, mean, variance).
BATCHNORM_PARAMS = (1, 2, 3, 4)


@dataclass(frozen=True)
class LinearLayer:
    """A MatMul or Gemm with a constant weight, as ``y = x @ W_eff + b``.

    ``W_eff`` is the weight in ``[d_in, d_out]`` orientation (a ``transB`` Gemm stores its
    transpose, ``out_axis == 0``). ``bias`` is Gemm's C, or the constant of an Add that alone
    consumes a MatMul's output (the dynamo, tf2onnx and skl2onnx form); ``output`` is the value
    after the bias. The data input is ``node.inputs[0]``.
    """

    node: ir.Node
    weight: ir.Value
    out_axis: int
    bias: ir.Value | None
    bias_node: ir.Node | None
    output: ir.Value

    @property
    def data(self) -> ir.Value:
        """The layer's input activations (``node.inputs[0]``)."""
        value = self.node.inputs[0]
        assert value is not None, "linear_layers only yields nodes with a data input"
        return value

    @property
    def d_out(self) -> int:
        return _dims(self.weight)[self.out_axis]

    @property
    def d_in(self) -> int:
        return _dims(self.weight)[1 - self.out_axis]


def _dims(value: ir.Value) -> tuple[int, ...]:
    """The static shape of a constant's tensor."""
    assert value.const_value is not None
    return tuple(int(dim) for dim in value.const_value.shape.numpy())


def _per_unit_shape(shape: tuple[int, ...], width: int) -> bool:
    """A constant that broadcasts along the last axis only: size 1, or ``[..., 1, width]``."""
    size = 1
    for dim in shape:
        size *= dim
    return size == 1 or (len(shape) >= 1 and shape[-1] == width and size == width)


def _bias_of(value: ir.Value, node: ir.Node, width: int) -> tuple[ir.Value, ir.Node] | None:
    """The constant per-output Add that alone reads ``value`` (a MatMul's output), if any."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    add, index = uses[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - index]
    if not is_constant_initializer(other):
        return None
    assert other is not None and other.const_value is not None
    if not _per_unit_shape(_dims(other), width) or len(_dims(other)) > 2:
        return None
    return other, add


def linear_layers(model: ir.Model) -> list[LinearLayer]:
    """MatMul/Gemm nodes of the main graph computing ``x @ W + b`` with a constant 2-D weight.

    Gemm counts only with ``transA=0`` and ``alpha=beta=1`` (so ``W_eff`` and ``b`` are the stored
    tensors); a weight used by a Gather as well is still a linear layer here.
    """
    layers = []
    for use in weight_uses(model):
        node = use.node
        if use.kind != "linear":
            continue
        if node.op_type == "Gemm" and (
            node.attributes.get_int("transA")
            or node.attributes.get_float("alpha", 1.0) != 1.0
            or node.attributes.get_float("beta", 1.0) != 1.0
        ):
            continue
        if node.inputs[0] is None:
            continue
        width = _dims(use.value)[use.out_axis]
        output = node.outputs[0]
        bias: ir.Value | None = None
        bias_node: ir.Node | None = None
        if node.op_type == "Gemm":
            c = node.inputs[2] if len(node.inputs) > 2 else None
            if c is not None:
                if not is_constant_initializer(c) or not _per_unit_shape(_dims(c), width):
                    continue
                bias = c
        else:
            found = _bias_of(output, node, width)
            if found is not None:
                bias, bias_node = found
                output = bias_node.outputs[0]
        layers.append(LinearLayer(node, use.value, use.out_axis, bias, bias_node, output))
    return layers


@dataclass(frozen=True)
class HiddenLink:
    """Hidden units between two linear layers: ``producer`` -> elementwise ``between`` -> ``consumer``.

    Removing unit ``j`` means dropping the producer's output ``j`` (its weight row or column and bias
    entry), entry ``j`` of every per-unit constant and BatchNormalization parameter in ``between``,
    and the consumer's input row ``j``. The units are the last axis of every value on the way.
    """

    producer: LinearLayer
    between: tuple[ir.Node, ...]
    consumer: LinearLayer
    #: Nodes of ``between`` that together compute one elementwise function of the units from
    #: several paths (GELU's erf form, ``x * 0.5 * (1 + erf(x / sqrt(2)))``; SiLU as
    #: ``x * sigmoid(x)``): per unit as a whole, but not a chain of single steps.
    fused: frozenset[ir.Node] = frozenset()

    @property
    def width(self) -> int:
        return self.producer.d_out


def _constant_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if not is_constant_initializer(value):
        return None
    assert value is not None
    return _dims(value)


def _step(node: ir.Node, index: int, width: int, rank: int | None) -> str | None:
    """Why the hidden units cannot pass through ``node`` (entered at input ``index``), or None."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return f"hidden units reach {node.domain}::{op}"
    if op in ELEMENTWISE_UNARY:
        if op == "Dropout" and len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
            return "hidden units reach a Dropout whose mask is used"
        return None if index == 0 else f"hidden units reach {op} input {index}"
    if op in ELEMENTWISE_BINARY:
        if len(node.inputs) != 2:
            return f"hidden units reach {op}"
        shape = _constant_shape(node.inputs[1 - index])
        if shape is None and _is_scalar_constant(node.inputs[1 - index]):  # a Constant node's scalar
            return None
        if shape is None:
            return f"hidden units reach {op} with a non-constant other input (a residual or gate)"
        if not _per_unit_shape(shape, width) or (rank is not None and len(shape) > rank):
            return f"hidden units reach {op} with a constant of shape {list(shape)} that is not per unit"
        return None
    if op == "PRelu":
        shape = _constant_shape(node.inputs[1]) if index == 0 and len(node.inputs) > 1 else None
        return None if shape is not None and _per_unit_shape(shape, width) else "hidden units reach PRelu"
    if op == "Clip":
        bounds = [_constant_shape(value) for value in node.inputs[1:] if value is not None]
        if index == 0 and all(shape is not None and _per_unit_shape(shape, 1) for shape in bounds):
            return None
        return "hidden units reach Clip with non-constant bounds"
    if op == "BatchNormalization":
        if index != 0 or rank != 2 or (len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:])):
            return "hidden units reach BatchNormalization whose channel axis is not the unit axis"
        if node.attributes.get_int("training_mode", 0):
            return "hidden units reach BatchNormalization in training mode"
        if any(_constant_shape(node.inputs[i]) != (width,) for i in BATCHNORM_PARAMS):
            return "hidden units reach BatchNormalization with non-constant parameters"
        return None
    if op == "Reshape":
        return "hidden units reach Reshape (for example a split into attention heads)"
    return f"hidden units reach {op}"


#: Ops an elementwise region may hold, and the most nodes it may have (GELU's tanh form has 9).
_REGION_OPS = ELEMENTWISE_UNARY | ELEMENTWISE_BINARY | {"Pow"}
_REGION_MAX_NODES = 12


def _elementwise_region(value: ir.Value) -> tuple[list[ir.Node], ir.Value] | None:
    """The nodes computing one elementwise function of ``value`` along several paths that join
    again (every input ``value``, a value they compute, or a one-element constant), and the value
    where they join; None if ``value``'s uses do not close into such a region."""
    inside = {value}
    nodes: list[ir.Node] = []
    while len(nodes) < _REGION_MAX_NODES:
        ready = None
        for known in list(inside):
            for node, _ in known.uses():
                if node in nodes or node.domain not in ("", "ai.onnx") or node.op_type not in _REGION_OPS:
                    continue
                if len(node.outputs) != 1 or not all(
                    item is None or item in inside or _is_scalar_constant(item) for item in node.inputs
                ):
                    continue
                ready = node
                break
            if ready is not None:
                break
        if ready is None:
            return None
        nodes.append(ready)
        inside.add(ready.outputs[0])
        region = set(nodes)
        open_values = [
            known for known in inside if known.is_graph_output() or any(node not in region for node, _ in known.uses())
        ]
        if open_values == [ready.outputs[0]] and not ready.outputs[0].is_graph_output():
            return nodes, ready.outputs[0]
    return None


def _is_scalar_constant(value: ir.Value | None) -> bool:
    """A constant of one value and at most one axis (one of more axes could broadcast the units
    into a higher rank); TorchScript keeps GELU's constants in Constant nodes."""
    array = constant_array(value)
    return array is not None and array.size == 1 and array.ndim <= 1


def _walk(producer: LinearLayer, consumers: dict[ir.Node, LinearLayer]) -> HiddenLink | str:
    """Follow the producer's output through elementwise ops to the next linear layer, or say why not."""
    width = producer.d_out
    rank = _output_rank(producer)
    value = producer.output
    between: list[ir.Node] = []
    fused: set[ir.Node] = set()
    while True:
        if value.is_graph_output():
            return "hidden units are a graph output"
        uses = list(value.uses())
        if len(uses) != 1:
            if not uses:
                return "hidden units are unused"
            region = _elementwise_region(value)
            if region is None:
                return f"hidden units feed {len(uses)} nodes ({', '.join(sorted(n.op_type for n, _ in uses))})"
            between += region[0]
            fused.update(region[0])
            value = region[1]
            continue
        node, index = uses[0]
        consumer = consumers.get(node)
        if consumer is not None:
            if index != 0:
                return f"hidden units reach {node.op_type} input {index}"
            if consumer.d_in != width:
                return f"the next layer reads {consumer.d_in} inputs, not {width}"
            return HiddenLink(producer, tuple(between), consumer, frozenset(fused))
        reason = _step(node, index, width, rank)
        if reason is not None:
            return reason
        between.append(node)
        value = node.outputs[0]


def mlp_links(model: ir.Model) -> tuple[list[HiddenLink], dict[str, str]]:
    """Every prunable hidden layer of the main graph, in graph order, and why the others are not.

    The second result maps each linear layer's node name that does not start a link to the reason
    (its units reach a reshape, a residual add, a concat, a graph output, ...). Links whose producer
    or consumer weight is shared with another node are refused: shrinking one use would break the tie.
    """
    layers = linear_layers(model)
    consumers = {layer.node: layer for layer in layers}
    links: list[HiddenLink] = []
    reasons: dict[str, str] = {}
    for layer in layers:
        name = layer.node.name or layer.weight.name or "?"
        if len(layer.weight.uses()) != 1:
            reasons[name] = "its weight is shared with another node"
            continue
        found = _walk(layer, consumers)
        if isinstance(found, str):
            reasons[name] = found
        elif len(found.consumer.weight.uses()) != 1:
            reasons[name] = "the next layer's weight is shared with another node"
        else:
            links.append(found)
    return links, reasons


@dataclass(frozen=True)
class ReluChain:
    """Linear layers, each feeding the next through a ReLU, optionally after an inference-mode
    BatchNormalization: ``norms[i]`` is the per-unit ``(scale, shift)`` it applies to layer ``i``'s
    output (``None`` for a lone ReLU; one entry per link, so one fewer than ``layers``)."""

    layers: list[LinearLayer]
    norms: list[tuple[np.ndarray, np.ndarray] | None]


def _norm_affine(node: ir.Node, width: int) -> tuple[np.ndarray, np.ndarray] | None:
    """An inference-mode BatchNormalization on ``[batch, units]`` as per-unit ``(scale, shift)``, or
    None when it is not one (training mode, parameters not constant, a scale of zero)."""
    attributes = node.attributes
    training = attributes.get("training_mode")
    if len(node.outputs) != 1 or (training is not None and training.as_int()):
        return None
    params = [constant_array(value) for value in node.inputs[1:5]]
    if any(param is None or param.size != width for param in params):
        return None
    gamma, beta, mean, var = (np.asarray(param, dtype=np.float64).reshape(-1) for param in params)  # type: ignore[arg-type]
    epsilon = attributes.get_float("epsilon", 1e-5)
    scale = gamma / np.sqrt(var + epsilon)
    if not np.all(np.abs(scale) > 1e-12):
        return None
    return scale, beta - mean * scale


def relu_chains(model: ir.Model, layers: Sequence[LinearLayer]) -> list[ReluChain]:
    """Runs of two or more of ``layers``, each feeding the next through one Relu, alone or after
    an inference-mode BatchNormalization (an MLP's hidden links, :func:`mlp_links`), in the order
    of ``layers``."""
    links, _ = mlp_links(model)
    by_node = {layer.node: layer for layer in layers}
    following: dict[ir.Node, tuple[LinearLayer, tuple[np.ndarray, np.ndarray] | None]] = {}
    for link in links:
        if link.producer.node not in by_node or link.consumer.node not in by_node:
            continue
        ops = [node.op_type for node in link.between]
        if ops == ["Relu"]:
            following[link.producer.node] = (by_node[link.consumer.node], None)
        elif ops == ["BatchNormalization", "Relu"]:
            affine = _norm_affine(link.between[0], link.producer.d_out)
            if affine is not None:
                following[link.producer.node] = (by_node[link.consumer.node], affine)
    fed = {layer.node for layer, _ in following.values()}
    chains = []
    for layer in layers:
        if layer.node in fed:
            continue
        chain = ReluChain([layer], [])
        while chain.layers[-1].node in following:
            successor, affine = following[chain.layers[-1].node]
            chain.layers.append(successor)
            chain.norms.append(affine)
        if len(chain.layers) > 1:
            chains.append(chain)
    return chains


@dataclass(frozen=True)
class ChainPair:
    """Two chains whose outputs the model reads only through their row-wise dot product, of the
    rows scaled to unit length when ``normalized`` (a two-tower model's cosine score)."""

    first: ReluChain
    second: ReluChain
    normalized: bool


#: Ops an L2 norm may pass through on its way to the division (a floor against zero, broadcasting).
_NORM_PATH_OPS = frozenset({"Clip", "Max", "Expand", "Reshape", "Unsqueeze", "Identity", "Cast"})


def dot_product_pairs(chains: Sequence[ReluChain]) -> list[ChainPair]:
    """The pairs among ``chains`` whose last layers' outputs meet only in ``ReduceSum(a * b)`` over
    their last axis, directly or each divided by its own L2 norm (``ReduceL2``, or
    ``LpNormalization`` with p=2), in the order of ``chains``."""
    ends: dict[ir.Value, tuple[ReluChain, bool]] = {}
    for chain in chains:
        found = _dot_operand(chain.layers[-1])
        if found is not None:
            ends[found[0]] = (chain, found[1])
    pairs = []
    for operand, (chain, normalized) in ends.items():
        ((mul, index),) = operand.uses()
        other = mul.inputs[1 - index]
        if index != 0 or other is None or other not in ends:
            continue
        partner, partner_normalized = ends[other]
        if partner_normalized == normalized and partner.layers[-1].d_out == chain.layers[-1].d_out:
            pairs.append(ChainPair(chain, partner, normalized))
    return pairs


def _dot_operand(layer: LinearLayer) -> tuple[ir.Value, bool] | None:
    """The value of ``layer``'s output (itself, or its unit rows) that enters a ``Mul`` whose only
    reader sums its last axis, and whether it was normalised; None for anything else."""
    rank = _output_rank(layer)
    out = layer.output
    if out.is_graph_output():
        return None
    uses = [node for node, _ in out.uses()]
    operand, normalized = out, False
    if len(uses) == 1 and uses[0].op_type == "LpNormalization":
        node = uses[0]
        if node.attributes.get_int("p", 2) != 2 or not _is_last_axis(node.attributes.get_int("axis", -1), rank):
            return None
        operand, normalized = node.outputs[0], True
    elif len(uses) == 2:
        unit = _unit_rows(out, rank)
        if unit is None:
            return None
        operand, normalized = unit, True
    if operand.is_graph_output():
        return None
    readers = list(operand.uses())
    if len(readers) != 1 or readers[0][0].op_type != "Mul":
        return None
    mul = readers[0][0]
    if mul.inputs[0] is mul.inputs[1] or mul.outputs[0].is_graph_output():
        return None
    sums = [node for node, _ in mul.outputs[0].uses()]
    if len(sums) != 1 or sums[0].op_type != "ReduceSum" or not _reduces_last_axis(sums[0], rank):
        return None
    return operand, normalized


def _output_rank(layer: LinearLayer) -> int | None:
    if layer.node.op_type == "Gemm":
        return 2
    shape = layer.output.shape
    return len(shape) if shape is not None else None


def _is_last_axis(axis: int, rank: int | None) -> bool:
    """Whether ``axis`` is the last one: -1, or ``rank - 1`` when the rank is known."""
    return axis == -1 or (rank is not None and axis == rank - 1)


def constant_axes(node: ir.Node) -> list[int] | None:
    """The constant ``axes`` of a Squeeze, Unsqueeze or reduction: an input from opset 13 (18 for
    most reductions), an attribute before; None when not constant or absent."""
    if len(node.inputs) > 1:
        axes = constant_array(node.inputs[1])
        return None if axes is None else [int(axis) for axis in axes.reshape(-1)]
    attribute = node.attributes.get("axes")
    return None if attribute is None else list(attribute.as_ints())


def _reduces_last_axis(node: ir.Node, rank: int | None) -> bool:
    axes = constant_axes(node)
    return axes is not None and len(axes) == 1 and _is_last_axis(axes[0], rank)


def _unit_rows(out: ir.Value, rank: int | None) -> ir.Value | None:
    """``out / ReduceL2(out)`` over the last axis (through a floor and a broadcast), when those two
    nodes are ``out``'s only readers: the normalised rows, else None."""
    uses = list(out.uses())
    divisions = [node for node, index in uses if node.op_type == "Div" and index == 0]
    norms = [node for node, _ in uses if node.op_type == "ReduceL2" and _reduces_last_axis(node, rank)]
    if len(divisions) != 1 or len(norms) != 1:
        return None
    value = divisions[0].inputs[1]
    while value is not None and len(value.uses()) == 1 and not value.is_graph_output():
        node = value.producer()
        if node is norms[0]:
            return divisions[0].outputs[0]
        if node is None or node.op_type not in _NORM_PATH_OPS:
            return None
        shaping = node.op_type in ("Expand", "Reshape")
        if not shaping and any(constant_array(extra) is None for extra in node.inputs[1:] if extra is not None):
            return None
        value = node.inputs[0]
    return None


def replace_contents(model: ir.Model, source: ir.Model) -> None:
    """Make ``model`` (the same object, which callers hold) hold ``source``'s graph and functions:
    how a pass keeps a result it built on a copy."""
    model.graph = source.graph
    model.ir_version = source.ir_version
    model.functions.clear()
    model.functions.update(source.functions)


def inferred_shapes(
    model: ir.Model, values: list[ir.Value]
) -> dict[ir.Value, tuple[ir.Shape | None, ir.DataType | None]]:
    """The shapes and element types onnx's shape inference gives ``values``; the model's own are left
    as they were (inferred shapes written out would add value_info to every output file)."""
    every = [*model.graph.inputs, *(output for node in model.graph for output in node.outputs)]
    saved = [(value, value.shape, value.type) for value in every]
    # Its warnings (a value with a shape but no type, inference failing) only mean fewer shapes here.
    ir_logger = logging.getLogger("onnx_ir")
    level = ir_logger.level
    ir_logger.setLevel(logging.ERROR)
    try:
        ShapeInferencePass(strict_mode=False)(model)
        return {value: (value.shape, value.dtype) for value in values}
    finally:
        ir_logger.setLevel(level)
        for value, shape, type_ in saved:
            value.shape, value.type = shape, type_


Dims = list[int | str]
#: Sizes given to the symbolic input dimensions for shape inference: primes no real dimension
#: is likely to equal, or to be a multiple of by chance.
_SYMBOL_SIZES = (7919, 7927, 7933, 7937, 7949, 7951, 7963, 7993, 8009, 8011, 8017, 8039)
#: The size ``concrete_shapes`` gives the first symbolic input dimension: the batch, where every
#: input names it alike.
FIRST_SYMBOL_SIZE = _SYMBOL_SIZES[0]


def concrete_shapes(model: ir.Model) -> dict[ir.Value, Dims | None]:
    """Every value's dimensions with each symbolic input dimension set to a prime of its own:
    shape inference then sizes every Reshape and Transpose after it, and a merged axis shows
    which factors it holds (the batch times twenty positions is 20 * 7919). A dimension inference
    leaves unknown is a symbol of its own ("?1", "?2", ...)."""
    graph = model.graph
    sizes: dict[object, int] = {}
    primes = iter(_SYMBOL_SIZES)
    saved = [(value, value.shape) for value in graph.inputs]
    try:
        for value in graph.inputs:
            if value.shape is None:
                continue
            dims: list[int] = []
            for dim in value.shape:
                if isinstance(dim, int):
                    dims.append(dim)
                    continue
                key = getattr(dim, "value", None) or object()
                if key not in sizes:
                    sizes[key] = next(primes, 0)
                dims.append(sizes[key] or 1)
            value.shape = ir.Shape(dims)
        values = [value for node in graph for value in node.outputs] + list(graph.inputs)
        inferred = inferred_shapes(model, values)
    finally:
        for value, shape in saved:
            value.shape = shape
    unknown = itertools.count(1)

    def known(dim: object) -> int | str:
        if isinstance(dim, int):
            return dim
        symbol = getattr(dim, "value", None)
        return symbol if isinstance(symbol, str) else f"?{next(unknown)}"

    return {value: None if shape is None else [known(dim) for dim in shape] for value, (shape, _) in inferred.items()}


def varies_with_inputs(dim: int | str) -> bool:
    """Whether a dimension ``concrete_shapes`` gave grows with a symbolic input dimension (the batch,
    alone or merged with other axes) or is unknown."""
    return isinstance(dim, str) or any(dim % size == 0 for size in _SYMBOL_SIZES)


def value_dims(value: ir.Value | None, shapes: dict[ir.Value, Dims | None]) -> Dims | None:
    """A value's dimensions: a constant's own, else those ``concrete_shapes`` found."""
    if value is None:
        return None
    array = constant_array(value)
    return list(array.shape) if array is not None else shapes.get(value)
