"""A constant-position Gather moved up the graph: the ops before it compute that position only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from conftest import model_files, save_model, text_model

from onnxcompress import compress, runtime
from onnxcompress.graph import constant_array, inferred_shapes
from onnxcompress.select_early import _Product, _reshape_groups, _reshaped, select_early

# One causal self-attention block over 5 positions, then the state of one position: everything
# after the keys and values works row by row.
ATTENTION = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,5,4] x, float[4,4] wq, float[4,4] wk, float[4,4] wv, float[4,4] wo, float two, bool[5,5] mask,
   float low, float[4] gamma, float[4] beta, int64 position) => (float[N,4] y) {
  q = MatMul(x, wq)
  k = MatMul(x, wk)
  v = MatMul(x, wv)
  kt = Transpose <perm = [0, 2, 1]> (k)
  s = MatMul(q, kt)
  scaled = Div(s, two)
  masked = Where(mask, scaled, low)
  p = Softmax <axis = -1> (masked)
  a = MatMul(p, v)
  o = MatMul(a, wo)
  r = Add(x, o)
  n = LayerNormalization <axis = -1> (r, gamma, beta)
  h = Relu(n)
  y = Gather <axis = 1> (h, position)
}
"""

# nn.MultiheadAttention's layout: positions first, merged with the batch for the projection.
MERGED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,5,4] x, int64[2] flat_shape, float[4,4] w, float[4] b, int64[3] back_shape, int64 position)
   => (float[N,4] y) {
  t = Transpose <perm = [1, 0, 2]> (x)
  flat = Reshape(t, flat_shape)
  z = Gemm <transB = 1> (flat, w, b)
  back = Reshape(z, back_shape)
  u = Transpose <perm = [1, 0, 2]> (back)
  y = Gather <axis = 1> (u, position)
}
"""


def _attention(position: int) -> ir.Model:
    rng = np.random.default_rng(0)
    weights = {name: rng.normal(size=(4, 4)).astype(np.float32) for name in ("wq", "wk", "wv", "wo")}
    return text_model(
        ATTENTION,
        {
            **weights,
            "two": np.array(2.0, np.float32),
            "mask": np.tril(np.ones((5, 5), bool)),
            "low": np.array(-1e9, np.float32),
            "gamma": rng.normal(size=4).astype(np.float32),
            "beta": rng.normal(size=4).astype(np.float32),
            "position": np.array(position, np.int64),
        },
    )


def _merged(position: int) -> ir.Model:
    rng = np.random.default_rng(1)
    return text_model(
        MERGED,
        {
            "flat_shape": np.array([-1, 4], np.int64),
            "w": rng.normal(size=(4, 4)).astype(np.float32),
            "b": rng.normal(size=4).astype(np.float32),
            "back_shape": np.array([5, -1, 4], np.int64),
            "position": np.array(position, np.int64),
        },
    )


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    return runtime.run(runtime.make_session(path, "disable"), {"x": x})["y"]


def _dims_at_batch(model: ir.Model, name: str, batch: int) -> list[int]:
    """``name``'s inferred dimensions with the batch set to ``batch``."""
    model.graph.inputs[0].shape = ir.Shape([batch, 5, 4])
    value = next(output for node in model.graph for output in node.outputs if output.name == name)
    shape, _ = inferred_shapes(model, [value])[value]
    assert shape is not None
    return [int(dim) for dim in shape]  # type: ignore[call-overload]


@pytest.mark.parametrize("position", [-1, 4, 2, 0])
def test_attention_computes_the_selected_position_only(tmp_path: Path, position: int) -> None:
    """Queries, scores, softmax, output projection, residual, norm and Relu run on one position; the
    keys and values stay whole; the selected state is the same at every position chosen."""
    x = np.random.default_rng(2).normal(size=(3, 5, 4)).astype(np.float32)
    before = _outputs(save_model(_attention(position), tmp_path / "before.onnx"), x)
    model = _attention(position)
    rewritten = select_early(model)
    assert rewritten == 10  # q, s, scaled, masked, p, a, o, r, n and h
    after = _outputs(save_model(model, tmp_path / "after.onnx"), x)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
    assert _dims_at_batch(model, "p", 3) == [3, 1, 5]  # one query row against all five keys
    assert _dims_at_batch(model, "k", 3) == [3, 5, 4]
    assert _dims_at_batch(model, "h", 3) == [3, 1, 4]
    cuts = [node for node in model.graph if node.op_type == "Gather" and node.outputs[0].name != "y"]
    # x for the query and the residual (one cut, shared), and the mask's row
    assert len(cuts) == 2
    assert select_early(model) == 0  # a second cleanup finds the position already cut


def test_a_selection_whose_source_is_read_elsewhere_stays(tmp_path: Path) -> None:
    """When the rows before the Gather are a graph output too, nothing can be cut."""
    model = _attention(-1)
    h = next(node for node in model.graph if node.op_type == "Relu").outputs[0]
    model.graph.outputs.append(h)
    assert select_early(model) == 0
    assert sum(node.op_type == "Gather" for node in model.graph) == 1


@pytest.mark.parametrize("position", [-1, 3])
def test_positions_merged_with_the_batch_are_cut_on_the_outer_factor(tmp_path: Path, position: int) -> None:
    """[5, N, 4] flattened to [5 * N, 4] for a Gemm: the cut follows the position into the merged
    rows, back out to the graph input, and the Gemm runs on N rows instead of 5 * N."""
    x = np.random.default_rng(3).normal(size=(3, 5, 4)).astype(np.float32)
    before = _outputs(save_model(_merged(position), tmp_path / "before.onnx"), x)
    model = _merged(position)
    assert select_early(model) == 5
    after = _outputs(save_model(model, tmp_path / "after.onnx"), x)
    np.testing.assert_allclose(after, before, rtol=1e-6)
    assert _dims_at_batch(model, "z", 3) == [3, 4]
    assert [node.op_type for node in model.graph][:2] == ["Gather", "Transpose"]  # x cut where it enters


