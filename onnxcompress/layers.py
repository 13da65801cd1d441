"""Removable layers of recommender graphs, their cost and importance, and their removal with a refit.

Three kinds of layer are found structurally (:func:`discover`), whatever exported the graph:

- ``mlp``: a hidden linear layer and its elementwise tail (bias, norm, activation, dropout) between
  two linear layers (:func:`onnxcompress.graph.mlp_links`). Removing it points the next linear layer
  at the removed layer's input; the next layer's weight becomes the merged map (the unchanged next
  layer when the widths match, so the layer is bypassed; else both linear maps composed without the
  activation), optionally refit.
- ``residual``: ``v = Add(u, branch(u))`` where the branch holds a linear layer and nothing outside
  it reads the branch. Removing it replaces ``v`` by ``u``. ``attention`` (the branch holds a
  Softmax) and ``ffn`` sub-blocks of transformers are residual blocks.
- ``transformer``: an attention residual block followed by a residual block (directly: pre-norm;
  through a normalization: post-norm, whose trailing normalization then belongs to the block).

:func:`remove` rewires the graph and deletes every node and initializer only the layer used.
:func:`refit_gap` then solves the neighbouring linear layer in closed form (ridge least squares on
calibration rows) so that the student's activations after the gap match the teacher's: the merged
next layer for ``mlp``; for blocks, the linear layer that writes the residual stream just before the
gap, or else the linear layers of the next residual block. :func:`find_layers` lists every candidate
with its parameters, FLOPs per row and importance measured on calibration data.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import Calibration, Feeds, synthesize_feeds
from onnxcompress.errors import UnsupportedModelError
from onnxcompress.graph import (
    HiddenLink,
    LinearLayer,
    constant_array,
    constant_value,
    is_constant_initializer,
    linear_layers,
    mlp_links,
    set_constant,
    unique_name,
)
from onnxcompress.numerics.distill import batchnorm_affine, cosine_distance, mix_columns, relative_error
from onnxcompress.numerics.lstsq import ridge

__all__ = [
    "NO_SCORE",
    "Activations",
    "Fitting",
    "Layer",
    "LayerReport",
    "Removal",
    "capture",
    "discover",
    "find_layers",
    "fitting_rows",
    "layer_flops",
    "layer_params",
    "layers_view",
    "linear_name",
    "linear_weights",
    "logit_heads",
    "matmul_flops",
    "measure",
    "model_params",
    "refit_gap",
    "remove",
    "score_logit",
    "score_logits",
    "write_linear",
]

NORMALIZATIONS = frozenset({"LayerNormalization", "RMSNormalization", "BatchNormalization"})
#: Ops between the logit and the linear layers that add into it: they keep one value per row.
_LOGIT_TRANSPARENT = frozenset({"Squeeze", "Unsqueeze", "Reshape", "Flatten", "Identity"})
#: Ops between a residual Add and the start of a removed block that keep the stream as it is
#: (Mul: a padding mask; rows it zeroes are left out of the fit).
_STREAM_TRANSPARENT = frozenset({"Identity", "Dropout", "Mul"})


# --- discovery ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """A removable layer: its nodes, the value it reads (``input``) and the value it produces (``output``).

    For ``mlp`` layers ``link`` is the hidden link whose producer is removed and whose consumer
    absorbs it; ``output`` is the consumer's input. For blocks, ``output`` is replaced by ``input``.
    """

    name: str
    kind: str
    nodes: tuple[ir.Node, ...]
    input: ir.Value
    output: ir.Value
    link: HiddenLink | None = None


@dataclass(frozen=True)
class _Residual:
    add: ir.Node
    stream: ir.Value
    branch: frozenset[ir.Node]

    @property
    def role(self) -> str:
        return "attention" if any(node.op_type == "Softmax" for node in self.branch) else "ffn"


def _is_constant(value: ir.Value) -> bool:
    producer = value.producer()
    return is_constant_initializer(value) or (producer is not None and producer.op_type == "Constant")


def _ancestors(value: ir.Value) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    stack = [value]
    while stack:
        producer = stack.pop().producer()
        if producer is not None and producer not in seen:
            seen.add(producer)
            stack.extend(v for v in producer.inputs if v is not None)
    return seen


def _descendants(value: ir.Value) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    stack = [value]
    while stack:
        for user, _ in stack.pop().uses():
            if user not in seen:
                seen.add(user)
                stack.extend(user.outputs)
    return seen


def _leaks(nodes: frozenset[ir.Node], exit_value: ir.Value, exit_node: ir.Node | None = None) -> bool:
    """Whether a value of ``nodes`` is a graph output or read outside them, other than ``exit_value``
    (read by ``exit_node`` only, when given)."""
    for node in nodes:
        for value in node.outputs:
            if value.is_graph_output():
                return True
            for user, _ in value.uses():
                if user not in nodes and not (value is exit_value and exit_node in (None, user)):
                    return True
    return False


def _residuals(model: ir.Model, linear_nodes: frozenset[ir.Node]) -> list[_Residual]:
    """Every ``Add(u, branch(u))`` whose branch holds a linear layer and is read by nothing else."""
    found = []
    for node in model.graph:
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        if a is None or b is None or _is_constant(a) or _is_constant(b):
            continue
        for stream, other in ((a, b), (b, a)):
            branch = frozenset(_ancestors(other) & _descendants(stream))
            if branch & linear_nodes and not _leaks(branch, other, node):
                found.append(_Residual(node, stream, branch))
                break
    return found


def _single_user(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    return uses[0][0] if len(uses) == 1 and not value.is_graph_output() else None


def _transformers(
    residuals: list[_Residual],
) -> list[tuple[_Residual, tuple[ir.Node, ...], _Residual, tuple[ir.Node, ...]]]:
    """Attention blocks followed by a non-attention residual block: (first, norms between, second, trailing norms)."""
    by_stream = {residual.stream: residual for residual in residuals}
    pairs = []
    for first in residuals:
        if first.role != "attention":
            continue
        value, between = first.add.outputs[0], []
        while value not in by_stream:
            user = _single_user(value)
            if user is None or user.op_type not in NORMALIZATIONS:
                break
            between.append(user)
            value = user.outputs[0]
        second = by_stream.get(value)
        if second is None or second.role == "attention":
            continue
        trailing = []
        user = _single_user(second.add.outputs[0])
        if between and user is not None and user.op_type in NORMALIZATIONS:
            trailing.append(user)
        pairs.append((first, tuple(between), second, tuple(trailing)))
    return pairs


def _prefix(nodes: Iterable[ir.Node]) -> str:
    """The scope shared by the nodes' names (``/blocks.0/query/MatMul`` -> ``blocks.0``), or ''."""
    common: list[str] | None = None
    for node in nodes:
        if not node.name:
            continue
        parts = [part for part in node.name.split("/") if part][:-1]
        if common is None:
            common = parts
        else:
            size = 0
            while size < min(len(common), len(parts)) and common[size] == parts[size]:
                size += 1
            common = common[:size]
    return "/".join(common or [])


