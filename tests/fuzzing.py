"""Seeded mutators that corrupt real ONNX models, and an in-process CLI runner that checks the damage.

Every mutator takes a ``random.Random`` and the model's bytes (plus the parsed proto, which it may
change) and returns the bytes to write as the hostile input, or ``None`` when the model offers nothing
to mutate. Mutators are picked by name so a failing case is reproduced from its id alone:
``mutate(name, seed, model)``.
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

__all__ = [
    "EXTERNAL_MUTATORS",
    "MUTATORS",
    "Outcome",
    "mutate",
    "mutate_external",
    "raw_data_spans",
    "run_cli",
]

Mutator = Callable[[random.Random, bytes, onnx.ModelProto], "bytes | None"]
MUTATORS: dict[str, Mutator] = {}


def mutator(function: Mutator) -> Mutator:
    MUTATORS[function.__name__] = function
    return function


def _payload(tensor: TensorProto) -> bytes:
    """The bytes a tensor's values occupy in the file: ``raw_data``, or packed ``float_data``."""
    if tensor.raw_data:
        return tensor.raw_data
    return np.asarray(tensor.float_data, np.float32).tobytes()


def raw_data_spans(data: bytes, proto: onnx.ModelProto) -> list[tuple[int, int]]:
    """Byte ranges of the file that hold tensor payloads (``raw_data`` or packed ``float_data``)."""
    spans = []
    for tensor in proto.graph.initializer:
        payload = _payload(tensor)
        if len(payload) >= 16:
            start = data.find(payload)
            if start >= 0:
                spans.append((start, start + len(payload)))
    return sorted(spans)


def _structural_positions(data: bytes, proto: onnx.ModelProto) -> list[int]:
    """Offsets outside tensor payloads: the graph, names, types, attributes, framing."""
    spans = raw_data_spans(data, proto)
    positions, cursor = [], 0
    for start, end in spans:
        positions.extend(range(cursor, start))
        cursor = max(cursor, end)
    positions.extend(range(cursor, len(data)))
    return positions


def _nodes_with(proto: onnx.ModelProto, predicate: Callable[[onnx.NodeProto], bool]) -> list[onnx.NodeProto]:
    return [node for node in proto.graph.node if predicate(node)]


def _float_initializers(proto: onnx.ModelProto) -> list[TensorProto]:
    return [t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT and _payload(t) and len(t.dims)]


def _floats(tensor: TensorProto) -> np.ndarray:
    return np.frombuffer(_payload(tensor), np.float32).copy()


def _set_floats(tensor: TensorProto, values: np.ndarray) -> None:
    """Write values back into the field the tensor used."""
    if tensor.raw_data:
        tensor.raw_data = values.astype(np.float32).tobytes()
    else:
        del tensor.float_data[:]
        tensor.float_data.extend(values.astype(np.float32).tolist())


# ---- byte level -------------------------------------------------------------------------------


