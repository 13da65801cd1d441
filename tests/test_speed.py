"""Which layers get integer kernels: the choice from measured timings (pure arithmetic, no clock)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxcompress.speed import (
    EXHAUSTIVE_MAX_LAYERS,
    LayerTiming,
    ModelTiming,
    choose_integer_layers,
    model_timing,
    model_timings,
    rows_per_example,
)

US = 1e-6


def timing(single_cost_us: float, batch_speedup: float, float_batch_us: float = 100.0) -> LayerTiming:
    return LayerTiming(
        float_single=3 * US,
        integer_single=(3 + single_cost_us) * US,
        float_batch=float_batch_us * US,
        integer_batch=float_batch_us / batch_speedup * US,
    )


MODEL = ModelTiming(single=10 * US, batch=1000 * US)


def test_layers_slower_on_a_batch_never_go_integer() -> None:
    timings = {"slow": timing(-1.0, 0.8), "marginal": timing(-1.0, 1.05), "fast": timing(-1.0, 1.5)}
    assert choose_integer_layers(timings, MODEL, 0.5, 0.0) == {"fast"}


def test_layers_that_cost_no_latency_go_integer_even_without_a_model_timing() -> None:
    timings = {"wide": timing(-5.0, 3.0), "narrow": timing(0.8, 1.5)}
    assert choose_integer_layers(timings, None, 1.0, 0.0) == {"wide"}
    assert choose_integer_layers(timings, MODEL, 1.0, 0.0) == {"wide", "narrow"}


def test_the_latency_budget_picks_the_set_that_saves_most_batch_time() -> None:
    # Budget 0.8 us of a 10 us model. Greedy by ratio would take "a" (best ratio) and then have no
    # room for "b"; "b" alone saves more batch time than "a" and "c" together.
    timings = {
        "a": timing(0.3, 2.0, float_batch_us=40),  # saves 20 us for 0.3 us
        "b": timing(0.8, 2.0, float_batch_us=100),  # saves 50 us for 0.8 us
        "c": timing(0.5, 2.0, float_batch_us=40),  # saves 20 us for 0.5 us
    }
    assert choose_integer_layers(timings, MODEL, 0.08, 0.0) == {"b"}
    assert choose_integer_layers(timings, MODEL, 0.08 + 0.03, 0.0) == {"a", "b"}
    assert choose_integer_layers(timings, MODEL, 0.0, 0.0) == set()


def test_what_free_layers_save_on_one_row_costly_ones_may_spend() -> None:
    timings = {"wide": timing(-2.0, 3.0), "narrow": timing(1.5, 1.5)}
    assert choose_integer_layers(timings, MODEL, 0.0, 0.0) == {"wide", "narrow"}
    assert choose_integer_layers({"narrow": timings["narrow"]}, MODEL, 0.0, 0.0) == set()


def test_what_earlier_passes_saved_on_one_row_against_the_original_integer_layers_may_spend() -> None:
    timings = {"b": timing(0.8, 2.0, float_batch_us=100)}
    # Budget 8% of the model itself: 0.8 us for a 10 us model fits exactly, not more.
    assert choose_integer_layers(timings, MODEL, 0.08, 0.0) == {"b"}
    # Pruned from 12 us to 10 us: the original's 8% plus the 2 us saved.
    original = ModelTiming(single=12 * US, batch=2000 * US)
    assert choose_integer_layers({"b": timing(2.8, 2.0)}, MODEL, 0.08, 0.0, original) == {"b"}
    assert choose_integer_layers({"b": timing(3.0, 2.0)}, MODEL, 0.08, 0.0, original) == set()
    # A model made slower than the original leaves less.
    slower = ModelTiming(single=9.5 * US, batch=1000 * US)
    assert choose_integer_layers(timings, MODEL, 0.08, 0.0, slower) == set()


def test_model_timings_time_a_model_and_a_file_side_by_side(tmp_path: Path) -> None:
    text = '<ir_version: 10, opset_import: ["" : 21]>\nm (float[N,64] x) => (float[N,64] y) {{ {body} }}'
    small = ir.from_onnx_text(text.format(body="y = Relu(x)"))
    chain = "\n".join(f"t{k} = Tanh({'x' if k == 0 else f't{k - 1}'})" for k in range(40))
    large = ir.from_onnx_text(text.format(body=f"{chain}\n y = Relu(t39)"))
    ir.save(large, tmp_path / "large.onnx")
    small_timing, large_timing = model_timings([small, tmp_path / "large.onnx"], {"x": np.ones((600, 64), np.float32)})
    assert large_timing.single > small_timing.single and large_timing.batch > 5 * small_timing.batch


def test_a_layer_whose_gain_is_a_sliver_of_the_model_is_not_worth_latency() -> None:
    timings = {"tiny_gain": timing(0.1, 2.0, float_batch_us=10), "free": timing(-0.1, 2.0, float_batch_us=10)}
    # saves 5 us of a 1000 us batch: under 1%, so only the free layer goes integer
    assert choose_integer_layers(timings, MODEL, 1.0, 0.01) == {"free"}
    assert choose_integer_layers(timings, MODEL, 1.0, 0.001) == {"tiny_gain", "free"}


def test_many_costly_layers_are_chosen_greedily_within_the_budget() -> None:
    count = EXHAUSTIVE_MAX_LAYERS + 3
    timings = {f"layer{index}": timing(0.1 + index / 100, 2.0) for index in range(count)}
    chosen = choose_integer_layers(timings, MODEL, 0.05, 0.0)
    spent = sum(timings[name].single_cost for name in chosen)
    assert spent <= 0.05 * MODEL.single
    assert chosen == {"layer0", "layer1", "layer2", "layer3"}  # cheapest first at equal gain


def test_model_timing_runs_the_model_on_one_row_and_a_batch(tmp_path: object) -> None:
    import onnx_ir as ir

    model = ir.from_onnx_text(
        '<ir_version: 10, opset_import: ["" : 21]>\nm (float[N,4] x) => (float[N,4] y) { y = Relu(x) }'
    )
    figures = model_timing(model, {"x": np.ones((600, 4), np.float32), "unused": np.zeros(3)})
    assert 0 < figures.single < 0.01 and 0 < figures.batch < 0.1


def test_a_sequence_layer_is_probed_on_its_three_dimensional_input() -> None:
    """SASRec's projections read [N, 20, 32]: timed as 10,240 rows of a 2-D product they looked no
    faster as integer kernels; onnxruntime runs the 3-D float product slower."""
    sequence = ir.Value(name="x", shape=ir.Shape(["N", 20, 32]))
    assert rows_per_example(sequence) == 20
    assert rows_per_example(ir.Value(name="y", shape=ir.Shape(["N", 32]))) == 1
    assert rows_per_example(ir.Value(name="z", shape=ir.Shape(["N", "T", 32]))) == 1
    assert rows_per_example(ir.Value(name="w", shape=ir.Shape(["N", 1000, 32]))) == 64
    assert rows_per_example(None) == 1


def test_the_batch_axis_of_a_sequence_layer_is_its_one_symbolic_axis() -> None:
    """PyTorch's attention projects [positions, batch, width]: probed as one row an example, SASRec's
    query/key/value projections (its largest products, 0.8 ms a batch of 512) looked 16x cheaper
    than they are and stayed float."""
    assert rows_per_example(ir.Value(name="x", shape=ir.Shape([20, "N", 32]))) == 20
    assert rows_per_example(ir.Value(name="y", shape=ir.Shape([4, 5, "N", 32]))) == 20
    assert rows_per_example(ir.Value(name="z", shape=ir.Shape([8, 20, 32]))) == 20
