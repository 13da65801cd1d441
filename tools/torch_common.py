"""Shared training and export helpers for the PyTorch model scripts in tools/ (train_*.py).

Every script seeds with ``setup``, trains with ``fit`` (Adam + BCE, early stopping on the
validation AUC) and writes its artifacts with ``publish``: the ONNX file, test feeds and labels,
calibration feeds and a provenance ``meta.json``, after checking the export against PyTorch
with onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from movielens import load_movielens
from torch import nn

from onnxcompress.metrics import auc

__all__ = [
    "MODELS_DIR",
    "SEED",
    "Feeds",
    "TrainResult",
    "check_export",
    "fit",
    "op_counts",
    "predict",
    "publish",
    "record_training",
    "rows",
    "setup",
    "train_and_build",
]

SEED = 20240
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
CALIB_ROWS = 512
# One intra-op thread: these models' ops are small, and with two threads training ran ~7x slower on a
# 2-core machine shared with other jobs (OpenMP workers spin waiting for a busy core). A fixed count
# also keeps the floating-point reduction order, and so the trained weights, reproducible.
TORCH_THREADS = 1
MAX_ABS_DIFF = 1e-5

Feeds = dict[str, np.ndarray]


def setup(seed: int = SEED) -> None:
    """Seed every generator, fix the thread count and use deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(TORCH_THREADS)
    torch.use_deterministic_algorithms(True)


def rows(feeds: Feeds, index: np.ndarray) -> Feeds:
    """The same rows of every feed."""
    return {name: value[index] for name, value in feeds.items()}


def _tensors(feeds: Feeds) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in feeds.items()}


@torch.no_grad()
def predict(model: nn.Module, feeds: Feeds, batch_size: int = 4096) -> np.ndarray:
    """Scores of ``model`` in eval mode over all rows of ``feeds``."""
    model.eval()
    inputs = _tensors(feeds)
    n = len(next(iter(inputs.values())))
    parts = [model(**{k: v[i : i + batch_size] for k, v in inputs.items()}) for i in range(0, n, batch_size)]
    return torch.cat(parts).numpy()


@dataclass(frozen=True)
class TrainResult:
    epochs: int
    best_epoch: int
    valid_auc: float
    seconds: float


