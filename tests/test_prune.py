"""The prune pass: exact masks on tiny graphs, hidden-unit removal, reconstruction, real models via the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import model_files, save_model, shipped_model_with_calibration, text_model
from onnx.reference import ReferenceEvaluator

from onnxcompress.calibration import Calibration, Feeds
from onnxcompress.graph import OVERRIDABLE_WEIGHT, dot_product_pairs, linear_layers, mlp_links, relu_chains
from onnxcompress.passes.base import PassContext
from onnxcompress.passes.prune import Prune

RNG = np.random.default_rng(0)

LINEAR = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x, float[4,8] w, float[8] b, float[1,8] w2, float[8,1] w3) => (float[N,8] y, float[N,1] z) {
  m = MatMul(x, w)
  y = Add(m, b)
  a = Gemm <transB = 1> (y, w2)
  z = MatMul(y, w3)
}
"""


def linear_model(w: np.ndarray) -> ir.Model:
    return text_model(
        LINEAR,
        {
            "w": w,
            "b": np.ones(8, np.float32),
            "w2": np.ones((1, 8), np.float32),
            "w3": np.ones((8, 1), np.float32),
        },
    )


def prune(model: ir.Model, calibration: Calibration | None = None, **options: object) -> Prune:
    return Prune(Prune.Config(**{"min_elements": 1, **options}), PassContext(calibration=calibration))


def test_magnitude_mask_is_exact_and_biases_are_never_pruned() -> None:
    w = np.arange(1, 33, dtype=np.float32).reshape(4, 8) * np.where(np.arange(32) % 2, -1, 1).reshape(4, 8)
    model = linear_model(w)
    result = prune(model, op_types=("MatMul",))(model)
    assert result.modified is True
    pruned = model.graph.initializers["w"].const_value.numpy()
    np.testing.assert_array_equal(pruned, np.where(np.abs(w) > 16, w, 0))  # the 16 smallest |w| are zero
    np.testing.assert_array_equal(model.graph.initializers["b"].const_value.numpy(), np.ones(8))
    assert result.stats["tensors"]["w"]["sparsity"] == 0.5
    assert result.stats["tensors"]["w"]["why_not_reconstructed"] == "no calibration data"
    assert result.stats["skipped"]["w2"] == "read by Gemm, not all in op_types"
    assert set(result.stats["tensors"]) == {"w", "w3"}


def test_pruning_is_deferred_until_the_tensor_is_read() -> None:
    model = linear_model(RNG.standard_normal((4, 8)).astype(np.float32))
    prune(model)(model)
    assert isinstance(model.graph.initializers["w"].const_value, ir.LazyTensor)


def test_n_m_runs_along_the_reduction_axis_of_a_transposed_gemm() -> None:
    w = np.array([[1, 4, 3, 2, 9, 8, 0, 7], [5, 6, 7, 8, 1, 2, 3, 4]], np.float32)  # [out=2, in=8], transB=1
    model = linear_model(RNG.standard_normal((4, 8)).astype(np.float32))
    model.graph.initializers["w2"].const_value = ir.tensor(w, name="w2")
    result = prune(model, structure="2:4", op_types=("Gemm",))(model)
    kept = model.graph.initializers["w2"].const_value.numpy() != 0
    np.testing.assert_array_equal(kept, [[0, 1, 1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0, 1, 1]])
    assert result.stats["tensors"]["w2"]["sparsity"] == 0.5


def test_skip_reasons_for_inputs_small_tensors_and_patterns() -> None:
    model = linear_model(RNG.standard_normal((4, 8)).astype(np.float32))
    result = Prune(Prune.Config(min_elements=9, exclude="^w$"))(model)
    assert result.modified is False
    assert result.stats["skipped"] == {
        "w": "matched by exclude '^w$'",
        "w2": "8 elements, fewer than min_elements=9",
        "w3": "8 elements, fewer than min_elements=9",
    }
    overridable = text_model(LINEAR.replace("float[8,1] w3)", "float[8,1] w3)"), {"w": np.ones((4, 8), np.float32)})
    result = prune(overridable)(overridable)
    # w2, w3 and b stayed graph inputs: a caller may feed other values, so they are not weights.
    assert result.stats["tensors"].keys() == {"w"}
    with pytest.raises(ValueError, match="N:M such as 2:4"):
        Prune.Config(structure="half")


def test_a_graph_input_that_is_also_an_initializer_is_skipped_with_its_reason() -> None:
    model = linear_model(RNG.standard_normal((4, 8)).astype(np.float32))
    w3 = model.graph.initializers["w3"]
    model.graph.inputs.append(w3)
    result = prune(model)(model)
    assert result.stats["skipped"]["w3"] == OVERRIDABLE_WEIGHT


def test_a_tied_weight_is_pruned_once_and_stays_shared() -> None:
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,6] x, float[6,6] w) => (float[N,6] z) {
          y = MatMul(x, w)
          z = MatMul(y, w)
        }
        """,
        {"w": RNG.standard_normal((6, 6)).astype(np.float32)},
    )
    calibration = Calibration(Feeds({"x": RNG.standard_normal((64, 6)).astype(np.float32)}, "test"))
    result = prune(model, calibration)(model)
    first, second = list(model.graph)
    assert first.inputs[1] is second.inputs[1] is model.graph.initializers["w"]
    assert result.stats["tensors_pruned"] == 1
    assert result.stats["tensors"]["w"]["reconstructed"] is False
    assert "single MatMul, Gemm" in result.stats["tensors"]["w"]["why_not_reconstructed"]


def test_global_scope_prunes_the_smaller_weights_harder() -> None:
    model = linear_model(RNG.standard_normal((4, 8)).astype(np.float32) * 10)
    result = prune(model, scope="global", max_layer_sparsity=0.9)(model)
    tensors = result.stats["tensors"]
    assert tensors["w3"]["sparsity"] > 0.5 > tensors["w"]["sparsity"]


def calibration_for(x: np.ndarray) -> Calibration:
    return Calibration(Feeds({"x": x}, "test"))


def relu_chain(hidden: int = 16, seed: int = 1) -> tuple[ir.Model, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.standard_normal((8, hidden)).astype(np.float32),
        "b1": rng.standard_normal(hidden).astype(np.float32),
        "w2": rng.standard_normal((hidden, 4)).astype(np.float32),
        "b2": rng.standard_normal(4).astype(np.float32),
    }
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,8] x, float[8,{hidden}] w1, float[{hidden}] b1, float[{hidden},4] w2, float[4] b2) => (float[N,4] y) {{
      m = MatMul(x, w1)
      h = Add(m, b1)
      r = Relu(h)
      n = MatMul(r, w2)
      y = Add(n, b2)
    }}
    """
    return text_model(text, weights), weights


