"""Models whose inputs fix the batch (traced at batch 1, or 8) and inputs shared by every row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import save_model, text_model

from onnxcompress import compress, runtime
from onnxcompress.calibration import fixed_batch, graph_inputs, load_feeds, synthesize_feeds
from onnxcompress.errors import UsageError
from onnxcompress.presets import get_preset


def fixed_mlp(batch: int | str, seed: int = 0) -> object:
    rng = np.random.default_rng(seed)
    return text_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[{batch},16] x, float[32,16] w1, float[32] b1, float[32,32] w2, float[32] b2, float[1,32] w3,
           float[1] b3) => (float[{batch},1] score) {{
          h = Gemm <transB = 1> (x, w1, b1)
          r = Relu(h)
          h2 = Gemm <transB = 1> (r, w2, b2)
          r2 = Relu(h2)
          o = Gemm <transB = 1> (r2, w3, b3)
          score = Sigmoid(o)
        }}
        """,
        {
            "w1": rng.standard_normal((32, 16)).astype(np.float32),
            "b1": rng.standard_normal(32).astype(np.float32) * 0.1,
            "w2": (rng.standard_normal((32, 32)) / 4).astype(np.float32),
            "b2": rng.standard_normal(32).astype(np.float32) * 0.1,
            "w3": (rng.standard_normal((1, 32)) / 4).astype(np.float32),
            "b3": np.zeros(1, np.float32),
        },
    )


def row_by_row(path: Path, rows: np.ndarray, batch: int = 1) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [session.run(None, {"x": rows[start : start + batch]})[0] for start in range(0, len(rows), batch)]
    )


def test_a_fixed_batch_is_read_from_the_inputs_and_synthesized_feeds_get_every_row() -> None:
    assert fixed_batch(graph_inputs(fixed_mlp(1))) == 1  # type: ignore[arg-type]
    assert fixed_batch(graph_inputs(fixed_mlp(8))) == 8  # type: ignore[arg-type]
    assert fixed_batch(graph_inputs(fixed_mlp("N"))) is None  # type: ignore[arg-type]
    feeds = synthesize_feeds(fixed_mlp(1), rows=512)  # type: ignore[arg-type]
    assert feeds.arrays["x"].shape == (512, 16)


def test_runtime_runs_a_fixed_batch_that_many_rows_at_a_time_and_fills_the_last(tmp_path: Path) -> None:
    path = save_model(fixed_mlp(8), tmp_path / "fixed8.onnx")  # type: ignore[arg-type]
    rows = np.random.default_rng(1).standard_normal((13, 16)).astype(np.float32)
    session = runtime.make_session(path)
    assert runtime.fixed_batch(session) == 8
    outputs = runtime.run(session, {"x": rows})["score"]
    padded = np.concatenate([rows, rows[:3]])  # the last batch of 5 filled with copies of its rows
    expected = row_by_row(path, padded, batch=8)[:13]
    assert outputs.shape == (13, 1)
    np.testing.assert_allclose(outputs, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 8])
def test_int8_of_a_fixed_batch_model_is_calibrated_and_checked_on_every_row(tmp_path: Path, batch: int) -> None:
    """A model traced at batch 1 was calibrated and checked on one row: the written int8 model
    passed parity there and scored fresh rows with Spearman 0.45."""
    source = save_model(fixed_mlp(batch), tmp_path / "fixed.onnx")  # type: ignore[arg-type]
    recipe = get_preset("int8")
    out = tmp_path / "out.onnx"
    report = compress(source, out, list(recipe.passes), options=recipe.options)
    assert report.parity.rows == 512
    assert report.written
    fresh = np.random.default_rng(7).standard_normal((200, 16)).astype(np.float32)
    original, compressed = row_by_row(source, fresh, batch), row_by_row(out, fresh, batch)
    assert np.abs(original - compressed).max() < 0.05
    assert np.corrcoef(original.ravel(), compressed.ravel())[0, 1] > 0.99


