"""Train a SASRec-style sequential recommender on MovieLens-100k and export it to models/sasrec.*
(TorchScript exporter, opset 17).

Item embedding (n_items + 1, 32; row 0 = padding) scaled by sqrt(32) + learned positional embeddings
over the 20-step history, two pre-LayerNorm transformer blocks (2-head self-attention written out with
nn.Linear and matmuls, causal + padding mask, FFN 32-64-32, residual adds, padded steps zeroed), a final
LayerNorm; the last step's state is dotted with the candidate's embedding from the same (tied) table
-> sigmoid. Trained on every interaction: history -> candidate item, label rating >= 4.

Inputs: ``history`` int64 [batch, 20] (item id + 1, 0 = padding, newest last), ``item`` int64 [batch]
(0-based item id); output ``score`` float32 [batch].

Rebuild from the repo root: ``python tools/train_sasrec.py``
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from movielens import SPARSE_FIELDS, MovieLens, load_movielens
from torch_common import Feeds, fit, publish, rows, setup

DIM = 32
HEADS = 2
FFN_DIM = 64
BLOCKS = 2
DROPOUT = 0.2
MASKED = -1e9


class Block(nn.Module):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps  # a Python int, so the head reshapes export with constant target shapes
        self.attn_norm = nn.LayerNorm(DIM)
        self.query, self.key, self.value = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.attn_out = nn.Linear(DIM, DIM)
        self.ffn_norm = nn.LayerNorm(DIM)
        self.ffn = nn.Sequential(nn.Linear(DIM, FFN_DIM), nn.ReLU(), nn.Dropout(DROPOUT), nn.Linear(FFN_DIM, DIM))
        self.dropout = nn.Dropout(DROPOUT)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.steps, HEADS, DIM // HEADS).transpose(1, 2)  # [batch, heads, steps, head_dim]

    def forward(self, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        q, k, v = self._heads(self.query(h)), self._heads(self.key(h)), self._heads(self.value(h))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(DIM // HEADS)
        weights = self.dropout(torch.softmax(scores.masked_fill(blocked, MASKED), dim=-1))
        attended = torch.matmul(weights, v).transpose(1, 2).reshape(-1, self.steps, DIM)
        x = x + self.dropout(self.attn_out(attended))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class SASRec(nn.Module):
    def __init__(self, n_items: int, steps: int) -> None:
        super().__init__()
        self.item_table = nn.Embedding(n_items + 1, DIM, padding_idx=0)
        self.positions = nn.Parameter(torch.randn(steps, DIM) * 0.02)
        self.register_buffer("future", torch.triu(torch.ones(steps, steps, dtype=torch.bool), diagonal=1))
        self.blocks = nn.ModuleList(Block(steps) for _ in range(BLOCKS))
        self.final_norm = nn.LayerNorm(DIM)
        self.dropout = nn.Dropout(DROPOUT)
        nn.init.normal_(self.item_table.weight[1:], std=0.05)

    def forward(self, history: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        present = (history > 0).unsqueeze(-1).to(torch.float32)  # [batch, steps, 1]
        blocked = self.future | (history == 0)[:, None, None, :]  # [batch, 1, steps, steps]
        x = self.dropout(self.item_table(history) * math.sqrt(DIM) + self.positions) * present
        for block in self.blocks:
            x = block(x, blocked) * present
        last = self.final_norm(x)[:, -1]
        return torch.sigmoid((last * self.item_table(item + 1)).sum(dim=-1))


def sequence_feeds(data: MovieLens) -> Feeds:
    """The inputs of the sequential models: the history of item ids and the candidate item."""
    return {"history": data.history, "item": data.sparse[:, SPARSE_FIELDS.index("item")].copy()}


def main() -> None:
    setup()
    data = load_movielens()
    feeds = sequence_feeds(data)
    steps = data.history.shape[1]
    model = SASRec(data.n_items, steps)
    trained = fit(model, rows(feeds, data.train), data.label[data.train], rows(feeds, data.valid),
                  data.label[data.valid], lr=1e-3, weight_decay=1e-6, batch_size=512, max_epochs=10, patience=2)
    publish(
        "sasrec",
        model,
        architecture=f"SASRec: tied item embedding ({data.n_items + 1} x {DIM}) + positions ({steps} x {DIM}), "
        f"{BLOCKS} pre-LN blocks ({HEADS}-head causal self-attention, FFN {DIM}-{FFN_DIM}-{DIM}), final LN, "
        "last state . candidate embedding, sigmoid",
        layers={
            "item_table": [data.n_items + 1, DIM],
            "positions": [steps, DIM],
            "blocks": BLOCKS,
            "heads": HEADS,
            "attention": {"query": [DIM, DIM], "key": [DIM, DIM], "value": [DIM, DIM], "out": [DIM, DIM]},
            "ffn": [DIM, FFN_DIM, DIM],
        },
        mode="torchscript",
        opset=17,
        test=rows(feeds, data.test),
        test_label=data.label[data.test],
        calib_pool=rows(feeds, data.train),
        split_rows={"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
        trained=trained,
        script="tools/train_sasrec.py",
    )


if __name__ == "__main__":
    main()
