from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from conftest import model_files, save_model, text_model

from onnxcompress import runtime
from onnxcompress.passes.cleanup import Cleanup
from onnxcompress.static_shapes import fold_shape_arithmetic, shape_derived_values

# A TorchScript-style attention reshape: [batch, 6] -> [batch * 2, 3] with the target computed from
# Shape, and a 1/sqrt(3) scale computed from the last dimension; a Cast of a constant (codes decoded
# at load) that must stay as it is.
HEADS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,6] x, int64[] zero, int64[1] axis0, int64[] heads, int64[1] width, int64[1] last, int64[1] end,
   uint8[3] codes) => (float[N2,3] y, float[3] decoded) {
  s = Shape(x)
  b = Gather(s, zero)
  bh = Mul(b, heads)
  u = Unsqueeze(bh, axis0)
  target = Concat <axis = 0> (u, width)
  r = Reshape(x, target)
  d = Slice(s, last, end)
  df = Cast <to = 1> (d)
  dh = Div(df, df)
  w = Cast <to = 1> (width)
  root = Sqrt(w)
  scale = Div(dh, root)
  y = Mul(r, scale)
  decoded = Cast <to = 1> (codes)
}
"""
CONSTANTS = {
    "zero": np.array(0),
    "axis0": np.array([0]),
    "heads": np.array(2),
    "width": np.array([3]),
    "last": np.array([-1]),
    "end": np.array([2**62]),
    "codes": np.array([1, 2, 3], np.uint8),
}


def test_shape_arithmetic_folds_to_constants_and_a_reshape_target_with_minus_one(tmp_path: Path) -> None:
    """The scale, static at every batch size, becomes one constant; the target, which changes with
    the batch in one entry, becomes [-1, 3]; the shape nodes go. Outputs are equal at batch sizes the
    folding did not see (1, 13)."""
    model = text_model(HEADS, CONSTANTS)
    assert {value.name for value in shape_derived_values(model.graph)} >= {"s", "b", "bh", "u", "target", "scale"}
    assert "decoded" not in {value.name for value in shape_derived_values(model.graph)}
    before = save_model(text_model(HEADS, CONSTANTS), tmp_path / "before.onnx")
    stats = Cleanup()(model).stats
    assert (stats["shape_values_folded"], stats["reshape_targets_folded"]) == (1, 1)
    ops = [node.op_type for node in model.graph]
    assert sorted(ops) == ["Cast", "Mul", "Reshape"]  # the Cast of the codes stays
    reshape = next(node for node in model.graph if node.op_type == "Reshape")
    assert reshape.inputs[1].const_value.numpy().tolist() == [-1, 3]
    after = save_model(model, tmp_path / "after.onnx")
    for rows in (1, 13):
        feeds = {"x": np.random.default_rng(rows).standard_normal((rows, 6)).astype(np.float32)}
        expected = runtime.make_session(before, "disable").run(None, feeds)
        got = runtime.make_session(after, "disable").run(None, feeds)
        for exact, folded in zip(expected, got, strict=True):
            np.testing.assert_array_equal(folded, exact)


def test_a_target_that_changes_in_two_entries_stays_computed() -> None:
    """With the width symbolic too, the target [batch * 2, width / 2] changes in both entries."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,W] x, int64[1] first, int64[1] second, int64[1] two) => (float[M,K] y) {
      s = Shape(x)
      b = Gather(s, first)
      w = Gather(s, second)
      bh = Mul(b, two)
      wh = Div(w, two)
      target = Concat <axis = 0> (bh, wh)
      y = Reshape(x, target)
    }
    """
    model = text_model(text, {"first": np.array([0]), "second": np.array([1]), "two": np.array([2])})
    assert fold_shape_arithmetic(model) == (0, 0)


@pytest.mark.parametrize("name", ["sasrec_encoder", "sasrec_encoder_dynamo"])
def test_torchscript_attention_loses_its_shape_arithmetic_and_keeps_its_scores(name: str, tmp_path: Path) -> None:
    """PyTorch's nn.MultiheadAttention through TorchScript computes every view's target at run time
    (17 Shape nodes in 411): after cleanup one Shape is left, of the history, for a mask of zeros
    that follows the batch, and under a third of the nodes (a target with a -1 of the exporter's own
    and the batch is folded from its output's shape); dynamo already wrote most as constants. Scores
    equal at batch sizes 1, 7 and 256."""
    files = model_files(name)
    model = ir.load(files["onnx"])
    nodes = len(model.graph)
    shapes = sum(node.op_type == "Shape" for node in model.graph)
    stats = Cleanup()(model).stats
    shapes_left = [node.inputs[0].name for node in model.graph if node.op_type == "Shape"]
    # dynamo's mask of zeros is an Expand the Where that reads it broadcasts anyway (drop_expands)
    assert shapes_left == (["history"] if name == "sasrec_encoder" else [])
    if name == "sasrec_encoder":
        assert (nodes, shapes) == (411, 17)
        assert stats["reshape_targets_folded"] == 24 and len(model.graph) < nodes / 3
    else:
        assert stats["reshape_targets_folded"] == 2
    cleaned = save_model(model, tmp_path / "clean.onnx")
    arrays = dict(np.load(files["feeds"]))
    for rows in (1, 7, 256):
        feeds = {key: array[:rows] for key, array in arrays.items()}
        expected = runtime.make_session(files["onnx"], "disable").run(None, feeds)
        got = runtime.make_session(cleaned, "all").run(None, feeds)
        for exact, folded in zip(expected, got, strict=True):
            np.testing.assert_allclose(folded, exact, rtol=0, atol=1e-6)


def test_a_model_that_cannot_run_at_the_sample_sizes_is_left_alone() -> None:
    """A graph fixed to batch 4 fails at the sampled sizes: nothing is folded, nothing breaks."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,6] x, int64[2] fixed, int64[1] zero) => (float[4,6] y, int64[1] n) {
      y = Reshape(x, fixed)
      s = Shape(x)
      n = Gather(s, zero)
    }
    """
    model = text_model(text, {"fixed": np.array([4, 6]), "zero": np.array([0])})
    assert fold_shape_arithmetic(model) == (0, 0)
    assert [node.op_type for node in model.graph] == ["Reshape", "Shape", "Gather"]


def test_inputs_whose_batch_axes_are_named_apart_are_sampled_at_one_batch_size(tmp_path: Path) -> None:
    """tf2onnx names each input's batch dimension apart (unk__6, unk__7): they are one batch, so the
    two inputs that are added together are sampled at one size and the target still folds."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[unk__6,6] x, float[unk__7,6] z, int64[1] zero, int64[1] three) => (float[M,3] y) {
      t = Add(x, z)
      s = Shape(t)
      b = Gather(s, zero)
      two = Add(b, b)
      target = Concat <axis = 0> (two, three)
      y = Reshape(t, target)
    }
    """
    constants = {"zero": np.array([0]), "three": np.array([3])}
    model = text_model(text, constants)
    assert fold_shape_arithmetic(model) == (0, 1)
    reshape = next(node for node in model.graph if node.op_type == "Reshape")
    assert reshape.inputs[1].const_value.numpy().tolist() == [-1, 3]
    rng = np.random.default_rng(0)
    feeds = {key: rng.standard_normal((11, 6)).astype(np.float32) for key in ("x", "z")}
    expected = runtime.make_session(save_model(text_model(text, constants), tmp_path / "a.onnx"), "disable").run(
        None, feeds
    )
    got = runtime.make_session(save_model(model, tmp_path / "b.onnx"), "disable").run(None, feeds)
    np.testing.assert_array_equal(got[0], expected[0])


def test_the_probes_leave_no_reader_behind() -> None:
    """The Shape probes put on each Reshape's output to sample it are removed with their inputs: a
    removed probe still listed as a reader kept the Reshape's output from being cut by select_early
    (nn.TransformerEncoderLayer's SASRec: 11 nodes computing the last position instead of 24)."""
    model = text_model(HEADS, CONSTANTS)
    assert fold_shape_arithmetic(model) == (1, 1)
    values = [*model.graph.inputs, *(output for node in model.graph for output in node.outputs)]
    assert all(use.node.graph is model.graph for value in values for use in value.uses())
