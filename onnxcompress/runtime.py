"""onnxruntime sessions on files or in-memory models, and batched runs over feeds.

In-memory models are handed to onnxruntime without copying their large tensors: each one is
marked external in the serialized graph and supplied as an OrtValue over the (often memory-mapped)
numpy buffer, so a 2 GB model never becomes a 2 GB protobuf.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxcompress.errors import UnsupportedModelError, UsageError

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["OPT_LEVELS", "batches", "make_session", "run"]

logger = logging.getLogger(__name__)

OPT_LEVELS = ("disable", "basic", "extended", "all")
# Tensors at least this large are passed to onnxruntime as OrtValues instead of protobuf bytes.
_SIDE_LOAD_MIN_BYTES = 64 * 1024
_SIDE_LOAD_DTYPES = frozenset(
    {
        ir.DataType.FLOAT,
        ir.DataType.DOUBLE,
        ir.DataType.FLOAT16,
        ir.DataType.INT8,
        ir.DataType.UINT8,
        ir.DataType.INT16,
        ir.DataType.UINT16,
        ir.DataType.INT32,
        ir.DataType.UINT32,
        ir.DataType.INT64,
        ir.DataType.UINT64,
        ir.DataType.BOOL,
    }
)


def _ort_errors() -> tuple[type[Exception], ...]:
    """What onnxruntime raises for models and feeds it rejects; anything else is our own bug and
    must surface as an internal error, not as "onnxruntime cannot load it"."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    raised = (item for item in vars(state).values() if isinstance(item, type) and issubclass(item, Exception))
    return (*raised, RuntimeError)


def _session_options(opt_level: str, threads: int | None) -> ort.SessionOptions:
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[opt_level]
    # Fatal only: onnxruntime's own error log goes straight to fd 2, while every failure also
    # raises, and the CLI reports it as one line.
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def _serialize_side_loading(model: ir.Model, options: ort.SessionOptions) -> tuple[bytes, list[ort.OrtValue]]:
    """Serialize ``model`` with its large in-memory tensors moved into ``options`` as external
    initializers.

    Untouched tensors of the main graph that still live in one external-data folder stay external:
    onnxruntime reads them from that folder itself (memory-mapped, only the pages it needs), so a
    2 GB model costs no copy. Other external tensors are side-loaded, or embedded when they cannot
    be: onnxruntime resolves external paths in a model given as bytes only against that folder.
    """
    import onnxruntime as ort

    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    names: list[str] = []
    values: list[ort.OrtValue] = []
    folder = next(
        (
            str(tensor.base_dir)
            for tensor in (value.const_value for value in model.graph.initializers.values())
            if isinstance(tensor, ir.ExternalTensor) and tensor.base_dir and tensor.valid()
        ),
        None,
    )
    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    try:
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None or not isinstance(tensor, ir.ExternalTensor):
                    continue
                if graph is not model.graph or tensor.dtype not in _SIDE_LOAD_DTYPES or tensor.nbytes == 0:
                    swapped.append((value, tensor))
                    value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=value.name)
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None or tensor.dtype not in _SIDE_LOAD_DTYPES or tensor.nbytes == 0:
                continue
            if not value.uses() and not value.is_graph_output():
                # onnxruntime drops an unused initializer at load, then fails to find it to replace.
                continue
            if tensor.nbytes < _SIDE_LOAD_MIN_BYTES and not isinstance(tensor, ir.ExternalTensor):
                continue
            if isinstance(tensor, ir.ExternalTensor) and str(tensor.base_dir) == folder:
                continue
            array = np.ascontiguousarray(tensor.numpy())
            assert value.name is not None
            names.append(value.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(array))
            swapped.append((value, tensor))
            value.const_value = ir.ExternalTensor(
                "onnxcompress-in-memory",
                0,
                tensor.nbytes,
                tensor.dtype,
                shape=ir.Shape(tensor.shape.numpy()),
                name=value.name,
            )
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor
    if names:
        options.add_external_initializers(names, values)
    return proto.SerializeToString(), values


