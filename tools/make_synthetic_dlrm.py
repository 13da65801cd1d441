"""Generate a Criteo-like DLRM in ONNX with external data, of any size, in bounded memory.

The default is shaped like DLRM on Criteo: 13 dense features through a 512-256-64 bottom MLP,
26 embedding tables of 64 dimensions whose cardinalities span 4 to 2,000,000 rows (seven of
1,000,000+; 2.3 GB in all), and a 1024-1024-512-256-1 top MLP. Rows are drawn with a
log-normal norm per row, as trained tables have (frequent ids grow large), so one scale per table
is a poor fit and row-wise quantization matters as it does on real tables.

Tables are written to the data file chunk by chunk (never held whole in memory), so the model is
generated with about 100 MB of RAM. Used by the large-model tests and benchmarks.

    python tools/make_synthetic_dlrm.py OUT_DIR            # the 2.3 GB Criteo-like model
    python tools/make_synthetic_dlrm.py OUT_DIR --tables 2 --rows 600000   # uniform tables
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

__all__ = ["SyntheticSpec", "make_synthetic_dlrm"]

CHUNK_ROWS = 131072


#: Cardinalities of the 26 Criteo categorical features, large ones capped at 2,000,000 rows.
CRITEO_ROWS: tuple[int, ...] = (
    1460, 583, 2_000_000, 1_200_000, 305, 24, 12517, 633, 3, 93145, 5683, 1_000_000, 3194,
    27, 14992, 1_200_000, 10, 5652, 2173, 4, 1_300_000, 18, 15, 1_000_000, 105, 1_100_000,
)  # fmt: skip


@dataclass(frozen=True)
class SyntheticSpec:
    table_rows: tuple[int, ...] = CRITEO_ROWS
    dim: int = 64
    dense_features: int = 13
    bottom: tuple[int, ...] = (512, 256)  # then ``dim``, so the dense vector joins the embeddings
    top: tuple[int, ...] = (1024, 1024, 512, 256)  # then the logit
    seed: int = 0

    @classmethod
    def uniform(cls, tables: int, rows: int, dim: int = 64) -> SyntheticSpec:
        """``tables`` equal tables and a small MLP: quick to generate, for tests of the I/O paths."""
        return cls(table_rows=(rows,) * tables, dim=dim, dense_features=16, bottom=(256,), top=(256, 64))

    @property
    def data_bytes(self) -> int:
        return sum(self.table_rows) * self.dim * 4


def _rows(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((count, dim), dtype=np.float32)
    rows *= (np.float32(0.02) * rng.lognormal(0.0, 1.0, (count, 1))).astype(np.float32)
    return rows


def _write_table(handle, rng: np.random.Generator, rows: int, dim: int) -> None:
    for start in range(0, rows, CHUNK_ROWS):
        handle.write(_rows(rng, min(CHUNK_ROWS, rows - start), dim).tobytes())


def _mlp(rng: np.random.Generator, width: int, units: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """He-initialised ``[out, in]`` weights and small biases: activations keep their scale through ReLUs."""
    layers = []
    for out in units:
        weight = (rng.standard_normal((out, width)) * np.sqrt(2.0 / width)).astype(np.float32)
        layers.append((weight, (rng.standard_normal(out) * 0.01).astype(np.float32)))
        width = out
    return layers


def _forward(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray, *, last_relu: bool) -> np.ndarray:
    for index, (weight, bias) in enumerate(layers):
        x = x @ weight.T + bias
        if last_relu or index < len(layers) - 1:
            x = np.maximum(x, 0.0)
    return x


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

    offset = 0
    with open(out_dir / data_name, "wb") as handle:
        for index, rows in enumerate(spec.table_rows):
            table_bytes = rows * spec.dim * 4
            table = ir.Value(
                name=f"table{index}",
                const_value=ir.ExternalTensor(
                    data_name,
                    offset,
                    table_bytes,
                    ir.DataType.FLOAT,
                    shape=ir.Shape([rows, spec.dim]),
                    name=f"table{index}",
                    base_dir=out_dir,
                ),
            )
            _write_table(handle, rng, rows, spec.dim)
            offset += table_bytes
            ids = ir.Value(name=f"ids{index}", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([batch]))
            gather = ir.node("Gather", [table, ids], name=f"lookup{index}")
            nodes.append(gather)
            initializers.append(table)
            inputs.append(ids)
            features.append(gather.outputs[0])

    dense = ir.Value(name="dense", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([batch, spec.dense_features]))
    inputs.append(dense)
    bottom = _mlp(rng, spec.dense_features, (*spec.bottom, spec.dim))
    top = _mlp(rng, spec.dim * (len(spec.table_rows) + 1), (*spec.top, 1))
    # Scale the logit layer so scores spread like a trained model's (logit std 1.5) rather than
    # all sitting at 0.5, where any rounding reorders them.
    sample = 1024
    dense_sample = _forward(bottom, rng.standard_normal((sample, spec.dense_features)), last_relu=True)
    embedded = [_rows(rng, sample, spec.dim) for _ in spec.table_rows]
    logits = _forward(top, np.concatenate([dense_sample, *embedded], axis=1), last_relu=False)
    top[-1] = (top[-1][0] * np.float32(1.5 / float(logits.std())), top[-1][1])
    x = dense
    for prefix, layers in (("bottom", bottom), ("top", top)):
        for layer, (weight, bias) in enumerate(layers):
            last = prefix == "top" and layer == len(layers) - 1
            x, params = _dense_layer(nodes, x, weight, bias, f"{prefix}{layer}", relu=not last)
            initializers.extend(params)
        if prefix == "bottom":
            concat = ir.node("Concat", [x, *features], attributes={"axis": 1}, name="interaction")
            nodes.append(concat)
            x = concat.outputs[0]
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
    parser.add_argument("--tables", type=int, help="this many equal tables of --rows rows (default: Criteo-like)")
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--name", default="dlrm_large")
    args = parser.parse_args()
    spec = SyntheticSpec.uniform(args.tables, args.rows, args.dim) if args.tables else SyntheticSpec(dim=args.dim)
    path = make_synthetic_dlrm(args.out_dir, spec, args.name)
    data = path.with_name(path.name + ".data")
    print(f"{path} ({path.stat().st_size} bytes) + {data} ({data.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
