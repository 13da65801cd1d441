"""Data movement as one reshape, selection and transpose: index arithmetic, no graphs.

A chain of ``Reshape``, ``Transpose``, ``Squeeze``, ``Unsqueeze`` and constant-index ``Gather``
nodes only moves (and picks) elements: run on the flat indices of its input, it gives each output
element the source position it reads. When that map is affine in the output's digits, the whole
chain is the source viewed as a few *atoms* (a reshape), some atoms held at one index (a selection),
the rest put in another order (one transpose) and viewed as the output's shape (a reshape).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Movement", "movement_of"]


@dataclass(frozen=True)
class Movement:
    """``source.reshape(atoms)``, each atom in ``selected`` held at its index, the kept atoms put in
    the order ``perm`` (indices into the kept atoms, outermost first), then reshaped to the output."""

    atoms: tuple[int, ...]
    selected: tuple[tuple[int, int], ...]
    perm: tuple[int, ...]

    @property
    def kept(self) -> tuple[int, ...]:
        held = {atom for atom, _ in self.selected}
        return tuple(size for atom, size in enumerate(self.atoms) if atom not in held)

    def apply(self, source: np.ndarray) -> np.ndarray:
        """The moved array, flat in the output's order."""
        moved = source.reshape(self.atoms)
        for atom, index in sorted(self.selected, reverse=True):
            moved = np.take(moved, index, axis=atom)
        return moved.transpose(self.perm).reshape(-1)


def _output_axes(order: np.ndarray) -> list[tuple[int, int]] | None:
    """(size, stride) of the output's axes, innermost first, for ``order[j] = offset + sum(digit_k(j)
    * stride_k)``: each axis as long as its stride holds (neighbouring axes that chain are one)."""
    count = order.size
    offset = int(order[0])
    axes: list[tuple[int, int]] = []
    block = 1
    while block < count:
        stride = int(order[block]) - offset
        size = 1
        while block * (size + 1) <= count and int(order[block * size]) - offset == size * stride:
            size += 1
        if size < 2 or (count // block) % size:
            return None
        axes.append((size, stride))
        block *= size
    return axes


def movement_of(order: np.ndarray, source_size: int) -> Movement | None:
    """The reshape, selection and transpose that read ``order`` (the source position of each output
    element, flat in the output's order) from a source of ``source_size`` elements, or None when no
    such form gives it (elements read twice, or not affine)."""
    order = np.asarray(order, dtype=np.int64).reshape(-1)
    if order.size == 0 or order.min() < 0 or order.max() >= source_size:
        return None
    axes = _output_axes(order)
    if axes is None or any(stride <= 0 for _, stride in axes):
        return None
    # Atoms of the source, innermost first: the output's axes by stride, gaps between them held.
    by_stride = sorted(range(len(axes)), key=lambda axis: axes[axis][1])
    atoms_inner: list[tuple[int, int | None]] = []  # (size, output axis or None for a held atom)
    covered = 1
    for axis in by_stride:
        size, stride = axes[axis]
        if stride % covered:
            return None
        if stride // covered > 1:
            atoms_inner.append((stride // covered, None))
        atoms_inner.append((size, axis))
        covered = stride * size
    if source_size % covered:
        return None
    if source_size // covered > 1:
        atoms_inner.append((source_size // covered, None))
    atoms = [size for size, _ in reversed(atoms_inner)]
    owners = [axis for _, axis in reversed(atoms_inner)]
    digits = np.unravel_index(int(order[0]), atoms)
    if any(owner is not None and int(digit) != 0 for owner, digit in zip(owners, digits, strict=True)):
        return None
    selected = tuple((atom, int(digits[atom])) for atom, owner in enumerate(owners) if owner is None)
    kept_owners = [owner for owner in owners if owner is not None]
    # The output's axes are innermost first; the transpose lists the kept atoms outermost first.
    perm = tuple(kept_owners.index(axis) for axis in reversed(range(len(axes))))
    movement = Movement(tuple(atoms), selected, perm)
    if not np.array_equal(movement.apply(np.arange(source_size)), order):
        return None
    return movement