def make_session(source: Path | ir.Model, opt_level: str = "basic", threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session on a model file (memory-mapped by onnxruntime) or an ir.Model.

    Raises:
        UnsupportedModelError: onnxruntime cannot build a session (unknown op, bad graph).
    """
    import onnxruntime as ort

    options = _session_options(opt_level, threads)
    what = str(source) if isinstance(source, Path) else "the transformed model"
    try:
        if isinstance(source, Path):
            return ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        payload, buffers = _serialize_side_loading(source, options)
        session = ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
        # onnxruntime reads the side-loaded tensors in place: they must live as long as the session.
        session._onnxcompress_buffers = buffers  # type: ignore[attr-defined]
        return session
    except _ort_errors() as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnsupportedModelError(
            f"{what}: onnxruntime cannot load it ({message}); the model uses an op, type or opset "
            f"the installed onnxruntime does not support"
        ) from error


def batches(feeds: Mapping[str, np.ndarray], batch_size: int | None) -> Iterator[dict[str, np.ndarray]]:
    """Split feeds along axis 0 into batches of at most ``batch_size`` rows (all at once if None).

    Arrays with fewer rows than the longest (an input the model declares as ``[1]``, a flag shared
    by every row) and 0-d arrays go whole into every batch."""
    arrays = dict(feeds)
    total = max((array.shape[0] for array in arrays.values() if array.ndim), default=0)
    if batch_size is None or total <= batch_size:
        yield arrays
        return
    for start in range(0, total, batch_size):
        yield {
            name: array[start : start + batch_size] if array.ndim and array.shape[0] == total else array
            for name, array in arrays.items()
        }


def fixed_batch(session: ort.InferenceSession) -> int | None:
    """The rows every call must have when the model's inputs fix their first dimension (a model
    traced at batch 1, say): all the inputs that give a number there give the same one."""
    dims = {shape[0] for shape in (spec.shape for spec in session.get_inputs()) if shape and isinstance(shape[0], int)}
    return dims.pop() if len(dims) == 1 and min(dims) > 0 else None


def _as_array(result: object) -> np.ndarray:
    """An output as an array; a sequence of maps (a ZipMap's ``{class: probability}`` per row) as
    ``[rows, classes]`` in the maps' class order."""
    if isinstance(result, list) and result and isinstance(result[0], dict):
        classes = list(result[0])
        return np.array([[row[key] for key in classes] for row in result], dtype=np.float32)
    return np.asarray(result)


#: Rows per ``session.run`` call in the parity runs: bounded memory for any number of feed rows.
RUN_ROWS = 4096


def run(
    session: ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    output_names: Sequence[str] | None = None,
    batch_size: int | None = RUN_ROWS,
) -> dict[str, np.ndarray]:
    """Run ``session`` over the feeds in batches and concatenate each output along axis 0 (in
    batches of the model's own size when its inputs fix one, :func:`fixed_batch`).

    Raises:
        UsageError: onnxruntime rejected the feeds (shape or value out of range).
        UnsupportedModelError: onnxruntime failed inside a kernel for another reason.
    """
    names = list(output_names) if output_names is not None else [o.name for o in session.get_outputs()]
    pieces: dict[str, list[np.ndarray]] = {name: [] for name in names}
    # A model whose inputs fix the batch takes the rows that many at a time; a last, shorter batch
    # is filled up with copies of its rows and the copies' outputs dropped.
    fixed = fixed_batch(session)
    for batch in batches(feeds, fixed or batch_size):
        rows = max((array.shape[0] for array in batch.values() if array.ndim), default=0)
        short = fixed is not None and 0 < rows < fixed
        if short:
            batch = {
                name: np.resize(array, (fixed, *array.shape[1:])) if array.ndim and array.shape[0] == rows else array
                for name, array in batch.items()
            }
        try:
            results = session.run(names, batch)
        except _ort_errors() as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if "INVALID_ARGUMENT" in message or "out of bounds" in message or "indices" in message:
                raise UsageError(
                    f"onnxruntime rejected the feeds ({message}); check the feeds' shapes and id ranges"
                ) from error
            raise UnsupportedModelError(f"onnxruntime failed while running the model ({message})") from error
        for name, result in zip(names, results, strict=True):
            array = _as_array(result)
            pieces[name].append(array[:rows] if short and array.ndim and array.shape[0] == fixed else array)
    # A model whose one fixed-size input is not a batch (a [20] history) may give a 0-d output per call.
    return {
        name: parts[0] if len(parts) == 1 else np.concatenate([np.atleast_1d(part) for part in parts], axis=0)
        for name, parts in pieces.items()
    }
