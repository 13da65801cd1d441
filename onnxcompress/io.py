"""Load and save policy on onnx-ir: validated loads, external data, atomic writes.

Loading memory-maps external data (nothing is copied until a pass touches a tensor). Saving goes
to a staging folder beside OUT and is moved into place only when the caller commits, so a failed
parity check, an error or an interrupt never leaves a partial OUT or data file behind.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import mmap
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxcompress.errors import InputModelError, InvalidOutputError, OutputPathError

__all__ = [
    "AUTO_EXTERNAL_BYTES",
    "ExternalRows",
    "StagedModel",
    "check_output_path",
    "data_file_for",
    "external_data_files",
    "initializer_bytes",
    "load",
    "references_data_file",
    "same_file",
    "stage",
]

logger = logging.getLogger(__name__)

# Models whose tensors add up to more than this are written with external data even when the
# input was a single file: a single-file model cannot exceed 2 GiB, and onnx-ir memory-maps
# external data but must parse an embedded tensor into memory.
AUTO_EXTERNAL_BYTES = 256 * 1024 * 1024
# Tensors smaller than this stay inside the .onnx file even when external data is written.
EXTERNAL_TENSOR_MIN_BYTES = 1024
STAGING_PREFIX = ".onnxcompress-staging-"


def data_file_for(out_path: Path) -> Path:
    """The external-data file written next to OUT: ``OUT.data`` (e.g. ``model.onnx.data``)."""
    return out_path.with_name(out_path.name + ".data")


def _tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value


def initializer_bytes(model: ir.Model) -> int:
    """Bytes of all initializers, from dtype and shape only (no tensor is read)."""
    return sum(tensor.nbytes for tensor in _tensors(model))


def external_data_files(model: ir.Model) -> set[Path]:
    """Resolved paths of every external-data file the model's tensors point into."""
    return {Path(tensor.path).resolve() for tensor in _tensors(model) if isinstance(tensor, ir.ExternalTensor)}


def _check_external_tensor(tensor: ir.ExternalTensor, model_dir: Path, model_name: str) -> None:
    location = tensor.location
    fix = f"re-export {model_name} with its external data next to it"
    if Path(location).is_absolute():
        raise InputModelError(
            f"{model_name}: tensor {tensor.name!r} points to the absolute path {location!r}; "
            f"external data must be a relative path inside the model's folder ({fix})"
        )
    target = model_dir / location
    if not os.path.normpath(target).startswith(os.path.normpath(model_dir) + os.sep):
        raise InputModelError(
            f"{model_name}: tensor {tensor.name!r} points outside the model's folder ({location!r}); "
            f"refusing to read it ({fix})"
        )
    resolved = target.resolve()
    if not resolved.is_relative_to(model_dir.resolve()):
        raise InputModelError(
            f"{model_name}: external data {location!r} of tensor {tensor.name!r} is a link that leaves "
            f"the model's folder; refusing to read it (copy the data file into the folder)"
        )
    if not resolved.is_file():
        raise InputModelError(
            f"{model_name}: external data file {location!r} (tensor {tensor.name!r}) is missing; "
            f"copy it next to the model"
        )
    if tensor.length is not None and tensor.length != tensor.nbytes:
        raise InputModelError(
            f"{model_name}: tensor {tensor.name!r} declares {tensor.length} bytes of external data but its "
            f"dtype and shape need {tensor.nbytes}; the model file is corrupted, re-export it"
        )
    needed = (tensor.offset or 0) + tensor.nbytes
    size = resolved.stat().st_size
    if size < needed:
        raise InputModelError(
            f"{model_name}: external data file {location!r} has {size} bytes but tensor {tensor.name!r} "
            f"needs {needed}; the data file is truncated or belongs to another model"
        )


def _embedded_tensors(model: ir.Model) -> Iterator[ir.TensorProtoTensor]:
    """Tensors stored inside the .onnx file: initializers and tensor attributes, in every graph."""
    for tensor in _tensors(model):
        if isinstance(tensor, ir.TensorProtoTensor):
            yield tensor
    graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for attribute in node.attributes.values():
                if attribute.type == ir.AttributeType.TENSOR:
                    values = [attribute.value]
                elif attribute.type == ir.AttributeType.TENSORS:
                    values = list(attribute.value)
                else:
                    continue
                yield from (value for value in values if isinstance(value, ir.TensorProtoTensor))


