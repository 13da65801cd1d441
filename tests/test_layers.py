"""Layer discovery, removal and closed-form refit on tiny graphs written in ONNX text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from conftest import save_model, text_model

from onnxcompress import io, runtime
from onnxcompress.calibration import Calibration, Feeds
from onnxcompress.layers import (
    Activations,
    discover,
    find_layers,
    fitting_rows,
    layer_params,
    linear_weights,
    logit_heads,
    matmul_flops,
    refit_gap,
    remove,
    score_logit,
    score_logits,
)
from onnxcompress.numerics.distill import cosine_distance, mix_columns, relative_error
from onnxcompress.passes.distill import refit_heads

RNG = np.random.default_rng(0)

MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N,4] x, float[6,4] w0, float[6] b0, float[6,6] w1, float[6] b1, float[6] s1, float[6] t1, float[6] m1,
     float[6] v1, float[6,6] w2, float[6] b2, float[1,6] w3, float[1] b3) => (float[N] score) {
  h0 = Gemm <transB = 1> (x, w0, b0)
  a0 = Relu(h0)
  h1 = Gemm <transB = 1> (a0, w1, b1)
  n1 = BatchNormalization(h1, s1, t1, m1, v1)
  a1 = Relu(n1)
  d1 = Dropout(a1)
  h2 = Gemm <transB = 1> (d1, w2, b2)
  a2 = Relu(h2)
  o = Gemm <transB = 1> (a2, w3, b3)
  s = Sigmoid(o)
  shape = Constant <value = int64[1] {-1}> ()
  score = Reshape(s, shape)
}
"""


def mlp() -> ir.Model:
    rng = np.random.default_rng(1)
    shapes = {
        "w0": (6, 4),
        "b0": (6,),
        "w1": (6, 6),
        "b1": (6,),
        "s1": (6,),
        "t1": (6,),
        "m1": (6,),
        "w2": (6, 6),
        "b2": (6,),
        "w3": (1, 6),
        "b3": (1,),
    }
    arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    arrays["v1"] = rng.uniform(0.5, 2.0, 6).astype(np.float32)
    return text_model(MLP, arrays)


