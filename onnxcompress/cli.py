"""The ``onnxcompress`` command: a thin click layer over ``compress()`` that renders the report."""

from __future__ import annotations

import math
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import click

from onnxcompress.errors import (
    EXIT_CODES,
    CompressError,
    InterruptedAfterWrite,
    OutputPathError,
    ParityFailedError,
    UsageError,
)
from onnxcompress.presets import PRESETS

__all__ = ["main"]

EXIT_INTERNAL = 4
EXIT_INTERRUPTED = 130
TOLERANCE_OPTIONS = ("atol", "rtol", "min_cosine", "min_rank_corr", "max_auc_drop", "max_mismatch")
NONNEGATIVE_TOLERANCES = ("atol", "rtol", "max_auc_drop", "max_mismatch")
UNIT_TOLERANCES = ("min_cosine", "min_rank_corr")


def _console() -> Any:
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    if not console.is_terminal:
        console.width = 140
    return console


def _list_passes(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from rich.console import Console

    from onnxcompress.render import pass_catalogue

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 140
    console.print(pass_catalogue())
    ctx.exit(0)


def _print_preset(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if not value or ctx.resilient_parsing:
        return
    from onnxcompress.presets import get_preset

    try:
        click.echo(get_preset(value).to_toml(), nl=False)
    except UsageError as error:
        _error(str(error))
        ctx.exit(2)
    ctx.exit(0)


def _list_layers(path: Path, calib: Path | None) -> None:
    from rich.console import Console

    from onnxcompress import io
    from onnxcompress.calibration import Calibration, load_feeds, synthesize_feeds
    from onnxcompress.layers import find_layers, layers_view

    model = io.load(path)
    feeds = load_feeds(calib, model, "--calib") if calib is not None else synthesize_feeds(model)
    Console(highlight=False).print(layers_view(find_layers(model, Calibration(feeds)), path.name, feeds.source))


def _split_passes(text: str | None) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def _parse_shapes(values: Sequence[str]) -> dict[str, list[int]]:
    shapes = {}
    for text in values:
        name, sep, dims = text.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name.strip()] = [int(dim) for dim in dims.split(",")]
        except ValueError:
            raise UsageError(f"--input-shape {text!r}: expected NAME=D0,D1,... such as ids=512,20") from None
    return shapes


def _parse_tolerances(option: str, values: Sequence[str]) -> tuple[float | None, dict[str, float]]:
    flag = f"--{option.replace('_', '-')}"
    overall: float | None = None
    per_output: dict[str, float] = {}
    for text in values:
        name, sep, number = text.rpartition("=")
        try:
            value = float(number)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):  # a NaN bound compares false: it would pass everything
            raise UsageError(f"{flag} {text!r}: expected a finite number or OUTPUT=NUMBER")
        if option in NONNEGATIVE_TOLERANCES and value < 0:
            raise UsageError(f"{flag} {text!r}: must be at least 0")
        if option in UNIT_TOLERANCES and not -1 <= value <= 1:
            raise UsageError(f"{flag} {text!r}: must be between -1 and 1")
        if (sep and name in per_output) or (not sep and overall is not None):
            raise UsageError(f"{flag} {text!r}: {'output ' + name if sep else 'the default'} given twice")
        if sep:
            per_output[name] = value
        else:
            overall = value
    return overall, per_output


def _parse_labels(values: Sequence[str]) -> dict[str, Path] | None:
    """``--labels FILE`` (every score output) and ``--labels OUTPUT=FILE``, by output name (``""``: all)."""
    if not values:
        return None
    files: dict[str, Path] = {}
    for text in values:
        name, sep, path = text.partition("=")
        if not sep or Path(text).exists():
            name, path = "", text
        if name in files:
            raise UsageError(f"--labels {text}: {'output ' + name if name else 'the default labels'} given twice")
        files[name] = Path(path)
    return files