def linear_name(layer: LinearLayer) -> str:
    """A readable name: the exporter's module path (``mlp.4``, ``keras_wide_deep/deep_128``) or the weight's name."""
    for value in (layer.weight, layer.bias):
        name = value.name if value is not None else None
        for suffix in (".weight", ".bias"):
            if name and name.endswith(suffix):
                return name[: -len(suffix)]
    node_name = (layer.node.name or "").strip("/")
    if node_name:
        head, _, tail = node_name.rpartition("/")
        return head if head and tail == layer.node.op_type else node_name
    return layer.weight.name or "linear"


def discover(model: ir.Model) -> list[Layer]:
    """Every removable layer of the main graph, in graph order, with unique names."""
    graph = model.graph
    position = {node: index for index, node in enumerate(graph)}
    linear_nodes = frozenset(layer.node for layer in linear_layers(model))
    found: list[Layer] = []
    links, _ = mlp_links(model)
    for link in links:
        producer = link.producer
        mlp_nodes = (producer.node, *([producer.bias_node] if producer.bias_node else []), *link.between)
        source, hidden = producer.node.inputs[0], link.consumer.node.inputs[0]
        assert source is not None and hidden is not None
        found.append(Layer(linear_name(producer), "mlp", mlp_nodes, source, hidden, link))
    residuals = _residuals(model, linear_nodes)
    block_of: dict[_Residual, str] = {}
    for index, (first, between, second, trailing) in enumerate(_transformers(residuals)):
        nodes = frozenset({*first.branch, first.add, *between, *second.branch, second.add, *trailing})
        output = (trailing[-1] if trailing else second.add).outputs[0]
        if _leaks(nodes, output):
            continue
        name = _prefix(nodes) or f"transformer{index}"
        block_of[first] = block_of[second] = name
        found.append(Layer(name, "transformer", tuple(sorted(nodes, key=position.__getitem__)), first.stream, output))
    for index, residual in enumerate(residuals):
        output = residual.add.outputs[0]
        if output.is_graph_output():
            continue
        scope = block_of.get(residual) or _prefix(residual.branch) or f"residual{index}"
        ordered = tuple(sorted({*residual.branch, residual.add}, key=position.__getitem__))
        found.append(Layer(f"{scope}.{residual.role}", "residual", ordered, residual.stream, output))
    found.sort(key=lambda layer: position[layer.nodes[0]])
    seen: dict[str, int] = defaultdict(int)
    unique = []
    for layer in found:
        seen[layer.name] += 1
        name = layer.name if seen[layer.name] == 1 else f"{layer.name}#{seen[layer.name]}"
        unique.append(
            layer if name == layer.name else Layer(name, layer.kind, layer.nodes, layer.input, layer.output, layer.link)
        )
    return unique


