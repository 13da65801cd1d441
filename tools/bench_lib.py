"""Measurement helpers for tools/bench.py: methods, compression in a subprocess, quality, timing.

Run as a script, this module is the worker that performs one compression, so that its wall time and
peak RSS are measured on their own under ``/usr/bin/time -v``:

    python tools/bench_lib.py JOB.json

onnxcompress is imported only where it is used, so that a baseline's worker neither loads it (its
peak RSS and wall time are the baseline's own) nor depends on it.
"""

from __future__ import annotations

import collections
import gc
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

Feeds = dict[str, np.ndarray]

#: Ops whose constant weight input the linear-layer quantizers look at, and which input that is.
LINEAR_WEIGHT_INPUT = {"Gemm": 1, "MatMul": 1, "Gather": 0}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
_CASE_PATHS = {"model", "feeds", "labels", "calib", "rank"}


@dataclass(frozen=True)
class Case:
    """One model in ``models/``: its files, and which output (and column) holds the score."""

    name: str
    model: Path
    feeds: Path
    labels: Path
    calib: Path
    score_output: str | None = None
    score_column: int | None = None
    #: Ranking feeds in blocks of ``rank_block`` rows (all items for one user), if the model has them.
    rank: Path | None = None
    rank_block: int | None = None

    @classmethod
    def from_dir(cls, models_dir: Path, name: str) -> Case:
        meta_path = models_dir / f"{name}.meta.json"
        meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        rank = models_dir / f"{name}.rank.npz"
        block = meta.get("rank_feeds", {}).get("block_size")
        has_rank = rank.exists() and block is not None
        return cls(
            name=name,
            model=models_dir / f"{name}.onnx",
            feeds=models_dir / f"{name}.feeds.npz",
            labels=models_dir / f"{name}.labels.npy",
            calib=models_dir / f"{name}.calib.npz",
            score_output=meta.get("score_output"),
            score_column=meta.get("score_column"),
            rank=rank if has_rank else None,
            rank_block=int(block) if has_rank else None,
        )


def discover_cases(models_dir: Path) -> list[str]:
    """Names of the models that come with feeds, labels and calibration rows."""
    names = []
    for path in sorted(models_dir.glob("*.onnx")):
        stem = path.name.removesuffix(".onnx")
        if all((models_dir / f"{stem}.{suffix}").exists() for suffix in ("feeds.npz", "labels.npy", "calib.npz")):
            names.append(stem)
    return names


@dataclass(frozen=True)
class Method:
    """A named way to produce a model from the original: ``kind`` picks the builder, ``params`` feed it."""

    name: str
    kind: str
    about: str
    params: Mapping[str, Any] = field(default_factory=dict)


# --- builders: run inside the worker process --------------------------------------------------------


class NpzCalibrationReader:
    """Feeds the rows of a calibration .npz to onnxruntime's calibrator in batches.

    onnxruntime's ``CalibrationDataReader`` accepts any class with ``get_next`` as a subclass.
    """

    def __init__(self, path: Path, batch: int = 128) -> None:
        arrays = dict(np.load(path))
        rows = len(next(iter(arrays.values())))
        self._batches = iter(
            [{name: array[start : start + batch] for name, array in arrays.items()} for start in range(0, rows, batch)]
        )

    def get_next(self) -> Feeds | None:
        return next(self._batches, None)


Builder = Callable[[Path, Path, Case, Mapping[str, Any]], dict[str, Any]]


def _ort_dynamic(source: Path, out: Path, case: Case, params: Mapping[str, Any]) -> dict[str, Any]:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(source, out, per_channel=params["per_channel"])
    return {}


def _ort_static(source: Path, out: Path, case: Case, params: Mapping[str, Any]) -> dict[str, Any]:
    from onnxruntime.quantization import QuantFormat, quantize_static

    quantize_static(
        source, out, NpzCalibrationReader(case.calib), quant_format=QuantFormat.QDQ, per_channel=params["per_channel"]
    )
    return {}


