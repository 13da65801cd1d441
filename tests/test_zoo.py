"""Every registered pass, with its defaults, over every model in models/ through the CLI.

New passes and new models join this matrix automatically.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from conftest import MODELS, model_files, shipped_models

from onnxcompress import runtime
from onnxcompress.calibration import load_feeds
from onnxcompress.io import load
from onnxcompress.parity import LOSSLESS, LOSSY
from onnxcompress.passes import PASSES

MATRIX = [(model, name) for model in shipped_models() for name in sorted(PASSES)]


def test_the_zoo_covers_every_exporter() -> None:
    exporters = set()
    for meta_path in MODELS.glob("*.meta.json"):
        meta = json.loads(meta_path.read_text())
        exporter = meta["exporter"]
        exporters.add(exporter.get("mode") if isinstance(exporter, dict) else meta.get("exporter_mode", exporter))
    assert {"torchscript", "dynamo", "tf2onnx", "skl2onnx"} <= exporters
    assert (MODELS / "two_tower.rank.npz").exists()
    assert sum(path.stat().st_size for path in MODELS.iterdir()) < 25e6


@pytest.mark.parametrize("name", shipped_models())
def test_shipped_feeds_labels_and_calibration_fit_the_model(name: str) -> None:
    files = model_files(name)
    model = load(files["onnx"])
    feeds = load_feeds(files["feeds"], model)
    calib = load_feeds(files["calib"], model, "--calib")
    assert feeds.rows == 10_000 and calib.rows == 512
    meta = json.loads((MODELS / f"{name}.meta.json").read_text())
    max_abs = next(value for key, value in meta.items() if "max_abs" in key)
    assert max_abs <= 1e-5  # the exporter's output matched the framework's
    outputs = runtime.run(runtime.make_session(files["onnx"]), calib.arrays)
    assert all(len(array) == 512 for array in outputs.values())


@pytest.mark.parametrize(("model", "pass_name"), MATRIX, ids=[f"{m}-{p}" for m, p in MATRIX])
def test_every_pass_with_defaults_on_every_model(cli, tmp_path: Path, model: str, pass_name: str) -> None:
    files = model_files(model)
    out = tmp_path / "out.onnx"
    result = cli(files["onnx"], out, "--passes", pass_name, "--feeds", files["feeds"], "--labels", files["labels"],
                 "--calib", files["calib"])
    assert result.code == 0, result.err
    report = result.report
    assert report["verdict"] == "passed" and report["written"]
    onnx.checker.check_model(str(out))
    pass_class = PASSES[pass_name]
    budget = pass_class.budget or (LOSSY if pass_class.lossy else LOSSLESS)
    for output in report["parity"]["outputs"]:
        if output["auc_delta"] is None:
            continue
        if budget.max_auc_drop is None:
            assert abs(output["auc_delta"]) <= 1e-4
        else:
            assert -output["auc_delta"] <= budget.max_auc_drop
