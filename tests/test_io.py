from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import files_in, mlp_model, model_files, save_model, text_model

from onnxcompress import io, runtime
from onnxcompress.errors import InputModelError, OutputPathError

TABLE_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (int64[N] i, float[256,16] table) => (float[N,16] y) {
  y = Gather(table, i)
}
"""


def table_model() -> ir.Model:
    table = np.random.default_rng(0).standard_normal((256, 16)).astype(np.float32)
    return text_model(TABLE_TEXT, {"table": table})


def external_model(folder: Path) -> Path:
    return save_model(table_model(), folder / "table.onnx", external=True)


def test_stage_and_commit_write_external_data_named_after_out(tmp_path: Path) -> None:
    source = external_model(tmp_path / "in")
    model = io.load(source)
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    staged = io.stage(model, out)
    assert files_in(out.parent) == [staged.staging_dir.name]
    staged.commit()
    assert files_in(out.parent) == ["small.onnx", "small.onnx.data"]
    written = onnx.load(str(out), load_external_data=False)
    locations = {entry.value for tensor in written.graph.initializer for entry in tensor.external_data}
    assert "small.onnx.data" in locations
    np.testing.assert_array_equal(
        io.load(out).graph.initializers["table"].const_value.numpy(),
        io.load(source).graph.initializers["table"].const_value.numpy(),
    )


def test_resaving_the_same_out_does_not_grow_the_data_file(tmp_path: Path) -> None:
    model = io.load(external_model(tmp_path / "in"))
    out = tmp_path / "out.onnx"
    io.stage(model, out).commit()
    size = io.data_file_for(out).stat().st_size
    io.stage(model, out).commit()
    assert io.data_file_for(out).stat().st_size == size
    assert files_in(tmp_path) == ["in", "out.onnx", "out.onnx.data"]


def test_auto_keeps_small_single_file_models_single_and_removes_stale_data(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    io.stage(io.load(external_model(tmp_path / "in")), out).commit()
    assert io.data_file_for(out).exists()
    io.stage(table_model(), out).commit()  # in-memory tensors, small: one file
    assert files_in(tmp_path) == ["in", "out.onnx"]
    io.stage(table_model(), out, external_data="always").commit()
    assert io.data_file_for(out).exists()


def test_never_embeds_external_tensors_instead_of_pointing_at_the_input(tmp_path: Path) -> None:
    model = io.load(external_model(tmp_path / "in"))
    out = tmp_path / "out.onnx"
    io.stage(model, out, external_data="never").commit()
    written = onnx.load(str(out), load_external_data=False)
    assert all(not tensor.external_data for tensor in written.graph.initializer)


def test_a_failing_save_leaves_no_partial_file_and_keeps_the_previous_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")

    def broken_save(model: ir.Model, path: str | os.PathLike, **kwargs: object) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.ir, "save", broken_save)
    with pytest.raises(OutputPathError, match="writing failed: No space left on device"):
        io.stage(table_model(), out)
    assert files_in(tmp_path) == ["out.onnx"]
    assert out.read_bytes() == b"previous"


def test_out_equal_to_in_or_its_data_is_refused(tmp_path: Path) -> None:
    source = external_model(tmp_path)
    data_files = io.external_data_files(io.load(source))
    with pytest.raises(OutputPathError, match="OUT is the input model"):
        io.check_output_path(source, tmp_path / "." / "table.onnx", data_files)
    with pytest.raises(OutputPathError, match=r"overwrite the input's external data table\.onnx\.data"):
        io.check_output_path(source, tmp_path / "table.onnx.data", data_files)
    with pytest.raises(OutputPathError, match="is a directory"):
        io.check_output_path(source, tmp_path, data_files)
    with pytest.raises(OutputPathError, match="does not exist; create it first"):
        io.check_output_path(source, tmp_path / "missing" / "o.onnx", data_files)


def rewrite_location(model_path: Path, location: str) -> None:
    proto = onnx.load(str(model_path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(model_path))


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("../escape.data", "points outside the model's folder"),
        ("/etc/passwd", "points to the absolute path"),
        ("missing.data", "is missing; copy it next to the model"),
    ],
)
def test_hostile_or_missing_external_data_is_refused(tmp_path: Path, location: str, message: str) -> None:
    source = external_model(tmp_path / "in")
    (tmp_path / "escape.data").write_bytes(b"\0" * 100_000)
    rewrite_location(source, location)
    with pytest.raises(InputModelError, match=message):
        io.load(source)


def test_symlinked_data_leaving_the_folder_is_refused(tmp_path: Path) -> None:
    source = external_model(tmp_path / "in")
    outside = tmp_path / "outside.data"
    (tmp_path / "in" / "table.onnx.data").rename(outside)
    (tmp_path / "in" / "table.onnx.data").symlink_to(outside)
    with pytest.raises(InputModelError, match="is a link that leaves the model's folder"):
        io.load(source)


def test_short_data_file_is_reported(tmp_path: Path) -> None:
    source = external_model(tmp_path / "in")
    data = tmp_path / "in" / "table.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(InputModelError, match="has 1000 bytes but tensor 'table' needs"):
        io.load(source)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty"),
        (b"hello, this is not a model", "not a readable ONNX model"),
    ],
)
def test_unreadable_inputs(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    with pytest.raises(InputModelError, match=message):
        io.load(path)


def test_input_file_is_never_modified(tmp_path: Path) -> None:
    source = external_model(tmp_path / "in")
    data = tmp_path / "in" / "table.onnx.data"
    before = (source.read_bytes(), data.read_bytes(), source.stat().st_mtime_ns, data.stat().st_mtime_ns)
    io.stage(io.load(source), tmp_path / "o.onnx").commit()
    assert before == (source.read_bytes(), data.read_bytes(), source.stat().st_mtime_ns, data.stat().st_mtime_ns)


def test_initializer_bytes_reads_no_data(tmp_path: Path) -> None:
    model = io.load(external_model(tmp_path / "in"))
    assert io.initializer_bytes(model) == 256 * 16 * 4
    assert mlp_model().graph.initializers["w1"].const_value.nbytes == 16 * 8 * 4


def zipmap_sklearn(folder: Path) -> Path:
    """The shipped scikit-learn MLP as skl2onnx exports a classifier by default: its probabilities
    turned into one ``{class: probability}`` map per row by ZipMap (a sequence-of-maps output)."""
    proto = onnx.load(str(model_files("sklearn_mlp")["onnx"]))
    graph = proto.graph
    position = next(index for index, output in enumerate(graph.output) if output.name == "probabilities")
    graph.output.remove(graph.output[position])
    graph.node.append(
        onnx.helper.make_node(
            "ZipMap", ["probabilities"], ["output_probability"], domain="ai.onnx.ml", classlabels_int64s=[0, 1]
        )
    )
    seq_of_maps = onnx.helper.make_sequence_type_proto(
        onnx.helper.make_map_type_proto(onnx.TensorProto.INT64, onnx.helper.make_tensor_type_proto(1, None))
    )
    graph.output.insert(position, onnx.helper.make_value_info("output_probability", seq_of_maps))
    path = folder / "zipmap.onnx"
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))
    return path


@pytest.mark.parametrize("external", ["never", "always"])
def test_a_zipmap_output_is_compressed_through_and_comes_back_as_a_map(cli, tmp_path: Path, external: str) -> None:
    """onnx-ir has no map type: the ZipMap is taken off at load (the passes see the probabilities)
    and put back at save; parity compares the maps as [rows, classes]."""
    source = zipmap_sklearn(tmp_path)
    out = tmp_path / "out.onnx"
    feeds = model_files("sklearn_mlp")["feeds"]
    result = cli(source, out, "--preset", "int8", "--feeds", feeds, "--external-data", external)
    assert result.code == 0, result.err
    outputs = {output["name"]: output for output in result.report["parity"]["outputs"]}
    assert set(outputs) == {"label", "output_probability"}
    assert outputs["output_probability"]["cosine"] > 0.9999 and outputs["label"]["passed"]
    assert result.report["size_ratio"] > 3.9
    onnx.checker.check_model(str(out))
    written = onnx.load(str(out), load_external_data=False)
    assert [output.name for output in written.graph.output] == ["label", "output_probability"]
    assert written.graph.output[1].type.WhichOneof("value") == "sequence_type"
    assert written.graph.node[-1].op_type == "ZipMap"
    rows = {name: array[:3] for name, array in np.load(feeds).items()}
    (label, maps), (label_before, maps_before) = (
        runtime.make_session(path, "all").run(None, rows) for path in (out, source)
    )
    np.testing.assert_array_equal(label, label_before)
    assert [sorted(row) for row in maps] == [[0, 1]] * 3
    np.testing.assert_allclose([row[1] for row in maps], [row[1] for row in maps_before], atol=0.01)


def test_a_map_input_is_refused_naming_the_export_option(tmp_path: Path) -> None:
    value_map = onnx.helper.make_map_type_proto(onnx.TensorProto.STRING, onnx.helper.make_tensor_type_proto(1, None))
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("DictVectorizer", ["x"], ["y"], domain="ai.onnx.ml", string_vocabulary=["a", "b"])],
        "g",
        [onnx.helper.make_value_info("x", value_map)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 2])],
    )
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("ai.onnx.ml", 1)]
    )
    path = tmp_path / "dict.onnx"
    onnx.save(model, str(path))
    with pytest.raises(InputModelError, match=r"graph input 'x' is a map.*zipmap"):
        io.load(path)


def test_always_with_only_small_tensors_writes_no_empty_data_file(tmp_path: Path) -> None:
    """Every tensor of the MLP is under the 1 KiB threshold: none goes out, and an empty OUT.data
    that OUT does not reference once appeared beside it (replacing the previous OUT's own data)."""
    out = tmp_path / "out.onnx"
    io.stage(mlp_model(), out, external_data="always").commit()
    assert files_in(tmp_path) == ["out.onnx"]
    io.stage(io.load(external_model(tmp_path / "in")), out).commit()
    io.check_output_path(tmp_path / "in" / "table.onnx", out, set())  # OUT references OUT.data: its own
    io.stage(mlp_model(), out, external_data="always").commit()
    assert files_in(tmp_path) == ["in", "out.onnx"]
    io.load(out)


def other_model_with_data_named_like(folder: Path, out_name: str) -> tuple[Path, bytes]:
    """``other.onnx`` whose external data is ``OUT.data`` for OUT = ``folder/out_name``, which does not exist."""
    other = external_model(folder)
    (folder / "table.onnx.data").rename(folder / f"{out_name}.data")
    rewrite_location(other, f"{out_name}.data")
    other = other.rename(folder / "other.onnx")
    return other, (folder / f"{out_name}.data").read_bytes()


def test_an_out_data_file_that_out_does_not_reference_is_refused_and_kept(tmp_path: Path) -> None:
    """Another model's data named like OUT's: saving OUT replaced it (OUT with external data) or
    deleted it as stale (a single-file OUT), breaking that model."""
    other, data = other_model_with_data_named_like(tmp_path, "out.onnx")
    out = tmp_path / "out.onnx"
    with pytest.raises(OutputPathError, match=r"out\.onnx\.data already exists and is not OUT's own external data"):
        io.check_output_path(tmp_path / "in" / "m.onnx", out, set())
    io.stage(mlp_model(), out).commit()  # a single-file OUT leaves the data alone
    with pytest.raises(OutputPathError, match="is not OUT's own external data"):
        io.stage(table_model(), out, external_data="always")
    assert (tmp_path / "out.onnx.data").read_bytes() == data
    assert files_in(tmp_path) == ["other.onnx", "out.onnx", "out.onnx.data"]
    np.testing.assert_array_equal(
        io.load(other).graph.initializers["table"].const_value.numpy(),
        table_model().graph.initializers["table"].const_value.numpy(),
    )


@pytest.mark.parametrize("coordinates", [False, True])
def test_sparse_initializers_are_loaded_as_dense_ones(tmp_path: Path, coordinates: bool) -> None:
    """onnx-ir keeps no sparse tensors: W was dropped at load and onnxruntime refused the written
    model ("Node input 'W' is not a graph input, initializer, or output of a previous node")."""
    from onnxcompress import compress

    dense = np.zeros((4, 3), np.float32)
    dense[0, 1], dense[2, 0], dense[3, 2] = 1.5, -2.0, 0.25
    positions = np.flatnonzero(dense)
    indices = np.argwhere(dense) if coordinates else positions
    sparse = onnx.helper.make_sparse_tensor(
        onnx.numpy_helper.from_array(dense.reshape(-1)[positions], "W"),
        onnx.numpy_helper.from_array(indices.astype(np.int64), "W_indices"),
        [4, 3],
    )
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])],
        sparse_initializer=[sparse],
    )
    path = tmp_path / "sparse.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    model = io.load(path)
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(), dense)
    report = compress(path, tmp_path / "out.onnx", ["cleanup"])
    assert report.written and report.parity.passed


def test_a_staged_model_the_checker_refuses_is_never_handed_over(tmp_path: Path) -> None:
    """onnxruntime ran an output that had lost its type (a fold onto the last layer); the checker
    refuses it, and so does staging, with an internal error and no file left."""
    from onnxcompress.errors import InvalidOutputError

    model = mlp_model()
    model.graph.outputs[0].type = None
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    with pytest.raises(InvalidOutputError, match="fails the ONNX checker"):
        io.stage(model, out)
    assert files_in(out.parent) == []


def test_a_session_on_a_model_with_a_large_unused_initializer() -> None:
    """Side-loaded tensors are matched to initializers after onnxruntime drops the unused ones:
    side-loading a large unused one failed the session ('Failed to find existing initializer')."""
    model = mlp_model()
    unused = ir.Value(name="unused_big", const_value=ir.tensor(np.ones((256, 64), np.float32), name="unused_big"))
    model.graph.register_initializer(unused)
    session = runtime.make_session(model)
    outputs = runtime.run(session, {"x": np.ones((3, 8), np.float32)})
    assert outputs["score"].shape == (3,)