def test_reshape_groups_and_targets() -> None:
    assert _reshape_groups([100, 32], [20, 5, 32]) == [([0], [0, 1]), ([1], [2])]
    assert _reshape_groups([5, 20, 2, 16], [5, 20, 32]) == [([0], [0]), ([1], [1]), ([2, 3], [2])]
    assert _reshape_groups([20, "b", 32], [7, 3]) is None
    assert _reshaped(["b", 20, 32], [-1, 20, 2, 16], False) == ["b", 20, 2, 16]
    assert _reshaped([3, 20, 32], [0, -1, 2, 16], False) == [3, 20, 2, 16]
    assert _reshaped([20, 7, 32], [-1, 32], False) == [140, 32]
    assert _reshaped([20, "b", 32], [-1, 32], False) is None  # 20 * b is no single dimension
    assert _Product(6).divided(_Product(4)) is None


@pytest.mark.parametrize(("name", "cut"), [("sasrec", 21), ("sasrec_encoder", 22), ("sasrec_encoder_dynamo", 22)])
def test_sasrec_last_block_runs_on_the_last_position(tmp_path: Path, name: str, cut: int) -> None:
    """Each exporter's SASRec (a hand-written attention, nn.TransformerEncoderLayer through
    TorchScript and through dynamo): the lossless cleanup computes the second block's queries,
    attention, projection, norms and feed-forward layers for the last position only, and the scores
    stay equal on the shipped rows (the hand-written one's query projection stays fused with the keys
    and values, and is cut after their Split). Off by option, nothing is cut."""
    files = model_files(name)
    report = compress(files["onnx"], tmp_path / "out.onnx", ["cleanup"], feeds=files["feeds"])
    stats = report.passes[0].stats
    assert stats["nodes_computing_selection_only"] == cut
    assert report.verdict == "passed"
    assert all(output.max_abs < 1e-5 for output in report.parity.outputs)
    model = ir.load(tmp_path / "out.onnx")
    assert select_early(model) == 0  # a later cleanup (the presets' final one) leaves the cut as it is
    softmaxes = [node for node in model.graph if node.op_type == "Softmax"]
    model.graph.inputs[0].shape = ir.Shape([3, 20])
    shapes = inferred_shapes(model, [node.outputs[0] for node in softmaxes])
    query_rows = sorted(int(shapes[node.outputs[0]][0][-2]) for node in softmaxes)  # type: ignore[index, call-overload]
    assert query_rows == [1, 20]
    off = compress(
        files["onnx"],
        tmp_path / "off.onnx",
        ["cleanup"],
        feeds=files["feeds"],
        assignments=["cleanup.select_early=false"],
    )
    assert off.passes[0].stats["nodes_computing_selection_only"] == 0


LOOKUP = """
<ir_version: 8, opset_import: ["" : 17]>
g (int64[N,5] history, float[10,3] table, int64 position) => (float[N,3] y) {
  rows = Gather(table, history)
  scaled = Mul(rows, rows)
  y = Gather <axis = 1> (scaled, position)
}
"""


def test_a_lookup_is_cut_through_its_ids(tmp_path: Path) -> None:
    """The last history item's embedding: the ids are cut, so one row per example is looked up."""
    table = np.random.default_rng(4).normal(size=(10, 3)).astype(np.float32)
    history = np.random.default_rng(5).integers(0, 10, size=(4, 5))
    before = save_model(text_model(LOOKUP, {"table": table, "position": np.array(-1)}), tmp_path / "before.onnx")
    model = text_model(LOOKUP, {"table": table, "position": np.array(-1)})
    assert select_early(model) == 2
    after = save_model(model, tmp_path / "after.onnx")
    run = [runtime.run(runtime.make_session(path, "disable"), {"history": history})["y"] for path in (before, after)]
    np.testing.assert_array_equal(run[1], run[0])
    lookup = next(node for node in model.graph if node.op_type == "Gather" and node.inputs[0].name == "table")
    cut = lookup.inputs[1].producer()
    assert cut is not None and cut.op_type == "Gather" and cut.inputs[0].name == "history"


VIEW = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,5,4] x, int64[4] target, int64 position) => (float[N,2,2] y OUTPUTS) {
  z = Relu(x)
  r = Reshape(z, target)
  y = Gather <axis = 1> (r, position)
}
"""


@pytest.mark.parametrize(("z_is_output", "cut"), [(True, 0), (False, 2)])
def test_a_reshape_of_a_value_read_whole_is_cut_after_it(z_is_output: bool, cut: int) -> None:
    """Cutting before a Reshape needs a target of its own; when its input stays whole anyway (here a
    graph output) the Reshape's view of it costs nothing, so the cut goes after it: nothing moves.
    When the input can be cut too, the Reshape runs on the cut rows with a new target."""
    text = VIEW.replace("OUTPUTS", ", float[N,5,4] z" if z_is_output else "")
    model = text_model(text, {"target": np.array([-1, 5, 2, 2], np.int64), "position": np.array(-1)})
    assert select_early(model) == cut
    targets = [node.inputs[1] for node in model.graph if node.op_type == "Reshape"]
    assert [list(constant_array(target)) for target in targets] == [[-1, 5, 2, 2] if z_is_output else [-1, 1, 2, 2]]  # type: ignore[arg-type]
