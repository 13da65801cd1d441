"""Human-readable views of a Report and of the pass registry, as rich renderables."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Iterator, Mapping
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from onnxcompress.parity import OutputComparison
from onnxcompress.passes import PASSES
from onnxcompress.passes.base import config_fields
from onnxcompress.recipe import describe_field
from onnxcompress.report import Report

__all__ = ["auc_cell", "auc_change", "human_bytes", "pass_catalogue", "report_view"]


def human_bytes(count: int | float) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{value:.2f} GB"


def size_change(before: int, after: int) -> str:
    """ "4.25x smaller", or the bytes when a ratio in two decimals would read 1.00x (a file that grew
    by 646 bytes is not "1.00x smaller")."""
    if after > before:
        return f"{human_bytes(after - before)} larger" if after < before * 1.005 else f"{after / before:.2f}x larger"
    if after >= before / 1.005:
        return "same size" if after == before else f"{human_bytes(before - after)} smaller"
    return f"{before / after:.2f}x smaller"


def loosened(key: str, value: float) -> str:
    """A tolerance the output meets, in four significant digits rounded towards loosening it: down
    for a floor (``min_*``), up for a ceiling (``atol``, ``max_*``), so that the suggested flag
    passes when given back."""
    if not math.isfinite(value) or value == 0:
        return f"{value:.4g}"
    step = 10.0 ** (math.floor(math.log10(abs(value))) - 3)
    rounding = math.floor if key.startswith("min_") else math.ceil
    # The quotient of a 4-digit value by its step can land a hair off an integer.
    steps = rounding(round(value / step, 6))
    if rounding is math.floor and steps * step > value:
        steps -= 1
    elif rounding is math.ceil and steps * step < value:
        steps += 1
    return f"{steps * step:.4g}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return (
            "{"
            + ", ".join(f"{key}: {_short(item)}" for key, item in list(value.items())[:6])
            + (", …}" if len(value) > 6 else "}")
        )
    return str(value)


def _is_detail(value: Any) -> bool:
    """Per-tensor detail tables (a mapping of mappings) belong in the JSON report, not the table."""
    return isinstance(value, Mapping) and any(isinstance(item, Mapping) for item in value.values())


def _stats_text(stats: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{key}={_short(value)}"
        for key, value in stats.items()
        if value not in (0, {}, [], None) and not _is_detail(value)
    )


def _worst(value: float | None, groups: int, digits: int) -> str:
    """Beside a mean over ``--rank-group`` groups: how many, and the worst group's figure."""
    return "" if value is None else f" (mean of {groups}, worst {value:.{digits}f})"


def _optional(value: float | None, digits: int = 5) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def auc_change(delta: float, error: float | None) -> str:
    """An AUC change with its standard error: none for an unchanged order of every row, and
    "± <0.0001" rather than a "± 0.0000" that reads as exact."""
    shown = "" if not error else f" ± {error:.4f}" if error >= 0.00005 else " ± <0.0001"
    return f"{delta:+.4f}{shown}"


def auc_cell(output: OutputComparison) -> str:
    if output.auc_reference is None or output.auc_candidate is None:
        return "—"
    change = auc_change(output.auc_candidate - output.auc_reference, output.auc_delta_error)
    return f"{output.auc_reference:.4f}→{output.auc_candidate:.4f} ({change})"