def _ort_nbits(source: Path, out: Path, case: Case, params: Mapping[str, Any]) -> dict[str, Any]:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    op_types = tuple(params["op_types"]) if "op_types" in params else None
    quantizer = MatMulNBitsQuantizer(str(source), block_size=params["block_size"], op_types_to_quantize=op_types)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return {}


def _onnxsim(source: Path, out: Path, case: Case, params: Mapping[str, Any]) -> dict[str, Any]:
    import onnxsim

    kwargs = dict(params.get("kwargs", {}))
    if params.get("calibration"):  # the same rows, in the same batches, as quantize_static gets
        reader = NpzCalibrationReader(case.calib)
        kwargs["calibration_data"] = list(iter(reader.get_next, None))
    model = getattr(onnxsim, params["function"])(str(source), **kwargs)
    onnx.save(model, str(out))
    return {}


def _ours(source: Path, out: Path, case: Case, params: Mapping[str, Any]) -> dict[str, Any]:
    from onnxcompress import compress

    passes: Sequence[str] = params.get("passes", ())
    options: Mapping[str, Mapping[str, Any]] | None = params.get("options")
    if "preset" in params:
        from onnxcompress.presets import get_preset

        preset = get_preset(params["preset"])
        passes, options = preset.passes, preset.options
    report = compress(
        source,
        out,
        passes,
        options=options,
        assignments=params.get("assignments", ()),
        feeds=case.feeds,
        labels=case.labels,
        calib=case.calib,
        force=True,
    )
    return {
        "parity": report.verdict,
        "parity_passed": report.parity.passed,
        "stats": {record.name: dict(record.stats) for record in report.passes},
    }


BUILDERS: dict[str, Builder] = {
    "ort_dynamic": _ort_dynamic,
    "ort_static": _ort_static,
    "ort_nbits": _ort_nbits,
    "onnxsim": _onnxsim,
    "ours": _ours,
}


