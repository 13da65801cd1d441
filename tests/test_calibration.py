from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS, mlp_model, text_model

from onnxcompress import io
from onnxcompress.calibration import (
    Calibration,
    Feeds,
    graph_inputs,
    id_ranges,
    load_feeds,
    load_labels,
    synthesize_feeds,
)
from onnxcompress.errors import UsageError


def tables(*rows: int) -> dict[str, np.ndarray]:
    return {f"t{k}": np.zeros((count, 4), np.float32) for k, count in enumerate(rows)}


def test_ids_reaching_a_gather_through_cast_and_reshape_use_the_table_rows() -> None:
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int32[N,1] ids, float[50,4] t0) => (float[N,4] y) {
          c = Cast <to = 7> (ids)
          shape = Constant <value = int64[1] {-1}> ()
          r = Reshape(c, shape)
          y = Gather(t0, r)
        }
        """,
        tables(50),
    )
    low, high = id_ranges(model)["ids"]
    assert (float(low), float(high)) == (0.0, 50.0)


def test_offsets_added_per_column_give_each_column_its_range() -> None:
    offsets = "int64[3] {0, 10, 30}"
    model = text_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N,3] ids, float[40,4] t0) => (float[N,3,4] y) {{
          off = Constant <value = {offsets}> ()
          shifted = Add(ids, off)
          y = Gather(t0, shifted)
        }}
        """,
        tables(40),
    )
    low, high = id_ranges(model)["ids"]
    assert low.tolist() == [0, 0, 0]
    assert high.tolist() == [40, 30, 10]
    feeds = synthesize_feeds(model, rows=2000)
    ids = feeds.arrays["ids"]
    assert ids.shape == (2000, 3) and ids.dtype == np.int64
    assert (ids.max(axis=0) < np.array([40, 30, 10])).all() and ids.min() >= 0
    assert ids[:, 0].max() > 30  # the first column really uses its wider range


def test_column_selection_and_shared_input_take_the_tightest_range() -> None:
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N,2] ids, float[100,4] t0, float[7,4] t1, float[20,4] t2) => (float[N,4] a, float[N,4] b, float[N,2,4] c) {
          k0 = Constant <value = int64 {0}> ()
          k1 = Constant <value = int64 {1}> ()
          col0 = Gather <axis = 1> (ids, k0)
          col1 = Gather <axis = 1> (ids, k1)
          a = Gather(t0, col0)
          b = Gather(t1, col1)
          c = Gather(t2, ids)
        }
        """,
        tables(100, 7, 20),
    )
    _, high = id_ranges(model)["ids"]
    assert high.tolist() == [20, 7]


def test_integer_inputs_without_a_table_and_float_inputs() -> None:
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N] k, float[N,3] x) => (float[N,3] y) {
          kf = Cast <to = 1> (k)
          u = Unsqueeze(kf, axes)
          y = Add(x, u)
        }
        """.replace("Unsqueeze(kf, axes)", "Unsqueeze(kf, one)").replace(
            "kf = Cast", "one = Constant <value = int64[1] {1}> ()\n          kf = Cast"
        )
    )
    feeds = synthesize_feeds(model, {"x": [7, 3], "k": [7]})
    assert feeds.arrays["x"].shape == (7, 3) and feeds.arrays["x"].dtype == np.float32
    assert feeds.arrays["k"].max() < 10
    assert any("no table reached" in note for note in feeds.notes)
    again = synthesize_feeds(model, {"x": [7, 3], "k": [7]})
    np.testing.assert_array_equal(feeds.arrays["x"], again.arrays["x"])  # fixed seed


