"""Train a two-tower retrieval model on MovieLens-100k and export it to models/two_tower.* (dynamo, opset 18).

User tower: embeddings of user, gender, occupation, age_bucket, zip_region and the mean of the user's
history item embeddings -> MLP -> 32-d L2-normalised vector. Item tower: embeddings of item and
year_bucket + the 19 genre flags and the normalised year -> MLP -> 32-d L2-normalised vector. The item
id table (row 0 = padding, item i at row i + 1) is shared by the history pooling and the item tower.
Score = sigmoid(scale * dot + bias), trained with BCE on rating >= 4.

Graph inputs (all [batch] int64 unless noted): user side ``user``, ``gender``, ``occupation``,
``age_bucket``, ``zip_region``, ``history`` (int64 [batch, 20], item id + 1, 0 = padding, newest last);
item side ``item``, ``year_bucket``, ``genres`` (float32 [batch, 19]), ``year`` (float32 [batch],
(year - 1988) / 14). Output ``score`` float32 [batch].

Also writes models/two_tower.rank.npz: 20 test users (fixed seed) x all 1682 items, rows in blocks of
1682 per user, for per-user top-k agreement.

Rebuild from the repo root: ``python tools/train_two_tower.py``
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from movielens import DENSE_FIELDS, SPARSE_FIELDS, MovieLens, load_movielens
from torch_common import SEED, Feeds, fit, publish, rows, setup

EMBED_DIM = 16
HIDDEN = 64
OUT_DIM = 32
USER_FIELDS = ("user", "gender", "occupation", "age_bucket", "zip_region")
ITEM_FIELDS = ("item", "year_bucket")
GENRE_COLUMNS = [i for i, name in enumerate(DENSE_FIELDS) if name.startswith("genre_")]
YEAR_COLUMN = DENSE_FIELDS.index("year")
RANK_USERS = 20


def _tower(in_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT_DIM))


class TwoTower(nn.Module):
    def __init__(self, cardinality: dict[str, int]) -> None:
        super().__init__()
        self.item_table = nn.Embedding(cardinality["item"] + 1, EMBED_DIM, padding_idx=0)
        self.user_tables = nn.ModuleList(nn.Embedding(cardinality[f], EMBED_DIM) for f in USER_FIELDS)
        self.year_table = nn.Embedding(cardinality["year_bucket"], EMBED_DIM)
        self.user_mlp = _tower(EMBED_DIM * (len(USER_FIELDS) + 1))
        self.item_mlp = _tower(EMBED_DIM * len(ITEM_FIELDS) + len(GENRE_COLUMNS) + 1)
        self.scale = nn.Parameter(torch.tensor(5.0))
        self.bias = nn.Parameter(torch.tensor(0.0))

    def forward(
        self,
        user: torch.Tensor,
        gender: torch.Tensor,
        occupation: torch.Tensor,
        age_bucket: torch.Tensor,
        zip_region: torch.Tensor,
        history: torch.Tensor,
        item: torch.Tensor,
        year_bucket: torch.Tensor,
        genres: torch.Tensor,
        year: torch.Tensor,
    ) -> torch.Tensor:
        user_ids = (user, gender, occupation, age_bucket, zip_region)
        count = (history > 0).sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)
        pooled = self.item_table(history).sum(dim=1) / count
        u = self.user_mlp(torch.cat([*(t(i) for t, i in zip(self.user_tables, user_ids, strict=True)), pooled], dim=1))
        v = self.item_mlp(torch.cat([self.item_table(item + 1), self.year_table(year_bucket), genres,
                                     year.unsqueeze(1)], dim=1))
        dot = (F.normalize(u, dim=1) * F.normalize(v, dim=1)).sum(dim=1)
        return torch.sigmoid(self.scale * dot + self.bias)


def _feeds(data: MovieLens) -> Feeds:
    feeds = {f: data.sparse[:, SPARSE_FIELDS.index(f)] for f in USER_FIELDS}
    feeds["history"] = data.history
    feeds.update({f: data.sparse[:, SPARSE_FIELDS.index(f)] for f in ITEM_FIELDS})
    feeds["genres"] = data.dense[:, GENRE_COLUMNS]
    feeds["year"] = data.dense[:, YEAR_COLUMN]
    return {k: np.ascontiguousarray(v) for k, v in feeds.items()}


def _rank_feeds(data: MovieLens, feeds: Feeds) -> tuple[Feeds, list[int]]:
    """Each of RANK_USERS test users (user side as of their first test row) against every item."""
    users = np.unique(feeds["user"][data.test])
    chosen = np.sort(np.random.default_rng(SEED).choice(users, RANK_USERS, replace=False))
    first_test_row = [int(data.test[np.argmax(feeds["user"][data.test] == u)]) for u in chosen]
    # Item-side features are a function of the item alone: take them from any row with that item.
    item_row = np.zeros(data.n_items, dtype=np.int64)
    item_row[feeds["item"][::-1]] = np.arange(len(feeds["item"]))[::-1]
    assert np.array_equal(feeds["item"][item_row], np.arange(data.n_items)), "an item never occurs"
    user_part = rows({k: feeds[k] for k in (*USER_FIELDS, "history")}, np.repeat(first_test_row, data.n_items))
    item_part = rows({k: feeds[k] for k in (*ITEM_FIELDS, "genres", "year")}, np.tile(item_row, RANK_USERS))
    return {k: np.ascontiguousarray(v) for k, v in {**user_part, **item_part}.items()}, chosen.tolist()


def main() -> None:
    setup()
    data = load_movielens()
    feeds = _feeds(data)
    cardinality = dict(zip(SPARSE_FIELDS, data.cardinalities, strict=True))
    model = TwoTower(cardinality)
    trained = fit(model, rows(feeds, data.train), data.label[data.train], rows(feeds, data.valid),
                  data.label[data.valid], lr=3e-3, weight_decay=1e-5, batch_size=1024, max_epochs=12, patience=2)
    rank, rank_users = _rank_feeds(data, feeds)
    publish(
        "two_tower",
        model,
        architecture="Two-tower: user (5 id embeddings x 16 + mean-pooled history 16) -> MLP 96-64-32, "
        "item (item + year_bucket embeddings x 16 + 19 genres + year) -> MLP 52-64-32, L2-normalised, "
        "sigmoid(scale * dot + bias)",
        layers={
            "item_table": [data.n_items + 1, EMBED_DIM],
            "user_tables": {f: [cardinality[f], EMBED_DIM] for f in USER_FIELDS},
            "year_table": [cardinality["year_bucket"], EMBED_DIM],
            "user_mlp": [EMBED_DIM * (len(USER_FIELDS) + 1), HIDDEN, OUT_DIM],
            "item_mlp": [EMBED_DIM * len(ITEM_FIELDS) + len(GENRE_COLUMNS) + 1, HIDDEN, OUT_DIM],
        },
        mode="dynamo",
        opset=18,
        test=rows(feeds, data.test),
        test_label=data.label[data.test],
        calib_pool=rows(feeds, data.train),
        split_rows={"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
        trained=trained,
        script="tools/train_two_tower.py",
        extra_feeds={"rank": rank},
        notes={
            "rank_feeds": {
                "path": "models/two_tower.rank.npz",
                "rows": len(rank["item"]),
                "layout": f"rows come in blocks of {data.n_items} per user ({RANK_USERS} users, all items "
                "in item-id order within each block); user-side inputs are those of the user's first test row",
                "users": rank_users,
                "block_size": data.n_items,
                "seed": SEED,
            },
        },
    )


if __name__ == "__main__":
    main()