def fit(
    model: nn.Module,
    train: Feeds,
    train_label: np.ndarray,
    valid: Feeds,
    valid_label: np.ndarray,
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 512,
    max_epochs: int = 10,
    patience: int = 2,
) -> TrainResult:
    """Adam + BCE on the model's sigmoid scores; keeps the weights of the best validation AUC."""
    inputs, target = _tensors(train), torch.from_numpy(train_label)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.BCELoss()
    order_gen = torch.Generator().manual_seed(SEED)
    best_auc, best_epoch, best_state = -1.0, 0, None
    start = time.perf_counter()
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        model.train()
        order = torch.randperm(len(target), generator=order_gen)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(**{k: v[idx] for k, v in inputs.items()}), target[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        valid_auc = auc(valid_label, predict(model, valid))
        print(f"epoch {epoch}: train loss {total / len(order):.4f}  valid AUC {valid_auc:.4f}", flush=True)
        if valid_auc > best_auc:
            best_auc, best_epoch = valid_auc, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= patience:
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(epoch, best_epoch, best_auc, time.perf_counter() - start)


def _export(model: nn.Module, example: Feeds, path: Path, mode: Literal["torchscript", "dynamo"], opset: int) -> None:
    names = list(example)
    tensors = _tensors(example)
    if mode == "torchscript":
        torch.onnx.export(
            model, tuple(tensors[n] for n in names), str(path), input_names=names, output_names=["score"],
            dynamic_axes={n: {0: "batch"} for n in [*names, "score"]}, opset_version=opset, dynamo=False,
        )
    else:
        batch = torch.export.Dim("batch", min=1)
        program = torch.onnx.export(
            model, (), kwargs=tensors, input_names=names, output_names=["score"],
            dynamic_shapes={n: {0: batch} for n in names}, opset_version=opset, dynamo=True,
        )
        assert program is not None
        program.save(str(path), external_data=False)


def _shape(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def publish(
    name: str,
    model: nn.Module,
    *,
    architecture: str,
    layers: dict[str, Any],
    mode: Literal["torchscript", "dynamo"],
    opset: int,
    test: Feeds,
    test_label: np.ndarray,
    calib_pool: Feeds,
    split_rows: dict[str, int],
    trained: TrainResult,
    script: str,
    extra_feeds: dict[str, Feeds] | None = None,
    notes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export ``model`` to models/NAME.onnx, check it with onnxruntime and write feeds and meta.

    ``test`` holds the test split keyed by graph input name; ``calib_pool`` the training split, of which
    CALIB_ROWS rows drawn with a fixed seed become the calibration feeds; ``extra_feeds`` maps a file
    suffix (``rank`` -> NAME.rank.npz) to further feeds written the same way.
    """
    MODELS_DIR.mkdir(exist_ok=True)
    onnx_path = MODELS_DIR / f"{name}.onnx"
    _export(model, rows(test, np.arange(2)), onnx_path, mode, opset)
    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    inputs = {v.name: v for v in proto.graph.input}
    assert list(inputs) == list(test), f"graph inputs {list(inputs)} != feeds {list(test)}"

    torch_score = predict(model, test)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_score = session.run(["score"], test)[0]
    assert ort_score.shape == torch_score.shape, (ort_score.shape, torch_score.shape)
    max_diff = float(np.abs(ort_score.astype(np.float64) - torch_score).max())
    assert max_diff <= MAX_ABS_DIFF, f"onnxruntime differs from PyTorch by {max_diff}"
    torch_auc, ort_auc = auc(test_label, torch_score), auc(test_label, ort_score)

    calib_index = np.sort(np.random.default_rng(SEED).choice(len(next(iter(calib_pool.values()))), CALIB_ROWS,
                                                             replace=False))
    files = {"onnx": onnx_path}
    for suffix, feeds in {"feeds": test, "calib": rows(calib_pool, calib_index), **(extra_feeds or {})}.items():
        path = MODELS_DIR / f"{name}.{suffix}.npz"
        np.savez_compressed(path, **feeds)
        files[suffix] = path
    files["labels"] = MODELS_DIR / f"{name}.labels.npy"
    np.save(files["labels"], test_label.astype(np.float32))

    meta = {
        "name": name,
        "architecture": architecture,
        "layers": layers,
        "framework": {"name": "pytorch", "version": torch.__version__},
        "exporter": {
            "api": "torch.onnx.export",
            "mode": mode,
            "dynamo": mode == "dynamo",
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxscript": _version("onnxscript"),
            "onnxruntime": ort.__version__,
        },
        "opset": opset,
        "parameters": sum(p.numel() for p in model.parameters()),
        "rows": split_rows,
        "feeds_rows": len(test_label),
        "calib_rows": CALIB_ROWS,
        "calib_source": f"{CALIB_ROWS} training rows drawn with numpy default_rng({SEED}), sorted",
        "training": {
            "optimizer": "Adam",
            "loss": "BCE",
            "epochs_run": trained.epochs,
            "best_epoch": trained.best_epoch,
            "valid_auc": trained.valid_auc,
            "seconds": round(trained.seconds, 1),
        },
        "test_auc_torch": torch_auc,
        "test_auc_onnxruntime": ort_auc,
        "max_abs_diff_torch_vs_onnxruntime": max_diff,
        "inputs": [
            {"name": n, "dtype": str(test[n].dtype), "shape": _shape(v)} for n, v in inputs.items()
        ],
        "outputs": [{"name": v.name, "shape": _shape(v)} for v in proto.graph.output],
        "score_output": "score",
        "seed": SEED,
        "rebuild": f"python {script}",
        "files": {key: {"path": f"models/{p.name}", "bytes": p.stat().st_size} for key, p in files.items()},
        **(notes or {}),
    }
    (MODELS_DIR / f"{name}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps({k: meta[k] for k in ("parameters", "test_auc_torch", "test_auc_onnxruntime",
                                           "max_abs_diff_torch_vs_onnxruntime", "training", "files")}, indent=2))
    return meta


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    """Nodes per op type of the main graph, by name."""
    return dict(sorted(Counter(node.op_type for node in proto.graph.node).items()))


def check_export(name: str, proto: onnx.ModelProto, meta: dict[str, Any], opset: int, max_bytes: int) -> None:
    """Fail unless the exported file has the expected opset and stays under ``max_bytes``."""
    if (file_opset := next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))) != opset:
        raise RuntimeError(f"{name}: exported with opset {file_opset}, expected {opset}")
    if (size := meta["files"]["onnx"]["bytes"]) > max_bytes:
        raise RuntimeError(f"{name}.onnx is {size} bytes, over {max_bytes}")


def record_training(meta: dict[str, Any], training: dict[str, Any]) -> None:
    """The training settings in meta.json instead of the wall-clock time, so that a rebuild gives a
    byte-identical file."""
    meta["training"].pop("seconds")
    meta["training"] |= {k: v for k, v in training.items() if k != "patience"}
    meta["training"]["early_stopping"] = f"validation AUC, patience {training['patience']}"


def train_and_build(
    description: str,
    exports: list[str],
    make_model: Callable[[Any], nn.Module],
    make_feeds: Callable[[Any], Feeds],
    training: dict[str, Any],
    build: Callable[[str, nn.Module, TrainResult, Any, Feeds], Any],
) -> None:
    """The command line of a script that trains one model on MovieLens and exports it several ways:
    ``--model NAME`` (repeatable) builds only those exports, each from the same trained weights."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", action="append", choices=sorted(exports), help="build only this model (repeatable)")
    names = parser.parse_args().model or list(exports)
    setup()
    data = load_movielens()
    feeds = make_feeds(data)
    model = make_model(data)
    trained = fit(
        model,
        rows(feeds, data.train),
        data.label[data.train],
        rows(feeds, data.valid),
        data.label[data.valid],
        **training,
    )
    print(f"trained in {trained.seconds:.1f}s", flush=True)
    for name in names:
        build(name, model, trained, data, feeds)