def output_error(model: ir.Model, weights: dict[str, np.ndarray], x: np.ndarray, tmp_path: Path) -> float:
    path = save_model(model, tmp_path / f"m{len(list(tmp_path.iterdir()))}.onnx")
    (got,) = ReferenceEvaluator(str(path)).run(None, {"x": x})
    want = np.maximum(x @ weights["w1"] + weights["b1"], 0) @ weights["w2"] + weights["b2"]
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_reconstruction_beats_plain_magnitude_on_calibration_activations(tmp_path: Path) -> None:
    x = RNG.standard_normal((256, 8)).astype(np.float32)
    plain, weights = relu_chain()
    prune(plain, sparsity=0.5)(plain)
    refit, _ = relu_chain()
    result = prune(refit, calibration_for(x), sparsity=0.5, scope="layer")(refit)
    assert result.stats["tensors"]["w1"]["reconstructed"] is True
    assert result.stats["tensors"]["w2"]["sparsity"] == 0.5
    assert output_error(refit, weights, x, tmp_path) < 0.85 * output_error(plain, weights, x, tmp_path)


def test_tuning_the_chain_jointly_beats_the_layer_by_layer_refit(tmp_path: Path) -> None:
    """Block reconstruction: after the per-layer refits, the second layer is tuned together with
    the first to make up for what the first lost (zeros kept)."""
    x = np.random.default_rng(11).standard_normal((512, 8)).astype(np.float32)
    errors = {}
    for steps in (0, 1500):
        model, weights = relu_chain()
        result = prune(model, calibration_for(x), sparsity=0.75, scope="layer", tune_steps=steps)(model)
        errors[steps] = output_error(model, weights, x, tmp_path)
        assert result.stats["tensors"]["w1"]["sparsity"] == 0.75
    (chain,) = result.stats["tuned_chains"].items()
    assert chain[0] == "w1 .. w2" and chain[1]["held_out_error"][1] < chain[1]["held_out_error"][0]
    assert errors[1500] < 0.95 * errors[0]


def test_n_m_and_high_sparsity_tune_the_mlp_chains_by_default(tmp_path: Path) -> None:
    """tune_steps=auto: N:M takes the same share from every layer, the narrow first ones too, so the
    chains are tuned after the refits (shipped DLRM at 2:4, test rows: Spearman 0.992 without, 0.996
    with); unstructured pruning, whose sparsity goes where it costs least, is tuned only from 80%; hidden units always."""
    from onnxcompress.passes.prune import AUTO_TUNE_STEPS, UNSTRUCTURED_TUNE_MIN_SPARSITY

    assert Prune.Config(structure="2:4").chain_steps == AUTO_TUNE_STEPS
    assert Prune.Config().chain_steps == 0 and Prune.Config(structure="neurons").chain_steps == AUTO_TUNE_STEPS
    assert Prune.Config(sparsity=UNSTRUCTURED_TUNE_MIN_SPARSITY).chain_steps == AUTO_TUNE_STEPS
    assert Prune.Config(sparsity=0.9, tune_steps=0).chain_steps == 0
    assert Prune.Config(structure="neurons", sparsity=0.9, tune_steps=0).chain_steps == 0
    assert Prune.Config(structure="2:4", tune_steps=0).chain_steps == 0
    with pytest.raises(ValueError, match="tune_steps must be a number or auto"):
        Prune.Config(tune_steps="long")
    spearman, tuned = spearman_with_and_without_tuning(tmp_path, "dlrm", "prune.structure=2:4")
    assert len(tuned["auto"]) == 2 and tuned["0"] == {}  # the bottom and the top MLP
    assert spearman["auto"] > spearman["0"] + 0.002


