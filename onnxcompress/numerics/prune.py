"""Pruning math on plain arrays: keep masks, N:M groups, global thresholds and 1-bit mask packing.

Every mask here is a boolean *keep* mask (True = the weight survives). Counts are exact: pruning a
tensor to sparsity ``s`` zeroes ``round(s * size)`` entries even when magnitudes tie, so achieved
sparsity matches the request instead of drifting with duplicate values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnxcompress.numerics.lstsq import NormalEquations

__all__ = [
    "EXACT_OBS_FLOPS",
    "global_sparsities",
    "keep_count",
    "magnitude_sample",
    "nm_mask",
    "obs_mask",
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


def obs_mask(
    system: NormalEquations,
    sparsity: float,
    steps: int = 4,
    nm: tuple[int, int] | None = None,
    start: np.ndarray | None = None,
) -> np.ndarray:
    """A ``[d_in, d_out]`` keep mask chosen by Optimal Brain Surgeon saliency on a ridge system.

    Removing input ``q`` from output column ``j`` and refitting the others raises the squared
    error by ``w_q^2 / [A_S^-1]_qq`` (``A_S`` the system over the inputs ``S`` still kept); the
    least salient inputs go first. Unstructured masks are reached in ``steps`` equal rounds, each
    re-solving the kept systems, because saliencies change as neighbours leave (one-shot OBS on
    the dense solution is what SparseGPT approximates). N:M masks are decided group by group in
    ``steps`` rounds (:func:`_obs_nm_mask`). Every column keeps the same count.

    ``start``, a sparser-than-dense mask from an earlier call (every column keeping the same count),
    continues from there: masks for rising sparsities then cost ``steps`` rounds each, not all the
    rounds from dense.
    """
    d_in, d_out = system.b.shape
    if nm is not None:
        return _obs_nm_mask(system, nm, steps)
    keep = np.ones((d_in, d_out), dtype=bool) if start is None else start.copy()
    first = int(keep[:, 0].sum()) if d_out else d_in
    final = keep_count(d_in, sparsity)
    for step in range(1, steps + 1):
        count = first - round((first - final) * step / steps)
        keep = topk_mask(_obs_saliency(system, keep), 1.0 - count / d_in if d_in else 0.0, axis=0)
    return keep


def _obs_saliency(system: NormalEquations, keep: np.ndarray) -> np.ndarray:
    """OBS saliency ``w_q^2 / [A_S^-1]_qq`` of every kept entry (``-inf`` elsewhere)."""
    saliency = np.full(keep.shape, -np.inf)
    for cols, rows, a_sub, b_sub in system.masked_systems(keep):
        inverse = np.linalg.inv(a_sub)
        weights = (inverse @ b_sub)[:, :, 0]
        saliency[rows, cols[:, None]] = weights**2 / np.diagonal(inverse, axis1=1, axis2=2)
    return saliency


def _obs_nm_mask(system: NormalEquations, nm: tuple[int, int], steps: int) -> np.ndarray:
    """N:M groups decided in ``steps`` rounds in input order, each on the solution that keeps the
    groups not yet decided dense: their weights absorb what the decided groups lose, as in SparseGPT."""
    n, m = nm
    d_in, d_out = system.b.shape
    keep = np.ones((d_in, d_out), dtype=bool)
    groups = -(-d_in // m)
    decided = 0
    for step in range(1, steps + 1):
        until = groups * step // steps
        if until == decided:
            continue
        low, high = decided * m, min(until * m, d_in)
        keep[low:high] = nm_mask(_obs_saliency(system, keep)[low:high], n, m, axis=0)
        decided = until
    return keep


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


#: Above this many flops (``d_out * d_in^3``) the exact per-column OBS of :func:`obs_mask` is too
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
    weights = system.solve().T.copy()  # [d_out, d_in]
    d_in = weights.shape[1]
    inverse = np.linalg.inv(system.a)
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
