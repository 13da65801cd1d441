"""Every size, quality and speed claim side by side: onnxruntime's and onnxsim's compressors against ours.

    python tools/bench.py                     # all models x all methods -> docs/BENCHMARKS.md, docs/pareto.png
    python tools/bench.py --quick             # one small model, fewer repeats; output in the workdir
    python tools/bench.py --models dlrm --recipe ours-q8=cleanup,quant:quant.bits=8 --json dlrm.json
    python tools/bench.py --preset int8 --preset int4 --preset mixed --preset max --scale   # + the 2.3 GB run

Each compression runs in its own process under ``/usr/bin/time -v`` (wall time, peak RSS); quality
and speed are measured afterwards in this process with onnxruntime (CPU, ORT_ENABLE_ALL). The
methodology is written into the Markdown it produces.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_lib as lib

from onnxcompress.errors import CompressError
from onnxcompress.parity import LOSSY
from onnxcompress.presets import get_preset
from onnxcompress.recipe import build_specs
from onnxcompress.render import auc_change

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"

#: onnxcompress recipes: name -> (passes, options per pass). Adding a method is adding a line.
RECIPES: dict[str, tuple[tuple[str, ...], dict[str, dict[str, Any]]]] = {
    "ours-cleanup": (("cleanup",), {"cleanup": {"strip_metadata": True}}),
    # issue 5's binary row: sign(w) * alpha, measured rather than budgeted. Weights under 256 values
    # (a one-output last layer, tables of a few rows) keep 8 bits: their unpacking nodes would take
    # more bytes than their bits save. The final cleanup is the presets', less the one rewrite that
    # spends bytes on speed: head_transposes adds a Transpose and a Reshape per attention operand
    # (159 bytes on SASRec: 20.07x -> 19.85x), and this row's target is size alone.
    "ours-binary": (
        ("cleanup", "quant", "cleanup@final"),
        {
            "cleanup": {"head_transposes": False},
            "quant": {"bits": 1, "embedding_bits": 1, "scale_codebook": True, "low_bit_min_elements": 256},
            "cleanup@final": {**get_preset("int8").options["cleanup@final"], "head_transposes": False},
        },
    ),
    # issue 5's static activations: the int8 preset with QuantizeLinear/DequantizeLinear ranges fixed
    # on the calibration rows instead of DynamicQuantizeLinear (scores independent of the batch).
    "ours-int8-static": (
        get_preset("int8").passes,
        {**get_preset("int8").options, "quant": {**get_preset("int8").options["quant"], "activations": "static"}},
    ),
}

BASELINES = (
    lib.Method("ort-dynamic", "ort_dynamic", "onnxruntime quantize_dynamic(in, out), defaults", {"per_channel": False}),
    lib.Method("ort-dynamic-pc", "ort_dynamic", "quantize_dynamic(in, out, per_channel=True)", {"per_channel": True}),
    lib.Method(
        "ort-static-qdq-pc",
        "ort_static",
        "quantize_static(QDQ, per_channel=True), MinMax over calib.npz in batches of 128",
        {"per_channel": True},
    ),
    lib.Method("ort-int4", "ort_nbits", "MatMulNBitsQuantizer(block_size=32), default op types", {"block_size": 32}),
    lib.Method(
        "ort-int4-gather",
        "ort_nbits",
        "MatMulNBitsQuantizer(block_size=32, op_types_to_quantize=(MatMul, Gather))",
        {"block_size": 32, "op_types": ["MatMul", "Gather"]},
    ),
)

ONNXSIM = (
    lib.Method(
        "onnxsim-prune50",
        "onnxsim",
        "onnxsim.apply_magnitude_pruning(in, sparsity=0.5)",
        {"function": "apply_magnitude_pruning", "kwargs": {"sparsity": 0.5}},
    ),
    lib.Method(
        "onnxsim-sparsegpt50",
        "onnxsim",
        "onnxsim.apply_sparsegpt_pruning(in, calib.npz in batches of 128, sparsity=0.5)",
        {"function": "apply_sparsegpt_pruning", "kwargs": {"sparsity": 0.5}, "calibration": True},
    ),
    lib.Method(
        "onnxsim-units50",
        "onnxsim",
        "onnxsim.apply_structured_pruning(in, sparsity=0.5): half the hidden units by L2 norm",
        {"function": "apply_structured_pruning", "kwargs": {"sparsity": 0.5}},
    ),
    lib.Method(
        "onnxsim-int8-wo",
        "onnxsim",
        "onnxsim.quantize_weight_only(in): int8 per channel",
        {"function": "quantize_weight_only"},
    ),
    lib.Method(
        "onnxsim-int4-wo",
        "onnxsim",
        "onnxsim.quantize_weight_only_int4(in): int4, blocks of 32",
        {"function": "quantize_weight_only_int4"},
    ),
)

ORIGINAL = lib.Method("original", "original", "the model as exported")
CONTROL = "original, 2nd session (A/A)"
QUICK_MODEL = "sklearn_mlp"
BATCHES = {"b1": 1, "b512": 512}
AUC_BUDGET = LOSSY.max_auc_drop  # onnxcompress's default --max-auc-drop, drawn on the Pareto plot
PACKAGES = ("onnxcompress", "onnx", "onnx-ir", "onnxruntime", "numpy", "onnxsim", "matplotlib")


def recipe_method(
    name: str,
    passes: Sequence[str],
    options: Mapping[str, Mapping[str, Any]] | None = None,
    assignments: Sequence[str] = (),
) -> lib.Method:
    """An onnxcompress method; the recipe is validated here so that a typo fails before anything runs."""
    build_specs(list(passes), options, assignments)
    settings = [
        f"{pass_name}.{key}={value}" for pass_name, table in (options or {}).items() for key, value in table.items()
    ]
    shown = ", ".join([*settings, *assignments])
    return lib.Method(
        name,
        "ours",
        f"onnxcompress --passes {','.join(passes)}" + (f" --set {shown}" if shown else ""),
        {
            "passes": list(passes),
            "options": {k: dict(v) for k, v in (options or {}).items()},
            "assignments": list(assignments),
        },
    )


def parse_recipe(text: str) -> lib.Method:
    """``NAME=pass,pass[:PASS.FIELD=VALUE,...]`` (values cannot contain commas)."""
    name, sep, spec = text.partition("=")
    passes_text, _, settings = spec.partition(":")
    passes = [part.strip() for part in passes_text.split(",") if part.strip()]
    if not sep or not name.strip() or not passes:
        raise argparse.ArgumentTypeError(f"--recipe {text!r}: expected NAME=pass,pass[:PASS.FIELD=VALUE,...]")
    assignments = [part.strip() for part in settings.split(",") if part.strip()]
    try:
        return recipe_method(name.strip(), passes, assignments=assignments)
    except CompressError as error:
        raise argparse.ArgumentTypeError(f"--recipe {text!r}: {error}") from None


def preset_method(name: str) -> lib.Method:
    """A method for ``onnxcompress.presets.get_preset(name)``: its passes and options, given to ``compress()``."""
    try:
        from onnxcompress.presets import get_preset
    except ImportError:
        raise argparse.ArgumentTypeError("--preset: onnxcompress.presets does not exist in this checkout") from None
    try:
        preset = get_preset(name)
    except CompressError as error:
        raise argparse.ArgumentTypeError(f"--preset: {error}") from None
    return lib.Method(f"preset-{name}", "ours", f"onnxcompress --preset {name}: {preset.summary}", {"preset": name})


def onnxsim_methods() -> tuple[tuple[lib.Method, ...], str]:
    """The onnxsim methods if onnxsim is installed and has their functions, else none and why."""
    try:
        import onnxsim
    except ImportError:
        return (), "onnxsim is not installed: its methods were skipped"
    missing = [method.params["function"] for method in ONNXSIM if not hasattr(onnxsim, method.params["function"])]
    if missing:
        return (), f"onnxsim {onnxsim.__version__} lacks {', '.join(missing)}: its methods were skipped"
    return ONNXSIM, ""


@dataclass
class Row:
    """Everything measured for one (model, method)."""

    model: str
    method: str
    error: str | None = None
    bytes: int | None = None
    size_ratio: float | None = None
    auc: float | None = None
    auc_delta: float | None = None
    auc_delta_se: float | None = None
    max_abs_err: float | None = None
    mean_abs_err: float | None = None
    top10_overlap: float | None = None
    parity: str | None = None
    compress_seconds: float | None = None
    process_seconds: float | None = None
    peak_rss_mib: float | None = None
    op_changes: str = ""
    float_weights_left: dict[str, tuple[int, int]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    #: ``{"threads=1": {"b1_seconds": ..., "b1_speedup": ..., "b1_samples": [...], ...}}``
    speed: dict[str, dict[str, Any]] = field(default_factory=dict)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_model(
    case: lib.Case, methods: Sequence[lib.Method], args: argparse.Namespace, threads: Sequence[int]
) -> list[Row]:
    """Compress ``case`` with every method, then measure quality and speed of every result."""
    workdir: Path = args.workdir / case.name
    workdir.mkdir(parents=True, exist_ok=True)
    original_ops = lib.op_counts(case.model)
    original_bytes = lib.bytes_on_disk(case.model)
    rows: dict[str, Row] = {}
    paths: dict[str, Path] = {}
    for method in methods:
        row = rows[method.name] = Row(case.name, method.name)
        if method.kind == "original":
            paths[method.name] = case.model
        else:
            out = workdir / f"{method.name}.onnx"
            result = lib.compress_in_subprocess(method, case, out)
            row.compress_seconds, row.process_seconds = result.seconds, result.process_seconds
            row.peak_rss_mib = result.peak_rss_mib
            row.notes = dict(result.notes)
            row.parity = row.notes.pop("parity", None)
            row.error = result.error
            if result.error is None:
                paths[method.name] = out
        if method.name in paths:
            path = paths[method.name]
            row.bytes = lib.bytes_on_disk(path)
            row.size_ratio = original_bytes / row.bytes
            row.op_changes = lib.op_changes(original_ops, lib.op_counts(path))
            row.float_weights_left = lib.float_weights_left(path)
        if row.error:
            status = f"failed: {row.error}"
        else:
            status = f"{original_bytes / 1e3:.1f} kB -> {(row.bytes or 0) / 1e3:.1f} kB"
            if row.compress_seconds is not None:
                status += f" in {row.compress_seconds:.2f} s, peak RSS {row.peak_rss_mib:.0f} MiB"
        log(f"{case.name:>16} {method.name:<18} {status}")

    measure_quality(case, rows, paths, threads[-1])
    paths = {name: path for name, path in paths.items() if rows[name].error is None}
    measure_speed(case, rows, paths, args, threads)
    return list(rows.values())


def measure_quality(case: lib.Case, rows: Mapping[str, Row], paths: dict[str, Path], threads: int) -> None:
    """AUC, score error against the original and top-10 overlap, at ORT_ENABLE_ALL."""
    feeds = lib.load_feeds(case.feeds)
    labels = np.load(case.labels)
    rank_feeds = lib.load_feeds(case.rank) if case.rank else None
    reference_session = lib.make_session(paths[ORIGINAL.name], threads)
    reference = lib.scores(reference_session, feeds, case)
    rank_reference = lib.scores(reference_session, rank_feeds, case) if rank_feeds is not None else None
    reference_auc: float | None = None
    for name, path in paths.items():
        row = rows[name]
        try:
            found = lib.quality(
                lib.make_session(path, threads), case, feeds, labels, reference, rank_feeds, rank_reference
            )
        except Exception as error:
            row.error = f"onnxruntime: {lib.first_line(error)}"
            log(f"{case.name:>16} {name:<18} failed in onnxruntime: {row.error}")
            continue
        reference_auc = found.auc if name == ORIGINAL.name else reference_auc
        row.auc, row.max_abs_err, row.mean_abs_err = found.auc, found.max_abs_err, found.mean_abs_err
        row.top10_overlap = found.top10_overlap
        row.auc_delta = found.auc - reference_auc if reference_auc is not None else None
        row.auc_delta_se = found.auc_delta_se


def measure_speed(
    case: lib.Case, rows: Mapping[str, Row], paths: Mapping[str, Path], args: argparse.Namespace, threads: Sequence[int]
) -> None:
    """Interleaved batch-1 latency and batch-512 throughput, medians over repeats, per thread count."""
    feeds = lib.load_feeds(case.feeds)
    feed_sets = {label: lib.first_rows(feeds, size) for label, size in BATCHES.items()}
    for count in threads:
        log(f"{case.name:>16} timing {len(paths)} models at {count} thread(s), {args.repeats} repeats")
        sessions = {}
        for name, path in paths.items():
            try:
                session = lib.make_session(path, count)
                for batch in feed_sets.values():
                    session.run(None, batch)
            except Exception as error:
                rows[name].error = f"onnxruntime at {count} thread(s): {lib.first_line(error)}"
                continue
            sessions[name] = session
        # A/A control: the original again in a second session; its "speedup" is the noise floor.
        sessions[CONTROL] = lib.make_session(case.model, count)
        samples = lib.time_sessions(sessions, feed_sets, args.repeats, args.sample_seconds)
        key = f"threads={count}"
        for name in sessions:
            row, prefix = (rows[ORIGINAL.name], "aa_") if name == CONTROL else (rows[name], "")
            speed = row.speed.setdefault(key, {})
            for label in BATCHES:
                speed[f"{prefix}{label}_samples"] = samples[(name, label)]
                speed[f"{prefix}{label}_seconds"] = statistics.median(samples[(name, label)])
        for name in sessions:
            row, prefix = (rows[ORIGINAL.name], "aa_") if name == CONTROL else (rows[name], "")
            for label in BATCHES:
                original = rows[ORIGINAL.name].speed[key][f"{label}_seconds"]
                row.speed[key][f"{prefix}{label}_speedup"] = original / row.speed[key][f"{prefix}{label}_seconds"]


# --- output ------------------------------------------------------------------------------------------


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def geomean(values: Iterable[float]) -> float | None:
    values = [value for value in values if value and value > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def weights_left(row: Row) -> str:
    return ", ".join(f"{op} {kept}/{total}" for op, (kept, total) in row.float_weights_left.items())


def summary_table(rows: Sequence[Row], methods: Sequence[lib.Method], threads: Sequence[int]) -> list[str]:
    speed_heads = [f"{label} speedup {count}T" for count in threads for label in BATCHES]
    lines = [
        "| method | models ok | geo-mean size ratio | worst \\|ΔAUC\\| | "
        + " | ".join(speed_heads)
        + " | parity passed |",
        "|---|---|---|---|" + "---|" * len(speed_heads) + "---|",
    ]
    for method in methods:
        mine = [row for row in rows if row.method == method.name]
        ok = [row for row in mine if row.error is None]
        deltas = [abs(row.auc_delta) for row in ok if row.auc_delta is not None]
        speeds = [
            fmt(geomean(row.speed.get(f"threads={count}", {}).get(f"{label}_speedup", 0.0) for row in ok), ".2f")
            for count in threads
            for label in BATCHES
        ]
        verdicts = [row.parity for row in ok if row.parity is not None]
        parity = f"{sum(v == 'passed' for v in verdicts)}/{len(verdicts)}" if verdicts else "—"
        lines.append(
            f"| {method.name} | {len(ok)}/{len(mine)} | {fmt(geomean(row.size_ratio or 0.0 for row in ok), '.2f')} | "
            f"{fmt(max(deltas) if deltas else None, '.4f')} | " + " | ".join(speeds) + f" | {parity} |"
        )
    originals = [row for row in rows if row.method == ORIGINAL.name]
    controls = [
        fmt(geomean(row.speed.get(f"threads={count}", {}).get(f"aa_{label}_speedup", 0.0) for row in originals), ".2f")
        for count in threads
        for label in BATCHES
    ]
    lines.append(f"| {CONTROL} | | | | " + " | ".join(controls) + " | |")
    return lines


def model_tables(rows: Sequence[Row], threads: Sequence[int]) -> list[str]:
    has_top10 = any(row.top10_overlap is not None for row in rows)
    lines = [
        "| method | size kB | size ratio | AUC | ΔAUC | max abs err | mean abs err | "
        + ("top-10/user | " if has_top10 else "")
        + "parity | compress s | process s | peak RSS MiB | op changes | float weights left |",
        "|---|---|---|---|---|---|---|" + ("---|" if has_top10 else "") + "---|---|---|---|---|---|",
    ]
    columns = lines[0].count("|") - 1
    for row in rows:
        if row.error and row.bytes is None:
            lines.append("| " + " | ".join([row.method, f"failed: {row.error}"] + [""] * (columns - 2)) + " |")
            continue
        auc_text = f"failed: {row.error}" if row.error else fmt(row.auc, ".4f")
        change = "—" if row.auc_delta is None else auc_change(row.auc_delta, row.auc_delta_se)
        lines.append(
            f"| {row.method} | {fmt((row.bytes or 0) / 1e3, '.1f')} | {fmt(row.size_ratio, '.2f')} | {auc_text} | "
            f"{change} | {fmt(row.max_abs_err, '.2e')} | {fmt(row.mean_abs_err, '.2e')} | "
            + (f"{fmt(row.top10_overlap, '.3f')} | " if has_top10 else "")
            + f"{row.parity or '—'} | {fmt(row.compress_seconds, '.2f')} | {fmt(row.process_seconds, '.2f')} | "
            f"{fmt(row.peak_rss_mib, '.0f')} | {row.op_changes if row.method != ORIGINAL.name else ''} | "
            f"{weights_left(row)} |"
        )
    heads = []
    for count in threads:
        heads += [f"b1 µs {count}T", "speedup", f"b512 krows/s {count}T", "speedup"]
    lines += ["", "| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for row in rows:
        lines.append(f"| {row.method} | " + " | ".join(speed_cells(row, threads, "")) + " |")
        if row.method == ORIGINAL.name:
            lines.append(f"| {CONTROL} | " + " | ".join(speed_cells(row, threads, "aa_")) + " |")
    return lines


def speed_cells(row: Row, threads: Sequence[int], prefix: str) -> list[str]:
    """Batch-1 latency, batch-512 throughput and their speedups per thread count; ``aa_`` for the control."""
    cells = []
    for count in threads:
        speed = row.speed.get(f"threads={count}", {})
        if f"{prefix}b1_seconds" not in speed:
            cells += ["—"] * 4
            continue
        cells += [
            f"{speed[f'{prefix}b1_seconds'] * 1e6:.1f}",
            f"{speed[f'{prefix}b1_speedup']:.2f}",
            f"{BATCHES['b512'] / speed[f'{prefix}b512_seconds'] / 1e3:.1f}",
            f"{speed[f'{prefix}b512_speedup']:.2f}",
        ]
    return cells


def markdown(
    report: Mapping[str, Any], rows: Sequence[Row], methods: Sequence[lib.Method], threads: Sequence[int]
) -> str:
    machine, settings = report["machine"], report["settings"]
    versions = ", ".join(f"{name} {version}" for name, version in report["versions"].items())
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{report['command']}` on {report['date']} (git {report['git']}) in "
        f"{report['seconds'] / 60:.1f} min. Do not edit by hand: rerun the command.",
        "",
        f"**Machine:** {machine['cpu']}, {machine['logical_cores']} logical cores, {machine['ram_gib']} GiB RAM, "
        f"{machine['os']}, Python {machine['python']}.  ",
        f"**Packages:** {versions}.",
        "",
        "## How it is measured",
        "",
        "- **Size**: bytes on disk of the model file plus its external data files; size ratio = original / method.",
        "- **Quality**: onnxruntime CPU at ORT_ENABLE_ALL (as deployed) on the model's test feeds "
        "(`NAME.feeds.npz`, labels `NAME.labels.npy`). The score is the meta.json's `score_output` "
        "(column `score_column`), else the first float output. ΔAUC = method - original, ± its paired "
        "standard error (DeLong: both models score the same rows, so a change that barely reorders them "
        "has a small error; one within about two errors is one these rows cannot tell from none); score errors are "
        "against the original's scores. Top-10/user: mean over the 20 users of `two_tower.rank.npz` of the "
        "overlap between the original's and the method's 10 best-scored items of all 1682.",
        "- **Parity** (onnxcompress methods): the verdict of `compress(..., force=True)` with the test feeds, "
        "labels and calibration rows, at its default budget and onnxruntime level (basic).",
        f"- **Speed**: onnxruntime CPUExecutionProvider, ORT_ENABLE_ALL, intra_op_num_threads = "
        f"{' and '.join(map(str, threads))} (T). Batch 1 (first test row) latency and batch 512 (first 512 rows) "
        f"throughput through `session.run`. Each session is warmed up, then given a call count that makes one "
        f"sample last about {settings['sample_seconds']} s; {settings['repeats']} rounds each time every "
        "(method, batch) once, in a fresh seeded random order every round, with the garbage collector off "
        "during a sample. "
        "Figures are medians; speedup is relative to the original (original time / method time, > 1 is faster). "
        f"The row '{CONTROL}' times the original again in a second session: its distance from 1.00 is the "
        "noise floor of that column.",
        "- **Compression cost**: each compression runs in a fresh Python process under `/usr/bin/time -v`. "
        "compress s is the compressor call alone (for onnxcompress it includes loading, saving and the parity "
        "runs); process s is the whole process including interpreter start-up and imports; peak RSS is the "
        "process's maximum resident set.",
        "- **Op changes / float weights left**: node counts per op type that changed against the original, and "
        "for Gemm, MatMul and Gather how many nodes still take a float initializer as their weight.",
        "",
    ]
    if report["notes"]:
        lines += [*(f"_Note: {note}._" for note in report["notes"]), ""]
    lines += ["## Methods", "", "| method | what runs |", "|---|---|"]
    lines += [f"| {method.name} | {method.about} |" for method in methods]
    lines += ["", "## Summary across models", "", *summary_table(rows, methods, threads), ""]
    lines += ["Geometric means over the models where the method worked; worst \\|ΔAUC\\| is the largest.", ""]
    if report.get("plot"):
        lines += [f"![size ratio against AUC change]({report['plot']})", ""]
    for name in dict.fromkeys(row.model for row in rows):
        mine = [row for row in rows if row.model == name]
        original = mine[0]
        lines += [
            f"## {name}",
            "",
            f"Original: {fmt((original.bytes or 0) / 1e3, '.1f')} kB, AUC {fmt(original.auc, '.4f')}.",
            "",
            *model_tables(mine, threads),
            "",
        ]
    return "\n".join(lines)


def pareto_plot(rows: Sequence[Row], methods: Sequence[lib.Method], path: Path) -> str:
    """Size ratio against |ΔAUC| for every (model, method); returns a note if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no Pareto plot (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    markers = "osD^vP*Xhp<>"
    models = list(dict.fromkeys(row.model for row in rows))
    colors = {method.name: plt.get_cmap("tab20")(index % 20) for index, method in enumerate(methods)}
    figure, axes = plt.subplots(figsize=(9, 6))
    for row in rows:
        if row.error is None and row.size_ratio is not None and row.auc_delta is not None:
            axes.scatter(
                row.size_ratio,
                abs(row.auc_delta),
                color=colors[row.method],
                marker=markers[models.index(row.model) % len(markers)],
                s=45,
                alpha=0.85,
                clip_on=False,
            )
    axes.axhline(AUC_BUDGET, color="grey", linestyle="--", linewidth=0.8)
    axes.set_xscale("log")
    axes.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    axes.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axes.xaxis.set_minor_formatter(ticker.NullFormatter())
    axes.set_yscale("symlog", linthresh=1e-5)
    axes.set_ylim(bottom=0, top=max(axes.get_ylim()[1], AUC_BUDGET) * 3)
    axes.set_xlabel("size ratio (original / method, log)")
    axes.set_ylabel("|ΔAUC| vs original (symlog, linear below 1e-5)")
    axes.set_title("Compression against quality: one marker per model (shape) and method (colour)")
    budget = plt.Line2D([], [], color="grey", linestyle="--", label=f"|ΔAUC| = {AUC_BUDGET} (default budget)")
    method_handles = [plt.Line2D([], [], color=colors[m.name], marker="o", linestyle="", label=m.name) for m in methods]
    model_handles = [
        plt.Line2D([], [], color="black", marker=markers[i % len(markers)], linestyle="", label=name)
        for i, name in enumerate(models)
    ]
    first = axes.legend(
        handles=[*method_handles, budget], title="method", fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0)
    )
    axes.add_artist(first)
    second = axes.legend(handles=model_handles, title="model", fontsize=7, loc="lower left", bbox_to_anchor=(1.01, 0.0))
    axes.grid(True, which="both", linewidth=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight", bbox_extra_artists=[first, second])
    plt.close(figure)
    return ""


def finite(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument(
        "--models",
        type=lambda text: [part for part in text.split(",") if part],
        help="comma-separated model names from models/ (default: all)",
    )
    parser.add_argument(
        "--methods",
        type=lambda text: [part for part in text.split(",") if part],
        help="comma-separated method names (default: all; 'original' always runs)",
    )
    parser.add_argument(
        "--recipe",
        type=parse_recipe,
        action="append",
        default=[],
        metavar="NAME=PASSES[:OPTS]",
        help="an extra onnxcompress method, e.g. ours-q=cleanup,quant:quant.bits=8 (repeatable)",
    )
    parser.add_argument(
        "--preset",
        type=preset_method,
        action="append",
        default=[],
        metavar="NAME",
        help="an extra method from onnxcompress.presets.PRESETS[NAME] (repeatable)",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"fast check: {QUICK_MODEL} only (unless --models), 2 repeats of 0.05 s"
    )
    parser.add_argument("--repeats", type=int, help="timing rounds per thread count (default 7, --quick 2)")
    parser.add_argument(
        "--sample-seconds", type=float, help="target length of one timing sample (default 0.2, --quick 0.05)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/onnxcompress-bench"),
        help="where compressed models go (default %(default)s)",
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="also time the int8 and int4 presets on a generated 2.3 GB Criteo-like DLRM against the "
        "onnx.load+onnx.save floor and quantize_dynamic (tools/bench_large.py; ~6 GB free disk, ~5 min)",
    )
    parser.add_argument("--scale-repeats", type=int, default=3, help="interleaved repeats of the scale run")
    parser.add_argument("--json", type=Path, help="write every figure as JSON here")
    parser.add_argument(
        "--markdown",
        type=Path,
        help="default docs/BENCHMARKS.md for a full run, WORKDIR/BENCHMARKS.md for a partial one",
    )
    parser.add_argument(
        "--plot", type=Path, help="default docs/pareto.png for a full run, WORKDIR/pareto.png for a partial one"
    )
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 7
    if args.sample_seconds is None:
        args.sample_seconds = 0.05 if args.quick else 0.2
    if args.repeats < 1 or args.sample_seconds <= 0:
        parser.error("--repeats must be at least 1 and --sample-seconds positive")
    partial = args.quick or args.models is not None or args.methods is not None
    output_dir = args.workdir if partial else REPO / "docs"
    args.markdown = args.markdown or output_dir / "BENCHMARKS.md"
    args.plot = args.plot or output_dir / "pareto.png"

    available = lib.discover_cases(MODELS)
    if args.models is None:
        args.models = [QUICK_MODEL] if args.quick else available
    unknown = sorted(set(args.models) - set(available))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; models/ has {', '.join(available)}")
    simulated, args.notes = onnxsim_methods()
    args.notes = [args.notes] if args.notes else []
    everything = [
        ORIGINAL,
        *BASELINES,
        *simulated,
        *(recipe_method(name, passes, options) for name, (passes, options) in RECIPES.items()),
        *args.recipe,
        *args.preset,
    ]
    names = [method.name for method in everything]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        parser.error(f"method name(s) used twice: {', '.join(duplicates)}")
    if args.methods is not None:
        unknown = sorted(set(args.methods) - set(names))
        if unknown:
            parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(names)}")
        everything = [method for method in everything if method.name in {ORIGINAL.name, *args.methods}]
    args.method_list = everything
    return args


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    revision = lib.git_revision(REPO)  # before this run writes the plot and the tables into the tree
    args = parse_args(argv)
    cores = os.cpu_count() or 1
    threads = sorted({1, cores})
    methods: list[lib.Method] = args.method_list
    rows: list[Row] = []
    for name in args.models:
        rows += bench_model(lib.Case.from_dir(MODELS, name), methods, args, threads)

    notes = list(args.notes)
    load = {"before": load_before, "after": os.getloadavg()[0]}
    if max(load.values()) > cores / 2:
        notes.append(
            f"the machine was busy (1-minute load average {load['before']:.1f} before, {load['after']:.1f} after, "
            f"on {cores} cores): timings are noisier than on an idle machine"
        )
    plot_note = pareto_plot(rows, methods, args.plot)
    if plot_note:
        notes.append(plot_note)
    report: dict[str, Any] = {
        "command": " ".join(["python tools/bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git": revision,
        "machine": lib.machine(),
        "load_average": load,
        "versions": lib.versions(PACKAGES),
        "settings": {
            "repeats": args.repeats,
            "sample_seconds": args.sample_seconds,
            "threads": threads,
            "batches": BATCHES,
            "models": args.models,
        },
        "notes": notes,
        "plot": "" if plot_note else os.path.relpath(args.plot, args.markdown.parent),
        "methods": [dataclasses.asdict(method) for method in methods],
    }
    report["seconds"] = time.perf_counter() - started
    text = markdown(report, rows, methods, threads)
    if args.scale:
        from bench_large import SyntheticSpec, scale_run

        log("scale run: the 2.3 GB Criteo-like DLRM")
        scale_text, scale_rows = scale_run(
            args.workdir / "large", SyntheticSpec(), passes=[], presets=["int8", "int4"], repeats=args.scale_repeats
        )
        text += "\n\n## Scale run\n\n" + scale_text
        report["scale"] = scale_rows
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(text + "\n")
    print(text)
    if args.json:
        report["results"] = [dataclasses.asdict(row) for row in rows]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(finite(report), indent=2))
    log(
        f"wrote {args.markdown}"
        + ("" if plot_note else f" and {args.plot}")
        + (f" and {args.json}" if args.json else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
