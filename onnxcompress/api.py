"""``compress()``: load, run passes, stage the result beside OUT, prove parity, then commit."""

from __future__ import annotations

import dataclasses
import gc
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from onnxcompress import io, runtime
from onnxcompress.calibration import Calibration, Feeds, check_finite, load_feeds, load_labels, synthesize_feeds
from onnxcompress.errors import InterruptedAfterWrite, ParityFailedError, UsageError
from onnxcompress.parity import Budget, Budgets, ParityResult, budget_with, compare
from onnxcompress.passes.base import NON_FINITE_WEIGHT, PassContext
from onnxcompress.pipeline import Pipeline
from onnxcompress.recipe import PassSpec, build_specs
from onnxcompress.report import PassRecord, Report

__all__ = ["compress"]

Progress = Callable[[str], None]


#: Fewer feed rows than this get a note in the report: parity on them judges little.
FEW_ROWS = 32


def _bytes_on_disk(model_path: Path, data_files: set[Path]) -> int:
    return model_path.stat().st_size + sum(path.stat().st_size for path in data_files)


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("onnxcompress", "onnx-ir", "onnx", "onnxruntime", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    commit = _source_commit()
    if commit:  # a checkout's 0.1.0 says nothing of which code ran
        versions["onnxcompress_commit"] = commit
    return versions


def _source_commit() -> str:
    """The git commit of the checkout this package runs from (an editable install), or "". Only
    the package's own checkout: an installed copy inside some other repository is not asked."""
    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / ".git").exists():
        return ""
    try:
        head = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        return ""
    return head.stdout.strip() if head.returncode == 0 else ""


def _non_finite_weights(records: Sequence[PassRecord]) -> list[str]:
    """Weights a pass left alone because they hold NaN or infinity: a broken model, not a budget
    too tight, is then why parity failed."""
    return sorted(
        {
            name
            for record in records
            if isinstance(skipped := record.stats.get("skipped"), Mapping)
            for name, reason in skipped.items()
            if reason == NON_FINITE_WEIGHT
        }
    )


def _budgets(
    base: Budget, tolerances: Mapping[str, float] | None, output_tolerances: Mapping[str, Mapping[str, float]] | None
) -> Budgets:
    default = budget_with(base, **dict(tolerances or {}))
    per_output = {name: budget_with(default, **dict(values)) for name, values in (output_tolerances or {}).items()}
    return Budgets(default, per_output)


def _load_labels(labels: str | Path | Mapping[str, str | Path], rows: int, model: Any) -> dict[str, np.ndarray]:
    """Labels by output name (``""``: every score output without labels of its own)."""
    files = {"": labels} if isinstance(labels, str | Path) else dict(labels)
    outputs = [value.name for value in model.graph.outputs]
    arrays = {}
    for name, path in files.items():
        if name and name not in outputs:
            raise UsageError(
                f"--labels {name}={path}: the model has no output {name!r}; its outputs: {', '.join(map(str, outputs))}"
            )
        arrays[name] = load_labels(Path(path), rows, f"--labels for {name}," if name else "--labels")
    return arrays


