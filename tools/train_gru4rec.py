"""Train a GRU4Rec-style sequential recommender on MovieLens-100k and export it to ONNX twice.

Item embedding (n_items + 1, 32; row 0 = padding) -> one unidirectional ``nn.GRU(32, 32, batch_first=True)``
over the 20-step history (left-padded, so the last step is always the newest item); the last hidden state is
dotted with the candidate's embedding from the same (tied) table, plus a scalar bias -> sigmoid. Trained like
``sasrec`` (tools/train_sasrec.py) on every interaction: history -> candidate item, label rating >= 4, with
the same data, split, feeds, labels, calibration rows, optimizer and early stopping.

Inputs: ``history`` int64 [batch, 20] (item id + 1, 0 = padding, newest last), ``item`` int64 [batch]
(0-based item id); output ``score`` float32 [batch] -- the same graph interface as ``sasrec``.

Builds two models in ``models/`` from the same trained weights (each as NAME.onnx, NAME.feeds.npz,
NAME.labels.npy, NAME.calib.npz and NAME.meta.json; the feeds, labels and calibration rows are the same):

- ``gru4rec``: torch.onnx.export(dynamo=False), opset 17.
- ``gru4rec_dynamo``: torch.onnx.export(dynamo=True), opset 18 (the dynamo exporter's default, as
  ``dlrm_dynamo``).

In both graphs the recurrence is one ONNX ``GRU`` node (checked; no Loop or Scan).

Rebuild both from the repo root with ``python tools/train_gru4rec.py``, or one with ``--model NAME``; each run
retrains the weights (byte-identical files; neither export depends on PYTHONHASHSEED, checked with seeds 0, 1
and 12345, so unlike train_dlrm_bag.py the script does not pin it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from movielens import MovieLens
from torch_common import (
    MODELS_DIR,
    Feeds,
    TrainResult,
    check_export,
    op_counts,
    publish,
    record_training,
    rows,
    train_and_build,
)
from train_sasrec import DIM, DROPOUT, sequence_feeds

SCRIPT = "tools/train_gru4rec.py"
# Model name -> (exporter mode, opset, rebuild command line after the script); both export the same weights.
EXPORTS = {"gru4rec": ("torchscript", 17, ""), "gru4rec_dynamo": ("dynamo", 18, " --model gru4rec_dynamo")}
MAX_ONNX_BYTES = 300_000
EXPORT_NOTES = {
    "torchscript": "the exporter builds the GRU's zero initial state with Shape -> ConstantOfShape from the runtime "
    "batch, so the graph runs at any batch size although it was traced at batch 2 (the exporter warns otherwise)",
    "dynamo": "export with a dynamic batch dimension (torch.export.Dim); the GRU's zero initial state is built from "
    "the runtime batch (Shape -> Concat -> Expand -> Slice). The exporter computes W, R and B from gru.weight_ih_l0, "
    "gru.weight_hh_l0 and the two biases with Slice/Mul/Concat/Unsqueeze nodes (PyTorch gate order r, z, n -> "
    "ONNX z, r, h); its default optimization (optimize=True) folds those, so the GRU reads W, R and B directly "
    "from initializers",
}
TRAINING = {"lr": 1e-3, "weight_decay": 1e-6, "batch_size": 512, "max_epochs": 10, "patience": 2}  # as sasrec


class GRU4Rec(nn.Module):
    def __init__(self, n_items: int) -> None:
        super().__init__()
        self.item_table = nn.Embedding(n_items + 1, DIM, padding_idx=0)
        self.gru = nn.GRU(DIM, DIM, num_layers=1, batch_first=True)
        self.bias = nn.Parameter(torch.zeros(1))
        self.dropout = nn.Dropout(DROPOUT)
        nn.init.normal_(self.item_table.weight[1:], std=0.05)

    def forward(self, history: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        _, last = self.gru(self.dropout(self.item_table(history)))  # last: [1, batch, DIM]
        last = self.dropout(last[0])
        return torch.sigmoid((last * self.item_table(item + 1)).sum(dim=-1) + self.bias)


def gru_inputs(proto: onnx.ModelProto, gru: onnx.NodeProto) -> dict[str, dict[str, object]]:
    """Per GRU input (ONNX names X, W, R, B, sequence_lens, initial_h): the initializers and graph inputs it is
    computed from and the nodes in between, in graph order."""
    initializers = {i.name: list(i.dims) for i in proto.graph.initializer}
    graph_inputs = {i.name for i in proto.graph.input}
    producer = {out: node for node in proto.graph.node for out in node.output}
    order = {id(node): k for k, node in enumerate(proto.graph.node)}
    chains = {}
    for slot, name in zip(("X", "W", "R", "B", "sequence_lens", "initial_h"), gru.input, strict=False):
        if not name:
            continue
        nodes: dict[int, onnx.NodeProto] = {}
        sources: dict[str, object] = {}
        pending = [name]
        while pending:
            value = pending.pop()
            if value in initializers:
                sources[value] = {"initializer": initializers[value]}
            elif value in graph_inputs:
                sources[value] = "graph input"
            elif value in producer and id(producer[value]) not in nodes:
                nodes[id(producer[value])] = producer[value]
                pending += [v for v in producer[value].input if v]
        chains[slot] = {
            "value": name,
            "sources": dict(sorted(sources.items())),
            "nodes": [
                f"{n.op_type}({', '.join(n.input)}) -> {', '.join(n.output)}"
                for n in sorted(nodes.values(), key=lambda n: order[id(n)])
            ],
        }
    return chains


def build(name: str, model: GRU4Rec, trained: TrainResult, data: MovieLens, feeds: Feeds) -> dict[str, Any]:
    """Export one model with publish (ONNX file, feeds, labels, calibration rows, onnxruntime check) and add
    the provenance publish does not record to NAME.meta.json."""
    mode, opset, rebuild_args = EXPORTS[name]
    steps = data.history.shape[1]
    meta = publish(
        name,
        model,
        architecture=f"GRU4Rec: tied item embedding ({data.n_items + 1} x {DIM}), 1-layer GRU {DIM}-{DIM} over the "
        f"{steps}-step history, last hidden state . candidate embedding + bias, sigmoid",
        layers={
            "item_table": [data.n_items + 1, DIM],
            "gru": {
                "input_size": DIM,
                "hidden_size": DIM,
                "num_layers": 1,
                "bidirectional": False,
                "batch_first": True,
                "steps": steps,
            },
            "bias": [1],
            "dropout": DROPOUT,
        },
        mode=mode,
        opset=opset,
        test=rows(feeds, data.test),
        test_label=data.label[data.test],
        calib_pool=rows(feeds, data.train),
        split_rows={"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
        trained=trained,
        script=SCRIPT + rebuild_args,
    )

    # Provenance that publish does not record: the exported op types (the recurrence must be one ONNX GRU).
    # The wall-clock training time is dropped so that a rebuild gives a byte-identical meta.json.
    proto = onnx.load(str(MODELS_DIR / f"{name}.onnx"))
    ops = op_counts(proto)
    if ops.get("GRU") != 1 or {"Loop", "Scan"} & set(ops):
        raise RuntimeError(f"{name}: expected exactly one ONNX GRU node and no loop: {ops}")
    check_export(name, proto, meta, opset, MAX_ONNX_BYTES)
    gru = next(node for node in proto.graph.node if node.op_type == "GRU")
    chains = gru_inputs(proto, gru)
    record_training(meta, TRAINING)
    meta["op_types"] = ops
    meta["gru_node"] = {a.name: onnx.helper.get_attribute_value(a) for a in gru.attribute}
    meta["gru_node"] = {k: v.decode() if isinstance(v, bytes) else v for k, v in meta["gru_node"].items()}
    meta["export_note"] = EXPORT_NOTES[mode]
    if mode == "dynamo":
        # The note says W, R and B are initializers; the quantizer reads them as such. (gru4rec's meta.json
        # predates this field and is kept byte-identical, so only the dynamo twin records it.)
        if any(chains[slot]["nodes"] or chains[slot]["value"] not in chains[slot]["sources"] for slot in "WRB"):
            raise RuntimeError(f"{name}: the GRU's W, R or B is computed, not an initializer: {chains}")
        meta["gru_inputs"] = chains
    (MODELS_DIR / f"{name}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{name}: op types {ops}")
    print(f"{name}: GRU node {meta['gru_node']}")
    for slot, chain in chains.items():
        print(f"{name}: GRU {slot} = {chain['value']} from {chain['sources']} via {chain['nodes']}")
    return meta


def main() -> None:
    train_and_build(
        __doc__.splitlines()[0], list(EXPORTS), lambda data: GRU4Rec(data.n_items), sequence_feeds, TRAINING, build
    )


if __name__ == "__main__":
    main()