def affine(width: int) -> ir.Model:
    """A linear teacher: x -> Gemm -> per-unit Mul -> constant minus it -> BatchNormalization -> MatMul+Add."""
    rng = np.random.default_rng(2)
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    lin (float[N,4] x, float[4,{width}] w0, float[{width}] b0, float[{width}] k, float[{width}] s, float[{width}] t,
         float[{width}] m, float[{width}] v, float[{width},3] w1, float[3] b1) => (float[N,3] y) {{
      hb = Gemm(x, w0, b0)
      g = Mul(hb, k)
      f = Sub(b0, g)
      n = BatchNormalization(f, s, t, m, v)
      p = MatMul(n, w1)
      y = Add(p, b1)
    }}
    """
    arrays = {
        "w0": rng.standard_normal((4, width)),
        "b0": rng.standard_normal(width),
        "k": rng.standard_normal(width),
        "s": rng.standard_normal(width),
        "t": rng.standard_normal(width),
        "m": rng.standard_normal(width),
        "v": rng.uniform(0.5, 2.0, width),
        "w1": rng.standard_normal((width, 3)),
        "b1": rng.standard_normal(3),
    }
    return text_model(text, {name: array.astype(np.float32) for name, array in arrays.items()})


def block(b: int, source: str, post_norm: bool) -> str:
    """One transformer block (single-head attention + FFN) reading ``source``; output ``out(b)``."""
    attn_in, ffn_stream = (source, f"b{b}_n1") if post_norm else (f"b{b}_ln0", f"b{b}_r")
    lines = [
        "" if post_norm else f"b{b}_ln0 = LayerNormalization <axis = -1> ({source}, g, be)",
        f"b{b}_q = MatMul({attn_in}, b{b}_wq)",
        f"b{b}_k = MatMul({attn_in}, b{b}_wk)",
        f"b{b}_v = MatMul({attn_in}, b{b}_wv)",
        f"b{b}_kt = Transpose <perm = [0, 2, 1]> (b{b}_k)",
        f"b{b}_s = MatMul(b{b}_q, b{b}_kt)",
        f"b{b}_p = Softmax <axis = -1> (b{b}_s)",
        f"b{b}_c = MatMul(b{b}_p, b{b}_v)",
        f"b{b}_o = MatMul(b{b}_c, b{b}_wo)",
        f"b{b}_r = Add({source}, b{b}_o)",
        f"b{b}_n1 = LayerNormalization <axis = -1> (b{b}_r, g, be)",
        f"b{b}_u = MatMul(b{b}_n1, b{b}_wu)",
        f"b{b}_ub = Add(b{b}_u, b{b}_bu)",
        f"b{b}_a = Relu(b{b}_ub)",
        f"b{b}_d = MatMul(b{b}_a, b{b}_wd)",
        f"b{b}_db = Add(b{b}_d, b{b}_bd)",
        f"b{b}_y = Add({ffn_stream}, b{b}_db)",
        f"b{b}_out = LayerNormalization <axis = -1> (b{b}_y, g, be)" if post_norm else "",
    ]
    return "\n".join(line for line in lines if line)


def out(b: int, post_norm: bool) -> str:
    return f"b{b}_out" if post_norm else f"b{b}_y"


def transformer(post_norm: bool = False, blocks: int = 2) -> ir.Model:
    """Pre-norm (or post-norm) transformer over ``x`` [N, 5, 4], mean-pooled, linear head, sigmoid."""
    rng = np.random.default_rng(3)
    arrays = {"g": 1 + 0.1 * rng.standard_normal(4), "be": 0.1 * rng.standard_normal(4)}
    for b in range(blocks):
        for name in ("wq", "wk", "wv", "wo"):
            arrays[f"b{b}_{name}"] = rng.standard_normal((4, 4)) / 2
        arrays |= {f"b{b}_wu": rng.standard_normal((4, 8)) / 2, f"b{b}_bu": rng.standard_normal(8) / 4}
        arrays |= {f"b{b}_wd": rng.standard_normal((8, 4)) / 3, f"b{b}_bd": rng.standard_normal(4) / 4}
    arrays |= {"wh": rng.standard_normal((4, 1)), "bh": np.zeros(1)}
    params = ", ".join(f"float[{','.join(map(str, array.shape))}] {name}" for name, array in arrays.items())
    body = "\n".join(block(b, "x" if b == 0 else out(b - 1, post_norm), post_norm) for b in range(blocks))
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    tf (float[N,5,4] x, {params}) => (float[N] score) {{
      {body}
      pooled = ReduceMean <axes = [1], keepdims = 0> ({out(blocks - 1, post_norm)})
      h = MatMul(pooled, wh)
      hb = Add(h, bh)
      s = Sigmoid(hb)
      shape = Constant <value = int64[1] {{-1}}> ()
      score = Reshape(s, shape)
    }}
    """
    model = text_model(text, {name: array.astype(np.float32) for name, array in arrays.items()})
    for node in model.graph:  # scope names as exporters write them: /blocks.0/q
        name = node.outputs[0].name or ""
        if name[:1] == "b" and name[1:2].isdigit() and "_" in name:
            scope, _, rest = name.partition("_")
            node.name = f"/blocks.{scope[1:]}/{rest}"
    return model


def node_of(model: ir.Model, output: str) -> ir.Node:
    return next(node for node in model.graph if node.outputs[0].name == output)


def calibration_for(model: ir.Model, rows: int = 256, seed: int = 0) -> Calibration:
    rng = np.random.default_rng(seed)
    arrays = {}
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        shape = [rows if not isinstance(dim, int) else dim for dim in value.shape]  # type: ignore[union-attr]
        arrays[value.name] = rng.standard_normal(shape).astype(np.float32)
    return Calibration(Feeds(arrays, "test rows"))


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return runtime.make_session(model, "disable").run(None, feeds)


def test_mlp_layers_are_found_with_their_nodes_and_names() -> None:
    model = mlp()
    layers = discover(model)
    assert [(layer.name, layer.kind) for layer in layers] == [("w0", "mlp"), ("w1", "mlp"), ("w2", "mlp")]
    middle = layers[1]
    assert [node.op_type for node in middle.nodes] == ["Gemm", "BatchNormalization", "Relu", "Dropout"]
    assert middle.input is node_of(model, "a0").outputs[0]
    assert middle.link is not None and middle.link.consumer.node is node_of(model, "h2")


def test_bypassing_an_equal_width_layer_rewires_the_next_layer_to_its_input() -> None:
    model = mlp()
    relu0, next_layer = node_of(model, "a0"), node_of(model, "h2")
    weight_before = next_layer.inputs[1].const_value.numpy().copy()  # type: ignore[union-attr]
    remove(model, discover(model)[1])
    assert next_layer.inputs[0] is relu0.outputs[0]
    assert [node.op_type for node in model.graph] == [
        "Gemm",
        "Relu",
        "Gemm",
        "Relu",
        "Gemm",
        "Sigmoid",
        "Constant",
        "Reshape",
    ]
    assert {"w1", "b1", "s1", "t1", "m1", "v1"}.isdisjoint(model.graph.initializers)
    np.testing.assert_array_equal(next_layer.inputs[1].const_value.numpy(), weight_before)  # type: ignore[union-attr]


