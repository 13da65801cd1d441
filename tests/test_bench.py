"""tools/bench.py end to end on the smallest shipped model with one timing round, so the harness keeps working."""

from __future__ import annotations

import argparse
import json
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
    assert "MatMulInteger" in rows["ort-dynamic"]["op_changes"]
    for row in rows.values():
        for threads in data["settings"]["threads"]:
            speed = row["speed"][f"threads={threads}"]
            assert len(speed["b1_samples"]) == 1 and speed["b512_seconds"] > 0
    assert rows["original"]["speed"]["threads=1"]["b1_speedup"] == 1.0

    markdown = (tmp_path / "BENCHMARKS.md").read_text()
    assert f"## {bench.QUICK_MODEL}" in markdown and "| ours-cleanup |" in markdown
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
