"""Feeds for parity and calibration: read from .npz, or synthesized from the graph's signature.

Synthesized integer inputs that index embedding tables are drawn inside the rows of the table they
reach: the input is followed through Cast, Add/Sub of constant offsets, reshapes, Concat and
column-selecting Gathers to every Gather whose data is an initializer, and the tightest valid range
wins. The activation-capture helper runs onnxruntime with chosen intermediate values exposed as
outputs, batch by batch.
"""

from __future__ import annotations

import logging
import math
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxcompress import runtime
from onnxcompress.errors import InputModelError, UsageError
from onnxcompress.graph import NO_WEIGHTS_HINT, constant_array

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "DEFAULT_DIM",
    "DEFAULT_ROWS",
    "Calibration",
    "Feeds",
    "InputSpec",
    "graph_inputs",
    "id_ranges",
    "load_feeds",
    "load_labels",
    "synthesize_feeds",
]

logger = logging.getLogger(__name__)

#: Rows synthesized for a symbolic first (batch) dimension.
DEFAULT_ROWS = 512
#: Size given to any other symbolic dimension.
DEFAULT_DIM = 16
#: Integer inputs that reach no embedding table are drawn from [0, this).
DEFAULT_INT_HIGH = 10
#: Synthesized feeds larger than this (counting 8 bytes per value, as drawn) are refused.
MAX_SYNTHESIZED_BYTES = 1 << 30
#: Id ranges wider than this are sampled in windows spread over the whole table: a random id in
#: a memory-mapped table pages in a whole folio (about 1 MB here), so 512 uniform ids over five
#: 512 MB tables would map 2 GB; windows keep it near 100 MB and still reach every region.
WINDOWED_ID_RANGE = 1 << 17
ID_WINDOWS = 32
ID_WINDOW_ROWS = 64
_INDEX_TRANSPARENT = frozenset(
    {
        "Cast",
        "Identity",
        "Reshape",
        "Flatten",
        "Unsqueeze",
        "Squeeze",
        "Concat",
        "Slice",
        "Split",
        "Expand",
        "Tile",
        "Transpose",
        "Clip",
    }
)


