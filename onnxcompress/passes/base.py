"""The pass interface: an onnx-ir in-place pass with a typed Config and a result carrying stats."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import onnx_ir as ir

from onnxcompress.parity import Budget

if typing.TYPE_CHECKING:
    from onnxcompress.calibration import Calibration

__all__ = ["NON_FINITE_WEIGHT", "CompressionPass", "CompressionResult", "PassContext", "config_fields"]

#: A pass's ``skipped`` reason for a weight holding NaN or infinity: the model is broken, and a
#: parity failure is then reported as that, not as a budget too tight.
NON_FINITE_WEIGHT = "holds NaN or infinity: fix the model; quantizing would hide it"


@dataclasses.dataclass
class CompressionResult(ir.passes.PassResult):
    """A pass result with the statistics the report shows (JSON-serialisable values only)."""

    stats: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PassContext:
    """What a pass may use besides the model: calibration data and the model file as the user
    gave it (to measure against the original when earlier passes have changed the graph)."""

    calibration: Calibration | None = None
    source: Path | None = None


class CompressionPass(ir.passes.InPlacePass):
    """Base class of every registered pass.

    Subclasses define a nested frozen dataclass ``Config`` whose fields carry their help text in
    ``metadata["help"]`` (and optionally ``metadata["choices"]``), and implement ``call``.
    """

    name: ClassVar[str] = ""
    #: Whether the pass changes what the model computes.
    lossy: ClassVar[bool] = False
    #: The parity budget this pass is held to by default (None: LOSSY if lossy, else LOSSLESS).
    budget: ClassVar[Budget | None] = None
    Config: ClassVar[type] = type("Config", (), {})

    def __init__(self, config: Any = None, context: PassContext | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else self.Config()
        self.context = context if context is not None else PassContext()

    def call(self, model: ir.Model) -> CompressionResult:  # pragma: no cover - abstract
        raise NotImplementedError


def config_fields(config_class: type) -> list[dataclasses.Field[Any]]:
    """The fields of a pass's Config with their annotations resolved to real types."""
    hints = typing.get_type_hints(config_class)
    fields = list(dataclasses.fields(config_class))
    for field in fields:
        field.type = hints[field.name]
    return fields