def test_wide_tables_are_sampled_in_windows_across_the_whole_range() -> None:
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N] ids, float[1000000,1] t0) => (float[N,1] y) {
          y = Gather(t0, ids)
        }
        """,
        {"t0": np.zeros((1_000_000, 1), np.float32)},
    )
    ids = synthesize_feeds(model, rows=4096).arrays["ids"]
    assert ids.min() < 1000 and ids.max() >= 999_000  # both ends of the table are reached
    assert len(np.unique(ids // 64)) <= 64  # but only a few regions are touched


def test_input_shape_override_errors() -> None:
    model = mlp_model()
    with pytest.raises(UsageError, match="--input-shape names nope"):
        synthesize_feeds(model, {"nope": [1]})
    with pytest.raises(UsageError, match="gives 1 dimensions but the model expects x: float32"):
        synthesize_feeds(model, {"x": [4]})


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y": np.zeros((2, 8), np.float32)}, "missing x; unknown y; the model expects x: float32"),
        ({"x": np.zeros((2, 8), np.float64)}, "x is float64 but the model expects x: float32"),
        ({"x": np.zeros((2, 8, 1), np.float32)}, "x has rank 3"),
        ({"x": np.zeros((2, 9), np.float32)}, "x has 9 in dimension 1"),
    ],
)
def test_bad_feeds_name_the_expected_signature(tmp_path: Path, arrays: dict, message: str) -> None:
    path = write_npz(tmp_path / "f.npz", **arrays)
    with pytest.raises(UsageError, match=message.replace("[", r"\[")):
        load_feeds(path, mlp_model())


def test_feeds_file_problems(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        load_feeds(tmp_path / "none.npz", mlp_model())
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UsageError, match=r"not a readable \.npz"):
        load_feeds(bad, mlp_model())
    with pytest.raises(UsageError, match=r"is a directory; give an \.npz"):  # said "no such file"
        load_feeds(tmp_path, mlp_model())
    with pytest.raises(UsageError, match=r"is a directory; give a \.npy"):
        load_labels(tmp_path, 3)
    with pytest.raises(UsageError, match=r"not a \.npy file; save the labels with numpy\.save"):
        load_labels(bad, 3)  # numpy's own message suggested loading it with pickle allowed


def test_string_inputs_take_numpy_strings_from_the_npz(tmp_path: Path) -> None:
    """An .npz stores str ids as numpy strings ('<U5'); the graph's string input takes str objects."""
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (string[N] item) => (string[N] same) {
          same = Identity(item)
        }
        """
    )
    np.savez(tmp_path / "ids.npz", item=np.array(["a12", "b7", "c"]))
    feeds = load_feeds(tmp_path / "ids.npz", model)
    assert feeds.arrays["item"].dtype == object and feeds.arrays["item"].tolist() == ["a12", "b7", "c"]


def test_labels_must_align_and_be_binary(tmp_path: Path) -> None:
    path = tmp_path / "l.npy"
    np.save(path, np.array([0, 1, 1]))
    assert load_labels(path, 3).tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(UsageError, match="has 3 labels but the feeds have 4 rows"):
        load_labels(path, 4)
    np.save(path, np.array([0, 2, 1]))
    with pytest.raises(UsageError, match="labels must be 0 or 1"):
        load_labels(path, 3)


def test_activation_capture_exposes_intermediates_in_batches_and_restores_outputs() -> None:
    model = io.load(MODELS / "dlrm.onnx")
    feeds = load_feeds(MODELS / "dlrm.feeds.npz", model).head(1000)
    relu = next(node for node in model.graph if node.op_type == "Relu")
    calibration = Calibration(feeds, batch_size=300)
    batches = list(calibration.iter_capture(model, [relu.outputs[0], model.graph.outputs[0]]))
    assert [len(batch[model.graph.outputs[0].name]) for batch in batches] == [300, 300, 300, 100]
    captured = calibration.capture(model, [relu.outputs[0]])
    assert captured[relu.outputs[0].name].shape[0] == 1000
    assert (captured[relu.outputs[0].name] >= 0).all()
    assert [value.name for value in model.graph.outputs] == ["score"]


def test_capture_joins_batches_of_a_value_whose_batch_axis_is_not_the_first() -> None:
    """PyTorch's attention, exported by TorchScript, works on [steps, batch * heads, dim]: its
    batches join along the axis that grows with the batch (the max preset's distillation failed
    on every nn.TransformerEncoderLayer export with numpy's concatenate error)."""
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,4] x) => (float[N,3,4] y) {
          steps_first = Transpose <perm = [1, 0, 2]> (x)
          y = Transpose <perm = [1, 0, 2]> (steps_first)
        }
        """
    )
    x = np.random.default_rng(0).standard_normal((10, 3, 4)).astype(np.float32)
    steps_first = next(iter(model.graph)).outputs[0]
    captured = Calibration(Feeds({"x": x}, "test"), batch_size=4).capture(model, [steps_first])
    np.testing.assert_array_equal(captured[steps_first.name], x.transpose(1, 0, 2))


def test_feeds_for_a_model_that_stores_no_weights_name_the_export_fix(tmp_path: Path) -> None:
    """torch.onnx.export(..., export_params=False) makes every parameter a graph input: the feeds'
    "missing mlp.0.weight, ..." then means the export, not the feeds, is wrong."""
    from onnxcompress.passes.quantize import Quantize

    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x, float[4,2] w) => (float[N,2] y) {
          y = MatMul(x, w)
        }
        """
    path = tmp_path / "x.npz"
    np.savez(path, x=np.zeros((3, 4), np.float32))
    with pytest.raises(UsageError, match=r"missing w; the model stores no weights.*export_params=True"):
        load_feeds(path, text_model(text))
    stats = Quantize()(text_model(text)).stats
    assert "export_params=True" in stats["nothing_to_quantize"]
    with_weights = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x, float[4,2] w, float[2] b) => (float[N,2] y) {
          h = MatMul(x, w)
          y = Add(h, b)
        }
        """
    with pytest.raises(UsageError, match="missing w; the model expects"):  # b is stored: w is a real input
        load_feeds(path, text_model(with_weights, {"b": np.ones(2, np.float32)}))


def test_graph_inputs_skip_initializers_that_are_also_inputs() -> None:
    model = mlp_model()
    w1 = model.graph.initializers["w1"]
    model.graph.inputs.append(w1)
    assert [spec.name for spec in graph_inputs(model)] == ["x"]
    assert Feeds({"x": np.zeros((3, 8))}, "test").rows == 3


@pytest.mark.parametrize("preset", ["int8", "int4"])
def test_ids_are_traced_through_tables_decoded_at_load(tmp_path: Path, preset: str) -> None:
    from onnxcompress import compress
    from onnxcompress.presets import get_preset

    recipe = get_preset(preset)
    first = tmp_path / "q.onnx"
    compress(MODELS / "dlrm.onnx", first, list(recipe.passes), options=recipe.options)
    ranges = id_ranges(io.load(first))
    assert float(ranges["user"][1]) == 943 and float(ranges["item"][1]) == 1682
    again = compress(first, tmp_path / "again.onnx", ["cleanup"])  # synthesized feeds must be valid ids
    assert again.parity.passed


def test_inputs_with_different_row_counts_are_named_with_the_export_fix(tmp_path: Path) -> None:
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,2] dense, int64[M] ids) => (float[N,2] y) { y = Identity(dense) }
        """
    )
    path = write_npz(tmp_path / "f.npz", dense=np.zeros((4, 2), np.float32), ids=np.zeros(12, np.int64))
    with pytest.raises(UsageError, match=r"different numbers of rows \(dense 4, ids 12\).*\[batch, length\]"):
        load_feeds(path, model)


