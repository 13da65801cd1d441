"""tools/bench.py end to end on the smallest shipped model with one timing round, so the harness keeps working."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import bench
import pytest


def test_quick_run_measures_a_baseline_and_ours(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "bench.json"
    argv = ["--quick", "--repeats", "1", "--sample-seconds", "0.01", "--methods", "ort-dynamic,ours-cleanup"]
    assert bench.main([*argv, "--workdir", str(tmp_path), "--json", str(report)]) == 0

    data = json.loads(report.read_text())
    rows = {row["method"]: row for row in data["results"]}
    assert list(rows) == ["original", "ort-dynamic", "ours-cleanup"]
    assert all(row["model"] == bench.QUICK_MODEL and row["error"] is None for row in rows.values())
    assert rows["ours-cleanup"]["parity"] == "passed"
    assert rows["ours-cleanup"]["auc_delta"] == 0.0 and rows["ours-cleanup"]["max_abs_err"] == 0.0
    assert rows["ort-dynamic"]["size_ratio"] > 2 and rows["ort-dynamic"]["peak_rss_mib"] > 0
    # The same scores: no change and no error; quantized ones move the AUC a little, known to within
    # a small paired error.
    assert rows["ours-cleanup"]["auc_delta_se"] == 0.0
    assert 0 < rows["ort-dynamic"]["auc_delta_se"] < 0.002
    assert "MatMulInteger" in rows["ort-dynamic"]["op_changes"]
    for row in rows.values():
        for threads in data["settings"]["threads"]:
            speed = row["speed"][f"threads={threads}"]
            assert len(speed["b1_samples"]) == 1 and speed["b512_seconds"] > 0
    assert rows["original"]["speed"]["threads=1"]["b1_speedup"] == 1.0

    markdown = (tmp_path / "BENCHMARKS.md").read_text()
    assert f"## {bench.QUICK_MODEL}" in markdown and "| ours-cleanup |" in markdown
    assert f"| {rows['ort-dynamic']['auc_delta']:+.4f} ± " in markdown
    assert markdown.strip() in capsys.readouterr().out


def test_recipe_flag_validates_passes_and_options() -> None:
    method = bench.parse_recipe("ours-meta=cleanup:cleanup.strip_metadata=false")
    assert method.name == "ours-meta" and method.kind == "ours"
    assert method.params["passes"] == ["cleanup"]
    assert method.params["assignments"] == ["cleanup.strip_metadata=false"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown pass"):
        bench.parse_recipe("x=no_such_pass")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown option"):
        bench.parse_recipe("x=cleanup:cleanup.no_such_option=1")
    with pytest.raises(argparse.ArgumentTypeError, match="expected NAME"):
        bench.parse_recipe("cleanup")


def test_preset_flag_names_an_onnxcompress_preset() -> None:
    pytest.importorskip("onnxcompress.presets")
    method = bench.preset_method("lossless")
    assert method.name == "preset-lossless" and method.params == {"preset": "lossless"}
    with pytest.raises(argparse.ArgumentTypeError, match="unknown preset"):
        bench.preset_method("no_such_preset")


def test_onnxsim_methods_get_the_calibration_rows_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SparseGPT gets the rows quantize_static gets, in batches of 128; the other onnxsim methods
    only their keyword arguments. A stand-in module records the calls (onnxsim is an optional extra)."""
    import sys
    import types

    import bench_lib
    import onnx

    calls: list[tuple[str, dict]] = []

    def recorder(function: str) -> Callable[..., onnx.ModelProto]:
        def run(path: str, **kwargs: object) -> onnx.ModelProto:
            calls.append((function, kwargs))
            return onnx.load(path)

        return run

    stand_in = types.ModuleType("onnxsim")
    stand_in.__version__ = "0.8.1"  # type: ignore[attr-defined]
    for method in bench.ONNXSIM:
        setattr(stand_in, method.params["function"], recorder(method.params["function"]))
    monkeypatch.setitem(sys.modules, "onnxsim", stand_in)
    assert bench.onnxsim_methods() == (bench.ONNXSIM, "")
    case = bench_lib.Case.from_dir(bench.MODELS, bench.QUICK_MODEL)
    by_name = {method.name: method for method in bench.ONNXSIM}
    for name in ("onnxsim-sparsegpt50", "onnxsim-units50"):
        bench_lib.BUILDERS["onnxsim"](case.model, tmp_path / f"{name}.onnx", case, by_name[name].params)
        assert (tmp_path / f"{name}.onnx").stat().st_size > 0
    (sparsegpt, sparsegpt_kwargs), (units, units_kwargs) = calls
    assert sparsegpt == "apply_sparsegpt_pruning" and sparsegpt_kwargs["sparsity"] == 0.5
    batches = sparsegpt_kwargs["calibration_data"]
    assert [len(batch["features"]) for batch in batches] == [128, 128, 128, 128]
    assert units == "apply_structured_pruning" and units_kwargs == {"sparsity": 0.5}
    del stand_in.apply_sparsegpt_pruning
    assert bench.onnxsim_methods()[1].endswith("0.8.1 lacks apply_sparsegpt_pruning: its methods were skipped")