# --- the score ---------------------------------------------------------------------------------------


def _float_outputs(model: ir.Model) -> list[ir.Value]:
    return [value for value in model.graph.outputs if value.dtype is not None and value.dtype.is_floating_point()]


def _is_score(value: ir.Value) -> bool:
    """One value per row ([N] or [N, 1]) or a two-class probability pair ([N, 2]), as parity
    judges scores."""
    shape = value.shape
    if shape is None:
        return False
    return len(shape) == 1 or (len(shape) == 2 and shape[1] in (1, 2))


#: Ops between a score output and its Sigmoid that only move or copy values (scikit-learn's
#: ``Concat(1 - p, p)``, PyTorch's squeeze): a Sigmoid behind anything else (SiLU's, a gate's)
#: is not the score's.
_TO_SCORE = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Concat", "Sub", "Cast", "Slice"})


def _logit_behind(output: ir.Value) -> ir.Value | None:
    """The input of the Sigmoid behind ``output`` (searched up to three nodes back), if any."""
    frontier = [output]
    for _ in range(4):
        producers = [value.producer() for value in frontier]
        for producer in producers:
            if producer is not None and producer.op_type == "Sigmoid" and producer.inputs[0] is not None:
                return producer.inputs[0]
        frontier = [
            value
            for producer in producers
            if producer is not None and producer.op_type in _TO_SCORE
            for value in producer.inputs
            if value is not None
        ]
    return None


#: Why a pass that ranks rows by the model's score cannot run on a model without one.
NO_SCORE = "the model has no float output to score it by (it outputs integers only, such as a class index)"


def has_score(model: ir.Model) -> bool:
    """Whether the model has a float output :func:`score_logits` can rank rows by."""
    return bool(_float_outputs(model))


def score_logits(model: ir.Model) -> list[ir.Value]:
    """The values the model ranks rows by, one per score output (a multi-task model's click and
    conversion scores): the input of the Sigmoid behind each, else the output itself. A model
    without an output shaped like a score is ranked by its first float output with a Sigmoid
    behind it, else its first float output.

    Raises:
        UnsupportedModelError: the model has no float output.
    """
    outputs = _float_outputs(model)
    if not outputs:
        raise UnsupportedModelError(NO_SCORE)
    scores = [output for output in outputs if _is_score(output)]
    if not scores:  # shapes unknown: the first output with a Sigmoid behind it, else the first
        scores = [next((output for output in outputs if _logit_behind(output) is not None), outputs[0])]
    logits: list[ir.Value] = []
    for output in scores:
        logit = _logit_behind(output) or output
        if logit not in logits:
            logits.append(logit)
    return logits


def score_logit(model: ir.Model) -> ir.Value:
    """The first of :func:`score_logits`."""
    return score_logits(model)[0]


def logit_heads(model: ir.Model, logit: ir.Value) -> list[LinearLayer]:
    """The linear layers whose outputs add straight into the logit (through reshapes and Adds).

    DeepFM's deep and first-order linear parts, Wide&Deep's wide and deep logits, an MLP's last
    layer. Each must produce as many values per row as the logit and feed nothing else.
    """
    by_output = {layer.output: layer for layer in linear_layers(model)}
    heads: list[LinearLayer] = []
    width = logit.shape[-1] if logit.shape is not None and len(logit.shape) > 1 else 1
    stack = [logit]
    while stack:
        value = stack.pop()
        layer = by_output.get(value)
        if layer is not None:
            if layer.d_out == width and len(layer.weight.uses()) == 1 and (value is logit or len(value.uses()) == 1):
                heads.append(layer)
            continue
        producer = value.producer()
        if producer is None or producer.domain not in ("", "ai.onnx"):
            continue
        if producer.op_type in _LOGIT_TRANSPARENT and producer.inputs[0] is not None:
            stack.append(producer.inputs[0])
        elif producer.op_type == "Add" and not any(v is None or _is_constant(v) for v in producer.inputs):
            stack.extend(v for v in producer.inputs if v is not None)
    position = {node: index for index, node in enumerate(model.graph)}
    return sorted(heads, key=lambda layer: position[layer.node])


