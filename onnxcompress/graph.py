"""Recognising recommender structure in a graph: which initializers are weights, and of what kind.

Which input of an op is its weight, and along which axes it has output channels and its reduction,
is a data table (``WEIGHT_SLOTS``) rather than if-chains, so a new op is one row.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir

__all__ = ["WEIGHT_SLOTS", "WeightUse", "is_constant_initializer", "weight_uses", "weights_by_value"]


@dataclass(frozen=True)
class WeightUse:
    """One node reading an initializer as a weight.

    ``out_axis`` is the axis of output channels (rows for an embedding table); ``reduce_axis`` the
    axis summed over by a linear op (None for lookups).
    """

    node: ir.Node
    input_index: int
    value: ir.Value
    kind: str  # "linear", "conv" or "embedding"
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


def is_constant_initializer(value: ir.Value | None) -> bool:
    """An initializer with data that the caller cannot override (so not also a graph input)."""
    return (
        value is not None
        and value.is_initializer()
        and value.const_value is not None
        and not value.is_graph_input()
        and not value.is_graph_output()
    )


def weight_uses(model: ir.Model) -> list[WeightUse]:
    """Every (node, weight) pair of the main graph, in graph order, for float weights only."""
    uses = []
    for node in model.graph:
        slot = WEIGHT_SLOTS.get(node.op_type)
        if slot is None or node.domain not in ("", "ai.onnx"):
            continue
        index, kind, rank, axes_of = slot
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