def _check_embedded_tensor(tensor: ir.TensorProtoTensor, model_name: str) -> None:
    """An embedded tensor must hold exactly what its dtype and shape say, or passes read garbage."""
    proto = tensor.raw
    try:
        if proto.data_location == onnx.TensorProto.EXTERNAL:
            raise ValueError("it is marked external but has no usable external data entries")
        if proto.HasField("raw_data"):
            if len(proto.raw_data) != tensor.nbytes:
                raise ValueError(f"it holds {len(proto.raw_data)} bytes but its dtype and shape need {tensor.nbytes}")
        else:
            tensor.numpy()  # typed fields (float_data, int64_data, ...): decoding checks the count
    except Exception as error:
        raise InputModelError(
            f"{model_name}: tensor {tensor.name!r} ({tensor.dtype.name}{list(proto.dims)}) is inconsistent: "
            f"{_first_line(error)}; the file is corrupted, re-export the model"
        ) from error


def _densify_sparse_initializers(graph: onnx.GraphProto) -> None:
    """Store the graph's ``sparse_initializer`` entries as dense initializers: onnx-ir keeps no
    sparse tensors, and dropping them left the nodes reading them without an input (onnxruntime
    then refused the written model). Lossless; the ``sparse`` pass stores zeros compactly again."""
    for sparse in graph.sparse_initializer:
        values = ir.serde.deserialize_tensor(sparse.values).numpy()
        indices = ir.serde.deserialize_tensor(sparse.indices).numpy().astype(np.int64)
        shape = tuple(int(dim) for dim in sparse.dims)
        dense = np.zeros(math.prod(shape), dtype=values.dtype)
        # Indices are linear positions ``[nnz]`` or coordinates ``[nnz, rank]``.
        flat = indices if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), shape)
        dense[flat] = values.reshape(-1)
        graph.initializer.append(ir.serde.serialize_tensor(ir.tensor(dense.reshape(shape), name=sparse.values.name)))
    del graph.sparse_initializer[:]


def load(path: str | os.PathLike[str]) -> ir.Model:
    """Load an ONNX model after checking the file, its external data and the ONNX checker.

    Raises:
        InputModelError: with a one-line message naming the problem and the fix.
    """
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise InputModelError(f"{name}: no such file; check the path")
    if not path.is_file():
        raise InputModelError(f"{name}: is not a file; give the path of a .onnx model")
    if path.stat().st_size == 0:
        raise InputModelError(f"{name}: the file is empty; re-export the model")
    try:
        proto = onnx.load(path, load_external_data=False)
        detached = _detach_zipmaps(proto)
        _check_no_maps(proto, name)
        _densify_sparse_initializers(proto.graph)
        model = ir.serde.deserialize_model(proto)
    except InputModelError:
        raise
    except Exception as error:
        raise InputModelError(
            f"{name}: not a readable ONNX model (the file is truncated, corrupted or not ONNX: "
            f"{_first_line(error)}); re-export it"
        ) from error
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    if detached:
        model.meta[DETACHED_OUTPUTS] = detached
    if not model.graph.outputs:
        raise InputModelError(f"{name}: not an ONNX model with a graph (no graph outputs); re-export it")
    model_dir = path.resolve().parent
    for tensor in _tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            _check_external_tensor(tensor, model_dir, name)
    for tensor in _embedded_tensors(model):
        _check_embedded_tensor(tensor, name)
    try:
        # What every save and session does first (external tensors are only referenced: 8 ms for an
        # 8.6 MB single-file model). protobuf hands invalid UTF-8 text back as bytes, which fails here.
        ir.serde.serialize_model(model)
    except Exception as error:
        raise InputModelError(
            f"{name}: the model cannot be written back as ONNX ({_root_cause(error)}); a name, doc string "
            f"or metadata entry is probably not valid UTF-8 text; re-export it"
        ) from error
    try:
        onnx.checker.check_model(str(path))
    except Exception as error:
        raise InputModelError(
            f"{name}: fails the ONNX checker: {_first_line(error)}; fix the graph or re-export the model"
        ) from error
    return model


#: ``model.meta`` key of the ZipMap nodes taken off at load, put back at save.
DETACHED_OUTPUTS = "onnxcompress.detached_outputs"


