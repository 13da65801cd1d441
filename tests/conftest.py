"""Shared fixtures: the shipped models, an in-process CLI runner, tiny models from ONNX text."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress.calibration import Calibration, load_feeds
from onnxcompress.cli import main
from onnxcompress.passes import PASSES, register
from onnxcompress.passes.base import CompressionPass, CompressionResult
from onnxcompress.report import Report

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
sys.path.insert(0, str(REPO / "tools"))


@dataclass
class CliResult:
    code: int
    out: str
    err: str
    report: dict[str, Any] | None = field(default=None)

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Callable[..., CliResult]:
    """Run ``onnxcompress ARGS`` in-process; return exit code, stdout, stderr and the JSON report."""

    def run(*args: str | Path) -> CliResult:
        report_path = tmp_path / "report.json"
        report_path.unlink(missing_ok=True)
        argv = [str(arg) for arg in args]
        if "--list-passes" not in argv and "--help" not in argv:
            argv += ["--report", str(report_path)]
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        captured = capsys.readouterr()
        report = json.loads(report_path.read_text()) if report_path.exists() else None
        return CliResult(code, captured.out, captured.err, report)

    return run


def compress_with_preset(
    name: str,
    preset: str,
    out: Path,
    *assignments: str,
    parity_rows: str = "feeds",
    force: bool = False,
    files: dict[str, Path] | None = None,
) -> Report:
    """Shipped model ``name`` (or ``files`` in its place) through ``preset`` with its calibration
    rows, parity on ``parity_rows`` (its test ``feeds``, or its ``calib`` rows) with its labels when
    those are the test rows."""
    from onnxcompress import compress
    from onnxcompress.presets import get_preset

    files = files or model_files(name)
    recipe = get_preset(preset)
    return compress(
        files["onnx"],
        out,
        list(recipe.passes),
        options=recipe.options,
        assignments=list(assignments),
        feeds=files[parity_rows],
        calib=files["calib"],
        labels=files["labels"] if parity_rows == "feeds" else None,
        force=force,
    )


def model_files(name: str) -> dict[str, Path]:
    """The shipped files of model ``name``: onnx, feeds, labels, calib."""
    return {
        "onnx": MODELS / f"{name}.onnx",
        "feeds": MODELS / f"{name}.feeds.npz",
        "labels": MODELS / f"{name}.labels.npy",
        "calib": MODELS / f"{name}.calib.npz",
    }


def shipped_model_with_calibration(name: str) -> tuple[ir.Model, Calibration]:
    """Shipped model ``name`` loaded, and its calibration rows."""
    files = model_files(name)
    model = ir.load(files["onnx"])
    return model, Calibration(load_feeds(files["calib"], model))


def shipped_models() -> list[str]:
    return sorted(path.stem for path in MODELS.glob("*.onnx"))


def text_model(text: str, initializers: dict[str, np.ndarray] | None = None) -> ir.Model:
    """An ir.Model from ONNX text, with the named graph inputs turned into initializers."""
    model = ir.from_onnx_text(text)
    for name, array in (initializers or {}).items():
        value = next(v for v in model.graph.inputs if v.name == name)
        model.graph.inputs.remove(value)
        value.const_value = ir.tensor(array, name=name)
        model.graph.register_initializer(value)
    return model


def save_model(model: ir.Model, path: Path, external: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, path, external_data=path.name + ".data" if external else None, size_threshold_bytes=0)
    return path


MLP_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N,8] x) => (float[N] score) {
  h = Gemm <transB = 1> (x, w1, b1)
  r = Relu(h)
  d = Dropout(r)
  i = Identity(d)
  o = Gemm <transB = 1> (i, w2, b2)
  s = Sigmoid(o)
  shape = Constant <value = int64[1] {-1}> ()
  score = Reshape(s, shape)
}
"""


def mlp_model(seed: int = 0) -> ir.Model:
    rng = np.random.default_rng(seed)
    text = MLP_TEXT.replace("(float[N,8] x)", "(float[N,8] x, float[16,8] w1, float[16] b1, float[1,16] w2, float[1] b2)")
    return text_model(
        text,
        {
            "w1": rng.standard_normal((16, 8)).astype(np.float32),
            "b1": rng.standard_normal(16).astype(np.float32),
            "w2": rng.standard_normal((1, 16)).astype(np.float32),
            "b2": np.zeros(1, np.float32),
        },
    )


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    return save_model(mlp_model(), tmp_path / "in" / "mlp.onnx")


@pytest.fixture
def perturb_pass() -> Iterator[type[CompressionPass]]:
    """A lossy test-only pass that adds noise of a chosen size to every float initializer."""
    from dataclasses import dataclass as config_dataclass
    from dataclasses import field as config_field

    @config_dataclass(frozen=True)
    class Config:
        noise: float = config_field(default=1.0, metadata={"help": "noise standard deviation"})

    class Perturb(CompressionPass):
        """Add Gaussian noise to float initializers (tests only)."""

        lossy = True

        def call(self, model: ir.Model) -> CompressionResult:
            rng = np.random.default_rng(0)
            for value in model.graph.initializers.values():
                array = value.const_value.numpy()
                if array.dtype == np.float32:
                    noisy = array + rng.normal(0, self.config.noise, array.shape).astype(np.float32)
                    value.const_value = ir.tensor(noisy, name=value.name)
            return CompressionResult(model, modified=True, stats={"noise": self.config.noise})

    Perturb.Config = Config
    register("perturb")(Perturb)
    yield Perturb
    del PASSES["perturb"]


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())