def spearman_with_and_without_tuning(
    tmp_path: Path, name: str, *assignments: str
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """The shipped model pruned with tune_steps auto and 0: its test rows' Spearman with the
    original and the tuned chains' stats, by setting."""
    from onnxcompress import compress

    files = model_files(name)
    spearman, tuned = {}, {}
    for steps in ("auto", "0"):
        report = compress(
            files["onnx"],
            tmp_path / f"{steps}.onnx",
            ["prune"],
            assignments=[*assignments, f"prune.tune_steps={steps}"],
            feeds=files["feeds"],
            calib=files["calib"],
            force=True,
        )
        (score,) = report.parity.outputs
        spearman[steps] = score.spearman
        tuned[steps] = report.passes[0].stats.get("tuned_chains", {})
    return spearman, tuned


def test_relu_chains_follow_hidden_links_through_a_lone_relu() -> None:
    model, _ = relu_chain()
    layers = linear_layers(model)
    assert [[layer.weight.name for layer in run.layers] for run in relu_chains(model, layers)] == [["w1", "w2"]]
    assert relu_chains(model, layers[:1]) == []


def dot_of_towers(normalized: bool, extra_reader: bool = False) -> ir.Model:
    """Two ReLU chains (user and item towers) scored by ReduceSum(a * b), of unit rows or not."""
    rng = np.random.default_rng(5)
    shapes = {"u1": (6, 8), "u2": (8, 4), "i1": (5, 8), "i2": (8, 4)}
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    unit_rows = ["n{t} = ReduceL2<keepdims: int = 1>({t}, axes)", "f{t} = Clip(n{t}, eps)", "d{t} = Div({t}, f{t})"]
    body = [
        "axes = Constant<value = int64[1] {-1}>()",
        "eps = Constant<value = float {1e-12}>()",
        "hu = MatMul(x, u1)",
        "ru = Relu(hu)",
        "u = MatMul(ru, u2)",
        "hi = MatMul(z, i1)",
        "ri = Relu(hi)",
        "i = MatMul(ri, i2)",
        *([line.format(t=t) for t in "ui" for line in unit_rows] if normalized else []),
        "p = Mul(du, di)" if normalized else "p = Mul(u, i)",
        "s = ReduceSum<keepdims: int = 0>(p, axes)",
        *(["t = Neg(u)"] if extra_reader else []),
    ]
    outputs = "float[N] s" + (", float[N,4] t" if extra_reader else "")
    text = (
        '<ir_version: 8, opset_import: ["" : 18]>\n'
        f"g (float[N,6] x, float[N,5] z, float[6,8] u1, float[8,4] u2, float[5,8] i1, float[8,4] i2) => ({outputs}) "
        "{\n" + "\n".join(body) + "\n}"
    )
    return text_model(text, weights)


def test_towers_met_in_a_dot_product_are_paired() -> None:
    shipped = ir.load(model_files("two_tower")["onnx"])
    (pair,) = dot_product_pairs(relu_chains(shipped, linear_layers(shipped)))
    assert [layer.weight.name for layer in pair.first.layers] == ["user_mlp.0.weight", "user_mlp.2.weight"]
    assert [layer.weight.name for layer in pair.second.layers] == ["item_mlp.0.weight", "item_mlp.2.weight"]
    assert pair.normalized
    for normalized in (True, False):
        model = dot_of_towers(normalized)
        (pair,) = dot_product_pairs(relu_chains(model, linear_layers(model)))
        assert pair.normalized is normalized
        assert [layer.weight.name for layer in pair.first.layers + pair.second.layers] == ["u1", "u2", "i1", "i2"]
    read_elsewhere = dot_of_towers(True, extra_reader=True)  # the user tower is also read by a Neg
    assert dot_product_pairs(relu_chains(read_elsewhere, linear_layers(read_elsewhere))) == []
    for name in ("deepfm", "dlrm", "sasrec"):
        model = ir.load(model_files(name)["onnx"])
        assert dot_product_pairs(relu_chains(model, linear_layers(model))) == []


@pytest.mark.parametrize(("structure", "least_spearman"), [("2:4", 0.965), ("neurons", 0.945)])
def test_two_towers_are_tuned_together_on_every_pair_of_rows(
    structure: str, least_spearman: float, tmp_path: Path
) -> None:
    """The shipped two-tower's cosine score at 2:4 and with half its hidden units removed: both
    towers tuned on their products, each calibration or mixed row against every other (test rows:
    Spearman 0.952 and 0.925 before, with each tower tuned to its own outputs at 2:4 and untuned
    with units removed; 0.973 and 0.959 now)."""
    from onnxcompress import compress

    files = model_files("two_tower")
    report = compress(
        files["onnx"],
        tmp_path / "out.onnx",
        ["prune"],
        assignments=[f"prune.structure={structure}"],
        feeds=files["feeds"],
        calib=files["calib"],
        force=True,
    )
    ((name, entry),) = report.passes[0].stats["tuned_chains"].items()
    assert name == "user_mlp.0.weight .. user_mlp.2.weight x item_mlp.0.weight .. item_mlp.2.weight"
    assert entry["dot_product"] == "cosine" and entry["layers"] == 4 and entry["rows"] == 512 + 4096
    before, after = entry["held_out_error"]
    assert after < 0.9 * before
    (score,) = report.parity.outputs
    assert score.spearman > least_spearman


def batch_norm_chain(gamma: np.ndarray) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """x -> Gemm -> BatchNormalization -> Relu -> MatMul + Add: DeepFM's MLP link."""
    rng = np.random.default_rng(7)
    weights = {
        "w1": rng.standard_normal((16, 32)).astype(np.float32),
        "b1": rng.standard_normal(32).astype(np.float32),
        "gamma": gamma.astype(np.float32),
        "beta": rng.standard_normal(32).astype(np.float32),
        "mean": rng.standard_normal(32).astype(np.float32),
        "var": rng.uniform(0.5, 4.0, 32).astype(np.float32),
        "w2": rng.standard_normal((32, 4)).astype(np.float32),
        "b2": rng.standard_normal(4).astype(np.float32),
    }
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,16] x, float[16,32] w1, float[32] b1, float[32] gamma, float[32] beta, float[32] mean,
       float[32] var, float[32,4] w2, float[4] b2) => (float[N,4] y) {
      h = Gemm(x, w1, b1)
      n = BatchNormalization<epsilon: float = 0.001>(h, gamma, beta, mean, var)
      r = Relu(n)
      o = MatMul(r, w2)
      y = Add(o, b2)
    }
    """
    return text_model(text, weights), weights


def test_chains_are_tuned_through_a_batch_norm_before_the_relu(tmp_path: Path) -> None:
    """DeepFM's links are Gemm -> BatchNormalization -> Relu: the norm is folded into the layer for
    the steps and taken out when the weights are written, so the graph keeps its norm and zeros."""
    rng = np.random.default_rng(11)
    gamma = rng.uniform(0.5, 2.0, 32)
    model, weights = batch_norm_chain(gamma)
    (chain,) = relu_chains(model, linear_layers(model))
    ((scale, shift),) = chain.norms
    want_scale = gamma.astype(np.float32) / np.sqrt(weights["var"].astype(np.float64) + 1e-3)
    np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
    np.testing.assert_allclose(shift, weights["beta"] - weights["mean"] * want_scale, rtol=1e-5, atol=1e-6)
    dead_unit, _ = batch_norm_chain(np.where(np.arange(32) == 3, 0.0, gamma))
    assert relu_chains(dead_unit, linear_layers(dead_unit)) == []

    x = rng.standard_normal((512, 16)).astype(np.float32)
    test_x = rng.standard_normal((2048, 16)).astype(np.float32)

    def forward(params: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
        h = rows @ params["w1"] + params["b1"]
        h = (h - params["mean"]) / np.sqrt(params["var"] + 1e-3) * params["gamma"] + params["beta"]
        return np.maximum(h, 0) @ params["w2"] + params["b2"]

    errors = {}
    for steps in (0, 3000):
        pruned, _ = batch_norm_chain(gamma)
        result = prune(pruned, calibration_for(x), structure="2:4", tune_steps=steps)(pruned)
        initializers = {name: value.const_value.numpy() for name, value in pruned.graph.initializers.items()}
        for name in ("gamma", "beta", "mean", "var"):
            np.testing.assert_array_equal(initializers[name], weights[name])
        kept = (initializers["w1"] != 0).reshape(4, 4, 32).sum(axis=1)
        assert np.all(kept == 2)  # 2 of every 4 inputs still, after the steps
        tuned = result.stats.get("tuned_chains", {})
        assert [entry["batch_norms_folded"] for entry in tuned.values()] == ([1] if steps else [])
        want = forward(weights, test_x)
        path = save_model(pruned, tmp_path / f"tuned{steps}.onnx")
        (got,) = ReferenceEvaluator(str(path)).run(None, {"x": test_x})
        np.testing.assert_allclose(got, forward(initializers, test_x), rtol=1e-4, atol=1e-4)
        errors[steps] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert errors[3000] < 0.9 * errors[0]


def test_measured_scope_needs_rows_to_hold_out_and_otherwise_prunes_every_layer_alike() -> None:
    few, _ = relu_chain()
    result = prune(few, calibration_for(RNG.standard_normal((16, 8)).astype(np.float32)), sparsity=0.5)(few)
    assert result.stats["scope"] == "layer"
    assert [tensor["sparsity"] for tensor in result.stats["tensors"].values()] == [0.5, 0.5]
    enough, _ = relu_chain()
    result = prune(enough, calibration_for(RNG.standard_normal((256, 8)).astype(np.float32)), sparsity=0.5)(enough)
    assert result.stats["scope"] == "measured"
    assert set(result.stats["tensors"]["w1"]["held_out_score_error"]) == {"0.3", "0.5", "0.65", "0.8", "0.9", "0.95"}


def test_layers_sharing_a_bias_are_priced_and_pruned_without_losing_it(tmp_path: Path) -> None:
    """Two layers read one bias initializer (TorchScript's nn.MultiheadAttention out_proj): the
    first write copies it, and the held-out pricing writes each layer again; that raised "not in list"."""
    rng = np.random.default_rng(3)
    weights = {
        "w1": rng.standard_normal((8, 16)).astype(np.float32),
        "w2": (rng.standard_normal((16, 16)) / 4).astype(np.float32),
        "b": rng.standard_normal(16).astype(np.float32),
        "w3": (rng.standard_normal((16, 1)) / 4).astype(np.float32),
    }
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,8] x, float[8,16] w1, float[16,16] w2, float[16] b, float[16,1] w3) => (float[N,1] y) {
      m1 = MatMul(x, w1)
      h1 = Add(m1, b)
      r1 = Relu(h1)
      m2 = MatMul(r1, w2)
      h2 = Add(m2, b)
      r2 = Relu(h2)
      y = MatMul(r2, w3)
    }
    """
    model = text_model(text, weights)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    result = prune(model, calibration_for(x), sparsity=0.5)(model)
    assert result.stats["scope"] == "measured"
    adds = [node for node in model.graph if node.op_type == "Add"]
    assert all(node.inputs[1] is not None and node.inputs[1].const_value is not None for node in adds)
    (got,) = ReferenceEvaluator(str(save_model(model, tmp_path / "shared.onnx"))).run(None, {"x": x})
    assert np.isfinite(got).all()


def test_measured_scope_without_a_float_score_prunes_every_layer_alike() -> None:
    """A model that outputs only a class index has no score whose change could price a layer."""
    weights = {
        "w1": RNG.standard_normal((8, 16)).astype(np.float32),
        "w2": RNG.standard_normal((16, 4)).astype(np.float32),
    }
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,8] x, float[8,16] w1, float[16,4] w2) => (int64[N] label) {
      h = MatMul(x, w1)
      r = Relu(h)
      y = MatMul(r, w2)
      label = ArgMax <axis = 1, keepdims = 0> (y)
    }
    """
    model = text_model(text, weights)
    calibration = calibration_for(RNG.standard_normal((256, 8)).astype(np.float32))
    for structure in ("unstructured", "neurons"):
        result = prune(model, calibration, sparsity=0.5, structure=structure)(model)
        assert result.stats["scope"] == "layer"


def test_neurons_shrink_producer_bias_and_consumer_and_keep_the_wiring(tmp_path: Path) -> None:
    model, weights = relu_chain()
    consumer = [node for node in model.graph if node.op_type == "MatMul"][1]
    relu_out = next(node for node in model.graph if node.op_type == "Relu").outputs[0]
    result = prune(model, structure="neurons", sparsity=0.25)(model)
    assert result.modified is True
    assert model.graph.initializers["w1"].const_value.shape == (8, 12)
    assert model.graph.initializers["b1"].const_value.shape == (12,)
    assert model.graph.initializers["w2"].const_value.shape == (12, 4)
    assert consumer.inputs[0] is relu_out
    (layer,) = result.stats["layers"].values()
    assert layer["units_after"] == 12 and "next_layer_refit_error" not in layer
    assert result.stats["units_removed"] == 4
    # Without data the units kept are those with the largest |w1 column| * |w2 row|; the network
    # is exactly the original restricted to them.
    importance = np.linalg.norm(weights["w1"], axis=0) * np.linalg.norm(weights["w2"], axis=1)
    keep = np.sort(np.argsort(-importance, kind="stable")[:12])
    np.testing.assert_array_equal(model.graph.initializers["w1"].const_value.numpy(), weights["w1"][:, keep])
    x = RNG.standard_normal((5, 8)).astype(np.float32)
    reduced = {**weights, "w1": weights["w1"][:, keep], "b1": weights["b1"][keep], "w2": weights["w2"][keep]}
    assert output_error(model, reduced, x, tmp_path) < 1e-6


BN_CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,8] x) => (float[N,2] y) {
  h = Gemm <transB = 1> (x, w1, b1)
  n = BatchNormalization(h, scale, bias, mean, var)
  s = Mul(n, gain)
  r = Relu(s)
  d = Dropout(r)
  y = Gemm <transB = 1> (d, w2, b2)
}
"""