@dataclass(frozen=True)
class DetachedOutput:
    """A graph output made by an ``ai.onnx.ml.ZipMap`` (skl2onnx's default for classifiers: one
    ``{class: probability}`` map per row), which onnx-ir cannot represent. The passes see the
    probability tensor it reads as that output, in its place; saving puts the node back."""

    node: bytes
    output: bytes


def _has_map(type_proto: onnx.TypeProto) -> bool:
    kind = type_proto.WhichOneof("value")
    if kind == "map_type":
        return True
    if kind in ("sequence_type", "optional_type"):
        return _has_map(getattr(type_proto, kind).elem_type)
    return False


def _detach_zipmaps(proto: onnx.ModelProto) -> tuple[DetachedOutput, ...]:
    """Take off every ZipMap that makes a graph output, its probability input standing in for it."""
    graph = proto.graph
    detached = []
    for node in list(graph.node):
        if node.op_type != "ZipMap" or node.domain != "ai.onnx.ml" or len(node.input) != 1 or len(node.output) != 1:
            continue
        positions = [index for index, output in enumerate(graph.output) if output.name == node.output[0]]
        taken = {output.name for output in graph.output}
        if len(positions) != 1 or node.input[0] in taken:
            continue
        position = positions[0]
        original = graph.output[position]
        classes = [attribute for attribute in node.attribute if attribute.name.startswith("classlabels")]
        width = len(classes[0].ints or classes[0].strings) if classes else None
        probabilities = onnx.ValueInfoProto(name=node.input[0])
        tensor_type = probabilities.type.tensor_type
        tensor_type.elem_type = onnx.TensorProto.FLOAT
        tensor_type.shape.dim.add()  # rows
        if width:
            tensor_type.shape.dim.add().dim_value = width
        detached.append(DetachedOutput(node.SerializeToString(), original.SerializeToString()))
        graph.output.remove(original)
        graph.output.insert(position, probabilities)
        graph.node.remove(node)
    return tuple(detached)


def _check_no_maps(proto: onnx.ModelProto, name: str) -> None:
    for kind, values in (("input", proto.graph.input), ("output", proto.graph.output)):
        for value in values:
            if _has_map(value.type):
                raise InputModelError(
                    f"{name}: graph {kind} {value.name!r} is a map, which onnxcompress cannot represent; "
                    f"export the model with tensor {kind}s (skl2onnx: options={{'zipmap': False}})"
                )
    for value in proto.graph.value_info:
        if _has_map(value.type):
            raise InputModelError(
                f"{name}: value {value.name!r} is a map, which onnxcompress cannot represent; export the "
                f"model with tensors only"
            )


def _reattach(model_path: Path, detached: tuple[DetachedOutput, ...]) -> None:
    """Put the ZipMap nodes taken off at load back onto the saved file (external data untouched)."""
    proto = onnx.load(model_path, load_external_data=False)
    graph = proto.graph
    for item in detached:
        node, output = onnx.NodeProto(), onnx.ValueInfoProto()
        node.ParseFromString(item.node)
        output.ParseFromString(item.output)
        stand_in = next(value for value in graph.output if value.name == node.input[0])
        position = list(graph.output).index(stand_in)
        graph.output.remove(stand_in)
        graph.output.insert(position, output)
        graph.node.append(node)
    if not any(opset.domain == "ai.onnx.ml" for opset in proto.opset_import):
        proto.opset_import.append(onnx.OperatorSetIdProto(domain="ai.onnx.ml", version=1))
    onnx.save(proto, model_path)


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    line = next((part.strip() for part in text.splitlines() if part.strip()), text)
    return line if len(line) <= 300 else line[:297] + "..."


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: equal once links and ``..`` are resolved, or one inode (a
    hard link). A path that does not exist yet is compared by its resolved name."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.samefile(b)
    except OSError:
        return False


def _proto_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in ``graph`` and its subgraphs: initializers and tensor attributes."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _attribute_tensors(node)


def _attribute_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("g"):
            yield from _proto_tensors(attribute.g)
        for graph in attribute.graphs:
            yield from _proto_tensors(graph)


