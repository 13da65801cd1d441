"""The distill pass: choosing and removing layers, its options, student mode, and the CLI on real models."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import mlp_model, model_files, save_model, shipped_model_with_calibration, text_model
from test_layers import calibration_for, mlp, transformer

from onnxcompress.calibration import Calibration
from onnxcompress.errors import InputModelError, UsageError
from onnxcompress.layers import discover, model_params
from onnxcompress.passes.base import PassContext
from onnxcompress.passes.distill import Distill
from onnxcompress.recipe import build_specs

DEEPFM = model_files("deepfm")
STUDENT = model_files("deepfm_student")


def distill(model: ir.Model, calibration: Calibration | None = None, **options: object) -> dict:
    (spec,) = build_specs(["distill"], {"distill": options})
    result = Distill(spec.config, PassContext(calibration))(model)
    assert result.model is model
    return {"modified": result.modified, **result.stats}


def test_remove_one_removes_the_least_important_layer_and_refits() -> None:
    model = transformer()
    nodes_before = len(model.graph)
    stats = distill(model, calibration_for(model), remove=1, augment=256)
    assert stats["modified"] and len(stats["removed"]) == 1
    assert stats["removed"][0] not in {layer.name for layer in discover(model)}
    assert len(model.graph) < nodes_before and stats["params_after"] < stats["params_before"]
    assert stats["flops_after"] < stats["flops_before"]
    assert stats["refit"] and stats["head_refit"] == ["wh"]
    assert stats["spearman"]["refit"] >= stats["spearman"]["removed"]
    assert set(stats["logit_mae"]) == {"removed", "refit", "head_refit"}


def test_named_layers_are_removed_in_graph_order() -> None:
    model = mlp()
    stats = distill(model, calibration_for(model), remove="w2, w0", augment=0, refit_head=False)
    assert stats["removed"] == ["w0", "w2"]
    assert [node.op_type for node in model.graph] == [
        "Gemm",
        "BatchNormalization",
        "Relu",
        "Dropout",
        "Gemm",
        "Sigmoid",
        "Constant",
        "Reshape",
    ]
    assert stats["refit"] == ["w1", "w3"] and "head_refit" not in stats["spearman"]


def test_without_refit_the_layers_are_only_bypassed() -> None:
    model = mlp()
    w2_before = model.graph.initializers["w2"].const_value.numpy().copy()  # type: ignore[union-attr]
    stats = distill(model, calibration_for(model), remove="w1", refit=False, refit_head=False)
    assert stats["refit"] == [] and stats["head_refit"] == [] and set(stats["spearman"]) == {"removed"}
    np.testing.assert_array_equal(model.graph.initializers["w2"].const_value.numpy(), w2_before)  # type: ignore[union-attr]


def test_without_calibration_rows_they_are_synthesized_and_the_stats_say_so() -> None:
    stats = distill(mlp(), remove=1, augment=0)
    assert stats["calibration"].startswith("synthesized (seed 0, 512 rows")


def test_target_params_removes_until_the_model_fits() -> None:
    model = transformer()
    target = model_params(model) - 100
    stats = distill(model, calibration_for(model), target_params=target, augment=0)
    assert stats["params_after"] <= target < stats["params_before"]
    with pytest.raises(UsageError, match="cannot be reached"):
        distill(mlp(), calibration_for(mlp()), target_params=3, augment=0)  # 4 -> 1 is all that can be left


def test_unknown_and_overlapping_names_are_refused_with_the_choices() -> None:
    with pytest.raises(UsageError, match="names nope, which the model does not have; removable layers: w0, w1, w2"):
        distill(mlp(), remove="w1,nope")
    with pytest.raises(UsageError, match=re.escape("blocks.0 and blocks.0.ffn overlap")):
        distill(transformer(), remove="blocks.0,blocks.0.ffn")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"remove": "-1"}, "at least 0"),
        ({"remove": 1, "target_params": 100}, "not both"),
        ({"student": "s.onnx", "remove": 1}, "replaces the model"),
        ({"augment": -5}, "at least 0"),
        ({"remove": 2, "min_rank_corr": 1.5}, "between 0 and 1"),
    ],
)
def test_inconsistent_options_are_usage_errors(options: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build_specs(["distill"], {"distill": options})


def test_a_model_without_removable_layers_is_left_alone() -> None:
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x, float[4,1] w) => (float[N,1] y) {
          h = MatMul(x, w)
          y = Sigmoid(h)
        }
        """,
        {"w": np.ones((4, 1), np.float32)},
    )
    stats = distill(model, remove=2)
    assert stats == {"modified": False, "skipped": "no removable layer found"}