def bn_chain() -> ir.Model:
    rng = np.random.default_rng(2)
    names = "x, float[6,8] w1, float[6] b1, float[6] scale, float[6] bias, float[6] mean, float[6] var, "
    names += "float[1,6] gain, float[2,6] w2, float[2] b2"
    text = BN_CHAIN.replace("(float[N,8] x)", f"(float[N,8] {names})")
    arrays = {
        "w1": rng.standard_normal((6, 8)),
        "b1": rng.standard_normal(6),
        "scale": rng.random(6) + 0.5,
        "bias": rng.standard_normal(6),
        "mean": rng.standard_normal(6),
        "var": rng.random(6) + 0.5,
        "gain": rng.random((1, 6)) + 0.5,
        "w2": rng.standard_normal((2, 6)),
        "b2": rng.standard_normal(2),
    }
    return text_model(text, {name: array.astype(np.float32) for name, array in arrays.items()})


def test_neurons_through_batchnorm_and_per_unit_constants_with_refit(tmp_path: Path) -> None:
    model = bn_chain()
    x = RNG.standard_normal((128, 8)).astype(np.float32)
    path = save_model(model, tmp_path / "before.onnx")
    (before,) = ReferenceEvaluator(str(path)).run(None, {"x": x})
    result = prune(model, calibration_for(x), structure="neurons", sparsity=0.5)(model)
    for name in ("b1", "scale", "bias", "mean", "var"):
        assert model.graph.initializers[name].const_value.shape == (3,)
    assert model.graph.initializers["gain"].const_value.shape == (1, 3)
    assert model.graph.initializers["w1"].const_value.shape == (3, 8)
    assert model.graph.initializers["w2"].const_value.shape == (2, 3)
    (layer,) = result.stats["layers"].values()
    assert layer["units_before"] == 6 and layer["units_after"] == 3 and "next_layer_refit_error" in layer
    (after,) = ReferenceEvaluator(str(save_model(model, tmp_path / "after.onnx"))).run(None, {"x": x})
    assert after.shape == before.shape
    onnx.checker.check_model(str(tmp_path / "after.onnx"), full_check=True)


