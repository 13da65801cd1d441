"""The parity gate: compare the original and the compressed model's outputs on the same feeds.

Every output gets error statistics (max/mean abs, max rel, cosine); score outputs (one value per
row, or the positive column of a two-class probability output) also get rank agreement (Spearman,
top-10 overlap) and AUC against labels when given. A budget decides pass/fail per output, and the
result records the smallest tolerances that would have passed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxcompress.metrics import auc, auc_difference, spearman, top_k_overlap

__all__ = [
    "LOSSLESS",
    "LOSSY",
    "STRUCTURAL",
    "Budget",
    "Budgets",
    "OutputComparison",
    "ParityResult",
    "compare",
    "loosest",
    "score_column",
    "scores_of",
]

#: Elements whose reference magnitude is below this are left out of the relative error.
REL_ERROR_FLOOR = 1e-6
TOP_K = 10


@dataclass(frozen=True)
class Budget:
    """Tolerances for one output. ``None`` means the figure is reported but not checked.

    A float output passes when, elementwise, ``|candidate - reference| <= atol + rtol * |reference|``
    and the cosine, rank correlation and AUC drop are within their bounds. Integer and boolean
    outputs pass when the fraction of differing elements is at most ``max_mismatch``. With
    ``atol_per_peak``, ``atol`` is a fraction of the output's largest ``|reference|`` when that
    exceeds 1: float32 rounds relative to the values computed, so a lossless rewrite (a folded
    BatchNorm) of a head whose outputs reach thousands differs by more than 1e-5 in absolute terms.
    """

    atol: float | None = None
    rtol: float = 0.0
    atol_per_peak: bool = False
    min_cosine: float | None = None
    min_rank_corr: float | None = None
    max_auc_drop: float | None = None
    max_mismatch: float = 0.0


#: Default for pipelines of lossless passes only: outputs must agree to 1e-5 (of their peak above 1).
LOSSLESS = Budget(atol=1e-5, atol_per_peak=True)
#: Default once a lossy pass runs: ranking must be preserved, values may move.
LOSSY = Budget(min_cosine=0.99, min_rank_corr=0.99, max_auc_drop=0.003, max_mismatch=0.01)
#: For passes that change the model's structure (prune, distill): they keep AUC but reorder close
#: scores more than quantization does.
STRUCTURAL = Budget(min_cosine=0.99, min_rank_corr=0.98, max_auc_drop=0.003, max_mismatch=0.02)


@dataclass(frozen=True)
class Budgets:
    """A default budget and per-output overrides."""

    default: Budget
    per_output: Mapping[str, Budget] = field(default_factory=dict)

    def for_output(self, name: str) -> Budget:
        return self.per_output.get(name, self.default)


@dataclass(frozen=True)
class OutputComparison:
    """How one output of the compressed model compares with the original's."""

    name: str
    kind: str  # "score", "tensor" or "integer"
    shape: tuple[int, ...]
    passed: bool
    failures: tuple[str, ...] = ()
    max_abs: float = 0.0
    mean_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float = 1.0
    mismatch: float = 0.0
    #: Values NaN or infinite in one model and not the same in the other (no tolerance covers them).
    nonfinite_mismatch: int = 0
    spearman: float | None = None
    top10_overlap: float | None = None
    #: With ``--rank-group``: Spearman and top-10 above are means over this many groups; the worst.
    rank_groups: int = 1
    worst_spearman: float | None = None
    worst_top10_overlap: float | None = None
    auc_reference: float | None = None
    auc_candidate: float | None = None
    #: The standard error of the AUC change (paired, DeLong): a change within about two of these
    #: is what the labelled rows cannot tell from no change.
    auc_delta_error: float | None = None
    #: The figure each setting would need for this output to pass (``--atol`` etc.), checked or not.
    would_pass_with: Mapping[str, float] = field(default_factory=dict)
    #: The settings whose budget this output missed: the flags worth loosening.
    missed: tuple[str, ...] = ()

    @property
    def auc_delta(self) -> float | None:
        if self.auc_reference is None or self.auc_candidate is None:
            return None
        return self.auc_candidate - self.auc_reference


@dataclass(frozen=True)
class ParityResult:
    """The verdict over all outputs; truthy when every output passed."""

    checked: bool
    outputs: tuple[OutputComparison, ...] = ()
    opt_level: str = ""
    rows: int = 0
    feeds: str = ""
    budget: Budget | None = None
    #: Rows per onnxruntime call: a candidate that quantizes activations per call (``per_run``)
    #: gives a row outputs that move slightly with the rows run beside it.
    run_rows: int = 0
    per_run: bool = False

    @property
    def passed(self) -> bool:
        return self.checked and all(output.passed for output in self.outputs)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def failing(self) -> tuple[OutputComparison, ...]:
        return tuple(output for output in self.outputs if not output.passed)


