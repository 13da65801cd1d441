"""Generate a Criteo-like DLRM in ONNX with external data, of any size, in bounded memory.

Tables are written to the data file chunk by chunk (never held whole in memory), so a 2.5 GB
model is generated with about 100 MB of RAM. Used by the large-model tests and benchmarks.

    python tools/make_synthetic_dlrm.py OUT_DIR --tables 5 --rows 2000000 --dim 64
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

__all__ = ["SyntheticSpec", "make_synthetic_dlrm"]

CHUNK_ROWS = 131072


@dataclass(frozen=True)
class SyntheticSpec:
    tables: int = 5
    rows: int = 2_000_000
    dim: int = 64
    dense_features: int = 16
    hidden: tuple[int, ...] = (256, 64)
    seed: int = 0

    @property
    def table_bytes(self) -> int:
        return self.rows * self.dim * 4


def _write_table(handle, rng: np.random.Generator, rows: int, dim: int) -> None:
    for start in range(0, rows, CHUNK_ROWS):
        count = min(CHUNK_ROWS, rows - start)
        chunk = rng.standard_normal((count, dim), dtype=np.float32) * np.float32(0.05)
        handle.write(chunk.tobytes())


def _dense_layer(
    graph_nodes: list[ir.Node], x: ir.Value, weight: np.ndarray, bias: np.ndarray, name: str, relu: bool
) -> tuple[ir.Value, list[ir.Value]]:
    w = ir.Value(name=f"{name}.weight", const_value=ir.tensor(weight, name=f"{name}.weight"))
    b = ir.Value(name=f"{name}.bias", const_value=ir.tensor(bias, name=f"{name}.bias"))
    gemm = ir.node("Gemm", [x, w, b], attributes={"transB": 1}, name=f"{name}/Gemm")
    graph_nodes.append(gemm)
    out = gemm.outputs[0]
    if relu:
        act = ir.node("Relu", [out], name=f"{name}/Relu")
        graph_nodes.append(act)
        out = act.outputs[0]
    return out, [w, b]


def make_synthetic_dlrm(out_dir: Path, spec: SyntheticSpec = SyntheticSpec(), name: str = "dlrm_large") -> Path:
    """Write ``OUT_DIR/NAME.onnx`` and ``NAME.onnx.data``; return the model path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / f"{name}.onnx"
    data_name = f"{name}.onnx.data"
    rng = np.random.default_rng(spec.seed)
    batch = ir.SymbolicDim("batch")
    nodes: list[ir.Node] = []
    initializers: list[ir.Value] = []
    inputs: list[ir.Value] = []
    features: list[ir.Value] = []

    with open(out_dir / data_name, "wb") as handle:
        for index in range(spec.tables):
            table = ir.Value(
                name=f"table{index}",
                const_value=ir.ExternalTensor(
                    data_name,
                    index * spec.table_bytes,
                    spec.table_bytes,
                    ir.DataType.FLOAT,
                    shape=ir.Shape([spec.rows, spec.dim]),
                    name=f"table{index}",
                    base_dir=out_dir,
                ),
            )
            _write_table(handle, rng, spec.rows, spec.dim)
            ids = ir.Value(name=f"ids{index}", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([batch]))
            gather = ir.node("Gather", [table, ids], name=f"lookup{index}")
            nodes.append(gather)
            initializers.append(table)
            inputs.append(ids)
            features.append(gather.outputs[0])

    dense = ir.Value(
        name="dense", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([batch, spec.dense_features])
    )
    inputs.append(dense)
    x, width = dense, spec.dense_features
    for layer, units in enumerate((*spec.hidden, spec.dim)):
        weight = (rng.standard_normal((units, width)) / np.sqrt(width)).astype(np.float32)
        x, params = _dense_layer(nodes, x, weight, np.zeros(units, np.float32), f"bottom{layer}", relu=True)
        initializers.extend(params)
        width = units
    concat = ir.node("Concat", [x, *features], attributes={"axis": 1}, name="interaction")
    nodes.append(concat)
    x, width = concat.outputs[0], spec.dim * (spec.tables + 1)
    for layer, units in enumerate((*spec.hidden, 1)):
        weight = (rng.standard_normal((units, width)) / np.sqrt(width)).astype(np.float32)
        last = layer == len(spec.hidden)
        x, params = _dense_layer(nodes, x, weight, np.zeros(units, np.float32), f"top{layer}", relu=not last)
        initializers.extend(params)
        width = units
    sigmoid = ir.node("Sigmoid", [x], name="probability")
    flatten_shape = ir.Value(name="score_shape", const_value=ir.tensor(np.array([-1], np.int64), name="score_shape"))
    reshape = ir.node("Reshape", [sigmoid.outputs[0], flatten_shape], name="score_reshape")
    nodes.extend([sigmoid, reshape])
    initializers.append(flatten_shape)
    score = reshape.outputs[0]
    score.name = "score"
    score.type = ir.TensorType(ir.DataType.FLOAT)
    score.shape = ir.Shape([batch])

    graph = ir.Graph(inputs, [score], nodes=nodes, initializers=initializers, opset_imports={"": 17}, name=name)
    model = ir.Model(graph, ir_version=8, producer_name="onnxcompress-tools")
    ir.save(model, model_path)
    return model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--tables", type=int, default=SyntheticSpec.tables)
    parser.add_argument("--rows", type=int, default=SyntheticSpec.rows)
    parser.add_argument("--dim", type=int, default=SyntheticSpec.dim)
    parser.add_argument("--name", default="dlrm_large")
    args = parser.parse_args()
    path = make_synthetic_dlrm(args.out_dir, SyntheticSpec(args.tables, args.rows, args.dim), args.name)
    data = path.with_name(path.name + ".data")
    print(f"{path} ({path.stat().st_size} bytes) + {data} ({data.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
