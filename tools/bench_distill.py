"""Benchmark the distill pass on the models in models/: which layers go, what the refits buy, and the speed.

For every scenario the layers are picked once (least important by ``find_layers`` on the model's
calibration rows) and removed three ways through ``compress()``: bypass/merge only (no refit), with the
closed-form refit of the neighbouring linear map, and with that refit plus logit matching of the
final linear layer(s). Each row reports the AUC change on the 10,000 test rows, the parity verdict at
the default lossy budget, parameters and FLOPs, and the batch-1 and batch-512 latency of the final
model against the original (onnxruntime CPU, ORT_ENABLE_ALL, one intra-op thread; interleaved rounds,
medians)::

    python tools/bench_distill.py [--models deepfm,sasrec] [--repeats 9] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lib import Case, first_rows, load_feeds, machine, make_session, time_sessions, versions

from onnxcompress import compress, io
from onnxcompress.calibration import Calibration
from onnxcompress.calibration import load_feeds as load_calibration
from onnxcompress.layers import LayerReport, find_layers

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
VARIANTS = {
    "no_refit": {"refit": False, "refit_head": False},
    "refit": {"refit": True, "refit_head": False},
    "refit_logits": {"refit": True, "refit_head": True},
}

#: Picks the layers to remove from ``find_layers``' reports; returns them and a description.
Chooser = Callable[[list[LayerReport]], tuple[list[str], str]]


def least_important(count: int | None, kind: str = "mlp", prefix: str = "", what: str = "MLP hidden layers") -> Chooser:
    """The ``count`` least important layers of ``kind`` whose names start with ``prefix`` (None: a quarter
    of them, rounded down)."""

    def choose(reports: list[LayerReport]) -> tuple[list[str], str]:
        pool = [r for r in reports if r.kind == kind and r.name.startswith(prefix) and r.params > 0]
        wanted = count if count is not None else max(1, len(pool) // 4)
        ranked = sorted(pool, key=lambda r: r.importance_refit if r.importance_refit is not None else r.importance)
        return [report.name for report in ranked[:wanted]], f"{wanted} of {len(pool)} {what}"

    return choose


#: (model, how the layers are picked)
SCENARIOS: list[tuple[str, Chooser]] = [
    ("deepfm", least_important(1)),
    ("sasrec", least_important(1, "transformer", what="transformer blocks")),
    ("dlrm", least_important(None)),
    ("dlrm_dynamo", least_important(None)),
    ("dlrm_wide", least_important(1, prefix="top.", what="top-MLP hidden layers")),
    ("dlrm_wide", least_important(2)),
    ("keras_wide_deep", least_important(1)),
    ("sklearn_mlp", least_important(1)),
    ("two_tower", least_important(1)),
]


#: (teacher, student) pairs for student mode.
STUDENTS = [("deepfm", "deepfm_student")]


@dataclass
class Row:
    model: str
    scenario: str
    removed: list[str]
    auc: float
    auc_delta: dict[str, float]
    spearman: dict[str, float]
    parity: dict[str, str]
    params: tuple[int, int]
    flops: tuple[int, int]
    latency_ratio: dict[str, float]
    seconds: float


def _score(report: object) -> object:
    return next(output for output in report.parity.outputs if output.kind == "score")  # type: ignore[attr-defined]


def run(name: str, choose: Chooser, workdir: Path, repeats: int) -> Row:
    case = Case.from_dir(MODELS, name)
    model = io.load(case.model)
    names, scenario = choose(find_layers(model, Calibration(load_calibration(case.calib, model, "--calib"))))
    print(f"{name}: removing {', '.join(names)}", file=sys.stderr, flush=True)
    results = {}
    for variant, options in VARIANTS.items():
        out = workdir / f"{name}.{variant}.onnx"
        results[variant] = compress(
            case.model,
            out,
            ["distill"],
            options={"distill": {"remove": ",".join(names), **options}},
            feeds=case.feeds,
            calib=case.calib,
            labels=case.labels,
            force=True,
        )
    final = results["refit_logits"]
    stats = final.passes[0].stats
    latency = _latency(case, workdir / f"{name}.refit_logits.onnx", repeats)
    scores = {variant: _score(report) for variant, report in results.items()}
    return Row(
        model=name,
        scenario=scenario,
        removed=names,
        auc=scores["no_refit"].auc_reference,  # type: ignore[attr-defined]
        auc_delta={variant: score.auc_delta for variant, score in scores.items()},  # type: ignore[attr-defined]
        spearman={variant: score.spearman for variant, score in scores.items()},  # type: ignore[attr-defined]
        parity={variant: "pass" if report.parity.passed else "FAIL" for variant, report in results.items()},
        params=(stats["params_before"], stats["params_after"]),
        flops=(stats["flops_before"], stats["flops_after"]),
        latency_ratio=latency,
        seconds=final.passes[0].seconds,
    )


@dataclass
class StudentRow:
    teacher: str
    student: str
    auc: float
    auc_delta: dict[str, float]
    spearman: dict[str, float]
    parity: dict[str, str]
    params: tuple[int, int]
    flops: tuple[int, int]
    latency_ratio: dict[str, float]


def run_student(name: str, student: str, workdir: Path, repeats: int) -> StudentRow:
    """Student mode: the student as exported, and with its last linear layer refit to the teacher's logits."""
    case = Case.from_dir(MODELS, name)
    results = {}
    for variant, refit_head in (("as_exported", False), ("logit_refit", True)):
        results[variant] = compress(
            case.model,
            workdir / f"{student}.{variant}.onnx",
            ["distill"],
            options={"distill": {"student": str(MODELS / f"{student}.onnx"), "refit_head": refit_head}},
            feeds=case.feeds,
            calib=case.calib,
            labels=case.labels,
            force=True,
        )
    stats = results["logit_refit"].passes[0].stats
    scores = {variant: _score(report) for variant, report in results.items()}
    return StudentRow(
        teacher=name,
        student=student,
        auc=scores["as_exported"].auc_reference,  # type: ignore[attr-defined]
        auc_delta={variant: score.auc_delta for variant, score in scores.items()},  # type: ignore[attr-defined]
        spearman={variant: score.spearman for variant, score in scores.items()},  # type: ignore[attr-defined]
        parity={variant: "pass" if report.parity.passed else "FAIL" for variant, report in results.items()},
        params=(stats["params_before"], stats["params_after"]),
        flops=(stats["flops_before"], stats["flops_after"]),
        latency_ratio=_latency(case, workdir / f"{student}.logit_refit.onnx", repeats),
    )


