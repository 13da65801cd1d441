"""Speed measurements that decide where integer kernels pay off, and the choice made from them.

onnxruntime's dynamic int8 kernel (DynamicQuantizeLinear + MatMulInteger, fused into
DynamicQuantizeMatMul) quantizes the activations on every call. On a 512-row batch that is cheap
against the matrix product it speeds up; on one row it is a fixed cost of about a microsecond per
layer, which on a 13 µs recommender is several percent of its latency. So a layer goes integer only
when it is faster on a ranking batch, and the layers that are slower on a single request must
together stay within a latency budget measured against the model itself.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxcompress import runtime

__all__ = [
    "BATCH_ROWS",
    "LayerTiming",
    "ModelTiming",
    "choose_integer_layers",
    "model_timing",
    "model_timings",
    "probe_dynamic_matmul",
    "rows_per_example",
]

#: Rows of a ranking request: the batch the throughput gain is measured on.
BATCH_ROWS = 512
#: A layer must be at least this much faster on a batch to count as faster (probe noise).
MIN_BATCH_SPEEDUP = 1.1
#: Up to this many latency-costing layers, the best set within the budget is found by trying all.
EXHAUSTIVE_MAX_LAYERS = 12
#: Each timing repeat lasts about this long, so that the timer's resolution does not count.
REPEAT_SECONDS = 0.002


@dataclass(frozen=True)
class LayerTiming:
    """One layer's seconds per call in float and with integer kernels, on one row and on a batch."""

    float_single: float
    integer_single: float
    float_batch: float
    integer_batch: float

    @property
    def single_cost(self) -> float:
        """Seconds the integer form adds to a one-row call (negative: it saves time)."""
        return self.integer_single - self.float_single

    @property
    def batch_gain(self) -> float:
        """Seconds the integer form saves on a batch."""
        return self.float_batch - self.integer_batch

    @property
    def faster_on_batch(self) -> bool:
        return self.integer_batch * MIN_BATCH_SPEEDUP < self.float_batch


@dataclass(frozen=True)
class ModelTiming:
    """The whole float model's seconds per call on one row and on a batch."""

    single: float
    batch: float


def choose_integer_layers(
    timings: Mapping[str, LayerTiming],
    model: ModelTiming | None,
    max_latency_increase: float,
    min_batch_gain: float,
    reference: ModelTiming | None = None,
) -> set[str]:
    """The layers to run with integer kernels.

    Layers faster on a batch and no slower on one row are always taken. The others cost latency on
    a single request; among those that each save at least ``min_batch_gain`` of the model's batch
    time, the set with the largest batch time saved whose summed cost, less what the free layers
    save, keeps the model's one-row time within ``1 + max_latency_increase`` of the ``reference``'s
    (the model as the user gave it, which earlier passes may have made slower or faster; the float
    model itself when None) is taken (exhaustively for a few layers, else greedily by time saved per
    time spent). Without a model timing no costly layer is taken.
    """
    faster = {name: timing for name, timing in timings.items() if timing.faster_on_batch}
    chosen = {name for name, timing in faster.items() if timing.single_cost <= 0}
    if model is None:
        return chosen
    costly = sorted(
        (
            (name, timing)
            for name, timing in faster.items()
            if timing.single_cost > 0 and timing.batch_gain >= min_batch_gain * model.batch
        ),
        key=lambda item: item[1].batch_gain / item[1].single_cost,
        reverse=True,
    )
    # What the free layers save on one row, the costly ones may spend.
    allowed = (1 + max_latency_increase) * (reference or model).single - model.single
    budget = allowed - sum(timings[name].single_cost for name in chosen)
    if len(costly) <= EXHAUSTIVE_MAX_LAYERS:
        best: tuple[float, tuple[str, ...]] = (0.0, ())
        for size in range(1, len(costly) + 1):
            for subset in itertools.combinations(costly, size):
                if sum(timing.single_cost for _, timing in subset) <= budget:
                    gain = sum(timing.batch_gain for _, timing in subset)
                    if gain > best[0]:
                        best = (gain, tuple(name for name, _ in subset))
        return chosen | set(best[1])
    for name, timing in costly:
        if timing.single_cost <= budget:
            chosen.add(name)
            budget -= timing.single_cost
    return chosen


#: A probe of more rows than this a call would take seconds; the crossover is long past by then.
PROBE_MAX_ROWS_PER_EXAMPLE = 64


