from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from conftest import compress_with_preset, model_files, save_model, text_model

from onnxcompress import runtime
from onnxcompress.bags import find_bag_loops, vectorize_bags
from onnxcompress.calibration import Calibration, Feeds
from onnxcompress.passes.base import PassContext
from onnxcompress.passes.cleanup import Cleanup

# An embedding bag as PyTorch exports one: a Loop over the bags, each slicing its ids out of the
# flattened [batch, 3] input, gathering their rows and reducing them (``{reduce}``).
BAG_LOOP = """
<ir_version: 8, opset_import: ["" : 17]>
g (int64[N,3] ids, float[10,4] table, int64[1] flat_shape, int64 zero, int64 three, int64[1] axis0) => (float[N,4] bags) {{
  flat = Reshape(ids, flat_shape)
  shape = Shape(ids)
  n = Gather <axis = 0> (shape, zero)
  go = Constant <value = bool {{1}}> ()
  bags = Loop (n, go) <body = body (int64 i, bool c) => (bool c_out, float[4] row) {{
    c_out = Identity(c)
    start = Mul(i, three)
    end = Add(start, three)
    first = Unsqueeze(start, axis0)
    last = Unsqueeze(end, axis0)
    part = Slice(flat, first, last)
    rows = Gather(table, part)
    {reduce}
  }}>
}}
"""
REDUCTIONS = {
    "sum": "row = ReduceSum <keepdims = 0> (rows, axis0)",
    "mean": "row = ReduceMean <keepdims = 0, axes = [0]> (rows)",
    "max": "row = ReduceMax <keepdims = 0, axes = [0]> (rows)",
    # Per-id weights (every row halved): not a plain sum, mean or max.
    "weighted": "half = Constant <value = float {0.5}> ()\n    weighted = Mul(rows, half)\n"
    "    row = ReduceSum <keepdims = 0> (weighted, axis0)",
    # A mean that leaves id 0 out (PyTorch's padding_idx), 0 for a bag of padding only.
    "skip_padding": "zero_id = Constant <value = int64 {0}> ()\n    kept = Greater(part, zero_id)\n"
    "    weights = Cast <to = 1> (kept)\n    counted = ReduceSum <keepdims = 0> (weights)\n"
    "    one_f = Constant <value = float {1}> ()\n    count = Max(counted, one_f)\n"
    "    wide = Unsqueeze(weights, one)\n    masked = Mul(rows, wide)\n"
    "    total = ReduceSum <keepdims = 0> (masked, axis0)\n    row = Div(total, count)",
    # A max that leaves id 0 out (PyTorch's padding_idx with mode="max"), 0 for a bag of padding only.
    "max_skip_padding": "zero_id = Constant <value = int64 {0}> ()\n    kept = Greater(part, zero_id)\n"
    "    wide = Unsqueeze(kept, one)\n    low = Constant <value = float {-1e30}> ()\n"
    "    masked = Where(wide, rows, low)\n    largest = ReduceMax <keepdims = 0, axes = [0]> (masked)\n"
    "    weights = Cast <to = 1> (kept)\n    counted = ReduceMax <keepdims = 0> (weights)\n"
    "    row = Mul(largest, counted)",
}


def bag_model(reduce: str, zero_row: bool = False) -> ir.Model:
    table = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    if zero_row:
        table[0] = 0.0  # a padding row, as PyTorch keeps it
    constants = {
        "table": table,
        "flat_shape": np.array([-1], np.int64),
        "zero": np.array(0, np.int64),
        "three": np.array(3, np.int64),
        "axis0": np.array([0], np.int64),
    }
    text = BAG_LOOP.format(reduce=REDUCTIONS[reduce])
    if reduce in ("skip_padding", "max_skip_padding"):
        text = text.replace("int64[1] axis0)", "int64[1] axis0, int64[1] one)")
        constants["one"] = np.array([1], np.int64)
    return text_model(text, constants)


def calibration(rows: int = 64, high: int = 10) -> Calibration:
    ids = np.random.default_rng(1).integers(0, high, (rows, 3)).astype(np.int64)
    return Calibration(Feeds({"ids": ids}, "test rows"))


def run(model: ir.Model, tmp_path: Path, ids: np.ndarray) -> np.ndarray:
    path = save_model(model, tmp_path / f"m{len(list(tmp_path.iterdir()))}.onnx")
    return runtime.make_session(path, "disable").run(None, {"ids": ids})[0]


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_a_bag_loop_becomes_a_gather_and_a_reduction_with_the_same_outputs(tmp_path: Path, reduce: str) -> None:
    ids = np.random.default_rng(2).integers(0, 10, (7, 3)).astype(np.int64)
    expected = run(bag_model(reduce), tmp_path, ids)
    model = bag_model(reduce)
    (bag,) = find_bag_loops(model)
    assert bag.table.name == "table" and [value.name for value in bag.ids] == ["ids"]
    outcome = vectorize_bags(model, calibration())
    assert list(outcome.values()) == [f"{reduce} of table rows gathered by ids"]
    ops = [node.op_type for node in model.graph]
    assert (
        "Loop" not in ops
        and "Gather" in ops
        and {"sum": "ReduceSum", "mean": "ReduceMean", "max": "ReduceMax"}[reduce] in ops
    )
    np.testing.assert_allclose(run(model, tmp_path, ids), expected, rtol=1e-6, atol=1e-6)
    # The body's reads of the main graph went with the loop: what only it read is left unused.
    assert not model.graph.initializers["three"].uses()
    ir.serde.serialize_model(model)