def _check_report_path(report: Path, in_path: Path, out_path: Path, inputs: dict[str, Path | None]) -> None:
    """Refuse, before any work, a --report path that would overwrite a file of the run or that
    cannot be written: the report is written last, after OUT."""
    from onnxcompress import io

    fix = "choose another report path"
    files = {"IN": in_path, "OUT": out_path, "OUT's data file": io.data_file_for(out_path.resolve()), **inputs}
    for what, path in files.items():
        if path is not None and io.same_file(report, path):
            raise UsageError(f"--report {report}: is {what}, which the report would overwrite; {fix}")
    # Only a file that exists can be the input's external data (a missing one fails the load).
    if report.is_file() and io.references_data_file(in_path, report):
        raise UsageError(f"--report {report}: is IN's external data, which the report would overwrite; {fix}")
    if report.is_dir():
        raise UsageError(f"--report {report}: is a directory; give a file name such as {report / 'report.json'}")
    if report.exists() and not report.is_file():
        # Opening a pipe to check it blocks until something reads it; a device would swallow the report.
        raise UsageError(f"--report {report}: is not a regular file (a device, pipe or socket); {fix}")
    folder = report.resolve().parent
    if not folder.is_dir():
        raise UsageError(f"--report {report}: the folder {folder} does not exist; create it first")
    # Opened as the final write will open it (permission bits do not stop root; /proc, read-only
    # mounts do): appending to an existing file changes nothing, a new one is removed again.
    try:
        if report.exists():
            with open(report, "a", encoding="utf-8"):
                pass
        else:
            with open(report, "x", encoding="utf-8"):
                pass
            report.unlink()
    except OSError as error:
        raise UsageError(f"--report {report}: cannot be written ({error.strerror or error}); {fix}") from None