def compress(
    in_path: str | Path,
    out_path: str | Path,
    passes: Sequence[str] | Sequence[PassSpec] = ("cleanup",),
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    assignments: Sequence[str] = (),
    feeds: str | Path | None = None,
    calib: str | Path | None = None,
    labels: str | Path | Mapping[str, str | Path] | None = None,
    calib_labels: str | Path | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    tolerances: Mapping[str, float] | None = None,
    output_tolerances: Mapping[str, Mapping[str, float]] | None = None,
    parity: bool = True,
    force: bool = False,
    opt_level: str = "basic",
    external_data: str = "auto",
    rank_group: int | None = None,
    progress: Progress | None = None,
) -> Report:
    """Compress ``in_path`` into ``out_path`` with the given passes, behind the parity gate.

    Args:
        passes: pass names (options from ``options``/``assignments``) or ready ``PassSpec`` objects.
        options: per-pass option tables, as in a TOML recipe.
        assignments: ``PASS.FIELD=VALUE`` strings that override ``options``.
        feeds: an .npz keyed by graph input names for the parity check; when omitted, the
            calibration rows if given, else synthesized with a fixed seed.
        calib: calibration rows for passes that need data (default: the feeds).
        labels: a .npy of 0/1 labels aligned with the feeds, for AUC; or files by output name (a
            multi-task model's tasks), ``""`` for every other score output.
        calib_labels: a .npy of 0/1 labels aligned with the calibration rows, for passes that budget
            AUC (default: ``labels`` when the calibration rows are the feeds).
        input_shapes: full shapes for synthesized inputs with symbolic dimensions.
        tolerances: parity budget fields (``atol``, ``rtol``, ``min_cosine``, ``min_rank_corr``,
            ``max_auc_drop``, ``max_mismatch``) replacing the default budget's.
        output_tolerances: the same, per output name.
        parity: False skips the check (the report says so).
        force: write OUT even when parity fails (the report says so).
        opt_level: onnxruntime graph optimisation level for the parity runs.
        external_data: ``auto``, ``always`` or ``never``.
        rank_group: rows per ranking group (e.g. items per user) for top-10 overlap and Spearman.

    Raises:
        CompressError: a subclass naming the problem; ``ParityFailedError`` carries the report.
    """
    notify = progress or (lambda _stage: None)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    in_path, out_path = Path(in_path), Path(out_path)
    if opt_level not in runtime.OPT_LEVELS:
        raise UsageError(f"optimisation level {opt_level!r}; choose from {', '.join(runtime.OPT_LEVELS)}")
    if external_data not in ("auto", "always", "never"):
        raise UsageError(f"--external-data {external_data!r}; choose from auto, always, never")
    specs: list[PassSpec]
    if passes and isinstance(passes[0], PassSpec):
        specs = [spec for spec in passes if isinstance(spec, PassSpec)]
    else:
        specs = build_specs([str(name) for name in passes], options, assignments)

    notify("loading")
    clock = time.perf_counter()
    model = io.load(in_path)
    input_data = io.external_data_files(model)
    io.check_output_path(in_path, out_path, input_data)
    input_bytes = _bytes_on_disk(in_path, input_data)
    seconds["load"] = time.perf_counter() - clock

    outputs = [str(value.name) for value in model.graph.outputs]
    for name, values in (output_tolerances or {}).items():
        if name not in outputs:  # a typo would leave that output at the default budget, silently
            flag = "--" + next(iter(values)).replace("_", "-")
            raise UsageError(f"{flag} {name}=...: the model has no output {name!r}; its outputs: {', '.join(outputs)}")
    calib_rows = load_feeds(Path(calib), model, "--calib") if calib is not None else None
    if feeds is not None:
        if input_shapes:
            raise UsageError("--input-shape only shapes synthesized feeds; drop it or drop --feeds")
        parity_feeds = load_feeds(Path(feeds), model)
    elif calib_rows is not None:
        # Real rows judge a fitted model better than random ones: synthesized ids and dense values
        # lie outside what the passes fitted, and failed the max preset on four of nine models.
        if input_shapes:
            raise UsageError("--input-shape only shapes synthesized feeds; parity runs on the --calib rows")
        parity_feeds = Feeds(
            calib_rows.arrays,
            f"{calib_rows.source}, the calibration rows (no --feeds: give held-out rows for an independent check)",
            calib_rows.notes,
        )
    else:
        parity_feeds = synthesize_feeds(model, input_shapes)
    if parity_feeds.rows < FEW_ROWS:
        few = (
            f"only {parity_feeds.rows} rows: a check (and a calibration) on so few says little about other "
            "inputs; give a few hundred held-out rows"
        )
        parity_feeds = dataclasses.replace(parity_feeds, notes=(*parity_feeds.notes, few))
    label_arrays = _load_labels(labels, parity_feeds.rows, model) if labels is not None else None
    calib_feeds: Feeds = calib_rows if calib_rows is not None else parity_feeds
    # --labels align with the feeds, which are the calibration rows unless both files were given.
    calib_label_arrays = label_arrays if calib is None or feeds is None else None
    if calib_labels is not None:
        if calib is None:
            raise UsageError("--calib-labels labels the --calib rows; give --calib too (or use --labels for the feeds)")
        calib_label_arrays = {
            "": load_labels(Path(calib_labels), calib_feeds.rows, "--calib-labels", "the --calib rows")
        }
    if calib is not None:
        check_finite(calib_feeds, f"--calib {calib}")
    elif feeds is not None:
        check_finite(calib_feeds, f"--feeds {feeds} (the calibration rows without --calib)")
    calibration = Calibration(calib_feeds, labels=calib_label_arrays)
    pipeline = Pipeline(specs, PassContext(calibration=calibration, source=in_path))
    budgets = _budgets(pipeline.budget, tolerances, output_tolerances)

    reference: dict[str, np.ndarray] = {}
    if parity:
        notify("running the original")
        clock = time.perf_counter()
        reference = runtime.run(runtime.make_session(in_path, opt_level), parity_feeds.arrays)
        seconds["reference_run"] = time.perf_counter() - clock

    clock = time.perf_counter()
    records = pipeline.run(model, on_pass=lambda name: notify(f"pass {name}"))
    seconds["passes"] = time.perf_counter() - clock

    notify("saving")
    clock = time.perf_counter()
    staged = io.stage(model, out_path, external_data)
    try:  # first thing after the handoff, so an interrupt from here on discards the staged files
        seconds["save"] = time.perf_counter() - clock
        per_run = any(node.op_type == "DynamicQuantizeLinear" for node in model.graph.all_nodes())
        # The transformed tensors are on disk now: free them (the graph is full of reference
        # cycles) before onnxruntime maps the candidate, so the two never add up in memory.
        del model
        gc.collect()
        result = ParityResult(checked=False)
        if parity:
            notify("checking parity")
            clock = time.perf_counter()
            session = runtime.make_session(staged.model_path, opt_level)
            candidate = runtime.run(session, parity_feeds.arrays)
            run_rows = runtime.fixed_batch(session) or min(parity_feeds.rows, runtime.RUN_ROWS)
            del session
            result = compare(
                reference,
                candidate,
                budgets,
                labels=label_arrays,
                rank_group=rank_group,
                opt_level=opt_level,
                feeds=parity_feeds.source,
            )
            result = dataclasses.replace(result, run_rows=run_rows, per_run=per_run)
            if label_arrays and all(output.auc_reference is None for output in result.outputs):
                unused = (
                    "--labels were not used: no output holds one score per row (a score, or the positive "
                    "column of a two-class probability), so no AUC and no --max-auc-drop"
                )
                parity_feeds = dataclasses.replace(parity_feeds, notes=(*parity_feeds.notes, unused))
            seconds["parity"] = time.perf_counter() - clock
        write = not parity or result.passed or force
        output_bytes = staged.bytes_on_disk
        if write:
            try:
                staged.commit()
            except KeyboardInterrupt as interrupt:
                if staged.committed:
                    raise InterruptedAfterWrite(str(out_path)) from interrupt
                raise
        seconds["total"] = time.perf_counter() - started
        report = Report(
            input_path=str(in_path),
            output_path=str(out_path),
            input_bytes=input_bytes,
            output_bytes=output_bytes,
            passes=tuple(records),
            parity=result,
            written=write,
            forced=write and parity and not result.passed,
            feeds=parity_feeds.source,
            feed_notes=parity_feeds.notes,
            calibration=calib_feeds.source if pipeline.lossy else "",
            seconds=seconds,
            versions=_versions(),
        )
        if not write:
            names = ", ".join(output.name for output in result.failing)
            broken = _non_finite_weights(records)
            fix = (
                f"the model's own weights hold NaN or infinity ({', '.join(broken)}): fix or re-export the model"
                if broken
                else "loosen the budget, or use --force to write anyway"
            )
            raise ParityFailedError(f"parity failed for {names}; nothing written ({fix})", report)
        return report
    finally:
        staged.discard()
