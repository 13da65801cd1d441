from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import compress_with_preset, mlp_model, model_files, save_model, text_model
from onnx.reference import ReferenceEvaluator

from onnxcompress import compress, runtime
from onnxcompress.graph import concrete_shapes, constant_array
from onnxcompress.passes.cleanup import (
    PACK_MIN_VECTORS,
    Cleanup,
    drop_default_attributes,
    identifier_names,
    linear_rows_as_gemm,
    merge_identical_initializers,
    remove_inference_dropout,
    shorten_names,
    triangle_of,
)


def op_types(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def run_reference(model: ir.Model, tmp_path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    path = save_model(model, tmp_path / f"m{len(list(tmp_path.iterdir()))}.onnx")
    return ReferenceEvaluator(str(path)).run(None, feeds)


def test_cleanup_removes_identity_dropout_and_keeps_outputs_exact(tmp_path: Path) -> None:
    feeds = {"x": np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)}
    before = run_reference(mlp_model(), tmp_path, feeds)
    model = mlp_model()
    result = Cleanup()(model)
    assert result.modified
    assert "Dropout" not in op_types(model) and "Identity" not in op_types(model)
    assert result.stats["dropout_removed"] == 1
    assert result.stats["removed_by_op"] == {"Dropout": 1, "Identity": 1}
    after = run_reference(model, tmp_path, feeds)
    np.testing.assert_array_equal(before[0], after[0])
    # The second Gemm now reads the Relu's output directly (object identity, not a copy).
    relu = next(node for node in model.graph if node.op_type == "Relu")
    second_gemm = [node for node in model.graph if node.op_type == "Gemm"][1]
    assert second_gemm.inputs[0] is relu.outputs[0]


def test_cleanup_is_a_no_op_on_a_clean_graph() -> None:
    model = mlp_model()
    Cleanup()(model)
    again = Cleanup()(model)
    assert not again.modified
    assert again.stats["nodes_removed"] == 0


def test_dropout_in_training_mode_or_with_used_mask_is_kept() -> None:
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x) => (float[N,4] y, bool[N,4] mask) {
          ratio = Constant <value = float {0.5}> ()
          training = Constant <value = bool {1}> ()
          a = Dropout(x, ratio, training)
          y, mask = Dropout(a)
        }
        """
    )
    assert remove_inference_dropout(model) == 0
    assert op_types(model).count("Dropout") == 2


def dead_node_model() -> ir.Model:
    """A dead Mul reading the one initializer nothing else reads; ``bias`` stays."""
    return text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x, float[4] unused, float[4] bias) => (float[N,4] y) {
          dead = Mul(x, unused)
          y = Add(x, bias)
        }
        """,
        {"unused": np.ones(4, np.float32), "bias": np.ones(4, np.float32)},
    )


def test_dead_nodes_and_unused_initializers_are_removed() -> None:
    model = dead_node_model()
    result = Cleanup()(model)
    assert result.stats["removed_by_op"] == {"Mul": 1}
    assert result.stats["initializers_removed"] == 1
    assert result.stats["initializers_added"] == 0
    assert list(model.graph.initializers) == ["bias"]


def test_renamed_initializers_are_neither_removed_nor_added() -> None:
    """short_names renames every initializer: the counts follow the values, not their names."""
    model = dead_node_model()
    result = Cleanup(Cleanup.Config(short_names=True))(model)
    assert list(model.graph.initializers) != ["bias"] and len(model.graph.initializers) == 1
    assert result.stats["initializers_removed"] == 1
    assert result.stats["initializers_added"] == 0


def test_identical_initializers_are_merged_to_one_value() -> None:
    table = np.arange(12, dtype=np.float32).reshape(3, 4)
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N] i, float[3,4] t1, float[3,4] t2, float[3,4] t3) => (float[N,4] a, float[N,4] b, float[N,4] c) {
          a = Gather(t1, i)
          b = Gather(t2, i)
          c = Gather(t3, i)
        }
        """,
        {"t1": table, "t2": table.copy(), "t3": table + 1},
    )
    merged, saved = merge_identical_initializers(model)
    assert (merged, saved) == (1, table.nbytes)
    gathers = list(model.graph)
    assert gathers[0].inputs[0] is gathers[1].inputs[0]
    assert gathers[2].inputs[0] is not gathers[0].inputs[0]


def test_merging_reads_external_tensors_by_file_and_leaves_them_external(tmp_path: Path) -> None:
    base = np.random.default_rng(0).standard_normal((300, 64)).astype(np.float32)
    tail_differs = base.copy()
    tail_differs[150] += 1.0  # same first and last bytes: only a full read tells them apart
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N] i, float[300,64] t1, float[300,64] t2, float[300,64] t3) => (float[N,64] a, float[N,64] b, float[N,64] c) {
          a = Gather(t1, i)
          b = Gather(t2, i)
          c = Gather(t3, i)
        }
        """,
        {"t1": base, "t2": base.copy(), "t3": tail_differs},
    )
    path = save_model(model, tmp_path / "ext.onnx", external=True)
    loaded = ir.load(path)
    assert merge_identical_initializers(loaded) == (1, base.nbytes)
    assert sorted(loaded.graph.initializers) == ["t1", "t3"]
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in loaded.graph.initializers.values())


def test_weights_listed_as_graph_inputs_become_constants_the_passes_can_compress() -> None:
    """torch.onnx.export(..., keep_initializers_as_inputs=True), the default of old exporters, lists
    every weight as an input a caller could override: every preset left such a DLRM at 1.00x. A
    model that lists only some initializers means them as defaults to override, and keeps them."""
    from onnxcompress.passes.quantize import Quantize

    def listing(names: list[str], ir_version: int = 8) -> ir.Model:
        model = mlp_model()
        model.ir_version = ir_version
        model.graph.inputs.extend(model.graph.initializers[name] for name in names)
        return model

    every = ["w1", "b1", "w2", "b2"]
    skipped = Quantize()(listing(every)).stats["skipped"]
    assert set(skipped) == {"w1", "w2"} and "cleanup.initializer_inputs" in skipped["w1"]
    model = listing(every)
    assert Cleanup()(model).stats["initializer_inputs_made_constant"] == 4
    assert [value.name for value in model.graph.inputs] == ["x"]
    assert sorted(Quantize()(model).stats["tensors"]) == ["w1", "w2"]
    some = listing(["w1"])  # an overridable default
    assert Cleanup()(some).stats["initializer_inputs_made_constant"] == 0
    assert [value.name for value in some.graph.inputs] == ["x", "w1"]
    old = listing(every, ir_version=3)  # IR 3 requires every initializer among the inputs
    assert Cleanup()(old).stats["initializer_inputs_made_constant"] == 0


def test_strip_metadata_drops_doc_strings_and_intermediate_types() -> None:
    model = mlp_model()
    node = next(iter(model.graph))
    node.doc_string = "exported from torch"
    node.metadata_props["pkg.torch.stack"] = "x" * 100
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    model.producer_name, model.producer_version = "tf2onnx", "1.17.0 None"
    result = Cleanup(Cleanup.Config(strip_metadata=True))(model)
    assert result.stats["metadata_items_stripped"] >= 3
    assert node.doc_string is None and not node.metadata_props
    assert not model.producer_name and not model.producer_version
    assert node.outputs[0].type is None
    assert model.graph.outputs[0].type is not None  # the interface keeps its types


def test_strip_metadata_clears_the_inputs_and_parameters_of_a_dynamo_export(tmp_path: Path) -> None:
    """dynamo tags every input and parameter with its torch.export role; onnx-ir writes an
    initializer's metadata back as a value_info entry (435 bytes of a 22 KB compressed DLRM)."""
    source = onnx.load(str(model_files("dlrm_bag_dynamo")["onnx"]))
    assert any(value.metadata_props for value in source.graph.input)
    assert any(value.metadata_props for value in source.graph.value_info)
    model = ir.load(model_files("dlrm_bag_dynamo")["onnx"])
    Cleanup(Cleanup.Config(strip_metadata=True))(model)
    saved = onnx.load(str(save_model(model, tmp_path / "stripped.onnx")))
    assert not saved.graph.value_info
    assert not any(value.metadata_props for value in [*saved.graph.input, *saved.graph.output])
    assert all(value.type.tensor_type.elem_type for value in saved.graph.input)  # types kept


def test_batchnorm_and_per_channel_affine_fold_into_the_linear_layer(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,6] x, float[4,6] w, float[4] b, float[4] gamma, float[4] beta, float[4] mean, float[4] var, float[6,3] w2, float[3] s, float[3] t) => (float[N,4] y, float[N,3] z) {
          h = Gemm <transB = 1> (x, w, b)
          y = BatchNormalization <epsilon = 0.001> (h, gamma, beta, mean, var)
          m = MatMul(x, w2)
          scaled = Mul(m, s)
          z = Add(scaled, t)
        }
        """,
        {
            "w": rng.standard_normal((4, 6)).astype(np.float32),
            "b": rng.standard_normal(4).astype(np.float32),
            "gamma": rng.random(4).astype(np.float32) + 0.5,
            "beta": rng.standard_normal(4).astype(np.float32),
            "mean": rng.standard_normal(4).astype(np.float32),
            "var": rng.random(4).astype(np.float32) + 0.1,
            "w2": rng.standard_normal((6, 3)).astype(np.float32),
            "s": rng.standard_normal(3).astype(np.float32),
            "t": rng.standard_normal(3).astype(np.float32),
        },
    )
    feeds = {"x": rng.standard_normal((7, 6)).astype(np.float32)}
    before = run_reference(model, tmp_path, feeds)
    result = Cleanup(Cleanup.Config(fuse_parallel=False))(model)
    assert result.stats["affine_folded"] == 3
    assert op_types(model) == ["Gemm", "Gemm"]  # MatMul + Mul + Add became one Gemm (2-D input)
    assert [value.name for value in model.graph.outputs] == ["y", "z"]
    after = run_reference(model, tmp_path, feeds)
    for exact, folded in zip(before, after, strict=True):
        np.testing.assert_allclose(exact, folded, rtol=1e-5, atol=1e-5)


def test_folding_into_layers_that_share_one_weight_gives_each_its_own(tmp_path: Path) -> None:
    """Blocks that share their weights (cloned layers an exporter deduplicates, ALBERT-style tied
    blocks) each fold their own scale: the second fold's new initializer took the first one's name
    and onnx-ir refused it, so cleanup failed on the whole model."""
    rng = np.random.default_rng(1)
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,2,4] x, float[4,4] w, float[4] s1, float[4] s2) => (float[N,2,4] y) {
          a = MatMul(x, w)
          h = Mul(a, s1)
          b = MatMul(h, w)
          y = Mul(b, s2)
        }
        """,
        {
            "w": rng.standard_normal((4, 4)).astype(np.float32),
            "s1": rng.random(4).astype(np.float32) + 0.5,
            "s2": rng.random(4).astype(np.float32) + 0.5,
        },
    )
    feeds = {"x": rng.standard_normal((3, 2, 4)).astype(np.float32)}
    before = run_reference(model, tmp_path, feeds)
    result = Cleanup()(model)
    assert result.stats["affine_folded"] >= 2
    assert "Mul" not in op_types(model) and len(set(model.graph.initializers)) == len(model.graph.initializers)
    np.testing.assert_allclose(run_reference(model, tmp_path, feeds)[0], before[0], rtol=1e-5, atol=1e-5)


