"""Ridge least squares for refitting linear layers on calibration activations.

Solves ``min ||X W + 1 b - Y||^2 + lam ||W - W_prior||^2`` (``W_prior`` zero unless given) for
``W`` (``d_in x d_out``) and optionally an unregularised intercept ``b``, where each output column
``j`` may be restricted to the inputs its keep mask allows (the other weights are fixed at zero).
Everything runs in float64 through the normal equations, so the calibration rows can be streamed:
accumulate :class:`Gram` batch by batch, then :func:`solve_gram`. Systems are factored with
Cholesky; one that fails (rank deficiency the ridge term did not cure) falls back to
``np.linalg.lstsq``.

``lam`` is given relative to the data: ``damping * mean(diag(X^T X))``, the scale-free damping used
by SparseGPT/GPTQ (1% there), so one default works for activations of any magnitude.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["Gram", "NoFiniteRows", "NormalEquations", "ridge", "solve_gram"]

#: Memory bound of one stack of masked systems solved together.
_STACK_BYTES = 64 * 1024 * 1024


@dataclass
class Gram:
    """Sufficient statistics of a least-squares problem: ``X^T X``, ``X^T Y``, column sums and row count.

    With ``fit_intercept`` the sums let :func:`solve_gram` centre the problem, which is the same as
    fitting an unregularised bias column.
    """

    xtx: np.ndarray
    xty: np.ndarray
    x_sum: np.ndarray
    y_sum: np.ndarray
    rows: int = 0

    @classmethod
    def empty(cls, d_in: int, d_out: int) -> Gram:
        return cls(np.zeros((d_in, d_in)), np.zeros((d_in, d_out)), np.zeros(d_in), np.zeros(d_out))

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray) -> Gram:
        gram = cls.empty(x.shape[-1], y.shape[-1])
        gram.add(x, y)
        return gram

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Accumulate a batch: ``x`` ``[rows, d_in]`` and ``y`` ``[rows, d_out]`` (leading axes are flattened).

        Rows holding NaN or infinity are left out: an attention position every key is masked from
        (left padding under a -inf mask) is NaN in the model too, and downstream never reads it,
        while one such row would make every sum NaN."""
        x64 = np.asarray(x, dtype=np.float64).reshape(-1, self.xtx.shape[0])
        y64 = np.asarray(y, dtype=np.float64).reshape(-1, self.xty.shape[1])
        finite = np.isfinite(x64).all(axis=1) & np.isfinite(y64).all(axis=1)
        if not finite.all():
            x64, y64 = x64[finite], y64[finite]
        self.xtx += x64.T @ x64
        self.xty += x64.T @ y64
        self.x_sum += x64.sum(axis=0)
        self.y_sum += y64.sum(axis=0)
        self.rows += x64.shape[0]


class NoFiniteRows(ValueError):
    """Every row of a fit held NaN or infinity (they are left out), or there were none."""


