"""What a compression run did and measured, as frozen dataclasses that serialise to JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from onnxcompress.parity import ParityResult

__all__ = ["PassRecord", "Report"]


@dataclass(frozen=True)
class PassRecord:
    """One pass's run: its options, timing, size and node counts before and after, and stats."""

    name: str
    options: Mapping[str, Any]
    modified: bool
    seconds: float
    initializer_bytes_before: int
    initializer_bytes_after: int
    nodes_before: int
    nodes_after: int
    stats: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Report:
    """The whole run. ``written`` says whether OUT exists now; ``forced`` that parity failed but
    ``--force`` wrote it anyway; ``parity.checked`` is False under ``--no-parity``."""

    input_path: str
    output_path: str
    input_bytes: int
    output_bytes: int
    passes: tuple[PassRecord, ...]
    parity: ParityResult
    written: bool
    forced: bool
    feeds: str
    feed_notes: tuple[str, ...] = ()
    calibration: str = ""
    seconds: Mapping[str, float] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)

    @property
    def size_ratio(self) -> float:
        return self.input_bytes / self.output_bytes if self.output_bytes else math.nan

    @property
    def verdict(self) -> str:
        if not self.parity.checked:
            return "not checked (--no-parity)"
        if self.parity.passed:
            return "passed"
        return "FAILED, written anyway (--force)" if self.forced else "FAILED, nothing written"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["size_ratio"] = self.size_ratio
        data["verdict"] = self.verdict
        data["parity"]["passed"] = self.parity.passed
        for output, comparison in zip(data["parity"]["outputs"], self.parity.outputs, strict=True):
            output["auc_delta"] = comparison.auc_delta
        return _finite(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
