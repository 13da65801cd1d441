"""Contract tests run over every registered pass: new passes join automatically."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from conftest import save_model, text_model

from onnxcompress import io
from onnxcompress.passes import PASSES
from onnxcompress.passes.base import CompressionResult, config_fields

NO_WEIGHTS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x, float[N,4] y) => (float[N,4] z) {
  s = Add(x, y)
  z = Relu(s)
}
"""


@pytest.fixture(params=sorted(PASSES))
def pass_class(request: pytest.FixtureRequest) -> type:
    return PASSES[request.param]


def test_default_config_builds_and_every_option_has_help(pass_class: type) -> None:
    config = pass_class.Config()
    assert dataclasses.is_dataclass(config)
    for field in config_fields(pass_class.Config):
        assert field.metadata.get("help"), f"{pass_class.name}.{field.name} has no help"
    assert pass_class.__doc__ and pass_class.__doc__.strip()


def test_a_graph_without_weights_is_left_unmodified(pass_class: type) -> None:
    model = text_model(NO_WEIGHTS)
    before = ir.serde.serialize_model(model).SerializeToString()
    result = pass_class()(model)
    assert isinstance(result, CompressionResult)
    assert result.modified is False
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_running_twice_keeps_a_valid_model(pass_class: type, tmp_path: Path) -> None:
    from conftest import mlp_model

    model = mlp_model()
    pass_class()(model)
    pass_class()(model)
    path = save_model(model, tmp_path / "twice.onnx")
    io.load(path)  # passes the ONNX checker


def test_external_tensors_a_pass_skips_are_not_materialised(pass_class: type, tmp_path: Path) -> None:
    table = np.zeros((4, 3), np.int32)  # an integer table: no pass compresses it
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N] i, int32[4,3] table) => (int32[N,3] y) {
          y = Gather(table, i)
        }
        """,
        {"table": table},
    )
    loaded = io.load(save_model(model, tmp_path / "ext.onnx", external=True))
    pass_class()(loaded)
    tensor = loaded.graph.initializers["table"].const_value
    assert isinstance(tensor, ir.ExternalTensor)
    assert tensor.raw is None  # never memory-mapped, so never read


@pytest.mark.parametrize(
    "command",
    [["ruff", "check", "onnxcompress", "tools", "tests"], ["mypy", "onnxcompress"]],
    ids=["ruff", "mypy"],
)
def test_the_code_is_lint_and_type_clean(command: list[str]) -> None:
    """The style rules hold in CI, not only on the machine of whoever ran the tools last."""
    import subprocess
    import sys

    from conftest import REPO

    result = subprocess.run([sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