@pytest.mark.parametrize(
    "activation",
    [
        # GELU as TorchScript, dynamo before opset 20 and tf2onnx export it: x * 0.5 * (1 + erf(x / sqrt 2)),
        # its constants in Constant nodes
        """c = Constant <value = float {1.4142135}> ()
          d = Div(h, c)
          e = Erf(d)
          one = Constant <value = float {1.0}> ()
          a = Add(e, one)
          m = Mul(h, a)
          half = Constant <value = float {0.5}> ()
          k = Mul(m, half)""",
        "s = Sigmoid(h)\n  k = Mul(h, s)",  # SiLU / Swish
    ],
)
def test_neurons_pass_through_an_activation_computed_along_several_paths(activation: str, tmp_path: Path) -> None:
    """The units feed two nodes that join again into one elementwise function of them: the region
    counts as one activation, and half the units go with the refit following them."""
    rng = np.random.default_rng(4)
    model = text_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,8] x, float[8,16] w1, float[16] b1, float[16,2] w2) => (float[N,2] y) {{
          p = MatMul(x, w1)
          h = Add(p, b1)
          {activation}
          y = MatMul(k, w2)
        }}
        """,
        {
            name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in (("w1", (8, 16)), ("b1", 16), ("w2", (16, 2)))
        },
    )
    x = rng.standard_normal((256, 8)).astype(np.float32)
    (link,) = mlp_links(model)[0]
    assert len(link.fused) >= 2 and link.consumer.weight.name == "w2"
    result = prune(model, calibration_for(x), structure="neurons", sparsity=0.5)(model)
    assert result.modified
    assert model.graph.initializers["w1"].const_value.shape == (8, 8)
    assert model.graph.initializers["b1"].const_value.shape == (8,)
    assert model.graph.initializers["w2"].const_value.shape == (8, 2)
    (after,) = ReferenceEvaluator(str(save_model(model, tmp_path / "after.onnx"))).run(None, {"x": x})
    assert after.shape == (256, 2) and np.isfinite(after).all()


@pytest.mark.parametrize(
    ("between", "reason"),
    [
        (
            "r = Relu(h)\n  k = Add(r, x16)",
            "hidden units reach Add with a non-constant other input (a residual or gate)",
        ),
        (
            "r = Relu(h)\n  k = Reshape(r, shape)",
            "hidden units reach Reshape (for example a split into attention heads)",
        ),
        ("r = Relu(h)\n  k = Concat <axis = 1> (r, x16)", "hidden units reach Concat"),
    ],
)
def test_neurons_are_not_removed_where_the_unit_axis_cannot_shrink(between: str, reason: str) -> None:
    model = text_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,8] x, float[N,16] x16, float[8,16] w1, float[16,4] w2, int64[2] shape) => (float[N,4] y) {{
          h = MatMul(x, w1)
          {between}
          y = MatMul(k, w2)
        }}
        """,
        {
            "w1": np.ones((8, 16), np.float32),
            "w2": np.ones((16, 4), np.float32),
            "shape": np.array([-1, 16], np.int64),
        },
    )
    result = prune(model, structure="neurons")(model)
    assert result.modified is False
    assert result.stats["skipped"][model.graph[0].name or "w1"] == reason
    assert model.graph.initializers["w1"].const_value.shape == (8, 16)


# --- real models through the CLI ------------------------------------------------------------------


def run_prune(cli, tmp_path: Path, name: str, *sets: str, passes: str = "prune"):
    files = model_files(name)
    out = tmp_path / f"{name}.onnx"
    args = [files["onnx"], out, "--passes", passes, "--feeds", files["feeds"], "--labels", files["labels"]]
    args += ["--calib", files["calib"], "--force"]
    for assignment in sets:
        args += ["--set", assignment]
    result = cli(*args)
    assert result.code == 0, result.err
    return result, out


def score(report: dict) -> dict:
    return next(output for output in report["parity"]["outputs"] if output.get("auc_reference") is not None)


def test_half_sparsity_on_the_dlrm_passes_parity(cli, tmp_path: Path) -> None:
    result, _ = run_prune(cli, tmp_path, "dlrm")
    report = result.report
    assert report["verdict"] == "passed"
    stats = report["passes"][0]["stats"]
    assert 0.49 <= stats["sparsity"] <= 0.51
    assert all(tensor["reconstructed"] for tensor in stats["tensors"].values())
    output = score(report)
    assert abs(output["auc_candidate"] - output["auc_reference"]) <= 0.003


def test_reconstruction_beats_plain_magnitude_at_80_percent_on_the_dlrm(cli, tmp_path: Path) -> None:
    refit, _ = run_prune(cli, tmp_path, "dlrm", "prune.sparsity=0.8")
    plain, _ = run_prune(cli, tmp_path, "dlrm", "prune.sparsity=0.8", "prune.reconstruct=false")
    assert score(refit.report)["spearman"] > score(plain.report)["spearman"] + 0.01
    refit_drop = score(refit.report)["auc_reference"] - score(refit.report)["auc_candidate"]
    plain_drop = score(plain.report)["auc_reference"] - score(plain.report)["auc_candidate"]
    assert refit_drop < plain_drop


def test_measured_scope_spends_the_sparsity_where_the_score_moves_least_on_the_dlrm(cli, tmp_path: Path) -> None:
    measured, _ = run_prune(cli, tmp_path, "dlrm", "prune.sparsity=0.8")
    uniform, _ = run_prune(cli, tmp_path, "dlrm", "prune.sparsity=0.8", "prune.scope=layer")
    stats = measured.report["passes"][0]["stats"]
    assert stats["scope"] == "measured" and uniform.report["passes"][0]["stats"]["scope"] == "layer"
    assert stats["sparsity"] == pytest.approx(0.8, abs=0.01)
    sparsities = [tensor["sparsity"] for tensor in stats["tensors"].values()]
    assert max(sparsities) - min(sparsities) > 0.2
    for tensor in stats["tensors"].values():  # every layer priced alone at every level, dearer with sparsity
        prices = list(tensor["held_out_score_error"].values())
        assert len(prices) == 6 and prices[-1] > prices[0]
    # On the test rows the score keeps its ranking better than with every layer at 80%
    # (Spearman 0.995 against 0.986 when this was written).
    assert score(measured.report)["spearman"] > score(uniform.report)["spearman"] + 0.004