# --- costs -------------------------------------------------------------------------------------------


def _float_size(value: ir.Value) -> int:
    tensor = value.const_value
    return tensor.size if tensor is not None and tensor.dtype.is_floating_point() else 0


def model_params(model: ir.Model) -> int:
    """Float parameters (initializer elements) of the main graph, embedding tables included."""
    return sum(_float_size(value) for value in model.graph.initializers.values())


def layer_params(layer: Layer) -> int:
    """Parameters the model loses when ``layer`` is removed (initializers only its nodes read, minus
    what the merged next layer gains when the widths differ)."""
    inside = set(layer.nodes)
    read = {value for node in layer.nodes for value in node.inputs if value is not None and value.is_initializer()}
    params = sum(_float_size(value) for value in read if all(user in inside for user, _ in value.uses()))
    if layer.link is not None:
        params += (layer.link.producer.d_out - layer.link.producer.d_in) * layer.link.consumer.d_out
    return params


def _matmul_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """The output shape of ``MatMul(a, b)`` (numpy semantics)."""
    if len(b) == 1:
        return a[:-1]
    if len(a) == 1:
        return (*b[:-2], b[-1])
    return (*np.broadcast_shapes(a[:-2], b[:-2]), a[-2], b[-1])


def _static_shape(value: ir.Value | None, arrays: dict[ir.Value, np.ndarray]) -> tuple[int, ...]:
    assert value is not None
    if value.const_value is not None:
        return tuple(value.const_value.shape.numpy())
    return tuple(arrays[value].shape)


def matmul_flops(model: ir.Model, feeds: Feeds) -> dict[ir.Node, float]:
    """FLOPs per row (2 x multiply-adds) of every MatMul and Gemm, from the shapes seen on ``feeds``."""
    nodes = [node for node in model.graph if node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx")]
    operands = {value for node in nodes for value in node.inputs[:2] if value is not None and value.const_value is None}
    arrays = dict(zip(operands, capture(model, Calibration(feeds), list(operands)), strict=True))
    rows = max(feeds.rows, 1)
    flops = {}
    for node in nodes:
        a, b = (_static_shape(value, arrays) for value in node.inputs[:2])
        if node.op_type == "Gemm":
            m, k = (a[1], a[0]) if node.attributes.get_int("transA", 0) else (a[0], a[1])
            n = b[0] if node.attributes.get_int("transB", 0) else b[1]
            flops[node] = 2.0 * m * k * n / rows
        else:
            flops[node] = 2.0 * float(np.prod(_matmul_shape(a, b))) * a[-1] / rows
    return flops


def layer_flops(layer: Layer, flops: dict[ir.Node, float]) -> float:
    """FLOPs per row saved by removing ``layer`` (net of the merged next layer's change)."""
    saved = sum(flops.get(node, 0.0) for node in layer.nodes)
    if layer.link is not None:
        producer, consumer = layer.link.producer, layer.link.consumer
        positions = flops.get(producer.node, 0.0) / (2.0 * producer.d_in * producer.d_out)
        saved += 2.0 * positions * (producer.d_out - producer.d_in) * consumer.d_out
    return saved


# --- activations -------------------------------------------------------------------------------------


def capture(model: ir.Model, calibration: Calibration, values: Sequence[ir.Value]) -> list[np.ndarray]:
    """Arrays of ``values`` on the calibration rows (graph inputs straight from the feeds)."""
    feeds = calibration.feeds.arrays
    wanted = list(dict.fromkeys(value for value in values if not value.is_graph_input()))
    captured = calibration.capture(model, wanted) if wanted else {}
    return [feeds[value.name] if value.is_graph_input() else captured[value.name] for value in values]  # type: ignore[index]


class Activations:
    """One fixed model's values on fixed calibration rows, captured on first request and kept by name."""

    def __init__(self, model: ir.Model, calibration: Calibration) -> None:
        self.model = model
        self.calibration = calibration
        values = [*model.graph.inputs, *(value for node in model.graph for value in node.outputs)]
        self._values = {value.name: value for value in values if value.name is not None}
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, *names: str) -> list[np.ndarray]:
        missing = [name for name in dict.fromkeys(names) if name not in self._cache]
        if missing:
            arrays = capture(self.model, self.calibration, [self._values[name] for name in missing])
            self._cache.update(zip(missing, arrays, strict=True))
        return [self._cache[name] for name in names]