def rows_per_example(value: ir.Value | None) -> int:
    """Rows a linear layer multiplies per example: the static sizes of every axis but the batch
    axis and the last one (a sequence model's positions), 1 when unknown. The batch axis is the one
    symbolic axis, wherever it stands (PyTorch's attention projects ``[positions, batch, width]``),
    else the first."""
    if value is None or value.shape is None or len(value.shape) < 3:
        return 1
    leading = list(value.shape)[:-1]
    static = {index: dim for index, dim in enumerate(leading) if isinstance(dim, int)}
    if len(static) < len(leading) - 1:
        return 1
    batch_axis = next((index for index in range(len(leading)) if index not in static), 0)
    rows = math.prod(dim for index, dim in static.items() if index != batch_axis)
    return max(1, min(rows, PROBE_MAX_ROWS_PER_EXAMPLE))


def _best_seconds(calls: Sequence[Callable[[], object]], repeats: int = 9) -> list[float]:
    """Seconds per call of each callable: interleaved repeats, the fastest of each (the one least
    disturbed by other processes)."""
    start = time.perf_counter()
    for call in calls:
        call()
    count = max(1, min(2000, int(REPEAT_SECONDS * len(calls) / max(time.perf_counter() - start, 1e-7))))
    best = [float("inf")] * len(calls)
    for _ in range(repeats):
        for index, call in enumerate(calls):
            start = time.perf_counter()
            for _ in range(count):
                call()
            best[index] = min(best[index], (time.perf_counter() - start) / count)
    return best


def _timing_session(model: ir.Model | Path) -> object:
    # One thread: a second one's spin-waits make a run of a few microseconds noise. All graph
    # optimisations, as deployed, so that fused kernels are what is timed.
    return runtime.make_session(model, "all", threads=1)


@functools.lru_cache(maxsize=256)
def probe_dynamic_matmul(inputs: int, outputs: int, relu: bool, example_rows: int = 1) -> LayerTiming:
    """Time ``relu?(x @ W + b)`` for W of ``inputs`` x ``outputs`` in float and as
    DynamicQuantizeLinear + MatMulInteger, the form the quantizer writes, on one example and on
    ``BATCH_ROWS`` examples of ``example_rows`` rows each (a sequence model's layer sees every
    position of every sequence). Measured, not modelled: the crossover depends on the CPU."""
    tail = "g = Add(r, b)\n y = Relu(g)" if relu else "y = Add(r, b)"
    rows = _rows(example_rows)
    int_model = _probe_model(
        f"""(float[{rows},{inputs}] x, int8[{inputs},{outputs}] w, int8[{outputs}] wz, float[{outputs}] ws,
        float[{outputs}] b) => (float[{rows},{outputs}] y) {{
          q, s, z = DynamicQuantizeLinear(x)
          p = MatMulInteger(q, w, z, wz)
          f = Cast <to = 1> (p)
          m = Mul(s, ws)
          r = Mul(f, m)
          {tail}
        }}""",
        {**_probe_weights(inputs, outputs), "wz": np.zeros(outputs, np.int8), "b": np.zeros(outputs, np.float32)},
    )
    return _time_against_float(int_model, inputs, outputs, relu, example_rows)


@functools.lru_cache(maxsize=256)
def probe_static_matmul(inputs: int, outputs: int, relu: bool, example_rows: int = 1) -> LayerTiming:
    """As :func:`probe_dynamic_matmul`, for static activations in QDQ form: QuantizeLinear and
    DequantizeLinear on ``x`` with a fixed scale, the weight and an int32 bias through
    DequantizeLinear (onnxruntime fuses them into QGemm or MatMulIntegerToFloat at load)."""
    tail = "g = Add(r, bd)\n y = Relu(g)" if relu else "y = Add(r, bd)"
    rows = _rows(example_rows)
    qdq_model = _probe_model(
        f"""(float[{rows},{inputs}] x, int8[{inputs},{outputs}] w, float[{outputs}] ws, int8[{outputs}] wz,
        float xs, uint8 xz, int32[{outputs}] bq, float[{outputs}] bs) => (float[{rows},{outputs}] y) {{
          q = QuantizeLinear(x, xs, xz)
          xd = DequantizeLinear(q, xs, xz)
          wd = DequantizeLinear <axis = 1> (w, ws, wz)
          bd = DequantizeLinear <axis = 0> (bq, bs)
          r = MatMul(xd, wd)
          {tail}
        }}""",
        {
            **_probe_weights(inputs, outputs),
            "wz": np.zeros(outputs, np.int8),
            "xs": np.array(0.02, np.float32),
            "xz": np.array(128, np.uint8),
            "bq": np.zeros(outputs, np.int32),
            "bs": np.full(outputs, 0.02 * 0.025, np.float32),
        },
    )
    return _time_against_float(qdq_model, inputs, outputs, relu, example_rows)