def _latency(case: Case, candidate: Path, repeats: int) -> dict[str, float]:
    """Median seconds per call of ``candidate`` over the original's, at batch 1 and 512."""
    feeds = load_feeds(case.feeds)
    sessions = {"original": make_session(case.model, 1), "candidate": make_session(candidate, 1)}
    samples = time_sessions(sessions, {"b1": first_rows(feeds, 1), "b512": first_rows(feeds, 512)}, repeats, 0.2)
    return {
        batch: statistics.median(samples[("candidate", batch)]) / statistics.median(samples[("original", batch)])
        for batch in ("b1", "b512")
    }


def student_markdown(rows: Sequence[StudentRow]) -> str:
    lines = [
        "| teacher → student | params | FLOPs/row | ΔAUC as exported | ΔAUC logit refit | Spearman (as exported → "
        "refit) | parity at the default budget | latency b1 | latency b512 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        (before, after), (flops_before, flops_after) = row.params, row.flops
        lines.append(
            f"| `{row.teacher}` → `{row.student}` | {before:,} → {after:,} ({after / before:.2f}x) "
            f"| {flops_after / flops_before:.2f}x | {row.auc_delta['as_exported']:+.4f} "
            f"| {row.auc_delta['logit_refit']:+.4f} | {row.spearman['as_exported']:.4f} → "
            f"{row.spearman['logit_refit']:.4f} | {row.parity['as_exported']} → {row.parity['logit_refit']} "
            f"| {row.latency_ratio['b1']:.2f}x | {row.latency_ratio['b512']:.2f}x |"
        )
    return "\n".join(lines)


def markdown(rows: Sequence[Row]) -> str:
    lines = [
        "| model | removed | params | FLOPs/row | ΔAUC no refit | ΔAUC refit | ΔAUC refit + logits | Spearman "
        "(no refit → final) | parity (final) | latency b1 | latency b512 | pass time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        before, after = row.params
        flops_before, flops_after = row.flops
        lines.append(
            f"| `{row.model}` ({row.scenario}) | {', '.join(f'`{name}`' for name in row.removed)} "
            f"| {before:,} → {after:,} ({after / before:.2f}x) | {flops_after / flops_before:.2f}x "
            f"| {row.auc_delta['no_refit']:+.4f} | {row.auc_delta['refit']:+.4f} "
            f"| {row.auc_delta['refit_logits']:+.4f} "
            f"| {row.spearman['no_refit']:.4f} → {row.spearman['refit_logits']:.4f} | {row.parity['refit_logits']} "
            f"| {row.latency_ratio['b1']:.2f}x | {row.latency_ratio['b512']:.2f}x | {row.seconds:.1f}s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", help="comma-separated subset of: " + ", ".join(dict.fromkeys(n for n, _ in SCENARIOS))
    )
    parser.add_argument("--repeats", type=int, default=9, help="interleaved timing rounds (medians are reported)")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON")
    args = parser.parse_args()
    wanted = set(args.models.split(",")) if args.models else None
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, choose in SCENARIOS:
            if (wanted is None or name in wanted) and (MODELS / f"{name}.onnx").exists():
                rows.append(run(name, choose, Path(folder), args.repeats))
        students = [
            run_student(name, student, Path(folder), args.repeats)
            for name, student in STUDENTS
            if (wanted is None or name in wanted) and (MODELS / f"{student}.onnx").exists()
        ]
    print(markdown(rows))
    print()
    print(student_markdown(students))
    if args.json is not None:
        payload = {
            "rows": [asdict(row) for row in rows],
            "students": [asdict(row) for row in students],
            "machine": machine(),
            "versions": versions(["onnxruntime", "numpy"]),
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