@dataclass(frozen=True)
class Fitting:
    """Rows the closed-form fits use (``calibration``: the calibration rows first, then rows mixing their
    columns), the calibration rows alone (``evaluation``, where fidelity is measured), and their source."""

    calibration: Calibration
    evaluation: Calibration
    source: str

    @property
    def rows(self) -> slice:
        """The calibration rows within the fitting rows."""
        return slice(0, self.evaluation.feeds.rows)


def fitting_rows(model: ir.Model, calibration: Calibration | None, augment: int) -> Fitting:
    """Calibration rows (synthesized from the graph signature when None) plus ``augment`` mixed rows."""
    if calibration is None:
        calibration = Calibration(synthesize_feeds(model))
    feeds = calibration.feeds
    source = feeds.source
    arrays = dict(feeds.arrays)
    if augment > 0:
        mixed = mix_columns(arrays, augment, seed=0)
        arrays = {
            name: np.concatenate([array, mixed[name]]) if name in mixed else array for name, array in arrays.items()
        }
        source += f" + {augment} rows mixing their columns"
    mixed_feeds = Feeds(arrays, source, feeds.notes)
    return Fitting(Calibration(mixed_feeds, calibration.batch_size, calibration.opt_level), calibration, source)


# --- surgery -----------------------------------------------------------------------------------------


def linear_weights(layer: LinearLayer) -> tuple[np.ndarray, np.ndarray]:
    """The layer's map as float64 ``W`` ``[d_in, d_out]`` and ``b`` ``[d_out]``."""
    weight = layer.weight.const_value.numpy().astype(np.float64)  # type: ignore[union-attr]
    bias = np.zeros(layer.d_out)
    if layer.bias is not None:
        bias = np.broadcast_to(layer.bias.const_value.numpy().astype(np.float64).reshape(-1), (layer.d_out,)).copy()  # type: ignore[union-attr]
    return (weight.T if layer.out_axis == 0 else weight), bias


def _initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    name = unique_name(graph, base)
    value = constant_value(name, array)
    graph.register_initializer(value)
    return value


def _with_bias(graph: ir.Graph, layer: LinearLayer) -> LinearLayer:
    """The layer with a bias: a zero C for a Gemm, a zero Add after a MatMul (taking over the output's name)."""
    if layer.bias is not None:
        return layer
    dtype = layer.weight.const_value.dtype.numpy()  # type: ignore[union-attr]
    bias = _initializer(graph, f"{layer.weight.name}_bias", np.zeros(layer.d_out, dtype))
    if layer.node.op_type == "Gemm":
        layer.node.resize_inputs(3)
        layer.node.replace_input_with(2, bias)
        return LinearLayer(layer.node, layer.weight, layer.out_axis, bias, None, layer.output)
    product = layer.output
    result = ir.Value(name=product.name, shape=product.shape, type=product.type)
    product.name = unique_name(graph, f"{result.name}_product")
    ir.convenience.replace_all_uses_with(product, result, replace_graph_outputs=True)
    add = ir.Node(
        "", "Add", [product, bias], outputs=[result], name=unique_name(graph, f"{layer.node.name or 'linear'}_bias")
    )
    graph.insert_after(layer.node, add)
    return LinearLayer(layer.node, layer.weight, layer.out_axis, bias, add, result)


def write_linear(graph: ir.Graph, layer: LinearLayer, weight: np.ndarray, bias: np.ndarray | None) -> LinearLayer:
    """Store float64 ``weight`` ``[d_in, d_out]`` and ``bias`` in the layer's layout and dtype.

    A bias is added when the layer has none and ``bias`` is given; a bias initializer that other
    nodes share is copied for this layer instead of changed under them. Returns the layer as it now is.
    """
    if bias is not None:
        layer = _with_bias(graph, layer)
    dtype = layer.weight.const_value.dtype.numpy()  # type: ignore[union-attr]
    stored = np.ascontiguousarray(weight.T if layer.out_axis == 0 else weight).astype(dtype)
    set_constant(layer.weight, stored)
    if bias is None or layer.bias is None:
        return layer
    old = layer.bias.const_value
    shape = (layer.d_out,) if old.size == 1 else tuple(old.shape)  # type: ignore[union-attr]
    array = bias.reshape(shape).astype(old.dtype.numpy())  # type: ignore[union-attr]
    holder = layer.bias_node if layer.bias_node is not None else layer.node
    if len(layer.bias.uses()) == 1:
        set_constant(layer.bias, array)
        return layer
    copy = _initializer(graph, f"{layer.bias.name}_distilled", array)
    holder.replace_input_with(list(holder.inputs).index(layer.bias), copy)
    return LinearLayer(layer.node, layer.weight, layer.out_axis, copy, layer.bias_node, layer.output)