def test_merging_layers_of_different_widths_reshapes_the_next_weight(tmp_path: Path) -> None:
    model = mlp()
    x, consumer = model.graph.inputs[0], node_of(model, "h1")
    remove(model, discover(model)[0])
    assert consumer.inputs[0] is x
    assert consumer.inputs[1].shape == ir.Shape([6, 4])  # type: ignore[union-attr]
    assert consumer.inputs[1].const_value.shape == ir.Shape([6, 4])  # type: ignore[union-attr]
    io.load(save_model(model, tmp_path / "merged.onnx"))  # passes the checker
    (score,) = run(model, {"x": RNG.standard_normal((3, 4)).astype(np.float32)})
    assert score.shape == (3,)


def test_the_merged_map_reproduces_a_linear_teacher_exactly() -> None:
    teacher = affine(width=6)
    feeds = {"x": RNG.standard_normal((50, 4)).astype(np.float32)}
    (expected,) = run(teacher, feeds)
    student = teacher.clone()
    (layer,) = discover(student)
    removal = remove(student, layer)
    assert removal.merged is not None and removal.merged.weight.const_value.shape == ir.Shape([4, 3])  # type: ignore[union-attr]
    assert len(student.graph) == 2  # MatMul + Add: no node of the removed layer remains
    (merged,) = run(student, feeds)
    np.testing.assert_allclose(merged, expected, rtol=1e-4, atol=1e-4)


def test_refit_makes_a_bypassed_layer_exact_when_the_teacher_is_linear() -> None:
    teacher = affine(width=4)  # equal widths: the layer is bypassed, which a linear teacher does not forgive
    feeds = {"x": RNG.standard_normal((50, 4)).astype(np.float32)}
    (expected,) = run(teacher, feeds)
    student = teacher.clone()
    removal = remove(student, discover(student)[0])
    (bypassed,) = run(student, feeds)
    assert relative_error(expected, bypassed) > 0.1
    activations = Activations(teacher, calibration_for(teacher))
    assert refit_gap(student, removal, activations, damping=1e-9) == ["w1"]
    (refit,) = run(student, feeds)
    np.testing.assert_allclose(refit, expected, rtol=1e-3, atol=1e-3)


def test_transformer_blocks_and_their_sub_blocks_are_found() -> None:
    model = transformer()
    found = {layer.name: layer for layer in discover(model)}
    assert {name: layer.kind for name, layer in found.items()} == {
        "blocks.0": "transformer",
        "blocks.0.attention": "residual",
        "blocks.0.ffn": "residual",
        "blocks.0/u": "mlp",
        "blocks.1": "transformer",
        "blocks.1.attention": "residual",
        "blocks.1.ffn": "residual",
        "blocks.1/u": "mlp",
    }
    first = found["blocks.0"]
    assert first.input is model.graph.inputs[0]
    assert first.output is node_of(model, "b0_y").outputs[0]
    assert len(first.nodes) == 17 and node_of(model, "b0_p") in first.nodes
    assert found["blocks.1.ffn"].input is node_of(model, "b1_r").outputs[0]


def test_a_post_norm_block_owns_its_trailing_normalization() -> None:
    model = transformer(post_norm=True, blocks=1)
    (block_,) = [layer for layer in discover(model) if layer.kind == "transformer"]
    assert block_.output is node_of(model, "b0_out").outputs[0]
    assert {node_of(model, "b0_n1"), node_of(model, "b0_out")} <= set(block_.nodes)


def test_removing_the_first_block_refits_the_next_block() -> None:
    teacher = transformer()
    student = teacher.clone()
    layer = next(layer for layer in discover(student) if layer.name == "blocks.0")
    removal = remove(student, layer)
    x = student.graph.inputs[0]
    assert node_of(student, "b1_ln0").inputs[0] is x and node_of(student, "b1_r").inputs[0] is x
    assert not any(node.name.startswith("/blocks.0/") for node in student.graph)
    assert not any(name.startswith("b0_") for name in student.graph.initializers)
    calibration = calibration_for(teacher, rows=512)
    refit = refit_gap(student, removal, Activations(teacher, calibration), damping=1e-4)
    assert refit == ["blocks.1/q", "blocks.1/k", "blocks.1/v", "blocks.1/o"]