def test_measured_scope_removes_half_the_units_where_the_score_moves_least_on_the_dlrm(cli, tmp_path: Path) -> None:
    # Without the chain tuning after the units go, which makes up for most of the difference.
    measured, _ = run_prune(cli, tmp_path, "dlrm", "prune.structure=neurons", "prune.tune_steps=0")
    uniform, _ = run_prune(cli, tmp_path, "dlrm", "prune.structure=neurons", "prune.scope=layer", "prune.tune_steps=0")
    stats = measured.report["passes"][0]["stats"]
    assert stats["scope"] == "measured"
    layers = stats["layers"].values()
    assert stats["units_removed"] == 144  # half of the 64 + 32 + 128 + 64 units of its four links
    assert len({layer["units_after"] / layer["units_before"] for layer in layers}) > 1
    assert all(len(layer["held_out_score_error"]) == 6 for layer in layers)
    # A link the allocation leaves whole says so, with its prices.
    assert "removes none of its 32 units (held-out score error" in stats["skipped"]["/bottom/bottom.2/Gemm"]
    # Test-row Spearman 0.9987 against 0.9964 with half of every layer's units, when this was written.
    assert score(measured.report)["spearman"] > score(uniform.report)["spearman"] + 0.001


def test_hidden_units_of_layers_the_cleanup_fused_are_pruned_piece_by_piece(cli, tmp_path: Path) -> None:
    """The cleanup fuses MMoE's three experts and two gates (one input) into one 137x198 product
    read through a Split; pruning splits it, removes half of the experts' units (the gates' feed a
    Softmax and stay) and fuses it again: 112 units against 16, 1.62x batch-512 throughput against
    1.15x when this was written."""
    result, out = run_prune(cli, tmp_path, "mmoe", "prune.structure=neurons", passes="cleanup,prune")
    report = result.report
    assert report["verdict"] == "passed"
    stats = report["passes"][1]["stats"]
    assert stats["fused_layers_split"] == 1
    assert stats["units_removed"] >= 96
    assert all(
        abs(output["auc_candidate"] - output["auc_reference"]) <= 0.001
        for output in report["parity"]["outputs"]
        if output.get("auc_reference") is not None
    )
    pruned = ir.load(out)
    (fused,) = [
        node
        for node in pruned.graph
        if node.op_type == "Gemm"
        and node.outputs[0].uses()
        and next(iter(node.outputs[0].uses()))[0].op_type == "Split"
    ]
    (split,) = [node for node, _ in fused.outputs[0].uses()]
    sizes = split.inputs[1].const_value.numpy().tolist()
    assert len(sizes) == 5 and sum(sizes) <= 198 - 96  # the experts' 3 x 64 units at most halved
    assert sorted(sizes)[:2] == [3, 3]  # the gates' units feed a Softmax and stay
    assert out.stat().st_size < 0.85 * model_files("mmoe")["onnx"].stat().st_size


def test_held_out_prices_let_the_next_layer_absorb_what_it_can() -> None:
    """DLRM's top MLP: a layer with a next layer to refit costs the score less at 80% than priced
    with that next layer frozen; the last layer has none and is priced alike either way."""
    from onnxcompress.graph import weights_by_value
    from onnxcompress.passes.prune import _HeldOutPrices, _Weight

    model, calibration = shipped_model_with_calibration("dlrm")
    pruner = prune(model, calibration, sparsity=0.8)
    weights = [_Weight(value, uses) for value, uses in weights_by_value(model).items() if value.name.startswith("top.")]
    prices = _HeldOutPrices(pruner, model, weights, calibration)
    assert {"top.0.weight", "top.2.weight"} <= set(prices.next_layers) and "top.4.weight" not in prices.next_layers
    absorbed = prices.costs(0, [0.8])[:, 0]
    prices.next_layers = {}
    frozen = prices.costs(0, [0.8])[:, 0]
    names = [weight.name for weight in weights]
    first, last = names.index("top.0.weight"), names.index("top.4.weight")
    assert absorbed[first] < 0.8 * frozen[first]
    assert absorbed[last] == pytest.approx(frozen[last])


@pytest.mark.parametrize(("name", "mixed"), [("sklearn_mlp", False), ("keras_wide_deep", True)])
def test_measured_scope_refits_on_mixed_column_rows_only_where_held_out_rows_favour_them(
    cli, tmp_path: Path, name: str, mixed: bool
) -> None:
    """Mixed rows break the one-hot groups of the scikit-learn MLP's single input (held-out score error
    0.0013 without, 0.0027 with) and help the Wide&Deep refits (0.0031 without, 0.0024 with)."""
    result, _ = run_prune(cli, tmp_path, name)
    stats = result.report["passes"][0]["stats"]
    errors = stats["held_out_score_error_by_mixed_rows"]
    assert (errors["4096"] < errors["0"]) is mixed
    assert ("refit_rows" in stats) is mixed
    assert abs(score(result.report)["auc_candidate"] - score(result.report)["auc_reference"]) <= 0.0005


@pytest.mark.parametrize(
    ("name", "shapes"),
    [
        ("dlrm_dynamo", {"top.0.weight": (64, 44), "top.2.weight": (32, 64), "top.4.weight": (1, 32)}),
        ("deepfm", {"mlp.0.weight": (192, 137), "mlp.1.running_var": (192,), "mlp.12.weight": (1, 192)}),
    ],
)
def test_neurons_shrink_the_file_and_the_matrices(cli, tmp_path: Path, name: str, shapes: dict) -> None:
    sparsity = "0.5" if name == "dlrm_dynamo" else "0.25"
    sets = ["prune.structure=neurons", f"prune.sparsity={sparsity}", "prune.scope=layer"]
    result, out = run_prune(cli, tmp_path, name, *sets)
    report = result.report
    assert report["verdict"] == "passed", report["parity"]
    assert out.stat().st_size < 0.9 * model_files(name)["onnx"].stat().st_size
    output = score(report)
    assert output["auc_reference"] - output["auc_candidate"] <= 0.003
    initializers = {tensor.name: tuple(tensor.dims) for tensor in onnx.load(str(out)).graph.initializer}
    for tensor, shape in shapes.items():
        assert initializers[tensor] == shape
    onnx.checker.check_model(str(out), full_check=True)


def test_prune_then_sparse_storage_shrinks_the_file_at_80_percent(cli, tmp_path: Path) -> None:
    dense, dense_out = run_prune(cli, tmp_path, "sklearn_mlp", "prune.sparsity=0.8")
    (tmp_path / "s").mkdir()
    stored, stored_out = run_prune(cli, tmp_path / "s", "sklearn_mlp", "prune.sparsity=0.8", passes="prune,sparse")
    assert dense_out.stat().st_size > 0.95 * model_files("sklearn_mlp")["onnx"].stat().st_size
    assert stored_out.stat().st_size < 0.4 * dense_out.stat().st_size
    assert score(stored.report)["auc_candidate"] == score(dense.report)["auc_candidate"]