def test_a_batch_norm_after_an_activation_folds_into_the_next_linear_layer(tmp_path: Path) -> None:
    """tf2onnx writes Dense(relu) -> BatchNorm -> Dense as Relu, Mul, Add, MatMul, Add: the Mul and
    Add fold forward into the next layer (no shapes are declared: the width comes from the layer
    before), but not when something else also reads them or when a constant broadcasts the width."""
    rng = np.random.default_rng(1)
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,5] x, float[5,4] w1, float[4] b1, float[4] s, float[4] t, float[4,3] w2, float[3] b2,
           int64[1] starts, int64[1] ends, int64[1] axes, float[4] u, float[4,2] w4, float[4] s2,
           float[4,2] w5) => (float[N,3] y, float[N,2] z, float[N,2] v, float[N,4] seen) {
          h = MatMul(x, w1)
          hb = Add(h, b1)
          r = Relu(hb)
          scaled = Mul(r, s)
          shifted = Add(scaled, t)
          m = MatMul(shifted, w2)
          y = Add(m, b2)
          one = Slice(x, starts, ends, axes)
          wide = Mul(one, u)
          z = MatMul(wide, w4)
          q = Mul(r, s2)
          v = MatMul(q, w5)
          seen = Relu(q)
        }
        """,
        {
            "w1": rng.standard_normal((5, 4)).astype(np.float32),
            "b1": rng.standard_normal(4).astype(np.float32),
            "s": rng.random(4).astype(np.float32) + 0.5,
            "t": rng.standard_normal(4).astype(np.float32),
            "w2": rng.standard_normal((4, 3)).astype(np.float32),
            "b2": rng.standard_normal(3).astype(np.float32),
            "starts": np.array([0], np.int64),
            "ends": np.array([1], np.int64),
            "axes": np.array([1], np.int64),
            "u": rng.standard_normal(4).astype(np.float32),
            "w4": rng.standard_normal((4, 2)).astype(np.float32),
            "s2": rng.standard_normal(4).astype(np.float32),
            "w5": rng.standard_normal((4, 2)).astype(np.float32),
        },
    )
    for value in model.graph:
        for output in value.outputs:
            if output not in model.graph.outputs:
                output.shape = None
    feeds = {"x": rng.standard_normal((7, 5)).astype(np.float32)}
    before = run_reference(model, tmp_path, feeds)
    result = Cleanup()(model)
    assert result.stats["affine_folded"] >= 2
    # the batch norm's Mul and Add are gone; the [N,1] * [4] broadcast and the Mul read twice stay
    assert op_types(model).count("Mul") == 2
    relu = next(node for node in model.graph if node.op_type == "Relu" and node.inputs[0].producer().op_type != "Mul")
    assert {user.op_type for user, _ in relu.outputs[0].uses()} == {"Mul", "MatMul"}  # rank unknown: no Gemm
    after = run_reference(model, tmp_path, feeds)
    for exact, folded in zip(before, after, strict=True):
        np.testing.assert_allclose(exact, folded, rtol=1e-5, atol=1e-5)


def test_identical_constant_nodes_are_merged_and_outputs_stay_exact(tmp_path: Path) -> None:
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N] a, float[N] b) => (float[N,1] y, float[N,1] bu, float[1,N] z, int64[1] axes_out) {
          one = Constant <value = int64[1] {1}> ()
          y = Unsqueeze(a, one)
          also_one = Constant <value = int64[1] {1}> ()
          zero = Constant <value = int64[1] {0}> ()
          bu = Unsqueeze(b, also_one)
          z = Unsqueeze(a, zero)
          axes_out = Constant <value = int64[1] {1}> ()
        }
        """
    )
    feeds = {"a": np.arange(3, dtype=np.float32), "b": np.ones(3, np.float32)}
    before = run_reference(model, tmp_path, feeds)
    result = Cleanup()(model)
    assert result.stats["constants_merged"] == 1  # also_one; a graph output keeps its own node,
    # until common subexpressions make the output the one node's value, under the output's name
    assert result.stats["common_subexpressions"] == 1
    assert op_types(model).count("Constant") == 2
    assert [value.name for value in model.graph.outputs] == ["y", "bu", "z", "axes_out"]
    after = run_reference(model, tmp_path, feeds)
    for exact, merged in zip(before, after, strict=True):
        np.testing.assert_array_equal(exact, merged)


def test_short_names_keep_the_interface() -> None:
    model = mlp_model()
    Cleanup(Cleanup.Config(short_names=True))(model)
    assert [v.name for v in model.graph.inputs] == ["x"] and [v.name for v in model.graph.outputs] == ["score"]
    assert not any(node.name for node in model.graph)
    assert model.graph.name == "g"
    internal = [out.name for node in model.graph for out in node.outputs if not out.is_graph_output()]
    assert all(name.isidentifier() and len(name) == 1 for name in internal)  # C identifiers, ONNX's rule
    assert len(set(internal)) == len(internal)


def test_short_names_go_to_the_most_used_values_first() -> None:
    names = list(itertools.islice(identifier_names(), 60))
    assert names[:3] == ["a", "b", "c"] and names[52] == "_" and names[53] == "aa"
    assert len(set(names)) == 60 and all(name.isidentifier() for name in names)
    x = ir.Value(name="a", shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[])
    once = ir.node("Relu", [x])
    often = ir.node("Neg", [x])
    users = [ir.node("Add", [often.outputs[0], often.outputs[0]]) for _ in range(3)]
    for node in (once, often, *users):
        graph.append(node)
    graph.outputs.extend(user.outputs[0] for user in users[:2])
    for index, value in enumerate(graph.outputs):
        value.name = f"out{index}"
    once.outputs[0].name, often.outputs[0].name = "long_name_used_nowhere", "long_name_used_six_times"
    users[2].outputs[0].name = "dead_end"
    shorten_names(ir.Model(graph, ir_version=10))
    assert often.outputs[0].name == "b"  # "a" is the graph input's: interface names are kept
    assert (once.outputs[0].name, users[2].outputs[0].name) == ("c", "d")  # then in graph order
    assert [value.name for value in graph.outputs] == ["out0", "out1"]