def two_task_model() -> ir.Model:
    """A shared layer and a tower per task, each ending in a sigmoid score (an MMoE's shape)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,8] x, float[16,8] w0, float[16,16] wa, float[1,16] ha, float[16,16] wb, float[1,16] hb)
        => (float[N] ctr, float[N] cvr) {
      h = Gemm <transB = 1> (x, w0)
      s = Relu(h)
      a = Gemm <transB = 1> (s, wa)
      ra = Relu(a)
      la = Gemm <transB = 1> (ra, ha)
      pa = Sigmoid(la)
      shape = Constant <value = int64[1] {-1}> ()
      ctr = Reshape(pa, shape)
      b = Gemm <transB = 1> (s, wb)
      rb = Relu(b)
      lb = Gemm <transB = 1> (rb, hb)
      pb = Sigmoid(lb)
      cvr = Reshape(pb, shape)
    }
    """
    rng = np.random.default_rng(3)
    shapes = {"w0": (16, 8), "wa": (16, 16), "ha": (1, 16), "wb": (16, 16), "hb": (1, 16)}
    return text_model(text, {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()})


def test_a_fidelity_budget_holds_on_every_task_of_a_multi_task_model() -> None:
    """Judged on the first score alone, removing the second task's tower looked free (its Spearman
    1.0) and the max preset failed parity on an MMoE's second output (rank correlation 0.92): each
    score is refit to its own teacher logit and the budget holds on the worst of them."""
    second_tower = "wb"
    assert {layer.name for layer in discover(two_task_model())} == {"wa", second_tower}
    model = two_task_model()
    stats = distill(model, calibration_for(model), remove=second_tower, min_rank_corr=0.999)
    assert not stats["modified"] and list(stats["over_budget"]) == [second_tower]
    assert stats["over_budget"][second_tower] < 0.999
    model = two_task_model()
    stats = distill(model, calibration_for(model), remove=second_tower)
    assert stats["removed"] == [second_tower] and len(stats["head_refit"]) == 2  # each task's head


# --- student mode ------------------------------------------------------------------------------------