def test_big_tables_are_pruned_after_the_refits(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxcompress.passes import prune as prune_module

    monkeypatch.setattr(prune_module, "CAPTURE_LAZY_MAX_BYTES", 100)  # the 32 x 8 table counts as big
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N] i, float[32,8] table, float[8,4] w) => (float[N,4] y) {
          e = Gather(table, i)
          y = MatMul(e, w)
        }
        """,
        {"table": RNG.standard_normal((32, 8)).astype(np.float32), "w": RNG.standard_normal((8, 4)).astype(np.float32)},
    )
    calibration = Calibration(Feeds({"i": np.arange(32, dtype=np.int64)}, "test"))
    result = prune(model, calibration, op_types=("Gather", "MatMul"))(model)
    table = result.stats["tensors"]["table"]
    assert table["pruned_after_refits"] is True and table["sparsity"] == 0.5
    assert result.stats["tensors"]["w"]["reconstructed"] is True
    pruned = model.graph.initializers["table"].const_value
    assert isinstance(pruned, ir.LazyTensor)
    assert (np.count_nonzero(pruned.numpy(), axis=1) == 4).all()  # every row keeps its 4 largest


def test_a_fidelity_budget_halves_the_sparsity_until_held_out_rows_rank_alike() -> None:
    """two_tower's towers are fragile: at 50% and 25% of hidden units the held-out Spearman drops
    below 0.99; a budget of 0.99 backs off to 12.5%, and 0.999 leaves the model untouched. A budget
    of 0.98 is met at 25% with the towers tuned on their products, at 12.5% without."""
    model, calibration = shipped_model_with_calibration("two_tower")
    config = {"structure": "neurons", "sparsity": 0.5, "scope": "layer"}
    stats = prune(model, calibration, **config, min_rank_corr=0.99)(model).stats
    tried = stats["held_out_spearman"]
    assert list(tried) == ["0.5", "0.25", "0.125"] and tried["0.5"] < tried["0.25"] < 0.99 <= tried["0.125"]
    assert stats["sparsity_chosen"] == 0.125 and stats["units_removed"] > 0
    for steps, chosen in (("auto", 0.25), (0, 0.125)):
        model, calibration = shipped_model_with_calibration("two_tower")
        stats = prune(model, calibration, **config, min_rank_corr=0.98, tune_steps=steps)(model).stats
        assert stats["sparsity_chosen"] == chosen
    model, calibration = shipped_model_with_calibration("two_tower")
    before = [tuple(value.const_value.shape) for value in model.graph.initializers.values()]
    result = prune(model, calibration, **config, min_rank_corr=0.999)(model)
    assert not result.modified and "prune.min_rank_corr=0.999" in result.stats["skipped"]
    assert [tuple(value.const_value.shape) for value in model.graph.initializers.values()] == before


def test_mixed_column_rows_keep_the_refit_from_overfitting_512_calibration_rows(tmp_path: Path) -> None:
    """deepfm, half of its hidden units removed: refit on 512 rows alone, the pruned score ranks the
    test rows with Spearman 0.973 against the original's; with 4096 more rows mixing calibration
    columns, 0.989 (the same mixing distill uses)."""
    from onnxcompress import compress

    files = model_files("deepfm")
    spearman = {}
    for augment in (0, 4096):
        report = compress(
            files["onnx"],
            tmp_path / f"augment{augment}.onnx",
            ["prune"],
            assignments=[
                "prune.structure=neurons",
                "prune.sparsity=0.5",
                f"prune.augment={augment}",
                "prune.damping=0.01",
                "prune.scope=layer",
                "prune.tune_steps=0",
            ],
            feeds=files["feeds"],
            calib=files["calib"],
            parity=True,
            force=True,
        )
        (score,) = report.parity.outputs
        spearman[augment] = score.spearman
        if augment:
            assert "4096 rows mixing their columns" in report.passes[0].stats["refit_rows"]
    assert spearman[0] < 0.98 < 0.985 < spearman[4096]


def test_hidden_units_are_refit_with_mixed_rows_and_a_stronger_prior_by_default(tmp_path: Path) -> None:
    """augment=auto and damping=auto: 4096 mixed-column rows and a ridge of 0.1 when hidden units are
    removed (DeepFM at 50%: test-row Spearman 0.989 against 0.973 with neither); 0.01 for weights,
    whose refit keeps every input, and mixed rows only where held-out rows favour them (tested above)."""
    from onnxcompress import compress
    from onnxcompress.passes.prune import NEURON_AUGMENT_ROWS, NEURON_DAMPING, WEIGHT_DAMPING

    neurons, weights = Prune.Config(structure="neurons"), Prune.Config()
    assert (neurons.refit_augment, neurons.refit_damping) == (NEURON_AUGMENT_ROWS, NEURON_DAMPING)
    assert (weights.refit_augment, weights.refit_damping) == (0, WEIGHT_DAMPING)
    assert Prune.Config(structure="neurons", augment=0, damping=0.5).refit_damping == 0.5
    with pytest.raises(ValueError, match="number or auto"):
        Prune.Config(damping="strong")
    files = model_files("deepfm")
    report = compress(
        files["onnx"],
        tmp_path / "units.onnx",
        ["prune"],
        assignments=["prune.structure=neurons", "prune.sparsity=0.5"],
        feeds=files["feeds"],
        calib=files["calib"],
        force=True,
    )
    (score,) = report.parity.outputs
    assert "4096 rows mixing their columns" in report.passes[0].stats["refit_rows"]
    assert score.spearman > 0.985


CONV = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,8,12] x, float[16,8,3] w1, float[16] b1, float[16,16,3] w2, float[192,1] w3) => (float[N,1] score) {
  c1 = Conv <kernel_shape = [3], pads = [1, 1]> (x, w1, b1)
  r1 = Relu(c1)
  c2 = Conv <kernel_shape = [3], pads = [1, 1], group = GROUP> (r1, w2)
  r2 = Relu(c2)
  f = Flatten(r2)
  score = MatMul(f, w3)
}
"""