def test_int4_initializers_are_compared_by_their_packed_bytes() -> None:
    import ml_dtypes

    first = np.zeros((4, 8), ml_dtypes.int4)
    second = first.copy()
    second[3, 7] = 5  # differs only in the last element, in the second half of the unpacked array
    model = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 21}), ir_version=10)
    values = []
    for name, array in (("a", first), ("b", second), ("c", first.copy())):
        value = ir.Value(name=name, const_value=ir.tensor(array, dtype=ir.DataType.INT4, name=name))
        model.graph.register_initializer(value)
        values.append(value)
    cast_nodes = [ir.node("Cast", [value], attributes={"to": 1}) for value in values]
    for node in cast_nodes:
        model.graph.append(node)
        model.graph.outputs.append(node.outputs[0])
        node.outputs[0].name = f"out_{node.inputs[0].name}"
    assert merge_identical_initializers(model) == (1, first.size // 2)
    assert cast_nodes[2].inputs[0] is values[0] and cast_nodes[1].inputs[0] is values[1]


def test_projections_of_one_input_become_one_wider_layer_and_a_split(tmp_path: Path) -> None:
    """Query, key and value projections of a transformer block: three MatMul + bias Add on the same
    [N, T, K] input become one MatMul, one Add and a Split, with identical outputs; a layer whose
    weight is shared or that reads another input is left alone."""
    rng = np.random.default_rng(3)
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,5,8] x, float[N,5,8] other, float[8,4] wq, float[4] bq, float[8,6] wk, float[6] bk, float[8,4] wv) => (float[N,5,4] q, float[N,5,6] k, float[N,5,4] v, float[N,5,4] o) {
          mq = MatMul(x, wq)
          q = Add(mq, bq)
          mk = MatMul(x, wk)
          k = Add(bk, mk)
          v = MatMul(x, wv)
          o = MatMul(other, wq)
        }
        """,
        {
            "wq": rng.standard_normal((8, 4)).astype(np.float32),
            "bq": rng.standard_normal(4).astype(np.float32),
            "wk": rng.standard_normal((8, 6)).astype(np.float32),
            "bk": rng.standard_normal(6).astype(np.float32),
            "wv": rng.standard_normal((8, 4)).astype(np.float32),
        },
    )
    feeds = {name: rng.standard_normal((3, 5, 8)).astype(np.float32) for name in ("x", "other")}
    before = run_reference(model, tmp_path, feeds)
    result = Cleanup()(model)
    assert result.stats["linear_layers_fused"] == 2
    assert op_types(model) == ["MatMul", "Add", "Split", "MatMul"]
    split = next(node for node in model.graph if node.op_type == "Split")
    assert [value.name for value in split.outputs] == ["q", "k", "v"]
    assert split.inputs[1].const_value.numpy().tolist() == [4, 6, 4]
    after = run_reference(model, tmp_path, feeds)
    for exact, fused in zip(before, after, strict=True):
        np.testing.assert_allclose(exact, fused, rtol=1e-6, atol=1e-6)


def test_gemm_layers_of_one_input_fuse_whatever_their_weight_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,6] x, float[3,6] wa, float[3] ba, float[6,2] wb) => (float[N,3] a, float[N,2] b) {
          a = Gemm <transB = 1> (x, wa, ba)
          b = Gemm (x, wb)
        }
        """,
        {
            "wa": rng.standard_normal((3, 6)).astype(np.float32),
            "ba": rng.standard_normal(3).astype(np.float32),
            "wb": rng.standard_normal((6, 2)).astype(np.float32),
        },
    )
    feeds = {"x": rng.standard_normal((4, 6)).astype(np.float32)}
    before = run_reference(model, tmp_path, feeds)
    assert Cleanup()(model).stats["linear_layers_fused"] == 1
    assert op_types(model) == ["Gemm", "Split"]
    after = run_reference(model, tmp_path, feeds)
    for exact, fused in zip(before, after, strict=True):
        np.testing.assert_allclose(exact, fused, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_a_fused_layer_read_through_a_split_splits_into_its_pieces_and_back(op: str, tmp_path: Path) -> None:
    """The inverse of the fusion, for pruning each piece's units on its own: one layer per piece of
    the Split, the fused weight gone, the same outputs; fusing the pieces again restores one product."""
    from onnxcompress.passes.cleanup import fuse_parallel_linear, split_fused_linear

    rng = np.random.default_rng(6)
    if op == "Gemm":
        layer, shape = "h = Gemm <transB = 1> (x, w, b)", "9,6"
    else:
        layer, shape = "m = MatMul(x, w)\n          h = Add(m, b)", "6,9"
    weight = rng.standard_normal([int(d) for d in shape.split(",")])
    model = text_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,6] x, float[{shape}] w, float[9] b) => (float[N,4] p, float[N,2] q, float[N,3] r) {{
          {layer}
          sizes = Constant <value = int64[3] {{4, 2, 3}}> ()
          a, c, r = Split <axis = -1> (h, sizes)
          p = Relu(a)
          q = Sigmoid(c)
        }}
        """,
        {"w": weight.astype(np.float32), "b": rng.standard_normal(9).astype(np.float32)},
    )
    feeds = {"x": rng.standard_normal((5, 6)).astype(np.float32)}
    before = run_reference(model, tmp_path, feeds)
    sources = split_fused_linear(model)
    assert [value.name for value in sources] == ["x"]
    assert "Split" not in op_types(model) and op_types(model).count(op) == 3
    assert "w" not in model.graph.initializers and "b" not in model.graph.initializers
    widths = sorted(
        value.const_value.numpy().size for name, value in model.graph.initializers.items() if "part" in name
    )
    assert widths == [2, 3, 4, 12, 18, 24]  # three biases and three weight slices of 6 rows
    for exact, split in zip(before, run_reference(model, tmp_path, feeds), strict=True):
        np.testing.assert_allclose(exact, split, rtol=1e-6, atol=1e-6)
    assert fuse_parallel_linear(model, sources) == 2
    assert op_types(model).count("Split") == 1 and op_types(model).count(op) == 1
    assert not [name for name in model.graph.initializers if "part" in name and "fused" not in name]
    for exact, fused in zip(before, run_reference(model, tmp_path, feeds), strict=True):
        np.testing.assert_allclose(exact, fused, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("fields", "columns"), [(5, [1, 2, 9, 0, 12, -1, 21, 16]), (8, None)])
def test_pairwise_dots_computed_field_major_give_the_same_columns(
    fields: int, columns: list[int] | None, tmp_path: Path
) -> None:
    """The chosen columns of ``X X^T`` (either orientation of a pair, the diagonal, negative
    indices) come out the same from the field-major form, each pair taken at its smaller shift:
    at most ``fields / 2 + 1`` shifts (DLRM's upper triangle of 8 fields: 4, not 7)."""
    if columns is None:
        columns = [i * fields + j for i in range(fields) for j in range(i + 1, fields)]
    rng = np.random.default_rng(9)
    chosen = np.array(columns, np.int64)
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,{fields},3] x, int64[{len(columns)}] cols) => (float[N,{len(columns)}] z) {{
          t = Transpose <perm = [0, 2, 1]> (x)
          d = MatMul(x, t)
          f = Flatten <axis = 1> (d)
          z = Gather <axis = 1> (f, cols)
        }}
        """
    feeds = {"x": rng.standard_normal((6, fields, 3)).astype(np.float32)}
    before = run_reference(text_model(text, {"cols": chosen}), tmp_path, feeds)
    assert Cleanup()(text_model(text, {"cols": chosen})).stats["dots_fields_major"] == 0  # off by default
    model = text_model(text, {"cols": chosen})
    stats = Cleanup(Cleanup.Config(dots_fields_major=True))(model).stats
    assert stats["dots_fields_major"] == 1
    assert "MatMul" not in op_types(model)
    (partners,) = [value for name, value in model.graph.initializers.items() if name.startswith("dots_partners")]
    assert partners.const_value.shape[0] <= fields // 2 + 1
    np.testing.assert_allclose(run_reference(model, tmp_path, feeds)[0], before[0], rtol=1e-5, atol=1e-5)


def test_the_dlrm_interaction_computed_field_major_keeps_the_scores(tmp_path: Path) -> None:
    for name in ("dlrm", "dlrm_dynamo"):
        model = ir.load(model_files(name)["onnx"])
        feeds = {key: value[:512] for key, value in np.load(model_files(name)["feeds"]).items()}
        before = runtime.run(runtime.make_session(model), feeds)
        assert Cleanup(Cleanup.Config(dots_fields_major=True))(model).stats["dots_fields_major"] == 1
        assert "Transpose" in op_types(model) and "OneHot" not in op_types(model)
        after = runtime.run(runtime.make_session(model), feeds)
        np.testing.assert_allclose(after["score"], before["score"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", ["y = Gemm <transB = 1> (s, w, b)", "m = MatMul(s, v)\n          y = Add(m, b)"])
def test_a_sum_over_stacked_vectors_folds_into_the_layer_that_reads_it(layer: str, tmp_path: Path) -> None:
    """The sum of MMoE's gate-weighted experts before each tower, a MatMul with stacked identities
    after the cleanup, goes into the tower's first layer: its weight tiled at load (no bytes
    stored), one product less; off by default, as the weight is then no initializer of its own."""
    rng = np.random.default_rng(8)
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,4] x, float[5,4] w, float[4,5] v, float[5] b) => (float[N,5] y) {{
          axes = Constant <value = int64[1] {{1}}> ()
          s = ReduceSum <keepdims = 0> (x, axes)
          {layer}
        }}
        """
    weights = {
        "w": rng.standard_normal((5, 4)).astype(np.float32),
        "v": rng.standard_normal((4, 5)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float32),
    }
    feeds = {"x": rng.standard_normal((6, 3, 4)).astype(np.float32)}
    before = run_reference(text_model(text, weights), tmp_path, feeds)
    unfolded = text_model(text, weights)
    assert Cleanup()(unfolded).stats["sums_folded_into_layers"] == 0
    assert op_types(unfolded).count("MatMul") == 1 + ("MatMul(s" in layer)
    model = text_model(text, weights)
    assert Cleanup(Cleanup.Config(fold_sums=True))(model).stats["sums_folded_into_layers"] == 1
    assert "EyeLike" not in op_types(model) and op_types(model).count("Tile") == 1
    assert op_types(model).count("MatMul") == ("MatMul(s" in layer)
    np.testing.assert_allclose(run_reference(model, tmp_path, feeds)[0], before[0], rtol=1e-5, atol=1e-5)


def test_the_presets_fold_mmoe_expert_sums_into_the_towers_in_their_final_cleanup(tmp_path: Path) -> None:
    # float activations: a tower layer the timing probe made integer reads no float weight to tile
    report = compress_with_preset("mmoe", "int8", tmp_path / "int8.onnx", "quant.activations=none")
    assert report.parity.passed
    assert report.passes[-1].stats["sums_folded_into_layers"] == 2  # one a task
    model = ir.load(tmp_path / "int8.onnx")
    assert "EyeLike" not in op_types(model)
    tiled = [node for node in model.graph if node.op_type == "Tile"]
    assert len(tiled) == 2 and all(node.outputs[0].uses()[0][0].op_type == "Gemm" for node in tiled)


def test_default_attributes_and_constant_nodes_cost_no_bytes(tmp_path: Path) -> None:
    """Softmax's axis defaults to the last one from opset 13: axis 1 goes on a [N, 3] input and
    stays on a [N, 3, 2] one."""
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,6] x, float[3,6] w) => (float[N,3] y, float[N,3,2] z) {
          shape = Constant <value = int64[2] {-1, 3}> ()
          h = Gemm <alpha = 1.0, beta = 1.0, transA = 0, transB = 1> (x, w)
          s = Softmax <axis = 1> (h)
          y = Reshape <allowzero = 0> (s, shape)
          cube = Constant <value = int64[3] {0, 3, 2}> ()
          h3 = Reshape (x, cube)
          z = Softmax <axis = 1> (h3)
        }
        """,
        {"w": np.ones((3, 6), np.float32)},
    )
    feeds = {"x": np.arange(12, dtype=np.float32).reshape(2, 6)}
    before = run_reference(model, tmp_path, feeds)
    result = Cleanup(Cleanup.Config(drop_default_attributes=True, lift_constants=True))(model)
    assert result.stats["default_attributes_dropped"] == 5  # alpha, beta, transA, allowzero, axis
    assert result.stats["constants_lifted"] == 2
    gemm, softmax, reshape, _, softmax3 = model.graph
    assert set(gemm.attributes) == {"transB"}
    assert not softmax.attributes
    assert softmax3.attributes.get_int("axis") == 1
    assert not reshape.attributes
    assert reshape.inputs[1].is_initializer()
    for exact, cleaned in zip(before, run_reference(model, tmp_path, feeds), strict=True):
        np.testing.assert_array_equal(cleaned, exact)


def test_allowzero_goes_where_the_target_holds_no_zero() -> None:
    """dynamo writes allowzero=1 on every view: it only says what a 0 in the target means."""
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,6] x, int64[2] rows, int64[3] empty) => (float[M,3] y, float[0,2,3] z) {
          y = Reshape <allowzero = 1> (x, rows)
          z = Reshape <allowzero = 1> (x, empty)
        }
        """,
        {"rows": np.array([-1, 3], np.int64), "empty": np.array([0, 2, 3], np.int64)},
    )
    assert drop_default_attributes(model) == 1
    kept = [node.attributes.get_int("allowzero", 0) for node in model.graph]
    assert kept == [0, 1]