def test_removing_the_last_block_refits_the_layer_writing_the_stream_before_it() -> None:
    teacher = transformer()
    calibration = calibration_for(teacher, rows=512)
    feeds = calibration_for(teacher, rows=200, seed=1).feeds.arrays
    (expected,) = run(teacher, feeds)
    student = teacher.clone()
    removal = remove(student, next(layer for layer in discover(student) if layer.name == "blocks.1"))
    (bypassed,) = run(student, feeds)
    assert refit_gap(student, removal, Activations(teacher, calibration), damping=1e-4) == ["blocks.0/d"]
    (refit,) = run(student, feeds)
    assert relative_error(expected, refit) < 0.7 * relative_error(expected, bypassed)


def test_the_logit_and_the_heads_adding_into_it() -> None:
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3] a, float[N,2] b, float[1,3] wa, float[1] ba, float[2,1] wb) => (int64[N] label, float[N,2] probabilities) {
          ha = Gemm <transB = 1> (a, wa, ba)
          hb = MatMul(b, wb)
          axes = Constant <value = int64[1] {1}> ()
          fm = ReduceSum <keepdims = 1> (a, axes)
          t = Add(ha, hb)
          logit = Add(t, fm)
          p = Sigmoid(logit)
          one = Constant <value = float[1] {1}> ()
          q = Sub(one, p)
          probabilities = Concat <axis = 1> (q, p)
          picked = ArgMax <axis = 1, keepdims = 0> (probabilities)
          label = Identity(picked)
        }
        """,
        {"wa": np.ones((1, 3), np.float32), "ba": np.zeros(1, np.float32), "wb": np.ones((2, 1), np.float32)},
    )
    logit = score_logit(model)
    assert logit is node_of(model, "logit").outputs[0]
    assert [layer.node for layer in logit_heads(model, logit)] == [node_of(model, "ha"), node_of(model, "hb")]


def test_logit_matching_recovers_heads_exactly() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3] a, float[N,2] b, float[1,3] wa, float[1] ba, float[2,1] wb) => (float[N] score) {
      ha = Gemm <transB = 1> (a, wa, ba)
      hb = MatMul(b, wb)
      axes = Constant <value = int64[1] {1}> ()
      fm = ReduceSum <keepdims = 1> (a, axes)
      t = Add(ha, hb)
      logit = Add(t, fm)
      s = Sigmoid(logit)
      shape = Constant <value = int64[1] {-1}> ()
      score = Reshape(s, shape)
    }
    """
    weights = {"wa": np.array([[1.0, -2.0, 0.5]]), "ba": np.array([0.3]), "wb": np.array([[0.7], [-1.1]])}
    teacher = text_model(text, {name: array.astype(np.float32) for name, array in weights.items()})
    student = text_model(text, {name: np.zeros_like(array, np.float32) for name, array in weights.items()})
    fitting = fitting_rows(teacher, calibration_for(teacher), augment=0)
    (teacher_logit,) = Activations(teacher, fitting.calibration)("logit")
    assert refit_heads(student, [teacher_logit], fitting, damping=1e-9) == ["wa", "wb"]
    np.testing.assert_allclose(student.graph.initializers["wa"].const_value.numpy(), weights["wa"], atol=1e-4)  # type: ignore[union-attr]
    np.testing.assert_allclose(student.graph.initializers["wb"].const_value.numpy(), weights["wb"], atol=1e-4)  # type: ignore[union-attr]
    np.testing.assert_allclose(student.graph.initializers["ba"].const_value.numpy(), weights["ba"], atol=1e-4)  # type: ignore[union-attr]


def test_parameters_and_flops_of_layers() -> None:
    model = mlp()
    w0, w1, _ = discover(model)
    assert layer_params(w1) == 6 * 6 + 6 + 4 * 6  # the layer, its bias and BatchNormalization
    assert layer_params(w0) == 6 * 4 + 6 + (6 - 4) * 6  # minus what the merged next layer gains
    flops = matmul_flops(model, calibration_for(model, rows=4).feeds)
    assert flops[node_of(model, "h0")] == 2 * 4 * 6 and flops[node_of(model, "o")] == 2 * 6
    model = transformer(blocks=1)
    flops = matmul_flops(model, calibration_for(model, rows=4).feeds)
    assert flops[node_of(model, "b0_s")] == 2 * 5 * 5 * 4  # q @ k^T: [5, 4] x [4, 5] per row
    assert flops[node_of(model, "b0_u")] == 2 * 5 * 4 * 8


