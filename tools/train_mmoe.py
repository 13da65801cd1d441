"""Train a multi-task MMoE ranker on MovieLens-100k and export it to models/mmoe.* (TorchScript exporter, opset 17).

MMoE (Multi-gate Mixture-of-Experts, Ma et al., KDD 2018): one embedding table per sparse field (dim 16, as
``dlrm``), concatenated with the 25 dense features into a 137-wide input shared by three expert MLPs
(Linear 137-64, ReLU, Linear 64-32, ReLU). Each of the two tasks has its own softmax gate (Linear 137-3) that
mixes the three expert outputs into a 32-d vector, and its own tower (Linear 32-16, ReLU, Linear 16-1) followed by
a sigmoid:

- ``like`` = P(rating >= 4), the label every other model of the zoo predicts (``MovieLens.label``);
- ``love`` = P(rating == 5), from the same ratings, read in the row order of tools/movielens.py.

Both tasks train jointly on the sum of their BCE losses (Adam, the shared seeds and temporal split of
torch_common/movielens), with early stopping on the mean of the two validation AUCs. ``fit`` and ``publish`` in
torch_common handle one score and one label, so this script runs the same loop and writes the same files itself:
the calibration rows are drawn as ``publish`` draws them, and ``mmoe.labels.npy`` holds the ``like`` labels of the
test feeds and ``mmoe.love.labels.npy`` the ``love`` labels (``--labels love=models/mmoe.love.labels.npy``).

Inputs: ``dense`` float32 [batch, 25] and one int64 [batch] input per sparse field (``user``, ``item``,
``gender``, ``occupation``, ``age_bucket``, ``zip_region``, ``year_bucket``) -- the interface of ``dlrm``;
outputs ``like`` and ``love``, float32 [batch].

Rebuild from the repo root: ``python tools/train_mmoe.py``
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from movielens import DEFAULT_CACHE, DENSE_FIELDS, SPARSE_FIELDS, MovieLens, _data_files, load_movielens
from torch_common import (
    CALIB_ROWS,
    MAX_ABS_DIFF,
    MODELS_DIR,
    SEED,
    Feeds,
    TrainResult,
    _shape,
    _version,
    check_export,
    op_counts,
    record_training,
    rows,
    setup,
)

from onnxcompress.metrics import auc

NAME = "mmoe"
SCRIPT = "tools/train_mmoe.py"
OPSET = 17
MAX_ONNX_BYTES = 400_000
INPUT_NAMES = ("dense", *SPARSE_FIELDS)
TASKS = ("like", "love")  # graph output names, in output order; "like" is the score the labels file scores
TASK_LABELS = {"like": "rating >= 4", "love": "rating == 5"}
EMBED_DIM = 16
EMBEDDING_INIT_STD = 0.01  # as dlrm: ids never seen in training (most test users) stay near zero
EXPERTS = 3
EXPERT_HIDDEN = (64, 32)
TOWER_HIDDEN = 16
TRAINING = {"lr": 1e-3, "weight_decay": 1e-5, "batch_size": 512, "max_epochs": 10, "patience": 2}


def _expert(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(width, EXPERT_HIDDEN[0]), nn.ReLU(), nn.Linear(EXPERT_HIDDEN[0], EXPERT_HIDDEN[1]), nn.ReLU()
    )


def _tower() -> nn.Sequential:
    return nn.Sequential(nn.Linear(EXPERT_HIDDEN[-1], TOWER_HIDDEN), nn.ReLU(), nn.Linear(TOWER_HIDDEN, 1))


class MMoE(nn.Module):
    """Shared experts, one softmax gate and one tower per task; returns each task's probability."""

    def __init__(self, cardinalities: tuple[int, ...], n_dense: int) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(n, EMBED_DIM) for n in cardinalities)
        for table in self.embeddings:
            nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)
        width = len(cardinalities) * EMBED_DIM + n_dense
        self.experts = nn.ModuleList(_expert(width) for _ in range(EXPERTS))
        self.gates = nn.ModuleList(nn.Linear(width, EXPERTS) for _ in TASKS)
        self.towers = nn.ModuleList(_tower() for _ in TASKS)

    def forward(
        self,
        dense: torch.Tensor,
        user: torch.Tensor,
        item: torch.Tensor,
        gender: torch.Tensor,
        occupation: torch.Tensor,
        age_bucket: torch.Tensor,
        zip_region: torch.Tensor,
        year_bucket: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse = [user, item, gender, occupation, age_bucket, zip_region, year_bucket]
        embedded = [table(ids) for table, ids in zip(self.embeddings, sparse, strict=True)]
        x = torch.cat([*embedded, dense], dim=1)
        experts = torch.stack([expert(x) for expert in self.experts], dim=1)  # [batch, EXPERTS, 32]
        scores = []
        for gate, tower in zip(self.gates, self.towers, strict=True):
            weights = torch.softmax(gate(x), dim=1)  # [batch, EXPERTS]
            mixed = (weights.unsqueeze(2) * experts).sum(dim=1)  # [batch, 32]
            scores.append(torch.sigmoid(tower(mixed)).squeeze(1))
        like, love = scores
        return like, love


def feeds_of(data: MovieLens) -> Feeds:
    """The graph inputs of every row: the dense features and one id column per sparse field."""
    columns = {"dense": data.dense, **{field: data.sparse[:, k] for k, field in enumerate(SPARSE_FIELDS)}}
    return {name: np.ascontiguousarray(columns[name]) for name in INPUT_NAMES}


def x_width(data: MovieLens) -> int:
    """Width of the shared input of experts and gates: the concatenated embeddings and dense features."""
    return len(data.cardinalities) * EMBED_DIM + data.dense.shape[1]


def ratings(data: MovieLens) -> np.ndarray:
    """Every row's rating (1-5) in the row order of ``load_movielens`` (the same sort), checked against its
    labels."""
    import pyarrow.parquet as pq

    table = pq.read_table(_data_files(DEFAULT_CACHE)["data"])
    user, movie, rating, stamp = (
        np.asarray(table.column(c).to_pylist()) for c in ("user_id", "movie_id", "rating", "timestamp")
    )
    rating = rating[np.lexsort((movie, user, stamp))]
    if not np.array_equal((rating >= 4).astype(np.float32), data.label):
        raise RuntimeError("ratings are not in the row order of load_movielens")
    return rating


def _tensors(feeds: Feeds) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in feeds.items()}


