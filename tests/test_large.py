"""A Criteo-like DLRM over 2.2 GB with external data goes through the pipeline with parity (slow,
still in CI): 26 tables of 64 dimensions, seven of 1,000,000+ rows, MLPs 512-256-64 and
1024-1024-512-256-1."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import files_in
from make_synthetic_dlrm import SyntheticSpec, make_synthetic_dlrm

from onnxcompress import compress


@pytest.fixture(scope="module")
def large_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_synthetic_dlrm(tmp_path_factory.mktemp("large"), SyntheticSpec())
    data = path.with_name(path.name + ".data")
    assert data.stat().st_size > 2.2e9
    return path


TABLE_BYTES = sum(SyntheticSpec().table_rows) * 64 * 4


@pytest.mark.slow
def test_cleanup_round_trips_a_model_over_2_gib_with_parity(large_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    report = compress(large_model, out, ["cleanup"])
    assert report.parity.passed and report.written
    (score,) = report.parity.outputs
    assert score.max_abs == 0.0
    assert files_in(tmp_path) == ["out.onnx", "out.onnx.data"]
    assert out.with_name("out.onnx.data").stat().st_size >= TABLE_BYTES
    assert out.stat().st_size < 1_000_000  # the tensors live in the data file
    assert any("windows" in note for note in report.feed_notes)


@pytest.mark.slow
def test_int8_quantization_of_a_model_over_2_gib_passes_parity(large_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    report = compress(large_model, out, ["quant"])
    assert report.parity.passed and report.written
    assert report.size_ratio > 3.8  # 64-wide rows: a float16 scale and uint8 offset per row cost 3 bytes of 67
    quant = report.passes[0].stats
    tables = [entry for entry in quant["tensors"].values() if entry["kind"] == "embedding"]
    assert len(tables) == 26
    # looked up quantized: the large fp32 tables never exist at run time
    assert {entry["form"] for entry in tables if entry["bytes_before"] >= 1 << 20} == {"gathered"}
    # rows of log-normal norms: one scale per table loses too much, so the tables are row-wise
    assert {entry["granularity"] for entry in tables if entry["bytes_before"] >= 1 << 20} == {"row"}
    assert out.with_name("q.onnx.data").stat().st_size < TABLE_BYTES / 4 * 1.06  # 67 bytes a row + the MLPs


@pytest.mark.slow
def test_int4_tables_of_a_model_over_2_gib_pass_parity(large_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "q4.onnx"
    report = compress(large_model, out, ["quant"], assignments=["quant.embedding_bits=4"])
    assert report.parity.passed and report.written
    assert report.size_ratio > 7.0
    quant = report.passes[0].stats
    tables = [entry for entry in quant["tensors"].values() if entry["kind"] == "embedding"]
    assert {(entry["bits"], entry["granularity"]) for entry in tables} == {(4, "row")}
    # two codes a byte, plus a float16 scale and a uint8 offset per row
    assert out.with_name("q4.onnx.data").stat().st_size < TABLE_BYTES / 8 * 1.15
