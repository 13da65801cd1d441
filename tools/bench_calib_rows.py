"""Which calibration rows the prune refit needs: training-period rows against later rows, 512 against 4,096.

The test split (10,000 rows, the newest 10% of ratings) is shuffled with a fixed seed and cut in two:
rows 5,000 on are the evaluation rows (AUC delta and Spearman against the original), the first 512
or 4,096 the calibration rows. The shipped ``NAME.calib.npz`` (512 training rows) is the baseline.
This is a measurement of the refit's data needs only: calibrating on test-period rows is not how the
published figures are made.

    python tools/bench_calib_rows.py deepfm keras_wide_deep two_tower deepfm_student
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from onnxcompress import compress

MODELS = Path(__file__).resolve().parents[1] / "models"
CONFIGS = {
    "50%": ["prune.sparsity=0.5"],
    "80%": ["prune.sparsity=0.8"],
    "2:4": ["prune.structure=2:4"],
    "units 50%": ["prune.structure=neurons", "prune.sparsity=0.5"],
}


def compare(name: str, folder: Path) -> list[str]:
    feeds = dict(np.load(MODELS / f"{name}.feeds.npz"))
    labels = np.load(MODELS / f"{name}.labels.npy")
    order = np.random.default_rng(1).permutation(len(labels))
    evaluation = np.sort(order[5000:])
    np.savez(folder / "eval.npz", **{key: value[evaluation] for key, value in feeds.items()})
    np.save(folder / "eval_labels.npy", labels[evaluation])
    calibrations = {"train": MODELS / f"{name}.calib.npz"}
    for rows in (512, 4096):
        path = folder / f"calib{rows}.npz"
        np.savez(path, **{key: value[np.sort(order[:rows])] for key, value in feeds.items()})
        calibrations[f"test{rows}"] = path
    lines = []
    for label, sets in CONFIGS.items():
        cells = []
        for calib in calibrations.values():
            report = json.loads(
                compress(
                    MODELS / f"{name}.onnx",
                    folder / "out.onnx",
                    ["prune"],
                    assignments=sets,
                    feeds=folder / "eval.npz",
                    labels=folder / "eval_labels.npy",
                    calib=calib,
                    force=True,
                ).to_json()
            )
            score = next(o for o in report["parity"]["outputs"] if o.get("auc_reference") is not None)
            delta = score["auc_candidate"] - score["auc_reference"]
            cells.append(f"{delta:+.4f} / {score['spearman']:.4f}")
        lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    names = sys.argv[1:] or ["deepfm", "keras_wide_deep", "two_tower", "deepfm_student"]
    print("| model | config | 512 training rows | 512 test-period rows | 4,096 test-period rows |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            for line in compare(name, Path(folder)):
                print(line, flush=True)


if __name__ == "__main__":
    main()
