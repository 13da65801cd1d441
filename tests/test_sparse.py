"""The sparse storage pass: exact round trips, int8 weights before DequantizeLinear, folding at load."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import save_model, text_model
from onnx.reference import ReferenceEvaluator

from onnxcompress.passes.sparse import SparseStorage

FLOAT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,64] x, float[64,32] w) => (float[N,32] y) {
  y = MatMul(x, w)
}
"""

INT8 = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,64] x, int8[64,32] q, float scale) => (float[N,32] y) {
  w = DequantizeLinear(q, scale)
  y = MatMul(x, w)
}
"""


def sparse_weight(dtype: type, zeros: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        w = rng.integers(-127, 128, (64, 32)).astype(dtype)
    else:
        w = rng.standard_normal((64, 32)).astype(dtype)
    w[rng.random(w.shape) < zeros] = 0
    return w


def run_both(model: ir.Model, original: ir.Model, tmp_path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = save_model(original, tmp_path / "a.onnx")
    b = save_model(model, tmp_path / "b.onnx")
    want = ort.InferenceSession(str(a), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(b), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return want, got


def test_float_weights_round_trip_bit_for_bit_with_negative_zero_and_nan(tmp_path: Path) -> None:
    w = sparse_weight(np.float32, 0.8)
    w[0, 0], w[0, 1], w[0, 2] = -0.0, np.nan, 0.0
    model = text_model(FLOAT, {"w": w})
    result = SparseStorage()(model)
    assert result.modified is True
    encoded = result.stats["tensors"]["w"]
    assert encoded["bytes_before"] == w.nbytes
    assert encoded["bytes_after"] == 64 * 32 // 8 + (int(np.count_nonzero(w.view(np.uint32))) + 1) * 4
    assert "w" not in model.graph.initializers
    matmul = next(node for node in model.graph if node.op_type == "MatMul")
    assert matmul.inputs[1].name == "w" and matmul.inputs[1].producer().op_type == "Reshape"
    path = save_model(model, tmp_path / "sparse.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    decoded = ReferenceEvaluator(str(path)).run(["w"], {"x": np.zeros((1, 64), np.float32)})[0]
    np.testing.assert_array_equal(decoded.view(np.uint32), w.view(np.uint32))  # -0.0 and NaN bit for bit


def test_int8_weights_feeding_dequantize_linear_are_exact_in_onnxruntime(tmp_path: Path) -> None:
    q = sparse_weight(np.int8, 0.85)
    arrays = {"q": q, "scale": np.array(0.05, np.float32)}
    model = text_model(INT8, arrays)
    result = SparseStorage()(model)
    assert result.stats["tensors_encoded"] == 1 and result.stats["bytes_after"] < q.nbytes / 2
    x = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    want, got = run_both(model, text_model(INT8, arrays), tmp_path, x)
    assert np.abs(got - want).max() == 0.0


def test_onnxruntime_folds_the_decoder_at_load(tmp_path: Path) -> None:
    model = text_model(FLOAT, {"w": sparse_weight(np.float32, 0.9)})
    SparseStorage()(model)
    path = save_model(model, tmp_path / "sparse.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = Counter(node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops == Counter({"MatMul": 1})


@pytest.mark.parametrize(
    ("zeros", "config", "reason"),
    [
        (0.1, {}, "zeros, below min_sparsity"),
        (0.0, {"min_sparsity": 0.0}, "zeros do not pay for the mask and decode nodes"),
    ],
)
def test_dense_tensors_are_left_alone_with_the_reason(zeros: float, config: dict, reason: str) -> None:
    model = text_model(FLOAT, {"w": sparse_weight(np.float32, zeros)})
    result = SparseStorage(SparseStorage.Config(**config))(model)
    assert result.modified is False
    assert reason in result.stats["skipped"]["w"]
    assert "w" in model.graph.initializers


def test_old_opsets_and_small_tensors_are_skipped_before_reading() -> None:
    old = text_model(FLOAT.replace('"" : 17', '"" : 10'), {"w": sparse_weight(np.float32, 0.9)})
    result = SparseStorage()(old)
    assert result.stats["skipped"] == {"w": "opset 10 < 11 (no BitShift/CumSum)"}
    small = text_model(FLOAT, {"w": sparse_weight(np.float32, 0.9)})
    assert SparseStorage(SparseStorage.Config(min_elements=4096))(small).modified is False


def test_running_twice_changes_nothing_more() -> None:
    model = text_model(FLOAT, {"w": sparse_weight(np.float32, 0.9)})
    assert SparseStorage()(model).modified is True
    again = SparseStorage()(model)
    assert again.modified is False