def test_a_loop_that_is_not_a_plain_bag_is_kept_with_its_reason() -> None:
    model = bag_model("weighted")
    outcome = vectorize_bags(model, calibration())
    (reason,) = outcome.values()
    assert reason.startswith("kept: its result is not a sum, mean or max of table rows")
    assert "Loop" in [node.op_type for node in model.graph]


def test_ids_the_calibration_rows_never_reach_are_checked_too() -> None:
    # A mean that skips id 0 agrees with ReduceMean on rows without a 0, and (row 0 not being zero)
    # it is no mean without a padding row either: the check on ids over the whole table catches it.
    model = bag_model("skip_padding")
    no_padding = Calibration(Feeds({"ids": np.random.default_rng(3).integers(1, 10, (64, 3))}, "rows"))
    outcome = vectorize_bags(model, no_padding)
    assert next(iter(outcome.values())).startswith("kept")


def test_cleanup_vectorizes_bags_only_with_calibration_rows() -> None:
    model = bag_model("sum")
    result = Cleanup(context=PassContext()).call(model)
    assert list(result.stats["embedding_bag_loops"].values()) == ["kept: no calibration rows to check the rewrite on"]
    model = bag_model("sum")
    result = Cleanup(context=PassContext(calibration=calibration())).call(model)
    assert result.modified and "Loop" not in [node.op_type for node in model.graph]


@pytest.mark.parametrize("name", ["dlrm_bag", "dlrm_bag_dynamo"])
def test_pytorch_embedding_bag_exports_lose_their_loop_and_their_table_is_quantized(tmp_path: Path, name: str) -> None:
    # TorchScript slices each bag in a Loop; dynamo nests a second Loop that skips the padding id
    # (whose row is zero, so the sum is the same).
    from onnxcompress import compress

    files = model_files(name)
    report = compress(
        files["onnx"], tmp_path / "lossless.onnx", ["cleanup"], feeds=files["feeds"], calib=files["calib"]
    )
    assert report.parity.passed and report.parity.outputs[0].max_abs <= 1e-6
    (stats,) = [record.stats for record in report.passes]
    assert list(stats["embedding_bag_loops"].values()) == ["sum of bag.weight rows gathered by history"]
    model = ir.load(tmp_path / "lossless.onnx")
    assert not [node for node in ir.traversal.RecursiveGraphIterator(model.graph) if node.op_type == "Loop"]
    report = compress_with_preset(name, "int8", tmp_path / "int8.onnx")
    quant = next(record.stats for record in report.passes if record.name == "quant")
    assert quant["tensors"]["bag.weight"]["bits"] == 8 and "bag.weight" not in quant.get("skipped", {})
    assert report.parity.passed and report.size_ratio > 3.9


def test_quant_without_cleanup_names_the_loop_and_the_fix() -> None:
    from onnxcompress.passes.quantize import Quantize

    model = ir.load(model_files("dlrm_bag")["onnx"])
    result = Quantize()(model)
    assert "run cleanup first" in result.stats["skipped"]["bag.weight"]


def test_a_max_that_leaves_out_a_zero_padding_row_masks_it_and_gives_0_for_padding_only(tmp_path: Path) -> None:
    """nn.EmbeddingBag(mode="max", padding_idx=0): padding ids do not take part in the maximum and
    a bag of padding only gives 0 (a plain max would give 0 wherever every other row is negative)."""
    ids = np.random.default_rng(6).integers(0, 10, (40, 3)).astype(np.int64)
    ids[:4] = 0
    expected = run(bag_model("max_skip_padding", zero_row=True), tmp_path, ids)
    model = bag_model("max_skip_padding", zero_row=True)
    outcome = vectorize_bags(model, calibration())
    assert list(outcome.values()) == ["max without id 0 of table rows gathered by ids"]
    ops = [node.op_type for node in model.graph]
    assert "Loop" not in ops and "ReduceMax" in ops and ops.count("Where") == 2
    np.testing.assert_allclose(run(model, tmp_path, ids), expected, rtol=1e-6, atol=1e-6)
    assert np.array_equal(run(model, tmp_path, ids)[:4], np.zeros((4, 4), np.float32))


def test_a_mean_that_leaves_out_a_zero_padding_row_becomes_a_sum_over_a_count(tmp_path: Path) -> None:
    ids = np.random.default_rng(5).integers(0, 10, (40, 3)).astype(np.int64)
    ids[:4] = 0  # bags of padding only: 0, as PyTorch gives
    expected = run(bag_model("skip_padding", zero_row=True), tmp_path, ids)
    model = bag_model("skip_padding", zero_row=True)
    outcome = vectorize_bags(model, calibration())
    assert list(outcome.values()) == ["mean without id 0 of table rows gathered by ids"]
    assert "Loop" not in [node.op_type for node in model.graph]
    np.testing.assert_allclose(run(model, tmp_path, ids), expected, rtol=1e-6, atol=1e-6)