@torch.no_grad()
def predict(model: nn.Module, feeds: Feeds, batch_size: int = 4096) -> dict[str, np.ndarray]:
    """Both tasks' scores of ``model`` in eval mode over all rows of ``feeds``."""
    model.eval()
    inputs = _tensors(feeds)
    n = len(next(iter(inputs.values())))
    parts = [model(**{k: v[i : i + batch_size] for k, v in inputs.items()}) for i in range(0, n, batch_size)]
    return {task: torch.cat([part[t] for part in parts]).numpy() for t, task in enumerate(TASKS)}


def fit(
    model: nn.Module,
    train: Feeds,
    train_labels: dict[str, np.ndarray],
    valid: Feeds,
    valid_labels: dict[str, np.ndarray],
    *,
    lr: float,
    weight_decay: float,
    batch_size: int,
    max_epochs: int,
    patience: int,
) -> tuple[TrainResult, dict[str, float]]:
    """torch_common.fit for two tasks: Adam on the sum of the tasks' BCE losses, keeping the weights of the best
    mean validation AUC; also returns each task's validation AUC at that epoch."""
    inputs = _tensors(train)
    targets = [torch.from_numpy(train_labels[task]) for task in TASKS]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.BCELoss()
    order_gen = torch.Generator().manual_seed(SEED)
    best_auc, best_epoch, best_state, best_tasks = -1.0, 0, None, {}
    start = time.perf_counter()
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        model.train()
        order = torch.randperm(len(targets[0]), generator=order_gen)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            optimizer.zero_grad()
            scores = model(**{k: v[idx] for k, v in inputs.items()})
            loss = sum((loss_fn(s, t[idx]) for s, t in zip(scores, targets, strict=True)), torch.tensor(0.0))
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        valid_scores = predict(model, valid)
        tasks = {task: auc(valid_labels[task], valid_scores[task]) for task in TASKS}
        mean_auc = float(np.mean(list(tasks.values())))
        print(
            f"epoch {epoch}: train loss {total / len(order):.4f}  valid AUC "
            + "  ".join(f"{task} {value:.4f}" for task, value in tasks.items()),
            flush=True,
        )
        if mean_auc > best_auc:
            best_auc, best_epoch, best_tasks = mean_auc, epoch, tasks
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= patience:
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(epoch, best_epoch, best_auc, time.perf_counter() - start), best_tasks


