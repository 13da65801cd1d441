"""onnxcompress: compress recommender models in ONNX behind an onnxruntime parity gate."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from onnxcompress.api import compress
    from onnxcompress.errors import CompressError, ParityFailedError
    from onnxcompress.io import load
    from onnxcompress.passes import PASSES, register
    from onnxcompress.report import Report

__all__ = ["PASSES", "CompressError", "ParityFailedError", "Report", "compress", "load", "register"]
__version__ = "0.1.0"

#: Imported on first use, so that the command line (``onnxcompress`` imports this package first)
#: has its Ctrl-C and SIGTERM handlers in place before numpy, onnx and onnxruntime load: an
#: interrupt during those seconds printed a traceback.
_EXPORTS = {
    "compress": "onnxcompress.api",
    "CompressError": "onnxcompress.errors",
    "ParityFailedError": "onnxcompress.errors",
    "load": "onnxcompress.io",
    "PASSES": "onnxcompress.passes",
    "register": "onnxcompress.passes",
    "Report": "onnxcompress.report",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'onnxcompress' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
