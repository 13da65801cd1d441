"""Pruning math on plain arrays: keep masks, N:M groups, global thresholds and 1-bit mask packing.

Every mask here is a boolean *keep* mask (True = the weight survives). Counts are exact: pruning a
tensor to sparsity ``s`` zeroes ``round(s * size)`` entries even when magnitudes tie, so achieved
sparsity matches the request instead of drifting with duplicate values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from onnxcompress.numerics.lstsq import NormalEquations

__all__ = [
    "EXACT_OBS_FLOPS",
    "ObsFit",
    "global_sparsities",
    "keep_count",
    "magnitude_sample",
    "nm_mask",
    "obs_fit",
    "obs_path",
    "obs_rows",
    "pack_bits",
    "parse_nm",
    "sparsegpt",
    "topk_mask",
    "unpack_bits",
]

#: Magnitude samples kept per tensor when choosing a global threshold: enough for a threshold
#: accurate to about 0.1% of the tensor, and bounded so huge tables cost a few MB, not their size.
GLOBAL_SAMPLE = 1 << 20


def keep_count(size: int, sparsity: float) -> int:
    """How many of ``size`` entries survive pruning to ``sparsity`` (rounded to nearest)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return size - round(sparsity * size)


def topk_mask(scores: np.ndarray, sparsity: float, axis: int | None = None) -> np.ndarray:
    """Keep the largest ``1 - sparsity`` fraction of ``scores``, over the whole array or along ``axis``.

    With ``axis`` every slice along it keeps the same count (per-row pruning of an embedding table
    uses ``axis=1``: each row keeps its own largest entries). Ties are broken by position, so the
    count is exact and the result deterministic.
    """
    scores = np.asarray(scores)
    if axis is None:
        flat = scores.reshape(-1)
        keep = keep_count(flat.size, sparsity)
        mask = np.zeros(flat.size, dtype=bool)
        if keep:
            mask[np.argsort(-flat, kind="stable")[:keep]] = True
        return mask.reshape(scores.shape)
    moved = np.moveaxis(scores, axis, -1)
    keep = keep_count(moved.shape[-1], sparsity)
    order = np.argsort(-moved, axis=-1, kind="stable")
    mask = np.zeros(moved.shape, dtype=bool)
    np.put_along_axis(mask, order[..., :keep], True, axis=-1)
    return np.moveaxis(mask, -1, axis)