def conv_model(group: int = 1) -> ir.Model:
    rng = np.random.default_rng(3)
    return text_model(
        CONV.replace("GROUP", str(group)).replace("float[16,16,3] w2", f"float[16,{16 // group},3] w2"),
        {
            "w1": rng.standard_normal((16, 8, 3)).astype(np.float32),
            "b1": rng.standard_normal(16).astype(np.float32),
            "w2": rng.standard_normal((16, 16 // group, 3)).astype(np.float32),
            "w3": rng.standard_normal((192, 1)).astype(np.float32),
        },
    )


def conv_score(model: ir.Model, x: np.ndarray) -> np.ndarray:
    from onnxcompress import runtime

    return runtime.make_session(model, "disable").run(None, {"x": x})[0]


def test_convolutions_are_refit_on_their_calibration_patches() -> None:
    # Correlated channels: what a refit can recover from the kept weights.
    x = (RNG.standard_normal((256, 1, 12)) + 0.5 * RNG.standard_normal((256, 8, 12))).astype(np.float32)
    expected = conv_score(conv_model(), x)
    errors = {}
    for reconstruct in (True, False):
        model = conv_model()
        result = prune(model, calibration_for(x), sparsity=0.5, scope="layer", reconstruct=reconstruct)(model)
        tensors = result.stats["tensors"]
        assert tensors["w1"]["reconstructed"] is reconstruct and tensors["w2"]["reconstructed"] is reconstruct
        assert tensors["w1"]["sparsity"] == 0.5 and tensors["w2"]["sparsity"] == 0.5
        errors[reconstruct] = float(np.linalg.norm(conv_score(model, x) - expected) / np.linalg.norm(expected))
    assert errors[True] < 0.6 * errors[False]


def test_n_m_convolutions_keep_n_of_every_m_input_channels_at_each_kernel_offset() -> None:
    x = RNG.standard_normal((128, 8, 12)).astype(np.float32)
    model = conv_model()
    result = prune(model, calibration_for(x), structure="2:4")(model)
    assert result.stats["tensors"]["w2"]["reconstructed"] is True
    weight = model.graph.initializers["w2"].const_value.numpy()  # [out, in, kernel]
    kept = (weight != 0).reshape(16, 4, 4, 3).sum(axis=2)  # channel groups of 4 per output and offset
    assert (kept == 2).all()


def test_a_grouped_convolution_is_pruned_by_magnitude_with_the_reason() -> None:
    x = RNG.standard_normal((64, 8, 12)).astype(np.float32)
    model = conv_model(group=2)
    result = prune(model, calibration_for(x), sparsity=0.5, scope="layer")(model)
    assert (
        result.stats["tensors"]["w2"]["why_not_reconstructed"] == "refit handles Conv with one group and explicit pads"
    )
    assert result.stats["tensors"]["w1"]["reconstructed"] is True


def test_measured_scope_prices_convolutions_like_linear_layers() -> None:
    x = (RNG.standard_normal((256, 1, 12)) + 0.5 * RNG.standard_normal((256, 8, 12))).astype(np.float32)
    model = conv_model()
    result = prune(model, calibration_for(x), sparsity=0.5, augment=0)(model)
    tensors = result.stats["tensors"]
    assert result.stats["scope"] == "measured"
    for name in ("w1", "w2", "w3"):
        prices = tensors[name]["held_out_score_error"]
        assert prices["0.3"] <= prices["0.95"], name
    sizes = {"w1": 384, "w2": 768, "w3": 192}
    pruned = sum(tensors[name]["sparsity"] * size for name, size in sizes.items())
    assert pruned == pytest.approx(0.5 * sum(sizes.values()), abs=8)
    assert len({tensors[name]["sparsity"] for name in sizes}) > 1  # spread by price, not alike


@pytest.mark.parametrize(("setting", "auc_limit"), [("prune.sparsity=0.8", 0.002), ("prune.structure=2:4", 0.001)])
def test_gru4recs_recurrent_weights_are_pruned_by_magnitude(
    cli, tmp_path: Path, setting: str, auc_limit: float
) -> None:
    result, _ = run_prune(cli, tmp_path, "gru4rec", setting)
    report = result.report
    stats = report["passes"][0]["stats"]
    recurrent = {name: tensor for name, tensor in stats["tensors"].items() if name.startswith("onnx::GRU")}
    assert len(recurrent) == 2 and not any(tensor["reconstructed"] for tensor in recurrent.values())
    expected = 0.8 if "0.8" in setting else 0.5
    assert all(abs(tensor["sparsity"] - expected) < 0.01 for tensor in recurrent.values())
    assert report["verdict"] == "passed"
    output = score(report)
    assert abs(output["auc_candidate"] - output["auc_reference"]) <= auc_limit


def test_stats_count_the_weights_zeroed_not_the_weights_looked_at() -> None:
    """``elements_zeroed`` is what pruning removed (counted in the graph), ``elements`` the size of
    the tensors pruned: DLRM at 80% said ``elements_pruned=18048``, all six layers' weights, where
    14,474 were zero."""
    model, calibration = shipped_model_with_calibration("dlrm")
    linear = {value.name for value in model.graph.initializers.values() if value.name.endswith("weight")}
    result = Prune(Prune.Config(sparsity=0.8), PassContext(calibration=calibration))(model)
    pruned = [model.graph.initializers[name].const_value.numpy() for name in result.stats["tensors"]]
    assert set(result.stats["tensors"]) <= linear
    assert result.stats["elements"] == sum(weight.size for weight in pruned)
    assert result.stats["elements_zeroed"] == sum(int((weight == 0).sum()) for weight in pruned)
    assert 0.79 < result.stats["elements_zeroed"] / result.stats["elements"] < 0.81
    assert "elements_pruned" not in result.stats


def test_hidden_units_on_a_model_without_a_hidden_layer_say_why_nothing_changed() -> None:
    """GRU4Rec has a recurrent cell and one output layer: nothing to remove units from. The stats
    said layers_pruned=0 with an empty skipped list and claimed refit rows for a refit that never ran."""
    model, calibration = shipped_model_with_calibration("gru4rec")
    result = Prune(Prune.Config(structure="neurons"), PassContext(calibration=calibration))(model)
    assert not result.modified and result.stats["layers_pruned"] == 0
    assert result.stats["nothing_pruned"].startswith("no hidden layer")
    assert "refit_rows" not in result.stats


def test_a_tower_left_out_by_exclude_is_not_tuned() -> None:
    """Half of the user tower's units go; the item tower is excluded, so the pair is not tuned
    together (the user tower alone is, on its own outputs) and the item tower's weights stay as they were."""
    model, calibration = shipped_model_with_calibration("two_tower")
    item = {
        name: value.const_value.numpy().copy() for name, value in model.graph.initializers.items() if "item_mlp" in name
    }
    stats = prune(model, calibration, structure="neurons", sparsity=0.5, scope="layer", exclude="item_mlp")(model).stats
    assert len(stats["layers"]) == 1 and model.graph.initializers["user_mlp.0.weight"].const_value.shape[0] == 32
    assert list(stats["tuned_chains"]) == ["user_mlp.0.weight .. user_mlp.2.weight"]
    for name, array in item.items():
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), array)


def test_chains_are_tuned_after_hidden_units_go(tmp_path: Path) -> None:
    """DeepFM, half of its hidden units removed: its MLP (BatchNormalization before each ReLU, now
    at half the width) is tuned towards what it gave before (test rows: Spearman 0.989 without,
    0.995 with)."""
    spearman, tuned = spearman_with_and_without_tuning(tmp_path, "deepfm", "prune.structure=neurons")
    assert [entry["batch_norms_folded"] for entry in tuned["auto"].values()] == [3] and tuned["0"] == {}
    assert spearman["auto"] > spearman["0"] + 0.003