def _solve_spd(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    # The Cholesky factorisation only tells a positive definite system from one that needs least
    # squares: numpy has no triangular solve, and two general solves on the factors cost twice one on
    # the system.
    try:
        np.linalg.cholesky(matrix)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(matrix, rhs, rcond=None)[0]
    return np.linalg.solve(matrix, rhs)


@dataclass(frozen=True)
class NormalEquations:
    """The regularised system ``a W = b`` of a ridge problem, centred when an intercept is fitted.

    ``a = X^T X + lam I`` (of centred ``X`` with an intercept), ``b = X^T Y + lam W_prior``; the
    intercept of a solution ``W`` is ``y_mean - x_mean @ W``.
    """

    a: np.ndarray
    b: np.ndarray
    x_mean: np.ndarray | None
    y_mean: np.ndarray | None

    @classmethod
    def of(
        cls, gram: Gram, damping: float = 0.01, fit_intercept: bool = False, prior: np.ndarray | None = None
    ) -> NormalEquations:
        """The system of ``gram``; with ``prior`` the ridge pulls ``W`` towards it instead of towards zero.

        A prior (the layer's original weights, say) keeps inputs the calibration rows barely
        exercise (rare one-hot columns) near their trained values instead of shrinking them away.
        """
        xtx, xty = gram.xtx, gram.xty
        x_mean = y_mean = None
        if fit_intercept:
            if gram.rows == 0:
                raise NoFiniteRows("cannot fit an intercept without rows")
            x_mean, y_mean = gram.x_sum / gram.rows, gram.y_sum / gram.rows
            xtx = xtx - gram.rows * np.outer(x_mean, x_mean)
            xty = xty - gram.rows * np.outer(x_mean, y_mean)
        d_in = xtx.shape[0]
        lam = damping * max(float(np.mean(np.diag(xtx))), 1e-12) if d_in else 0.0
        if prior is not None:
            xty = xty + lam * np.asarray(prior, dtype=np.float64)
        return cls(xtx + lam * np.eye(d_in), xty, x_mean, y_mean)

    def intercept(self, weights: np.ndarray) -> np.ndarray | None:
        if self.x_mean is None or self.y_mean is None:
            return None
        result: np.ndarray = self.y_mean - self.x_mean @ weights
        return result

    def masked_systems(self, keep: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Stacks ``(columns, rows, a_sub, b_sub)`` of the systems restricted to each column's kept rows.

        Columns with the same number of kept inputs form one stack (``rows`` is ``[g, count]``,
        ``a_sub`` ``[g, count, count]``, ``b_sub`` ``[g, count, 1]``): batched LAPACK calls are far
        faster than a Python loop of tiny factorisations, which multi-threaded BLAS makes slower
        still on a busy machine. Stacks are chunked to bound memory by ``_STACK_BYTES``.
        """
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != self.b.shape:
            raise ValueError(f"keep mask has shape {keep.shape}, expected {self.b.shape}")
        counts = keep.sum(axis=0)
        for count in np.unique(counts):
            if count == 0:
                continue
            columns = np.flatnonzero(counts == count)
            chunk = max(1, _STACK_BYTES // (8 * int(count) ** 2))
            for start in range(0, columns.size, chunk):
                cols = columns[start : start + chunk]
                rows = np.stack([np.flatnonzero(keep[:, j]) for j in cols])
                yield cols, rows, self.a[rows[:, :, None], rows[:, None, :]], self.b[rows, cols[:, None]][:, :, None]

    def solve(self, keep: np.ndarray | None = None) -> np.ndarray:
        """``W`` ``[d_in, d_out]``; with ``keep``, each column uses only its kept rows (the rest are 0)."""
        if keep is None:
            return _solve_spd(self.a, self.b)
        weights = np.zeros(self.b.shape)
        for cols, rows, a_sub, b_sub in self.masked_systems(keep):
            try:
                np.linalg.cholesky(a_sub)  # positive definite, else least squares (as _solve_spd)
                solved = np.linalg.solve(a_sub, b_sub)
            except np.linalg.LinAlgError:
                solved = np.stack([_solve_spd(a, b) for a, b in zip(a_sub, b_sub, strict=True)])
            weights[rows, cols[:, None]] = solved[:, :, 0]
        return weights


def solve_gram(
    gram: Gram,
    damping: float = 0.01,
    keep: np.ndarray | None = None,
    fit_intercept: bool = False,
    prior: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Ridge solution from accumulated statistics.

    Args:
        damping: ridge strength relative to ``mean(diag(X^T X))``.
        keep: optional ``[d_in, d_out]`` boolean mask; weights where it is False are fixed at zero.
        fit_intercept: also fit an unregularised per-output intercept (returned second, else None).
        prior: ``[d_in, d_out]`` weights the ridge term pulls towards (default zero).

    Returns:
        ``(W, b)``: float64 weights ``[d_in, d_out]`` and intercept ``[d_out]`` or None.
    """
    system = NormalEquations.of(gram, damping, fit_intercept, prior)
    weights = system.solve(keep)
    return weights, system.intercept(weights)


def ridge(
    x: np.ndarray,
    y: np.ndarray,
    damping: float = 0.01,
    keep: np.ndarray | None = None,
    fit_intercept: bool = False,
    prior: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`solve_gram` on in-memory rows ``x`` ``[rows, d_in]`` and targets ``y`` ``[rows, d_out]``."""
    return solve_gram(Gram.of(x, y), damping, keep, fit_intercept, prior)