@dataclass(frozen=True)
class InputSpec:
    """A graph input that must be fed: name, numpy dtype and shape (str or None for symbolic dims)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None

    def describe(self) -> str:
        dims = "?" if self.shape is None else ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype.name}[{dims}]"


def graph_inputs(model: ir.Model) -> list[InputSpec]:
    """The inputs a caller must feed (inputs that are also initializers have defaults and are optional)."""
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer() or value.name is None:
            continue
        try:
            dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        except TypeError:  # UNDEFINED, or a type numpy has no equivalent for
            raise InputModelError(
                f"graph input {value.name!r} has element type {value.dtype}, which no runtime can be fed; "
                f"fix the model's input types and re-export it"
            ) from None
        shape = (
            None
            if value.shape is None
            else tuple(
                dim if isinstance(dim, int) else (dim.value if isinstance(dim, ir.SymbolicDim) else None)
                for dim in value.shape
            )
        )
        specs.append(InputSpec(value.name, np.dtype(dtype), shape))
    return specs


def fixed_batch(specs: Sequence[InputSpec]) -> int | None:
    """The batch a model fixes when every input of rank 1 or more declares the same number as its
    first dimension (a model traced at batch 1): feeds may then hold any number of rows, which
    ``runtime.run`` feeds it that many at a time."""
    firsts = [spec.shape[0] for spec in specs if spec.shape]
    if not firsts or not all(isinstance(dim, int) for dim in firsts) or len(set(firsts)) != 1:
        return None
    batch = firsts[0]
    return batch if isinstance(batch, int) and batch > 0 else None


@dataclass(frozen=True)
class Feeds:
    """Named input arrays that share their first (row) dimension, and where they came from."""

    arrays: Mapping[str, np.ndarray]
    source: str
    notes: tuple[str, ...] = ()

    @property
    def rows(self) -> int:
        """Examples: the longest first dimension (an input the model declares as ``[1]`` is shared
        by every row, and a 0-d one counts as one row)."""
        return max((array.shape[0] for array in self.arrays.values() if array.ndim), default=1)

    def _by_row(self, part: slice) -> dict[str, np.ndarray]:
        rows = self.rows
        return {
            name: array[part] if array.ndim and array.shape[0] == rows else array for name, array in self.arrays.items()
        }

    def head(self, rows: int) -> Feeds:
        """The first ``rows`` rows (all of them if there are fewer)."""
        if rows >= self.rows:
            return self
        return Feeds(self._by_row(slice(rows)), f"{self.source}, first {rows} rows", self.notes)

    def tail(self, rows: int) -> Feeds:
        """The rows from ``rows`` on (none if there are fewer)."""
        return Feeds(self._by_row(slice(rows, None)), f"{self.source}, rows {rows} on", self.notes)


def _not_a_file(path: Path, what: str, wanted: str) -> UsageError | None:
    """The error for a path that is no regular file (missing, a folder, a device), else None."""
    if path.is_dir():
        return UsageError(f"{what}: is a directory; give {wanted}")
    if not path.exists():
        return UsageError(f"{what}: no such file; give {wanted}")
    if not path.is_file():
        return UsageError(f"{what}: is not a regular file; give {wanted}")
    return None


def _read_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    problem = _not_a_file(path, what, "an .npz with one array per graph input")
    if problem is not None:
        raise problem
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            magic = handle.read(6)
        kind = (
            "a single array (.npy), not an .npz keyed by input name"
            if magic == b"\x93NUMPY"
            else "not a readable .npz file (truncated, corrupted or another format)"
        )
        raise UsageError(f"{what}: {kind}; save the inputs with numpy.savez(path, name=array, ...)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise UsageError(f"{what}: not a readable .npz file ({error}); save it with numpy.savez") from None


def _check_feeds(
    arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec], what: str, hint: str | None = None
) -> None:
    expected = ", ".join(spec.describe() for spec in specs)
    wanted = {spec.name for spec in specs}
    missing = sorted(wanted - set(arrays))
    extra = sorted(set(arrays) - wanted)
    if missing or extra:
        problem = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unknown {', '.join(extra)}" if extra else "",
            )
            if part
        )
        if missing and hint:
            raise UsageError(f"{what}: {problem}; {hint}")
        raise UsageError(f"{what}: {problem}; the model expects {expected}")
    batch = fixed_batch(specs)
    for spec in specs:
        array = arrays[spec.name]
        if spec.dtype.kind == "O" and array.dtype.kind in "US":
            continue  # numpy strings; load_feeds hands them to onnxruntime as the str objects it takes
        if array.dtype != spec.dtype:
            raise UsageError(
                f"{what}: {spec.name} is {array.dtype.name} but the model expects {spec.describe()}; "
                f"convert it with .astype(np.{spec.dtype.name})"
            )
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise UsageError(
                    f"{what}: {spec.name} has rank {array.ndim} (shape {list(array.shape)}) but the model "
                    f"expects {spec.describe()}"
                )
            for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
                # A fixed batch takes any number of rows, run that many at a time.
                if isinstance(want, int) and got != want and not (axis == 0 and batch is not None):
                    raise UsageError(
                        f"{what}: {spec.name} has {got} in dimension {axis} but the model expects {spec.describe()}"
                    )
    # Inputs whose first dimension the model fixes while others are batched are shared by every row.
    shared = {spec.name for spec in specs if batch is None and spec.shape and isinstance(spec.shape[0], int)}
    rows = {array.shape[0] for name, array in arrays.items() if array.ndim and name not in shared}
    if 0 in rows:
        raise UsageError(f"{what}: the inputs have no rows; give at least one example per input")
    if len(rows) > 1:
        sizes = ", ".join(f"{name} {array.shape[0]}" for name, array in arrays.items() if array.ndim)
        raise UsageError(
            f"{what}: the inputs have different numbers of rows ({sizes}); rows are split along the first "
            "axis, so every input needs one per example (export bags of ids as [batch, length], not as "
            "flat ids with offsets)"
        )


def load_feeds(path: Path, model: ir.Model, what: str = "--feeds") -> Feeds:
    """Read and validate an .npz whose keys are the graph input names."""
    arrays = _read_npz(Path(path), f"{what} {path}")
    hint = NO_WEIGHTS_HINT if not model.graph.initializers else None
    specs = graph_inputs(model)
    _check_feeds(arrays, specs, f"{what} {path}", hint)
    # A string input (ids a LabelEncoder maps) is fed str objects; an .npz stores them as numpy strings.
    strings = {spec.name for spec in specs if spec.dtype.kind == "O" and arrays[spec.name].dtype.kind in "US"}
    arrays = {name: array.astype(object) if name in strings else array for name, array in arrays.items()}
    rows = Feeds(arrays, "").rows if arrays else 0
    return Feeds(arrays, f"{path} ({rows} rows)")


def check_finite(feeds: Feeds, what: str) -> None:
    """Calibration rows feed statistics (scales, Hessians, least squares) that one NaN or infinity
    spoils for a whole layer: refuse them up front rather than fail parity with a broken model."""
    for name, array in feeds.arrays.items():
        if array.dtype.kind != "f":
            continue
        bad = ~np.isfinite(array)
        if bad.any():
            rows = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1)) if array.ndim else np.array([0])
            raise UsageError(
                f"{what}: {name} holds NaN or infinite values in {rows.size} of {feeds.rows} rows (first: row "
                f"{int(rows[0])}); calibration needs finite rows: drop or impute them"
            )


def load_labels(path: Path, rows: int, what: str = "--labels", aligned_with: str = "the feeds") -> np.ndarray:
    """Read binary labels (.npy) aligned with the rows of ``aligned_with``."""
    path = Path(path)
    problem = _not_a_file(path, f"{what} {path}", f"a .npy array with one label per row of {aligned_with}")
    if problem is not None:
        raise problem
    with open(path, "rb") as handle:
        if handle.read(6) != b"\x93NUMPY":
            raise UsageError(f"{what} {path}: not a .npy file; save the labels with numpy.save(path, labels)")
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise UsageError(f"{what} {path}: not a readable .npy file ({error}); save it with numpy.save") from None
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "biuf":
        raise UsageError(f"{what} {path}: expected a numeric .npy array of 0/1 labels")
    labels = labels.reshape(-1)
    if labels.size != rows:
        raise UsageError(f"{what} {path}: has {labels.size} labels but {aligned_with} have {rows} rows; align them")
    values = np.unique(labels)
    if not np.isin(values, (0, 1)).all():
        raise UsageError(f"{what} {path}: labels must be 0 or 1, found values such as {values[:5].tolist()}")
    if len(values) < 2:  # the AUC would be undefined and its budget silently unchecked
        raise UsageError(
            f"{what} {path}: every label is {int(values[0])}; AUC needs rows of both classes, so give such rows "
            "or drop the labels"
        )
    return labels.astype(np.float32)


# --- id ranges --------------------------------------------------------------------------------------

Bounds = tuple[np.ndarray, np.ndarray]  # lower (inclusive), upper (exclusive); scalar or per last axis


def _unbounded() -> Bounds:
    return np.array(-np.inf), np.array(np.inf)


def _collapse(bounds: Bounds) -> Bounds:
    return np.array(bounds[0].max()), np.array(bounds[1].min())


def _intersect(a: Bounds, b: Bounds) -> Bounds:
    try:
        return np.maximum(a[0], b[0]), np.minimum(a[1], b[1])
    except ValueError:
        return _intersect(_collapse(a), _collapse(b))


def _value_bounds(value: ir.Value, depth: int = 0) -> Bounds:
    """Valid values of ``value``'s elements implied by the Gathers it reaches."""
    bounds = _unbounded()
    if depth > 32:
        return bounds
    for node, index in value.uses():
        bounds = _intersect(bounds, _use_bounds(node, index, depth))
    return bounds