def _constant_array(value: ir.Value | None) -> np.ndarray:
    array = constant_array(value)  # an initializer, or a Constant node's scalar (TorchScript's GELU)
    assert array is not None
    return array.astype(np.float64)


def _linearised(
    between: Sequence[ir.Node], start: ir.Value, hidden: np.ndarray, fused: frozenset[ir.Node] = frozenset()
) -> np.ndarray:
    """Push ``hidden`` (rows of the producer's output) through the elementwise tail, keeping the affine
    steps (constant Add/Sub/Mul/Div, inference BatchNormalization) and treating the rest, ``fused``
    activations included, as identity."""
    current = start
    for node in between:
        if node in fused:
            current = node.outputs[0]
            continue
        index = list(node.inputs).index(current)
        op = node.op_type
        if op == "BatchNormalization":
            scale, bias, mean, var = (_constant_array(node.inputs[i]) for i in range(1, 5))
            scale, shift = batchnorm_affine(scale, bias, mean, var, node.attributes.get_float("epsilon", 1e-5))
            hidden = hidden * scale + shift
        elif op in ("Add", "Sub", "Mul", "Div"):
            constant = _constant_array(node.inputs[1 - index]).reshape(-1)
            if op == "Add":
                hidden = hidden + constant
            elif op == "Sub":
                hidden = hidden - constant if index == 0 else constant - hidden
            elif op == "Mul":
                hidden = hidden * constant
            elif index == 0:
                hidden = hidden / constant
        current = node.outputs[0]
    return hidden


def _bypass_map(link: HiddenLink) -> tuple[np.ndarray, np.ndarray]:
    """The next layer's map once the producer is gone, before any refit: unchanged when the widths
    match (the layer is bypassed); else producer and next layer composed with the activation dropped."""
    producer, consumer = link.producer, link.consumer
    weight, bias = linear_weights(consumer)
    if producer.d_in == producer.d_out:
        return weight, bias
    w_in, b_in = linear_weights(producer)
    basis = np.vstack([np.zeros(producer.d_in), np.eye(producer.d_in)])
    image = _linearised(link.between, producer.output, basis @ w_in + b_in, link.fused)
    shift, linear = image[0], image[1:] - image[0]
    return linear @ weight, shift @ weight + bias


def _sweep(graph: ir.Graph, seeds: Iterable[ir.Node]) -> None:
    """Delete the seeds and whatever only they used, once their outputs are unused."""
    pending = list(seeds)
    while pending:
        node = pending.pop()
        if node.graph is not graph or any(value.uses() or value.is_graph_output() for value in node.outputs):
            continue
        inputs = [value for value in node.inputs if value is not None]
        graph.remove(node, safe=True)
        for value in inputs:
            producer = value.producer()
            if producer is not None:
                pending.append(producer)
            elif (
                value.is_initializer()
                and not value.uses()
                and not value.is_graph_input()
                and not value.is_graph_output()
            ):
                graph.initializers.pop(value.name)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Removal:
    """A removed layer as it was found, and for ``mlp`` layers the next layer now reading its input with
    the bypass map ``prior`` (``[d_in, d_out]`` weight and bias) written into it."""

    layer: Layer
    merged: LinearLayer | None = None
    prior: tuple[np.ndarray, np.ndarray] | None = None


def remove(model: ir.Model, layer: Layer) -> Removal:
    """Take ``layer`` out of ``model`` (in place) without refitting anything; no node of it remains."""
    graph = model.graph
    if layer.link is None:
        ir.convenience.replace_all_uses_with(layer.output, layer.input)
        _sweep(graph, layer.nodes)
        return Removal(layer)
    prior = _bypass_map(layer.link)
    consumer = layer.link.consumer
    consumer.node.replace_input_with(0, layer.input)
    merged = write_linear(graph, consumer, *prior)
    _sweep(graph, layer.nodes)
    return Removal(layer, merged, prior)