def first_line(error: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters, for a table cell."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _worker(job_path: Path) -> int:
    job = json.loads(job_path.read_text())
    method = Method(**job["method"])
    case = Case(**{key: Path(value) if key in _CASE_PATHS and value else value for key, value in job["case"].items()})
    started = time.perf_counter()
    try:
        notes = BUILDERS[method.kind](case.model, Path(job["out"]), case, method.params)
    except Exception as error:
        traceback.print_exc()
        result = {"error": first_line(error)}
    else:
        result = {"seconds": time.perf_counter() - started, "notes": notes}
    Path(job["result"]).write_text(json.dumps(result))
    return 0 if "error" not in result else 1


# --- measurements in the parent process --------------------------------------------------------------


@dataclass(frozen=True)
class Compression:
    """One compression run in its own process."""

    error: str | None
    #: The compression call alone, timed inside the worker.
    seconds: float | None = None
    #: The whole worker process (interpreter start-up and imports included), from /usr/bin/time.
    process_seconds: float | None = None
    peak_rss_mib: float | None = None
    notes: Mapping[str, Any] = field(default_factory=dict)


def _parse_time_v(text: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) from the output of ``/usr/bin/time -v``."""
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if not wall or not rss:
        raise RuntimeError(f"unexpected /usr/bin/time output:\n{text}")
    seconds = 0.0
    for part in wall.group(1).split(":"):
        seconds = seconds * 60 + float(part)
    return seconds, int(rss.group(1)) / 1024


def compress_in_subprocess(method: Method, case: Case, out: Path, timeout: float = 600.0) -> Compression:
    """Build ``out`` with ``method`` in a fresh Python process under ``/usr/bin/time -v``."""
    for stale in (out, out.with_name(out.name + ".data")):
        stale.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-job-") as folder:
        job_path, result_path, time_path = (Path(folder) / name for name in ("job.json", "result.json", "time.txt"))
        case_fields = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(case).items()}
        job = {"method": asdict(method), "case": case_fields, "out": str(out), "result": str(result_path)}
        job_path.write_text(json.dumps(job))
        argv = ["/usr/bin/time", "-v", "-o", str(time_path), sys.executable, __file__, str(job_path)]
        try:
            process = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return Compression(error=f"timed out after {timeout:.0f} s")
        if not result_path.exists():
            tail = process.stderr.strip().splitlines()[-1:] or [f"exit code {process.returncode}"]
            return Compression(error=f"worker died: {tail[0]}"[:300])
        result = json.loads(result_path.read_text())
        wall, rss = _parse_time_v(time_path.read_text())
    if "error" in result:
        return Compression(error=result["error"], process_seconds=wall, peak_rss_mib=rss)
    if not out.exists():
        return Compression(error="finished without writing the model", process_seconds=wall, peak_rss_mib=rss)
    return Compression(
        error=None, seconds=result["seconds"], process_seconds=wall, peak_rss_mib=rss, notes=result["notes"]
    )


def bytes_on_disk(path: Path) -> int:
    """The model file plus every external data file its initializers point to."""
    model = onnx.load(str(path), load_external_data=False)
    files = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in files)


def op_counts(path: Path) -> collections.Counter[str]:
    """Node count per op type (``domain::Op`` outside the default domain), main graph only."""
    model = onnx.load(str(path), load_external_data=False)
    return collections.Counter(
        f"{node.domain}::{node.op_type}" if node.domain else node.op_type for node in model.graph.node
    )


def op_changes(before: collections.Counter[str], after: collections.Counter[str]) -> str:
    """``-6 Gemm, +6 MatMulInteger``: the op types whose counts changed."""
    parts = []
    for op in sorted(set(before) | set(after)):
        delta = after[op] - before[op]
        if delta:
            parts.append(f"{delta:+d} {op}")
    return ", ".join(parts) or "no op changes"


def float_weights_left(path: Path) -> dict[str, tuple[int, int]]:
    """Per op in LINEAR_WEIGHT_INPUT: (nodes whose weight is still a float initializer, nodes in total)."""
    model = onnx.load(str(path), load_external_data=False)
    floats = {tensor.name for tensor in model.graph.initializer if tensor.data_type in _FLOAT_TYPES}
    left: dict[str, list[int]] = {}
    for node in model.graph.node:
        slot = LINEAR_WEIGHT_INPUT.get(node.op_type) if not node.domain else None
        if slot is None or len(node.input) <= slot:
            continue
        counts = left.setdefault(node.op_type, [0, 0])
        counts[0] += node.input[slot] in floats
        counts[1] += 1
    return {op: (kept, total) for op, (kept, total) in sorted(left.items())}


def load_feeds(path: Path) -> Feeds:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def first_rows(feeds: Feeds, rows: int) -> Feeds:
    return {name: np.ascontiguousarray(array[:rows]) for name, array in feeds.items()}


def make_session(path: Path, threads: int) -> ort.InferenceSession:
    """A CPU session as a user would deploy it: ORT_ENABLE_ALL, ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def scores(session: ort.InferenceSession, feeds: Feeds, case: Case) -> np.ndarray:
    """The score of every row: the meta's ``score_output`` (default: the first float output) and column."""
    from onnxcompress.parity import score_column

    outputs = session.get_outputs()
    name = case.score_output or next(output.name for output in outputs if output.type == "tensor(float)")
    (array,) = session.run([name], feeds)
    array = np.asarray(array)
    column = case.score_column if case.score_column is not None else score_column(array.shape)
    if array.ndim == 2 and column is not None:
        array = array[:, column]
    if array.ndim != 1:
        raise ValueError(f"{case.name}: output {name} has shape {array.shape}; set score_column in its meta.json")
    return array.astype(np.float64)


@dataclass(frozen=True)
class Quality:
    """How one model's scores compare with the original's."""

    auc: float
    #: Standard error of ``auc`` minus the reference's on the same rows (paired, DeLong).
    auc_delta_se: float
    max_abs_err: float
    mean_abs_err: float
    top10_overlap: float | None


def quality(
    session: ort.InferenceSession,
    case: Case,
    feeds: Feeds,
    labels: np.ndarray,
    reference: np.ndarray,
    rank_feeds: Feeds | None = None,
    rank_reference: np.ndarray | None = None,
) -> Quality:
    """AUC on the test feeds, score error against the original, and mean top-10 overlap per user."""
    from onnxcompress.metrics import auc, auc_difference, top_k_overlap

    score = scores(session, feeds, case)
    error = np.abs(score - reference)
    overlap = None
    if rank_feeds is not None and rank_reference is not None and case.rank_block:
        ranked = scores(session, rank_feeds, case)
        block = case.rank_block
        overlap = float(
            np.mean(
                [
                    top_k_overlap(rank_reference[start : start + block], ranked[start : start + block], 10)
                    for start in range(0, ranked.size, block)
                ]
            )
        )
    delta_se = auc_difference(labels, reference, score)[1]
    return Quality(auc(labels, score), delta_se, float(error.max()), float(error.mean()), overlap)


def _calls_for(session: ort.InferenceSession, feeds: Feeds, target_seconds: float) -> int:
    """Warm the session up, then the number of calls that takes about ``target_seconds``."""
    run = session.run
    for _ in range(3):
        run(None, feeds)
    calls, elapsed = 0, 0.0
    started = time.perf_counter()
    while elapsed < min(0.05, target_seconds / 4) or calls < 5:
        run(None, feeds)
        calls += 1
        elapsed = time.perf_counter() - started
    return max(1, math.ceil(target_seconds / (elapsed / calls)))


def _seconds_per_call(session: ort.InferenceSession, feeds: Feeds, calls: int) -> float:
    run = session.run
    gc.disable()
    try:
        started = time.perf_counter()
        for _ in range(calls):
            run(None, feeds)
        return (time.perf_counter() - started) / calls
    finally:
        gc.enable()


def time_sessions(
    sessions: Mapping[str, ort.InferenceSession],
    feed_sets: Mapping[str, Feeds],
    repeats: int,
    target_seconds: float,
    seed: int = 0,
) -> dict[tuple[str, str], list[float]]:
    """Seconds per call for every (session, feed set), ``repeats`` samples each.

    Every session is warmed up and gets a call count that makes one sample last about
    ``target_seconds``; each round then measures every (session, feed set) once, in a fresh random
    order (seeded), so that drift in the machine's speed spreads over all methods alike.
    """
    plan = [(name, feeds) for name in sessions for feeds in feed_sets]
    calls = {key: _calls_for(sessions[key[0]], feed_sets[key[1]], target_seconds) for key in plan}
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in plan}
    order = random.Random(seed)
    for _ in range(repeats):
        for key in order.sample(plan, len(plan)):
            samples[key].append(_seconds_per_call(sessions[key[0]], feed_sets[key[1]], calls[key]))
    return samples


def machine() -> dict[str, Any]:
    """CPU model, logical cores and RAM of this machine."""
    cpu = "unknown"
    memory_kib = 0
    cpuinfo, meminfo = Path("/proc/cpuinfo"), Path("/proc/meminfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        cpu = found.group(1).strip() if found else cpu
    if meminfo.exists():
        found = re.search(r"^MemTotal:\s*(\d+) kB", meminfo.read_text(), re.MULTILINE)
        memory_kib = int(found.group(1)) if found else 0
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count() or 1,
        "ram_gib": round(memory_kib / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def versions(packages: Sequence[str]) -> dict[str, str]:
    from importlib import metadata

    found = {}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def git_revision(repo: Path) -> str:
    if shutil.which("git") is None:
        return "unknown"
    process = subprocess.run(
        ["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
    )
    return process.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(_worker(Path(sys.argv[1])))