def student_model(
    inputs: str = "float[N,8] x",
    outputs: str = "float[N] score, float[N,4] aux",
    score: str = "score = Reshape(s, shape)",
    width: int = 8,
) -> ir.Model:
    """A smaller student of ``mlp_model``: 8-4-1 with a Dropout, an Identity and an auxiliary output."""
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    student ({inputs}, float[4,{width}] v1, float[4] c1, float[1,4] v2, float[1] c2) => ({outputs}) {{
      h = Gemm <transB = 1> (x, v1, c1)
      r = Relu(h)
      d = Dropout(r)
      i = Identity(d)
      o = Gemm <transB = 1> (i, v2, c2)
      s = Sigmoid(o)
      shape = Constant <value = int64[1] {{-1}}> ()
      {score}
      aux = Tanh(h)
    }}
    """
    rng = np.random.default_rng(5)
    shapes = {"v1": (4, width), "c1": (4,), "v2": (1, 4), "c2": (1,)}
    return text_model(text, {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()})


def test_a_student_replaces_the_model_without_dropout_identity_or_extra_outputs(tmp_path: Path) -> None:
    path = save_model(student_model(), tmp_path / "student.onnx")
    teacher = mlp_model()
    stats = distill(teacher, calibration_for(teacher), student=str(path), augment=0)
    assert stats["outputs_stripped"] == 1 and stats["dropout_removed"] == 1 and stats["identity_removed"] == 1
    assert [value.name for value in teacher.graph.outputs] == ["score"]
    assert [node.op_type for node in teacher.graph] == ["Gemm", "Relu", "Gemm", "Sigmoid", "Constant", "Reshape"]
    assert set(teacher.graph.initializers) == {"v1", "c1", "v2", "c2"}
    assert stats["params_before"] == 16 * 8 + 16 + 16 + 1 and stats["params_after"] == 4 * 8 + 4 + 4 + 1
    assert stats["head_refit"] == ["v2"] and stats["logit_mae"]["head_refit"] < stats["logit_mae"]["student"]


@pytest.mark.parametrize(
    ("student", "message"),
    [
        ({"inputs": "float[N,7] x", "width": 7}, "input x: float32[N,7] does not match the teacher's x: float32[N,8]"),
        ({"inputs": "float[N,8] x, float[N] extra"}, "takes input extra: float32[N] that the teacher does not have"),
        (
            {"outputs": "float[N] prediction, float[N,4] aux", "score": "prediction = Reshape(s, shape)"},
            "lacks the teacher's output 'score' (it has aux, prediction)",
        ),
        (
            {"outputs": "float[N,1] score, float[N,4] aux", "score": "score = Identity(s)"},
            "output 'score' is FLOAT of rank 2 but the teacher's is FLOAT of rank 1",
        ),
    ],
)
def test_a_student_with_another_interface_is_refused(tmp_path: Path, student: dict, message: str) -> None:
    path = save_model(student_model(**student), tmp_path / "student.onnx")
    with pytest.raises(InputModelError, match=re.escape(message)):
        distill(mlp_model(), student=str(path))


# --- the CLI on real models --------------------------------------------------------------------------


def test_removing_a_deepfm_layer_passes_parity_and_keeps_auc(cli, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    result = cli(
        DEEPFM["onnx"],
        out,
        "--passes",
        "distill",
        "--set",
        "distill.remove=1",
        "--feeds",
        DEEPFM["feeds"],
        "--labels",
        DEEPFM["labels"],
        "--calib",
        DEEPFM["calib"],
    )
    assert result.code == 0, result.err
    report = result.report
    assert report["verdict"] == "passed" and report["written"]
    (score,) = report["parity"]["outputs"]
    assert abs(score["auc_delta"]) <= 0.003 and score["spearman"] >= 0.99
    stats = report["passes"][0]["stats"]
    assert len(stats["removed"]) == 1 and stats["removed"][0] in {"mlp.0", "mlp.4", "mlp.8"}
    assert stats["params_after"] < 0.75 * stats["params_before"]
    assert stats["calibration"] == f"{DEEPFM['calib']} (512 rows) + 4096 rows mixing their columns"
    assert report["passes"][0]["nodes_after"] == report["passes"][0]["nodes_before"] - 3
    onnx.checker.check_model(str(out))


def test_distill_composes_with_prune_and_quant(cli, tmp_path: Path) -> None:
    result = cli(
        DEEPFM["onnx"],
        tmp_path / "out.onnx",
        "--passes",
        "distill,prune,quant",
        "--set",
        "distill.remove=1",
        "--set",
        "distill.augment=1024",
        "--set",
        "prune.sparsity=0.1",
        "--set",
        "prune.reconstruct=false",
        "--feeds",
        DEEPFM["feeds"],
        "--labels",
        DEEPFM["labels"],
        "--calib",
        DEEPFM["calib"],
    )
    assert result.code == 0, result.err
    assert [record["name"] for record in result.report["passes"]] == ["distill", "prune", "quant"]
    assert result.report["verdict"] == "passed"


def test_a_pytorch_student_replaces_the_teacher_through_the_cli(cli, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    result = cli(
        DEEPFM["onnx"],
        out,
        "--passes",
        "distill",
        "--set",
        f"distill.student={STUDENT['onnx']}",
        "--feeds",
        DEEPFM["feeds"],
        "--labels",
        DEEPFM["labels"],
        "--calib",
        DEEPFM["calib"],
        "--min-rank-corr",
        "0.98",
    )
    assert result.code == 0, result.err
    stats = result.report["passes"][0]["stats"]
    assert stats["params_after"] < stats["params_before"] / 3
    assert stats["spearman"]["student"] > 0.99  # on the calibration rows; the test rows drift more
    (score,) = result.report["parity"]["outputs"]
    assert score["spearman"] > 0.98 and score["auc_delta"] > -0.003
    assert [output.name for output in onnx.load(str(out)).graph.output] == ["score"]


def test_list_layers_prints_the_removable_layers(cli) -> None:
    result = cli("--list-layers", DEEPFM["onnx"], "--calib", DEEPFM["calib"])
    assert result.code == 0, result.err
    for name in ("mlp.0", "mlp.4", "mlp.8"):
        assert name in result.out
    assert "66,816" in result.out


def test_a_fidelity_budget_keeps_only_the_removals_that_rank_like_the_teacher() -> None:
    """deepfm has three MLP layers: the budget lets two go and keeps the one whose removal would
    drop the Spearman with the teacher below it, however many remove= allows."""
    model, calibration = shipped_model_with_calibration("deepfm")
    stats = distill(model, calibration, remove=8, min_rank_corr=0.995)
    assert 1 <= len(stats["removed"]) < 3
    assert stats["over_budget"] and all(value < 0.995 for value in stats["over_budget"].values())
    assert set(stats["removed"]).isdisjoint(stats["over_budget"])
    assert stats["spearman"]["head_refit"] >= 0.995
    assert {layer.name for layer in discover(model)} == set(stats["over_budget"])


def test_a_budget_no_removal_meets_leaves_the_model_untouched() -> None:
    model, calibration = shipped_model_with_calibration("deepfm_student")
    before = model_params(model)
    stats = distill(model, calibration, remove=1, min_rank_corr=0.999)
    assert not stats["modified"] and model_params(model) == before
    assert "min_rank_corr=0.999" in stats["skipped"] and list(stats["over_budget"]) == ["mlp.0"]
    # without the budget the same removal goes ahead
    assert distill(model, calibration, remove=1)["removed"] == ["mlp.0"]


def test_the_max_preset_on_a_model_that_outputs_only_a_class_index(tmp_path: Path) -> None:
    """Distillation and the pruning budget rank a float score; with none, both are skipped and say
    why, and the preset's quantization still runs (the preset failed with exit 3)."""
    from onnxcompress import compress
    from onnxcompress.presets import get_preset

    rng = np.random.default_rng(4)
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,16] x, float[16,64] w1, float[64,64] w2, float[64,3] w3) => (int64[N] label) {
          h1 = MatMul(x, w1)
          r1 = Relu(h1)
          h2 = MatMul(r1, w2)
          r2 = Relu(h2)
          y = MatMul(r2, w3)
          label = ArgMax <axis = 1, keepdims = 0> (y)
        }
        """,
        {
            "w1": rng.standard_normal((16, 64)).astype(np.float32),
            "w2": (rng.standard_normal((64, 64)) / 8).astype(np.float32),
            "w3": rng.standard_normal((64, 3)).astype(np.float32),
        },
    )
    source = save_model(model, tmp_path / "classes.onnx")
    recipe = get_preset("max")
    report = compress(source, tmp_path / "out.onnx", list(recipe.passes), options=recipe.options, force=True)
    stats = {record.name: record.stats for record in report.passes}
    assert "no float output to score it by" in stats["distill"]["skipped"]
    assert stats["prune"]["skipped"].startswith("min_rank_corr: the model has no float output")
    assert stats["quant"]["weights_quantized"] == 3 and report.written