def _write_report(path: Path, text: str, written: bool) -> None:
    """Written beside its final name and renamed, as OUT is: a full disk leaves no half report."""
    target = path.resolve()  # a link is written through, as before, not replaced
    partial = target.with_name(f".{target.name}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        partial.replace(target)
    except OSError as error:
        partial.unlink(missing_ok=True)
        outcome = "OUT was written" if written else "nothing was written"
        raise OutputPathError(f"--report {path}: writing it failed ({error.strerror or error}); {outcome}") from error


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("in_path", metavar="IN", required=False, type=click.Path(path_type=Path))
@click.argument("out_path", metavar="OUT", required=False, type=click.Path(path_type=Path))
@click.option("-p", "--passes", help="Comma-separated passes to run in order, e.g. prune,quant.")
@click.option("--preset", help=f"A named recipe: {', '.join(PRESETS)} (see --print-preset NAME).")
@click.option(
    "--print-preset",
    metavar="NAME",
    expose_value=False,
    is_eager=True,
    callback=_print_preset,
    help="Print a preset as a TOML recipe (edit it and pass it with --config), then exit.",
)
@click.option(
    "-s",
    "--set",
    "assignments",
    multiple=True,
    metavar="PASS.FIELD=VALUE",
    help="Set a pass option (repeatable); see --list-passes.",
)
@click.option(
    "--config",
    "recipe",
    type=click.Path(path_type=Path),
    help="TOML recipe: optional passes = [...] and a [pass] table of options per pass.",
)
@click.option(
    "--feeds",
    type=click.Path(path_type=Path),
    help=".npz of rows for the parity check, keyed by graph input names; default: the --calib rows, "
    "else synthesized with a fixed seed.",
)
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    help=".npz of calibration rows for passes that need data; default: the feeds.",
)
@click.option(
    "--labels",
    "labels",
    multiple=True,
    metavar="[OUTPUT=]FILE",
    help=".npy of 0/1 labels aligned with the feeds (AUC); OUTPUT=FILE for one output of a multi-task model "
    "(repeatable).",
)
@click.option(
    "--calib-labels",
    type=click.Path(path_type=Path),
    help=".npy of 0/1 labels aligned with the --calib rows, for quant.max_auc_drop; default: --labels "
    "when the feeds are the calibration rows.",
)
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME=D0,D1",
    help="Shape of a synthesized input with symbolic dims (repeatable).",
)
@click.option("--atol", multiple=True, metavar="[OUTPUT=]X", help="Max abs error (lossless default 1e-5).")
@click.option("--rtol", multiple=True, metavar="[OUTPUT=]X", help="Relative tolerance added to atol.")
@click.option("--min-cosine", multiple=True, metavar="[OUTPUT=]X", help="Min cosine similarity (lossy: 0.99).")
@click.option(
    "--min-rank-corr",
    multiple=True,
    metavar="[OUTPUT=]X",
    help="Min Spearman rank correlation of score outputs (lossy default 0.99).",
)
@click.option(
    "--max-auc-drop", multiple=True, metavar="[OUTPUT=]X", help="Max AUC drop with --labels (lossy default 0.003)."
)
@click.option(
    "--max-mismatch",
    multiple=True,
    metavar="[OUTPUT=]X",
    help="Max fraction of differing values in integer outputs (lossy default 0.01).",
)
@click.option(
    "--rank-group",
    type=click.IntRange(min=1),
    help="Rows per ranking group (e.g. items per user) for top-10 overlap and Spearman.",
)
@click.option(
    "--ort-opt-level",
    default="basic",
    show_default=True,
    type=click.Choice(["disable", "basic", "extended", "all"]),
    help="onnxruntime graph optimisation level for the parity runs.",
)
@click.option(
    "--external-data",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "always", "never"]),
    help="Write tensors to OUT.data: auto = when tensors still come from the input's external data or exceed 256 MiB.",
)
@click.option("--no-parity", is_flag=True, help="Skip the parity check (the report says it was not checked).")
@click.option("--force", is_flag=True, help="Write OUT even if parity fails (the report says so).")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Also write the report as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option(
    "--list-passes",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_list_passes,
    help="List the passes with their options, defaults and help, then exit.",
)
@click.option(
    "--list-layers",
    type=click.Path(path_type=Path),
    metavar="MODEL",
    help="List MODEL's removable layers (for distill.remove) with parameters, FLOPs and importance on --calib rows.",
)
def command(
    in_path: Path | None,
    out_path: Path | None,
    passes: str | None,
    preset: str | None,
    assignments: tuple[str, ...],
    recipe: Path | None,
    feeds: Path | None,
    calib: Path | None,
    labels: tuple[str, ...],
    calib_labels: Path | None,
    input_shapes: tuple[str, ...],
    rank_group: int | None,
    ort_opt_level: str,
    external_data: str,
    no_parity: bool,
    force: bool,
    report_path: Path | None,
    debug: bool,
    list_layers: Path | None,
    **tolerance_values: tuple[str, ...],
) -> None:
    """Compress the ONNX model IN into OUT, proving parity with onnxruntime before writing.

    \b
    Exit codes:
    """
    console = _console()
    if not debug:
        # numpy's arithmetic warnings (NaN or overflow met in a broken model's weights) are not
        # actionable lines of their own: the report and the parity gate say what happened.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"(numpy|onnxcompress)(\.|$)")
    try:
        if list_layers is not None:
            _list_layers(list_layers, calib)
            return
        if in_path is None or out_path is None:
            raise UsageError("give IN and OUT, e.g. onnxcompress model.onnx small.onnx --passes cleanup")
        label_files = _parse_labels(labels)
        if report_path is not None:
            inputs = {
                "the --config recipe": recipe,
                "the --feeds file": feeds,
                "the --calib file": calib,
                "the --calib-labels file": calib_labels,
            }
            inputs.update({f"the --labels file {path}": path for path in (label_files or {}).values()})
            _check_report_path(report_path, in_path, out_path, inputs)
        from onnxcompress.presets import get_preset
        from onnxcompress.recipe import read_recipe

        chosen = get_preset(preset) if preset is not None else None
        recipe_passes, recipe_options = read_recipe(recipe) if recipe is not None else (None, {})
        options = {name: dict(table) for name, table in (chosen.options if chosen else {}).items()}
        for name, table in recipe_options.items():
            options.setdefault(name, {}).update(table)
        pass_names = _split_passes(passes) or recipe_passes or (list(chosen.passes) if chosen else [])
        if not pass_names:
            raise UsageError("no passes given; use --passes (see --list-passes), --preset or a --config recipe")
        tolerances: dict[str, float] = {}
        per_output: dict[str, dict[str, float]] = {}
        for option in TOLERANCE_OPTIONS:
            overall, outputs = _parse_tolerances(option, tolerance_values[option])
            if overall is not None:
                tolerances[option] = overall
            for output, value in outputs.items():
                per_output.setdefault(output, {})[option] = value
        report = _run(
            console,
            in_path,
            out_path,
            pass_names,
            options=options,
            assignments=assignments,
            feeds=feeds,
            calib=calib,
            labels=label_files,
            calib_labels=calib_labels,
            input_shapes=_parse_shapes(input_shapes),
            tolerances=tolerances,
            output_tolerances=per_output,
            parity=not no_parity,
            force=force,
            opt_level=ort_opt_level,
            external_data=external_data,
            rank_group=rank_group,
        )
    except ParityFailedError as error:
        _show(console, error.report, report_path, debug)
        _fail(error, debug)
    except CompressError as error:
        _fail(error, debug)
    except InterruptedAfterWrite:
        _error(f"interrupted after {out_path} was written; it is complete")
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        _error("interrupted; nothing was written")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as error:
        if debug:
            traceback.print_exc()
        _error(f"internal error {type(error).__name__}: {error}; rerun with --debug and report it")
        sys.exit(EXIT_INTERNAL)
    try:
        _show(console, report, report_path, debug)
    except KeyboardInterrupt:  # OUT is in place: "nothing was written" would be false
        unfinished = "; the --report file was not written" if report_path and not report_path.exists() else ""
        _error(f"interrupted after {out_path} was written; it is complete{unfinished}")
        sys.exit(EXIT_INTERRUPTED)


