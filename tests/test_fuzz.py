"""Hostile inputs: hundreds of seeded corruptions of the shipped models, through the CLI in process.

Every case must end with a documented exit code, at most one ``error:`` line and no traceback on
stderr (captured at the file-descriptor level, so onnxruntime's C++ log counts too), nothing left
beside OUT, and the input unchanged. A case is named ``model-mutator-seed`` and is reproduced with
``fuzzing.mutate(mutator, seed, MODELS / f"{model}.onnx")`` (external-data cases with
``fuzzing.mutate_external``). Exit 0 is fine when the mutation is harmless; OUT must then load.

The regression tests at the end pin each bug the fuzzer found.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import MODELS, files_in, mlp_model
from fuzzing import EXTERNAL_MUTATORS, MUTATORS, Outcome, mutate, mutate_external, run_cli
from onnx import TensorProto

from onnxcompress import io
from onnxcompress.passes import PASSES as REGISTRY

FUZZ_MODELS = ("dlrm", "deepfm", "sklearn_mlp", "keras_wide_deep")
DOCUMENTED_EXIT_CODES = {0, 1, 2, 3}
PASSES = "cleanup,quant"
ORT_LOG = re.compile(r"\[[VIWEF]:onnxruntime:")  # e.g. "[E:onnxruntime:, sequential_executor.cc:677 ...]"
# Seeds per model and mutator. Most corruptions are refused at load (milliseconds); the ones that
# usually leave a runnable model cost a full compression with parity (about a second), so they get
# fewer seeds to keep the whole fuzz under a minute.
RUNNABLE_MUTATORS = {"flip_payload_bytes": 1, "weight_values": 1, "metadata_and_strings": 1}
MIXED_MUTATORS = {
    "flip_structure_bytes": 3,
    "attribute_value": 3,
    "graph_io_type": 3,
    "opset_and_ir_version": 3,
    "graph_outputs": 3,
    "node_arity": 3,
}
DEFAULT_SEEDS = 8
CASES = [
    (model, name, seed)
    for model in FUZZ_MODELS
    for name in MUTATORS
    for seed in range(RUNNABLE_MUTATORS.get(name) or MIXED_MUTATORS.get(name) or DEFAULT_SEEDS)
]


def assert_failed_or_written_cleanly(
    outcome: Outcome, source: Path, before: bytes, out: Path, input_files: dict[str, bytes] | None = None
) -> None:
    """The contract every run must keep, whatever it was fed."""
    assert not outcome.crash, outcome.crash
    assert outcome.code in DOCUMENTED_EXIT_CODES, outcome.err
    assert "Traceback" not in outcome.err, outcome.err
    assert not ORT_LOG.search(outcome.err), f"onnxruntime's own log reached stderr:\n{outcome.err}"
    lines = [line for line in outcome.err.splitlines() if line.strip()]
    if outcome.code == 0:
        assert outcome.error_lines == [], outcome.err
        assert set(files_in(out.parent)) <= {out.name, out.name + ".data"}, files_in(out.parent)
        assert out.name in files_in(out.parent)
        io.load(out)  # the written model passes the validated load, including the ONNX checker
    else:
        assert len(outcome.error_lines) == 1, outcome.err
        assert lines[-1] == outcome.error_lines[0], outcome.err
        assert len(outcome.error_lines[0]) > len("error: "), outcome.err
        if outcome.code in (2, 3):  # refused before any report: the error line is all there is
            assert lines == outcome.error_lines, outcome.err
        assert files_in(out.parent) == [], files_in(out.parent)
    assert source.read_bytes() == before
    expected = input_files if input_files is not None else {source.name: before}
    assert files_in(source.parent) == sorted(expected)
    for name, content in expected.items():
        assert (source.parent / name).read_bytes() == content, f"{name} changed"


@pytest.mark.parametrize(("model", "mutator", "seed"), CASES, ids=[f"{m}-{n}-{s}" for m, n, s in CASES])
def test_corrupted_model(model: str, mutator: str, seed: int, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    data = mutate(mutator, seed, MODELS / f"{model}.onnx")
    assert data is not None, f"{mutator} found nothing to mutate in {model}"
    source = tmp_path / "in" / f"{model}.onnx"
    source.parent.mkdir()
    source.write_bytes(data)
    out = tmp_path / "out" / f"{model}.small.onnx"
    out.parent.mkdir()
    outcome = run_cli(capfd, source, out, "--passes", PASSES)
    assert_failed_or_written_cleanly(outcome, source, data, out)


EXTERNAL_MODELS = ("dlrm", "keras_wide_deep")
RUNNABLE_EXTERNAL = {"data_flipped": 1, "data_extended": 1}
EXTERNAL_CASES = [
    (model, name, seed)
    for model in EXTERNAL_MODELS
    for name in EXTERNAL_MUTATORS
    for seed in range(RUNNABLE_EXTERNAL.get(name, 4))
]


@pytest.mark.parametrize(
    ("model", "mutator", "seed"), EXTERNAL_CASES, ids=[f"{m}-{n}-{s}" for m, n, s in EXTERNAL_CASES]
)
def test_corrupted_external_data(
    model: str, mutator: str, seed: int, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    source = mutate_external(mutator, seed, MODELS / f"{model}.onnx", tmp_path / "in")
    before = {path.name: path.read_bytes() for path in source.parent.iterdir()}
    out = tmp_path / "out" / f"{model}.small.onnx"
    out.parent.mkdir()
    outcome = run_cli(capfd, source, out, "--passes", PASSES)
    assert_failed_or_written_cleanly(outcome, source, before[source.name], out, input_files=before)


def test_the_fuzz_covers_every_mutator_on_every_model() -> None:
    assert len(CASES) >= 300
    assert {(model, name) for model, name, _ in CASES} == {(m, n) for m in FUZZ_MODELS for n in MUTATORS}


def test_mutations_are_reproducible_and_real(tmp_path: Path) -> None:
    model = MODELS / "dlrm.onnx"
    for name in MUTATORS:
        first, second = mutate(name, 0, model), mutate(name, 0, model)
        assert first == second, name
        assert first != model.read_bytes(), f"{name} left the model unchanged"
    (tmp_path / "clean").mkdir()
    clean = tmp_path / "clean" / model.name
    onnx.save(onnx.load(str(model)), str(clean), save_as_external_data=True, location=model.name + ".data",
              size_threshold=0)
    for name in EXTERNAL_MUTATORS:
        first = snapshot_of(mutate_external(name, 0, model, tmp_path / name / "a"))
        assert first == snapshot_of(mutate_external(name, 0, model, tmp_path / name / "b")), name
        assert first != snapshot_of(clean), f"{name} left the model unchanged"


def snapshot_of(model_path: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in model_path.parent.iterdir()}


# ---- regressions: each bug the fuzzer found ----------------------------------------------------------


def dlrm_proto() -> onnx.ModelProto:
    return onnx.load(str(MODELS / "dlrm.onnx"))


def write(proto: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(proto.SerializeToString())
    return path


def initializer(proto: onnx.ModelProto, name: str) -> TensorProto:
    return next(tensor for tensor in proto.graph.initializer if tensor.name == name)


def run_on(
    proto: onnx.ModelProto, tmp_path: Path, capfd: pytest.CaptureFixture[str], passes: str = PASSES
) -> Outcome:
    source = write(proto, tmp_path / "in")
    before = source.read_bytes()
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    outcome = run_cli(capfd, source, out, "--passes", passes)
    assert_failed_or_written_cleanly(outcome, source, before, out)
    return outcome


def test_onnxruntime_errors_are_one_line_without_its_own_log(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """onnxruntime logged run-time failures in red on fd 2 before the CLI's own error line."""
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x) => (float[M,3] y) {
          shape = Constant <value = int64[2] {-1, 3}> ()
          y = Reshape(x, shape)
        }
        """
    )
    outcome = run_on(proto, tmp_path, capfd, passes="cleanup")
    assert outcome.code == 3
    assert outcome.err.strip().splitlines() == outcome.error_lines
    assert "onnxruntime failed while running the model" in outcome.error_lines[0]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda p: setattr(initializer(p, "top.0.bias"), "raw_data", b"\0" * 12), "holds 12 bytes but its dtype and shape need 512"),
        (lambda p: initializer(p, "top.2.bias").dims.__setitem__(0, 1), "holds 256 bytes but its dtype and shape need 4"),
        (lambda p: setattr(initializer(p, "top.4.bias"), "data_type", TensorProto.FLOAT8E4M3FN), "holds 4 bytes but its dtype and shape need 1"),
        (lambda p: setattr(initializer(p, "top.0.bias"), "data_type", TensorProto.DOUBLE), "holds 512 bytes but its dtype and shape need 1024"),
    ],
    ids=["short-raw-data", "dims-shrunk", "dtype-narrowed", "dtype-widened"],
)
def test_embedded_tensor_sizes_are_checked_at_load(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], corrupt, message: str
) -> None:
    """A payload that disagreed with its dtype and shape crashed id-range synthesis (exit 4: reshape)
    or reached onnxruntime (exit 3, 'uses an op the installed onnxruntime does not support')."""
    proto = dlrm_proto()
    corrupt(proto)
    outcome = run_on(proto, tmp_path, capfd)
    assert outcome.code == 2
    assert message in outcome.error_lines[0]
    assert "the file is corrupted, re-export the model" in outcome.error_lines[0]


def test_typed_data_with_the_wrong_count_is_refused_at_load(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    proto = dlrm_proto()
    tensor = initializer(proto, "top.4.bias")
    tensor.ClearField("raw_data")
    tensor.float_data.extend([0.5, 0.25])  # dims say 1 value
    outcome = run_on(proto, tmp_path, capfd)
    assert outcome.code == 2
    assert "tensor 'top.4.bias' (FLOAT[1]) is inconsistent" in outcome.error_lines[0]


def test_constant_node_tensors_are_checked_too(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    proto = dlrm_proto()
    constant = next(node for node in proto.graph.node if node.op_type == "Constant")
    constant.attribute[0].t.raw_data = b"\0" * 3
    outcome = run_on(proto, tmp_path, capfd)
    assert outcome.code == 2
    assert "is inconsistent: it holds 3 bytes" in outcome.error_lines[0]


def test_a_declared_external_length_that_disagrees_is_refused(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """onnxruntime refused it as 'an op the installed onnxruntime does not support' (exit 3)."""
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    onnx.save(dlrm_proto(), str(source), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    proto = onnx.load(str(source), load_external_data=False)
    for entry in initializer(proto, "top.0.weight").external_data:
        if entry.key == "length":
            entry.value = "16"
    source.write_bytes(proto.SerializeToString())
    before = source.read_bytes()
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    outcome = run_cli(capfd, source, out, "--passes", PASSES)
    assert outcome.code == 2
    assert "tensor 'top.0.weight' declares 16 bytes of external data but its dtype and shape need 22528" in (
        outcome.error_lines[0]
    )
    assert files_in(out.parent) == []
    assert source.read_bytes() == before


@pytest.mark.parametrize("name", sorted(path.stem for path in MODELS.glob("*.onnx")))
def test_every_shipped_model_passes_the_load_checks(name: str) -> None:
    assert io.load(MODELS / f"{name}.onnx").graph.outputs


def with_invalid_utf8(proto: onnx.ModelProto, marker: str) -> bytes:
    """The serialized model with the ASCII ``marker`` turned into invalid UTF-8 (same length)."""
    data = proto.SerializeToString()
    assert data.count(marker.encode()) == 1
    return data.replace(marker.encode(), b"\xcb" + marker.encode()[1:])


@pytest.mark.parametrize("where", ["value-metadata", "node-name", "doc-string", "model-metadata"])
def test_text_that_is_not_utf8_is_refused_at_load(tmp_path: Path, capfd: pytest.CaptureFixture[str], where: str) -> None:
    """protobuf hands invalid UTF-8 back as bytes; the first save or session then raised SerdeError
    (exit 4 with --passes cleanup, or exit 3 'onnxruntime cannot load the transformed model')."""
    proto = dlrm_proto()
    marker = "MARKER-TEXT"
    if where == "value-metadata":
        entry = initializer(proto, "top.0.bias").metadata_props.add()
        entry.key, entry.value = marker, "v"
    elif where == "node-name":
        proto.graph.node[0].name = marker
    elif where == "doc-string":
        proto.doc_string = marker
    else:
        entry = proto.metadata_props.add()
        entry.key, entry.value = "k", marker
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    source.write_bytes(with_invalid_utf8(proto, marker))
    for passes in ("cleanup", PASSES):
        out = tmp_path / "out" / passes / "small.onnx"
        out.parent.mkdir(parents=True)
        outcome = run_cli(capfd, source, out, "--passes", passes)
        assert_failed_or_written_cleanly(outcome, source, source.read_bytes(), out)
        assert outcome.code == 2
        assert "cannot be written back as ONNX" in outcome.error_lines[0]
        assert "not valid UTF-8" in outcome.error_lines[0]


def test_an_input_without_an_element_type_is_refused(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Synthesizing feeds for an UNDEFINED input raised TypeError from numpy (exit 4)."""
    proto = dlrm_proto()
    proto.graph.input[1].type.tensor_type.elem_type = TensorProto.UNDEFINED
    outcome = run_on(proto, tmp_path, capfd)
    assert outcome.code == 2
    assert "graph input 'user' has element type UNDEFINED, which no runtime can be fed" in outcome.error_lines[0]