def score_column(shape: tuple[int, ...]) -> int | None:
    """Which column holds the score: rank-1 outputs are scores, [N,1] column 0, [N,2] column 1."""
    if len(shape) == 1:
        return 0
    if len(shape) == 2 and shape[1] in (1, 2):
        return shape[1] - 1
    return None


def scores_of(array: np.ndarray, column: int) -> np.ndarray:
    """The score column of an output (see :func:`score_column`), one value per row."""
    return array.reshape(-1) if array.ndim == 1 else array[:, column]


def _ranking_groups(size: int, group: int | None) -> list[slice]:
    if not group or group >= size or size % group:
        return [slice(0, size)]
    return [slice(start, start + group) for start in range(0, size, group)]


def _compare_one(
    name: str,
    reference: np.ndarray,
    candidate: np.ndarray,
    budget: Budget,
    labels: np.ndarray | None,
    rank_group: int | None,
) -> OutputComparison:
    shape = tuple(reference.shape)
    if candidate.shape != reference.shape:
        return OutputComparison(
            name, "tensor", shape, False, (f"shape changed from {list(shape)} to {list(candidate.shape)}",)
        )
    if reference.dtype.kind not in "fc":
        mismatch = float(np.mean(reference != candidate)) if reference.size else 0.0
        mismatches = (
            ()
            if mismatch <= budget.max_mismatch
            else (f"{mismatch:.2%} of values differ (budget {budget.max_mismatch:.2%})",)
        )
        return OutputComparison(
            name,
            "integer",
            shape,
            not mismatches,
            mismatches,
            mismatch=mismatch,
            would_pass_with={"max_mismatch": mismatch},
            missed=("max_mismatch",) if mismatches else (),
        )
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    failures: list[str] = []
    missed: list[str] = []
    # Compared as values: NaN matches NaN, +inf matches +inf.
    same = (ref == cand) | (np.isnan(ref) & np.isnan(cand))
    new_nonfinite = int((~np.isfinite(cand) & np.isfinite(ref)).sum())
    lost_nonfinite = int((~np.isfinite(ref) & ~same).sum())
    if new_nonfinite:
        failures.append(f"{new_nonfinite} values are NaN or infinite where the original's are finite")
    if lost_nonfinite:
        failures.append(
            f"the original gives NaN or infinity on {lost_nonfinite} values where this model does not "
            "(rows the original cannot score, such as an empty history: leave them out of the feeds)"
        )
    finite = np.isfinite(ref) & np.isfinite(cand)
    ref, cand = ref[finite], cand[finite]
    error = np.abs(cand - ref)
    max_abs = float(error.max()) if error.size else 0.0
    mean_abs = float(error.mean()) if error.size else 0.0
    significant = np.abs(ref) >= REL_ERROR_FLOOR
    max_rel = float((error[significant] / np.abs(ref[significant])).max()) if significant.any() else 0.0
    norms = float(np.linalg.norm(ref) * np.linalg.norm(cand))
    cosine = float(ref @ cand / norms) if norms > 0 else (1.0 if max_abs == 0 else 0.0)
    if new_nonfinite:
        # The figures over the values both models give would read as a perfect match.
        max_abs = mean_abs = math.inf
        cosine = cosine if error.size else math.nan
    needed: dict[str, float] = {
        "atol": float((error - budget.rtol * np.abs(ref)).max(initial=0.0)),
        "min_cosine": cosine,
    }
    if budget.atol is not None:
        peak = float(np.abs(ref).max(initial=0.0))
        allowed = budget.atol * max(1.0, peak) if budget.atol_per_peak else budget.atol
        if needed["atol"] > allowed:
            scaled = f", {budget.atol:g} of the output's peak {peak:.3g}" if allowed != budget.atol else ""
            failures.append(f"max abs error {max_abs:.3g} exceeds atol {allowed:g}{scaled} (rtol {budget.rtol:g})")
            missed.append("atol")
    if budget.min_cosine is not None and cosine < budget.min_cosine:
        failures.append(f"cosine {cosine:.6f} below {budget.min_cosine:g}")
        missed.append("min_cosine")
    kind = "tensor"
    rank_corr = overlap = auc_ref = auc_cand = auc_error = None
    grouped: dict[str, Any] = {}
    column = score_column(shape)
    if column is not None and reference.shape[0] > 1:
        kind = "score"
        ref_scores = scores_of(reference, column).astype(np.float64)
        cand_scores = scores_of(candidate, column).astype(np.float64)
        scored = np.isfinite(ref_scores) & np.isfinite(cand_scores)
        if not scored.all():  # ranks and AUC over the rows both models score
            ref_scores, cand_scores = ref_scores[scored], cand_scores[scored]
            labels = labels[scored] if labels is not None and labels.size == scored.size else None
            rank_group = None  # groups of rows no longer line up
        groups = _ranking_groups(ref_scores.size, rank_group)
        per_group = np.array([spearman(ref_scores[g], cand_scores[g]) for g in groups])
        overlaps = np.array([top_k_overlap(ref_scores[g], cand_scores[g], TOP_K) for g in groups])
        rank_corr, overlap = float(np.mean(per_group)), float(np.mean(overlaps))
        if len(groups) > 1:
            grouped = {
                "rank_groups": len(groups),
                "worst_spearman": float(np.min(per_group)),
                "worst_top10_overlap": float(np.min(overlaps)),
            }
        needed["min_rank_corr"] = rank_corr
        if budget.min_rank_corr is not None and rank_corr < budget.min_rank_corr:
            failures.append(f"rank correlation {rank_corr:.5f} below {budget.min_rank_corr:g}")
            missed.append("min_rank_corr")
        if labels is not None and labels.size == ref_scores.size:
            auc_ref, auc_cand = auc(labels, ref_scores), auc(labels, cand_scores)
            auc_error = auc_difference(labels, ref_scores, cand_scores)[1]
            drop = auc_ref - auc_cand
            needed["max_auc_drop"] = max(drop, 0.0)
            if budget.max_auc_drop is not None and not math.isnan(drop) and drop > budget.max_auc_drop:
                failures.append(f"AUC dropped by {drop:.5f} (budget {budget.max_auc_drop:g})")
                missed.append("max_auc_drop")
    return OutputComparison(
        name,
        kind,
        shape,
        not failures,
        tuple(failures),
        max_abs=max_abs,
        mean_abs=mean_abs,
        max_rel=max_rel,
        cosine=cosine,
        nonfinite_mismatch=new_nonfinite + lost_nonfinite,
        spearman=rank_corr,
        top10_overlap=overlap,
        **grouped,
        auc_reference=auc_ref,
        auc_candidate=auc_cand,
        auc_delta_error=auc_error,
        would_pass_with=needed,
        missed=tuple(missed),
    )


