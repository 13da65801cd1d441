"""Scale the last axis of a value by a constant vector by rewriting the ops that produce it.

SmoothQuant divides a layer's input by per-channel factors before its activations are quantized.
As a ``Mul`` node that costs a pass over the activations (13% of the Wide&Deep model's batch-512
time); folded into the constants upstream (the previous layer's output columns and bias, a
normalisation's scale and shift, the columns of the embedding tables a concatenation gathers) it
costs nothing. Scaling by positive factors commutes with ReLU, so the rewrite walks through it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import onnx_ir as ir

from onnxcompress.graph import constant_value, set_constant, unique_name

#: Activations ``g`` with ``g(a * f) = g(a) * f`` for ``f > 0``.
POSITIVELY_HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "Identity"})

_Action = Callable[[], None]


def scale_last_axis(graph: ir.Graph, value: ir.Value, factors: np.ndarray, consumer: ir.Node) -> str:
    """Make ``consumer`` read ``value * factors`` (``factors`` positive, one per entry of the last
    axis). Folded upstream where every value on the way feeds only this chain (a concatenation's
    parts that cannot be folded get a ``Mul`` of their own); otherwise a ``Mul`` before
    ``consumer``. Returns ``"folded"``, ``"partly folded"`` or ``"mul"``."""
    factors = np.asarray(factors, dtype=np.float32)
    actions = _plan(graph, value, factors)
    if actions is not None:
        for action in actions:
            action()
        return "partly folded" if any(getattr(action, "inserts_mul", False) for action in actions) else "folded"
    product = _multiply(graph, value, factors, consumer)
    for index, consumer_input in enumerate(consumer.inputs):
        if consumer_input is value:
            consumer.replace_input_with(index, product)
    return "mul"


def scaling_form(graph: ir.Graph, value: ir.Value, factors: np.ndarray) -> str:
    """What :func:`scale_last_axis` would do, without doing it: ``"folded"``, ``"partly folded"``
    (a ``Mul`` on some concatenated part) or ``"mul"``."""
    actions = _plan(graph, value, np.asarray(factors, dtype=np.float32))
    if actions is None:
        return "mul"
    return "partly folded" if any(getattr(action, "inserts_mul", False) for action in actions) else "folded"


def _multiply(graph: ir.Graph, value: ir.Value, factors: np.ndarray, before: ir.Node) -> ir.Value:
    scale = constant_value(unique_name(graph, f"{value.name}_smoothing"), factors.astype(np.float32))
    graph.register_initializer(scale)
    node = ir.node("Mul", [value, scale], name=unique_name(graph, f"{value.name}/smoothing"))
    graph.insert_before(before, node)
    return node.outputs[0]


def _private_constant(value: ir.Value | None) -> np.ndarray | None:
    """The array of an initializer read by one node only (so it may be rewritten), else None."""
    if value is None or value.const_value is None or len(value.uses()) != 1:
        return None
    if value.is_graph_input() or value.is_graph_output():
        return None
    return value.const_value.numpy()


def _plan(graph: ir.Graph, value: ir.Value | None, factors: np.ndarray) -> list[_Action] | None:
    """The rewrites that turn ``value`` into ``value * factors``, or None if it cannot be folded."""
    if np.all(factors == 1.0):
        return []
    if value is None or len(value.uses()) != 1 or value.is_graph_output() or value.is_graph_input():
        return None
    node = value.producer()
    if node is None:
        return None
    channels = factors.size
    op = node.op_type
    if op in POSITIVELY_HOMOGENEOUS and node.domain == "":
        return _plan(graph, node.inputs[0], factors)
    if op in ("Mul", "Add") and node.domain == "" and len(node.inputs) == 2:
        for index in (0, 1):
            constant = _private_constant(node.inputs[index])
            other = node.inputs[1 - index]
            if constant is None or (constant.ndim > 1 and any(d != 1 for d in constant.shape[:-1])):
                continue
            if constant.ndim and constant.shape[-1] not in (1, channels):
                continue
            upstream = [] if op == "Mul" else _plan(graph, other, factors)
            if upstream is None:
                continue
            target = node.inputs[index]
            assert target is not None
            scaled = (constant * factors).astype(constant.dtype)
            return [*upstream, partial(set_constant, target, scaled)]
        return None
    last_axis = (-1, _rank(value) - 1)
    if op == "LayerNormalization" and node.domain == "" and node.attributes.get_int("axis", -1) in last_axis:
        # The affine part is the last: scale * normalised + bias.
        return _scale_constants(node.inputs[1:3], factors)
    if op == "BatchNormalization" and node.domain == "" and _rank(value) == 2:
        return _scale_constants(node.inputs[1:3], factors)
    if op == "MatMul" and node.domain == "":
        scaled_weight = _scale_matrix(node.inputs[1], factors, axis=1)
        return None if scaled_weight is None else [scaled_weight]
    if op == "Gemm" and node.domain == "":
        scaled_weight = _scale_matrix(node.inputs[1], factors, axis=0 if node.attributes.get_int("transB", 0) else 1)
        if scaled_weight is None:
            return None
        actions: list[_Action] = [scaled_weight]
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        if bias_value is not None:
            bias = _private_constant(bias_value)
            if bias is None or bias.ndim > 1 or (bias.ndim == 1 and bias.shape[0] not in (1, channels)):
                return None
            actions.append(partial(set_constant, bias_value, (bias * factors).astype(bias.dtype)))
        return actions
    if op == "Gather" and node.domain == "" and node.attributes.get_int("axis", 0) == 0:
        scaled_table = _scale_matrix(node.inputs[0], factors, axis=1)
        return None if scaled_table is None else [scaled_table]
    if op == "Concat" and node.domain == "":
        if node.attributes.get_int("axis", 0) not in last_axis:
            return None
        widths = []
        for part in node.inputs:
            width = part.shape[-1] if part is not None and part.shape is not None and len(part.shape) else None
            if not isinstance(width, int):
                return None
            widths.append(width)
        if sum(widths) != channels:
            return None
        actions = []
        start = 0
        for index, width in enumerate(widths):
            piece = factors[start : start + width]
            start += width
            part = node.inputs[index]
            planned = _plan(graph, part, piece)
            if planned is None:
                planned = [_multiply_part(graph, node, index, piece)]
            actions.extend(planned)
        return actions
    return None


def _multiply_part(graph: ir.Graph, concat: ir.Node, index: int, factors: np.ndarray) -> _Action:
    """An action giving input ``index`` of ``concat`` a ``Mul`` of its own."""

    def action() -> None:
        part = concat.inputs[index]
        assert part is not None
        concat.replace_input_with(index, _multiply(graph, part, factors, concat))

    action.inserts_mul = True  # type: ignore[attr-defined]
    return action


def _rank(value: ir.Value) -> int:
    return len(value.shape) if value.shape is not None else -1


def _scale_constants(values: Sequence[ir.Value | None], factors: np.ndarray) -> list[_Action] | None:
    """Scale per-channel constants (a normalisation's scale and shift), or None if one is shared."""
    actions: list[_Action] = []
    for value in values:
        if value is None:
            continue
        array = _private_constant(value)
        if array is None or array.shape != factors.shape:
            return None
        actions.append(partial(set_constant, value, (array * factors).astype(array.dtype)))
    return actions


def _scale_matrix(value: ir.Value | None, factors: np.ndarray, axis: int) -> _Action | None:
    """Scale axis ``axis`` of a private 2-D constant (a weight's output channels, a table's
    columns), or None if it is shared or does not match. Planning reads only the shape: a table
    may be gigabytes on disk, and a plan may be only a forecast (:func:`scaling_form`)."""
    if value is None or value.const_value is None or len(value.uses()) != 1:
        return None
    if value.is_graph_input() or value.is_graph_output():
        return None
    shape = tuple(value.const_value.shape)
    if len(shape) != 2 or shape[axis] != factors.size:
        return None
    multiplier = factors[:, None] if axis == 0 else factors

    def action() -> None:
        matrix = value.const_value.numpy()  # type: ignore[union-attr]
        set_constant(value, (matrix * multiplier).astype(matrix.dtype))

    return action
