"""Benchmark the prune pass on every model in models/: size, AUC, parity and onnxruntime speed.

For each model and each configuration (50/80/90% unstructured, 2:4, 25% and 50% of hidden units,
each with and without least-squares reconstruction, and 80% followed by the lossless ``sparse``
storage pass) it runs ``onnxcompress.compress(..., force=True)`` with the model's test feeds,
labels and calibration rows, then times the original and every output together: batch-1 latency
and batch-512 throughput of each output against the original, in interleaved rounds (rotated
order), medians, ``--threads`` intra-op threads at ORT_ENABLE_ALL.

    python tools/bench_prune.py --markdown docs/pruning_table.md --json prune.json

OPENBLAS_NUM_THREADS is set to 1 before numpy loads: the refit solves thousands of small systems,
which multi-threaded BLAS makes many times slower on a busy two-core machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from bench_lib import first_rows, load_feeds, make_session, time_sessions  # noqa: E402

from onnxcompress import compress  # noqa: E402
from onnxcompress.errors import CompressError  # noqa: E402
from onnxcompress.passes import PASSES  # noqa: E402
from onnxcompress.render import auc_change  # noqa: E402

CONFIGS: dict[str, tuple[str, list[str]]] = {
    "50%": ("prune", ["prune.sparsity=0.5"]),
    "80%": ("prune", ["prune.sparsity=0.8"]),
    "90%": ("prune", ["prune.sparsity=0.9"]),
    "2:4": ("prune", ["prune.structure=2:4"]),
    "units 25%": ("prune", ["prune.structure=neurons", "prune.sparsity=0.25"]),
    "units 50%": ("prune", ["prune.structure=neurons", "prune.sparsity=0.5"]),
}


def configurations() -> list[tuple[str, str, list[str]]]:
    """(label, passes, assignments): every configuration with and without reconstruction, then prune+sparse."""
    runs = []
    for label, (passes, sets) in CONFIGS.items():
        runs.append((f"{label} refit", passes, sets))
        runs.append(
            (
                f"{label} magnitude" if "units" not in label else f"{label} no refit",
                passes,
                [*sets, "prune.reconstruct=false"],
            )
        )
    # What a user runs: the lossless cleanup first, as the lossless preset sets it (its rewrites
    # alone, then with half the units gone).
    lossless = ["cleanup.gemm_rows=true"]
    runs.append(("cleanup alone", "cleanup", lossless))
    runs.append(("cleanup + units 50% refit", "cleanup,prune", [*lossless, *CONFIGS["units 50%"][1]]))
    # for serving large batches: DLRM's interaction field-major (faster at batch 512, slower on one row)
    large_batches = [*CONFIGS["units 50%"][1], "cleanup.dots_fields_major=true"]
    runs.append(("cleanup for large batches + units 50% refit", "cleanup,prune", large_batches))
    # the presets' last step: sums over stacked vectors folded into the layers reading them (MMoE)
    finished = [*CONFIGS["units 50%"][1], "cleanup@final.fold_sums=true"]
    runs.append(("cleanup + units 50% refit + final cleanup", "cleanup,prune,cleanup@final", finished))
    runs.append(("80% refit + sparse", "prune,sparse", ["prune.sparsity=0.8"]))
    if "quant" in PASSES:  # the saving that pruning adds to quantization, once zeros are stored as bits
        runs.append(("quant alone", "quant", []))
        runs.append(("80% refit + quant + sparse", "prune,quant,sparse", ["prune.sparsity=0.8"]))
        # tables too: where they hold most of the bytes, pruning only the layers barely shows on disk
        tables = "prune.op_types=MatMul,Gemm,Conv,Gather"
        runs.append(("80% with tables + quant + sparse", "prune,quant,sparse", ["prune.sparsity=0.8", tables]))
    return runs


def score_output(report: dict[str, Any]) -> dict[str, Any]:
    return next(o for o in report["parity"]["outputs"] if o.get("auc_reference") is not None)


def bench_model(
    name: str, folder: Path, threads: int, repeats: int, target: float, only: set[str] | None = None
) -> list[dict[str, Any]]:
    source = REPO / "models" / f"{name}.onnx"
    files = {kind: REPO / "models" / f"{name}.{kind}" for kind in ("feeds.npz", "labels.npy", "calib.npz")}
    rows: list[dict[str, Any]] = []
    outputs: dict[str, Path] = {}
    for label, passes, sets in configurations():
        if only and label not in only:
            continue
        out = folder / f"{name}-{len(outputs)}.onnx"
        started = time.perf_counter()
        try:
            report = json.loads(
                compress(
                    source,
                    out,
                    passes.split(","),
                    assignments=sets,
                    feeds=files["feeds.npz"],
                    labels=files["labels.npy"],
                    calib=files["calib.npz"],
                    force=True,
                ).to_json()
            )
        except CompressError as error:
            rows.append({"model": name, "config": label, "error": str(error)})
            continue
        stats = next((run["stats"] for run in report["passes"] if run["name"] == "prune"), report["passes"][0]["stats"])
        score = score_output(report)
        rows.append(
            {
                "model": name,
                "config": label,
                "bytes_in": report["input_bytes"],
                "bytes_out": report["output_bytes"],
                "sparsity": stats.get("sparsity"),
                "units_removed": stats.get("units_removed"),
                "layers_pruned": stats.get("layers_pruned"),
                "auc_reference": score["auc_reference"],
                "auc_delta": score["auc_candidate"] - score["auc_reference"],
                "auc_delta_se": score["auc_delta_error"],
                "cosine": score["cosine"],
                "spearman": score["spearman"],
                "parity": report["verdict"],
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
        outputs[label] = out
    feeds = load_feeds(files["feeds.npz"])
    feed_sets = {"b1": first_rows(feeds, 1), "b512": first_rows(feeds, 512)}
    # The original timed against itself states the noise floor of this machine for this model.
    rows.insert(
        0,
        {
            "model": name,
            "config": "original vs itself",
            "bytes_in": source.stat().st_size,
            "bytes_out": source.stat().st_size,
            "sparsity": 0.0,
            "units_removed": None,
            "auc_delta": 0.0,
            "cosine": 1.0,
            "spearman": 1.0,
            "parity": "passed",
        },
    )
    outputs["original vs itself"] = source
    for row in rows:
        if row["config"] not in outputs:
            continue
        # Two fresh sessions at a time: with a dozen sessions alive, idle onnxruntime thread
        # pools spinning on a two-core machine skewed the figures several-fold.
        sessions = {
            "original": make_session(source, threads),
            "candidate": make_session(outputs[row["config"]], threads),
        }
        samples = time_sessions(sessions, feed_sets, repeats, target)
        median = {key: statistics.median(values) for key, values in samples.items()}
        row["latency_b1_ratio"] = median[("candidate", "b1")] / median[("original", "b1")]
        row["throughput_b512_ratio"] = median[("original", "b512")] / median[("candidate", "b512")]
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | config | size | size ratio | sparsity / units | ΔAUC | cosine | spearman | parity (default budget) "
        "| batch-1 latency | batch-512 throughput |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['config']} | error: {row['error']} |||||||||")
            continue
        if row["sparsity"] is not None:
            amount = f"{row['sparsity']:.3f}"
        elif row["units_removed"] is not None:
            amount = f"{row['units_removed']} units removed"
        else:
            amount = "—"
        verdict = "pass" if row["parity"] == "passed" else "fail"
        change = auc_change(row["auc_delta"], row.get("auc_delta_se"))
        lines.append(
            f"| {row['model']} | {row['config']} | {row['bytes_out'] / 1024:.1f} KB | "
            f"{row['bytes_in'] / row['bytes_out']:.2f}x | {amount} | {change} | {row['cosine']:.4f} | "
            f"{row['spearman']:.4f} | {verdict} | {row['latency_b1_ratio']:.2f}x | "
            f"{row['throughput_b512_ratio']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="model names (default: every models/*.onnx with calib rows)")
    # One thread: on a shared 2-core machine two threads measured the same shapes 1.6x and 2.8x apart.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds (medians)")
    parser.add_argument("--target", type=float, default=0.1, help="seconds per timing sample")
    parser.add_argument("--only", nargs="*", help="configuration labels to run (default: all)")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    names = args.models or sorted(p.name[: -len(".calib.npz")] for p in (REPO / "models").glob("*.calib.npz"))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows += bench_model(name, Path(folder), args.threads, args.repeats, args.target, set(args.only or ()))
    table = markdown(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