@pytest.mark.parametrize(
    ("axis", "dim", "message"),
    [
        (0, -3, "graph input dense: float32[-3,25] declares a negative dimension"),
        (1, -3, "graph input dense: float32[batch,-3] declares a negative dimension"),
        (1, 2**40, "synthesized feeds would take"),
        (0, 2**40, "synthesized feeds would take"),
    ],
    ids=["negative-batch", "negative-width", "huge-width", "huge-batch"],
)
def test_input_shapes_that_cannot_be_synthesized_are_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], axis: int, dim: int, message: str
) -> None:
    """numpy raised 'negative dimensions are not allowed' or MemoryError for 8 TiB of feeds (exit 4)."""
    proto = dlrm_proto()
    proto.graph.input[0].type.tensor_type.shape.dim[axis].dim_value = dim
    outcome = run_on(proto, tmp_path, capfd)
    assert outcome.code == 2
    assert message in outcome.error_lines[0]


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ("dense=-1,25", "--input-shape dense: dimensions cannot be negative, got [-1, 25]"),
        ("dense=512,100000000", "synthesized feeds would take"),
    ],
)
def test_input_shape_overrides_that_cannot_be_synthesized_are_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], shape: str, message: str
) -> None:
    out = tmp_path / "small.onnx"
    outcome = run_cli(capfd, MODELS / "dlrm.onnx", out, "--passes", "cleanup", "--input-shape", shape)
    assert outcome.code == 2, outcome.err
    assert message in outcome.error_lines[0]
    assert files_in(tmp_path) == []


def test_a_gather_axis_out_of_range_reaches_onnxruntime_not_a_crash(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Id-range synthesis indexed the table's shape with the bad axis: IndexError (exit 4)."""
    proto = dlrm_proto()
    gather = next(node for node in proto.graph.node if node.op_type == "Gather")
    gather.attribute.add().CopyFrom(onnx.helper.make_attribute("axis", 7))
    outcome = run_on(proto, tmp_path, capfd)
    assert outcome.code == 3
    assert "axis must be in [-r, r-1]" in outcome.error_lines[0]


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_quant_does_not_quantize_non_finite_weights(value: float) -> None:
    model = mlp_model()
    weights = model.graph.initializers["w1"].const_value.numpy().copy()
    weights[0, 0] = value
    model.graph.initializers["w1"].const_value = ir.tensor(weights, name="w1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = REGISTRY["quant"]()(model)
    assert [str(warning.message) for warning in caught if issubclass(warning.category, RuntimeWarning)] == []
    assert "w1" in result.stats["skipped"]