#: Ops a compressed table passes through on its way to a Gather without changing its row count
#: (decoding codes to floats: casts, scales, zero points, unpacking packed bits along the rows).
_ROW_PRESERVING = frozenset(
    {"Cast", "Mul", "Sub", "Add", "Div", "DequantizeLinear", "Identity", "BitShift", "BitwiseAnd"}
)


def _table_rows(table: ir.Value, axis: int, depth: int = 0) -> int | None:
    """Rows of the table a Gather reads on ``axis``: from the initializer, or, for a table decoded
    from compressed storage at load, from the codes it is decoded from or its share of a stack's
    Split (row axis 0 only)."""
    if table.const_value is not None:
        dims = table.const_value.shape.numpy()  # an initializer's shape is static
        if not -len(dims) <= axis < len(dims):
            return None  # an invalid axis: onnxruntime names it when it runs the model
        return int(dims[axis])
    producer = table.producer()
    if axis != 0 or producer is None or depth > 16 or not producer.inputs or producer.inputs[0] is None:
        return None
    if producer.op_type in _ROW_PRESERVING or (
        producer.op_type in ("Unsqueeze", "Reshape") and _keeps_first_axis(producer)
    ):
        return _table_rows(producer.inputs[0], 0, depth + 1)
    if producer.op_type == "Split" and producer.attributes.get_int("axis", 0) == 0 and len(producer.inputs) > 1:
        # Tables stacked into one and split apart after decoding: each is its own rows of the stack.
        sizes = constant_array(producer.inputs[1])
        index = table.index()
        if sizes is not None and index is not None and index < sizes.size:
            return int(sizes.reshape(-1)[index])
    return None


