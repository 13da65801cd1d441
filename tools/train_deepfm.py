"""Train DeepFM on MovieLens-100k and export it to models/deepfm.* (TorchScript exporter, opset 17).

One concatenated embedding table serves all 7 sparse fields, indexed as ``sparse + offsets`` (the
torchfm FeaturesEmbedding form); FM first order (1-dim embedding with the same offsets + a linear on
the dense features), FM second order, and a deep MLP (3 x [Linear 256, BatchNorm1d, ReLU, Dropout])
on the flattened embeddings and dense features; sigmoid.

Inputs: ``sparse`` int64 [batch, 7], ``dense`` float32 [batch, 25]; output ``score`` float32 [batch].

Rebuild from the repo root: ``python tools/train_deepfm.py``
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from movielens import load_movielens
from torch_common import fit, publish, rows, setup

EMBED_DIM = 16
HIDDEN = (256, 256, 256)
DROPOUT = 0.2


class DeepFM(nn.Module):
    def __init__(self, cardinalities: tuple[int, ...], n_dense: int) -> None:
        super().__init__()
        offsets = np.concatenate([[0], np.cumsum(cardinalities)[:-1]])
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))
        total = int(sum(cardinalities))
        self.embedding = nn.Embedding(total, EMBED_DIM)
        self.first_order = nn.Embedding(total, 1)
        self.dense_linear = nn.Linear(n_dense, 1)
        layers: list[nn.Module] = []
        width = len(cardinalities) * EMBED_DIM + n_dense
        for hidden in HIDDEN:
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(DROPOUT)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        nn.init.normal_(self.embedding.weight, std=0.01)
        nn.init.zeros_(self.first_order.weight)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        ids = sparse + self.offsets
        emb = self.embedding(ids)  # [batch, fields, dim]
        linear = self.first_order(ids).sum(dim=1) + self.dense_linear(dense)
        square_of_sum = emb.sum(dim=1).pow(2)
        sum_of_square = emb.pow(2).sum(dim=1)
        interaction = 0.5 * (square_of_sum - sum_of_square).sum(dim=1, keepdim=True)
        deep = self.mlp(torch.cat([emb.flatten(1), dense], dim=1))
        return torch.sigmoid(linear + interaction + deep).squeeze(1)


def main() -> None:
    setup()
    data = load_movielens()
    feeds = {"sparse": data.sparse, "dense": data.dense}
    model = DeepFM(data.cardinalities, data.dense.shape[1])
    trained = fit(model, rows(feeds, data.train), data.label[data.train], rows(feeds, data.valid),
                  data.label[data.valid], lr=1e-3, weight_decay=1e-5, batch_size=1024, max_epochs=10, patience=2)
    publish(
        "deepfm",
        model,
        architecture="DeepFM: shared offset embedding (7 fields x 16) + FM first/second order + "
        "MLP 3x[Linear 256, BatchNorm1d, ReLU, Dropout 0.2] -> Linear 1, sigmoid",
        layers={
            "embedding": [int(sum(data.cardinalities)), EMBED_DIM],
            "first_order": [int(sum(data.cardinalities)), 1],
            "dense_linear": [data.dense.shape[1], 1],
            "mlp": [len(data.cardinalities) * EMBED_DIM + data.dense.shape[1], *HIDDEN, 1],
            "cardinalities": list(data.cardinalities),
        },
        mode="torchscript",
        opset=17,
        test=rows(feeds, data.test),
        test_label=data.label[data.test],
        calib_pool=rows(feeds, data.train),
        split_rows={"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
        trained=trained,
        script="tools/train_deepfm.py",
    )


if __name__ == "__main__":
    main()