def export(model: nn.Module, example: Feeds, path: Path) -> None:
    """torch.onnx.export(dynamo=False) with both task outputs named and a dynamic batch axis everywhere."""
    tensors = _tensors(example)
    torch.onnx.export(
        model,
        tuple(tensors[n] for n in INPUT_NAMES),
        str(path),
        input_names=list(INPUT_NAMES),
        output_names=list(TASKS),
        dynamic_axes={n: {0: "batch"} for n in [*INPUT_NAMES, *TASKS]},
        opset_version=OPSET,
        dynamo=False,
    )


def main() -> None:
    setup()
    data = load_movielens()
    rating = ratings(data)
    labels = {"like": data.label, "love": (rating == 5).astype(np.float32)}
    feeds = feeds_of(data)
    model = MMoE(data.cardinalities, data.dense.shape[1])
    trained, valid_tasks = fit(
        model,
        rows(feeds, data.train),
        {task: label[data.train] for task, label in labels.items()},
        rows(feeds, data.valid),
        {task: label[data.valid] for task, label in labels.items()},
        **TRAINING,
    )
    print(f"trained in {trained.seconds:.1f}s", flush=True)

    # Export and check with onnxruntime, as torch_common.publish does for one score.
    MODELS_DIR.mkdir(exist_ok=True)
    onnx_path = MODELS_DIR / f"{NAME}.onnx"
    test = rows(feeds, data.test)
    export(model, rows(test, np.arange(2)), onnx_path)
    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    inputs = {v.name: v for v in proto.graph.input}
    assert list(inputs) == list(test), f"graph inputs {list(inputs)} != feeds {list(test)}"
    assert [v.name for v in proto.graph.output] == list(TASKS), [v.name for v in proto.graph.output]

    torch_scores = predict(model, test)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_scores = dict(zip(TASKS, session.run(list(TASKS), test), strict=True))
    test_labels = {task: label[data.test] for task, label in labels.items()}
    tasks: dict[str, dict[str, Any]] = {}
    for task in TASKS:
        ort_score, torch_score = ort_scores[task], torch_scores[task]
        assert ort_score.shape == torch_score.shape == (len(data.test),), (task, ort_score.shape, torch_score.shape)
        assert ort_score.dtype == np.float32, (task, ort_score.dtype)
        max_diff = float(np.abs(ort_score.astype(np.float64) - torch_score).max())
        assert max_diff <= MAX_ABS_DIFF, f"{task}: onnxruntime differs from PyTorch by {max_diff}"
        tasks[task] = {
            "label": TASK_LABELS[task],
            "test_positive_rate": float(test_labels[task].mean()),
            "valid_auc": valid_tasks[task],
            "test_auc_torch": auc(test_labels[task], torch_score),
            "test_auc_onnxruntime": auc(test_labels[task], ort_score),
            "max_abs_diff_torch_vs_onnxruntime": max_diff,
        }

    # The files publish writes: test feeds, CALIB_ROWS training rows drawn the same way, the test labels.
    calib_pool = rows(feeds, data.train)
    calib_index = np.sort(np.random.default_rng(SEED).choice(len(data.train), CALIB_ROWS, replace=False))
    files = {"onnx": onnx_path}
    for suffix, part in {"feeds": test, "calib": rows(calib_pool, calib_index)}.items():
        path = MODELS_DIR / f"{NAME}.{suffix}.npz"
        np.savez_compressed(path, **part)
        files[suffix] = path
    files["labels"] = MODELS_DIR / f"{NAME}.labels.npy"
    np.save(files["labels"], test_labels["like"].astype(np.float32))
    files["love_labels"] = MODELS_DIR / f"{NAME}.love.labels.npy"
    np.save(files["love_labels"], test_labels["love"].astype(np.float32))

    meta: dict[str, Any] = {
        "name": NAME,
        "architecture": f"MMoE: {len(SPARSE_FIELDS)} embedding tables (dim {EMBED_DIM}) + {len(DENSE_FIELDS)} dense "
        f"-> {EXPERTS} experts {x_width(data)}-{'-'.join(map(str, EXPERT_HIDDEN))} ReLU, {len(TASKS)} softmax gates "
        f"(Linear {x_width(data)}-{EXPERTS}), towers {EXPERT_HIDDEN[-1]}-{TOWER_HIDDEN}-1, sigmoid; outputs like "
        "= P(rating >= 4) (the labels and the AUC here) and love = P(rating == 5)",
        "layers": {
            "embedding_dim": EMBED_DIM,
            "embedding_rows": dict(zip(SPARSE_FIELDS, data.cardinalities, strict=True)),
            "experts": {"count": EXPERTS, "mlp": [x_width(data), *EXPERT_HIDDEN], "activation": "ReLU after each"},
            "gates": {task: [x_width(data), EXPERTS] for task in TASKS},
            "towers": {task: [EXPERT_HIDDEN[-1], TOWER_HIDDEN, 1] for task in TASKS},
        },
        "framework": {"name": "pytorch", "version": torch.__version__},
        "exporter": {
            "api": "torch.onnx.export",
            "mode": "torchscript",
            "dynamo": False,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxscript": _version("onnxscript"),
            "onnxruntime": ort.__version__,
        },
        "opset": OPSET,
        "parameters": sum(p.numel() for p in model.parameters()),
        "rows": {"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
        "feeds_rows": len(data.test),
        "calib_rows": CALIB_ROWS,
        "calib_source": f"{CALIB_ROWS} training rows drawn with numpy default_rng({SEED}), sorted",
        "training": {
            "optimizer": "Adam",
            "loss": " + ".join(f"BCE({task})" for task in TASKS),
            "epochs_run": trained.epochs,
            "best_epoch": trained.best_epoch,
            "valid_auc": trained.valid_auc,
            "seconds": round(trained.seconds, 1),
        },
        # The score output's (like's) figures under the keys every model's meta.json has; both tasks under "tasks".
        "test_auc_torch": tasks["like"]["test_auc_torch"],
        "test_auc_onnxruntime": tasks["like"]["test_auc_onnxruntime"],
        "max_abs_diff_torch_vs_onnxruntime": max(t["max_abs_diff_torch_vs_onnxruntime"] for t in tasks.values()),
        "tasks": tasks,
        "inputs": [{"name": n, "dtype": str(test[n].dtype), "shape": _shape(v)} for n, v in inputs.items()],
        "outputs": [{"name": v.name, "shape": _shape(v)} for v in proto.graph.output],
        "score_output": "like",
        "labels": {
            "like": f"models/{NAME}.labels.npy (float32 0/1, aligned with the feeds; the default --labels)",
            "love": f"models/{NAME}.love.labels.npy (give both: --labels models/{NAME}.labels.npy "
            f"--labels love=models/{NAME}.love.labels.npy)",
        },
        "seed": SEED,
        "rebuild": f"python {SCRIPT}",
        "files": {key: {"path": f"models/{p.name}", "bytes": p.stat().st_size} for key, p in files.items()},
    }
    check_export(NAME, proto, meta, OPSET, MAX_ONNX_BYTES)
    record_training(meta, TRAINING)
    meta["training"]["early_stopping"] = (
        f"mean validation AUC of {' and '.join(TASKS)}, patience {TRAINING['patience']}"
    )
    meta["op_types"] = op_counts(proto)
    (MODELS_DIR / f"{NAME}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps({k: meta[k] for k in ("parameters", "tasks", "training", "files")}, indent=2))
    print(f"{NAME}: op types {meta['op_types']}")


if __name__ == "__main__":
    main()