def _keeps_first_axis(node: ir.Node) -> bool:
    """Unsqueeze on trailing axes, or Reshape whose target keeps dimension 0 (a literal 0)."""
    argument = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if argument is None:
        return False
    if node.op_type == "Unsqueeze":
        return bool((argument != 0).all())
    return argument.size > 0 and int(argument.reshape(-1)[0]) == 0


def _use_bounds(node: ir.Node, index: int, depth: int) -> Bounds:
    op = node.op_type
    if op == "Gather" and index == 1:
        table = node.inputs[0]
        axis = node.attributes.get_int("axis", 0)
        rows = _table_rows(table, axis) if table is not None else None
        if rows is None:
            return _unbounded()
        return np.array(0.0), np.array(float(rows))
    if op == "Gather" and index == 0:
        # Selecting columns of an id matrix (ids[:, k]): the column's bounds apply to column k only.
        columns = constant_array(node.inputs[1])
        data_shape = node.inputs[0].shape if node.inputs[0] is not None else None
        rank = len(data_shape) if data_shape is not None else None
        axis = node.attributes.get_int("axis", 0)
        out = _collapse(_value_bounds(node.outputs[0], depth + 1))
        if (
            columns is None
            or data_shape is None
            or rank is None
            or axis not in (rank - 1, -1)
            or data_shape[-1] is None
        ):
            return out
        width = data_shape[-1]
        if not isinstance(width, int):
            return out
        low, high = np.full(width, -np.inf), np.full(width, np.inf)
        low[columns.reshape(-1)] = out[0]
        high[columns.reshape(-1)] = out[1]
        return low, high
    if op in ("Add", "Sub") and len(node.inputs) == 2:
        other = node.inputs[1 - index]
        offset = constant_array(other)
        if offset is None:
            return _unbounded()
        out = _value_bounds(node.outputs[0], depth + 1)
        offset = offset.astype(np.float64)
        if offset.ndim > 1:
            offset = offset.reshape(-1) if offset.size == offset.shape[-1] else np.array(offset.min())
        if op == "Add":
            return _intersect((out[0] - offset, out[1] - offset), _unbounded())
        if index == 0:
            return _intersect((out[0] + offset, out[1] + offset), _unbounded())
        return _unbounded()
    if op in ("Cast", "Identity"):
        return _value_bounds(node.outputs[0], depth + 1)
    if (op in _INDEX_TRANSPARENT and index == 0) or op == "Concat":
        return _collapse(_value_bounds(node.outputs[0], depth + 1))
    return _unbounded()


def id_ranges(model: ir.Model) -> dict[str, Bounds]:
    """For each integer graph input that reaches an embedding Gather: the valid [low, high) per column."""
    ranges = {}
    for value in model.graph.inputs:
        if value.dtype is None or not value.dtype.is_integer() or value.is_initializer():
            continue
        low, high = _value_bounds(value)
        if np.isfinite(high).any():
            assert value.name is not None
            ranges[value.name] = (np.maximum(low, 0.0), high)
    return ranges


