"""Product quantization of embedding rows: each row split into sub-vectors of a few dimensions, and
each sub-vector replaced by the index of the nearest of a few centroids learned for its position.

At 16 centroids a 4-bit index stands for 2 or 4 dimensions (2 or 1 bits per value) with no scale
or offset per row, so narrow tables keep the whole saving; the centroids fit the rows' joint
distribution, so the error at a given size is lower than scalar codes' (measured on the shipped
DLRM's 16-wide tables: at 2 bits a value 0.27-0.35 median row error against int2's 0.25-0.27 at
1.75x the bytes; at 1 bit 0.36-0.47 against binary's 0.43-0.54 at 2x the bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxcompress.numerics.quant import sample_rows

__all__ = ["ProductCodes", "product_assign", "product_dequantize", "product_quantize"]

#: Rows k-means is fitted on (a sample spread over the table); every row is then assigned.
FIT_ROWS = 65536
_ASSIGN_CHUNK_ROWS = 1 << 15


@dataclass(frozen=True)
class ProductCodes:
    """``codes[r, s]``: the centroid of row ``r``'s sub-vector ``s`` in ``codebooks[s]``
    (``[sub_vectors, centroids, dims]``)."""

    codes: np.ndarray
    codebooks: np.ndarray

    @property
    def dims(self) -> int:
        return int(self.codebooks.shape[2])

    @property
    def centroids(self) -> int:
        return int(self.codebooks.shape[1])


def _nearest(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    distances = (
        (points * points).sum(axis=1)[:, None] - 2.0 * points @ centroids.T + (centroids * centroids).sum(axis=1)
    )
    return distances.argmin(axis=1)


def _kmeans(points: np.ndarray, count: int, iterations: int, rng: np.random.Generator) -> np.ndarray:
    """Lloyd's algorithm from a k-means++ start; empty clusters restart at the worst-fit point."""
    centroids = np.empty((count, points.shape[1]))
    centroids[0] = points[rng.integers(len(points))]
    closest = ((points - centroids[0]) ** 2).sum(axis=1)
    for index in range(1, count):
        total = closest.sum()
        pick = rng.choice(len(points), p=closest / total) if total > 0 else rng.integers(len(points))
        centroids[index] = points[pick]
        closest = np.minimum(closest, ((points - centroids[index]) ** 2).sum(axis=1))
    for _ in range(iterations):
        assignment = _nearest(points, centroids)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assignment, points)
        counts = np.bincount(assignment, minlength=count)
        moved = sums / np.maximum(counts, 1)[:, None]
        empty = counts == 0
        if empty.any():
            error = ((points - centroids[assignment]) ** 2).sum(axis=1)
            moved[empty] = points[np.argsort(error)[::-1][: int(empty.sum())]]
        if np.allclose(moved, centroids):
            break
        centroids = moved
    return centroids


def product_quantize(
    rows: Any, dims: int, centroids: int = 16, *, iterations: int = 25, seed: int = 0, dtype: Any = np.float16
) -> ProductCodes:
    """Product-quantize ``rows`` ``[N, D]`` (an array or a row source read in chunks): sub-vectors of
    ``dims`` dimensions (``D`` must be a multiple), ``centroids`` (at most 256) per sub-space fitted
    by k-means on up to ``FIT_ROWS`` rows, stored in ``dtype``; every row gets its nearest."""
    width = rows.shape[1]
    if width % dims or not 1 <= centroids <= 256:
        raise ValueError(f"{width} dimensions do not split into sub-vectors of {dims}, or {centroids} centroids")
    rng = np.random.default_rng(seed)
    sample = sample_rows(rows, FIT_ROWS).astype(np.float64)
    count = min(centroids, len(sample))
    books = np.stack(
        [_kmeans(sample[:, start : start + dims], count, iterations, rng) for start in range(0, width, dims)]
    ).astype(dtype)
    if count < centroids:  # fewer rows than centroids: pad with copies, never indexed
        books = np.concatenate([books, np.repeat(books[:, -1:], centroids - count, axis=1)], axis=1)
    return ProductCodes(product_assign(rows, books), books)


def product_assign(rows: Any, codebooks: np.ndarray) -> np.ndarray:
    """Each row's nearest centroid per sub-space, ``uint8 [N, sub_vectors]``, chunk by chunk."""
    stored = codebooks.astype(np.float64)
    sub_vectors, dims = stored.shape[0], stored.shape[2]
    codes = np.empty((len(rows), sub_vectors), np.uint8)
    for start in range(0, len(rows), _ASSIGN_CHUNK_ROWS):
        part = np.asarray(rows[start : start + _ASSIGN_CHUNK_ROWS], dtype=np.float64)
        for sub in range(sub_vectors):
            codes[start : start + len(part), sub] = _nearest(part[:, sub * dims : (sub + 1) * dims], stored[sub])
    return codes


def product_dequantize(codes: ProductCodes) -> np.ndarray:
    """The rows ``codes`` stand for, ``[N, D]`` float64."""
    books = codes.codebooks.astype(np.float64)
    parts = [books[sub][codes.codes[:, sub]] for sub in range(codes.codes.shape[1])]
    return np.concatenate(parts, axis=1)
