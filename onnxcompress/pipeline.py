"""Run the requested passes in order, timing each and recording sizes, node counts and stats."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import onnx_ir as ir

from onnxcompress.errors import CompressError, PassFailedError, UnsupportedModelError, UsageError
from onnxcompress.io import initializer_bytes
from onnxcompress.numerics.lstsq import NoFiniteRows
from onnxcompress.parity import LOSSLESS, LOSSY, Budget, loosest
from onnxcompress.passes.base import CompressionResult, PassContext
from onnxcompress.recipe import PassSpec
from onnxcompress.report import PassRecord

__all__ = ["Pipeline", "node_count"]

logger = logging.getLogger(__name__)


def node_count(model: ir.Model) -> int:
    """Nodes in the main graph and every subgraph."""
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


class Pipeline:
    """The passes of one run, each built from its validated spec."""

    def __init__(self, specs: Sequence[PassSpec], context: PassContext | None = None) -> None:
        self.specs = list(specs)
        self.context = context if context is not None else PassContext()

    @property
    def lossy(self) -> bool:
        return any(spec.pass_class.lossy for spec in self.specs)

    @property
    def budget(self) -> Budget:
        """The default parity budget: the loosest of the lossy passes' own (a pipeline is held to
        what its most lossy pass documents), or LOSSLESS when every pass is lossless. A lossless
        pass's budget checks only the absolute error, so it must not join the lossy ones: its
        unchecked rank and AUC figures would switch theirs off."""
        lossy = [spec.pass_class for spec in self.specs if spec.pass_class.lossy]
        if not lossy:
            return LOSSLESS
        return loosest([cls.budget or LOSSY for cls in lossy])

    def run(self, model: ir.Model, on_pass: Callable[[str], None] | None = None) -> list[PassRecord]:
        """Run every pass in place on ``model``; ``on_pass`` is called with each pass's name first."""
        records = []
        for spec in self.specs:
            if on_pass is not None:
                on_pass(spec.name)
            pass_ = spec.pass_class(spec.config, self.context)
            bytes_before, nodes_before = initializer_bytes(model), node_count(model)
            start = time.perf_counter()
            try:
                result = pass_(model)
            except CompressError:
                raise
            except ir.passes.PreconditionError as error:
                raise UnsupportedModelError(f"pass {spec.name} cannot run on this model: {error}") from error
            except NoFiniteRows as error:
                raise UsageError(
                    f"pass {spec.name}: every calibration row becomes NaN or infinity inside the model, so there "
                    f"is nothing to fit on; give --calib rows in the range the model was trained on"
                ) from error
            except Exception as error:
                raise PassFailedError(
                    f"pass {spec.name} failed: {type(error).__name__}: {error}; rerun with --debug for the "
                    f"traceback and report it"
                ) from error
            seconds = time.perf_counter() - start
            stats = result.stats if isinstance(result, CompressionResult) else {}
            records.append(
                PassRecord(
                    name=spec.name,
                    options=spec.options(),
                    modified=result.modified,
                    seconds=seconds,
                    initializer_bytes_before=bytes_before,
                    initializer_bytes_after=initializer_bytes(model),
                    nodes_before=nodes_before,
                    nodes_after=node_count(model),
                    stats=dict(stats),
                )
            )
            logger.info("pass %s: %.2fs, modified=%s", spec.name, seconds, result.modified)
        return records
