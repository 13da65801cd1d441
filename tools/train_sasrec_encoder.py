"""Train SASRec with PyTorch's own ``nn.TransformerEncoderLayer`` blocks on MovieLens-100k and export it to ONNX twice.

The model of ``sasrec`` (tools/train_sasrec.py) -- item embedding (n_items + 1, 32; row 0 = padding) scaled by
sqrt(32) + learned positional embeddings over the 20-step history, two pre-LayerNorm transformer blocks, a final
LayerNorm, the last step's state dotted with the candidate's embedding from the same (tied) table -> sigmoid -- but
each block is ``nn.TransformerEncoderLayer(d_model=32, nhead=2, dim_feedforward=64, dropout=0.2, batch_first=True,
norm_first=True)`` instead of hand-written attention, the path most users take. The layers are called in a Python
loop (not through ``nn.TransformerEncoder``, whose causal-mask detection makes torch.export fail) with a float
causal ``src_mask`` (0 / -inf, a buffer) and a float ``src_key_padding_mask`` (0 / -inf from ``history == 0``);
padded steps are zeroed after every block, as in ``sasrec``. Trained like ``sasrec`` on every interaction:
history -> candidate item, label rating >= 4, with the same data, split, feeds, labels, calibration rows,
optimizer and early stopping.

No attention row may be fully masked (-inf everywhere gives NaN): the history is left-padded, so a padded query
step sees only padded keys under the causal mask, and a fully padded history (a user's first rating: 751 training
and 76 test rows) has no real step at all. The padding mask therefore never blocks the oldest step (step 0), which
every query may attend to under the causal mask: when it is padding its state is zero, so it acts as a fixed
"empty" token; when it is a real item nothing changes. (``sasrec`` instead fills blocked scores with -1e9, which
gives padded queries uniform weights.) Fully padded histories score sigmoid(final_norm(0) . candidate), as in
``sasrec``.

Inputs: ``history`` int64 [batch, 20] (item id + 1, 0 = padding, newest last), ``item`` int64 [batch]
(0-based item id); output ``score`` float32 [batch] -- the same graph interface as ``sasrec``.

Builds two models in ``models/`` from the same trained weights (each as NAME.onnx, NAME.feeds.npz,
NAME.labels.npy, NAME.calib.npz and NAME.meta.json; the feeds, labels and calibration rows are the same):

- ``sasrec_encoder``: torch.onnx.export(dynamo=False), opset 17.
- ``sasrec_encoder_dynamo``: torch.onnx.export(dynamo=True), opset 18 (the dynamo exporter's default, as
  ``gru4rec_dynamo``).

Rebuild both from the repo root with ``python tools/train_sasrec_encoder.py``, or one with ``--model NAME``; each
run retrains the weights.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
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
from train_sasrec import BLOCKS, DIM, DROPOUT, FFN_DIM, HEADS, sequence_feeds

SCRIPT = "tools/train_sasrec_encoder.py"
# Model name -> (exporter mode, opset, rebuild command line after the script); both export the same weights.
EXPORTS = {
    "sasrec_encoder": ("torchscript", 17, ""),
    "sasrec_encoder_dynamo": ("dynamo", 18, " --model sasrec_encoder_dynamo"),
}
MAX_ONNX_BYTES = 1_000_000
EXPORT_NOTES = {
    "torchscript": "export of the trained module (traced with gradients enabled, so nn.TransformerEncoderLayer "
    "takes its Python path: F.multi_head_attention_forward -> scaled_dot_product_attention, not the fused "
    "_transformer_encoder_layer_fwd kernel PyTorch uses for eval inference)",
    "dynamo": "export with a dynamic batch dimension (torch.export.Dim) and the exporter's default optimization "
    "(optimize=True)",
}
MASKS = {
    "src_mask": "float [20, 20] buffer, torch.triu(torch.full((20, 20), -inf), 1): causal",
    "src_key_padding_mask": "float [batch, 20], -inf where history == 0 except at step 0 (the oldest), else 0; "
    "step 0 stays visible so that no attention row is fully masked (a padded step 0 has a zero state)",
}
TRAINING = {"lr": 1e-3, "weight_decay": 1e-6, "batch_size": 512, "max_epochs": 10, "patience": 2}  # as sasrec


class SASRecEncoder(nn.Module):
    def __init__(self, n_items: int, steps: int) -> None:
        super().__init__()
        self.item_table = nn.Embedding(n_items + 1, DIM, padding_idx=0)
        self.positions = nn.Parameter(torch.randn(steps, DIM) * 0.02)
        self.register_buffer("causal", torch.triu(torch.full((steps, steps), float("-inf")), 1))
        self.register_buffer("maskable", torch.arange(steps) > 0)  # the padding mask never blocks step 0
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=DIM, nhead=HEADS, dim_feedforward=FFN_DIM, dropout=DROPOUT, batch_first=True, norm_first=True
            )
            for _ in range(BLOCKS)
        )
        self.final_norm = nn.LayerNorm(DIM)
        self.dropout = nn.Dropout(DROPOUT)
        nn.init.normal_(self.item_table.weight[1:], std=0.05)

    def forward(self, history: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        present = (history > 0).unsqueeze(-1).to(torch.float32)  # [batch, steps, 1]
        blocked = (history == 0) & self.maskable
        padding = torch.zeros_like(history, dtype=torch.float32).masked_fill(blocked, float("-inf"))
        x = self.dropout(self.item_table(history) * math.sqrt(DIM) + self.positions) * present
        for layer in self.layers:
            x = layer(x, src_mask=self.causal, src_key_padding_mask=padding) * present
        last = self.final_norm(x)[:, -1]
        return torch.sigmoid((last * self.item_table(item + 1)).sum(dim=-1))


def build(name: str, model: SASRecEncoder, trained: TrainResult, data: MovieLens, feeds: Feeds) -> dict[str, Any]:
    """Export one model with publish (ONNX file, feeds, labels, calibration rows, onnxruntime check) and add
    the provenance publish does not record to NAME.meta.json."""
    mode, opset, rebuild_args = EXPORTS[name]
    steps = data.history.shape[1]
    test, calib_pool = rows(feeds, data.test), rows(feeds, data.train)
    meta = publish(
        name,
        model,
        architecture=f"SASRec (nn.TransformerEncoderLayer): tied item embedding ({data.n_items + 1} x {DIM}) + "
        f"positions ({steps} x {DIM}), {BLOCKS} pre-LN nn.TransformerEncoderLayer blocks ({HEADS}-head causal "
        f"self-attention, FFN {DIM}-{FFN_DIM}-{DIM}), final LN, last state . candidate embedding, sigmoid",
        layers={
            "item_table": [data.n_items + 1, DIM],
            "positions": [steps, DIM],
            "blocks": BLOCKS,
            "encoder_layer": {
                "module": "nn.TransformerEncoderLayer",
                "d_model": DIM,
                "nhead": HEADS,
                "dim_feedforward": FFN_DIM,
                "dropout": DROPOUT,
                "activation": "relu",
                "batch_first": True,
                "norm_first": True,
            },
            "final_norm": [DIM],
            "dropout": DROPOUT,
        },
        mode=mode,
        opset=opset,
        test=test,
        test_label=data.label[data.test],
        calib_pool=calib_pool,
        split_rows={"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
        trained=trained,
        script=SCRIPT + rebuild_args,
    )

    # Provenance that publish does not record: the exported op types and the attention masks.
    # The wall-clock training time is dropped so that a rebuild gives a byte-identical meta.json.
    onnx_path = MODELS_DIR / f"{name}.onnx"
    proto = onnx.load(str(onnx_path))
    ops = op_counts(proto)
    check_export(name, proto, meta, opset, MAX_ONNX_BYTES)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for split, split_feeds in {"test": test, "calibration pool": calib_pool}.items():
        if not np.isfinite(score := session.run(["score"], split_feeds)[0]).all():
            raise RuntimeError(f"{name}: {np.count_nonzero(~np.isfinite(score))} non-finite scores on the {split} rows")
    record_training(meta, TRAINING)
    meta["attention_masks"] = MASKS
    meta["op_types"] = ops
    meta["export_note"] = EXPORT_NOTES[mode]
    (MODELS_DIR / f"{name}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{name}: op types {ops}")
    return meta


def main() -> None:
    train_and_build(
        __doc__.splitlines()[0],
        list(EXPORTS),
        lambda data: SASRecEncoder(data.n_items, data.history.shape[1]),
        sequence_feeds,
        TRAINING,
        build,
    )


if __name__ == "__main__":
    main()