def test_a_layer_norms_scale_and_shift_fold_into_the_layers_that_read_it(tmp_path: Path) -> None:
    """A pre-norm transformer block: the norm's scale and shift move into the fused Q/K/V layer,
    and the norm keeps unit scale and zero shift; a norm that also feeds a residual keeps its own."""
    rng = np.random.default_rng(8)
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,5,8] x, float[8] g1, float[8] b1, float[8] g2, float[8] b2, float[8,8] wq, float[8,8] wk, float[8] bk, float[8,8] wo) => (float[N,5,8] q, float[N,5,8] k, float[N,5,8] r) {
          n = LayerNormalization <axis = -1> (x, g1, b1)
          q = MatMul(n, wq)
          mk = MatMul(n, wk)
          k = Add(mk, bk)
          m = LayerNormalization <axis = -1> (x, g2, b2)
          o = MatMul(m, wo)
          r = Add(o, m)
        }
        """,
        {
            "g1": rng.random(8).astype(np.float32) + 0.5,
            "b1": rng.standard_normal(8).astype(np.float32),
            "g2": rng.random(8).astype(np.float32) + 0.5,
            "b2": rng.standard_normal(8).astype(np.float32),
            "wq": rng.standard_normal((8, 8)).astype(np.float32),
            "wk": rng.standard_normal((8, 8)).astype(np.float32),
            "bk": rng.standard_normal(8).astype(np.float32),
            "wo": rng.standard_normal((8, 8)).astype(np.float32),
        },
    )
    feeds = {"x": rng.standard_normal((3, 5, 8)).astype(np.float32)}
    before = run_reference(model, tmp_path, feeds)
    result = Cleanup()(model)
    assert result.stats["norms_folded"] == 1
    first, second = (node for node in model.graph if node.op_type == "LayerNormalization")
    np.testing.assert_array_equal(first.inputs[1].const_value.numpy(), np.ones(8, np.float32))
    np.testing.assert_array_equal(first.inputs[2].const_value.numpy(), np.zeros(8, np.float32))
    assert second.inputs[1].name == "g2"  # also read by the residual Add
    after = run_reference(model, tmp_path, feeds)
    for exact, folded in zip(before, after, strict=True):
        np.testing.assert_allclose(exact, folded, rtol=1e-5, atol=1e-5)


def test_layers_above_the_rewrite_size_are_neither_fused_nor_rescaled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fusing or folding makes new in-memory weights: above REWRITE_MAX_BYTES a layer is left alone
    (a multi-gigabyte projection is not copied for a small speed-up)."""
    import onnxcompress.passes.cleanup as cleanup

    rng = np.random.default_rng(9)

    def model() -> ir.Model:
        return text_model(
            """
            <ir_version: 8, opset_import: ["" : 17]>
            g (float[N,8] x, float[8] g1, float[8] b1, float[8,4] wq, float[8,4] wk) => (float[N,4] q, float[N,4] k) {
              n = LayerNormalization <axis = -1> (x, g1, b1)
              q = MatMul(n, wq)
              k = MatMul(n, wk)
            }
            """,
            {
                "g1": rng.random(8).astype(np.float32) + 0.5,
                "b1": rng.standard_normal(8).astype(np.float32),
                "wq": rng.standard_normal((8, 4)).astype(np.float32),
                "wk": rng.standard_normal((8, 4)).astype(np.float32),
            },
        )

    small = Cleanup()(model()).stats
    assert small["linear_layers_fused"] == 1 and small["norms_folded"] == 1
    monkeypatch.setattr(cleanup, "REWRITE_MAX_BYTES", 8 * 4 * 4 - 1)
    large = model()
    stats = Cleanup()(large).stats
    assert stats["linear_layers_fused"] == 0 and stats["norms_folded"] == 0
    assert op_types(large) == ["LayerNormalization", "MatMul", "MatMul"]


def test_a_norm_folds_into_a_gemm_with_transposed_weights(tmp_path: Path) -> None:
    """2-D rows into a TorchScript-style Gemm (transB=1, bias): the folded weight keeps the
    [outputs, inputs] layout and the shift lands in the Gemm's bias."""
    rng = np.random.default_rng(10)
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,6] x, float[6] g1, float[6] b1, float[3,6] w, float[3] b) => (float[N,3] y) {
          n = LayerNormalization <axis = -1> (x, g1, b1)
          y = Gemm <transB = 1> (n, w, b)
        }
        """,
        {
            "g1": rng.random(6).astype(np.float32) + 0.5,
            "b1": rng.standard_normal(6).astype(np.float32),
            "w": rng.standard_normal((3, 6)).astype(np.float32),
            "b": rng.standard_normal(3).astype(np.float32),
        },
    )
    feeds = {"x": rng.standard_normal((5, 6)).astype(np.float32)}
    (before,) = run_reference(model, tmp_path, feeds)
    assert Cleanup()(model).stats["norms_folded"] == 1
    gemm = next(node for node in model.graph if node.op_type == "Gemm")
    assert gemm.attributes.get_int("transB", 0) == 1 and gemm.inputs[1].const_value.shape.numpy() == (3, 6)
    (after,) = run_reference(model, tmp_path, feeds)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_a_cast_to_its_own_type_goes_and_gather_indices_are_narrowed_to_int32(tmp_path: Path) -> None:
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,6] x, int64[3] pick, int64[2] shape) => (float[N,3] y, float[N,6] w) {
          same = Cast <to = 1> (x)
          y = Gather <axis = 1> (same, pick)
          w = Reshape (x, shape)
        }
        """
    constants = {"pick": np.array([5, 0, 2], np.int64), "shape": np.array([-1, 6], np.int64)}
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)}
    expected = run_reference(text_model(text, constants), tmp_path, feeds)
    model = text_model(text, constants)
    # Columns of an activation would become a selection MatMul; the indices of this Gather are the subject.
    result = Cleanup(Cleanup.Config(narrow_indices=True, select_columns=False))(model)
    assert "Cast" not in op_types(model)
    dtypes = {name: value.const_value.dtype for name, value in model.graph.initializers.items()}
    assert dtypes == {"pick": ir.DataType.INT32, "shape": ir.DataType.INT64}  # a Reshape's shape stays int64
    assert result.stats["indices_narrowed"] == 1
    for exact, narrowed in zip(expected, run_reference(model, tmp_path, feeds), strict=True):
        np.testing.assert_array_equal(narrowed, exact)
    huge = {"pick": np.array([1, 2**40], np.int64), "shape": constants["shape"]}
    model = text_model(text, huge)
    Cleanup(Cleanup.Config(narrow_indices=True, select_columns=False))(model)
    assert model.graph.initializers["pick"].const_value.dtype == ir.DataType.INT64  # does not fit int32


def test_gather_nd_indices_stay_int64_which_is_all_it_takes(tmp_path: Path) -> None:
    """dynamo exports DLRM's ``Z[:, li, lj]`` as a GatherND; int32 indices made the int8 file invalid."""
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3,4] x, int64[2,2] pick) => (float[2] y) {
          y = GatherND (x, pick)
        }
        """
    model = text_model(text, {"pick": np.array([[0, 1], [2, 3]], np.int64)})
    result = Cleanup(Cleanup.Config(narrow_indices=True))(model)
    assert model.graph.initializers["pick"].const_value.dtype == ir.DataType.INT64
    assert result.stats.get("indices_narrowed", 0) == 0
    feeds = {"x": np.arange(12, dtype=np.float32).reshape(3, 4)}
    np.testing.assert_array_equal(run_reference(model, tmp_path, feeds)[0], [1.0, 11.0])


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (np.triu(np.ones((5, 5), bool), 1), (True, 1)),  # causal: true above the diagonal
        (np.tril(np.ones((4, 6), bool)), (False, 0)),
        (np.tril(np.ones((6, 6), bool), -2), (False, -2)),
        (np.eye(4, dtype=bool), None),
        (np.ones((3, 3), bool), None),
        (np.triu(np.ones((3, 3)), 1), None),  # float, not a mask
    ],
)
def test_triangle_of_recognises_causal_masks(mask: np.ndarray, expected: tuple[bool, int] | None) -> None:
    assert triangle_of(mask) == expected


def test_a_causal_mask_is_stored_as_trilu_and_computes_the_same(tmp_path: Path) -> None:
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,16,16] scores, bool[16,16] causal, float neg) => (float[N,16,16] y) {
          y = Where(causal, neg, scores)
        }
        """
    constants = {"causal": np.triu(np.ones((16, 16), bool), 1), "neg": np.array(-1e4, np.float32)}
    feeds = {"scores": np.random.default_rng(0).standard_normal((2, 16, 16)).astype(np.float32)}
    expected = run_reference(text_model(text, constants), tmp_path, feeds)[0]
    sizes = {}
    for compact in (False, True):
        model = text_model(text, constants)
        result = Cleanup(Cleanup.Config(compact_masks=compact, short_names=True, strip_metadata=True))(model)
        sizes[compact] = save_model(model, tmp_path / f"{compact}.onnx").stat().st_size
    assert result.stats["masks_compacted"] == 1 and len(model.graph.initializers) == 4
    assert op_types(model) == ["Expand", "Trilu", "Where"]
    assert sizes[True] < sizes[False] - 150  # 256 bytes of mask for ~100 of nodes
    path = tmp_path / "True.onnx"
    np.testing.assert_array_equal(ReferenceEvaluator(str(path)).run(None, feeds)[0], expected)


def test_an_additive_causal_mask_is_stored_as_a_where_of_trilu_and_computes_the_same(tmp_path: Path) -> None:
    """PyTorch's nn.TransformerEncoderLayer exports its causal mask as a float constant of 0 and
    -inf added to the attention scores, with a leading batch axis of one."""
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,16,16] scores, float[1,16,16] causal) => (float[N,16,16] y) {
          masked = Add(causal, scores)
          y = Softmax<axis=-1>(masked)
        }
        """
    additive = np.where(np.triu(np.ones((1, 16, 16), bool), 1), -np.inf, 0.0).astype(np.float32)
    feeds = {"scores": np.random.default_rng(0).standard_normal((2, 16, 16)).astype(np.float32)}
    expected = run_reference(text_model(text, {"causal": additive}), tmp_path, feeds)[0]
    sizes = {}
    for compact in (False, True):
        model = text_model(text, {"causal": additive})
        result = Cleanup(Cleanup.Config(compact_masks=compact, short_names=True, strip_metadata=True))(model)
        sizes[compact] = save_model(model, tmp_path / f"{compact}.onnx").stat().st_size
    assert result.stats["masks_compacted"] == 1
    assert op_types(model) == ["Expand", "Trilu", "Where", "Add", "Softmax"]
    assert sizes[True] < sizes[False] - 800  # 1,024 bytes of mask
    path = tmp_path / "True.onnx"
    np.testing.assert_array_equal(ReferenceEvaluator(str(path)).run(None, feeds)[0], expected)
    # Two values off a triangle, or three values on one, stay as they are.
    rng = np.random.default_rng(1)
    for other in (rng.integers(0, 2, (1, 16, 16)).astype(np.float32), additive + np.eye(16, dtype=np.float32)):
        model = text_model(text, {"causal": other})
        assert Cleanup(Cleanup.Config(compact_masks=True))(model).stats.get("masks_compacted", 0) == 0


def test_consecutive_constant_adds_become_one(tmp_path: Path) -> None:
    """A bias and a shift folded next to it (tf2onnx's batch norm after an activation, folded into
    the next layer) are one vector; an Add whose result is read twice is left alone."""
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x, float[4,3] w, float[3] bias, float[3] shift, float[3] other) => (float[N,3] y, float[N,3] z) {
          h = MatMul(x, w)
          biased = Add(h, bias)
          shifted = Add(shift, biased)
          y = Relu(shifted)
          twice = Add(h, other)
          z = Add(twice, twice)
        }
        """
    rng = np.random.default_rng(2)
    constants = {
        name: rng.standard_normal(shape).astype(np.float32)
        for name, shape in (("w", (4, 3)), ("bias", 3), ("shift", 3), ("other", 3))
    }
    feeds = {"x": rng.standard_normal((5, 4)).astype(np.float32)}
    expected = run_reference(text_model(text, constants), tmp_path, feeds)
    model = text_model(text, constants)
    result = Cleanup()(model)
    assert result.stats["constant_adds_merged"] == 1
    assert op_types(model) == ["MatMul", "Add", "Relu", "Add", "Add"]
    merged = next(node for node in model.graph if node.op_type == "Add")
    np.testing.assert_allclose(merged.inputs[0].const_value.numpy(), constants["bias"] + constants["shift"])
    for exact, got in zip(expected, run_reference(model, tmp_path, feeds), strict=True):
        np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-6)