def synthesize_feeds(
    model: ir.Model,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    rows: int = DEFAULT_ROWS,
    seed: int = 0,
) -> Feeds:
    """Random feeds from the graph signature, with a fixed seed.

    Symbolic first dimensions get ``rows``, other symbolic dimensions ``DEFAULT_DIM``, unless
    ``input_shapes`` names the full shape of an input.
    """
    input_shapes = dict(input_shapes or {})
    specs = graph_inputs(model)
    unknown = sorted(set(input_shapes) - {spec.name for spec in specs})
    if unknown:
        raise UsageError(
            f"--input-shape names {', '.join(unknown)}, which the model does not take; inputs are: "
            f"{', '.join(spec.describe() for spec in specs)}"
        )
    batch = fixed_batch(specs)
    symbols = _symbols_given(specs, input_shapes)
    # The rows one input is given are every input's rows: DLRM's dense and ids share "batch".
    given_rows = {int(shape[0]) for name, shape in input_shapes.items() if shape}
    if len(given_rows) == 1 and batch is None:
        rows = given_rows.pop()
    shapes = {spec.name: _concrete_shape(spec, input_shapes.get(spec.name), rows, batch, symbols) for spec in specs}
    _check_feed_bytes(specs, shapes)
    ranges = id_ranges(model)
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    notes = []
    for spec in specs:
        shape = shapes[spec.name]
        if spec.dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            arrays[spec.name] = rng.integers(0, 2, shape).astype(bool)
        elif spec.dtype.kind in "iu":
            low, high = ranges.get(spec.name, (np.array(0.0), np.array(float(DEFAULT_INT_HIGH))))
            if (high <= low).any():
                raise UsageError(
                    f"cannot synthesize {spec.name}: the embedding tables it reaches leave no valid id; "
                    f"give real inputs with --feeds"
                )
            low_b = np.broadcast_to(low, shape[-1:] if shape else ()).astype(np.int64)
            high_b = np.broadcast_to(high, shape[-1:] if shape else ()).astype(np.int64)
            arrays[spec.name] = _draw_ids(rng, low_b, high_b, shape).astype(spec.dtype)
            span = (
                f"[{int(low)}, {int(high)})"
                if low.ndim == 0
                else "per column " + ", ".join(f"[{int(a)}, {int(b)})" for a, b in zip(low_b, high_b, strict=True))
            )
            origin = "rows of the embedding tables it indexes" if spec.name in ranges else "no table reached"
            if (high_b - low_b).max(initial=0) > WINDOWED_ID_RANGE:
                origin += f"; {ID_WINDOWS} windows of {ID_WINDOW_ROWS} rows spread over the range"
            notes.append(f"{spec.name} drawn from {span} ({origin})")
        else:
            raise UsageError(f"cannot synthesize {spec.describe()}; give real inputs with --feeds")
    return Feeds(arrays, f"synthesized (seed {seed}, {rows} rows, other symbolic dims {DEFAULT_DIM})", tuple(notes))