@mutator
def truncate(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes:
    """Cut the file anywhere, half the time inside the graph structure."""
    positions = _structural_positions(data, proto)
    cut = rng.choice(positions) if rng.random() < 0.5 else rng.randrange(1, len(data))
    return data[: max(cut, 1)]


@mutator
def flip_structure_bytes(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes:
    """XOR 1-6 bytes of the graph structure (names, tags, lengths, attributes) with random masks."""
    buffer = bytearray(data)
    for position in rng.sample(_structural_positions(data, proto), rng.randint(1, 6)):
        buffer[position] ^= rng.randint(1, 255)
    return bytes(buffer)


@mutator
def flip_payload_bytes(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes | None:
    """XOR bytes inside tensor payloads: weights turn into NaN, Inf, denormals or huge values."""
    spans = raw_data_spans(data, proto)
    if not spans:
        return None
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 64)):
        start, end = rng.choice(spans)
        buffer[rng.randrange(start, end)] ^= rng.choice([0x80, 0x7F, 0xFF, rng.randint(1, 255)])
    return bytes(buffer)


@mutator
def splice_bytes(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes:
    """Insert or delete a short run of bytes inside the graph structure (shifts every later field)."""
    position = rng.choice(_structural_positions(data, proto))
    if rng.random() < 0.5:
        return data[:position] + data[position + rng.randint(1, 16) :]
    return data[:position] + rng.randbytes(rng.randint(1, 16)) + data[position:]


@mutator
def foreign_bytes(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes:
    """Something that is not a model: random bytes, a zip, a lone tensor, the model's text, NULs."""
    tensor = next(iter(proto.graph.initializer), None)
    choices = [
        rng.randbytes(rng.randint(1, 4096)),
        b"PK\x03\x04" + rng.randbytes(200),
        tensor.SerializeToString() if tensor is not None else b"\x08\x01",
        str(proto.graph.node[:3]).encode(),
        b"\0" * rng.randint(1, 4096),
        data[len(data) // 2 :],
    ]
    return rng.choice(choices)


# ---- protobuf fields --------------------------------------------------------------------------


@mutator
def initializer_dims(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes | None:
    """Change one dimension of an initializer, leaving its payload as it was."""
    tensors = [t for t in proto.graph.initializer if len(t.dims)]
    if not tensors:
        return None
    tensor = rng.choice(tensors)
    axis = rng.randrange(len(tensor.dims))
    tensor.dims[axis] = rng.choice([0, 1, tensor.dims[axis] + 1, tensor.dims[axis] * 2, -1, -7, 2**31, 2**40])
    if rng.random() < 0.3:
        tensor.dims.append(rng.choice([1, 2, 3]))
    return proto.SerializeToString()


@mutator
def short_payload(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes | None:
    """Drop the tail (or all) of an initializer's payload: fewer values than its dims say."""
    tensors = [t for t in proto.graph.initializer if t.raw_data or len(t.float_data) > 1]
    if not tensors:
        return None
    tensor = rng.choice(tensors)
    if tensor.raw_data:
        keep = rng.choice([0, 1, len(tensor.raw_data) // 2, len(tensor.raw_data) - 1])
        tensor.raw_data = tensor.raw_data[:keep]
    else:
        del tensor.float_data[rng.choice([0, 1, len(tensor.float_data) // 2, len(tensor.float_data) - 1]) :]
    return proto.SerializeToString()


@mutator
def typed_data_mismatch(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes | None:
    """Move a float payload into float_data with the wrong count, or set both raw and typed data."""
    tensors = _float_initializers(proto)
    if not tensors:
        return None
    tensor = rng.choice(tensors)
    values = _floats(tensor)
    if rng.random() < 0.5:
        tensor.ClearField("raw_data")
        del tensor.float_data[:]
        count = rng.choice([0, 1, max(values.size - 1, 0), values.size + 3])
        tensor.float_data.extend(np.resize(values, count).tolist())
    elif tensor.raw_data:
        tensor.float_data.extend([1.0, 2.0])  # both fields set
    else:
        tensor.raw_data = values[: values.size // 2].tobytes()
    return proto.SerializeToString()


@mutator
def initializer_dtype(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes | None:
    """Relabel an initializer's dtype (the payload stays): int64, int8, string, bfloat16, 4-bit, bogus."""
    if not proto.graph.initializer:
        return None
    tensor = rng.choice(proto.graph.initializer)
    tensor.data_type = rng.choice(
        [
            TensorProto.UNDEFINED,
            TensorProto.INT64,
            TensorProto.INT8,
            TensorProto.UINT8,
            TensorProto.DOUBLE,
            TensorProto.FLOAT16,
            TensorProto.BFLOAT16,
            TensorProto.STRING,
            TensorProto.BOOL,
            TensorProto.COMPLEX64,
            TensorProto.INT4,
            TensorProto.FLOAT8E4M3FN,
            77,
        ]
    )
    return proto.SerializeToString()


@mutator
def weight_values(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes | None:
    """Fill a float weight with NaN, Inf, zeros, one constant, denormals or values near float32 max."""
    tensors = _float_initializers(proto)
    if not tensors:
        return None
    tensor = rng.choice(tensors)
    array = _floats(tensor)
    kind = rng.choice(["nan", "inf", "zeros", "constant", "denormal", "huge", "one_nan"])
    if kind == "nan":
        array[:] = np.nan
    elif kind == "inf":
        array[:] = np.where(np.arange(array.size) % 2, np.inf, -np.inf)
    elif kind == "zeros":
        array[:] = 0
    elif kind == "constant":
        array[:] = 0.25
    elif kind == "denormal":
        array[:] = np.float32(1e-42)
    elif kind == "huge":
        array[:] = np.float32(3e38)
    else:
        array[rng.randrange(array.size)] = np.nan
    _set_floats(tensor, array)
    return proto.SerializeToString()


@mutator
def attribute_value(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes | None:
    """Change an attribute: out-of-range ints, odd floats, a different type, a bogus name, removal."""
    nodes = _nodes_with(proto, lambda node: len(node.attribute) > 0)
    if not nodes:
        return None
    node = rng.choice(nodes)
    attribute = rng.choice(node.attribute)
    action = rng.choice(["int", "ints", "float", "type", "rename", "remove", "add"])
    if action == "int":
        attribute.type = onnx.AttributeProto.INT
        attribute.i = rng.choice([-(2**62), -100, -1, 0, 2, 7, 2**40])
    elif action == "ints":
        attribute.type = onnx.AttributeProto.INTS
        del attribute.ints[:]
        attribute.ints.extend(rng.choice([[], [0, 0], [5, -9, 2**33]]))
    elif action == "float":
        attribute.type = onnx.AttributeProto.FLOAT
        attribute.f = rng.choice([float("nan"), float("inf"), -1.0, 1e30])
    elif action == "type":
        attribute.type = rng.choice([onnx.AttributeProto.STRING, onnx.AttributeProto.GRAPH, onnx.AttributeProto.UNDEFINED])
        attribute.s = b"hostile"
    elif action == "rename":
        attribute.name = rng.choice(["no_such_attribute", "", attribute.name.upper()])
    elif action == "remove":
        node.attribute.remove(attribute)
    else:
        extra = node.attribute.add()
        extra.CopyFrom(attribute)  # a duplicate attribute name
    return proto.SerializeToString()


@mutator
def remove_initializer(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes | None:
    """Delete an initializer its nodes still read."""
    if not proto.graph.initializer:
        return None
    proto.graph.initializer.remove(rng.choice(proto.graph.initializer))
    return proto.SerializeToString()


@mutator
def rename_graph_input(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes | None:
    """Rename a graph input without renaming its consumers (or to an initializer's name, or to '')."""
    if not proto.graph.input:
        return None
    value = rng.choice(proto.graph.input)
    names = [t.name for t in proto.graph.initializer] or ["x"]
    value.name = rng.choice([value.name + "_renamed", "", rng.choice(names), "emoji 🙂 input"])
    return proto.SerializeToString()


@mutator
def dangling_node_input(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes | None:
    """Point a node input at a value nothing produces."""
    nodes = _nodes_with(proto, lambda node: len(node.input) > 0)
    if not nodes:
        return None
    node = rng.choice(nodes)
    node.input[rng.randrange(len(node.input))] = rng.choice(["no_such_value", "x" * 5000, " "])
    return proto.SerializeToString()


@mutator
def cycle(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes | None:
    """Feed a node from its own output or from a node after it (a cycle or an unsorted graph)."""
    nodes = list(proto.graph.node)
    candidates = [index for index, node in enumerate(nodes) if node.input and node.output]
    if not candidates:
        return None
    index = rng.choice(candidates)
    later = rng.randrange(index, len(nodes))
    source = nodes[later].output[0] if nodes[later].output else nodes[index].output[0]
    node = nodes[index]
    node.input[rng.randrange(len(node.input))] = source
    return proto.SerializeToString()


@mutator
def unknown_op(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes | None:
    """Rename an op to one no opset defines, keeping its domain."""
    if not proto.graph.node:
        return None
    node = rng.choice(proto.graph.node)
    node.op_type = rng.choice(["NoSuchOp", "", "gemm", node.op_type + "V2"])
    return proto.SerializeToString()


@mutator
def unknown_domain(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes | None:
    """Move a node to a custom domain, imported with a version (or not imported at all)."""
    if not proto.graph.node:
        return None
    node = rng.choice(proto.graph.node)
    node.domain = rng.choice(["com.example.custom", "com.microsoft", "ai.onnx.ml", "ai.onnx.preview.training"])
    if rng.random() < 0.6 and all(opset.domain != node.domain for opset in proto.opset_import):
        opset = proto.opset_import.add()
        opset.domain = node.domain
        opset.version = rng.choice([1, 3])
    return proto.SerializeToString()


@mutator
def duplicate_names(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes | None:
    """Give two values one name: node outputs, initializers, graph inputs or an output and an input."""
    graph = proto.graph
    choice = rng.choice(["outputs", "initializers", "inputs", "initializer_output", "node_names"])
    if choice == "outputs" and len(graph.node) >= 2:
        first, second = rng.sample(range(len(graph.node)), 2)
        graph.node[second].output[0] = graph.node[first].output[0]
    elif choice == "initializers" and len(graph.initializer) >= 2:
        first, second = rng.sample(range(len(graph.initializer)), 2)
        graph.initializer[second].name = graph.initializer[first].name
    elif choice == "inputs" and graph.input:
        graph.input.add().CopyFrom(rng.choice(graph.input))
    elif choice == "initializer_output" and graph.initializer and graph.node:
        rng.choice(graph.node).output[0] = rng.choice(graph.initializer).name
    elif len(graph.node) >= 2:
        for node in graph.node:
            node.name = "same"
    else:
        return None
    return proto.SerializeToString()


@mutator
def graph_io_type(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes | None:
    """Change a graph input's or output's dtype or shape (huge, zero, negative, extra rank, none)."""
    values = [*proto.graph.input, *proto.graph.output]
    if not values:
        return None
    tensor_type = rng.choice(values).type.tensor_type
    action = rng.choice(["dtype", "dim", "rank", "no_shape"])
    if action == "dtype":
        tensor_type.elem_type = rng.choice(
            [TensorProto.UNDEFINED, TensorProto.INT32, TensorProto.STRING, TensorProto.FLOAT16, 77]
        )
    elif action == "dim" and tensor_type.shape.dim:
        dim = rng.choice(tensor_type.shape.dim)
        choice = rng.choice([0, -3, 2**40, 3, "", "x y"])
        if isinstance(choice, str):
            dim.dim_param = choice
        else:
            dim.dim_value = choice
    elif action == "rank":
        tensor_type.shape.dim.add().dim_value = rng.choice([1, 3])
    else:
        tensor_type.ClearField("shape")
    return proto.SerializeToString()


@mutator
def opset_and_ir_version(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes:
    """Claim another ONNX opset or IR version (ancient, future, zero) or drop the default opset."""
    action = rng.choice(["opset", "ir", "drop"])
    default = next((opset for opset in proto.opset_import if opset.domain in ("", "ai.onnx")), None)
    if action == "opset" and default is not None:
        default.version = rng.choice([1, 6, 11, 19, 23, 99, 10**6])
    elif action == "ir":
        proto.ir_version = rng.choice([0, 1, 3, 11, 99])
    elif default is not None:
        proto.opset_import.remove(default)
    return proto.SerializeToString()


@mutator
def graph_outputs(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes:
    """Remove every graph output, rename one to a value nothing produces, or output an input."""
    graph = proto.graph
    action = rng.choice(["remove", "rename", "input", "initializer"])
    if action == "remove":
        del graph.output[:]
    elif action == "rename" and graph.output:
        graph.output[0].name = "nothing_makes_this"
    elif action == "input" and graph.input:
        graph.output.add().CopyFrom(graph.input[0])
    elif graph.initializer:
        output = graph.output.add()
        output.name = graph.initializer[0].name
    return proto.SerializeToString()


@mutator
def delete_node(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes | None:
    """Delete a node (its consumers dangle) or every node."""
    if not proto.graph.node:
        return None
    if rng.random() < 0.15:
        del proto.graph.node[:]
    else:
        proto.graph.node.remove(rng.choice(proto.graph.node))
    return proto.SerializeToString()


@mutator
def node_arity(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes | None:
    """Swap, drop, blank or add node inputs/outputs (an empty name is an omitted optional input)."""
    nodes = _nodes_with(proto, lambda node: len(node.input) > 0)
    if not nodes:
        return None
    node = rng.choice(nodes)
    action = rng.choice(["swap", "drop", "blank", "extra_input", "extra_output", "no_output"])
    if action == "swap" and len(node.input) >= 2:
        node.input[0], node.input[1] = node.input[1], node.input[0]
    elif action == "drop":
        del node.input[-1]
    elif action == "blank":
        node.input[rng.randrange(len(node.input))] = ""
    elif action == "extra_input":
        node.input.append(node.input[0])
    elif action == "extra_output":
        node.output.append(node.output[0] + "_extra")
    else:
        del node.output[:]
    return proto.SerializeToString()


@mutator
def external_reference(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes | None:
    """Mark an initializer as external data pointing somewhere hostile or absent."""
    tensors = [t for t in proto.graph.initializer if _payload(t)]
    if not tensors:
        return None
    tensor = rng.choice(tensors)
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    location = rng.choice(["../../../etc/passwd", "/etc/passwd", "missing.bin", "", "/dev/zero", "."])
    entries = [("location", location)]
    if rng.random() < 0.5:
        entries.append(("offset", rng.choice(["0", "-8", "not-a-number", str(2**62)])))
    if rng.random() < 0.5:
        entries.append(("length", rng.choice(["0", "4", str(2**40)])))
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


@mutator
def metadata_and_strings(rng: random.Random, data: bytes, proto: onnx.ModelProto) -> bytes:
    """Odd but legal text: huge doc strings, non-UTF-8-looking names, metadata with odd keys."""
    proto.doc_string = "\x00\x1b[31m" + "d" * rng.choice([0, 10, 100_000])
    entry = proto.metadata_props.add()
    entry.key, entry.value = rng.choice([("", ""), ("onnx.key\n", "\u202e"), ("k" * 1000, "v")])
    if proto.graph.node:
        rng.choice(proto.graph.node).name = "\n\r\t\u0000"
    return proto.SerializeToString()


def mutate(name: str, seed: int, model: Path) -> bytes | None:
    """The bytes of ``model`` corrupted by mutator ``name`` with ``seed`` (``None``: nothing to mutate)."""
    rng = random.Random(f"{name}:{seed}:{model.name}")
    data = model.read_bytes()
    proto = onnx.load_model_from_string(data)
    return MUTATORS[name](rng, data, proto)


@dataclass
class Outcome:
    """What one in-process CLI run did."""

    code: int | None
    out: str
    err: str
    crash: str = ""

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]


def run_cli(capfd: pytest.CaptureFixture[str], *argv: str | Path) -> Outcome:
    """Run ``onnxcompress ARGV`` in-process with its output captured by ``capfd``; an exception
    escaping ``main`` is reported as a crash."""
    from onnxcompress.cli import main

    capfd.readouterr()
    code: int | None
    crash = ""
    try:
        main([str(arg) for arg in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # what a real process would print as a traceback
        code = None
        crash = traceback.format_exc()
    captured = capfd.readouterr()
    return Outcome(code, captured.out, captured.err + crash, crash)


# ---- external data ------------------------------------------------------------------------------

ExternalMutator = Callable[[random.Random, onnx.ModelProto, bytearray, str], None]
EXTERNAL_MUTATORS: dict[str, ExternalMutator] = {}


def external_mutator(function: ExternalMutator) -> ExternalMutator:
    EXTERNAL_MUTATORS[function.__name__] = function
    return function


def _external_entry(rng: random.Random, proto: onnx.ModelProto, key: str) -> onnx.StringStringEntryProto:
    tensor = rng.choice([t for t in proto.graph.initializer if t.external_data])
    entry = next((e for e in tensor.external_data if e.key == key), None)
    if entry is None:
        entry = tensor.external_data.add()
        entry.key = key
    return entry


@external_mutator
def data_truncated(rng: random.Random, proto: onnx.ModelProto, data: bytearray, location: str) -> None:
    """Cut the data file anywhere (to nothing, sometimes)."""
    del data[rng.choice([0, 1, rng.randrange(len(data)), len(data) - 1]) :]


@external_mutator
def data_flipped(rng: random.Random, proto: onnx.ModelProto, data: bytearray, location: str) -> None:
    """Flip bytes of the data file: the tensors' values change, the structure does not."""
    for _ in range(rng.randint(1, 32)):
        data[rng.randrange(len(data))] ^= rng.randint(1, 255)


@external_mutator
def data_extended(rng: random.Random, proto: onnx.ModelProto, data: bytearray, location: str) -> None:
    """Append garbage to the data file (harmless: nothing points there)."""
    data.extend(rng.randbytes(rng.randint(1, 4096)))


@external_mutator
def entry_offset(rng: random.Random, proto: onnx.ModelProto, data: bytearray, location: str) -> None:
    """Point a tensor at another offset: negative, unaligned, past the end, or garbage text."""
    entry = _external_entry(rng, proto, "offset")
    entry.value = rng.choice(["-64", "3", str(len(data)), str(len(data) - 8), str(2**62), "0x10", ""])


@external_mutator
def entry_length(rng: random.Random, proto: onnx.ModelProto, data: bytearray, location: str) -> None:
    """Declare another length for a tensor's bytes."""
    entry = _external_entry(rng, proto, "length")
    entry.value = rng.choice(["0", "1", "-4", str(2**40), "twelve"])


@external_mutator
def entry_location(rng: random.Random, proto: onnx.ModelProto, data: bytearray, location: str) -> None:
    """Point a tensor at another file: escaping, absolute, missing, a folder, the model itself."""
    entry = _external_entry(rng, proto, "location")
    entry.value = rng.choice(
        [
            "../" + location,
            "../../../../etc/passwd",
            "/etc/passwd",
            "/dev/zero",
            "missing.data",
            "",
            ".",
            "sub/../" + location,  # legal: stays in the folder
            location.removesuffix(".data"),  # the model file itself
        ]
    )


@external_mutator
def entry_keys(rng: random.Random, proto: onnx.ModelProto, data: bytearray, location: str) -> None:
    """Add unknown or duplicate external-data keys, or drop the location."""
    tensor = rng.choice([t for t in proto.graph.initializer if t.external_data])
    action = rng.choice(["unknown", "duplicate", "drop_location", "checksum"])
    if action == "unknown":
        entry = tensor.external_data.add()
        entry.key, entry.value = "no_such_key", "1"
    elif action == "duplicate":
        tensor.external_data.add().CopyFrom(tensor.external_data[0])
    elif action == "drop_location":
        for entry in list(tensor.external_data):
            if entry.key == "location":
                tensor.external_data.remove(entry)
    else:
        entry = tensor.external_data.add()
        entry.key, entry.value = "checksum", "0" * 40


def mutate_external(name: str, seed: int, model: Path, folder: Path) -> Path:
    """Save ``model`` into ``folder`` with external data, corrupted by ``name``; return the model path."""
    rng = random.Random(f"external:{name}:{seed}:{model.name}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / model.name
    location = model.name + ".data"
    onnx.save(onnx.load(str(model)), str(path), save_as_external_data=True, location=location, size_threshold=0)
    proto = onnx.load(str(path), load_external_data=False)
    data = bytearray((folder / location).read_bytes())
    EXTERNAL_MUTATORS[name](rng, proto, data, location)
    path.write_bytes(proto.SerializeToString())
    (folder / location).write_bytes(bytes(data))
    return path