def test_a_one_output_layer_keeps_the_exporters_two_dimensional_bias(tmp_path: Path) -> None:
    """skl2onnx's logit layer adds a [1, 1] bias to [N, 1]; folded into a [1] bias, onnxruntime would
    take its scalar broadcast path, twice as slow at batch 512 (3 us of the model's 65 us). (With
    complementary_sigmoids, on by default, the layer is two columns wide.)"""
    files = model_files("sklearn_mlp")
    model = ir.load(files["onnx"])
    Cleanup(Cleanup.Config(complementary_sigmoids=False))(model)
    sigmoid = next(node for node in model.graph if node.op_type == "Sigmoid")
    add = sigmoid.inputs[0].producer()
    assert add.op_type == "Add" and add.inputs[1].const_value.shape == (1, 1)
    feeds = dict(np.load(files["feeds"]))
    feeds = {name: array[:64] for name, array in feeds.items()}
    expected = runtime.make_session(files["onnx"], "disable").run(None, feeds)
    got = runtime.make_session(save_model(model, tmp_path / "clean.onnx"), "disable").run(None, feeds)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["Relu", "Tanh"])
def test_dead_hidden_units_are_removed_and_their_constant_output_moves_into_the_next_bias(
    activation: str, tmp_path: Path
) -> None:
    """Unit 1 reads nothing (its output is relu(bias) for every row), unit 3 feeds nothing: both go,
    unit 1's constant contribution joins the next layer's bias. Through an activation this module
    does not evaluate (Tanh), only the unit that feeds nothing goes."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((6, 5)).astype(np.float32)
    w1[:, 1] = 1e-37
    b1 = rng.standard_normal(5).astype(np.float32)
    b1[1] = 0.7
    w2 = rng.standard_normal((5, 3)).astype(np.float32)
    w2[3] = 0.0
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,6] x, float[6,5] w1, float[5] b1, float[5,3] w2, float[3] b2) => (float[N,3] y) {{
          h = Gemm(x, w1, b1)
          a = {activation}(h)
          y = Gemm(a, w2, b2)
        }}
        """
    constants = {"w1": w1, "b1": b1, "w2": w2, "b2": rng.standard_normal(3).astype(np.float32)}
    feeds = {"x": rng.standard_normal((8, 6)).astype(np.float32)}
    expected = run_reference(text_model(text, constants), tmp_path, feeds)[0]
    model = text_model(text, constants)
    result = Cleanup()(model)
    removed = 2 if activation == "Relu" else 1
    assert result.stats["dead_units_removed"] == removed
    assert model.graph.initializers["w1"].const_value.shape == (6, 5 - removed)
    assert model.graph.initializers["w2"].const_value.shape == (5 - removed, 3)
    np.testing.assert_allclose(run_reference(model, tmp_path, feeds)[0], expected, rtol=1e-5, atol=1e-6)
    if activation == "Relu":
        np.testing.assert_allclose(
            model.graph.initializers["b2"].const_value.numpy(), constants["b2"] + 0.7 * w2[1], rtol=1e-6
        )


def test_the_sklearn_mlps_dead_units_go_without_changing_its_scores(tmp_path: Path) -> None:
    """scikit-learn's L2-regularised MLP trains 18 of its first 128 units and 10 of its next 64 to
    weights of 1e-36: cleanup removes them, and the scores stay bit-identical."""
    files = model_files("sklearn_mlp")
    model = ir.load(files["onnx"])
    result = Cleanup()(model)
    assert result.stats["dead_units_removed"] == 28
    shapes = [tuple(value.const_value.shape.numpy()) for value in model.graph.initializers.values()]
    widths = sorted(shape for shape in shapes if len(shape) == 2)
    assert widths == [(54, 2), (75, 110), (110, 54)]  # the logit layer gives both probabilities
    feeds = {name: array[:256] for name, array in np.load(files["feeds"]).items()}
    expected = runtime.make_session(files["onnx"], "disable").run(None, feeds)
    got = runtime.make_session(save_model(model, tmp_path / "clean.onnx"), "disable").run(None, feeds)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-6, atol=1e-7)


def test_float16_vectors_each_cast_back_become_one_cast_and_a_split(tmp_path: Path) -> None:
    """Quantized models store biases as float16 + a Cast each; packed, they are one vector, one Cast
    and one Split (folded at load), the outputs bit-identical and the file smaller. Fewer than
    PACK_MIN_VECTORS are left alone: the shared nodes would cost more than they save."""
    rng = np.random.default_rng(6)
    count = PACK_MIN_VECTORS + 1
    inputs = ", ".join(f"float16[{8 + i}] b{i}" for i in range(count))
    outputs = ", ".join(f"float[N,{8 + i}] y{i}" for i in range(count))
    body = "\n".join(f"c{i} = Cast <to = 1> (b{i})\ny{i} = Add(x{i}, c{i})" for i in range(count))
    xs = ", ".join(f"float[N,{8 + i}] x{i}" for i in range(count))
    text = f"""
        <ir_version: 8, opset_import: ["" : 18]>
        g ({xs}, {inputs}) => ({outputs}) {{
        {body}
        }}
        """
    constants = {f"b{i}": rng.standard_normal(8 + i).astype(np.float16) for i in range(count)}
    feeds = {f"x{i}": rng.standard_normal((3, 8 + i)).astype(np.float32) for i in range(count)}
    expected = run_reference(text_model(text, constants), tmp_path, feeds)
    sizes = {}
    for pack in (False, True):
        model = text_model(text, constants)
        result = Cleanup(Cleanup.Config(pack_casts=pack, short_names=True))(model)
        sizes[pack] = save_model(model, tmp_path / f"{pack}.onnx").stat().st_size
    assert result.stats["cast_vectors_packed"] == count
    assert op_types(model).count("Cast") == 1 and op_types(model).count("Split") == 1
    assert sizes[True] < sizes[False] - 30
    for exact, got in zip(expected, run_reference(model, tmp_path, feeds), strict=True):
        np.testing.assert_array_equal(got, exact)
    model = text_model(text, constants)
    for node in [node for node in model.graph if node.op_type == "Cast"][PACK_MIN_VECTORS - 1 :]:
        node.inputs[0].const_value = ir.tensor(node.inputs[0].const_value.numpy().astype(np.float32))
    assert Cleanup(Cleanup.Config(pack_casts=True))(model).stats["cast_vectors_packed"] == 0  # 3 float16


def test_the_sklearn_label_needs_no_ml_operator_and_stays_identical(tmp_path: Path) -> None:
    files = model_files("sklearn_mlp")
    model = ir.load(files["onnx"])
    result = Cleanup()(model)
    assert result.stats["labels_simplified"] == 1
    # the probabilities come from one two-column Sigmoid (complementary_sigmoids), the label is their
    # ArgMax as exported, int64 already: neither the extractor nor the exporter's Cast is left
    assert op_types(model)[-3:] == ["Sigmoid", "ArgMax", "Reshape"]
    assert "ArrayFeatureExtractor" not in op_types(model) and "Cast" not in op_types(model)
    assert "ai.onnx.ml" not in model.opset_imports
    feeds = dict(np.load(files["feeds"]))
    expected = runtime.make_session(files["onnx"], "all").run(None, feeds)
    path = save_model(model, tmp_path / "clean.onnx")
    onnx.checker.check_model(str(path))  # the label output keeps its declared shape
    got = runtime.make_session(path, "all").run(None, feeds)
    assert got[0].dtype == expected[0].dtype and got[0].shape == expected[0].shape
    np.testing.assert_array_equal(got[0], expected[0])
    assert 0 < expected[0].mean() < 1  # both classes occur


SIGMOID_PAIR_TEXT = """
<ir_version: 8, opset_import: ["" : 14]>
g (float[N,3] x) => (float[N,2] probabilities) {
  product = MatMul(x, w)
  logit = Add(product, b)
  score = Sigmoid(logit)
  complement = Sub(one, score)
  probabilities = Concat <axis = 1> (complement, score)
}
"""

SIGMOID_PAIR_CONSTANTS = {
    "w": np.array([[0.5], [-1.25], [2.0]], np.float32),
    "b": np.array([[0.3]], np.float32),
    "one": np.array(1.0, np.float32),
}


def _sigmoid_pair(text: str, constants: dict[str, np.ndarray]) -> ir.Model:
    inputs = ", ".join(f"float[{','.join(map(str, a.shape))}] {name}" for name, a in constants.items())
    return text_model(text.replace("g (", f"g ({inputs}, "), constants)


@pytest.mark.parametrize("layer", ["MatMul", "Gemm"])
def test_both_probabilities_of_a_binary_classifier_come_from_one_sigmoid(layer: str, tmp_path: Path) -> None:
    """``Concat(1 - Sigmoid(z), Sigmoid(z))``: the last layer gets the column ``-w`` (bias ``-b``)
    beside its own and one Sigmoid gives both probabilities; within float32 rounding. The same
    through a Gemm with its weight as [outputs, inputs] (transB) and its own bias."""
    text, constants = SIGMOID_PAIR_TEXT, dict(SIGMOID_PAIR_CONSTANTS)
    if layer == "Gemm":
        text = text.replace("product = MatMul(x, w)\n  logit = Add(product, b)", "logit = Gemm <transB = 1> (x, w, b)")
        constants.update(w=constants["w"].T.copy(), b=np.float32([0.3]))
    model = _sigmoid_pair(text, constants)
    feeds = {"x": np.random.default_rng(1).standard_normal((64, 3)).astype(np.float32) * 3}
    before = runtime.make_session(save_model(model, tmp_path / "before.onnx"), "disable").run(None, feeds)
    assert Cleanup()(model).stats["complementary_sigmoids"] == 1
    assert op_types(model) == ["Gemm", "Sigmoid"]  # MatMul + Add folded on the 2-D input
    gemm = model.graph.node(0)
    weight = gemm.inputs[1].const_value.numpy()
    axis = 0 if layer == "Gemm" else 1
    np.testing.assert_array_equal(weight, np.concatenate([-constants["w"], constants["w"]], axis))
    np.testing.assert_array_equal(gemm.inputs[2].const_value.numpy().reshape(-1), np.float32([-0.3, 0.3]))
    after = runtime.make_session(save_model(model, tmp_path / "after.onnx"), "disable").run(None, feeds)
    np.testing.assert_allclose(after[0], before[0], rtol=0, atol=1e-7)
    assert after[0].shape == (64, 2)