def test_lookup_hessians_measure_how_outputs_move_with_a_looked_up_row() -> None:
    """Scores linear in the looked-up rows: for ``y = e @ W`` the gradient of output ``o`` is
    ``W[:, o]`` for every row, so ``H = W W^T``; for a history of three positions read by
    ``q = flatten(h) @ V``, each position's row has its own gradient ``V_p``, so ``H = sum_p V_p V_p^T``
    (not the gradient of all positions moved at once). Differences are exact up to rounding for
    linear scores. A table also read as a MatMul weight, or whose
    runs exceed the budget, is left out; the model is unchanged."""
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((4, 2)).astype(np.float32)
    history = rng.standard_normal((12, 1)).astype(np.float32)
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N] ids, int64[N,3] seen, float[10,4] t, float[8,4] h, float[6,4] u, float[4,2] w, float[12,1] v,
           int64[2] flat) => (float[N,2] y, float[N,1] q, float[N,6] z) {
          e = Gather(t, ids)
          y = MatMul(e, w)
          r = Gather(h, seen)
          rf = Reshape(r, flat)
          q = MatMul(rf, v)
          f = Gather(u, ids)
          u_t = Transpose(u)
          z = MatMul(f, u_t)
        }
        """,
        {
            "t": rng.standard_normal((10, 4)).astype(np.float32),
            "h": rng.standard_normal((8, 4)).astype(np.float32),
            "u": rng.standard_normal((6, 4)).astype(np.float32),
            "w": weight,
            "v": history,
            "flat": np.array([-1, 12]),
        },
    )
    before = [node.op_type for node in model.graph]
    feeds = Feeds({"ids": rng.integers(0, 6, 64), "seen": rng.integers(0, 8, (64, 3))}, "rows")
    calibration = Calibration(feeds)
    hessians = calibration.lookup_hessians(model, ["t", "h", "u"], budget=1e12)
    assert set(hessians) == {"t", "h"}
    np.testing.assert_allclose(hessians["t"], weight.astype(np.float64) @ weight.T, rtol=1e-3, atol=1e-4)
    parts = history.astype(np.float64).reshape(3, 4)
    np.testing.assert_allclose(hessians["h"], parts.T @ parts, rtol=1e-3, atol=1e-4)
    # t first (the larger table), then the history's runs (five over three copies of the rows) do
    # not fit: the budget counts rows run times the model's bytes
    model_bytes = sum(value.const_value.nbytes for value in model.graph.initializers.values())
    budget = (5 * 64 + 5 * 64 * 3) * model_bytes - 1
    assert set(calibration.lookup_hessians(model, ["t", "h"], budget=budget)) == {"t"}
    assert [node.op_type for node in model.graph] == before and len(model.graph.inputs) == 2


def test_an_input_shape_fixes_the_dimensions_other_inputs_share() -> None:
    """DLRM's eight inputs share the symbolic dim ``batch``: ``--input-shape dense=3,25`` gave
    dense 3 rows and the ids 512, and onnxruntime's Concat failed (exit 3, blaming the model)."""
    model = io.load(MODELS / "dlrm.onnx")
    feeds = synthesize_feeds(model, {"dense": [3, 25]})
    assert {name: array.shape[0] for name, array in feeds.arrays.items()} == dict.fromkeys(feeds.arrays, 3)
    with pytest.raises(UsageError, match="'batch', which several inputs share, both 40 and 41"):
        synthesize_feeds(model, {"dense": [40, 25], "user": [41]})
