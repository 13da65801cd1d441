"""Errors a user can act on, each with the exit code the CLI returns for it.

Every message is one line that names the problem and the fix; the CLI prints it without a
traceback unless ``--debug`` is given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from onnxcompress.report import Report

__all__ = [
    "EXIT_CODES",
    "CompressError",
    "InputModelError",
    "InterruptedAfterWrite",
    "InvalidOutputError",
    "OutputPathError",
    "ParityFailedError",
    "PassFailedError",
    "UnsupportedModelError",
    "UsageError",
]


class CompressError(Exception):
    """Base class: a failure that is reported as one line and an exit code."""

    exit_code: ClassVar[int] = 2


class UsageError(CompressError):
    """Unknown pass or option, a badly formed value, bad feeds or labels."""

    exit_code = 2


class InputModelError(CompressError):
    """The input file is missing, empty, truncated, not ONNX, invalid, or its external data is bad."""

    exit_code = 2


class OutputPathError(CompressError):
    """OUT cannot be written: it is the input, its folder is missing or read-only, or the disk is full."""

    exit_code = 2


class UnsupportedModelError(CompressError):
    """The model is valid ONNX but uses something a requested pass or onnxruntime cannot handle."""

    exit_code = 3


class PassFailedError(CompressError):
    """A pass raised an unexpected error: a bug of ours, not a model it cannot handle (that is
    ``UnsupportedModelError``); nothing was written."""

    exit_code = 4


class InvalidOutputError(CompressError):
    """The compressed model fails the ONNX checker: a bug of ours; nothing was written."""

    exit_code = 4


class ParityFailedError(CompressError):
    """The compressed model failed the parity gate and was not written."""

    exit_code = 1

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report


class InterruptedAfterWrite(KeyboardInterrupt):
    """A signal held while OUT and its data were moved into place, delivered once both were: OUT is
    complete, the run was still interrupted."""


EXIT_CODES: dict[int, str] = {
    0: "compressed model written (parity passed, or --force / --no-parity as the report says)",
    1: "parity gate failed: nothing written (rerun with --force to write anyway)",
    2: "usage or input error: bad option, pass, feeds, labels, input model or output path",
    3: "onnxruntime or a pass cannot handle the model: an unsupported op or type, or a graph error only "
    "onnxruntime detects (the message names it)",
    130: "interrupted (SIGINT/SIGTERM): nothing written, unless the signal came while OUT was being moved "
    "into place (the message then says OUT is complete)",
}