def compare(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    budgets: Budgets,
    *,
    labels: np.ndarray | Mapping[str, np.ndarray] | None = None,
    rank_group: int | None = None,
    opt_level: str = "",
    feeds: str = "",
) -> ParityResult:
    """Compare every output of ``reference`` with the same-named output of ``candidate``.

    ``labels``: one array for every score output, or arrays by output name (``""``: the others)."""
    outputs = []
    for name, ref in reference.items():
        if name not in candidate:
            outputs.append(OutputComparison(name, "tensor", tuple(ref.shape), False, ("output is missing",)))
            continue
        own = labels if labels is None or isinstance(labels, np.ndarray) else labels.get(name, labels.get(""))
        outputs.append(_compare_one(name, ref, candidate[name], budgets.for_output(name), own, rank_group))
    rows = next((array.shape[0] for array in reference.values() if array.ndim), 1)
    return ParityResult(True, tuple(outputs), opt_level, rows, feeds, budgets.default)


def budget_with(base: Budget, **changes: float | None) -> Budget:
    """``base`` with the given fields replaced (fields left as ``None`` in ``changes`` keep their value).
    An ``atol`` given is absolute."""
    given: dict[str, Any] = {key: value for key, value in changes.items() if value is not None}
    if "atol" in given:
        given["atol_per_peak"] = False
    return dataclasses.replace(base, **given)


def loosest(budgets: list[Budget]) -> Budget:
    """Field by field, the most permissive of ``budgets`` (an unchecked figure stays unchecked)."""

    def widest(values: list[float | None], pick: Any) -> float | None:
        return None if any(value is None for value in values) else pick(values)

    return Budget(
        atol=widest([b.atol for b in budgets], max),
        rtol=max(b.rtol for b in budgets),
        atol_per_peak=any(b.atol_per_peak for b in budgets),
        min_cosine=widest([b.min_cosine for b in budgets], min),
        min_rank_corr=widest([b.min_rank_corr for b in budgets], min),
        max_auc_drop=widest([b.max_auc_drop for b in budgets], max),
        max_mismatch=max(b.max_mismatch for b in budgets),
    )
