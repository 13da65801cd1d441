"""Folding a per-channel scale of a layer's input into the ops upstream (SmoothQuant without a Mul)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
from conftest import save_model, text_model

from onnxcompress import runtime
from onnxcompress.channel_scale import scale_last_axis, scaling_form

RNG = np.random.default_rng(7)

CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
chain (float[N,6] x, int64[N] ids, float[5,6] w1, float[5] b1, float[5] gamma, float[5] beta,
       float[10,4] table, float[15,3] w2, float[10,4] table2)
    => (float[N,3] y, float[N,4] side) <float[N,5] n, float[N,4] t> {
  h = Gemm <transB = 1> (x, w1, b1)
  r = Relu(h)
  n = LayerNormalization <axis = -1> (r, gamma, beta)
  t = Gather(table, ids)
  c = Concat <axis = -1> (n, t, x)
  y = MatMul(c, w2)
  t2 = Gather(table2, ids)
  side = Relu(t2)
}
"""


CHAIN_WEIGHTS = {
    "w1": RNG.standard_normal((5, 6)).astype(np.float32),
    "b1": RNG.standard_normal(5).astype(np.float32),
    "gamma": RNG.uniform(0.5, 2, 5).astype(np.float32),
    "beta": RNG.standard_normal(5).astype(np.float32),
    "table": RNG.standard_normal((10, 4)).astype(np.float32),
    "w2": RNG.standard_normal((15, 3)).astype(np.float32),
    "table2": RNG.standard_normal((10, 4)).astype(np.float32),
}


def chain_model() -> ir.Model:
    return text_model(CHAIN, {name: array.copy() for name, array in CHAIN_WEIGHTS.items()})


def run(model: ir.Model, path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return runtime.run(runtime.make_session(save_model(model, path), "disable"), feeds)


FEEDS = {"x": RNG.standard_normal((32, 6)).astype(np.float32), "ids": RNG.integers(0, 10, 32).astype(np.int64)}


def test_a_scale_folds_through_norm_relu_and_tables_and_only_the_graph_input_keeps_a_mul(tmp_path: Path) -> None:
    factors = RNG.uniform(0.2, 5.0, 15).astype(np.float32)
    reference = chain_model()
    captured = run(reference, tmp_path / "ref.onnx", FEEDS)
    model = chain_model()
    consumer = next(node for node in model.graph if node.op_type == "MatMul")
    concat_output = consumer.inputs[0]
    assert concat_output is not None
    nodes_before = [node.op_type for node in model.graph]
    assert scaling_form(model.graph, concat_output, factors) == "partly folded"  # only a forecast:
    assert [node.op_type for node in model.graph] == nodes_before  # nothing changed yet
    how = scale_last_axis(model.graph, concat_output, factors, consumer)
    assert how == "partly folded"  # x is a graph input: the one part that needs a Mul
    muls = [node for node in model.graph if node.op_type == "Mul"]
    assert len(muls) == 1 and muls[0].inputs[0] is model.graph.inputs[0]
    # the consumer now reads c * factors: with w2 divided by the factors the output is unchanged
    w2 = model.graph.initializers["w2"]
    w2.const_value = ir.tensor(w2.const_value.numpy() / factors[:, None])  # type: ignore[union-attr]
    got = run(model, tmp_path / "scaled.onnx", FEEDS)
    np.testing.assert_allclose(got["y"], captured["y"], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got["side"], captured["side"])  # another table is left alone


def test_a_value_with_other_readers_gets_a_mul_and_they_still_read_it_unscaled(tmp_path: Path) -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    shared (float[N,4] x, float[4,4] w1, float[4,2] w2) => (float[N,2] y, float[N,4] r) {
      h = MatMul(x, w1)
      r = Relu(h)
      y = MatMul(r, w2)
    }
    """
    weights = {"w1": RNG.standard_normal((4, 4)).astype(np.float32), "w2": RNG.standard_normal((4, 2)).astype(np.float32)}
    feeds = {"x": FEEDS["x"][:, :4].copy()}
    captured = run(text_model(text, weights), tmp_path / "ref.onnx", feeds)
    model = text_model(text, weights)
    consumer = next(node for node in model.graph if node.outputs[0].name == "y")
    relu_output = consumer.inputs[0]
    assert relu_output is not None
    factors = np.array([2.0, 1.0, 4.0, 0.5], np.float32)
    assert scaling_form(model.graph, relu_output, factors) == "mul"
    assert scale_last_axis(model.graph, relu_output, factors, consumer) == "mul"
    np.testing.assert_array_equal(model.graph.initializers["w1"].const_value.numpy(), weights["w1"])  # type: ignore[union-attr]
    got = run(model, tmp_path / "scaled.onnx", feeds)
    np.testing.assert_array_equal(got["r"], captured["r"])
    np.testing.assert_allclose(got["y"], (captured["r"] * factors) @ weights["w2"], rtol=1e-5, atol=1e-5)


def test_factors_of_one_change_nothing(tmp_path: Path) -> None:
    model = chain_model()
    consumer = next(node for node in model.graph if node.op_type == "MatMul")
    before = len(list(model.graph))
    assert scale_last_axis(model.graph, consumer.inputs[0], np.ones(15, np.float32), consumer) == "folded"  # type: ignore[arg-type]
    assert len(list(model.graph)) == before


def test_a_forecast_never_reads_a_table_and_folding_reads_it_once() -> None:
    """Tables may be gigabytes on disk: planning looks at shapes only (the 2.3 GB DLRM's int8 run
    peaked at 4.9 GB while forecasts materialised scaled copies of its tables)."""
    model = chain_model()
    table = model.graph.initializers["table"]
    array = table.const_value.numpy()  # type: ignore[union-attr]
    reads = []

    def load() -> ir.TensorProtocol:
        reads.append(1)
        return ir.tensor(array)

    table.const_value = ir.LazyTensor(load, dtype=ir.DataType.FLOAT, shape=ir.Shape(array.shape), name="table")
    consumer = next(node for node in model.graph if node.op_type == "MatMul")
    concat_output = consumer.inputs[0]
    assert concat_output is not None
    factors = RNG.uniform(0.5, 2.0, 15).astype(np.float32)
    assert scaling_form(model.graph, concat_output, factors) == "partly folded"
    assert reads == []
    assert scale_last_axis(model.graph, concat_output, factors, consumer) == "partly folded"
    assert len(reads) == 1
    np.testing.assert_allclose(model.graph.initializers["table"].const_value.numpy(), array * factors[5:9], rtol=1e-6)  # type: ignore[union-attr]