def test_max_preset_and_list_layers_take_a_fixed_batch_of_eight(tmp_path: Path) -> None:
    source = save_model(fixed_mlp(8), tmp_path / "fixed8.onnx")  # type: ignore[arg-type]
    recipe = get_preset("max")
    report = compress(source, tmp_path / "out.onnx", list(recipe.passes), options=recipe.options)
    assert report.written and report.parity.rows == 512


def test_feeds_of_a_fixed_batch_model_may_hold_any_number_of_rows_but_not_none(tmp_path: Path) -> None:
    model = fixed_mlp(1)
    np.savez(tmp_path / "many.npz", x=np.zeros((64, 16), np.float32))
    assert load_feeds(tmp_path / "many.npz", model).rows == 64  # type: ignore[arg-type]
    np.savez(tmp_path / "none.npz", x=np.zeros((0, 16), np.float32))
    with pytest.raises(UsageError, match="no rows"):
        load_feeds(tmp_path / "none.npz", model)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="first dimension counts the rows"):
        synthesize_feeds(fixed_mlp("N"), {"x": [0, 16]})  # type: ignore[arg-type]


def test_an_input_the_model_fixes_beside_batched_ones_is_shared_by_every_row(tmp_path: Path) -> None:
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x, float[1] scale) => (float[N,4] y) {
          y = Mul(x, scale)
        }
        """
    )
    np.savez(
        tmp_path / "feeds.npz", x=np.arange(40, dtype=np.float32).reshape(10, 4), scale=np.array([2.0], np.float32)
    )
    feeds = load_feeds(tmp_path / "feeds.npz", model)
    assert feeds.rows == 10
    assert feeds.head(3).arrays["scale"].shape == (1,)
    path = save_model(model, tmp_path / "shared.onnx")
    outputs = runtime.run(runtime.make_session(path), feeds.arrays, batch_size=4)["y"]
    np.testing.assert_array_equal(outputs, 2 * feeds.arrays["x"])


def test_an_unbatched_input_of_fixed_size_runs_as_several_examples(tmp_path: Path) -> None:
    """A [20] history with a 0-d score: each call of 20 values is one example, and the 0-d outputs
    of several calls line up as a vector (numpy cannot concatenate 0-d arrays)."""
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[20] h, float[20] w) => (float s) {
          p = Mul(h, w)
          s = ReduceSum <keepdims = 0> (p)
        }
        """,
        {"w": np.arange(20, dtype=np.float32)},
    )
    path = save_model(model, tmp_path / "history.onnx")
    outputs = runtime.run(runtime.make_session(path), {"h": np.ones(40, np.float32)})
    np.testing.assert_array_equal(outputs["s"], [190.0, 190.0])
    report = compress(path, tmp_path / "out.onnx", ["cleanup"])
    assert report.written and report.parity.passed


@pytest.mark.parametrize("preset", ["int8", "mixed"])
def test_a_single_feed_row_is_not_fitted_and_the_report_says_it_judges_little(tmp_path: Path, preset: str) -> None:
    """One row given for a batch-1 model: GPTQ fitted it (int8 scored fresh rows at Spearman 0.61)
    and the mixed search, whose cosine on one value is always 1, went to 2 bits (Spearman 0.41)."""
    source = save_model(fixed_mlp(1), tmp_path / "fixed.onnx")  # type: ignore[arg-type]
    np.savez(tmp_path / "one.npz", x=np.random.default_rng(3).standard_normal((1, 16)).astype(np.float32))
    recipe = get_preset(preset)
    out = tmp_path / "out.onnx"
    report = compress(source, out, list(recipe.passes), options=recipe.options, feeds=tmp_path / "one.npz")
    assert any(note.startswith("only 1 rows: a check (and a calibration) on so few") for note in report.feed_notes)
    quant = next(record for record in report.passes if record.name == "quant")
    assert all(tensor.get("rounding") != "gptq" for tensor in quant.stats["tensors"].values())
    if preset == "mixed":
        assert quant.stats["mixed_precision"]["skipped"].startswith("1 calibration rows, fewer than 32")
    fresh = np.random.default_rng(7).standard_normal((200, 16)).astype(np.float32)
    original, compressed = row_by_row(source, fresh), row_by_row(out, fresh)
    assert np.corrcoef(original.ravel(), compressed.ravel())[0, 1] > 0.99
