"""Train DLRM-style rankers on MovieLens-100k and export them to ONNX with their test data.

Builds three models in ``models/`` (each as NAME.onnx, NAME.feeds.npz, NAME.labels.npy,
NAME.calib.npz and NAME.meta.json):

- ``dlrm``: embeddings of dim 16, bottom MLP 25-64-32-16, pairwise dot interaction, top MLP
  44-128-64-1, exported with the TorchScript exporter (opset 17).
- ``dlrm_dynamo``: the same trained weights as ``dlrm``, exported with the dynamo exporter (opset 18).
- ``dlrm_wide``: embeddings of dim 64, bottom MLP 25-512-256-64 with a LayerNorm, top MLP
  92-1024-1024-512-256-1 with BatchNorm1d, exported with the TorchScript exporter (opset 17).

Every graph takes ``dense`` (float32 [batch, 25]) and one int64 [batch] input per sparse field,
and returns ``score`` (float32 [batch], the probability that the rating is >= 4).
Training is deterministic (fixed seeds, deterministic algorithms, 2 threads).

Rebuild all three from the repository root with::

    python tools/train_dlrm.py

or only some with ``--model NAME`` (repeatable); ``dlrm_dynamo`` retrains the ``dlrm`` weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxscript
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from movielens import DENSE_FIELDS, SPARSE_FIELDS, MovieLens, load_movielens

from onnxcompress.metrics import auc

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
SEED = 20240611
N_CALIB = 512
MAX_ABS_DIFF = 1e-5
MAX_WIDE_BYTES = 9_000_000
EMBEDDING_INIT_STD = 0.01
INPUT_NAMES = ("dense", *SPARSE_FIELDS)


@dataclass(frozen=True)
class Config:
    """Layer sizes and training settings of one trained network."""

    embedding_dim: int
    bottom: tuple[int, ...]  # hidden and output sizes after the dense input; the last equals embedding_dim
    top: tuple[int, ...]  # hidden sizes of the top MLP; a final Linear to 1 follows
    normalize: bool  # LayerNorm in the bottom MLP and BatchNorm1d in the top MLP
    batch_size: int
    lr: float
    max_epochs: int = 10
    patience: int = 2


CONFIGS = {
    "dlrm": Config(embedding_dim=16, bottom=(64, 32, 16), top=(128, 64), normalize=False, batch_size=512, lr=1e-3),
    "dlrm_wide": Config(
        embedding_dim=64, bottom=(512, 256, 64), top=(1024, 1024, 512, 256), normalize=True, batch_size=1024, lr=5e-4
    ),
}
# Model name -> (trained network, exporter mode, opset).
EXPORTS = {
    "dlrm": ("dlrm", "torchscript", 17),
    "dlrm_dynamo": ("dlrm", "dynamo", 18),
    "dlrm_wide": ("dlrm_wide", "torchscript", 17),
}


class DLRM(nn.Module):
    """DLRM: per-field embeddings, bottom MLP on dense features, pairwise dot interaction, top MLP."""

    def __init__(self, cardinalities: tuple[int, ...], config: Config) -> None:
        super().__init__()
        dim = config.embedding_dim
        if config.bottom[-1] != dim:
            raise ValueError("the bottom MLP must end at the embedding dimension")
        self.embeddings = nn.ModuleList(nn.Embedding(n, dim) for n in cardinalities)
        for table in self.embeddings:  # small init: ids never seen in training (most test users) stay near zero
            nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)
        bottom: list[nn.Module] = []
        width = len(DENSE_FIELDS)
        for i, size in enumerate(config.bottom):
            bottom += [nn.Linear(width, size), nn.ReLU()]
            if config.normalize and i == 0:
                bottom.insert(-1, nn.LayerNorm(size))
            width = size
        self.bottom = nn.Sequential(*bottom)
        n_vectors = len(cardinalities) + 1
        rows, cols = torch.triu_indices(n_vectors, n_vectors, offset=1)
        self.register_buffer("pairs", rows * n_vectors + cols, persistent=False)
        top: list[nn.Module] = []
        width = dim + len(self.pairs)
        for size in config.top:
            top.append(nn.Linear(width, size))
            if config.normalize:
                top.append(nn.BatchNorm1d(size))
            top.append(nn.ReLU())
            width = size
        top.append(nn.Linear(width, 1))
        self.top = nn.Sequential(*top)

    def logit(self, dense: torch.Tensor, sparse: list[torch.Tensor]) -> torch.Tensor:
        bottom = self.bottom(dense)
        embedded = [table(ids) for table, ids in zip(self.embeddings, sparse, strict=True)]
        vectors = torch.stack([bottom, *embedded], dim=1)
        dots = torch.bmm(vectors, vectors.transpose(1, 2)).flatten(1)
        features = torch.cat([bottom, dots.index_select(1, self.pairs)], dim=1)
        return self.top(features).squeeze(1)

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
    ) -> torch.Tensor:
        sparse = [user, item, gender, occupation, age_bucket, zip_region, year_bucket]
        return torch.sigmoid(self.logit(dense, sparse))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


#: A model's ``logit`` arguments: tensors, or lists of tensors (one per sparse field).
Inputs = tuple[torch.Tensor | list[torch.Tensor], ...]


def tensors(data: MovieLens, rows: np.ndarray) -> Inputs:
    sparse = torch.from_numpy(data.sparse[rows])
    return torch.from_numpy(data.dense[rows]), [sparse[:, k].contiguous() for k in range(len(SPARSE_FIELDS))]


def _take(inputs: Inputs, batch: torch.Tensor) -> Inputs:
    return tuple([part[batch] for part in item] if isinstance(item, list) else item[batch] for item in inputs)


def flat(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """The arguments of ``forward`` (every sparse field its own graph input)."""
    return tuple(tensor for item in inputs for tensor in (item if isinstance(item, list) else [item]))


@torch.no_grad()
def predict(model: nn.Module, inputs: Inputs) -> np.ndarray:
    model.eval()
    return model(*flat(inputs)).numpy()


def train(
    data: MovieLens, config: Config, make_model: Callable[[], nn.Module], inputs: Callable[[np.ndarray], Inputs]
) -> tuple[nn.Module, dict[str, float | int]]:
    """Adam + BCE with early stopping on validation AUC; returns the best model and a summary."""
    seed_everything(SEED)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(SEED)
    train_inputs = inputs(data.train)
    label = torch.from_numpy(data.label[data.train])
    best_auc, best_epoch, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    start = time.perf_counter()
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        order = torch.randperm(len(label), generator=generator)
        total = 0.0
        for batch in order.split(config.batch_size):
            optimizer.zero_grad()
            loss = loss_fn(model.logit(*_take(train_inputs, batch)), label[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        valid_auc = auc(data.label[data.valid], predict(model, inputs(data.valid)))
        print(f"  epoch {epoch}: train loss {total / len(label):.4f}  valid AUC {valid_auc:.4f}")
        if valid_auc > best_auc:
            best_auc, best_epoch, best_state = valid_auc, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= config.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    summary = {
        "epochs_run": epoch,
        "best_epoch": best_epoch,
        "valid_auc": best_auc,
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    return model, summary


def export(
    model: nn.Module, mode: str, opset: int, path: Path, args: Inputs, names: tuple[str, ...] = INPUT_NAMES
) -> None:
    """Export ``model`` called on ``args`` with a dynamic batch axis on every input and the score."""
    args = flat(args)
    if mode == "torchscript":
        batch_axes = {name: {0: "batch"} for name in (*names, "score")}
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(names),
            output_names=["score"],
            dynamic_axes=batch_axes,
        )
    else:
        batch = torch.export.Dim("batch")
        shapes = {name: {0: batch} for name in names}
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=shapes,
            output_names=["score"],
            external_data=False,
        )


def graph_io(model: onnx.ModelProto) -> tuple[list[dict[str, object]], list[str]]:
    inputs = []
    for value in model.graph.input:
        tensor_type = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
        inputs.append(
            {
                "name": value.name,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name,
                "shape": shape,
            }
        )
    return inputs, [value.name for value in model.graph.output]


def onnxruntime_scores(name: str, paths: dict[str, Path], torch_score: np.ndarray) -> tuple[np.ndarray, float]:
    """onnxruntime's scores on the written test feeds and their largest difference from PyTorch's."""
    session = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    ort_score = session.run(["score"], dict(np.load(paths["feeds.npz"])))[0]
    if ort_score.shape != torch_score.shape or ort_score.dtype != np.float32:
        raise RuntimeError(f"{name}: score is {ort_score.dtype}{ort_score.shape}, expected float32{torch_score.shape}")
    max_abs_diff = float(np.abs(ort_score - torch_score).max())
    assert max_abs_diff <= MAX_ABS_DIFF, f"{name}: onnxruntime differs from PyTorch by {max_abs_diff}"
    return ort_score, max_abs_diff


def run_meta(
    *,
    name: str,
    script: str,
    proto: onnx.ModelProto,
    model: nn.Module,
    trained_as: str,
    config: Config,
    summary: dict[str, float | int],
    data: MovieLens,
    scores: tuple[np.ndarray, np.ndarray, np.ndarray, float],
    interface: tuple[list[dict[str, object]], list[str]],
    paths: dict[str, Path],
) -> dict[str, object]:
    """The meta.json fields every DLRM export shares: versions, training, test scores, files."""
    labels, torch_score, ort_score, max_abs_diff = scores
    inputs, outputs = interface
    return {
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__,
            "onnxruntime": ort.__version__,
        },
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "parameter_count": sum(p.numel() for p in model.parameters()),
        "trained_as": trained_as,
        "training": {
            "optimizer": "Adam",
            "lr": config.lr,
            "loss": "BCEWithLogits",
            "batch_size": config.batch_size,
            "max_epochs": config.max_epochs,
            "early_stopping": f"validation AUC, patience {config.patience}",
            **{k: v for k, v in summary.items() if k != "train_seconds"},
        },
        "rows": {"train": len(data.train), "valid": len(data.valid), "test": len(data.test), "calib": N_CALIB},
        "label": "rating >= 4",
        "test_auc_torch": auc(labels, torch_score),
        "test_auc_ort": auc(labels, ort_score),
        "max_abs_diff_score": max_abs_diff,
        "inputs": inputs,
        "outputs": outputs,
        "score_output": "score",
        "seed": SEED,
        "rebuild": f"python {script} --model {name}",
        "file_bytes": {p.name: p.stat().st_size for kind, p in paths.items() if kind != "meta.json"},
    }


def build(name: str, model: DLRM, summary: dict[str, float | int], data: MovieLens) -> dict[str, object]:
    """Export one model, write its data files, check it with onnxruntime, and write NAME.meta.json."""
    trained, mode, opset = EXPORTS[name]
    config = CONFIGS[trained]
    paths = {kind: MODELS / f"{name}.{kind}" for kind in ("onnx", "feeds.npz", "labels.npy", "calib.npz", "meta.json")}
    export(model, mode, opset, paths["onnx"], tensors(data, data.test[:4]))
    proto = onnx.load(paths["onnx"])
    onnx.checker.check_model(proto, full_check=True)
    inputs, outputs = graph_io(proto)
    if [i["name"] for i in inputs] != list(INPUT_NAMES) or outputs != ["score"]:
        raise RuntimeError(f"{name}: unexpected graph inputs/outputs {inputs} {outputs}")
    dtypes = {i["name"]: np.dtype(i["dtype"]) for i in inputs}

    def feeds(rows: np.ndarray) -> dict[str, np.ndarray]:
        dense, sparse = data.dense[rows], data.sparse[rows]
        columns = {"dense": dense, **{field: sparse[:, k] for k, field in enumerate(SPARSE_FIELDS)}}
        return {key: np.ascontiguousarray(columns[key], dtype=dtypes[key]) for key in INPUT_NAMES}

    test_feeds = feeds(data.test)
    labels = data.label[data.test].astype(np.float32)
    calib_rows = np.sort(np.random.default_rng(SEED).choice(data.train, N_CALIB, replace=False))
    np.savez_compressed(paths["feeds.npz"], **test_feeds)
    np.save(paths["labels.npy"], labels)
    np.savez_compressed(paths["calib.npz"], **feeds(calib_rows))

    torch_score = predict(model, tensors(data, data.test))
    ort_score, max_abs_diff = onnxruntime_scores(name, paths, torch_score)

    layers = {
        "embedding_dim": config.embedding_dim,
        "embedding_rows": dict(zip(SPARSE_FIELDS, data.cardinalities, strict=True)),
        "bottom_mlp": [len(DENSE_FIELDS), *config.bottom],
        "interaction_features": len(model.pairs) + config.embedding_dim,
        "top_mlp": [len(model.pairs) + config.embedding_dim, *config.top, 1],
        "normalization": "LayerNorm after the first bottom Linear, BatchNorm1d after each hidden top Linear"
        if config.normalize
        else "none",
    }
    meta = {
        "name": name,
        "architecture": (
            f"DLRM: {len(SPARSE_FIELDS)} embedding tables (dim {config.embedding_dim}), bottom MLP "
            f"{'-'.join(map(str, layers['bottom_mlp']))} ReLU, pairwise dot interaction of "
            f"{len(SPARSE_FIELDS) + 1} vectors (upper triangle, {len(model.pairs)} dots) + bottom output, "
            f"top MLP {'-'.join(map(str, layers['top_mlp']))}{' with BatchNorm1d' if config.normalize else ''}"
            f", sigmoid"
        ),
        "layers": layers,
        "framework": "pytorch",
        "framework_version": torch.__version__,
        "exporter": f"torch.onnx.export(dynamo={mode == 'dynamo'})",
        "exporter_mode": mode,
        **run_meta(
            name=name,
            script="tools/train_dlrm.py",
            proto=proto,
            model=model,
            trained_as=trained,
            config=config,
            summary=summary,
            data=data,
            scores=(labels, torch_score, ort_score, max_abs_diff),
            interface=(inputs, outputs),
            paths=paths,
        ),
    }
    paths["meta.json"].write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=sorted(EXPORTS), help="build only this model (repeatable)")
    names = parser.parse_args().model or list(EXPORTS)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    data = load_movielens()
    MODELS.mkdir(exist_ok=True)
    trained: dict[str, tuple[nn.Module, dict[str, float | int]]] = {}
    for name in names:
        network = EXPORTS[name][0]
        if network not in trained:
            print(f"training {network}")
            config = CONFIGS[network]
            trained[network] = train(data, config, partial(DLRM, data.cardinalities, config), partial(tensors, data))
        model, summary = trained[network]
        meta = build(name, model, summary, data)
        if name == "dlrm_wide" and (size := meta["file_bytes"][f"{name}.onnx"]) > MAX_WIDE_BYTES:
            raise RuntimeError(f"{name}.onnx is {size} bytes, over {MAX_WIDE_BYTES}")
        print(
            f"{name}: params {meta['parameter_count']}  test AUC torch {meta['test_auc_torch']:.4f} "
            f"ort {meta['test_auc_ort']:.4f}  max |diff| {meta['max_abs_diff_score']:.2e}  "
            f"trained in {summary['train_seconds']}s  sizes {meta['file_bytes']}"
        )


if __name__ == "__main__":
    main()