def _rows(example_rows: int) -> str:
    # A sequence layer reads [N, T, K], as in the model: onnxruntime runs 3-D products differently.
    return "N" if example_rows == 1 else f"N,{example_rows}"


def _probe_weights(inputs: int, outputs: int) -> dict[str, np.ndarray]:
    weight = np.random.default_rng(0).standard_normal((inputs, outputs)).astype(np.float32)
    return {"w": np.clip(np.rint(weight * 40), -127, 127).astype(np.int8), "ws": np.full(outputs, 0.025, np.float32)}


def _time_against_float(
    integer_model: ir.Model, inputs: int, outputs: int, relu: bool, example_rows: int
) -> LayerTiming:
    """``integer_model`` and the float layer it replaces, timed side by side on one example and on
    ``BATCH_ROWS`` examples."""
    rng = np.random.default_rng(0)
    tail = "g = Add(r, b)\n y = Relu(g)" if relu else "y = Add(r, b)"
    rows = _rows(example_rows)
    float_model = _probe_model(
        f"(float[{rows},{inputs}] x, float[{inputs},{outputs}] w, float[{outputs}] b) => (float[{rows},{outputs}] y) "
        f"{{ r = MatMul(x, w)\n {tail} }}",
        {"w": rng.standard_normal((inputs, outputs)).astype(np.float32), "b": np.zeros(outputs, np.float32)},
    )
    sessions = [_timing_session(model) for model in (float_model, integer_model)]
    shape = (example_rows, inputs) if example_rows > 1 else (inputs,)
    single = {"x": rng.standard_normal((1, *shape)).astype(np.float32)}
    batch = {"x": rng.standard_normal((BATCH_ROWS, *shape)).astype(np.float32)}
    float_single, integer_single = _best_seconds([_runner(session, single) for session in sessions])
    float_batch, integer_batch = _best_seconds([_runner(session, batch) for session in sessions])
    return LayerTiming(float_single, integer_single, float_batch, integer_batch)


def model_timing(model: ir.Model | Path, feeds: Mapping[str, np.ndarray]) -> ModelTiming:
    """The model's seconds per call on its first feed row and on its first ``BATCH_ROWS`` rows."""
    return model_timings([model], feeds)[0]


def model_timings(models: Sequence[ir.Model | Path], feeds: Mapping[str, np.ndarray]) -> list[ModelTiming]:
    """Each model's (an ir.Model or a file) seconds per call on the first feed row and on the first
    ``BATCH_ROWS`` rows, timed in interleaved repeats so that their differences are not the
    machine's drift between two measurements."""
    sessions = [_timing_session(model) for model in models]
    runners: dict[int, list[Callable[[], object]]] = {1: [], BATCH_ROWS: []}
    for session in sessions:
        names = {spec.name for spec in session.get_inputs()}  # type: ignore[attr-defined]
        arrays = {name: array for name, array in feeds.items() if name in names}
        fixed = runtime.fixed_batch(session)  # type: ignore[arg-type]
        for rows, calls in runners.items():
            # A model whose inputs fix the batch is timed at that batch (it takes no other).
            calls.append(_runner(session, {name: array[: fixed or rows] for name, array in arrays.items()}))
    single = _best_seconds(runners[1], repeats=5)
    batch = _best_seconds(runners[BATCH_ROWS], repeats=5)
    return [ModelTiming(one, many) for one, many in zip(single, batch, strict=True)]


def _runner(session: object, feeds: Mapping[str, np.ndarray]) -> Callable[[], object]:
    run = session.run  # type: ignore[attr-defined]
    arrays = dict(feeds)
    return lambda: run(None, arrays)


def _probe_model(signature_and_body: str, constants: dict[str, np.ndarray]) -> ir.Model:
    """A one-graph model from ONNX text whose named inputs become initializers."""
    model = ir.from_onnx_text(f'<ir_version: 10, opset_import: ["" : 21]>\nprobe {signature_and_body}')
    for value in list(model.graph.inputs):
        if value.name in constants:
            model.graph.inputs.remove(value)
            value.const_value = ir.tensor(constants[value.name], name=value.name)
            model.graph.register_initializer(value)
    return model