def report_view(report: Report) -> RenderableType:
    """The before/after table of passes, the parity table and a summary."""
    parts: list[RenderableType] = []
    passes = Table(title="passes", title_justify="left", expand=False)
    for column in ("pass", "time", "initializers", "nodes", "stats"):
        passes.add_column(column, overflow="fold")
    for record in report.passes:
        passes.add_row(
            Text(record.name),
            f"{record.seconds:.2f}s",
            f"{human_bytes(record.initializer_bytes_before)} → {human_bytes(record.initializer_bytes_after)}",
            f"{record.nodes_before} → {record.nodes_after}",
            Text(_stats_text(record.stats) or ("no change" if not record.modified else "")),  # lists are not markup
        )
    parts.append(passes)

    if report.parity.checked:
        parity = Table(
            title=f"parity (onnxruntime CPU, optimisation level {report.parity.opt_level}, {report.parity.rows} rows"
            + (f", {report.parity.run_rows} a run)" if 0 < report.parity.run_rows < report.parity.rows else ")"),
            title_justify="left",
        )
        for column in (
            "output",
            "kind",
            "max abs",
            "mean abs",
            "max rel",
            "cosine",
            "spearman",
            "top-10",
            "AUC (change ± s.e.)",
            "verdict",
        ):
            parity.add_column(column, overflow="fold")
        for output in report.parity.outputs:
            parity.add_row(
                Text(output.name),
                output.kind,
                f"{output.max_abs:.3g}" if output.kind != "integer" else f"{output.mismatch:.2%} differ",
                f"{output.mean_abs:.3g}" if output.kind != "integer" else "—",
                f"{output.max_rel:.3g}" if output.kind != "integer" else "—",
                f"{output.cosine:.6f}" if output.kind != "integer" else "—",
                _optional(output.spearman) + _worst(output.worst_spearman, output.rank_groups, 5),
                _optional(output.top10_overlap, 2) + _worst(output.worst_top10_overlap, output.rank_groups, 2),
                auc_cell(output),
                Text("pass", style="green") if output.passed else Text("FAIL", style="bold red"),
            )
        parts.append(parity)
        if report.parity.per_run:
            parts.append(
                Text(
                    "  OUT quantizes activations over the rows of each run (DynamicQuantizeLinear): a row's outputs "
                    "move slightly with the rows run beside it"
                )
            )
        for output in report.parity.failing:
            parts.append(Text(f"  {output.name}: {'; '.join(output.failures)}"))
            flags = " ".join(
                f"--{key.replace('_', '-')} {output.name}={loosened(key, value)}"
                for key, value in output.would_pass_with.items()
                if key in output.missed
            )
            if not output.nonfinite_mismatch:  # no tolerance covers NaN where the other has a value
                parts.append(Text(f"  {output.name} would pass with: {flags}"))

    summary = Text()
    summary.append(f"{report.input_path}: {human_bytes(report.input_bytes)} → ")
    change = size_change(report.input_bytes, report.output_bytes) if report.output_bytes else ""
    if report.written:
        summary.append(f"{report.output_path}: {human_bytes(report.output_bytes)}  ({change})\n")
    else:  # the size is the staged candidate's, which was discarded
        would_be = f"{report.output_path} would have been {human_bytes(report.output_bytes)}"
        summary.append(f"not written ({would_be}, {change})\n" if change else "not written\n")
    summary.append(f"feeds: {report.feeds}\n")
    for note in report.feed_notes:
        summary.append(f"  {note}\n")
    if report.calibration:
        summary.append(f"calibration: {report.calibration}\n")
    style = "green" if report.parity.passed else ("yellow" if not report.parity.checked else "bold red")
    summary.append("parity: ")
    summary.append(report.verdict, style=style)
    summary.append(f"   written: {'yes' if report.written else 'no'}   total {report.seconds.get('total', 0):.2f}s")
    parts.append(summary)
    return Group(*parts)


def _option_rows(config_class: type) -> Iterator[tuple[str, str, str, str]]:
    defaults = config_class()
    for field in config_fields(config_class):
        default = getattr(defaults, field.name)
        yield field.name, describe_field(field), repr(default), field.metadata.get("help", "")


def pass_catalogue() -> RenderableType:
    """Every registered pass with its options, defaults and help, straight from the Config classes."""
    parts: list[RenderableType] = []
    for name in sorted(PASSES):
        cls = PASSES[name]
        doc = inspect.cleandoc(cls.__doc__ or "").replace("\n", " ")
        parts.append(Text.assemble((name, "bold"), f" ({'lossy' if cls.lossy else 'lossless'}): {doc}"))
        table = Table(show_header=True, box=None, padding=(0, 2))
        for column in ("option", "type", "default", "help"):
            table.add_column(column)
        for option, kind, default, help_text in _option_rows(cls.Config):
            # Text cells: a help's "[batch, rows, k]" is not rich markup
            table.add_row(Text(f"{name}.{option}"), Text(kind), Text(default), Text(help_text))
        if dataclasses.fields(cls.Config):
            parts.append(table)
        parts.append(Text(""))
    return Group(*parts)