def references_data_file(model_path: Path, data_file: Path) -> bool:
    """Whether the model file at ``model_path`` keeps tensors in ``data_file``.

    Only the model's external-data locations are read (no tensor, no validation): a file that is
    missing or not a readable model references nothing."""
    names = {data_file.name.encode(), data_file.resolve().name.encode()}
    try:
        with open(model_path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            # Every location spells the data file's name, so a model whose bytes lack it cannot
            # point at it; the scan spares parsing a large single-file model.
            if not any(view.find(name) >= 0 for name in names):
                return False
        proto = onnx.load(model_path, load_external_data=False)
    except Exception:  # missing, empty, a folder, not ONNX: then it references no data file
        return False
    function_tensors = (
        tensor for function in proto.functions for node in function.node for tensor in _attribute_tensors(node)
    )
    for tensor in itertools.chain(_proto_tensors(proto.graph), function_tensors):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        if location and same_file(model_path.parent / location, data_file):
            return True
    return False


def _foreign_data_error(out_path: Path, data_file: Path) -> OutputPathError:
    return OutputPathError(
        f"{out_path}: {data_file} already exists and is not OUT's own external data (OUT does not reference "
        f"it, so it may belong to another model); remove it or choose another OUT name"
    )


def check_output_path(in_path: Path, out_path: Path, input_data_files: set[Path]) -> None:
    """Refuse OUT when writing it could damage the input or another file, or cannot succeed."""
    out_resolved = out_path.resolve()
    if out_resolved == in_path.resolve():
        raise OutputPathError(f"{out_path}: OUT is the input model; choose a different output path")
    out_data = data_file_for(out_resolved)
    for data_file in input_data_files:
        if data_file in (out_resolved, out_data):
            raise OutputPathError(
                f"{out_path}: writing OUT would overwrite the input's external data {data_file.name}; "
                f"choose a different output name"
            )
    if out_path.is_dir():
        raise OutputPathError(f"{out_path}: is a directory; give a file name such as {out_path / 'model.onnx'}")
    if out_resolved.exists() and not out_resolved.is_file():
        # A device or a pipe would be replaced by the renamed model (OUT=/dev/null destroyed it).
        raise OutputPathError(f"{out_path}: is not a regular file (a device, pipe or socket); give a file name")
    folder = out_resolved.parent
    if not folder.is_dir():
        raise OutputPathError(f"{out_path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{out_path}: the folder {folder} is not writable; choose another output path")
    # Saving replaces OUT.data, or removes it when the new OUT needs none: safe only for the data of
    # the OUT being replaced. Any other file under that name (another model's data, left without
    # its model) is refused now, before any work, rather than destroyed at the end.
    if os.path.lexists(out_data) and not references_data_file(out_resolved, out_data):
        raise _foreign_data_error(out_path, out_data)


@dataclass
class StagedModel:
    """A model saved into a staging folder beside OUT, not yet visible under OUT's name."""

    staging_dir: Path
    model_path: Path
    data_path: Path | None
    out_path: Path
    #: The previous OUT's own data file, removed once the new OUT (which needs none) is in place.
    stale_data: Path | None = None
    #: Set once OUT is in place (a signal held during the commit is raised after that).
    committed: bool = False

    @property
    def bytes_on_disk(self) -> int:
        size = self.model_path.stat().st_size
        return size + (self.data_path.stat().st_size if self.data_path else 0)

    def commit(self) -> None:
        """Move the staged files into place; OUT's data file first, so OUT never points at nothing.

        A SIGINT/SIGTERM that comes meanwhile takes effect once both are in place (``committed``
        then tells the caller that OUT is complete)."""
        final_data = data_file_for(self.out_path)
        try:
            with _signals_deferred():
                if self.data_path is not None:
                    self.data_path.replace(final_data)
                self.model_path.replace(self.out_path)
                self.committed = True
                if self.stale_data is not None:
                    # The previous OUT referenced it; left behind, it would look like OUT's data.
                    self.stale_data.unlink(missing_ok=True)
        finally:
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.staging_dir, ignore_errors=True)