# --- refit -------------------------------------------------------------------------------------------


def _rows(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float64).reshape(-1, array.shape[-1])


def _refit(graph: ir.Graph, layer: LinearLayer, inputs: np.ndarray, target: np.ndarray, damping: float) -> LinearLayer:
    """Ridge fit of ``layer`` (pulled towards its current weights) mapping ``inputs`` to ``target``."""
    prior, _ = linear_weights(layer)
    weight, bias = ridge(_rows(inputs), _rows(target), damping, fit_intercept=True, prior=prior)
    return write_linear(graph, layer, weight, bias)


def _writer_behind(
    value: ir.Value, start: ir.Value, by_output: dict[ir.Value, LinearLayer], depth: int
) -> tuple[LinearLayer, ir.Value] | None:
    """The linear layer writing the residual stream that reaches ``start`` unshared (through Identity,
    Dropout and mask multiplications), with the other input of its residual Add; or None."""
    producer = value.producer()
    if producer is None or depth > 4 or (value is not start and len(value.uses()) != 1):
        return None
    if (
        producer.op_type == "Add"
        and len(producer.inputs) == 2
        and not any(v is None or _is_constant(v) for v in producer.inputs)
    ):
        for index in (0, 1):
            layer = by_output.get(producer.inputs[index])  # type: ignore[arg-type]
            if layer is not None and len(layer.output.uses()) == 1 and len(layer.weight.uses()) == 1:
                return layer, producer.inputs[1 - index]  # type: ignore[return-value]
        return None
    if producer.op_type in _STREAM_TRANSPARENT:
        operands = producer.inputs[: 2 if producer.op_type == "Mul" else 1]
        if any(operand is None or _is_constant(operand) for operand in operands):
            return None  # a constant factor scales the stream: not a mask
        for operand in operands:
            if operand is not None:
                found = _writer_behind(operand, start, by_output, depth + 1)
                if found is not None:
                    return found
    return None


def refit_gap(model: ir.Model, removal: Removal, teacher: Activations, damping: float) -> list[str]:
    """Refit the linear layer(s) next to a removed layer so the student's activations after the gap
    match the teacher's on the fitting rows; returns the names of the refit layers ([] if none fits)."""
    graph = model.graph
    calibration = teacher.calibration
    layer = removal.layer
    if removal.merged is not None:
        merged = removal.merged
        (inputs,) = capture(model, calibration, [merged.node.inputs[0]])  # type: ignore[list-item]
        (target,) = teacher(merged.output.name)  # type: ignore[arg-type]
        prior_weight, _ = removal.prior  # type: ignore[misc]
        weight, bias = ridge(_rows(inputs), _rows(target), damping, fit_intercept=True, prior=prior_weight)
        write_linear(graph, merged, weight, bias)
        return [linear_name(merged)]
    stream_in = layer.input
    writer = _writer_behind(stream_in, stream_in, {lin.output: lin for lin in linear_layers(model)}, depth=0)
    if writer is not None:
        linear, stream = writer
        inputs, residual, start = capture(model, calibration, [linear.node.inputs[0], stream, stream_in])  # type: ignore[list-item]
        (target,) = teacher(layer.output.name)  # type: ignore[arg-type]
        kept = np.linalg.norm(_rows(start), axis=1) > 0
        _refit(graph, linear, _rows(inputs)[kept], (_rows(target) - _rows(residual))[kept], damping)
        return [linear_name(linear)]
    return _refit_next_block(model, stream_in, teacher, damping)


def _next_residual(model: ir.Model, start: ir.Value, linear: list[LinearLayer]) -> _Residual | None:
    """The residual block reading the stream that ``start`` flows into unshared (through masks)."""
    residuals = {r.stream: r for r in _residuals(model, frozenset(lin.node for lin in linear))}
    value = start
    for _ in range(4):
        if value in residuals:
            return residuals[value]
        user = _single_user(value)
        if user is None or user.op_type not in _STREAM_TRANSPARENT:
            return None
        value = user.outputs[0]
    return None


