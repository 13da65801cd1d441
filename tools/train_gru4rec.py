"""Train a GRU4Rec-style sequential recommender on MovieLens-100k and export it to models/gru4rec.*
(TorchScript exporter, opset 17; the recurrence exports as one ONNX ``GRU`` node).

Item embedding (n_items + 1, 32; row 0 = padding) -> one unidirectional ``nn.GRU(32, 32, batch_first=True)``
over the 20-step history (left-padded, so the last step is always the newest item); the last hidden state is
dotted with the candidate's embedding from the same (tied) table, plus a scalar bias -> sigmoid. Trained like
``sasrec`` (tools/train_sasrec.py) on every interaction: history -> candidate item, label rating >= 4, with
the same data, split, feeds, labels, calibration rows, optimizer and early stopping.

Inputs: ``history`` int64 [batch, 20] (item id + 1, 0 = padding, newest last), ``item`` int64 [batch]
(0-based item id); output ``score`` float32 [batch] -- the same graph interface as ``sasrec``.

Rebuild from the repo root: ``python tools/train_gru4rec.py`` (byte-identical files; the TorchScript export
does not depend on PYTHONHASHSEED, checked with seeds 0, 1 and 12345, so unlike train_dlrm_bag.py the script
does not pin it).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import onnx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from movielens import SPARSE_FIELDS, load_movielens
from torch_common import MODELS_DIR, fit, publish, rows, setup
from train_sasrec import DIM, DROPOUT

NAME = "gru4rec"
MAX_ONNX_BYTES = 300_000
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


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in proto.graph.node).items()))


def main() -> None:
    setup()
    data = load_movielens()
    feeds = {"history": data.history, "item": data.sparse[:, SPARSE_FIELDS.index("item")].copy()}
    steps = data.history.shape[1]
    model = GRU4Rec(data.n_items)
    trained = fit(
        model,
        rows(feeds, data.train),
        data.label[data.train],
        rows(feeds, data.valid),
        data.label[data.valid],
        **TRAINING,
    )
    print(f"trained in {trained.seconds:.1f}s", flush=True)
    meta = publish(
        NAME,
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
        mode="torchscript",
        opset=17,
        test=rows(feeds, data.test),
        test_label=data.label[data.test],
        calib_pool=rows(feeds, data.train),
        split_rows={"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
        trained=trained,
        script="tools/train_gru4rec.py",
    )

    # Provenance that publish does not record: the exported op types (the recurrence must be one ONNX GRU).
    # The wall-clock training time is dropped so that a rebuild gives a byte-identical meta.json.
    proto = onnx.load(str(MODELS_DIR / f"{NAME}.onnx"))
    ops = op_counts(proto)
    if ops.get("GRU") != 1 or {"Loop", "Scan"} & set(ops):
        raise RuntimeError(f"expected exactly one ONNX GRU node and no loop: {ops}")
    if (size := meta["files"]["onnx"]["bytes"]) > MAX_ONNX_BYTES:
        raise RuntimeError(f"{NAME}.onnx is {size} bytes, over {MAX_ONNX_BYTES}")
    gru = next(node for node in proto.graph.node if node.op_type == "GRU")
    meta["training"].pop("seconds")
    meta["training"] |= {k: v for k, v in TRAINING.items() if k != "patience"}
    meta["training"]["early_stopping"] = f"validation AUC, patience {TRAINING['patience']}"
    meta["op_types"] = ops
    meta["gru_node"] = {a.name: onnx.helper.get_attribute_value(a) for a in gru.attribute}
    meta["gru_node"] = {k: v.decode() if isinstance(v, bytes) else v for k, v in meta["gru_node"].items()}
    meta["export_note"] = (
        "the exporter builds the GRU's zero initial state with Shape -> ConstantOfShape from the runtime batch, "
        "so the graph runs at any batch size although it was traced at batch 2 (the exporter warns otherwise)"
    )
    (MODELS_DIR / f"{NAME}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print("op types", ops)
    print("GRU node", meta["gru_node"])


if __name__ == "__main__":
    main()