@pytest.mark.parametrize(
    ("change", "constants"),
    [
        (("Sub(one, score)", "Sub(one, score)"), {"one": np.array(0.999, np.float32)}),  # not 1 - p
        (("(complement, score)", "(score, complement)"), {}),  # the order the rewrite does not give
        (("probabilities) {", "probabilities, float[N,1] score) {"), {}),  # the score is an output too
        (("Add(product, b)", "Add(product, b)"), {"w": np.ones((3, 2), np.float32)}),  # two columns already
        (("Add(product, b)", "Add(product, b)"), {"b": np.array([[0.3], [0.1]], np.float32)}),  # a bias per row
    ],
)
def test_sigmoid_pairs_the_rewrite_cannot_give_are_left_alone(
    change: tuple[str, str], constants: dict[str, np.ndarray]
) -> None:
    text = SIGMOID_PAIR_TEXT.replace(*change)
    model = _sigmoid_pair(text, {**SIGMOID_PAIR_CONSTANTS, **constants})
    assert Cleanup(Cleanup.Config(fold_affine=False))(model).stats["complementary_sigmoids"] == 0
    assert "Concat" in op_types(model)


def test_the_sklearn_probabilities_and_labels_stay_as_exported(tmp_path: Path) -> None:
    """On the shipped MLPClassifier, every one of 10,000 labels and the probabilities to 6e-8 (one
    float32 step near 1); the Sub and the Concat are gone."""
    files = model_files("sklearn_mlp")
    model = ir.load(files["onnx"])
    assert Cleanup()(model).stats["complementary_sigmoids"] == 1
    assert "Sub" not in op_types(model) and "Concat" not in op_types(model)
    feeds = dict(np.load(files["feeds"]))
    expected = runtime.make_session(files["onnx"], "basic").run(None, feeds)
    got = runtime.make_session(save_model(model, tmp_path / "clean.onnx"), "basic").run(None, feeds)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1], rtol=0, atol=6e-8)


BINARY_LABEL_TEXT = """
<ir_version: 8, opset_import: ["" : 14, "ai.onnx.ml" : 1]>
g (float[N,1] p) => (float[N,2] probabilities, int64[N] label) {
  q = Sub(one, p)
  probabilities = Concat <axis = 1> (q, p)
  index = ArgMax <axis = 1> (probabilities)
  picked = ai.onnx.ml.ArrayFeatureExtractor(classes, index)
  flat = Reshape(picked, shape)
  label = Cast <to = 7> (flat)
}
"""


@pytest.mark.parametrize(("classes", "expected_ops"), [([0, 1], ["Greater", "Cast"]), ([3, -7], ["Greater", "Where"])])
def test_a_binary_label_is_a_comparison_of_the_two_scores_with_ties_to_the_first(
    classes: list[int], expected_ops: list[str], tmp_path: Path
) -> None:
    constants = {
        "one": np.array(1.0, np.float32),
        "classes": np.array(classes, np.int32),
        "shape": np.array([-1], np.int64),
    }
    model = text_model(BINARY_LABEL_TEXT.replace("g (", "g (int32[2] classes, int64[1] shape, float one, "), constants)
    # 0.5 ties (ArgMax picks the first class), scores on both sides and at the ends.
    feeds = {"p": np.array([[0.5], [0.2], [0.8], [0.0], [1.0], [0.5000001]], np.float32)}
    before = runtime.make_session(save_model(model, tmp_path / "before.onnx"), "disable").run(None, feeds)
    assert Cleanup()(model).stats["labels_simplified"] == 1
    # The int32 classes are made int64 at once: the exporter's Cast after the Reshape goes.
    assert op_types(model)[-3:] == [*expected_ops, "Reshape"] and "ArgMax" not in op_types(model)
    after = runtime.make_session(save_model(model, tmp_path / "after.onnx"), "disable").run(None, feeds)
    assert after[1].dtype == np.int64
    np.testing.assert_array_equal(after[1], before[1])
    assert before[1].tolist() == [classes[0], classes[0], classes[1], classes[0], classes[1], classes[1]]


MULTICLASS_LABEL_TEXT = """
<ir_version: 8, opset_import: ["" : 14, "ai.onnx.ml" : 1]>
g (float[N,3] scores, int64[3] classes, int64[1] shape) => (int64[N] label) {
  index = ArgMax <axis = 1> (scores)
  picked = ai.onnx.ml.ArrayFeatureExtractor(classes, index)
  label = Reshape(picked, shape)
}
"""


@pytest.mark.parametrize(("classes", "simplified"), [([0, 1, 2], True), ([0, 2, 5], False)])
def test_a_multiclass_label_is_the_index_itself_only_when_classes_count_from_zero(
    classes: list[int], simplified: bool, tmp_path: Path
) -> None:
    constants = {"classes": np.array(classes, np.int64), "shape": np.array([-1], np.int64)}
    model = text_model(MULTICLASS_LABEL_TEXT, constants)
    feeds = {"scores": np.random.default_rng(0).standard_normal((9, 3)).astype(np.float32)}
    before = runtime.make_session(save_model(model, tmp_path / "before.onnx"), "disable").run(None, feeds)
    assert Cleanup()(model).stats["labels_simplified"] == int(simplified)
    assert ("ArrayFeatureExtractor" in op_types(model)) is not simplified
    after = runtime.make_session(save_model(model, tmp_path / "after.onnx"), "disable").run(None, feeds)
    np.testing.assert_array_equal(after[0], before[0])


def test_a_label_read_in_its_own_shape_keeps_the_ml_operator() -> None:
    text = MULTICLASS_LABEL_TEXT.replace("int64[N] label", "int64[1,N] label").replace(
        "label = Reshape(picked, shape)", "label = Identity(picked)"
    )
    model = text_model(text, {"classes": np.arange(3, dtype=np.int64), "shape": np.array([-1], np.int64)})
    assert Cleanup()(model).stats["labels_simplified"] == 0
    assert "ArrayFeatureExtractor" in op_types(model)


def test_a_branch_returning_an_outer_value_keeps_its_identity(tmp_path: Path) -> None:
    # TorchScript's squeeze(1) becomes an If whose else branch returns the outer Sigmoid through an
    # Identity; without it onnxruntime refuses the model.
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,1] x, bool wide) => (float[N] y) {
          s = Sigmoid(x)
          y = If (wide) <
            then_branch = t () => (float[N] squeezed) {
              axes = Constant <value = int64[1] {1}> ()
              squeezed = Squeeze(s, axes)
            },
            else_branch = e () => (float[N] same) { same = Identity(s) }
          >
        }
        """
    )
    Cleanup()(model)
    path = save_model(model, tmp_path / "if.onnx")
    session = runtime.make_session(path, "disable")
    x = np.array([[0.0], [1.0]], np.float32)
    for wide in (True, False):
        (y,) = session.run(None, {"x": x, "wide": np.array(wide)})
        np.testing.assert_allclose(y.reshape(-1), 1 / (1 + np.exp(-x.reshape(-1))), rtol=1e-6)


def _saved_optimised(name: str, directory: Path) -> Path:
    """Shipped model ``name`` as onnxruntime saves it optimised (FusedGemm, FusedMatMul)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(directory / f"{name}.optimised.onnx")
    ort.InferenceSession(str(model_files(name)["onnx"]), options, providers=["CPUExecutionProvider"])
    return directory / f"{name}.optimised.onnx"


@pytest.mark.parametrize(
    ("name", "fused", "left"),
    [
        # DLRM's interaction transposes a product of unknown rank: that FusedMatMul reads no weight and stays.
        ("dlrm", {"FusedGemm": 5, "FusedMatMul": 1}, ["FusedMatMul"]),
        ("keras_wide_deep", {"FusedGemm": 3}, []),
        ("sasrec", {"FusedMatMul": 2}, []),
    ],
)
def test_onnxruntime_fused_ops_become_standard_ops_with_the_same_outputs(
    tmp_path: Path, name: str, fused: dict[str, int], left: list[str]
) -> None:
    path = _saved_optimised(name, tmp_path)
    model = ir.load(path)
    contrib = [node.op_type for node in model.graph if node.domain == "com.microsoft"]
    assert {op: contrib.count(op) for op in set(contrib)} == fused
    feeds = {key: value[:256] for key, value in np.load(model_files(name)["feeds"]).items()}
    expected = runtime.make_session(path, "disable").run(None, feeds)[0]
    result = Cleanup()(model)
    assert result.stats["contrib_ops_unfused"] == sum(fused.values()) - len(left)
    assert [node.op_type for node in model.graph if node.domain == "com.microsoft"] == left
    got = runtime.make_session(save_model(model, tmp_path / "clean.onnx"), "disable").run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_saved_optimised_dlrm_compresses_like_the_export(tmp_path: Path) -> None:
    files = {**model_files("dlrm"), "onnx": _saved_optimised("dlrm", tmp_path)}
    report = compress_with_preset("dlrm", "int8", tmp_path / "int8.onnx", files=files)
    quant = next(record.stats for record in report.passes if record.name == "quant")
    assert quant["weights_quantized"] == 13
    assert report.parity.passed and report.size_ratio >= 3.9


def test_torchscripts_squeeze_if_one_becomes_a_squeeze_where_the_size_is_known(tmp_path: Path) -> None:
    # dlrm_bag's score: TorchScript could not prove the Gemm's [batch, 1] through its bag Loop.
    path = model_files("dlrm_bag")["onnx"]
    feeds = {key: value[:256] for key, value in np.load(model_files("dlrm_bag")["feeds"]).items()}
    expected = runtime.make_session(path, "disable").run(None, feeds)[0]
    model = ir.load(path)
    assert "If" in op_types(model)
    result = Cleanup()(model)
    assert result.stats["squeeze_ifs_folded"] == 1 and "If" not in op_types(model)
    got = runtime.make_session(save_model(model, tmp_path / "m.onnx"), "disable").run(None, feeds)[0]
    np.testing.assert_array_equal(got, expected)


def test_a_squeeze_if_of_an_unknown_size_stays() -> None:
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,M] x) => (float[N] y) {
          shape = Shape(x)
          one = Constant <value = int64 {1}> ()
          size = Gather <axis = 0> (shape, one)
          is_one = Equal(size, one)
          y = If (is_one) <
            then_branch = t () => (float[N] squeezed) {
              axes = Constant <value = int64[1] {1}> ()
              squeezed = Squeeze(x, axes)
            },
            else_branch = e () => (float[N] same) { same = Identity(x) }
          >
        }
        """
    )
    assert Cleanup()(model).stats["squeeze_ifs_folded"] == 0 and "If" in op_types(model)


@pytest.mark.parametrize("name", ["keras_wide_deep", "sklearn_mlp", "dlrm"])
def test_a_lossless_cleanup_never_writes_value_info_for_initializers(tmp_path: Path, name: str) -> None:
    # tf2onnx and skl2onnx files have none; onnx-ir would write one per initializer with a type.
    import onnx

    source = model_files(name)["onnx"]
    model = ir.load(source)
    Cleanup()(model)
    path = save_model(model, tmp_path / "clean.onnx")
    saved = onnx.load(path, load_external_data=False)
    initializers = {tensor.name for tensor in saved.graph.initializer}
    assert not [info.name for info in saved.graph.value_info if info.name in initializers]
    assert path.stat().st_size <= source.stat().st_size


# dynamo's GRU: PyTorch orders the gates (r, z, n), ONNX (z, r, n), so the recurrent weight is
# three Slices of the parameter, a Concat and an Unsqueeze.
GATE_ORDER = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[4,N,8] x, float[1,48,8] w, float[48,16] hh, int64[1] zero, int64[1] s16, int64[1] s32, int64[1] s48{extra_in}) => (float[1,N,16] last{extra_out}) {{
  r_gate = Slice(hh, zero, s16, zero)
  z_gate = Slice(hh, s16, s32, zero)
  n_gate = Slice(hh, s32, s48, zero)
  reordered = Concat <axis = 0> (z_gate, r_gate, n_gate)
  r = Unsqueeze(reordered, zero)
  y, last = GRU <hidden_size = 16> (x, w, r)
  {extra_body}
}}
"""