def _refit_next_block(model: ir.Model, start: ir.Value, teacher: Activations, damping: float) -> list[str]:
    """Refit, in graph order, the linear layers of the next residual block after ``start``: the one
    writing into its Add to the teacher's Add output minus the stream, the others to the teacher's outputs."""
    graph = model.graph
    linear = linear_layers(model)
    residual = _next_residual(model, start, linear)
    if residual is None:
        return []
    members = [lin for lin in linear if lin.node in residual.branch]
    writes = {lin.output for lin in members} & set(residual.add.inputs)
    (stream,) = capture(model, teacher.calibration, [residual.stream])
    refit = []
    groups: dict[ir.Value, list[LinearLayer]] = defaultdict(list)
    for lin in members:
        groups[lin.node.inputs[0]].append(lin)  # type: ignore[index]
    for value, group in groups.items():
        (inputs,) = capture(model, teacher.calibration, [value])
        for lin in group:
            if lin.output in writes:
                (added,) = teacher(residual.add.outputs[0].name)  # type: ignore[arg-type]
                target = _rows(added) - _rows(stream)
            else:
                (target,) = teacher(lin.output.name)  # type: ignore[arg-type]
            _refit(graph, lin, inputs, target, damping)
            refit.append(linear_name(lin))
    return refit


# --- importance --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerReport:
    """One removable layer with its cost and importance on calibration rows.

    ``importance`` is the change of the score logit (RMS over the teacher's standard deviation) when
    the layer is removed without refit; ``importance_refit`` the same after :func:`refit_gap`;
    ``cos_distance`` is ``1 - cos(input, output)`` of residual and transformer blocks.
    """

    name: str
    kind: str
    params: int
    flops: float
    importance: float
    importance_refit: float | None
    cos_distance: float | None
    refit: tuple[str, ...] = ()


def _side_by_side(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.hstack([np.asarray(array).reshape(len(array), -1) for array in arrays])


def measure(
    model: ir.Model, layers: Sequence[Layer], fitting: Fitting, damping: float = 0.01, refit: bool = True
) -> list[LayerReport]:
    """Remove each layer alone from a copy of ``model`` and measure the score change on the calibration rows."""
    teacher = Activations(model, fitting.calibration)
    # Every task's logit side by side: a layer a multi-task model's towers share moves them all.
    references = teacher(*[logit.name for logit in score_logits(model)])  # type: ignore[arg-type]
    reference = _side_by_side(references)[fitting.rows]
    flops = matmul_flops(model, fitting.calibration.feeds.head(4))
    reports = []
    for layer in layers:
        student = model.clone()
        twin = next(candidate for candidate in discover(student) if candidate.name == layer.name)
        removal = remove(student, twin)
        student_logits = score_logits(student)
        bypassed = _side_by_side(capture(student, fitting.evaluation, student_logits))
        refit_error = None
        refit_layers: list[str] = []
        if refit:
            refit_layers = refit_gap(student, removal, teacher, damping)
            fitted = _side_by_side(capture(student, fitting.evaluation, student_logits))
            refit_error = relative_error(reference, fitted)
        cosine = None
        if layer.kind != "mlp":
            inputs, outputs = teacher(layer.input.name, layer.output.name)  # type: ignore[arg-type]
            cosine = cosine_distance(inputs[fitting.rows], outputs[fitting.rows])
        reports.append(
            LayerReport(
                layer.name,
                layer.kind,
                layer_params(layer),
                layer_flops(layer, flops),
                relative_error(reference, bypassed),
                refit_error,
                cosine,
                tuple(refit_layers),
            )
        )
    return reports


def find_layers(
    model: ir.Model,
    calibration: Calibration | None = None,
    *,
    damping: float = 0.01,
    augment: int = 4096,
    refit: bool = True,
) -> list[LayerReport]:
    """Every removable layer with parameters, FLOPs per row and importance on calibration data
    (synthesized from the graph signature when ``calibration`` is None). ``model`` is not changed."""
    return measure(model, discover(model), fitting_rows(model, calibration, augment), damping, refit)


def layers_view(reports: Sequence[LayerReport], model_name: str, source: str) -> object:
    """A rich table of :func:`find_layers` results."""
    from rich.table import Table

    table = Table(title=f"removable layers of {model_name} (calibration: {source})", title_justify="left")
    for column in ("layer", "kind", "params", "FLOPs/row", "Δ score removed", "Δ score refit", "1-cos", "refit"):
        table.add_column(column, overflow="fold")
    for report in reports:
        table.add_row(
            report.name,
            report.kind,
            f"{report.params:,}",
            f"{report.flops:,.0f}",
            f"{report.importance:.4f}",
            "—" if report.importance_refit is None else f"{report.importance_refit:.4f}",
            "—" if report.cos_distance is None else f"{report.cos_distance:.4f}",
            ", ".join(report.refit) or "—",
        )
    return table