_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the renames of a commit run, so OUT and its data stay paired.

    The signals are recorded by handlers of our own and raised again once the block is done: a
    signal mask would not do, since the kernel hands a process's signal to any thread that does not
    block it (onnxruntime's and OpenBLAS's pools), and Python then raises KeyboardInterrupt in the
    main thread wherever it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {number: signal.getsignal(number) for number in _DEFERRED_SIGNALS}
    for number in _DEFERRED_SIGNALS:
        signal.signal(number, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        if received:
            signal.raise_signal(received[0])


def _uses_external_data(model: ir.Model, external_data: str) -> bool:
    if external_data == "always":
        return True
    if external_data == "never":
        return False
    has_external = any(isinstance(tensor, ir.ExternalTensor) for tensor in _tensors(model))
    return has_external or initializer_bytes(model) > AUTO_EXTERNAL_BYTES


def _embed_external_tensors(model: ir.Model) -> None:
    """Read external tensors into memory so a single-file save does not point at the input's data."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                value.const_value = ir.tensor(tensor.numpy(), name=tensor.name)


def stage(model: ir.Model, out_path: Path, external_data: str = "auto") -> StagedModel:
    """Save ``model`` into a staging folder beside OUT (same file system, so commit is a rename).

    Args:
        external_data: ``auto`` (external when the input had it or tensors exceed 256 MiB),
            ``always`` or ``never``.

    Raises:
        OutputPathError: the folder is not writable or the disk is full.
    """
    out_path = out_path.resolve()
    try:
        staging_dir = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_path.parent))
    except OSError as error:
        raise OutputPathError(f"{out_path}: cannot write in {out_path.parent}: {error.strerror}") from error
    try:
        model_path = staging_dir / out_path.name
        data_path = staging_dir / data_file_for(out_path).name
        if _uses_external_data(model, external_data):
            ir.save(
                model,
                model_path,
                external_data=data_path.name,
                size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES,
            )
        else:
            if initializer_bytes(model) > 2**31 - 2**20:
                raise OutputPathError(
                    f"{out_path}: the model's tensors exceed the 2 GiB single-file limit; "
                    f"use --external-data auto or always"
                )
            _embed_external_tensors(model)
            ir.save(model, model_path)
        detached = model.meta.get(DETACHED_OUTPUTS)
        if detached:
            _reattach(model_path, detached)
        try:
            # onnxruntime runs some graphs the checker refuses (an output without its type); other
            # tools will not, so such a file is never handed over.
            onnx.checker.check_model(str(model_path))
        except Exception as error:
            raise InvalidOutputError(
                f"{out_path}: the compressed model fails the ONNX checker ({_first_line(error)}); nothing "
                "written: a bug, rerun with --debug and report it"
            ) from error
        if data_path.exists() and data_path.stat().st_size == 0:
            # ``always`` with every tensor under the size threshold: no tensor went out, and an
            # empty data file that OUT does not reference must not appear beside it.
            data_path.unlink()
        writes_data = data_path.exists()
        final_data = data_file_for(out_path)
        own_data = os.path.lexists(final_data) and references_data_file(out_path, final_data)
        if writes_data and os.path.lexists(final_data) and not own_data:
            raise _foreign_data_error(out_path, final_data)
        # Still inside the try: an interrupt that lands while the result is handed back must not
        # leave the folder behind (a signal sent as soon as the staged files appear hit this).
        return StagedModel(
            staging_dir=staging_dir,
            model_path=model_path,
            data_path=data_path if writes_data else None,
            out_path=out_path,
            stale_data=final_data if own_data and not writes_data else None,
        )
    except OSError as error:
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise OutputPathError(
            f"{out_path}: writing failed: {error.strerror or error}; free space or choose another output folder"
        ) from error
    except BaseException:
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise


class ExternalRows:
    """An external tensor as rows ``[shape[0], rest]`` read with ``pread`` on demand.

    Reading a memory-mapped tensor makes every page it touches count towards the process's
    resident memory until it is unmapped; plain reads leave the data in the page cache instead.
    Slices must be contiguous row ranges.
    """

    def __init__(self, tensor: ir.ExternalTensor) -> None:
        dims = [int(d) for d in tensor.shape.numpy()]
        rows = dims[0] if dims else 1
        self.size = int(np.prod(dims)) if dims else 1
        self.shape = (rows, self.size // rows if rows else 0)
        self.dtype = np.dtype(tensor.dtype.numpy()).newbyteorder("<")
        self._path = tensor.path
        self._offset = tensor.offset or 0
        self._row_bytes = self.dtype.itemsize * self.shape[1]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("ExternalRows reads contiguous row ranges only")
        count = max(stop - start, 0)
        with open(self._path, "rb") as handle:
            data = os.pread(handle.fileno(), count * self._row_bytes, self._offset + start * self._row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(count, self.shape[1]).astype(self.dtype.newbyteorder("="))