def gate_order_model(extra: bool = False) -> ir.Model:
    rng = np.random.default_rng(9)
    text = GATE_ORDER.format(
        extra_in=", int64[N] ids" if extra else "",
        extra_out=", float[N,16] rows" if extra else "",
        extra_body="rows = Gather(hh, ids)" if extra else "",
    )
    constants = {
        "w": rng.standard_normal((1, 48, 8)).astype(np.float32),
        "hh": rng.standard_normal((48, 16)).astype(np.float32),
        **{name: np.array([value], np.int64) for name, value in (("zero", 0), ("s16", 16), ("s32", 32), ("s48", 48))},
    }
    return text_model(text, constants)


def test_a_weight_computed_by_layout_ops_becomes_one_initializer(tmp_path: Path) -> None:
    feeds = {"x": np.random.default_rng(10).standard_normal((4, 3, 8)).astype(np.float32)}
    original = save_model(gate_order_model(), tmp_path / "original.onnx")
    expected = runtime.make_session(original, "disable").run(None, feeds)[0]
    model = gate_order_model()
    result = Cleanup()(model)
    assert result.stats["weight_layouts_folded"] == 1
    gru = next(node for node in model.graph if node.op_type == "GRU")
    assert gru.inputs[2] is not None and gru.inputs[2].is_initializer()
    assert "Slice" not in op_types(model) and "hh" not in model.graph.initializers
    folded = save_model(model, tmp_path / "folded.onnx")
    np.testing.assert_array_equal(runtime.make_session(folded, "disable").run(None, feeds)[0], expected)
    assert folded.stat().st_size <= original.stat().st_size


def test_a_weight_whose_source_is_read_elsewhere_is_not_copied() -> None:
    model = gate_order_model(extra=True)
    assert Cleanup()(model).stats["weight_layouts_folded"] == 0
    assert "Slice" in op_types(model)


@pytest.mark.parametrize("name", ["dlrm", "dlrm_dynamo", "mmoe"])
def test_stacks_become_one_concat_and_column_gathers_a_selection_matmul_on_exported_models(
    name: str, tmp_path: Path
) -> None:
    """torch.stack exports as an Unsqueeze per tensor and a Concat, DLRM's upper triangle as a Gather
    along axis 1: after cleanup neither is left and the scores are bit for bit the original's."""
    files = model_files(name)
    model = ir.load(files["onnx"])
    stats = Cleanup()(model).stats
    assert stats["stacks_concatenated"] == 1
    concats = [node for node in model.graph if node.op_type == "Concat"]
    readers = [value.producer() for node in concats for value in node.inputs]
    assert all(producer is None or producer.op_type != "Unsqueeze" for producer in readers)
    column_gathers = [node for node in model.graph if node.op_type == "Gather" and node.attributes.get_int("axis", 0)]
    assert column_gathers == []
    assert stats["column_gathers_as_matmul"] == (0 if name == "mmoe" else 1)
    for one_hot in (node for node in model.graph if node.op_type == "OneHot"):
        # 28 column numbers of 64: a byte each, cast to the int32 onnxruntime's OneHot reads
        cast = one_hot.inputs[0].producer()
        assert cast.op_type == "Cast" and cast.attributes.get_int("to") == ir.DataType.INT32
        assert cast.inputs[0].const_value.dtype == ir.DataType.UINT8 and cast.inputs[0].const_value.size == 28
    feeds = {key: array[:256] for key, array in np.load(files["feeds"]).items()}
    expected = runtime.make_session(files["onnx"], "disable").run(None, feeds)
    got = runtime.make_session(save_model(model, tmp_path / "clean.onnx"), "all").run(None, feeds)
    for exact, rewritten in zip(expected, got, strict=True):
        np.testing.assert_array_equal(rewritten, exact)


def test_a_stack_merges_with_the_next_axis_and_is_left_where_it_cannot(tmp_path: Path) -> None:
    """Stacked on axis 1 of [N, 3, 4] tensors (axes 1 and -3 alike): a Concat along axis 1 and a
    Reshape to [N, 2, 3, 4]. Stacked on the new last axis there is no axis to merge with, and an
    Unsqueeze another node also reads must stay: both graphs keep their nodes."""
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,4] a, float[N,3,4] b, int64[1] one, int64[1] back, int64[1] last) => (float[N,2,3,4] s, float[N,3,4,2] t, float[N,1,3,4] u) {
          ua = Unsqueeze (a, one)
          ub = Unsqueeze (b, back)
          s = Concat <axis = 1> (ua, ub)
          la = Unsqueeze (a, last)
          lb = Unsqueeze (b, last)
          t = Concat <axis = 3> (la, lb)
          u = Unsqueeze (a, one)
        }
        """
    constants = {"one": np.array([1]), "back": np.array([-3]), "last": np.array([3])}
    rng = np.random.default_rng(0)
    feeds = {key: rng.standard_normal((5, 3, 4)).astype(np.float32) for key in ("a", "b")}
    expected = run_reference(text_model(text, constants), tmp_path, feeds)
    model = text_model(text, constants)
    assert Cleanup()(model).stats["stacks_concatenated"] == 1
    first = next(node for node in model.graph if node.outputs[0].name == "s")
    assert first.op_type == "Reshape" and first.inputs[1].const_value.numpy().tolist() == [0, 2, 3, 4]
    assert op_types(model).count("Unsqueeze") == 3
    for exact, rewritten in zip(expected, run_reference(model, tmp_path, feeds), strict=True):
        np.testing.assert_array_equal(rewritten, exact)

    shared = text.replace("u = Unsqueeze (a, one)", "u = Identity (ua)")
    model = text_model(shared, constants)
    assert Cleanup()(model).stats["stacks_concatenated"] == 0


def test_column_gathers_become_a_selection_matmul_only_where_it_is_exact_and_small(tmp_path: Path) -> None:
    """Negative column numbers and float16 data select exactly; a matrix wider than
    SELECTION_MAX_COLUMNS, integer data and a Gather of rows keep their Gather."""
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,6] x, float16[N,6] h, int64[N,6] k, float[N,300] wide, int64[3] pick, int64[2] rows) => (float[N,3] y, float16[N,3] z, int64[N,3] j, float[N,3] v, float[2,6] r) {
          y = Gather <axis = 1> (x, pick)
          z = Gather <axis = -1> (h, pick)
          j = Gather <axis = 1> (k, pick)
          v = Gather <axis = 1> (wide, pick)
          r = Gather <axis = 0> (x, rows)
        }
        """
    constants = {"pick": np.array([5, -6, 2]), "rows": np.array([1, 0])}
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((4, 6)).astype(np.float32),
        "h": rng.standard_normal((4, 6)).astype(np.float16),
        "k": rng.integers(-9, 9, (4, 6)),
        "wide": rng.standard_normal((4, 300)).astype(np.float32),
    }
    expected = run_reference(text_model(text, constants), tmp_path, feeds)
    model = text_model(text, constants)
    assert Cleanup()(model).stats["column_gathers_as_matmul"] == 2
    assert op_types(model).count("OneHot") == 2 and op_types(model).count("Gather") == 3
    assert "Cast" not in op_types(model)  # three int32 column numbers cost less than a Cast
    got = runtime.make_session(save_model(model, tmp_path / "selected.onnx"), "all").run(None, feeds)
    for exact, rewritten in zip(expected, got, strict=True):
        np.testing.assert_array_equal(rewritten, exact)


@pytest.mark.parametrize(
    ("name", "sums", "shapes"), [("deepfm", 3, 2), ("deepfm_student", 3, 2), ("mmoe", 2, 1), ("two_tower", 1, 1)]
)
def test_middle_axis_sums_become_a_matmul_on_exported_models(name: str, sums: int, shapes: int, tmp_path: Path) -> None:
    """DeepFM's sums over its 7 fields (x16 twice, x1 for the first order), MMoE's over its 3
    experts (x32), two-tower's pooled history of 20 x 16: flattened rows times stacked identities,
    one set per shape, equal to float32 rounding."""
    files = model_files(name)
    model = ir.load(files["onnx"])
    assert Cleanup()(model).stats["sums_as_matmul"] == sums
    assert op_types(model).count("EyeLike") == shapes
    feeds = {key: array[:256] for key, array in np.load(files["feeds"]).items()}
    expected = runtime.make_session(files["onnx"], "disable").run(None, feeds)
    got = runtime.make_session(save_model(model, tmp_path / "clean.onnx"), "all").run(None, feeds)
    for exact, rewritten in zip(expected, got, strict=True):
        np.testing.assert_allclose(rewritten, exact, rtol=1e-5, atol=1e-6)


def test_a_middle_axis_sum_keeps_its_dims_and_larger_or_last_axis_sums_stay(tmp_path: Path) -> None:
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4,8] x, float[N,40,32] big, int64[1] middle, int64[1] back) => (float[N,1,8] kept, float[N,32] wide, float[N,4] last) {
          kept = ReduceSum <keepdims = 1> (x, middle)
          wide = ReduceSum <keepdims = 0> (big, middle)
          last = ReduceSum <keepdims = 0> (x, back)
        }
        """
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((5, 4, 8)).astype(np.float32),
        "big": rng.standard_normal((5, 40, 32)).astype(np.float32),
    }
    constants = {"middle": np.array([1]), "back": np.array([-1])}
    expected = run_reference(text_model(text, constants), tmp_path, feeds)
    model = text_model(text, constants)
    assert Cleanup()(model).stats["sums_as_matmul"] == 1
    assert op_types(model).count("ReduceSum") == 2 and op_types(model).count("MatMul") == 1
    for exact, rewritten in zip(expected, run_reference(model, tmp_path, feeds), strict=True):
        assert rewritten.shape == exact.shape
        np.testing.assert_allclose(rewritten, exact, rtol=1e-5, atol=1e-6)


def test_nodes_computing_the_same_thing_are_computed_once(tmp_path: Path) -> None:
    """Two Relu of one input, and two Transpose of them alike, become one of each; a random op stays
    as many as there are (each draws its own numbers)."""
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x) => (float[4,N] y, float[N,4] r, float[N,4] s) {
          a = Relu(x)
          b = Relu(x)
          ta = Transpose <perm = [1, 0]> (a)
          tb = Transpose <perm = [1, 0]> (b)
          y = Add(ta, tb)
          r = RandomNormalLike(x)
          s = RandomNormalLike(x)
        }
        """
    model = text_model(text)
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}
    (expected, *_) = run_reference(text_model(text), tmp_path, feeds)
    stats = Cleanup()(model).stats
    assert stats["common_subexpressions"] == 2
    assert sorted(op_types(model)) == ["Add", "RandomNormalLike", "RandomNormalLike", "Relu", "Transpose"]
    np.testing.assert_array_equal(run_reference(model, tmp_path, feeds)[0], expected)

    model = text_model(text)
    assert Cleanup(Cleanup.Config(common_subexpressions=False))(model).stats["common_subexpressions"] == 0
    assert op_types(model).count("Relu") == 2