def _draw_ids(rng: np.random.Generator, low: np.ndarray, high: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform ids in [low, high), or for very wide ranges ids from windows spread evenly over it."""
    if (high - low).max(initial=0) <= WINDOWED_ID_RANGE:
        return rng.integers(low, high, size=shape)
    span = np.maximum(high - low - ID_WINDOW_ROWS, 0)
    window = rng.integers(0, ID_WINDOWS, size=shape)
    starts = low + (span * window) // max(ID_WINDOWS - 1, 1)
    return np.minimum(starts + rng.integers(0, ID_WINDOW_ROWS, size=shape), high - 1)


def _check_feed_bytes(specs: Sequence[InputSpec], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse feeds that would not fit in memory instead of failing inside numpy."""
    sizes = {spec.name: math.prod(shapes[spec.name]) * max(spec.dtype.itemsize, 8) for spec in specs}
    if sum(sizes.values()) > MAX_SYNTHESIZED_BYTES:
        name = max(sizes, key=lambda key: sizes[key])
        raise UsageError(
            f"synthesized feeds would take {sum(sizes.values()) / 2**30:.1f} GiB ({name} has shape "
            f"{list(shapes[name])}); give smaller shapes with --input-shape, or real inputs with --feeds"
        )


def _symbols_given(specs: Sequence[InputSpec], input_shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """The named symbolic dims the ``--input-shape`` overrides fix, for the inputs that share them."""
    symbols: dict[str, int] = {}
    for spec in specs:
        override = input_shapes.get(spec.name)
        if override is None or spec.shape is None or len(override) != len(spec.shape):
            continue
        for dim, value in zip(spec.shape, override, strict=True):
            if isinstance(dim, str) and dim and symbols.setdefault(dim, int(value)) != int(value):
                raise UsageError(
                    f"--input-shape gives the dimension {dim!r}, which several inputs share, both "
                    f"{symbols[dim]} and {int(value)}; give it one value"
                )
    return symbols


def _concrete_shape(
    spec: InputSpec,
    override: Sequence[int] | None,
    rows: int,
    batch: int | None = None,
    symbols: Mapping[str, int] | None = None,
) -> tuple[int, ...]:
    if override is not None:
        if spec.shape is not None and len(override) != len(spec.shape):
            raise UsageError(
                f"--input-shape {spec.name}: gives {len(override)} dimensions but the model expects {spec.describe()}"
            )
        if any(int(d) < 0 for d in override):
            raise UsageError(f"--input-shape {spec.name}: dimensions cannot be negative, got {list(override)}")
        if override and int(override[0]) == 0:
            raise UsageError(f"--input-shape {spec.name}: the first dimension counts the rows; give at least 1")
        return tuple(int(d) for d in override)
    if spec.shape is None:
        raise UsageError(f"{spec.name} has no declared shape; give it with --input-shape {spec.name}=D0,D1")
    if any(isinstance(dim, int) and dim < 0 for dim in spec.shape):
        raise InputModelError(
            f"graph input {spec.describe()} declares a negative dimension; fix the model's input shapes"
        )
    symbols = symbols or {}
    return tuple(
        symbols[dim]
        if isinstance(dim, str) and dim in symbols
        else rows
        if axis == 0 and (batch is not None or not isinstance(dim, int))
        else dim
        if isinstance(dim, int)
        else DEFAULT_DIM
        for axis, dim in enumerate(spec.shape)
    )


# --- activation capture ----------------------------------------------------------------------------


@dataclass
class Calibration:
    """Calibration rows for passes that need data, and a way to read intermediate activations."""

    feeds: Feeds
    batch_size: int = 1024
    opt_level: str = "disable"
    notes: list[str] = field(default_factory=list)
    #: 0/1 labels of the rows by score output (``""``: every other score output), for passes that
    #: budget AUC (``quant.max_auc_drop``).
    labels: Mapping[str, np.ndarray] | None = None

    def iter_capture(self, model: ir.Model, values: Sequence[ir.Value]) -> Iterator[dict[str, np.ndarray]]:
        """Yield, batch by batch, the arrays of ``values`` (exposed as extra outputs) on the feeds."""
        names = [value.name for value in values]
        session = session_reading(model, values, self.opt_level)
        for batch in runtime.batches(self.feeds.arrays, self.batch_size):
            yield runtime.run(session, batch, names, batch_size=None)  # type: ignore[arg-type]

    def lookup_hessians(self, model: ir.Model, tables: Sequence[str], budget: float) -> dict[str, np.ndarray]:
        """For each table (an initializer read only by Gathers on axis 0): ``H`` ``[width, width]``,
        the mean over calibration rows of ``sum g g^T`` over every float output and every row the
        table's Gathers look up for the example, where ``g`` is the gradient of the output with
        respect to that looked-up row. ``delta^T H delta`` is then how much a change ``delta`` of a
        looked-up row moves the outputs, squared, to first order.

        Gradients by forward differences, one column at a time, on the first
        ``LOOKUP_HESSIAN_ROWS`` calibration rows. A Gather that looks up several rows an example (a
        history, DeepFM's fields) moves each apart in its own copy of the rows when it looks up
        ``EXACT_POSITIONS`` at most; otherwise ``SIGN_PROBES`` copies move every position at once
        with random signs, whose cross terms cancel in expectation (``E[s_p s_q] = 0``).

        Tables are taken largest first while the rows run (one run a column and one more, copies
        included) times the model's bytes of weights, a rough measure of the work, fit in
        ``budget``."""
        feeds = self.feeds.head(LOOKUP_HESSIAN_ROWS)
        rows = feeds.rows
        names = set(tables)
        readers = {
            name: [node for node, _ in value.uses()]
            for name, value in model.graph.initializers.items()
            if name in names
            and value.const_value is not None
            and all(_gathers_rows(node, index) for node, index in value.uses())
        }
        looked_up = [node.outputs[0] for nodes in readers.values() for node in nodes]
        if not looked_up:
            return {}
        session = session_reading(model, looked_up, self.opt_level)
        shapes = {
            name: array.shape
            for name, array in runtime.run(session, feeds.arrays, [v.name for v in looked_up], None).items()  # type: ignore[misc]
        }
        arrays = {name: model.graph.initializers[name].const_value.numpy() for name in readers}  # type: ignore[union-attr]
        chosen: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
        model_bytes = sum(value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value)
        spent = 0
        for name in sorted(readers, key=lambda name: -arrays[name].size):
            width = arrays[name].shape[1]
            outputs = [(node.outputs[0].name or "", shapes[node.outputs[0].name or ""]) for node in readers[name]]
            if any(shape[0] != rows or shape[-1] != width for _, shape in outputs):
                continue
            cost = sum((width + 1) * rows * _copies(math.prod(shape[1:-1])) for _, shape in outputs) * model_bytes
            if spent + cost > budget:
                continue
            spent += cost
            chosen[name] = outputs
        if not chosen:
            return {}
        # clone keeps external tensors' folder; a proto round trip would read them from the working directory.
        copy = model.clone()
        produced = {output.name: (node, output) for node in copy.graph for output in node.outputs}
        for name, outputs in chosen.items():
            dtype = ir.DataType.from_numpy(arrays[name].dtype)
            for output_name, shape in outputs:
                node, value = produced[output_name]
                delta = ir.Value(
                    name=f"{output_name}__delta", shape=ir.Shape([None] * len(shape)), type=ir.TensorType(dtype)
                )
                copy.graph.inputs.append(delta)
                uses = list(value.uses())
                moved = ir.node("Add", [value, delta])
                for user, slot in uses:
                    user.replace_input_with(slot, moved.outputs[0])
                copy.graph.insert_after(node, moved)
        session = runtime.make_session(copy, self.opt_level)
        floats = ("tensor(float)", "tensor(double)", "tensor(float16)")
        scored = [output.name for output in session.get_outputs() if output.type in floats]
        every = [(output_name, shape) for outputs in chosen.values() for output_name, shape in outputs]
        rng = np.random.default_rng(0)
        hessians = {}
        for name, outputs in chosen.items():
            values = arrays[name]
            width = values.shape[1]
            step = 1e-2 * float(np.sqrt(np.mean(np.square(values, dtype=np.float64)))) or 1e-3
            hessian = np.zeros((width, width))
            for output_name, shape in outputs:
                positions = math.prod(shape[1:-1])
                copies = _copies(positions)
                # Per copy and row, each position's factor: 1 for the copy's own position (exact),
                # else a random sign, drawn per row so that cross terms cancel over the rows too.
                signs = (
                    np.broadcast_to(np.eye(positions)[:, None, :], (copies, rows, positions))
                    if copies == positions
                    else rng.choice(np.array([-1.0, 1.0]), size=(copies, rows, positions))
                )
                tiled = {
                    key: np.concatenate([array] * copies) if array.ndim else array
                    for key, array in feeds.arrays.items()
                }
                inputs = {
                    **tiled,
                    **{
                        f"{other}__delta": np.zeros((rows * copies, *other_shape[1:]), values.dtype)
                        for other, other_shape in every
                    },
                }
                moved_input = f"{output_name}__delta"
                base = self._scores(session, scored, inputs, rows * copies)
                gradients = []
                for column in range(width):
                    move = np.zeros((copies, rows, positions, width), values.dtype)
                    move[:, :, :, column] = step * signs
                    move = move.reshape(rows * copies, *shape[1:])
                    response = self._scores(session, scored, {**inputs, moved_input: move}, rows * copies)
                    gradients.append((response - base) / step)
                stacked = np.stack(gradients, axis=-1).reshape(-1, width)  # [copies * rows * outputs, width]
                # random-sign copies each see every position: averaged over the copies
                hessian += stacked.T @ stacked / (1 if copies == positions else copies)
            hessians[name] = hessian / rows
        return hessians

    @staticmethod
    def _scores(session: ort.InferenceSession, names: list[str], feeds: dict[str, np.ndarray], rows: int) -> np.ndarray:
        """The float outputs with one row per example, side by side, as float64."""
        results = runtime.run(session, feeds, names, batch_size=None)
        kept = [array.reshape(rows, -1) for array in results.values() if array.shape[:1] == (rows,)]
        return np.concatenate(kept, axis=1).astype(np.float64) if kept else np.zeros((rows, 0))

    def capture(self, model: ir.Model, values: Sequence[ir.Value]) -> dict[str, np.ndarray]:
        """The arrays of ``values`` over all calibration rows (keep the list short: it is all in memory)."""
        parts: dict[str, list[np.ndarray]] = {}
        for batch in self.iter_capture(model, values):
            for name, array in batch.items():
                parts.setdefault(name, []).append(array)
        return {name: _join_batches(chunks) for name, chunks in parts.items()}


#: Calibration rows the lookup Hessians are measured on (the first ones).
LOOKUP_HESSIAN_ROWS = 512
#: A Gather looking up up to this many rows an example moves each in its own copy of the rows;
#: beyond, ``SIGN_PROBES`` copies move them all with random signs. Against one copy a position
#: (SASRec's 20-item history: 17.6 s), its Hessian within 4% (Frobenius) in 2.8 s; with 2 probes
#: DeepFM's seven fields, whose gradients move together, were off by 100%, with 4 by 2%.
EXACT_POSITIONS = 8
SIGN_PROBES = 4


def _copies(positions: int) -> int:
    """Copies of the rows a Gather's differences run on: one per position, or the sign probes."""
    return positions if positions <= EXACT_POSITIONS else SIGN_PROBES


def _gathers_rows(node: ir.Node, index: int) -> bool:
    """``node`` looks rows up in its input ``index`` (a Gather's data, axis 0) and its result is not a
    graph output."""
    return (
        node.op_type == "Gather"
        and index == 0
        and node.attributes.get_int("axis", 0) == 0
        and not node.outputs[0].is_graph_output()
    )


def session_reading(model: ir.Model, values: Sequence[ir.Value], opt_level: str) -> ort.InferenceSession:
    """An onnxruntime session on ``model`` with ``values`` (named) exposed as extra outputs; the
    model is left as it was."""
    if any(value.name is None for value in values):
        raise ValueError("every captured value needs a name")
    graph_outputs = list(model.graph.outputs)
    added = [value for value in values if value not in graph_outputs]
    model.graph.outputs.extend(added)
    try:
        return runtime.make_session(model, opt_level)
    finally:
        for value in added:
            model.graph.outputs.remove(value)


def _join_batches(chunks: list[np.ndarray]) -> np.ndarray:
    """Batches of one value joined along their batch axis: the first, unless the value carries the
    batch elsewhere (PyTorch's attention, exported by TorchScript, works on ``[steps, batch * heads,
    dim]``), where the one axis whose size changes with the batch is joined."""
    if len(chunks) == 1:
        return chunks[0]
    shapes = {chunk.shape for chunk in chunks}
    varying = [axis for axis in range(chunks[0].ndim) if len({shape[axis] for shape in shapes}) > 1]
    if len(varying) > 1 or any(len(shape) != chunks[0].ndim for shape in shapes):
        raise ValueError(f"captured batches of shapes {sorted(shapes)} differ on more than one axis")
    return np.concatenate(chunks, axis=varying[0] if varying else 0)
