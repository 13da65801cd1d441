"""onnxcompress: compress recommender models in ONNX behind an onnxruntime parity gate."""

from __future__ import annotations

from onnxcompress.api import compress
from onnxcompress.errors import CompressError, ParityFailedError
from onnxcompress.io import load
from onnxcompress.passes import PASSES, register
from onnxcompress.report import Report

__all__ = ["PASSES", "CompressError", "ParityFailedError", "Report", "compress", "load", "register"]
__version__ = "0.1.0"