def test_a_lifted_constant_merges_with_an_equal_initializer() -> None:
    """A Constant node lifted to an initializer (lift_constants) that equals one already there (the
    axes [-1] of a ReduceSum and a Reshape target [-1]) is stored once."""
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3] x, int64[1] flat) => (float[N] y, float[M] z) {
          axes = Constant <value = int64[1] {-1}> ()
          y = ReduceSum <keepdims = 0> (x, axes)
          z = Reshape(x, flat)
        }
        """,
        {"flat": np.array([-1], np.int64)},
    )
    Cleanup(Cleanup.Config(lift_constants=True))(model)
    assert len(model.graph.initializers) == 1
    reduce, reshape = (next(node for node in model.graph if node.op_type == op) for op in ("ReduceSum", "Reshape"))
    assert reduce.inputs[1] is reshape.inputs[1]


@pytest.mark.parametrize(
    ("first", "second", "merged"),
    [([1], [2], [1, 2]), ([0], [0], [0, 1]), ([2], [0], [0, 3]), ([1], [1, 3], [1, 2, 3])],
)
def test_an_unsqueeze_of_an_unsqueeze_is_one(
    tmp_path: Path, first: list[int], second: list[int], merged: list[int]
) -> None:
    """mask[:, None, None, :] exported as two Unsqueezes: one Unsqueeze of both places, same output."""

    def model() -> ir.Model:
        return text_model(
            """
            <ir_version: 8, opset_import: ["" : 17]>
            g (float[N,3] x, int64[F] first, int64[S] second) => (float y) {
              middle = Unsqueeze(x, first)
              y = Unsqueeze(middle, second)
            }
            """,
            {"first": np.array(first, np.int64), "second": np.array(second, np.int64)},
        )

    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    before = run_reference(model(), tmp_path, feeds)[0]
    merged_model = model()
    assert Cleanup()(merged_model).stats["unsqueezes_merged"] == 1
    (unsqueeze,) = [node for node in merged_model.graph if node.op_type == "Unsqueeze"]
    assert list(constant_array(unsqueeze.inputs[1])) == merged  # type: ignore[arg-type]
    after = run_reference(merged_model, tmp_path, feeds)[0]
    assert after.shape == before.shape
    np.testing.assert_array_equal(after, before)


EXPAND_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x, float[N,1] n) => (float[N,4] y) {
  shape = Shape(x)
  wide = Expand(n, shape)
  y = Div(x, wide)
}
"""


def test_an_expand_its_reader_broadcasts_anyway_is_bypassed(tmp_path: Path) -> None:
    """F.normalize's x / clamp_min(norm).expand_as(x): the Div broadcasts [N, 1] itself."""
    feeds = {"x": np.arange(8, dtype=np.float32).reshape(2, 4), "n": np.array([[2.0], [4.0]], np.float32)}
    before = run_reference(text_model(EXPAND_TEXT), tmp_path, feeds)[0]
    model = text_model(EXPAND_TEXT)
    assert Cleanup()(model).stats["expands_bypassed"] == 1
    assert op_types(model) == ["Div"]
    after = run_reference(model, tmp_path, feeds)[0]
    np.testing.assert_array_equal(after, before)


def test_an_expand_that_widens_the_result_stays() -> None:
    """x [N, 1] times an Expand to [N, 4]: without it the product would stay [N, 1]."""
    model = text_model(
        EXPAND_TEXT.replace("y = Div(x, wide)", "y = Mul(n, wide)").replace("float[N,1] n)", "float[N,1] n)")
    )
    assert Cleanup()(model).stats["expands_bypassed"] == 0
    assert "Expand" in op_types(model)


ROWS_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,5,4] x, float[4,6] w1, float[6] b1, float[6,3] w2, float[1,3] b2) => (float[N,5,3] y) {
  h = MatMul(x, w1)
  hb = Add(h, b1)
  r = Relu(hb)
  o = MatMul(r, w2)
  y = Add(b2, o)
}
"""


def _rows_weights(rows_text: str) -> ir.Model:
    rng = np.random.default_rng(11)
    arrays = {"w1": (4, 6), "b1": (6,), "w2": (6, 3), "b2": (1, 3)}
    return text_model(rows_text, {name: rng.normal(size=shape).astype(np.float32) for name, shape in arrays.items()})


def test_layers_over_several_rows_run_as_gemms(tmp_path: Path) -> None:
    """Two layers with a ReLU between over [N, 5, 4] rows: one Flatten, two Gemms reading flat rows
    (the ReLU reads the first Gemm directly), one Reshape back to [N, 5, 3]; equal outputs."""
    feeds = {"x": np.random.default_rng(12).normal(size=(3, 5, 4)).astype(np.float32)}
    before = run_reference(_rows_weights(ROWS_TEXT), tmp_path, feeds)[0]
    model = _rows_weights(ROWS_TEXT)
    assert linear_rows_as_gemm(model) == 2
    assert op_types(model) == ["Flatten", "Gemm", "Relu", "Gemm", "Reshape"]
    (reshape,) = [node for node in model.graph if node.op_type == "Reshape"]
    assert list(constant_array(reshape.inputs[1])) == [-1, 5, 3]  # type: ignore[arg-type]
    after = run_reference(model, tmp_path, feeds)[0]
    assert after.shape == (3, 5, 3)
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("rows_text", "why"),
    [
        (ROWS_TEXT.replace("float[N,5,4] x", "float[N,1,4] x").replace("[N,5,3]", "[N,1,3]"), "one row an example"),
        (ROWS_TEXT.replace("float[N,5,4] x", "float[N,M,4] x").replace("[N,5,3]", "[N,M,3]"), "two varying axes"),
        (
            ROWS_TEXT.replace("hb = Add(h, b1)", "hb = Add(h, x2)").replace(
                "float[N,5,4] x,", "float[N,5,4] x, float[6] x2,"
            ),
            "a bias the caller feeds",
        ),
    ],
)
def test_layers_that_gain_nothing_or_cannot_be_flattened_stay(rows_text: str, why: str) -> None:
    model = _rows_weights(rows_text)
    expected = 1 if why == "a bias the caller feeds" else 0  # the second layer is still fixed at load
    assert linear_rows_as_gemm(model) == expected, why
    assert op_types(model).count("MatMul") == 2 - expected


@pytest.mark.parametrize(("name", "layers"), [("sasrec", 5), ("sasrec_encoder", 4), ("sasrec_encoder_dynamo", 4)])
def test_sasrec_projections_run_as_gemms_in_the_lossless_preset(tmp_path: Path, name: str, layers: int) -> None:
    """The lossless preset's cleanup: every layer over the twenty positions (the first block's Q/K/V,
    output and feed-forward projections; the second block's keys and values) is a Gemm, no batched
    MatMul is followed by a bias Add, and the scores are the same on the shipped rows. The
    cleanup pass alone leaves them (its default)."""
    report = compress_with_preset(name, "lossless", tmp_path / "out.onnx")
    assert report.passes[0].stats["row_layers_as_gemm"] == layers
    assert report.verdict == "passed"
    assert all(output.max_abs < 1e-5 for output in report.parity.outputs)
    model = ir.load(tmp_path / "out.onnx")
    shapes = concrete_shapes(model)
    for node in model.graph:
        if node.op_type == "MatMul" and {reader.op_type for reader, _ in node.outputs[0].uses()} == {"Add"}:
            dims = shapes[node.inputs[0]]  # type: ignore[index]
            assert dims is not None and (len(dims) != 3 or dims[1] == 1), node.name
    assert linear_rows_as_gemm(model) == 0
    files = model_files(name)
    plain = compress(files["onnx"], tmp_path / "plain.onnx", ["cleanup"], feeds=files["feeds"])
    assert plain.passes[0].stats["row_layers_as_gemm"] == 0


def test_an_affine_folded_into_the_last_layer_keeps_the_output_s_type(tmp_path: Path) -> None:
    """Gemm -> Mul -> Add as the graph's output: the fold left the output without its element type,
    which onnxruntime ran and the ONNX checker refuses."""
    rng = np.random.default_rng(2)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x, float[3,4] w, float[3] b, float[3] m, float[3] a) => (float[N,3] out) {
          h = Gemm <transB = 1> (x, w, b)
          s = Mul(h, m)
          out = Add(s, a)
        }
        """
    constants = {
        name: rng.standard_normal(shape).astype(np.float32)
        for name, shape in {"w": (3, 4), "b": (3,), "m": (3,), "a": (3,)}.items()
    }
    model = text_model(text, constants)
    Cleanup()(model)
    assert [node.op_type for node in model.graph] == ["Gemm"]
    output = model.graph.outputs[0]
    assert output.name == "out" and output.dtype == ir.DataType.FLOAT
    path = save_model(model, tmp_path / "folded.onnx")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def test_counts_add_up_from_the_input_to_the_output() -> None:
    """Initializers before - removed + added = after, and the nodes a rewrite adds are listed beside
    those it removes (DeepFM's field sums become MatMuls: ``removed_by_op`` alone showed 8 nodes
    gone from a graph that grew by 3; a final cleanup reported ``initializers_removed=-1``)."""
    model = ir.load(model_files("deepfm")["onnx"])
    initializers, ops = len(model.graph.initializers), {}
    for node in model.graph:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    stats = Cleanup(Cleanup.Config(sums_as_matmul=True, lift_constants=True))(model).stats
    after: dict[str, int] = {}
    for node in model.graph:
        after[node.op_type] = after.get(node.op_type, 0) + 1
    assert initializers - stats["initializers_removed"] + stats["initializers_added"] == len(model.graph.initializers)
    assert stats["initializers_removed"] >= 0
    assert stats["added_by_op"]["MatMul"] > 0 and stats["removed_by_op"]["ReduceSum"] > 0
    changes = {op: after.get(op, 0) - ops.get(op, 0) for op in {*ops, *after}}
    assert {op: -change for op, change in changes.items() if change < 0} == stats["removed_by_op"]
    assert {op: change for op, change in changes.items() if change > 0} == stats["added_by_op"]
    assert stats["nodes_added"] - stats["nodes_removed"] == sum(after.values()) - sum(ops.values())
