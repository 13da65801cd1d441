"""Wall time and peak RSS of onnxcompress on a generated multi-gigabyte DLRM, beside the I/O floor.

Each command runs under ``/usr/bin/time -v`` (peak RSS as the kernel reports it, file-backed pages
included), interleaved over repeats, and the medians are reported side by side:

    python tools/bench_large.py --workdir /tmp/onnxcompress-large --repeats 3 --preset int8 --preset int4

The floor is ``onnx.load`` + ``onnx.save`` of the same model (with external data), which is what
any tool that reads and rewrites the model must at least pay.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_synthetic_dlrm import SyntheticSpec, make_synthetic_dlrm

QUANTIZE_DYNAMIC = """
import sys
from onnxruntime.quantization import quantize_dynamic
quantize_dynamic(sys.argv[1], sys.argv[2], use_external_data_format=True)
"""

FLOOR = """
import sys, onnx
model = onnx.load(sys.argv[1])
onnx.save_model(model, sys.argv[2], save_as_external_data=True, location=sys.argv[2].split('/')[-1] + '.data')
"""


def timed(argv: list[str]) -> tuple[float, float]:
    """Run ``argv`` under /usr/bin/time -v; return (wall seconds, peak RSS in MiB)."""
    process = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, check=False)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{process.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", process.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", process.stderr)
    assert wall and rss
    seconds = 0.0
    for part in wall.group(1).split(":"):
        seconds = seconds * 60 + float(part)
    return seconds, int(rss.group(1)) / 1024


def pipeline_commands(
    model: Path, out_dir: Path, passes: list[str], presets: list[str]
) -> dict[str, tuple[list[str], Path]]:
    """onnxcompress command lines and their output paths by label: ``PASSES[:PASS.FIELD=VALUE,...]``
    specs and preset names."""
    options: dict[str, tuple[list[str], str]] = {}
    for index, spec in enumerate(passes):
        label, _, settings = spec.partition(":")
        extra = [item for setting in settings.split(",") if setting for item in ("--set", setting)]
        title = f"onnxcompress --passes {label}" + (f" ({settings})" if settings else "")
        options[title] = (["--passes", label, *extra], f"p{index}.onnx")
    for preset in presets:
        options[f"onnxcompress --preset {preset}"] = (["--preset", preset], f"{preset}.onnx")
    return {
        # --force: timed whether or not parity passes; the verdict is read from the report
        label: (
            [sys.executable, "-m", "onnxcompress", str(model), str(out_dir / name), *argv, "--force"],
            out_dir / name,
        )
        for label, (argv, name) in options.items()
    }


def scale_run(
    workdir: Path,
    spec: SyntheticSpec,
    *,
    passes: list[str],
    presets: list[str],
    repeats: int,
    quantize_dynamic: bool = True,
) -> tuple[str, list[dict[str, object]]]:
    """Generate (once) the model of ``spec`` under ``workdir``, time every command ``repeats``
    times interleaved, and return a markdown table with the medians and the rows behind it."""
    model_dir = workdir / (
        "model" if spec == SyntheticSpec() else f"model-{len(spec.table_rows)}x{max(spec.table_rows)}"
    )
    model = model_dir / "dlrm_large.onnx"
    if not model.exists():
        make_synthetic_dlrm(model_dir, spec)
    size = model.stat().st_size + model.with_name(model.name + ".data").stat().st_size
    out_dir = workdir / "out"
    out_dir.mkdir(parents=True, exist_ok=True)

    commands: dict[str, list[str]] = {
        "onnx.load + onnx.save (floor)": [sys.executable, "-c", FLOOR, str(model), str(out_dir / "floor.onnx")],
    }
    if quantize_dynamic:
        commands["onnxruntime quantize_dynamic"] = [
            sys.executable,
            "-c",
            QUANTIZE_DYNAMIC,
            str(model),
            str(out_dir / "ort_dynamic.onnx"),
        ]
    ours = pipeline_commands(model, out_dir, passes, presets)
    commands.update({label: argv for label, (argv, _) in ours.items()})
    results: dict[str, list[tuple[float, float]]] = {label: [] for label in commands}
    ratios: dict[str, float] = {}
    for _ in range(repeats):
        for label, argv in commands.items():
            results[label].append(timed(argv))
            if label in ours:
                output = ours[label][1]
                data = output.with_name(output.name + ".data")
                ratios[label] = size / (output.stat().st_size + (data.stat().st_size if data.exists() else 0))

    floor_wall = statistics.median(wall for wall, _ in results["onnx.load + onnx.save (floor)"])
    dynamic_wall = statistics.median(wall for wall, _ in results.get("onnxruntime quantize_dynamic", [(0.0, 0.0)]))
    dynamic_rss = statistics.median(rss for _, rss in results.get("onnxruntime quantize_dynamic", [(0.0, 0.0)]))
    largest = max(spec.table_rows)
    lines = [
        f"Model: {size / 1e9:.2f} GB, {len(spec.table_rows)} tables x {spec.dim} (largest {largest:,} rows, "
        f"{sum(rows >= 1_000_000 for rows in spec.table_rows)} of 1M+), external data; {repeats} interleaved "
        "repeats, medians; wall time and peak RSS from `/usr/bin/time -v`, parity check included.",
        "",
        "| command | wall s | vs floor | quantize_dynamic / ours | peak RSS MiB | RSS / model size "
        "| quantize_dynamic RSS / ours | size ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows: list[dict[str, object]] = []
    for label, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        rss = statistics.median(r for _, r in runs)
        rows.append(
            {
                "command": label,
                "wall_s": wall,
                "peak_rss_mib": rss,
                "model_bytes": size,
                "size_ratio": ratios.get(label),
            }
        )
        versus = f"{dynamic_wall / wall:.2f}x" if dynamic_wall and label in ours else ""
        versus_rss = f"{dynamic_rss / rss:.1f}x" if dynamic_rss and label in ours else ""
        ratio = f"{ratios[label]:.2f}x" if label in ratios else ""
        lines.append(
            f"| {label} | {wall:.2f} | {wall / floor_wall:.2f}x | {versus} | {rss:.0f} | "
            f"{rss * 2**20 / size:.2f} | {versus_rss} | {ratio} |"
        )
    shutil.rmtree(out_dir, ignore_errors=True)
    return "\n".join(lines), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnxcompress-large"))
    parser.add_argument("--tables", type=int, help="this many equal tables of --rows rows (default: Criteo-like)")
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--passes",
        nargs="*",
        default=["cleanup", "quant", "quant:quant.embedding_bits=4", "prune"],
        help="pipelines to time, each PASSES[:PASS.FIELD=VALUE,...], e.g. quant:quant.embedding_bits=4",
    )
    parser.add_argument("--preset", action="append", default=[], help="also time this preset (repeatable)")
    parser.add_argument(
        "--quantize-dynamic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time onnxruntime's quantize_dynamic on the same model",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    spec = SyntheticSpec.uniform(args.tables, args.rows) if args.tables else SyntheticSpec()
    text, rows = scale_run(
        args.workdir,
        spec,
        passes=args.passes,
        presets=args.preset,
        repeats=args.repeats,
        quantize_dynamic=args.quantize_dynamic,
    )
    print(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