def parse_nm(structure: str) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4); None when ``structure`` is not of the form N:M with 0 < N <= M."""
    left, sep, right = structure.partition(":")
    if not sep or not left.strip().isdigit() or not right.strip().isdigit():
        return None
    n, m = int(left), int(right)
    return (n, m) if 0 < n <= m else None


def nm_mask(scores: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keep the ``n`` largest of every ``m`` consecutive entries along ``axis``.

    A trailing group shorter than ``m`` (when the axis length is not a multiple of ``m``) keeps
    ``min(n, its length)`` entries: the same rule, applied to the part that exists.
    """
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < N <= M, got {n}:{m}")
    moved = np.moveaxis(np.asarray(scores), axis, -1)
    length = moved.shape[-1]
    padded_length = -(-length // m) * m
    # Padding with -inf never wins a slot over a real entry, so short groups keep their n largest.
    padded = np.full((*moved.shape[:-1], padded_length), -np.inf)
    padded[..., :length] = moved
    groups = padded.reshape(*moved.shape[:-1], padded_length // m, m)
    order = np.argsort(-groups, axis=-1, kind="stable")
    mask = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(mask, order[..., :n], True, axis=-1)
    mask = mask.reshape(*moved.shape[:-1], padded_length)[..., :length]
    return np.moveaxis(mask, -1, axis)


def magnitude_sample(array: np.ndarray, limit: int = GLOBAL_SAMPLE) -> np.ndarray:
    """Sorted |values| of ``array``, or of an evenly strided subsample when it has more than ``limit``.

    The sample stands in for the whole tensor in :func:`global_sparsities`; each sampled value
    represents ``array.size / len(sample)`` entries.
    """
    flat = np.abs(np.asarray(array, dtype=np.float64).reshape(-1))
    if flat.size > limit:
        flat = flat[:: -(-flat.size // limit)]
    return np.sort(flat)


def global_sparsities(
    samples: Sequence[np.ndarray], sizes: Sequence[int], sparsity: float, max_layer_sparsity: float = 1.0
) -> list[float]:
    """Per-tensor sparsities from one magnitude threshold shared by all tensors.

    ``samples`` are sorted magnitudes (:func:`magnitude_sample`) standing for tensors of ``sizes``
    entries. The threshold is the smallest one that zeroes ``sparsity`` of all entries, where no
    tensor gives up more than ``max_layer_sparsity`` of its own: capped tensors stop contributing,
    so the others go further below the threshold to make up the total. Because the cap can make the
    target unreachable, the result then saturates every tensor at the cap.
    """
    if not samples:
        return []
    total = float(sum(sizes))
    target = sparsity * total
    caps = [max_layer_sparsity] * len(samples)

    def pruned_at(threshold: float) -> tuple[float, list[float]]:
        fractions = [
            min(np.searchsorted(sample, threshold, side="left") / max(len(sample), 1), cap)
            for sample, cap in zip(samples, caps, strict=True)
        ]
        return sum(f * s for f, s in zip(fractions, sizes, strict=True)), fractions

    candidates = np.unique(np.concatenate([*samples, [np.inf]]))
    low, high = 0, len(candidates) - 1
    while low < high:  # smallest candidate threshold reaching the target
        middle = (low + high) // 2
        if pruned_at(candidates[middle])[0] >= target - 1e-9:
            high = middle
        else:
            low = middle + 1
    return [float(f) for f in pruned_at(candidates[low])[1]]


def allocate_sparsities(
    levels: Sequence[float], costs: np.ndarray, sizes: Sequence[int], sparsity: float
) -> list[float]:
    """Per-tensor sparsities that remove ``sparsity`` of all entries at the least summed cost.

    ``costs[t, k]`` is what pruning tensor ``t`` (``sizes[t]`` entries) to ``levels[k]`` costs on
    its own; ``levels`` rise from 0, where the cost is taken as 0. Costs are made non-decreasing per
    tensor (a measured dip is noise, not a gift) and assumed to add up across tensors. Greedy: the
    step (any tensor, to any higher level) with the lowest cost per entry removed is taken until the
    target is met; the last step stops part way, between two levels. When every tensor reaches the
    top level first, that is the result.
    """
    grid = np.asarray(levels, dtype=np.float64)
    if grid.ndim != 1 or grid[0] != 0.0 or np.any(np.diff(grid) <= 0):
        raise ValueError("levels must rise strictly from 0")
    cost = np.maximum.accumulate(np.asarray(costs, dtype=np.float64), axis=1)
    cost = cost - cost[:, :1]
    count = np.asarray(sizes, dtype=np.float64)
    chosen = np.zeros(len(count), dtype=int)
    result = np.zeros(len(count))
    remaining = sparsity * float(count.sum())
    while remaining > 1e-9:
        best: tuple[float, int, int] | None = None
        for tensor, level in enumerate(chosen):
            for higher in range(level + 1, len(grid)):
                removed = (grid[higher] - grid[level]) * count[tensor]
                slope = (cost[tensor, higher] - cost[tensor, level]) / removed
                if best is None or slope < best[0]:
                    best = (slope, tensor, higher)
        if best is None:
            break
        _, tensor, higher = best
        removed = (grid[higher] - grid[chosen[tensor]]) * count[tensor]
        if removed >= remaining:
            result[tensor] = grid[chosen[tensor]] + remaining / count[tensor]
            break
        chosen[tensor] = higher
        result[tensor] = grid[higher]
        remaining -= removed
    return [float(value) for value in result]


def pack_bits(mask: np.ndarray) -> np.ndarray:
    """A boolean array flattened to bytes, element ``8 i + j`` in bit ``j`` (least significant first).

    Least-significant-first is what a ``BitShift(RIGHT)`` by ``j`` followed by ``Mod 2`` decodes in
    standard ONNX ops; the last byte is padded with zero bits.
    """
    return np.packbits(np.asarray(mask, dtype=bool).reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, count: int) -> np.ndarray:
    """The inverse of :func:`pack_bits`: the first ``count`` bits as a flat boolean array."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8).reshape(-1), count=count, bitorder="little").astype(bool)


class ObsFit(NamedTuple):
    """A ``[d_in, d_out]`` keep mask and the ridge solution over it (zero where pruned)."""

    keep: np.ndarray
    weights: np.ndarray


def obs_fit(system: NormalEquations, sparsity: float, steps: int = 4, nm: tuple[int, int] | None = None) -> ObsFit:
    """A keep mask chosen by Optimal Brain Surgeon saliency on a ridge system, and the refit over it.

    Removing input ``q`` from output column ``j`` and refitting the others raises the squared
    error by ``w_q^2 / [A_S^-1]_qq`` (``A_S`` the system over the inputs ``S`` still kept); the
    least salient inputs go first. Unstructured masks are reached in ``steps`` equal rounds, each
    re-solving the kept systems, because saliencies change as neighbours leave (one-shot OBS on
    the dense solution is what SparseGPT approximates). N:M masks (``sparsity`` is then moot) are
    decided group by group in ``steps`` rounds in input order, each on the solution that keeps the
    groups not yet decided dense: their weights absorb what the decided groups lose, as in
    SparseGPT. Every column keeps the same count.
    """
    if nm is None:
        return obs_path(system, [sparsity], steps)[0]
    n, m = nm
    groups = -(-system.b.shape[0] // m)
    bounds = sorted({groups * step // steps for step in range(1, steps + 1)} - {0})

    def decide(low: int, high: int) -> _Choose:
        def choose(saliency: np.ndarray, keep: np.ndarray) -> np.ndarray:
            chosen = keep.copy()
            chosen[low:high] = nm_mask(saliency[low:high], n, m, axis=0)
            return chosen

        return choose

    lows = [0, *bounds[:-1]]
    return _obs_rounds(
        system, [(decide(low * m, high * m), high == bounds[-1]) for low, high in zip(lows, bounds, strict=True)]
    )[0]


def obs_path(
    system: NormalEquations, sparsities: Sequence[float], steps: int = 4, steps_after: int = 2
) -> list[ObsFit]:
    """:func:`obs_fit` (unstructured) at each of the rising ``sparsities``: the first reached from
    dense in ``steps`` rounds, each later one from the one before in ``steps_after``. Pricing a
    layer at several sparsities then costs a few rounds a level, not all the rounds from dense."""
    d_in = system.b.shape[0]
    rounds: list[tuple[_Choose, bool]] = []
    kept = d_in
    for level, sparsity in enumerate(sparsities):
        final = keep_count(d_in, sparsity)
        if final > kept:
            raise ValueError(f"obs_path needs rising sparsities, got {list(sparsities)}")
        count, start = (steps if level == 0 else steps_after), kept
        for step in range(1, count + 1):
            kept = start - round((start - final) * step / count)
            rounds.append((_keep_most_salient(kept), step == count))
    return _obs_rounds(system, rounds)


_Choose = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _keep_most_salient(count: int) -> _Choose:
    def choose(saliency: np.ndarray, keep: np.ndarray) -> np.ndarray:
        d_in = saliency.shape[0]
        return topk_mask(saliency, 1.0 - count / d_in if d_in else 0.0, axis=0)

    return choose


def _obs_rounds(system: NormalEquations, rounds: Sequence[tuple[_Choose, bool]]) -> list[ObsFit]:
    """Run OBS ``rounds`` over the columns, a chunk of columns at a time (each column's mask is its
    own); each round's chooser maps the kept entries' saliencies (``-inf`` elsewhere) and the keep
    mask to the next, narrower mask; rounds flagged True give an :class:`ObsFit`."""
    d_in, d_out = system.b.shape
    fits = [ObsFit(np.zeros((d_in, d_out), dtype=bool), np.zeros((d_in, d_out))) for _, report in rounds if report]
    dense_inverse = np.linalg.inv(system.a)
    chunk = max(1, _OBS_BYTES // (8 * 3 * max(d_in, 1) ** 2))
    for start in range(0, d_out, chunk):
        columns = np.arange(start, min(start + chunk, d_out))
        kept = _KeptInverses(system, columns, dense_inverse)
        reported = 0
        for choose, report in rounds:
            keep = choose(kept.saliency(), kept.keep())
            kept.restrict(keep)
            if report:
                fits[reported].keep[:, columns] = keep
                fits[reported].weights[:, columns] = kept.weights()
                reported += 1
    return fits


#: Bound on the memory of the per-column inverses :func:`_obs_rounds` carries (three of their size
#: at a time): columns are taken in chunks under it.
_OBS_BYTES = 192 * 1024 * 1024


class _KeptInverses:
    """For a chunk of output columns, each one's kept inputs (as many for every column) and the
    inverse of the ridge system restricted to them.

    Narrowing a kept set updates the inverse by a Schur complement instead of inverting anew: with
    ``P`` the inverse over the kept inputs, ``T`` those that stay and ``R`` those that leave, the
    inverse over ``T`` is ``P_TT - P_TR P_RR^-1 P_RT``, which costs ``|T|^2 |R|`` instead of
    ``|T|^3``; every column starts from the one dense inverse, shared.
    """

    def __init__(self, system: NormalEquations, columns: np.ndarray, dense_inverse: np.ndarray) -> None:
        d_in = system.b.shape[0]
        self.columns = columns
        self.lanes = np.arange(columns.size)[:, None]  # indexes [d_in, c] arrays with self.rows
        self.rhs = system.b[:, columns].T  # [c, d_in]
        self.rows = np.broadcast_to(np.arange(d_in), (columns.size, d_in))  # [c, k] kept inputs, ascending
        self.inverse = dense_inverse  # [k, k] while every column keeps everything, then [c, k, k]

    def _solved(self) -> np.ndarray:
        """``[c, k]`` ridge solutions over each column's kept inputs."""
        rhs = np.take_along_axis(self.rhs, self.rows, axis=1)
        solved: np.ndarray = np.matmul(self.inverse, rhs[:, :, None])[:, :, 0]
        return solved

    def _full(self, kept: np.ndarray, fill: float | bool) -> np.ndarray:
        """``[d_in, c]``: ``kept`` (``[c, k]``) at the kept inputs, ``fill`` elsewhere."""
        full = np.full((self.rhs.shape[1], self.columns.size), fill, dtype=np.asarray(kept).dtype)
        full[self.rows, self.lanes] = kept
        return full

    def weights(self) -> np.ndarray:
        """``[d_in, c]`` ridge solutions over the kept inputs, zero elsewhere."""
        return self._full(self._solved(), 0.0)

    def keep(self) -> np.ndarray:
        return self._full(np.ones(self.rows.shape, dtype=bool), False)

    def saliency(self) -> np.ndarray:
        """``[d_in, c]`` OBS saliency ``w_q^2 / [A_S^-1]_qq`` of every kept entry, ``-inf`` elsewhere."""
        diagonal = np.diagonal(self.inverse, axis1=-2, axis2=-1)
        return self._full(self._solved() ** 2 / diagonal, -np.inf)

    def restrict(self, keep: np.ndarray) -> None:
        """Keep only the inputs ``keep`` (``[d_in, c]``, a subset of the kept ones, as many a column)."""
        stays = keep[self.rows, self.lanes]
        count = int(stays[0].sum()) if stays.size else 0
        if not np.all(stays.sum(axis=1) == count) or int(keep.sum()) != count * self.columns.size:
            raise ValueError("every column must keep as many inputs, all of them kept before")
        if count == self.rows.shape[1]:
            return
        order = np.argsort(~stays, axis=1, kind="stable")  # staying positions first, in input order
        stay, leave = order[:, :count], order[:, count:]
        p_tt = self._block(stay, stay)
        p_tr = self._block(stay, leave)
        p_rr = self._block(leave, leave)
        self.inverse = p_tt - p_tr @ np.linalg.solve(p_rr, p_tr.transpose(0, 2, 1))
        self.rows = np.take_along_axis(self.rows, stay, axis=1)

    def _block(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """``[c, len(first), len(second)]`` entries of each column's inverse at kept positions."""
        if self.inverse.ndim == 2:
            return self.inverse[first[:, :, None], second[:, None, :]]
        return self.inverse[self.lanes[:, :, None], first[:, :, None], second[:, None, :]]


def obs_rows(system: NormalEquations, count: int, rounds: int = 8) -> np.ndarray:
    """Indices (ascending) of the ``count`` inputs to keep when whole inputs leave a refit layer.

    Group OBS: dropping input ``q`` from every output column and refitting the rest raises the
    squared error by ``||W_q||^2 / [A_S^-1]_qq``, where ``W_q`` is the row of the current solution.
    Inputs leave in ``rounds`` equal steps, re-solving in between. Structured pruning uses it to
    choose hidden units by how well the next layer can do without them.
    """
    kept = np.arange(system.a.shape[0])
    for step in range(1, rounds + 1):
        target = kept.size - round((kept.size - count) * 1 / (rounds - step + 1))
        if target >= kept.size:
            continue
        inverse = np.linalg.inv(system.a[np.ix_(kept, kept)])
        weights = inverse @ system.b[kept]
        saliency = np.sum(weights**2, axis=1) / np.diag(inverse)
        kept = np.sort(kept[np.argsort(-saliency, kind="stable")[:target]])
    return kept


#: Above this many flops (``d_out * d_in^3``) the exact per-column OBS of :func:`obs_fit` is too
#: slow (a 1024 x 1024 layer would take minutes) and :func:`sparsegpt` replaces it.
EXACT_OBS_FLOPS = 5e9


def sparsegpt(
    system: NormalEquations, sparsity: float, nm: tuple[int, int] | None = None, block: int = 128
) -> np.ndarray:
    """Pruned ``[d_in, d_out]`` weights by SparseGPT (Frantar & Alistarh 2023) on a ridge system.

    Starts from the unconstrained solution and walks the inputs in order, zeroing the least salient
    weights of each block (``w^2 / [A^-1]_qq^2``, or each N:M group's) and spreading every zeroed
    weight's error over the inputs not yet visited through the Cholesky factor of ``A^-1``. One
    factorisation serves all outputs, so the cost is ``O(d_in^3 + d_out d_in^2)`` instead of the
    exact method's ``O(d_out d_in^3)``; masks follow a per-block threshold, so rows may differ a
    little in sparsity while the layer's total is exact to the block.
    """
    inverse = np.linalg.inv(system.a)
    weights = (inverse @ system.b).T.copy()  # [d_out, d_in]
    d_in = weights.shape[1]
    factor = np.linalg.cholesky((inverse + inverse.T) / 2).T  # upper: factor.T @ factor = A^-1
    for start in range(0, d_in, block):
        stop = min(start + block, d_in)
        local = weights[:, start:stop].copy()
        errors = np.zeros_like(local)
        diag = np.diag(factor)[start:stop]
        mask = np.zeros(local.shape, dtype=bool)  # True = pruned
        if nm is None:
            mask = ~topk_mask(local**2 / diag**2, sparsity)
        for i in range(stop - start):
            if nm is not None and i % nm[1] == 0:
                group = slice(i, min(i + nm[1], stop - start))
                mask[:, group] = ~nm_mask(local[:, group] ** 2 / diag[group] ** 2, nm[0], nm[1], axis=1)
            column = local[:, i]
            kept = np.where(mask[:, i], 0.0, column)
            error = (column - kept) / factor[start + i, start + i]
            local[:, i:] -= np.outer(error, factor[start + i, start + i : stop])
            local[:, i] = kept
            errors[:, i] = error
        weights[:, start:stop] = local
        weights[:, stop:] -= errors @ factor[start:stop, stop:]
    return weights.T