def _show(console: Any, report: Any, report_path: Path | None, debug: bool) -> None:
    """Write the JSON report, then print the report: the file first, so that neither a broken
    stderr (a closed pipe, a full disk) nor a fault in rendering loses it. Neither changes what
    the exit code says about OUT (exit 1 means nothing was written)."""
    if report_path is not None:
        try:
            _write_report(report_path, report.to_json(), report.written)
        except OutputPathError as error:
            _fail(error, debug)
    from onnxcompress.render import report_view

    try:
        console.print(report_view(report))
    except OSError:
        _silence_stderr()  # nobody is reading it: the exit code still tells
    except Exception as error:
        if debug:
            traceback.print_exc()
        outcome = "OUT was written and is complete" if report.written else "nothing was written"
        _error(f"internal error {type(error).__name__} while printing the report ({error}); {outcome}")
        sys.exit(EXIT_INTERNAL)


def _silence_stderr() -> None:
    """Point stderr at /dev/null, so that later messages and the flush at exit do not fail too."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except OSError:
        pass
    sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - lives until exit


def _run(console: Any, *args: Any, **kwargs: Any) -> Any:
    from onnxcompress.api import compress

    if not console.is_terminal:
        return compress(*args, **kwargs)
    with console.status("starting") as status:
        return compress(*args, progress=lambda stage: status.update(stage), **kwargs)


def _error(message: str) -> None:
    """One unwrapped line on stderr, so scripts can grep it (a broken stderr loses only the line:
    the exit code that follows still tells)."""
    try:
        click.echo(f"{click.style('error:', fg='red', bold=True)} {' '.join(message.split())}", err=True)
    except (OSError, ValueError):  # closed, full, or a pipe nobody reads
        _silence_stderr()


def _fail(error: CompressError, debug: bool) -> None:
    # --debug adds the traceback and changes nothing else: scripts see the same exit code.
    if debug:
        traceback.print_exception(error)
    _error(str(error))
    sys.exit(error.exit_code)


command.help = (command.help or "") + "".join(
    f"\n  {code}  {meaning}" for code, meaning in [*sorted(EXIT_CODES.items()), (EXIT_INTERNAL, "internal error")]
)


def _repeated_option(args: Sequence[str]) -> str | None:
    """The first option that takes one value and is given twice (click would keep the last
    silently: ``--passes quant --passes prune`` ran prune alone)."""
    single = {
        name: param.opts[-1]
        for param in command.params
        if isinstance(param, click.Option) and not param.multiple and not param.is_flag
        for name in param.opts
    }
    seen: set[str] = set()
    for arg in args:
        if arg == "--":
            break
        option = single.get(arg.partition("=")[0] if arg.startswith("--") else arg)
        if option is None:
            continue
        if option in seen:
            return option
        seen.add(option)
    return None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: one-line usage errors, SIGTERM handled like Ctrl-C (nothing written)."""
    signal.signal(signal.SIGTERM, _interrupt)
    args = list(argv) if argv is not None else sys.argv[1:]
    repeated = _repeated_option(args)
    if repeated is not None:
        _error(f"{repeated} given twice; give it once (see onnxcompress --help)")
        sys.exit(2)
    try:
        _main(args)
    finally:
        if argv is None:
            # The work is done and the exit code chosen: a signal during the interpreter's
            # shutdown would otherwise kill the process with its own code (-2, no message).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _main(args: list[str]) -> None:
    try:
        code = command.main(args=args, prog_name="onnxcompress", standalone_mode=False)
        # Without standalone mode click returns, rather than raises, the code of an eager exit.
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.UsageError as error:
        _error(f"{error.format_message()} (see onnxcompress --help)")
        sys.exit(2)
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
    except (click.Abort, KeyboardInterrupt):
        _error("interrupted; nothing was written")
        sys.exit(EXIT_INTERRUPTED)