def test_find_layers_measures_importance_and_leaves_the_model_alone() -> None:
    model = transformer()
    before = ir.serde.serialize_model(model).SerializeToString()
    reports = {report.name: report for report in find_layers(model, calibration_for(model), augment=64)}
    assert ir.serde.serialize_model(model).SerializeToString() == before
    assert set(reports) == {layer.name for layer in discover(model)}
    whole = reports["blocks.1"]
    assert whole.params == 4 * 4 * 4 + 4 * 8 + 8 + 8 * 4 + 4 and whole.importance > 0
    assert whole.importance_refit is not None and whole.importance_refit < whole.importance
    assert whole.cos_distance is not None and 0 < whole.cos_distance < 2
    assert reports["blocks.1/u"].cos_distance is None


def test_find_layers_synthesizes_calibration_rows_when_none_are_given() -> None:
    (report, *_) = find_layers(mlp(), augment=0)
    assert report.name == "w0" and report.importance_refit is not None


def test_mix_columns_draws_every_column_from_the_given_rows() -> None:
    arrays = {"ids": np.arange(12).reshape(4, 3), "seq": np.arange(24).reshape(4, 2, 3), "one": np.arange(4)}
    mixed = mix_columns(arrays, 100)
    assert mixed["ids"].shape == (100, 3) and mixed["seq"].shape == (100, 2, 3)
    for column in range(3):
        assert set(mixed["ids"][:, column]) <= set(arrays["ids"][:, column])
    assert {tuple(row.ravel()) for row in mixed["seq"]} <= {tuple(row.ravel()) for row in arrays["seq"]}


def test_inputs_every_row_shares_are_not_mixed_and_fitting_rows_keep_them() -> None:
    """A 0-d temperature input made mix_columns raise IndexError (the max preset and --list-layers)."""
    arrays = {"x": np.arange(12.0).reshape(4, 3), "temperature": np.array(2.0), "flag": np.array([1.0])}
    mixed = mix_columns(arrays, 10)
    assert set(mixed) == {"x"} and mixed["x"].shape == (10, 3)
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3] x, float temperature, float[3,4] w) => (float[N,4] y) {
          h = MatMul(x, w)
          y = Div(h, temperature)
        }
        """,
        {"w": np.ones((3, 4), np.float32)},
    )
    feeds = {"x": np.ones((4, 3), np.float32), "temperature": np.array(2.0, np.float32)}
    fitting = fitting_rows(model, Calibration(Feeds(feeds, "test")), augment=6)
    assert fitting.calibration.feeds.arrays["x"].shape == (10, 3)
    assert fitting.calibration.feeds.arrays["temperature"].shape == ()


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [([[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [3.0, 1.0]], 0.0), ([[1.0, 0.0]], [[0.0, 2.0]], 1.0)],
)
def test_cosine_distance_skips_zero_vectors(a: list, b: list, expected: float) -> None:
    assert cosine_distance(np.array(a), np.array(b)) == pytest.approx(expected)


def test_linear_weights_read_both_layouts() -> None:
    model = mlp()
    w0 = discover(model)[0].link.producer  # type: ignore[union-attr]
    weight, bias = linear_weights(w0)
    assert weight.shape == (4, 6) and bias.shape == (6,)


def test_score_logits_are_the_logits_behind_every_score_output_and_not_a_silu() -> None:
    """A two-tower's embedding output is not a score; each task's sigmoid output is; a SiLU's
    Sigmoid inside the network is not a score's (it is reached only through a MatMul)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,4] x, float[4,4] w, float[4,1] a, float[4,1] b) => (float[N,4] emb, float[N,1] ctr, float[N] cvr) {
      h = MatMul(x, w)
      s = Sigmoid(h)
      emb = Mul(h, s)
      la = MatMul(emb, a)
      ctr = Sigmoid(la)
      lb = MatMul(emb, b)
      pb = Sigmoid(lb)
      shape = Constant <value = int64[1] {-1}> ()
      cvr = Reshape(pb, shape)
    }
    """
    rng = np.random.default_rng(0)
    model = text_model(
        text, {n: rng.standard_normal(sh).astype(np.float32) for n, sh in (("w", (4, 4)), ("a", (4, 1)), ("b", (4, 1)))}
    )
    assert [value.name for value in score_logits(model)] == ["la", "lb"]
    assert score_logit(model).name == "la"
    plain = text_model(
        text, {n: rng.standard_normal(sh).astype(np.float32) for n, sh in (("w", (4, 4)), ("a", (4, 1)), ("b", (4, 1)))}
    )
    for output in plain.graph.outputs:
        output.shape = None
    assert [value.name for value in score_logits(plain)] == ["la"]  # shapes unknown: the first with a Sigmoid
