from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from conftest import compress_with_preset, model_files, save_model, shipped_model_with_calibration, text_model
from onnx.reference import ReferenceEvaluator

from onnxcompress import runtime
from onnxcompress.graph import WeightUse
from onnxcompress.passes.base import CompressionResult, PassContext
from onnxcompress.passes.cleanup import Cleanup
from onnxcompress.passes.quantize import CODEBOOK_MIN_ROWS, NOTHING_TO_QUANTIZE, Quantize

RNG = np.random.default_rng(0)

LINEAR = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,64] x, float[64,32] w_mm, float[16,32] w_gemm, float[16] b, float[32,8] w_gemm_t) => (float[N,8] y) {
  h = MatMul(x, w_mm)
  g1 = Gemm <transB = 1> (h, w_gemm, b)
  r = Relu(g1)
  r2 = Concat <axis = 1> (r, r)
  y = Gemm (r2, w_gemm_t)
}
"""

TABLES = """
<ir_version: 8, opset_import: ["" : 17]>
g (int64[N] user, int64[N,3] items, float[50,16] users, float[40,16] item_table) => (float[N,16] u, float[N,3,16] i, float[N,16] again) {
  u = Gather(users, user)
  i = Gather(item_table, items)
  again = Gather(users, user)
}
"""


def linear_model() -> ir.Model:
    rng = np.random.default_rng(1)
    return text_model(
        LINEAR,
        {
            "w_mm": rng.standard_normal((64, 32)).astype(np.float32),
            "w_gemm": rng.standard_normal((16, 32)).astype(np.float32),
            "b": rng.standard_normal(16).astype(np.float32),
            "w_gemm_t": rng.standard_normal((32, 8)).astype(np.float32),
        },
    )


def table_model() -> ir.Model:
    rng = np.random.default_rng(2)
    return text_model(
        TABLES,
        {
            "users": rng.standard_normal((50, 16)).astype(np.float32),
            "item_table": (rng.standard_normal((40, 16)) * np.where(np.arange(40) < 2, 100.0, 1.0)[:, None]).astype(
                np.float32
            ),
        },
    )


def evaluate(model: ir.Model, tmp_path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    path = save_model(model, tmp_path / f"m{len(list(tmp_path.iterdir()))}.onnx")
    reference = ReferenceEvaluator(str(path)).run(None, feeds)
    session = runtime.make_session(path, "disable")
    ort_outputs = session.run(None, feeds)
    for exact, ort_output in zip(reference, ort_outputs, strict=True):
        np.testing.assert_allclose(exact, ort_output, rtol=1e-4, atol=1e-5 * float(np.abs(exact).max()))
    return reference


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.mark.parametrize(
    ("options", "tolerance", "dq_count", "min_ratio"),
    [
        ({"bits": 8, "dequantize": "linear"}, 0.01, 3, 3.6),
        ({"bits": 8}, 0.01, 0, 3.6),
        ({"bits": 8, "granularity": "tensor"}, 0.02, 0, 3.85),
        ({"bits": 4, "granularity": "block", "block_size": 16, "dequantize": "linear"}, 0.15, 3, 5.0),
        ({"bits": 4, "symmetric": False}, 0.2, 0, 6.0),
        ({"bits": 2}, 1.5, 0, 10.0),
        ({"bits": 1}, 1.5, 0, 12.0),
    ],
)
def test_linear_weights_become_integer_initializers(
    options: dict, tolerance: float, dq_count: int, min_ratio: float, tmp_path: Path
) -> None:
    feeds = {"x": RNG.standard_normal((20, 64)).astype(np.float32)}
    (expected,) = evaluate(linear_model(), tmp_path, feeds)
    model = linear_model()
    result = Quantize(Quantize.Config(**options, rounding="nearest"))(model)
    assert result.modified and result.stats["weights_quantized"] == 3
    assert not {"w_mm", "w_gemm", "w_gemm_t"} & set(model.graph.initializers)
    assert model.opset_imports[""] == 21 and model.ir_version >= 10
    assert result.stats["opset_converted"] == "17 -> 21"
    assert sum(node.op_type == "DequantizeLinear" for node in model.graph) == dq_count
    if dq_count == 0:  # fold form: every decode node reads only constants, so runtimes fold it
        assert all(node.op_type in ("MatMul", "Gemm", "Relu", "Concat") or _constant_only(node) for node in model.graph)
    (got,) = evaluate(model, tmp_path, feeds)
    assert relative_error(expected, got) < tolerance
    assert result.stats["bytes_before"] / result.stats["bytes_after"] > min_ratio


def test_binary_weights_decode_by_testing_bits_against_masks(tmp_path: Path) -> None:
    """A packed bit picks +alpha or -alpha of its output channel through a bit mask, a boolean Cast
    and Where: no BitShift, no Unsqueeze (the packed codes carry a trailing axis of one), no
    arithmetic, and no Transpose (MatMul's [inputs, outputs] weight keeps that layout: each input's
    signs packed along the outputs, one alpha per output); decoded, every weight is exactly its sign times
    its channel's alpha."""
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((64, 20)).astype(np.float32)  # 20 outputs: 64 inputs, 8 bytes a row
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,64] x, float[64,20] w) => (float[N,20] y) {
          y = MatMul(x, w)
        }
        """,
        {"w": weight},
    )
    Quantize(Quantize.Config(bits=1))(model)
    ops = {node.op_type for node in model.graph}
    assert {"BitwiseAnd", "Where", "Neg"} <= ops and not {"BitShift", "Unsqueeze", "Sub", "Add", "Transpose"} & ops
    shapes = {tuple(value.const_value.shape) for value in model.graph.initializers.values()}
    assert (64, 3, 1) in shapes and (20,) in shapes  # 20 signs in 3 bytes per input, alpha per output
    (decoded,) = evaluate(model, tmp_path, {"x": np.eye(64, dtype=np.float32)})
    alpha = np.abs(decoded).max(axis=0)
    np.testing.assert_array_equal(np.abs(decoded), np.broadcast_to(alpha, decoded.shape))
    np.testing.assert_array_equal(np.sign(decoded), np.where(weight >= 0, 1.0, -1.0))
    np.testing.assert_allclose(alpha, np.abs(weight).mean(axis=0), rtol=1e-3)  # the L2-optimal alpha


def test_binary_weights_share_one_bit_stream_decoded_once_into_signs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three binary layers (20 outputs of 64 inputs: rows of 20 bits, not whole bytes) and a binary
    table decoded at load: one packed stream, one BitwiseAnd, Cast and Where into signs, split
    into each weight's, which a Reshape and a Mul by its alphas make the weight. The scores are
    those of a decode per weight, bit for bit; the stream holds every sign once, unpadded."""
    from onnxcompress.passes import quantize

    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,64] x, int64[N] ids, float[64,20] w1, float[64,20] w2, float[64,20] w3, float[30,16] t)
          => (float[N,20] y, float[N,16] e) {
          h = MatMul(x, w1)
          k = Gemm <transB = 1> (h, w2)
          y = MatMul(k, w3)
          e = Gather(t, ids)
        }
        """
    rng = np.random.default_rng(6)
    weights = {
        "w1": rng.standard_normal((64, 20)),
        "w2": rng.standard_normal((64, 20)),
        "w3": rng.standard_normal((64, 20)),
        "t": rng.standard_normal((30, 16)),
    }
    weights = {name: array.astype(np.float32) for name, array in weights.items()}
    feeds = {"x": rng.standard_normal((5, 64)).astype(np.float32), "ids": np.arange(5)}
    config = Quantize.Config(bits=1, embedding_bits=1)
    shared = text_model(text, weights)
    stats = Quantize(config)(shared).stats
    assert stats["binary_weights_sharing_one_decode"] == 4
    ops = [node.op_type for node in shared.graph]
    assert ops.count("BitwiseAnd") == 1 and ops.count("Where") == 1 and "Neg" not in ops
    assert ops.count("Mul") == 4
    reshapes = [
        node for node in shared.graph if node.op_type == "Reshape" and node.inputs[0].producer().op_type == "Split"
    ]
    targets = {tuple(node.inputs[1].const_value.numpy()) for node in reshapes}
    # nothing of the per-weight decodes is left to save (their packed bits, masks, slice bounds)
    assert all(name.startswith("signs_") or "_scale" in name for name in shared.graph.initializers)
    # one target a row width: w1 and w3 share theirs, w2 (read transposed) is stored in rows of 64
    assert len(reshapes) == 4 and targets == {(-1, 20), (-1, 64), (-1, 16)}
    packed = [
        value.const_value for value in shared.graph.initializers.values() if value.name.startswith("signs_packed")
    ]
    assert [tuple(tensor.shape) for tensor in packed] == [(-(-(3 * 64 * 20 + 30 * 16) // 8), 1)]  # every sign once
    monkeypatch.setattr(quantize, "_share_sign_decoding", lambda graph: [])
    apart = text_model(text, weights)
    Quantize(config)(apart)
    assert [node.op_type for node in apart.graph].count("BitwiseAnd") == 4
    for together, alone in zip(evaluate(shared, tmp_path, feeds), evaluate(apart, tmp_path, feeds), strict=True):
        np.testing.assert_array_equal(together, alone)


@pytest.mark.parametrize(("outputs", "coded"), [(64, 3), (8, 0)])
def test_binary_alphas_share_one_codebook_of_sixteen_where_it_pays(outputs: int, coded: int, tmp_path: Path) -> None:
    """Three binary layers' alphas (one a column) become 4-bit indices into one codebook of 16
    decoded once, each alpha the entry nearest its own (signs unchanged), from 96 alphas (192 here;
    80 stay float16). The table's alphas (one a row, [rows, 1]) stay apart."""
    from onnxcompress.passes.quantize import ALPHA_CODEBOOK_MIN

    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,64] x, int64[N] ids, float[64,{outputs}] w1, float[{outputs},64] w2, float[64,{outputs}] w3,
           float[30,16] t) => (float[N,{outputs}] y, float[N,16] e) {{
          h = MatMul(x, w1)
          k = MatMul(h, w2)
          y = MatMul(k, w3)
          e = Gather(t, ids)
        }}
        """
    rng = np.random.default_rng(7)
    weights = {
        "w1": rng.standard_normal((64, outputs)) * rng.lognormal(0, 0.3, outputs),
        "w2": rng.standard_normal((outputs, 64)) * rng.lognormal(0, 0.3, 64),
        "w3": rng.standard_normal((64, outputs)) * rng.lognormal(0, 0.3, outputs),
        "t": rng.standard_normal((30, 16)),
    }
    weights = {name: array.astype(np.float32) for name, array in weights.items()}
    model = text_model(text, weights)
    config = Quantize.Config(bits=1, embedding_bits=1, scale_codebook=True, low_bit_min_elements=0)
    stats = Quantize(config)(model).stats
    assert stats.get("binary_alphas_in_one_codebook", 0) == coded
    assert (outputs * 2 + 64 >= ALPHA_CODEBOOK_MIN) == bool(coded)
    indices = [value for value in model.graph.initializers.values() if value.name.startswith("alphas_index")]
    if not coded:
        assert not indices
        return
    (index,) = indices
    assert index.const_value.dtype == ir.DataType.UINT4 and tuple(index.const_value.shape) == (2 * outputs + 64,)
    (codebook,) = [value for value in model.graph.initializers.values() if value.name.startswith("alphas_codebook")]
    book = codebook.const_value.numpy().astype(np.float64)
    assert book.shape == (16,)
    assert [node.op_type for node in model.graph].count("Gather") == 2  # the codebook's and the table's
    # the model computes each layer as its signs times the entry nearest (in log) its own alpha
    x = rng.standard_normal((5, 64)).astype(np.float32)
    got, _ = evaluate(model, tmp_path, {"x": x, "ids": np.arange(5)})
    expected = x.astype(np.float64)
    for name in ("w1", "w2", "w3"):
        alpha = np.abs(weights[name]).mean(axis=0)
        taken = book[np.abs(np.log(book)[:, None] - np.log(alpha)[None]).argmin(axis=0)]
        assert np.all(np.abs(taken / alpha - 1) < 0.1)
        expected = expected @ (np.where(weights[name] >= 0, 1.0, -1.0) * taken)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("bits", [8, 1])
def test_gemm_weight_read_transposed_is_stored_as_inputs_by_outputs_with_a_scale_vector(
    bits: int, tmp_path: Path
) -> None:
    """A per-channel Gemm weight read with transB is stored ``[inputs, outputs]`` and its Gemm loses
    transB: the scales are then a plain vector (which the final cleanup packs with the others) and
    no Transpose or Unsqueeze is stored. The product is unchanged."""
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((24, 64)).astype(np.float32)  # 24 outputs, 64 inputs
    graph = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,64] x, float[24,64] w) => (float[N,24] y) {
          y = Gemm <transB = 1> (x, w)
        }
        """
    feeds = {"x": rng.standard_normal((16, 64)).astype(np.float32)}
    (expected,) = evaluate(text_model(graph, {"w": weight}), tmp_path, feeds)
    model = text_model(graph, {"w": weight})
    Quantize(Quantize.Config(bits=bits, granularity="channel", rounding="nearest"))(model)
    (gemm,) = [node for node in model.graph if node.op_type == "Gemm"]
    assert not gemm.attributes.get_int("transB", 0)
    assert not {"Transpose", "Unsqueeze"} & {node.op_type for node in model.graph}
    shapes = {tuple(value.const_value.shape) for value in model.graph.initializers.values()}
    assert (24,) in shapes and ((64, 24) in shapes if bits == 8 else (64, 3, 1) in shapes)
    (got,) = evaluate(model, tmp_path, feeds)
    assert relative_error(expected, got) < (0.01 if bits == 8 else 0.8)


def _constant_only(node: ir.Node) -> bool:
    return all(
        value is None or value.is_initializer() or (value.producer() is not None and _constant_only(value.producer()))
        for value in node.inputs
    )


def test_fold_form_runs_at_float_speed_because_onnxruntime_folds_it(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    model = linear_model()
    Quantize()(model)
    path = save_model(model, tmp_path / "folded.onnx")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = {node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert optimized <= {"MatMul", "Gemm", "FusedGemm", "Relu", "Concat", "FusedMatMul"}, optimized


def test_int4_weights_are_stored_as_int4_with_dequantize_linear(tmp_path: Path) -> None:
    model = linear_model()
    Quantize(Quantize.Config(bits=4, granularity="block", block_size=16, dequantize="linear"))(model)
    q = model.graph.initializers["w_mm_q"].const_value
    assert q.dtype == ir.DataType.INT4 and q.nbytes == 64 * 32 // 2
    assert tuple(model.graph.initializers["w_mm_scale"].const_value.shape) == (32 * 64 // 16,)  # one per block


def test_tables_are_gathered_quantized_and_dequantized_after_the_gather(tmp_path: Path) -> None:
    feeds = {"user": RNG.integers(0, 50, 30).astype(np.int64), "items": RNG.integers(0, 40, (30, 3)).astype(np.int64)}
    expected = evaluate(table_model(), tmp_path, feeds)
    model = table_model()
    result = Quantize(Quantize.Config(fold_tables_below=0, embedding_granularity="row"))(model)
    assert result.stats["tensors"]["users"]["lookups"] == 2  # shared table quantized once
    assert result.stats["tensors"]["users"]["form"] == "gathered"
    assert set(model.graph.initializers) >= {"users_q", "users_scale", "users_zero_point", "item_table_q"}
    for node in model.graph:
        if node.op_type == "DequantizeLinear":
            assert node.inputs[0].producer().op_type == "Gather"  # never a whole-table dequantization
            assert node.attributes.get_int("axis") == 0
    assert model.graph.initializers["users_scale"].const_value.dtype == ir.DataType.FLOAT16
    got = evaluate(model, tmp_path, feeds)
    assert [value.name for value in model.graph.outputs] == ["u", "i", "again"]
    for exact, approximate in zip(expected, got, strict=True):
        assert exact.shape == approximate.shape
        # per-row scales: every row, even the small-norm ones, keeps ~1% accuracy
        error = np.abs(exact - approximate).max(axis=-1) / np.abs(exact).max(axis=-1)
        assert error.max() < 0.01


@pytest.mark.parametrize(("bits", "tolerance"), [(4, 0.1), (2, 0.5), (1, 0.9)])
def test_low_bit_tables_are_bit_packed_and_unpacked_after_the_gather(
    bits: int, tolerance: float, tmp_path: Path
) -> None:
    feeds = {"user": RNG.integers(0, 50, 30).astype(np.int64), "items": RNG.integers(0, 40, (30, 3)).astype(np.int64)}
    expected = evaluate(table_model(), tmp_path, feeds)
    model = table_model()
    result = Quantize(Quantize.Config(embedding_bits=bits, fold_tables_below=0))(model)
    packed = model.graph.initializers["users_packed"].const_value
    assert packed.dtype == ir.DataType.UINT8 and tuple(packed.shape) == (50, 16 * bits // 8, 1)
    # packed codes + an fp16 scale and a uint8 zero point per row (+ the unpacking constants)
    assert result.stats["tensors"]["users"]["bytes_after"] <= 50 * (16 * bits / 8 + 3) + 64
    got = evaluate(model, tmp_path, feeds)
    for exact, approximate in zip(expected, got, strict=True):
        assert relative_error(exact, approximate) < tolerance


@pytest.mark.parametrize("bits", [2, 3])
def test_zero_points_of_low_bit_tables_decoded_at_load_take_four_bits(bits: int, tmp_path: Path) -> None:
    """A 2- or 3-bit table with row offsets decoded at load stores each row's zero point (at most 7)
    as UINT4, read by the decode's Cast: half a byte a row fewer, the same decoded rows as with
    uint8 zero points."""
    feeds = {"user": RNG.integers(0, 50, 30).astype(np.int64), "items": RNG.integers(0, 40, (30, 3)).astype(np.int64)}
    model = table_model()
    Quantize(Quantize.Config(embedding_bits=bits, embedding_symmetric=False, stack_tables=False))(model)
    zeros = [value for name, value in model.graph.initializers.items() if name.startswith("users_zero_point")]
    assert len(zeros) == 1 and zeros[0].const_value.dtype == ir.DataType.UINT4
    assert tuple(zeros[0].const_value.shape) == (50, 1)
    got = evaluate(model, tmp_path, feeds)
    as_bytes = zeros[0].const_value.numpy().astype(np.uint8)
    zeros[0].const_value = ir.tensor(as_bytes, name=zeros[0].name)
    zeros[0].type = ir.TensorType(ir.DataType.UINT8)
    for four_bits, eight_bits in zip(got, evaluate(model, tmp_path, feeds), strict=True):
        np.testing.assert_array_equal(four_bits, eight_bits)


STACKABLE = """
<ir_version: 8, opset_import: ["" : 17]>
g (int64[N] user, int64[N] item, int64[N] gender, int64[N] age, int64[N] zone, int64[N] genre,
   float[300,16] users, float[400,16] items, float[2,16] genders, float[21,16] ages, float[11,16] zones,
   float[6,8] genres) => (float[N,16] u, float[N,16] i, float[N,16] s, float[N,16] a, float[N,16] z,
   float[N,8] e, float[N,16] again) {
  u = Gather(users, user)
  i = Gather(items, item)
  s = Gather(genders, gender)
  a = Gather(ages, age)
  z = Gather(zones, zone)
  e = Gather(genres, genre)
  again = Gather(genders, gender)
}
"""
STACKABLE_ROWS = {"users": 300, "items": 400, "genders": 2, "ages": 21, "zones": 11}


def stackable_model() -> tuple[ir.Model, dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    tables = {name: rng.standard_normal((rows, 16)).astype(np.float32) for name, rows in STACKABLE_ROWS.items()}
    tables["genres"] = rng.standard_normal((6, 8)).astype(np.float32)
    return text_model(STACKABLE, tables), tables


@pytest.mark.parametrize("stack", [True, False])
def test_tables_decoded_at_load_are_stacked_by_width_and_bits_and_split_after_decoding(
    stack: bool, tmp_path: Path
) -> None:
    """Tables of one width and bits share one decode and one Split; the small ones the size rule
    holds at 8 bits form a stack of their own, which at 544 values takes the 4 bits; a table of
    another width stays alone. Every lookup reads its own rows, as close as unstacked."""
    model, tables = stackable_model()
    feeds = {
        name: RNG.integers(0, rows, 40).astype(np.int64)
        for name, rows in {"user": 300, "item": 400, "gender": 2, "age": 21, "zone": 11, "genre": 6}.items()
    }
    config = Quantize.Config(embedding_bits=4, low_bit_min_elements=512, stack_tables=stack)
    stats = Quantize(config)(model).stats["tensors"]
    splits = [node for node in model.graph if node.op_type == "Split"]
    if stack:
        assert {name: tensor["stacked"] for name, tensor in stats.items() if "stacked" in tensor} == {
            "users_stack_rows": ["users", "items"],
            "genders_stack_rows": ["genders", "ages", "zones"],
        }
        assert {name: tensor["bits"] for name, tensor in stats.items()} == {
            "users_stack_rows": 4,
            "genders_stack_rows": 4,
            "genres": 8,
        }
        assert sorted(len(node.outputs) for node in splits) == [2, 3]
        for split in splits:  # after the decode, which onnxruntime folds at load
            assert all(node.op_type == "Gather" for output in split.outputs for node, _ in output.uses())
    else:
        assert not splits
        assert {name: tensor["bits"] for name, tensor in stats.items()} == {
            "users": 4,
            "items": 4,
            "genders": 8,
            "ages": 8,
            "zones": 8,
            "genres": 8,
        }
    got = evaluate(model, tmp_path, feeds)
    lookups = [("users", "user"), ("items", "item"), ("genders", "gender"), ("ages", "age"), ("zones", "zone")]
    for (table, ids), values in zip(lookups, got, strict=False):
        expected = tables[table][feeds[ids]]
        assert values.shape == expected.shape
        limit = 0.1 if stack or table in ("users", "items") else 0.01  # 4 bits a value, or 8
        assert relative_error(expected, values) < limit
    np.testing.assert_array_equal(got[2], got[6])  # the table read twice is one table


def test_a_stack_stays_under_the_bytes_of_a_table_decoded_at_load() -> None:
    """users (19,200 bytes) and items (25,600) together pass a 40,000-byte fold limit: each is then
    a table of its own, gathered or folded as it was."""
    model, _ = stackable_model()
    config = Quantize.Config(embedding_bits=4, low_bit_min_elements=512, fold_tables_below=40_000)
    stats = Quantize(config)(model).stats["tensors"]
    assert {name: tensor.get("stacked") for name, tensor in stats.items() if tensor["kind"] == "embedding"} == {
        "users": None,
        "items": None,
        "genders_stack_rows": ["genders", "ages", "zones"],
        "genres": None,
    }
    assert sum(node.op_type == "Split" for node in model.graph) == 1


def test_small_tables_whose_stack_is_still_under_the_size_rule_stay_apart_at_8_bits() -> None:
    """At 8 bits each table keeps its own one scale: a stack would make them share it."""
    model, _ = stackable_model()
    model.graph.initializers["ages"].const_value = ir.tensor(np.ones((3, 16), np.float32), name="ages")
    model.graph.initializers["zones"].const_value = ir.tensor(np.ones((3, 16), np.float32), name="zones")
    stats = Quantize(Quantize.Config(embedding_bits=4, low_bit_min_elements=512))(model).stats["tensors"]
    assert {name: tensor["bits"] for name, tensor in stats.items() if "stacked" not in tensor} == {
        "genders": 8,
        "ages": 8,
        "zones": 8,
        "genres": 8,
    }
    assert stats["users_stack_rows"]["stacked"] == ["users", "items"]
    assert sum(node.op_type == "Split" for node in model.graph) == 1


def test_a_table_tied_to_an_output_layer_is_quantized_once(tmp_path: Path) -> None:
    table = RNG.standard_normal((30, 8)).astype(np.float32)
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N] ids, float[N,8] h, float[30,8] emb) => (float[N,8] e, float[N,30] logits) {
          e = Gather(emb, ids)
          logits = Gemm <transB = 1> (h, emb)
        }
        """,
        {"emb": table},
    )
    feeds = {"ids": RNG.integers(0, 30, 10).astype(np.int64), "h": RNG.standard_normal((10, 8)).astype(np.float32)}
    expected = evaluate(model, tmp_path, feeds)
    result = Quantize(Quantize.Config(embedding_granularity="row"))(model)
    assert result.stats["weights_quantized"] == 1
    assert {"emb_q", "emb_scale", "emb_zero_point"} <= set(model.graph.initializers)
    assert "emb" not in model.graph.initializers
    got = evaluate(model, tmp_path, feeds)
    for exact, approximate in zip(expected, got, strict=True):
        assert relative_error(exact, approximate) < 0.01


def test_a_table_also_read_as_a_plain_tensor_gives_that_reader_the_decoded_table(tmp_path: Path) -> None:
    """A dynamo export of GRU4Rec slices its item table for the candidate items as well as looking
    rows up: the Slice must read the quantized table decoded, not a removed initializer."""
    table = RNG.standard_normal((300, 8)).astype(np.float32)
    weight = RNG.standard_normal((8, 4)).astype(np.float32)
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N] ids, float[300,8] emb, int64[1] starts, int64[1] ends, float[8,4] w)
          => (float[N,20] scores, float[N,4] projected, float[4,8] flipped) {
          e = Gather(emb, ids)
          items = Slice(emb, starts, ends)
          scores = Gemm <transB = 1> (e, items)
          projected = MatMul(e, w)
          flipped = Transpose(w)
        }
        """,
        {"emb": table, "starts": np.array([0]), "ends": np.array([20]), "w": weight},
    )
    feeds = {"ids": RNG.integers(0, 300, 10).astype(np.int64)}
    expected = evaluate(model, tmp_path, feeds)
    result = Quantize(Quantize.Config(embedding_granularity="row", float_storage="float32"))(model)
    assert "emb" not in model.graph.initializers and "emb_q" in model.graph.initializers
    # A linear weight also read by another op stays float: its readers would need two forms.
    assert result.stats["skipped"]["w"] == "also read by Transpose as a plain tensor: left in float"
    got = evaluate(model, tmp_path, feeds)
    assert relative_error(expected[0], got[0]) < 0.02 and relative_error(expected[1], got[1]) < 0.02
    np.testing.assert_array_equal(got[2], expected[2])


def test_selection_options_and_skip_reasons() -> None:
    model = linear_model()
    config = Quantize.Config(exclude="gemm_t", min_elements=600, op_types=("MatMul", "Gemm"), float_storage="float32")
    result = Quantize(config)(model)
    assert result.stats["skipped"] == {
        "w_gemm": "fewer than quant.min_elements=600 elements",
        "w_gemm_t": "matched by quant.exclude",
    }
    assert "w_gemm" in model.graph.initializers and "w_mm" not in model.graph.initializers


def test_a_model_without_weights_says_why_nothing_was_quantized() -> None:
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x, float[4] shift) => (float[N,4] y) { y = Add(x, shift) }
        """,
        {"shift": np.ones(4, np.float32)},
    )
    result = Quantize()(model)
    assert not result.modified
    assert result.stats == {"nothing_to_quantize": NOTHING_TO_QUANTIZE}


def test_gptq_rounding_uses_calibration_and_beats_nearest(tmp_path: Path) -> None:
    from onnxcompress.calibration import Calibration, Feeds
    from onnxcompress.passes.base import PassContext

    def layer() -> ir.Model:
        weight = np.random.default_rng(3).standard_normal((64, 32)).astype(np.float32)
        return text_model(
            """
            <ir_version: 8, opset_import: ["" : 17]>
            g (float[N,64] x, float[64,32] w) => (float[N,32] y) {
              y = MatMul(x, w)
            }
            """,
            {"w": weight},
        )

    x = (RNG.standard_normal((256, 64)) @ RNG.standard_normal((64, 64))).astype(np.float32)
    context = PassContext(calibration=Calibration(Feeds({"x": x}, "test")))
    (expected,) = evaluate(layer(), tmp_path, {"x": x})
    errors = {}
    for rounding in ("nearest", "gptq"):
        model = layer()
        result = Quantize(Quantize.Config(bits=4, rounding=rounding), context)(model)
        assert result.stats["tensors"]["w"]["rounding"] == rounding
        (got,) = evaluate(model, tmp_path, {"x": x})
        errors[rounding] = relative_error(expected, got)
    assert errors["gptq"] < 0.8 * errors["nearest"]


@pytest.mark.parametrize("name", ["dlrm", "deepfm", "two_tower", "sklearn_mlp", "dlrm_dynamo"])
def test_int8_on_real_models_keeps_auc(cli, tmp_path: Path, name: str) -> None:
    files = model_files(name)
    result = cli(
        files["onnx"],
        tmp_path / "q.onnx",
        "--passes",
        "cleanup,quant",
        "--set",
        "cleanup.strip_metadata=true",
        "--feeds",
        files["feeds"],
        "--labels",
        files["labels"],
        "--calib",
        files["calib"],
    )
    assert result.code == 0, result.err
    report = result.report
    score = next(output for output in report["parity"]["outputs"] if output["kind"] == "score")
    assert abs(score["auc_delta"]) <= 0.0003
    assert score["spearman"] > 0.999
    assert report["size_ratio"] > 3.0


def test_small_tables_are_decoded_at_load_and_large_ones_gathered() -> None:
    model = table_model()
    result = Quantize(Quantize.Config(fold_tables_below=50 * 16 * 4))(model)  # users is exactly at the limit
    assert result.stats["tensors"]["item_table"]["form"] == "fold"
    assert result.stats["tensors"]["users"]["form"] == "gathered"
    gathered = {node.inputs[0].name for node in model.graph if node.op_type == "Gather"}
    assert "users_q" in gathered and "item_table_q" not in gathered


def test_dynamic_activations_use_integer_matmul(tmp_path: Path) -> None:
    feeds = {"x": RNG.standard_normal((20, 64)).astype(np.float32)}
    (expected,) = evaluate(linear_model(), tmp_path, feeds)
    model = linear_model()
    result = Quantize(Quantize.Config(activations="dynamic"))(model)
    ops = [node.op_type for node in model.graph]
    assert ops.count("MatMulInteger") == 3 and ops.count("DynamicQuantizeLinear") == 3
    assert "Gemm" not in ops and "MatMul" not in ops
    assert {entry["form"] for entry in result.stats["tensors"].values()} == {"dynamic"}
    (got,) = evaluate(model, tmp_path, feeds)
    assert relative_error(expected, got) < 0.02


@pytest.mark.parametrize(("bits", "dequantize"), [(4, "fold"), (4, "linear"), (3, "fold"), (2, "fold"), (1, "fold")])
def test_low_bit_weights_feed_integer_kernels_rounded_to_int8_at_load(
    bits: int, dequantize: str, tmp_path: Path
) -> None:
    """Blocks of 2- to 4-bit codes stay the stored form; the graph decodes them and rounds them to
    int8 per output channel (scales computed in the graph, none stored), which onnxruntime folds at
    load into the weight of its fused integer kernel. The decode is the folding form even with
    dequantize=linear: onnxruntime never folds DequantizeLinear. Packed 2- and 3-bit codes too: the
    mixed preset's widest layers (the wide DLRM's 1024x1024) go to 2 bits and ran at float speed."""

    feeds = {"x": RNG.standard_normal((20, 64)).astype(np.float32)}
    config = {"bits": bits, "granularity": "block", "block_size": 16, "dequantize": dequantize}
    float_activations, model, result = with_integer_layers(config, feeds, tmp_path)
    assert result.stats["integer_layers"] == 3  # shown in the CLI's pass summary
    int8 = [v.name for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.INT8]
    assert not int8  # no int8 copy of a weight is stored
    integer_products = [node for node in model.graph if node.op_type == "MatMulInteger"]
    assert len(integer_products) == 3
    assert all(node.inputs[1].producer().op_type == "QuantizeLinear" for node in integer_products)
    (got,) = evaluate(model, tmp_path, feeds)
    # on top of the 4-bit weights' error: int8 rounding of the weights and of the activations
    assert relative_error(float_activations, got) < 0.02
    ops = fused_by_onnxruntime(model, tmp_path, integer_layers=3)
    assert not {"QuantizeLinear", "DequantizeLinear", "Abs", "ReduceMax", "DynamicQuantizeLinear"} & ops


def with_integer_layers(
    config: dict, feeds: dict[str, np.ndarray], tmp_path: Path
) -> tuple[np.ndarray, ir.Model, CompressionResult]:
    """linear_model at ``config`` with float activations (its output on ``feeds``), and with every
    layer an integer layer at the configured bits (the model and the pass result)."""
    weight_only = linear_model()
    Quantize(Quantize.Config(**config))(weight_only)
    (float_activations,) = evaluate(weight_only, tmp_path, feeds)
    model = linear_model()
    result = Quantize(Quantize.Config(**config, activations="dynamic"))(model)
    assert {(entry["bits"], entry["form"]) for entry in result.stats["tensors"].values()} == {
        (config["bits"], "dynamic")
    }
    return float_activations, model, result


def fused_by_onnxruntime(model: ir.Model, tmp_path: Path, integer_layers: int) -> set[str]:
    """The op types of ``model`` as onnxruntime optimises it at ORT_ENABLE_ALL, checking that it fused
    ``integer_layers`` integer layers, each with a constant (load-time folded) weight."""
    import onnx
    import onnxruntime as ort

    path = save_model(model, tmp_path / "integer.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    constants = {init.name for init in optimized.graph.initializer}
    fused = [node for node in optimized.graph.node if node.op_type == "DynamicQuantizeMatMul"]
    assert len(fused) == integer_layers and all(node.input[1] in constants for node in fused)
    return {node.op_type for node in optimized.graph.node}


def test_4_bit_codes_with_one_scale_per_channel_feed_integer_kernels_as_they_are(tmp_path: Path) -> None:
    """A block as wide as the layer's inputs is one scale per output channel, the integer kernel's
    own form: the int4 codes are stored in its [inputs, outputs] layout and widened to int8 at load,
    exactly (no decode and second rounding), and onnxruntime still fuses the layer."""

    feeds = {"x": RNG.standard_normal((20, 64)).astype(np.float32)}
    float_activations, model, _ = with_integer_layers(
        {"bits": 4, "granularity": "block", "block_size": 64}, feeds, tmp_path
    )
    integer_products = [node for node in model.graph if node.op_type == "MatMulInteger"]
    assert len(integer_products) == 3
    for node in integer_products:
        widen = node.inputs[1].producer()
        assert widen.op_type == "Cast" and widen.attributes["to"].as_int() == ir.DataType.INT8
        codes = widen.inputs[0].const_value
        assert codes.dtype == ir.DataType.INT4 and codes.shape[0] == node.inputs[0].producer().inputs[0].shape[-1]
    ops = {node.op_type for node in model.graph}
    assert not {"QuantizeLinear", "ReduceMax", "Abs", "Div"} & ops
    (got,) = evaluate(model, tmp_path, feeds)
    # The same codes as the weight-only model: only the activations' int8 rounding differs.
    assert relative_error(float_activations, got) < 0.015
    assert "Cast" not in fused_by_onnxruntime(model, tmp_path, integer_layers=3)


def test_an_integer_layer_takes_one_scale_per_channel_where_blocks_are_no_better_after_int8_rounding(
    tmp_path: Path,
) -> None:
    """Blocks of 4-bit codes reach the integer kernel rounded again to int8 per channel; codes with
    one scale per channel reach it exactly and store fewer scales and nodes. With calibration data,
    each integer layer keeps whichever has the smaller output error once the bits the blocks add
    are priced in (both errors and those bits in the report)."""
    from onnxcompress.calibration import Calibration, Feeds

    def layer(weight: np.ndarray) -> ir.Model:
        return text_model(
            """
            <ir_version: 8, opset_import: ["" : 17]>
            g (float[N,64] x, float[64,32] w) => (float[N,32] y) {
              y = MatMul(x, w)
            }
            """,
            {"w": weight},
        )

    rng = np.random.default_rng(7)
    x = rng.standard_normal((512, 64)).astype(np.float32)
    # On a per-channel 4-bit grid already: one scale per channel is exact, blocks are not.
    on_grid = (rng.integers(-7, 8, (64, 32)) * rng.uniform(0.01, 0.1, 32)).astype(np.float32)
    # Input blocks of very different magnitudes, each as loud in the output (its inputs 33x the
    # others'): one scale per channel would flatten the small weights. (At 100x, the int8 rounding
    # at load, its scale wide enough for the pairs of codes to stay within the kernel's 16 bits,
    # flattens them either way.)
    uneven = (rng.standard_normal((64, 32)) * np.repeat([1.0, 0.03], 32)[:, None]).astype(np.float32)
    loud = x * np.repeat([1.0, 33.0], 32).astype(np.float32)
    config = Quantize.Config(
        bits=4, granularity="block", block_size=32, block_axis="reduction", activations="dynamic", smoothing=False
    )
    # Alike blocks: one scale per channel is a little worse, and the blocks' 32 more scales and
    # decoding graph (1.06 bits a weight here) are not worth that little.
    alike = rng.standard_normal((64, 32)).astype(np.float32)
    expected_granularity = {"on_grid": "channel", "uneven": "block", "alike": "channel"}
    for name, weight, rows in (("on_grid", on_grid, x), ("uneven", uneven, loud), ("alike", alike, x)):
        model = layer(weight)
        calibration = PassContext(calibration=Calibration(Feeds({"x": rows}, "test")))
        entry = Quantize(config, calibration)(model).stats["tensors"]["w"]
        errors = entry["integer_scale_errors"]
        assert entry["form"] == "dynamic" and entry["granularity"] == expected_granularity[name], (name, errors)
        assert (errors["channel"] <= errors["blocks"]) == (name == "on_grid")
        assert errors["bits_the_blocks_add"] == pytest.approx(8 * (64 * 2 - 32 * 2 + 207) / (64 * 32), abs=1e-3)
        if name == "alike":
            assert errors["blocks"] < errors["channel"] < 1.1 * errors["blocks"]
        if name == "on_grid":
            assert errors["channel"] < 1e-6 < errors["blocks"]
            widen = next(node for node in model.graph if node.op_type == "MatMulInteger").inputs[1].producer()
            assert widen.op_type == "Cast" and widen.inputs[0].const_value.dtype == ir.DataType.INT4
            (got,) = evaluate(model, tmp_path, {"x": x})
            assert relative_error(x @ weight, got) < 0.01  # only the activations' int8 rounding


def test_a_dead_output_channel_of_a_4_bit_integer_layer_stays_zero(tmp_path: Path) -> None:
    """An all-zero output channel would give its int8 scale 0 and its codes 0/0 (what QuantizeLinear
    makes of NaN is unspecified): the graph floors the channel's peak at a tiny value instead, and
    the channel's outputs stay exactly zero."""
    weights = {
        "w_mm": RNG.standard_normal((64, 32)).astype(np.float32),
        "w_gemm": RNG.standard_normal((16, 32)).astype(np.float32),
        "b": RNG.standard_normal(16).astype(np.float32),
        "w_gemm_t": RNG.standard_normal((32, 8)).astype(np.float32),
    }
    weights["w_mm"][:, 5] = 0.0  # output channel 5 of the first product never fires
    config = Quantize.Config(bits=4, granularity="block", block_size=16, activations="dynamic")
    model = text_model(LINEAR, weights)
    Quantize(config)(model)
    assert [node.op_type for node in model.graph].count("Max") == 1  # only the layer with a dead channel
    feeds = {"x": RNG.standard_normal((20, 64)).astype(np.float32)}
    path = save_model(model, tmp_path / "dead.onnx")
    for level in ("disable", "all"):
        (got,) = runtime.make_session(path, level).run(None, feeds)
        assert np.isfinite(got).all()
    probe = text_model(LINEAR.replace("(float[N,8] y)", "(float[N,8] y, float[N,32] h)"), weights)
    Quantize(config)(probe)
    hidden = runtime.make_session(save_model(probe, tmp_path / "probe.onnx"), "all").run(["h"], feeds)[0]
    assert not hidden[:, 5].any() and hidden[:, 4].any()


def test_auto_table_granularity_keeps_per_row_scales_for_outlier_rows() -> None:
    model = table_model()  # two item_table rows are 100x larger than the rest; users rows are alike
    result = Quantize(Quantize.Config(fold_tables_below=0))(model)
    users, items = result.stats["tensors"]["users"], result.stats["tensors"]["item_table"]
    assert users["granularity"] == "tensor" and users["relative_error"]["tensor"] <= 0.03
    assert items["granularity"] == "row" and items["relative_error"]["tensor"] > 0.03
    assert tuple(model.graph.initializers["users_scale"].const_value.shape) == ()
    # one scale: the lookup is a Gather of int8 rows and one DequantizeLinear, no scale Gather
    users_gathers = [n for n in model.graph if n.op_type == "Gather" and n.inputs[0].name.startswith("users")]
    assert [n.inputs[0].name for n in users_gathers] == ["users_q", "users_q"]


def test_remaining_floats_are_stored_as_float16_and_cast_back(tmp_path: Path) -> None:
    feeds = {"x": RNG.standard_normal((20, 64)).astype(np.float32)}
    (expected,) = evaluate(linear_model(), tmp_path, feeds)
    model = linear_model()
    result = Quantize(Quantize.Config(op_types=("MatMul",)))(model)  # the Gemm weights stay float
    # w_gemm (512 values), w_gemm_t (256), w_mm's 32 channel scales and b's 16 (FLOAT16_MIN_VALUES)
    assert result.stats["float16_tensors"] == 4
    assert model.graph.initializers["w_mm_scale_f16"].const_value.dtype == ir.DataType.FLOAT16
    assert model.graph.initializers["w_gemm_f16"].const_value.dtype == ir.DataType.FLOAT16
    assert model.graph.initializers["b_f16"].const_value.dtype == ir.DataType.FLOAT16
    (got,) = evaluate(model, tmp_path, feeds)
    assert relative_error(expected, got) < 0.01


def test_smoothing_folds_into_tables_before_they_are_stacked_and_rescales_their_hessians() -> None:
    """An integer layer reading two concatenated lookups: its smoothing factors go into the tables'
    columns while each is still a constant of its own (stacked first, each part took a Mul: MMoE
    int4 ran one row at 0.89x the original's speed), and each table's lookup Hessian follows its
    columns, ``diag(1/f) H diag(1/f)``."""
    from onnxcompress.numerics.quant import ActivationPlan

    rng = np.random.default_rng(3)
    tables = {
        "t1": rng.standard_normal((40, 8)).astype(np.float32),
        "t2": rng.standard_normal((30, 8)).astype(np.float32),
    }
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N] a, int64[N] b, float[40,8] t1, float[30,8] t2, float[16,4] w) => (float[N,4] y) {
          x1 = Gather(t1, a)
          x2 = Gather(t2, b)
          x = Concat <axis = 1> (x1, x2)
          y = MatMul(x, w)
        }
        """,
        {**tables, "w": rng.standard_normal((16, 4)).astype(np.float32)},
    )
    for node in model.graph:  # shapes as an exporter declares them: the Concat splits the factors by width
        if node.op_type in ("Gather", "Concat"):
            node.outputs[0].shape = ir.Shape(["N", 8 if node.op_type == "Gather" else 16])
    quantize = Quantize(Quantize.Config(embedding_bits=4, fold_tables_below=1 << 20, low_bit_min_elements=1))
    selected, _ = quantize._select(model)
    hessians = {name: rng.standard_normal((8, 8)) for name in tables}
    quantize._lookup_hessians = {name: [(len(tables[name]), h @ h.T)] for name, h in hessians.items()}
    scales = rng.uniform(0.5, 2.0, 16)
    quantize._activation_plans = {"w": ActivationPlan(scales, 0.0, 0.0)}
    quantize._integer_layers = {"w"}
    assert quantize._apply_smoothing(model.graph, selected) == {"w": "folded"}
    assert [node.op_type for node in model.graph].count("Mul") == 0
    for index, name in enumerate(tables):
        factors = 1.0 / scales[8 * index : 8 * index + 8]
        np.testing.assert_allclose(
            model.graph.initializers[name].const_value.numpy(), tables[name] * factors, rtol=1e-6
        )
        ((_, rescaled),) = quantize._lookup_hessians[name]
        h = hessians[name] @ hessians[name].T
        np.testing.assert_allclose(rescaled, h / np.outer(factors, factors), rtol=1e-6)
    plan = {value: 4 for value in selected}
    assert quantize._stack_tables(model, selected, plan)  # stacked after, as one decode


def test_mmoe_int4_lookups_take_no_smoothing_mul_of_their_own(tmp_path: Path) -> None:
    """MMoE's experts read seven lookups and the dense features: with integer activations their
    smoothing folds into the (then stacked) tables; only the dense graph input keeps a Mul."""
    report = compress_with_preset("mmoe", "int4", tmp_path / "int4.onnx", "quant.activations=dynamic")
    assert report.parity.passed
    quant = report.passes[1].stats
    assert quant["tensors"]["experts.0.0.weight_fused"]["smoothing"] == "partly folded"
    assert any("stacked" in entry for entry in quant["tensors"].values())
    model = ir.load(tmp_path / "int4.onnx")
    concat = next(node for node in model.graph if node.op_type == "DynamicQuantizeLinear").inputs[0].producer()
    assert concat is not None and concat.op_type == "Concat"
    muls = [
        part.producer() for part in concat.inputs if part.producer() is not None and part.producer().op_type == "Mul"
    ]
    assert len(muls) == 1 and muls[0].inputs[0].name == "dense"


def test_auto_activations_keep_float_where_8_bit_activations_would_cost_accuracy() -> None:
    from onnxcompress.calibration import Calibration, Feeds
    from onnxcompress.passes.base import PassContext

    x = RNG.standard_normal((512, 64)).astype(np.float32)
    x[:, 0] *= 500.0  # one huge feature: a per-tensor uint8 step wipes out the others
    context = PassContext(calibration=Calibration(Feeds({"x": x}, "test")))
    model = linear_model()
    result = Quantize(Quantize.Config(activations="auto", smoothing=False), context)(model)
    w_mm = result.stats["tensors"]["w_mm"]
    assert w_mm["activation_error"] > 0.01 and w_mm["form"] == "fold"
    assert "MatMulInteger" not in {node.op_type for node in model.graph if node.outputs[0].name and "w_mm" in node.name}
    # smoothing moves the feature's range into the weights: the same layer's error more than halves
    smoothed = Quantize(Quantize.Config(activations="auto"), context)(linear_model()).stats["tensors"]["w_mm"]
    assert smoothed["activation_error_unsmoothed"] == w_mm["activation_error"]
    assert smoothed["activation_error"] < 0.5 * w_mm["activation_error"]
    without_calibration = Quantize(Quantize.Config(activations="auto"))(linear_model())
    assert {entry["form"] for entry in without_calibration.stats["tensors"].values()} == {"fold"}


@pytest.mark.parametrize("bits", [4, 1])
@pytest.mark.parametrize("fold_tables_below", [0, 1 << 20])
def test_a_scale_codebook_stores_one_byte_a_row_and_decodes_exactly(
    bits: int, fold_tables_below: int, tmp_path: Path
) -> None:
    from onnxcompress.numerics.quant import binarize_rows, dequantize_rows, quantize_rows, with_scale_codebook

    rng = np.random.default_rng(5)
    table = (rng.standard_normal((5000, 16)) * rng.lognormal(0, 1, (5000, 1))).astype(np.float32)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N] ids, float[5000,16] table) => (float[N,16] rows) {
          rows = Gather(table, ids)
        }
        """
    feeds = {"ids": rng.integers(0, 5000, 64).astype(np.int64)}
    sizes = {}
    for codebook in (False, True):
        model = text_model(text, {"table": table})
        config = Quantize.Config(
            embedding_bits=bits,
            embedding_granularity="row",
            fold_tables_below=fold_tables_below,
            scale_codebook=codebook,
        )
        stats = Quantize(config)(model).stats["tensors"]["table"]
        sizes[codebook] = stats["bytes_after"]
        got = evaluate(model, tmp_path, feeds)[0]
    index = model.graph.initializers["table_scale_index"].const_value
    book = model.graph.initializers["table_scale_codebook"].const_value
    assert book.dtype == ir.DataType.FLOAT16
    if fold_tables_below:
        # decoded whole at load: 16 scales fitted to the rows', a 4-bit index a row (its extra error
        # is worth less than the 4 bits at width 16)
        assert index.dtype == ir.DataType.UINT4 and index.size == 5000 and book.size == 16
        assert sizes[False] - sizes[True] >= 1.5 * 5000 - 32 - 64
    else:
        # looked up quantized: a Gather cannot read int4, so a uint8 index into 256 scales
        assert index.dtype == ir.DataType.UINT8 and index.size == 5000 and book.size == 256
        assert sizes[False] - sizes[True] >= 5000 - 512 - 64  # a byte a row saved, less the codebook
    if bits == 1:
        codes, alpha = binarize_rows(table, np.float16)
        from onnxcompress.numerics.quant import QuantizedRows

        snapped = with_scale_codebook(table, QuantizedRows(codes, alpha, None, 1), book.size)
        expected = (2.0 * snapped.codes - 1.0) * snapped.scale.astype(np.float64)[:, None]
    else:
        # small enough for the MSE clip search (rounding=auto), as the pass does
        plain = quantize_rows(table, 4, symmetric=False, search=True, scale_dtype=np.float16)
        expected = dequantize_rows(with_scale_codebook(table, plain, book.size))
    np.testing.assert_allclose(got, expected[feeds["ids"]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 1])
@pytest.mark.parametrize("fold_tables_below", [0, 1 << 20])
def test_product_quantized_tables_store_4_bit_indices_and_decode_to_their_centroids(
    bits: int, fold_tables_below: int, tmp_path: Path
) -> None:
    from onnxcompress.numerics.pq import product_dequantize, product_quantize

    rng = np.random.default_rng(6)
    table = (rng.standard_normal((3000, 16)) * rng.lognormal(0, 0.5, (3000, 1))).astype(np.float32)
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N,3] ids, float[3000,16] table) => (float[N,3,16] rows) {
          rows = Gather(table, ids)
        }
        """,
        {"table": table},
    )
    config = Quantize.Config(embedding_bits=bits, table_codes="pq", fold_tables_below=fold_tables_below)
    stats = Quantize(config)(model).stats["tensors"]["table"]
    dims = 4 // bits
    assert stats["granularity"] == "pq" and stats["pq"] == {"dims": dims, "centroids": 16, "sub_vectors": 16 // dims}
    assert stats["form"] == ("gathered" if fold_tables_below == 0 else "fold")
    codes = model.graph.initializers["table_pq_codes"].const_value
    assert codes.dtype == ir.DataType.UINT8 and tuple(codes.shape) == (3000, 16 // dims // 2, 1)  # two indices a byte
    # bits a value for the codes, 16 float16 centroids of 16 values per sub-space set, no per-row scale
    assert stats["bytes_after"] <= 3000 * 16 * bits / 8 + 16 * 16 * 2 + 128  # + offsets, unpacking constants
    feeds = {"ids": rng.integers(0, 3000, (20, 3)).astype(np.int64)}
    (got,) = evaluate(model, tmp_path, feeds)
    expected = product_dequantize(product_quantize(table, dims, 16))
    np.testing.assert_allclose(got, expected[feeds["ids"]], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
@pytest.mark.parametrize("fold_tables_below", [0, 1 << 20])
def test_widths_that_do_not_divide_a_byte_are_stored_as_bit_planes_and_decode_within_half_a_step(
    bits: int, fold_tables_below: int, tmp_path: Path
) -> None:
    """3 bits are a 2-bit and a 1-bit plane side by side in each row of codes (5, 6, 7 bits: 4+1,
    4+2, 4+2+1): a row costs its bits and no more, looked up by row or decoded whole."""
    from onnxcompress.numerics.quant import packed_width

    rng = np.random.default_rng(8)
    table = rng.standard_normal((3000, 16)).astype(np.float32)
    weight = rng.standard_normal((16, 8)).astype(np.float32)
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N] ids, float[3000,16] table, float[16,8] w) => (float[N,16] rows, float[N,8] y) {
          rows = Gather(table, ids)
          y = MatMul(rows, w)
        }
        """,
        {"table": table, "w": weight},
    )
    config = Quantize.Config(
        bits=bits,
        embedding_bits=bits,
        embedding_granularity="row",
        rounding="nearest",
        fold_tables_below=fold_tables_below,
    )
    stats = Quantize(config)(model).stats["tensors"]
    assert stats["table"]["bits"] == stats["w"]["bits"] == bits
    codes = model.graph.initializers["table_packed"].const_value
    assert codes.dtype == ir.DataType.UINT8 and tuple(codes.shape) == (3000, packed_width(16, bits), 1)
    assert packed_width(16, bits) == 2 * bits  # 16 codes of `bits` bits, nothing wasted
    ids = rng.integers(0, 3000, 200).astype(np.int64)
    rows, y = evaluate(model, tmp_path, {"ids": ids})
    expected = table[ids]
    half_step = np.abs(expected).max(axis=1, keepdims=True) / (2 ** (bits - 1) - 1) / 2
    assert np.all(np.abs(rows - expected) <= 1.01 * half_step + 1e-6)
    # the layer's output error is that of per-channel rounding at `bits` (uniform noise: about
    # 2.5 / (sqrt(12) (2^(bits-1) - 1)) of the weights' spread), on top of the rows' own
    layer_error = relative_error(rows @ weight, y)
    assert layer_error < 1.5 * 2.5 / (np.sqrt(12) * (2 ** (bits - 1) - 1))


@pytest.mark.parametrize(("spread", "expected"), [(1.0, "pq"), (3000.0, "row")])
def test_auto_table_codes_take_whichever_moves_the_outputs_less_once_priced(spread: float, expected: str) -> None:
    """At 2 bits, product codes against scalar rows refined against the lookups' Hessian: where the
    outputs read every direction of a row alike (``H`` the identity), product codes' error beats
    the scalar rows' once their scale and offset bits count (``2^(12 / 16)`` times their error);
    where the outputs read a few directions (eigenvalues of ``H`` spanning 3,000x; DLRM's item
    table measures 6,000x, SASRec's 260,000x), the refined rows win. Both errors are kept."""
    rng = np.random.default_rng(12)
    table = rng.standard_normal((1200, 16)).astype(np.float32)
    basis, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    hessian = basis @ np.diag(np.geomspace(1.0, 1.0 / spread, 16)) @ basis.T
    quantize = Quantize(Quantize.Config(embedding_bits=2, table_codes="auto", scale_codebook=True))
    _, granularity, errors = quantize._table_codes(table, 2, True, [(1200, hessian)])
    assert granularity == expected
    priced = errors["lookup_output_gptq"] * 2 ** (12 / 16)
    assert (priced < errors["lookup_output_pq"]) == (expected == "row")
    # without a Hessian (no calibration rows) product codes, as table_codes=pq
    assert quantize._table_codes(table, 2, True, None)[1] == "pq"


def test_auto_table_codes_let_the_mixed_search_shrink_gru4rec_further(tmp_path: Path) -> None:
    """GRU4Rec's tied 32-wide item table is read through a few directions of the session state:
    at 2 bits its refined scalar rows move the outputs 9x less than product codes (0.014 against
    0.120), so the mixed search takes it to 2 bits: 12.5x against 9.2x with product codes only."""
    ratios = {}
    for codes in ("auto", "pq"):
        report = compress_with_preset("gru4rec", "mixed", tmp_path / f"{codes}.onnx", f"quant.table_codes={codes}")
        assert report.parity.passed
        ratios[codes] = report.size_ratio
    assert ratios["auto"] > 1.2 * ratios["pq"]


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("fold_tables_below", [0, 1 << 20])
def test_a_one_value_wide_table_takes_one_scale_and_packs_its_codes_flat(
    bits: int, fold_tables_below: int, tmp_path: Path
) -> None:
    """A first-order (FM / wide part) table: a scale and offset per row would cost 3 bytes for one
    value; it takes one scale, and decoded at load its sub-byte codes pack across rows."""
    rng = np.random.default_rng(7)
    table = (rng.standard_normal((3000, 1)) * 0.1).astype(np.float32)
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N] ids, float[3000,1] first_order) => (float[N,1] weight) {
          weight = Gather(first_order, ids)
        }
        """,
        {"first_order": table},
    )
    config = Quantize.Config(embedding_bits=bits, fold_tables_below=fold_tables_below)
    stats = Quantize(config)(model).stats["tensors"]["first_order"]
    assert stats["granularity"] == "tensor"
    per_row = 1 if (bits == 8 or fold_tables_below == 0) else bits / 8  # gathered rows keep a byte each
    assert stats["bytes_after"] <= 3000 * per_row + 64
    feeds = {"ids": rng.integers(0, 3000, 50).astype(np.int64)}
    (got,) = evaluate(model, tmp_path, feeds)
    expected = table[feeds["ids"]]
    if bits == 1:  # sign times the mean magnitude
        alpha = np.float16(np.abs(table.astype(np.float64)).mean())
        np.testing.assert_allclose(got, np.where(expected >= 0, 1.0, -1.0) * np.float32(alpha), rtol=1e-6)
    else:
        step = np.abs(table).max() / (2 ** (bits - 1) - 1)
        assert np.abs(got - expected).max() <= step * 0.51


def test_three_bits_let_the_mixed_search_shrink_deepfm_further_and_stay_off_small_weights(tmp_path: Path) -> None:
    """A 3-bit rung between 4 and 2: DeepFM's 256x256 layer fails 2 bits but takes 3 (9.05x ->
    10.07x). On a small weight 3 bits' unpacking nodes outweigh the codes they save, so the search
    goes past them (the scikit-learn MLP's 64-value output layer took 135 bytes at 3 bits, 51 at 4).
    Evenly spaced codes: with fitted levels both 256x256 layers take 2 bits."""
    reports = {
        ladder: compress_with_preset(
            "deepfm", "mixed", tmp_path / f"{ladder}.onnx", f"quant.mixed_bits={ladder}", "quant.level_codes=false"
        )
        for ladder in ("8,4,2,1", "8,4,3,2,1")
    }
    assert all(report.parity.passed for report in reports.values())
    assert reports["8,4,3,2,1"].size_ratio > 1.08 * reports["8,4,2,1"].size_ratio
    assert 3 in reports["8,4,3,2,1"].passes[1].stats["mixed_precision"]["bits"].values()
    report = compress_with_preset("sklearn_mlp", "mixed", tmp_path / "mlp.onnx")
    tensors = report.passes[1].stats["tensors"]
    assert all(entry["bits"] != 3 for entry in tensors.values() if entry["bytes_before"] <= 4096)


def test_weights_too_large_for_the_mixed_search_keep_their_configured_bits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each search evaluation holds the simulated weights in float: above the cap a weight is not
    searched (on a multi-gigabyte model the search would otherwise hold every table in float)."""
    from onnxcompress import compress
    from onnxcompress.passes import quantize

    monkeypatch.setattr(quantize, "MIXED_SEARCH_MAX_BYTES", 50_000)  # the DLRM's two big tables are 60 and 108 KB
    files = model_files("dlrm")
    report = compress(
        files["onnx"],
        tmp_path / "m.onnx",
        ["quant"],
        assignments=["quant.mixed=true", "quant.embedding_bits=4"],
        feeds=files["feeds"],
        calib=files["calib"],
    )
    stats = report.passes[0].stats
    not_searched = stats["mixed_precision"]["not_searched"]
    assert sorted(not_searched) == ["embeddings.0.weight", "embeddings.1.weight"]
    assert all("kept at 4 bits" in reason for reason in not_searched.values())
    bits = {
        name: tensor["bits"] for stack, tensor in stats["tensors"].items() for name in tensor.get("stacked", [stack])
    }
    assert bits["embeddings.0.weight"] == bits["embeddings.1.weight"] == 4
    assert set(stats["mixed_precision"]["bits"]).isdisjoint(not_searched)


def test_the_mixed_search_keeps_label_flips_within_its_budget_on_the_sklearn_classifier(tmp_path: Path) -> None:
    """skl2onnx's `label` output is the thresholded probability: the rank and cosine budgets alone
    let labels flip (2.3% of them once, above the parity gate's 2%); the search counts flips. (The
    mixed preset: in max, distillation and pruning before the search flip labels of their own.)"""
    mismatch = {}
    for allowed in (1.0, 0.002):
        report = compress_with_preset(
            "sklearn_mlp",
            "mixed",
            tmp_path / f"{allowed}.onnx",
            f"quant.mixed_max_mismatch={allowed}",
            parity_rows="calib",  # judged on the rows the search saw
            force=True,
        )
        (label,) = [output for output in report.parity.outputs if output.name == "label"]
        mismatch[allowed] = label.mismatch
        quant = next(record for record in report.passes if record.name == "quant")
        assert quant.stats["mixed_precision"]["budget"]["max_mismatch"] == allowed
    assert mismatch[0.002] <= 0.002 < mismatch[1.0]


def test_the_auc_budget_bounds_the_drop_on_labelled_calibration_rows_and_replaces_the_rank_budget(
    tmp_path: Path,
) -> None:
    """quant.max_auc_drop with labels for the calibration rows (here --labels, the feeds being the
    calibration rows): the AUC drop's upper 95% bound stays within the budget; a looser budget buys
    a smaller file, and the score is no longer held to the search's Spearman of 0.998."""
    from onnxcompress import compress
    from onnxcompress.metrics import auc_difference
    from onnxcompress.presets import get_preset

    files = model_files("dlrm")
    feeds = dict(np.load(files["feeds"]))
    labels = np.load(files["labels"])[:3000]
    rows = {name: array[:3000] for name, array in feeds.items()}
    np.savez(tmp_path / "rows.npz", **rows)
    np.save(tmp_path / "labels.npy", labels)
    recipe = get_preset("mixed")
    reference = runtime.run(runtime.make_session(files["onnx"]), rows)["score"].reshape(-1)
    ratios, spearman = {}, {}
    for budget in (0.0005, 0.003):
        out = tmp_path / f"{budget}.onnx"
        report = compress(
            files["onnx"],
            out,
            list(recipe.passes),
            options=recipe.options,
            assignments=[f"quant.max_auc_drop={budget}"],
            calib=tmp_path / "rows.npz",
            labels=tmp_path / "labels.npy",
        )
        quant = next(record for record in report.passes if record.name == "quant")
        search = quant.stats["mixed_precision"]
        assert search["budget"]["max_auc_drop"] == budget
        candidate = runtime.run(runtime.make_session(out), rows)["score"].reshape(-1)
        delta, error = auc_difference(labels, reference, candidate)
        assert max(-delta, 0.0) + 1.645 * error <= budget * 1.01
        assert search["calibration_auc"]["score"]["drop_bound"] == pytest.approx(
            max(-delta, 0.0) + 1.645 * error, abs=2e-4
        )
        ratios[budget] = report.size_ratio
        spearman[budget] = report.parity.outputs[0].spearman
    assert ratios[0.003] > 1.2 * ratios[0.0005]
    assert spearman[0.003] < 0.998


def test_weights_the_mixed_search_leaves_at_8_bits_take_one_scale_per_channel(tmp_path: Path) -> None:
    """Blocks are for the low widths; at 8 bits a scale per block of 32 stored 40% more bytes than
    int8's scale per channel for no measurable gain (mixed wrote larger files than int8 on a DCN)."""
    from onnxcompress.calibration import Calibration, Feeds

    x = RNG.standard_normal((256, 64)).astype(np.float32)
    context = PassContext(calibration=Calibration(Feeds({"x": x}, "test")))
    config = Quantize.Config(mixed=True, mixed_bits=(8,), granularity="block", block_size=16)
    tensors = Quantize(config, context)(linear_model()).stats["tensors"]
    assert {(entry["bits"], entry["granularity"]) for entry in tensors.values()} == {(8, "channel")}


def test_the_mixed_search_chooses_the_same_bits_whichever_layers_go_integer(tmp_path: Path) -> None:
    """The bit widths are searched with float-activation codes; the activation check after it prices
    the integer layers' codes and activations against those. Searched with the integer codes, the
    scikit-learn MLP's first layer failed 4 bits (its labels flip), stayed at 8, and the file was
    5.5x instead of 7.2x once that layer went back to float."""
    reports = {
        activations: compress_with_preset(
            "sklearn_mlp", "mixed", tmp_path / f"{activations}.onnx", f"quant.activations={activations}", force=True
        )
        for activations in ("none", "dynamic")
    }
    bits = {
        activations: next(record for record in report.passes if record.name == "quant").stats["mixed_precision"]["bits"]
        for activations, report in reports.items()
    }
    assert bits["dynamic"] == bits["none"]
    assert bits["none"]["coefficient_folded"] == 4
    integer = next(record for record in reports["dynamic"].passes if record.name == "quant").stats["integer_layers"]
    assert integer == 3


def test_the_mixed_preset_leaves_the_sklearn_labels_a_margin_for_unseen_rows(tmp_path: Path) -> None:
    """Searched at the gate's own 1%, 1.49% of the test labels flipped and the gate failed; the
    search keeps half of it, and counts k flips of n calibration labels as (k + 1) / (n + 2): with
    fitted levels it saw 2 of 512 (0.39%), took the hidden layer to 2 bits, and 1.07% of the test
    labels flipped."""
    report = compress_with_preset("sklearn_mlp", "mixed", tmp_path / "mixed.onnx")
    assert report.parity.passed and report.written
    (label,) = [output for output in report.parity.outputs if output.name == "label"]
    assert label.mismatch is not None and label.mismatch <= 0.01
    quant = next(record for record in report.passes if record.name == "quant")
    assert quant.stats["mixed_precision"]["budget"]["max_mismatch"] == 0.005
    assert report.size_ratio > 7


def test_int8_keeps_the_wide_dlrm_within_the_auc_target(tmp_path: Path) -> None:
    """8-bit activations compound along the wide DLRM's eight-layer MLPs: at a 1% per-layer gate
    alone seven layers go integer and the model loses 0.0003+ AUC; the check of all of them
    together on the calibration rows returns the worst to float and keeps the model within target."""
    report = compress_with_preset("dlrm_wide", "int8", tmp_path / "int8.onnx")
    (score,) = report.parity.outputs
    assert score.auc_delta is not None and abs(score.auc_delta) <= 0.0003
    assert score.spearman is not None and score.spearman >= 0.9995
    quant = next(record for record in report.passes if record.name == "quant")
    activations = quant.stats["activations"]
    # the activations may cost 1 - 0.9998 of rank correlation on top of what the 8-bit weights cost
    limit = activations["budget"]["min_rank_corr"]
    assert limit == pytest.approx(min(0.9998, activations["weights_only"]["min_rank_corr"] - 0.0002), abs=1e-6)
    assert 0.9997 < limit <= 0.9998 and activations["measured"]["min_rank_corr"] >= limit
    dynamic = {name: tensor for name, tensor in quant.stats["tensors"].items() if tensor.get("form") == "dynamic"}
    assert len(dynamic) == activations["integer_layers"] >= 5
    assert not set(activations["returned_to_float"]) & set(dynamic)
    for name, tensor in dynamic.items():
        assert tensor["activation_error"] <= 0.01, name
    assert report.size_ratio > 3.9


def test_the_mixed_preset_runs_the_wide_dlrms_2_bit_layers_as_integer_kernels(tmp_path: Path) -> None:
    """The mixed search takes the wide DLRM's 1024-wide layers to 2 and 3 bits. Those feed integer
    kernels (decoded and rounded to int8 at load), where onnxruntime times them faster; a layer
    whose smoothing re-rounds its few levels worse than its activations gain goes without it before
    any layer returns to float (with smoothing kept, all five returned to float). Evenly spaced codes:
    fitted levels move the outputs less, and no layer needs its smoothing dropped."""
    report = compress_with_preset("dlrm_wide", "mixed", tmp_path / "mixed.onnx", "quant.level_codes=false")
    assert report.parity.passed and report.written
    quant = next(record for record in report.passes if record.name == "quant")
    activations = quant.stats["activations"]
    dynamic = {name: tensor for name, tensor in quant.stats["tensors"].items() if tensor.get("form") == "dynamic"}
    # Which layers go integer rests on timings taken while compressing: five in an idle run.
    assert len(dynamic) == activations["integer_layers"] >= 3
    assert min(tensor["bits"] for tensor in dynamic.values()) == 2
    assert activations["unsmoothed"] and set(activations["unsmoothed"]) <= set(dynamic)
    assert activations["measured"]["min_rank_corr"] >= activations["budget"]["min_rank_corr"]
    assert report.size_ratio > 13


def test_the_mixed_search_leaves_room_for_activations_that_save_most_of_the_models_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mixed search spends its whole rank budget on the wide DLRM's widths, taking its two
    1024-wide top layers to 1 bit; their activations then cost more than the 0.0002 the activation
    budget allows on top, and they returned to float, though as integer kernels they save most of the
    model's batch time. The widths are searched again with that much room set aside, and the binary
    layers run as integer kernels, the model within the mixed budget less the activations' own."""
    costly_layers(monkeypatch, model_us=(300.0, 300.0))
    from onnxcompress.passes import quantize
    from onnxcompress.speed import LayerTiming

    us = 1e-6

    def by_size(inputs: int, outputs: int, relu: bool, example_rows: int = 1) -> LayerTiming:
        # 1024x1024: 10.5 ms a batch in float, five times faster as an integer kernel (and on one
        # row too), against a model of 30 ms a batch
        weights = inputs * outputs
        return LayerTiming(2 * us + weights * 1e-5 * us, 1 * us, weights * 0.01 * us, weights * 0.002 * us)

    monkeypatch.setattr(quantize, "probe_dynamic_matmul", by_size)
    report = compress_with_preset("dlrm_wide", "mixed", tmp_path / "mixed.onnx")
    assert report.parity.passed and report.written
    quant = next(record for record in report.passes if record.name == "quant").stats
    activations, search = quant["activations"], quant["mixed_precision"]
    binary = {"top.3.weight_folded", "top.6.weight_folded"}  # 1024x1024 and 1024x512
    assert {search["bits"][name] for name in binary} == {1}
    assert set(activations["reserved_for"]) <= binary and search["searches"] >= 2
    room = activations["reserve"]["min_rank_corr"]
    assert 0 < room <= 0.001 and search["budget"]["min_rank_corr"] == pytest.approx(0.998 + room, abs=1e-6)
    dynamic = {name for name, tensor in quant["tensors"].items() if tensor.get("form") == "dynamic"}
    assert binary <= dynamic and not set(activations["returned_to_float"]) & binary
    # what the widths left, the activations took, and no more than the budget the two always had
    assert activations["weights_only"]["min_rank_corr"] >= 0.998 + room - 1e-6
    assert activations["measured"]["min_rank_corr"] >= activations["budget"]["min_rank_corr"] >= 0.9978 - 1e-6
    assert report.size_ratio > 20


def test_a_stricter_activation_budget_returns_more_layers_to_float(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Timings fixed: every layer probes faster, so the budgets alone decide which stay integer
    # (with the probe's own timings, both kept the same four layers under load).
    costly_layers(monkeypatch, model_us=(10.0, 12.6))
    loose = compress_with_preset("dlrm_wide", "int8", tmp_path / "a.onnx", "quant.activation_min_rank_corr=0.999")
    strict = compress_with_preset("dlrm_wide", "int8", tmp_path / "b.onnx", "quant.activation_min_rank_corr=0.99998")
    figures = [next(r for r in report.passes if r.name == "quant").stats["activations"] for report in (loose, strict)]
    # (layers the stricter budget returned to float may make room for others the probe left out)
    assert len(figures[0]["returned_to_float"]) < len(figures[1]["returned_to_float"])
    strict_limit = figures[1]["budget"]["min_rank_corr"]
    assert strict_limit <= 0.99998 and strict_limit > figures[0]["budget"]["min_rank_corr"]
    assert figures[1]["measured"]["min_rank_corr"] >= strict_limit or figures[1]["integer_layers"] == 0
    (loose_score,), (strict_score,) = loose.parity.outputs, strict.parity.outputs
    assert strict_score.spearman is not None and loose_score.spearman is not None
    assert strict_score.spearman > loose_score.spearman


@pytest.mark.parametrize(("inputs", "blocks", "padding"), [(75, 3, 0), (137, 5, 3), (64, 2, 0)])
def test_block_granularity_splits_odd_widths_into_equal_padded_blocks(
    inputs: int, blocks: int, padding: int, tmp_path: Path
) -> None:
    """First layers read concatenated features of odd width: they get equal blocks of at most
    block_size (padded with zero columns that are sliced off), not one scale per channel."""
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((inputs, 16)).astype(np.float32)
    weight[:, :4] *= 8.0  # columns of very different ranges: blocks beat one scale per channel

    def model() -> ir.Model:
        built = ir.from_onnx_text(
            f'<ir_version: 10, opset_import: ["" : 21]>\nm (float[N,{inputs}] x) => (float[N,16] y) {{ y = MatMul(x, w) }}'
        )
        w = ir.Value(name="w", const_value=ir.tensor(weight, name="w"))
        built.graph.register_initializer(w)
        built.graph.node(0).replace_input_with(1, w)
        return built

    feeds = {"x": rng.standard_normal((30, inputs)).astype(np.float32)}
    (expected,) = evaluate(model(), tmp_path, feeds)
    errors = {}
    for granularity in ("block", "channel"):
        quantized = model()
        result = Quantize(Quantize.Config(bits=4, granularity=granularity, block_size=32, rounding="nearest"))(
            quantized
        )
        codes = next(v.const_value for v in quantized.graph.initializers.values() if v.const_value.size >= inputs * 8)
        if granularity == "block":
            assert result.stats["tensors"]["w"]["granularity"] == "block"
            assert codes.size == 16 * (inputs + padding)
            scales = [v for v in quantized.graph.initializers.values() if v.const_value.size == 16 * blocks]
            assert scales, "one scale per output channel and block"
        (got,) = evaluate(quantized, tmp_path, feeds)
        errors[granularity] = relative_error(expected, got)
    assert errors["block"] < errors["channel"]


def test_int8_keras_graph_stores_weights_as_matmul_reads_them_and_folds_the_batch_norm(tmp_path: Path) -> None:
    """On the tf2onnx Wide&Deep: the batch norm after the first Dense's ReLU folds into the next
    layer, and per-channel MatMul weights are stored [inputs, outputs] (no Transpose to store)."""
    import onnx

    out = tmp_path / "int8.onnx"
    report = compress_with_preset("keras_wide_deep", "int8", out)
    assert report.parity.passed
    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    assert "Transpose" not in ops
    relu = [index for index, op in enumerate(ops) if op == "Relu"]
    assert len(relu) == 3
    # nothing but the next layer's quantized-input op (or its weight decode) after each ReLU
    assert all(ops[index + 1] in ("DynamicQuantizeLinear", "MatMul", "Cast") for index in relu[:2])
    assert report.size_ratio > 3.88


@pytest.mark.parametrize("rows", [CODEBOOK_MIN_ROWS - 1, CODEBOOK_MIN_ROWS])
def test_a_scale_codebook_is_used_from_the_row_count_where_it_pays(rows: int) -> None:
    rng = np.random.default_rng(6)
    table = (rng.standard_normal((rows, 16)) * rng.lognormal(0, 1, (rows, 1))).astype(np.float32)
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N] ids, float[{rows},16] table) => (float[N,16] out) {{
          out = Gather(table, ids)
        }}
        """
    sizes = {}
    for codebook in (False, True):
        model = text_model(text, {"table": table})
        config = Quantize.Config(
            embedding_bits=4, embedding_granularity="row", scale_codebook=codebook, fold_tables_below=0
        )
        sizes[codebook] = Quantize(config)(model).stats["tensors"]["table"]["bytes_after"]
    used = "table_scale_codebook" in model.graph.initializers
    assert used == (rows >= CODEBOOK_MIN_ROWS)
    if used:
        assert sizes[True] < sizes[False] - 100  # a byte a row, less the 512-byte codebook
    else:
        assert sizes[True] == sizes[False]


@pytest.mark.parametrize(("width", "chosen"), [(16, 16), (64, 256)])
def test_a_table_decoded_whole_takes_a_4_bit_scale_index_where_its_error_is_worth_the_bits(
    width: int, chosen: int, tmp_path: Path
) -> None:
    """A 16-entry codebook adds row error; it is taken when the error ratio is under 2^(4/width)
    (the 4 bits a row it saves, over the row's values): at width 16, not at width 64."""
    from onnxcompress.numerics.quant import cheapest_scale_storage

    rng = np.random.default_rng(8)
    rows = 2000
    table = (rng.standard_normal((rows, width)) * rng.lognormal(0, 1, (rows, 1))).astype(np.float32)
    model = text_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N] ids, float[{rows},{width}] table) => (float[N,{width}] out) {{
          out = Gather(table, ids)
        }}
        """,
        {"table": table},
    )
    config = Quantize.Config(embedding_bits=4, embedding_granularity="row", scale_codebook=True)
    stats = Quantize(config)(model).stats["tensors"]["table"]
    errors = stats["relative_error"]
    assert stats["form"] == "fold" and stats["scale_codebook"] == chosen
    tried = {None: errors["scales_float"], 256: errors["scales_codebook_256"], 16: errors["scales_codebook_16"]}
    assert cheapest_scale_storage(tried, rows, width) == chosen
    assert errors["scales_codebook_256"] < errors["scales_codebook_16"] < 1.25 * errors["scales_codebook_256"]
    ids = rng.integers(0, rows, 50).astype(np.int64)
    got = evaluate(model, tmp_path, {"ids": ids})[0]
    assert relative_error(table[ids], got) < 1.3 * errors["scales_codebook_256"]


def test_low_bits_skip_weights_too_small_to_pay_for_their_error() -> None:
    model = linear_model()  # w_mm 2048 values, w_gemm 512, w_gemm_t 256
    config = Quantize.Config(bits=4, granularity="block", block_size=16, low_bit_min_elements=1024)
    tensors = Quantize(config)(model).stats["tensors"]
    assert {name: tensor["bits"] for name, tensor in tensors.items()} == {"w_mm": 4, "w_gemm": 8, "w_gemm_t": 8}
    assert model.graph.initializers["w_mm_q"].const_value.dtype == ir.DataType.INT4


def test_the_int4_preset_keeps_the_wide_logit_at_8_bits(tmp_path: Path) -> None:
    """Keras Wide&Deep's wide part is one 25-input logit added to the score: at 4 bits it alone
    moved AUC by 0.0015 to save 12 bytes."""
    report = compress_with_preset("keras_wide_deep", "int4", tmp_path / "int4.onnx")
    tensors = next(record for record in report.passes if record.name == "quant").stats["tensors"]
    bits = {
        name.split("/")[1]: tensor["bits"]
        for stack, tensor in tensors.items()
        for name in tensor.get("stacked", [stack])
    }
    assert bits["wide_logit"] == 8 and bits["deep_logit"] == 8 and bits["deep_256"] == 4
    # the user and item tables in one 4-bit stack; the small 4-wide ones, 192 values together, each
    # alone at 8 bits
    assert bits["item_embedding"] == 4 and bits["user_embedding"] == 4 and bits["gender_embedding"] == 8
    assert bits["occupation_embedding"] == 8 and bits["zip_region_embedding"] == 8
    assert report.parity.passed and report.size_ratio > 6.2


def test_a_layer_goes_unsmoothed_when_its_smoothing_would_need_a_mul_and_the_error_allows() -> None:
    """w_mm reads the graph input: its smoothing cannot fold upstream and would be a Mul, one more
    pass over the activations; within the tolerance the layer takes the unsmoothed plan instead."""
    from onnxcompress.calibration import Calibration, Feeds
    from onnxcompress.passes.base import PassContext

    x = np.random.default_rng(0).standard_normal((512, 64)).astype(np.float32)
    x[:, 0] *= 2.0  # a mild outlier: smoothing helps, but the unsmoothed error is acceptable too
    context = PassContext(calibration=Calibration(Feeds({"x": x}, "test")))
    strict = Quantize(Quantize.Config(activations="auto", activation_tolerance=0.01), context)(linear_model())
    smoothed = strict.stats["tensors"]["w_mm"]
    assert smoothed["activation_error"] < 0.01 < smoothed["activation_error_unsmoothed"]  # smoothing needed
    loose = Quantize(Quantize.Config(activations="auto", activation_tolerance=0.02), context)(linear_model())
    plain = loose.stats["tensors"]["w_mm"]
    assert "activation_error_unsmoothed" not in plain
    assert plain["activation_error"] == smoothed["activation_error_unsmoothed"]


def test_int4_first_layers_take_a_scale_per_input_where_that_fits_the_calibration_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The skl2onnx MLP's first layer reads 75 one-hot and dense columns: blocks of outputs per input
    follow their different magnitudes. Its int4 model passed no parity gate with blocks of inputs
    (Spearman 0.9984, 2% of labels flipped); with them it does. The narrow second layer, whose
    inputs are alike, on integer kernels takes one scale per channel: blocks would be 15% closer but
    cost 0.7 bits a weight. Timings fixed as measured on this machine (its second layer on integer
    kernels): which layers go integer is not what this checks."""
    costly_layers(monkeypatch, model_us=(6.1, 6.4))
    chosen = compress_with_preset("sklearn_mlp", "int4", tmp_path / "auto.onnx")
    reduction = compress_with_preset(
        "sklearn_mlp", "int4", tmp_path / "reduction.onnx", "quant.block_axis=reduction", force=True
    )
    tensors = next(r for r in chosen.passes if r.name == "quant").stats["tensors"]
    assert tensors["coefficient_folded"]["granularity"] == "block_outputs"
    assert tensors["coefficient1_folded"]["granularity"] == "channel"
    assert chosen.parity.passed
    probability = next(output for output in chosen.parity.outputs if output.spearman is not None)
    baseline = next(output for output in reduction.parity.outputs if output.spearman is not None)
    assert probability.spearman > baseline.spearman + 0.0005
    # no more scales (110 outputs: 4 blocks of 32, 18 padding codes an input, against 330 scales)
    assert chosen.output_bytes <= 1.08 * reduction.output_bytes


def test_output_blocks_decode_for_gemm_with_transposed_weights(tmp_path: Path) -> None:
    """DLRM's TorchScript layers are Gemm with transB=1 ([outputs, inputs]): forced blocks of outputs
    decode as [inputs, outputs], which those Gemms read once their transB is cleared (no Transpose
    to store); the model keeps its ranking."""
    import onnx

    out = tmp_path / "forced.onnx"
    report = compress_with_preset("dlrm", "int4", out, "quant.block_axis=output")
    tensors = next(r for r in report.passes if r.name == "quant").stats["tensors"]
    forced = [name for name, stats in tensors.items() if stats["granularity"] == "block_outputs"]
    assert "bottom.0.weight" in forced and "top.0.weight" in forced
    assert report.parity.passed
    nodes = onnx.load(str(out)).graph.node
    gemms = [node for node in nodes if node.op_type == "Gemm"]
    transposed = [node for node in gemms if any(a.name == "transB" and a.i for a in node.attribute)]
    assert len(gemms) >= 2 and len(transposed) <= len(gemms) - 2
    # the Transpose left is the exported interaction's; one a forced layer needed sat before a Gemm
    assert not any(node.op_type == "Transpose" and node.output[0] in gemm.input for node in nodes for gemm in gemms)


def test_int4_deepfm_is_seven_times_smaller_within_a_thousandth_of_auc(tmp_path: Path) -> None:
    """Scales of the 256x256 layers (2,048 blocks each) as one-byte codebook indices, table rows
    without zero points and with a 4-bit index into 16 scales: 4.25 and 4.25 bits a weight; on
    integer kernels, one scale per channel where the blocks' bytes are not worth their error."""
    import onnx

    out = tmp_path / "int4.onnx"
    report = compress_with_preset("deepfm", "int4", out)
    tensors = next(r for r in report.passes if r.name == "quant").stats["tensors"]
    for name in ("mlp.4.weight_folded", "mlp.8.weight_folded"):
        if tensors[name]["granularity"] == "channel":
            errors = tensors[name]["integer_scale_errors"]
            assert errors["blocks"] < errors["channel"] < errors["blocks"] * 2 ** (errors["bits_the_blocks_add"] / 2)
        else:
            assert tensors[name].get("scale_codebook")
    assert tensors["embedding.weight"]["granularity"] == "row"
    for name in ("mlp.0.weight_folded", "mlp.4.weight_folded", "mlp.8.weight_folded"):
        errors = tensors[name]["calibration_output_error"]  # the report gives both roundings
        assert 0 < errors["gptq"] < 0.6 * errors["nearest"]
    table_zero_points = [
        init for init in onnx.load(str(out)).graph.initializer if list(init.dims) in ([2675], [2675, 1])
    ]
    assert [onnx.TensorProto.DataType.Name(init.data_type) for init in table_zero_points] == ["UINT4"]  # the index
    assert tensors["embedding.weight"]["scale_codebook"] == 16
    # the 256-wide MLP layers read int8 rounded from their 4-bit blocks at load: integer kernels
    assert {tensors[name]["form"] for name in ("mlp.4.weight_folded", "mlp.8.weight_folded")} == {"dynamic"}
    (score,) = report.parity.outputs
    assert report.parity.passed and score.auc_delta is not None and abs(score.auc_delta) <= 0.001
    assert report.size_ratio >= 6.9  # 7.0x and up with two integer layers; how many is the speed probe's call


def test_int4_sasrec_encoder_stores_its_additive_causal_mask_as_nodes_and_is_seven_times_smaller(
    tmp_path: Path,
) -> None:
    """nn.TransformerEncoderLayer under TorchScript: a [1, 20, 20] float mask of 0 and -inf (1.6 KB,
    3% of the int4 file) becomes a Where on a Trilu. Float activations, so that the speed probe's
    choice of integer layers (up to 0.27x of ratio on this model) does not move the figure."""
    report = compress_with_preset("sasrec_encoder", "int4", tmp_path / "int4.onnx", "quant.activations=none")
    final = next(record for record in report.passes if record.name == "cleanup@final")
    assert final.stats["masks_compacted"] == 1
    (score,) = report.parity.outputs
    assert report.parity.passed and score.auc_delta is not None and abs(score.auc_delta) <= 0.001
    assert report.size_ratio >= 7.15


@pytest.mark.parametrize(("width", "offsets_kept"), [(16, False), (64, True)])
def test_table_offsets_are_dropped_where_they_cost_more_bits_than_the_error_they_save(
    width: int, offsets_kept: bool
) -> None:
    """Centred rows at 4 bits: without a per-row offset the error grows about 1.15x; the offset is
    8/width bits a value, worth a factor 2^(8/width) of error: 1.41 at width 16 (dropped), 1.09 at
    width 64 (kept)."""
    rng = np.random.default_rng(11)
    table = (rng.standard_normal((2000, width)) * rng.lognormal(0, 0.5, (2000, 1))).astype(np.float32)
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N] ids, float[2000,{width}] table) => (float[N,{width}] out) {{
          out = Gather(table, ids)
        }}
        """
    model = text_model(text, {"table": table})
    config = Quantize.Config(embedding_bits=4, embedding_granularity="row", embedding_symmetric="auto")
    stats = Quantize(config)(model).stats["tensors"]["table"]
    errors = stats["relative_error"]
    assert 1.05 < errors["row_symmetric"] / errors["row_offset"] < 1.3
    zero_points = [name for name in model.graph.initializers if "zero_point" in name]
    assert bool(zero_points) == offsets_kept


def test_equalized_dlrm_layers_store_one_scale_and_run_one_scale_integer_kernels(tmp_path: Path) -> None:
    """Cross-layer equalisation on the DLRM's MLPs (8 bits): each layer that feeds another through
    a ReLU hands its unit ranges to the next layer's input rows, stores one scale instead of one per
    channel, and the integer layer among them gets a single weight scale (onnxruntime's faster
    form). The file is smaller at the same fidelity."""
    import onnx

    reports = {
        equalize: compress_with_preset("dlrm", "int8", tmp_path / f"{equalize}.onnx", f"quant.equalize={equalize}")
        for equalize in (True, False)
    }
    quant = next(record for record in reports[True].passes if record.name == "quant")
    equalized = {name: tensor for name, tensor in quant.stats["tensors"].items() if "equalized_into" in tensor}
    # bottom MLP 25-64-32-16: two links; top MLP 44-128-64-1: the link into the smoothed integer
    # layer is left to its smoothing, the integer layer hands its units to the logit layer
    # (whether it goes integer is the speed probe's call)
    smoothed = "smoothing" in quant.stats["tensors"]["top.2.weight"]
    expected = {"bottom.0.weight", "bottom.2.weight", "top.2.weight"} | (set() if smoothed else {"top.0.weight"})
    assert set(equalized) == expected
    assert all(tensor["granularity"] == "tensor" for tensor in equalized.values())
    graph = onnx.load(str(tmp_path / "True.onnx")).graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:  # an integer layer that hands its units on runs with one weight scale
        if node.op_type == "MatMulInteger":
            (scale_mul,) = [user for user in graph.node if node.output[0] in user.input]  # the Cast
            (product,) = [user for user in graph.node if scale_mul.output[0] in user.input]
            factor = next(user for user in graph.node if user.output[0] in product.input[1:])
            weight_scale = constants[factor.input[1]]
            assert list(weight_scale.dims) == []
    for report in reports.values():
        (score,) = report.parity.outputs
        assert report.parity.passed and score.auc_delta is not None and abs(score.auc_delta) <= 0.0003
    (with_eq,), (without,) = reports[True].parity.outputs, reports[False].parity.outputs
    assert with_eq.spearman is not None and without.spearman is not None
    assert with_eq.spearman >= without.spearman - 0.00005
    assert (tmp_path / "True.onnx").stat().st_size < (tmp_path / "False.onnx").stat().st_size - 300


def test_a_constant_table_added_to_activations_is_quantized_as_a_table(tmp_path: Path) -> None:
    """A positional embedding the exporter folded into a constant ([T, D], added to the looked-up
    items) is a table: stored at 8 bits and decoded whole (folded at load). A bias (one row) and a
    constant added to a constant are left alone."""
    rng = np.random.default_rng(4)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N,20] ids, float[100,32] items, float[20,32] positions, float[1,32] bias, float[20,32] other) => (float[N,20,32] y, float[20,32] z) {
          looked_up = Gather(items, ids)
          placed = Add(looked_up, positions)
          y = Add(placed, bias)
          z = Add(other, other)
        }
        """
    constants = {
        "items": rng.standard_normal((100, 32)).astype(np.float32),
        "positions": rng.standard_normal((20, 32)).astype(np.float32),
        "bias": rng.standard_normal((1, 32)).astype(np.float32),
        "other": rng.standard_normal((20, 32)).astype(np.float32),
    }
    feeds = {"ids": rng.integers(0, 100, (3, 20)).astype(np.int64)}
    expected = evaluate(text_model(text, constants), tmp_path, feeds)
    model = text_model(text, constants)
    result = Quantize(Quantize.Config(float_storage="float32"))(model)
    assert set(result.stats["tensors"]) == {"items", "positions"}
    assert result.stats["tensors"]["positions"]["bits"] == 8
    assert {"bias", "other"} <= set(model.graph.initializers)
    stored = [value.const_value for value in model.graph.initializers.values() if value.name.startswith("positions")]
    assert any(tensor.dtype == ir.DataType.INT8 and tensor.shape == (20, 32) for tensor in stored)
    got = evaluate(model, tmp_path, feeds)
    assert relative_error(expected[0], got[0]) < 0.01
    np.testing.assert_array_equal(expected[1], got[1])
    excluded = text_model(text, constants)
    result = Quantize(Quantize.Config(op_types=("Gather",)))(excluded)
    assert result.stats["skipped"]["positions"] == "op type not in quant.op_types"


def test_4_bit_layers_do_not_take_smoothing_factors_their_blocks_cannot_absorb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Smoothing an integer layer folds factors into the output channels of the layer before it.
    Below 8 bits those channels share block scales, so the factors cost that layer accuracy: where
    the integer layer's unsmoothed error is within tolerance it goes unsmoothed (Wide&Deep int4:
    the first layer's output error 0.043 -> 0.039 and ΔAUC -0.0012 -> -0.0004). Two of the
    layers go integer, as on this machine (a third costs about 200 bytes of nodes)."""
    costly_layers(monkeypatch, model_us=(12.0, 12.6))
    report = compress_with_preset("keras_wide_deep", "int4", tmp_path / "int4.onnx")
    quant = next(record for record in report.passes if record.name == "quant")
    tensors = quant.stats["tensors"]
    # planned for every integer candidate, whichever the speed probe then picks
    after_a_layer = [name for name in tensors if "deep_128" in name or "deep_64" in name]
    assert len(after_a_layer) == 2
    for name in after_a_layer:
        assert "activation_error_unsmoothed" not in tensors[name] and "smoothing" not in tensors[name], name
        assert tensors[name]["activation_error"] <= 0.01
    first = next(tensor for name, tensor in tensors.items() if "deep_256" in name)
    assert first["calibration_output_error"]["gptq"] < 0.041
    (score,) = report.parity.outputs
    assert report.parity.passed and score.auc_delta is not None and abs(score.auc_delta) <= 0.001
    assert quant.stats["integer_layers"] == 2
    assert report.size_ratio >= 7.0


def costly_layers(monkeypatch: pytest.MonkeyPatch, model_us: tuple[float, float] | None = None) -> None:
    """Every layer probes 1.5x faster on a batch and 0.7 µs slower on one row (the scikit-learn MLP's
    layers on this machine), so which figures are reported does not depend on the machine's load;
    with ``model_us`` (float model, original) the models' one-row times are fixed too, and with
    them which layers go integer (copies timed with more integer layers take a millisecond: none
    is added beyond the probe's choice, and smoothed integer layers halve the model's batch time)."""
    from onnxcompress.passes import quantize
    from onnxcompress.speed import LayerTiming, ModelTiming

    us = 1e-6
    monkeypatch.setattr(quantize, "probe_dynamic_matmul", lambda *args: LayerTiming(4 * us, 4.7 * us, 45 * us, 30 * us))
    if model_us is not None:
        timings = [ModelTiming(seconds * us, 100 * seconds * us) for seconds in model_us]
        slow = ModelTiming(1000 * us, 1000 * us)

        def fixed(models: list[object], feeds: object) -> list[ModelTiming]:
            if len(models) == 2 and all(isinstance(model, ir.Model) for model in models):
                return [timings[0], ModelTiming(timings[0].single, timings[0].batch / 2)]  # smoothed layers pay
            if isinstance(models[0], ir.Model):  # the float model, then the original file
                return timings[: len(models)]
            return [timings[1]] + [slow] * (len(models) - 1)  # the original, then copies to time

        monkeypatch.setattr(quantize, "model_timings", fixed)
        monkeypatch.setattr(quantize, "model_timing", lambda model, feeds: timings[0])


def test_the_latency_budget_is_measured_against_the_original_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scikit-learn MLP's layers each cost about 0.7 µs on one row as integer kernels, more than
    8% of the cleaned float model; the original file is timed beside it, so what cleanup saved
    counts towards the budget and the report gives both."""
    costly_layers(monkeypatch)
    report = compress_with_preset("sklearn_mlp", "int8", tmp_path / "int8.onnx")
    activations = next(record for record in report.passes if record.name == "quant").stats["activations"]
    original, current = activations["original_model_us"], activations["float_model_us"]
    assert 0 < current["single_row"] < 100 and 0 < original["single_row"] < 100
    assert current["batch"] > 0 and original["batch"] > 0


def test_without_the_original_file_the_budget_is_the_float_models_own(monkeypatch: pytest.MonkeyPatch) -> None:
    costly_layers(monkeypatch)
    model, calibration = shipped_model_with_calibration("sklearn_mlp")
    Cleanup()(model)
    result = Quantize(Quantize.Config(activations="auto"), PassContext(calibration=calibration))(model)
    activations = result.stats["activations"]
    assert "float_model_us" in activations and "original_model_us" not in activations


def test_a_layer_returned_to_float_frees_its_latency_for_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scikit-learn MLP's one-row budget (8% of 6.4 µs over the cleaned 6.1 µs) fits one 0.7 µs
    integer layer. The first flips too many labels and returns to float; the second then takes its
    place instead of the budget going unused."""
    costly_layers(monkeypatch, model_us=(6.1, 6.4))
    report = compress_with_preset("sklearn_mlp", "int8", tmp_path / "int8.onnx")
    quant = next(record for record in report.passes if record.name == "quant")
    activations = quant.stats["activations"]
    assert activations["returned_to_float"] == ["coefficient_folded"]
    forms = {name: tensor["form"] for name, tensor in quant.stats["tensors"].items()}
    assert forms["coefficient1_folded"] == "dynamic" and forms["coefficient_folded"] != "dynamic"
    assert quant.stats["integer_layers"] == 1 and report.parity.passed


def test_weights_kept_at_8_bits_for_being_small_take_a_scale_per_channel(tmp_path: Path) -> None:
    """Under int4 blocks, the weights below low_bit_min_elements stay at 8 bits with one scale per
    output channel: no block Reshape or Transpose to store."""
    model = linear_model()
    feeds = {"x": RNG.standard_normal((10, 64)).astype(np.float32)}
    expected = evaluate(model, tmp_path, feeds)
    config = Quantize.Config(bits=4, granularity="block", block_size=32, low_bit_min_elements=1024)
    tensors = Quantize(config)(model).stats["tensors"]
    assert (tensors["w_mm"]["bits"], tensors["w_mm"]["granularity"]) == (4, "block")
    for name in ("w_gemm", "w_gemm_t"):  # 512 and 256 values
        assert (tensors[name]["bits"], tensors[name]["granularity"]) == (8, "channel"), name
    assert relative_error(expected[0], evaluate(model, tmp_path, feeds)[0]) < 0.15


def _float16_export(name: str, directory: Path) -> dict[str, Path]:
    """Shipped model ``name`` as a float16 export would be: float16 weights, float inputs and outputs."""
    import onnx
    from onnx import numpy_helper

    files = model_files(name)
    model = onnx.load(files["onnx"])
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.data_type == onnx.TensorProto.FLOAT:
            array = numpy_helper.to_array(tensor).astype(np.float16)
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, tensor.name))
    for value in [*model.graph.input, *model.graph.output]:
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    del model.graph.value_info[:]
    converted = {"onnx": directory / f"{name}16.onnx", "labels": files["labels"]}
    onnx.save(model, converted["onnx"])
    for rows in ("feeds", "calib"):
        arrays = {
            key: value.astype(np.float16) if value.dtype == np.float32 else value
            for key, value in np.load(files[rows]).items()
        }
        converted[rows] = directory / f"{name}16.{rows}.npz"
        np.savez(converted[rows], **arrays)
    return converted


@pytest.mark.parametrize("preset", ["int4", "mixed"])
def test_a_float16_export_keeps_its_types_and_quantizes_every_weight(tmp_path: Path, preset: str) -> None:
    out = tmp_path / "out.onnx"
    report = compress_with_preset("dlrm", preset, out, files=_float16_export("dlrm", tmp_path))
    assert report.parity.passed
    stats = next(record.stats for record in report.passes if record.name == "quant")
    stacked = [name for tensor in stats["tensors"].values() for name in tensor.get("stacked", [])]
    if preset == "int4":  # the float16 tables stacked as float32 ones are: user and item, and the five small ones
        assert len(stacked) == 7 and stats["weights_quantized"] == 8 and not stats.get("skipped")
    else:  # tables the search gave the same bits stack too
        stacks = sum("stacked" in tensor for tensor in stats["tensors"].values())
        assert stats["weights_quantized"] == 13 - len(stacked) + stacks and not stats.get("skipped")
    saved = ir.load(out)
    assert [value.dtype for value in saved.graph.outputs] == [ir.DataType.FLOAT16]
    assert not [
        v
        for v in saved.graph.initializers.values()
        if v.const_value.dtype == ir.DataType.FLOAT16 and v.const_value.size > 1024
    ]
    # From float16, int4 is about 3.5x smaller; the mixed search goes lower.
    assert report.size_ratio > 3.3


RECURRENT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[6,N,8] x, float[1,48,8] w, float[1,48,16] r, float[1,96] b, int64[1] axis) => (float[N,16] h) {
  y, last = GRU <hidden_size = 16> (x, w, r, b)
  h = Squeeze(last, axis)
}
"""


@pytest.mark.parametrize(("bits", "limit"), [(8, 0.01), (4, 0.15)])
def test_recurrent_weights_are_quantized_per_gate_row_in_the_layout_the_op_reads(
    tmp_path: Path, bits: int, limit: float
) -> None:
    rng = np.random.default_rng(4)
    constants = {
        "w": (rng.standard_normal((1, 48, 8)) * 0.4).astype(np.float32),
        "r": (rng.standard_normal((1, 48, 16)) * 0.3).astype(np.float32),
        "b": (rng.standard_normal((1, 96)) * 0.1).astype(np.float32),
        "axis": np.array([0], np.int64),
    }
    feeds = {"x": rng.standard_normal((6, 32, 8)).astype(np.float32)}
    (expected,) = evaluate(text_model(RECURRENT, constants), tmp_path, feeds)
    model = text_model(RECURRENT, constants)
    config = Quantize.Config(bits=bits, granularity="channel", float_storage="float32", low_bit_min_elements=0)
    result = Quantize(config)(model)
    tensors = result.stats["tensors"]
    assert {name: (entry["kind"], entry["bits"]) for name, entry in tensors.items()} == {
        "w": ("recurrent", bits),
        "r": ("recurrent", bits),
    }
    assert "w" not in model.graph.initializers and "r" not in model.graph.initializers
    if bits == 8:  # one scale per gate row: 3 gates x 16 hidden units
        assert [model.graph.initializers[f"{name}_scale"].const_value.size for name in "wr"] == [48, 48]
    (got,) = evaluate(model, tmp_path, feeds)
    assert relative_error(expected, got) < limit


def test_gru4recs_recurrent_weights_go_to_four_bits_with_its_table(tmp_path: Path) -> None:
    report = compress_with_preset("gru4rec", "int4", tmp_path / "out.onnx")
    stats = next(record.stats for record in report.passes if record.name == "quant")
    recurrent = {name: entry["bits"] for name, entry in stats["tensors"].items() if entry["kind"] == "recurrent"}
    assert sorted(recurrent.values()) == [4, 4] and len(recurrent) == 2
    assert report.parity.passed and report.size_ratio > 7.0
    score = report.parity.outputs[0]
    assert abs(score.auc_candidate - score.auc_reference) < 0.001


BIDIRECTIONAL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[6,N,8] x, float[2,48,8] w, float[2,48,16] r) => (float[2,N,16] last) {
  y, last = GRU <hidden_size = 16, direction = "bidirectional"> (x, w, r)
}
"""


def test_bidirectional_recurrent_weights_keep_each_directions_gates_in_place(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    # The backward direction's weights are four times larger: with a scale shared across the
    # directions, the forward direction's error was 0.021 instead of 0.0045.
    scale = np.array([1.0, 4.0], np.float32)[:, None, None]
    constants = {
        "w": (rng.standard_normal((2, 48, 8)) * 0.3 * scale).astype(np.float32),
        "r": (rng.standard_normal((2, 48, 16)) * 0.2 * scale).astype(np.float32),
    }
    feeds = {"x": rng.standard_normal((6, 16, 8)).astype(np.float32)}
    (expected,) = evaluate(text_model(BIDIRECTIONAL, constants), tmp_path, feeds)
    model = text_model(BIDIRECTIONAL, constants)
    config = Quantize.Config(bits=8, granularity="channel", float_storage="float32", low_bit_min_elements=0)
    tensors = Quantize(config)(model).stats["tensors"]
    assert {name: entry["kind"] for name, entry in tensors.items()} == {"w": "recurrent", "r": "recurrent"}
    (got,) = evaluate(model, tmp_path, feeds)
    errors = [relative_error(expected[direction], got[direction]) for direction in (0, 1)]
    assert errors[0] < 0.01 and errors[1] < 0.05


@pytest.mark.parametrize("name", ["keras_wide_deep", "dlrm"])
def test_static_activations_write_qdq_layers_that_onnxruntime_runs_as_integer_kernels(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """activations=static on the tf2onnx Wide&Deep (MatMul + Add) and the TorchScript DLRM (Gemm):
    each layer that passes its error gate reads its input through QuantizeLinear/DequantizeLinear
    with a range fixed on the calibration rows, its int8 weight and int32 bias through
    DequantizeLinear, and its Relu's output is quantized too (followed by a float Relu, onnxruntime
    would fuse Gemm and Relu in float and dequantize the weight on every call). onnxruntime turns
    each into one QGemm (MatMulIntegerToFloat without a bias). Unlike dynamic activations, a row's score does not depend on the other
    rows of its batch. Layer timings fixed: every layer 1.5x faster on a batch, free on one row."""
    import onnx
    import onnxruntime

    from onnxcompress.passes import quantize
    from onnxcompress.speed import LayerTiming

    us = 1e-6
    monkeypatch.setattr(quantize, "probe_static_matmul", lambda *args: LayerTiming(4 * us, 4 * us, 45 * us, 30 * us))
    out = tmp_path / "static.onnx"
    report = compress_with_preset(name, "int8", out, "quant.activations=static")
    assert report.parity.passed
    tensors = next(record for record in report.passes if record.name == "quant").stats["tensors"]
    static = [tensor for tensor, stats in tensors.items() if stats.get("form") == "static"]
    assert len(static) >= 2
    assert all(tensors[tensor]["activation_error"] <= 0.01 for tensor in static)
    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    assert "DynamicQuantizeLinear" not in ops and "MatMulInteger" not in ops
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = onnxruntime.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    optimized = [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert optimized.count("QGemm") + optimized.count("MatMulIntegerToFloat") == len(static)  # without a bias
    feeds = dict(np.load(model_files(name)["feeds"]))
    batch = session.run(None, {key: value[:64] for key, value in feeds.items()})[0]
    alone = np.concatenate(
        [session.run(None, {key: value[i : i + 1] for key, value in feeds.items()})[0] for i in range(64)]
    )
    np.testing.assert_array_equal(batch, alone)


def test_static_activations_fold_gemm_alpha_and_beta_into_the_stored_scales(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Gemm with alpha and beta: alpha goes into the weight's DequantizeLinear scales, beta into
    the int32 bias, so the QDQ layer computes the same function (and is still one QGemm)."""
    import onnx
    import onnxruntime

    from onnxcompress.calibration import Calibration, Feeds
    from onnxcompress.passes import quantize
    from onnxcompress.speed import LayerTiming

    us = 1e-6
    monkeypatch.setattr(quantize, "probe_static_matmul", lambda *args: LayerTiming(4 * us, 4 * us, 45 * us, 30 * us))
    rng = np.random.default_rng(6)
    graph = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,64] x, float[64,32] w, float[32] b) => (float[N,32] y) {
          h = Gemm <alpha = 0.5, beta = 2.0> (x, w, b)
          y = Relu(h)
        }
        """
    weights = {"w": rng.standard_normal((64, 32)).astype(np.float32), "b": rng.standard_normal(32).astype(np.float32)}
    x = np.maximum(rng.standard_normal((512, 64)), 0).astype(np.float32)
    (expected,) = evaluate(text_model(graph, weights), tmp_path, {"x": x})
    model = text_model(graph, weights)
    context = PassContext(calibration=Calibration(Feeds({"x": x}, "test")))
    result = Quantize(Quantize.Config(bits=8, activations="static", equalize=False), context)(model)
    assert result.stats["tensors"]["w"]["form"] == "static"
    path = save_model(model, tmp_path / "static.onnx")
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert "QGemm" in [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    (got,) = session.run(None, {"x": x})
    assert relative_error(expected, got) < 0.01


def test_static_activations_leave_a_sequence_layers_relu_output_in_float(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SASRec's feed-forward layers read [N, T, K]: onnxruntime fuses their QDQ MatMul without
    first fusing it with the Relu after it, so that Relu's output gets no QuantizeLinear pair of its
    own (with the 64-input second layers left in float, an extra pair would only cost time: it cost
    6% at batch 512). Timings fixed: the 64-input layers probe slower, the others faster."""
    import onnx

    from onnxcompress.passes import quantize
    from onnxcompress.speed import LayerTiming

    us = 1e-6

    def probe(inputs: int, *args: object) -> LayerTiming:
        return LayerTiming(4 * us, 4 * us, 45 * us, (60 if inputs == 64 else 30) * us)

    monkeypatch.setattr(quantize, "probe_static_matmul", probe)
    out = tmp_path / "static.onnx"
    report = compress_with_preset("sasrec", "int8", out, "quant.activations=static")
    assert report.parity.passed
    tensors = next(record for record in report.passes if record.name == "quant").stats["tensors"]
    static = sum(stats.get("form") == "static" for stats in tensors.values())
    assert static >= 4
    assert sum(node.op_type == "QuantizeLinear" for node in onnx.load(str(out)).graph.node) == static


def test_layers_the_probe_left_out_join_when_the_model_timed_with_them_keeps_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wide&Deep's probed one-row costs (1.5 µs for a 256-unit layer) fit two of its four layers in
    the budget; inside the model they cost a fraction of that. Copies written with one and two more
    integer layers are timed against the original: those within 8% of its one-row time are taken,
    and the model stays within the calibration check. Timings are fixed here; which layers they
    pick on a machine is the benchmark's business."""
    from onnxcompress.passes import quantize
    from onnxcompress.speed import LayerTiming, ModelTiming

    us = 1e-6
    monkeypatch.setattr(quantize, "probe_dynamic_matmul", lambda *args: LayerTiming(4 * us, 5.5 * us, 45 * us, 20 * us))
    timed: list[list[object]] = []

    def fake_timings(models: list[object], feeds: object) -> list[ModelTiming]:
        if len(models) == 2 and all(isinstance(model, ir.Model) for model in models):
            return [ModelTiming(18 * us, 700 * us), ModelTiming(18 * us, 400 * us)]  # smoothed layers pay
        timed.append(list(models))
        if isinstance(models[0], ir.Model):  # the cleaned float model and the original: 18 and 18.7 µs
            return [ModelTiming(18 * us, 700 * us), ModelTiming(18.7 * us, 720 * us)]
        # the original, then copies with 1, 2, ... more integer layers: 0.4 µs a layer, the last over
        return [ModelTiming(18.7 * us, 720 * us)] + [
            ModelTiming((18.9 + 0.4 * count + (5 if count == len(models) - 1 else 0)) * us, 400 * us)
            for count in range(1, len(models))
        ]

    monkeypatch.setattr(quantize, "model_timings", fake_timings)
    # Below 8 bits an integer layer stores channel scales a folded one does not: only the probe's choice.
    int4 = next(
        r for r in compress_with_preset("keras_wide_deep", "int4", tmp_path / "b.onnx").passes if r.name == "quant"
    )
    assert "added_by_model_timing" not in int4.stats["activations"] and int4.stats["integer_layers"] >= 1
    report = compress_with_preset("keras_wide_deep", "int8", tmp_path / "int8.onnx")
    quant = next(record for record in report.passes if record.name == "quant")
    activations = quant.stats["activations"]
    copies = timed[-1][1:]
    assert len(copies) >= 2 and all(isinstance(copy, ir.Model) for copy in copies)
    probed = quant.stats["integer_layers"] - len(activations["added_by_model_timing"])
    for count, copy in enumerate(copies, start=1):  # each copy has one more integer layer
        assert [node.op_type for node in copy.graph].count("MatMulInteger") == probed + count
    # every copy but the last (5 µs over) fits: the probe's choice plus all but one left-out layer
    assert len(activations["added_by_model_timing"]) == len(copies) - 1
    assert activations["timed_with_added_us"]["original_single_row"] == 18.7
    forms = [tensor["form"] for tensor in quant.stats["tensors"].values()]
    assert forms.count("dynamic") == quant.stats["integer_layers"] >= 3
    assert report.parity.passed


def test_a_copy_timed_with_integer_layers_leaves_the_model_alone() -> None:
    from onnxcompress.passes.quantize import _integer_variant

    model, _ = shipped_model_with_calibration("dlrm")
    Cleanup()(model)
    before = ir.serde.serialize_model(model).SerializeToString()
    layers = [node for node in model.graph if node.op_type == "Gemm"][:2]
    uses = [WeightUse(node, 1, node.inputs[1], "linear", 0, 1) for node in layers]
    copy = _integer_variant(model, uses)
    assert copy is not None and ir.serde.serialize_model(model).SerializeToString() == before
    ops = [node.op_type for node in copy.graph]
    assert ops.count("MatMulInteger") == ops.count("DynamicQuantizeLinear") == 2
    assert ops.count("Gemm") == [node.op_type for node in model.graph].count("Gemm") - 2
    feeds = {name: array[:4] for name, array in np.load(model_files("dlrm")["feeds"]).items()}
    (scores,) = runtime.make_session(copy, "all").run(None, feeds)
    assert scores.shape == (4,)


def test_int4_dlrm_stacks_its_tables_and_is_seven_times_smaller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DLRM's user and item tables share one decode at 4 bits; its five small tables (gender, age,
    occupation, zip region, year: 800 values), held at 8 bits each for their size, are a 4-bit table
    of their own stacked; the upper triangle's 28 column numbers are bytes. Two layers go integer,
    as on this machine: the probe's batch gain here grows with the layer's size."""
    from onnxcompress.passes import quantize
    from onnxcompress.speed import LayerTiming

    costly_layers(monkeypatch, model_us=(12.0, 12.5))
    us = 1e-6

    def by_size(inputs: int, outputs: int, *args: object) -> LayerTiming:
        return LayerTiming(4 * us, 4.7 * us, inputs * outputs * 0.03 * us, inputs * outputs * 0.02 * us)

    monkeypatch.setattr(quantize, "probe_dynamic_matmul", by_size)
    out = tmp_path / "int4.onnx"
    report = compress_with_preset("dlrm", "int4", out)
    quant = next(record for record in report.passes if record.name == "quant")
    tensors = quant.stats["tensors"]
    stacks = {name: (tensor["stacked"], tensor["bits"]) for name, tensor in tensors.items() if "stacked" in tensor}
    assert sorted(stacks.values()) == [
        ([f"embeddings.{index}.weight" for index in range(2)], 4),
        ([f"embeddings.{index}.weight" for index in range(2, 7)], 4),
    ]
    assert quant.stats["integer_layers"] == 2
    (score,) = report.parity.outputs
    assert report.parity.passed and score.auc_delta is not None and abs(score.auc_delta) <= 0.001
    assert report.size_ratio >= 7.0, out.stat().st_size


@pytest.mark.parametrize(("name", "table"), [("sasrec", "item_table.weight"), ("dlrm", "embeddings.1.weight")])
def test_table_rows_are_rounded_against_how_the_outputs_read_them(
    name: str, table: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """int4 tables with calibration rows: codes rounded with error feedback against the Hessian of
    the outputs in a looked-up row (SASRec's tied item table, read for the history and the
    candidate; DLRM's tables in their stack, each run of rows with its own). The outputs' error
    that the table causes halves or better, and the whole model's output error on the test rows
    drops against the same pipeline with nearest rounding of the tables."""
    from onnxcompress.passes import quantize

    costly_layers(monkeypatch)
    refined = compress_with_preset(name, "int4", tmp_path / "refined.onnx")
    tensors = next(record for record in refined.passes if record.name == "quant").stats["tensors"]
    entry = next(entry for key, entry in tensors.items() if key == table or table in entry.get("stacked", []))
    assert entry["rounding"] == "gptq"
    errors = entry["relative_error"]
    assert errors["lookup_output_gptq"] < 0.65 * errors["lookup_output_nearest"]
    monkeypatch.setattr(quantize.Quantize, "_table_hessians", lambda self, model, selected: {})
    nearest = compress_with_preset(name, "int4", tmp_path / "nearest.onnx")
    tensors = next(record for record in nearest.passes if record.name == "quant").stats["tensors"]
    entry = next(entry for key, entry in tensors.items() if key == table or table in entry.get("stacked", []))
    assert entry["rounding"] != "gptq" and "lookup_output_gptq" not in entry["relative_error"]
    (with_feedback,), (without,) = (report.parity.outputs for report in (refined, nearest))
    assert with_feedback.mean_abs < 0.9 * without.mean_abs


@pytest.mark.parametrize("preset", ["int8", "int4"])
@pytest.mark.parametrize("layer", ["MatMul (x, w)", "Gemm (x, w, b)"])
def test_a_layer_of_one_input_feature_is_quantized(tmp_path: Path, preset: str, layer: str) -> None:
    """A [1, 32] weight stored as MatMul reads it is one row of codes with one scale: int8 raised
    'cannot reshape array of size 1 into shape (32,)'."""
    from onnxcompress import compress
    from onnxcompress.presets import get_preset

    rng = np.random.default_rng(5)
    model = text_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,1] x, float[1,32] w, float[32] b, float[32,1] v) => (float[N,1] y) {{
          h = {layer}
          r = Relu(h)
          y = MatMul(r, v)
        }}
        """,
        {
            "w": rng.standard_normal((1, 32)).astype(np.float32),
            "b": rng.standard_normal(32).astype(np.float32),
            "v": rng.standard_normal((32, 1)).astype(np.float32),
        },
    )
    recipe = get_preset(preset)
    source = save_model(model, tmp_path / "in1.onnx")
    report = compress(source, tmp_path / "out.onnx", list(recipe.passes), options=recipe.options)
    assert report.written and report.parity.passed
    quant = next(record for record in report.passes if record.name == "quant")
    assert "w" in quant.stats["tensors"]


def test_quant_bytes_are_priced_on_the_initializers_it_removed_and_added() -> None:
    """The stats price what the pass took out of the graph against what it put in, as stored: block
    scales made in float32 and stored as float16 at the end count at 2 bytes once (they were counted
    at 4 bytes, then again among the float16 tensors, and as if the float model had held them:
    DLRM int4 stated 246,856 -> 35,949 bytes, more than all the initializers before and after)."""
    model, calibration = shipped_model_with_calibration("dlrm")
    # By name: the opset conversion before quantizing rebuilds a bias under its own name.
    before = {name: value.const_value.nbytes for name, value in model.graph.initializers.items()}
    config = Quantize.Config(bits=4, granularity="block", block_size=32, embedding_bits=4, scale_codebook=True)
    stats = Quantize(config, PassContext(calibration=calibration))(model).stats
    after = {name: value.const_value.nbytes for name, value in model.graph.initializers.items()}
    assert stats["float16_tensors"] > 0
    assert stats["bytes_before"] == sum(size for name, size in before.items() if name not in after)
    assert stats["bytes_after"] == sum(size for name, size in after.items() if name not in before)
    assert stats["bytes_before"] <= sum(before.values()) and stats["bytes_after"] <= sum(after.values())
    # Each weight's own bytes: its codes and its scales as stored (float16 at 2 bytes a scale).
    layer = stats["tensors"]["bottom.0.weight"]
    codes_and_scales = [name for name in after if name.startswith("bottom.0.weight")]
    assert layer["bytes_after"] == sum(after[name] for name in codes_and_scales)
    assert any(model.graph.initializers[name].const_value.dtype == ir.DataType.FLOAT16 for name in codes_and_scales)
    assert sum(entry["bytes_after"] for entry in stats["tensors"].values()) <= stats["bytes_after"]


@pytest.mark.parametrize(
    "config",
    [{"bits": 8}, {"bits": 4, "granularity": "block", "block_size": 16}, {"bits": 2, "granularity": "block"}],
    ids=["int8-stored", "int4-rounded-to-int8-at-load", "int2-rounded-to-int8-at-load"],
)
def test_integer_kernels_read_weights_whose_pairs_of_products_fit_16_bits(tmp_path: Path, config: dict) -> None:
    """onnxruntime's uint8 x int8 kernels on x86 without VNNI add each two neighbouring products in
    16 bits with saturation. Weights whose neighbours' magnitudes add up to more than 128 overflow
    with large activations: on such a host (AVX2), every layer integer, Wide&Deep int8 scored its
    test rows at Spearman 0.55 with the original and DeepFM student lost 0.028 AUC, while the same
    files on a VNNI host were exact. The weights each MatMulInteger reads, stored or computed at
    load, keep every pair within 128, so their outputs are the same on every CPU."""
    model = linear_model()
    Quantize(Quantize.Config(**config, activations="dynamic", rounding="nearest"))(model)
    weights = [node.inputs[1] for node in model.graph if node.op_type == "MatMulInteger"]
    assert len(weights) == 3
    for value in weights:
        model.graph.outputs.append(value)  # computed at load for int4: read it out of the graph
    path = save_model(model, tmp_path / "m.onnx")
    feeds = {"x": RNG.standard_normal((4, 64)).astype(np.float32)}
    for codes in ReferenceEvaluator(str(path)).run(None, feeds)[1:]:
        assert codes.dtype == np.int8
        magnitudes = np.abs(codes.astype(np.int64))  # [inputs, outputs]: pairs along the inputs
        assert (magnitudes[0::2] + magnitudes[1::2]).max() <= 128
        assert magnitudes.max() >= 64  # the codes still use the range


def test_an_input_the_calibration_rows_never_set_keeps_its_weights(tmp_path: Path) -> None:
    """GPTQ's reference code zeroes the weights of an input its calibration rows never exercise (a
    dead input of a language model). A recommender's one-hot column of a category absent from 512
    rows is live at serving time: the shipped scikit-learn MLP never sees four of its one-hot columns
    in its calibration rows, and a scikit-learn pipeline's int8 passed parity on such rows and
    flipped 13% of the labels of rows with that category. Those weights are rounded to nearest."""
    model, calibration = shipped_model_with_calibration("sklearn_mlp")
    features = calibration.feeds.arrays["features"]
    never = np.flatnonzero(~features.any(axis=0))
    assert len(never) >= 3
    original = save_model(model, tmp_path / "original.onnx")
    Quantize(Quantize.Config(bits=8, equalize=False), PassContext(calibration=calibration))(model)
    quantized = save_model(model, tmp_path / "int8.onnx")
    rows = np.repeat(features[:64], len(never), axis=0)
    rows[np.arange(len(rows)), np.tile(never, 64)] = 1.0  # each row with one of those categories set
    scores = [
        runtime.run(runtime.make_session(path, "disable"), {"features": rows})["probabilities"][:, 1]
        for path in (original, quantized)
    ]
    assert np.abs(scores[0] - scores[1]).max() < 0.01


@pytest.mark.parametrize("bits", [2, 1])
def test_low_bit_linear_weights_take_fitted_levels_where_they_move_the_outputs_less(bits: int) -> None:
    """DeepFM's hidden layers at 2 bits: symmetric codes have three values and a scale per 32
    weights; four levels fitted to each weight with one scale per output channel move the outputs
    less at fewer bytes. At 1 bit, two fitted levels with GPTQ's error feedback against signs times
    each row's mean magnitude. The graph decodes them with a Gather of the levels, which
    onnxruntime folds at load."""
    files = model_files("deepfm")
    feeds = {name: array[:2000] for name, array in np.load(files["feeds"]).items()}
    (reference,) = runtime.make_session(ir.load(files["onnx"]), "all").run(None, feeds)
    results = {}
    for level_codes in (False, True):
        model, calibration = shipped_model_with_calibration("deepfm")
        Cleanup()(model)
        config = Quantize.Config(bits=bits, granularity="block", block_size=32, level_codes=level_codes, include="mlp")
        stats = Quantize(config, PassContext(calibration=calibration))(model).stats
        (scores,) = runtime.make_session(model, "all").run(None, feeds)
        results[level_codes] = stats, relative_error(reference, scores), model
    stats, error, model = results[True]
    hidden = {name: entry for name, entry in stats["tensors"].items() if entry["bits"] == bits}
    leveled = {name: entry for name, entry in hidden.items() if entry.get("levels") == 2**bits}
    assert len(leveled) >= 2
    for name, entry in leveled.items():
        assert entry["rounding"] == "gptq_levels" and entry["granularity"] == "channel"
        errors = entry["level_choice"]["output_error"]
        assert entry["level_choice"]["chosen"] != "blocks" and min(errors.values()) < 0.8 * errors["blocks"]
        if bits > 1:  # signs need no levels
            assert entry["bytes_after"] < results[False][0]["tensors"][name]["bytes_after"]
    assert error < 0.9 * results[False][1]  # on rows the calibration did not see (2 bits: 0.066 against 0.080)
    level_tables = [
        value for value in model.graph.initializers.values() if value.name and value.name.endswith("levels")
    ]
    assert len(level_tables) == len(leveled)
    assert all(value.const_value.shape == (2**bits,) for value in level_tables)
    assert all(use.op_type == "Gather" for value in level_tables for use, _ in value.uses())


def test_codes_indexing_levels_never_feed_an_integer_kernel_as_they_are() -> None:
    """4-bit codes with one scale per channel feed MatMulInteger as int4 values; codes that index
    fitted levels are not those values (fed as they were, SASRec's int4 with levels lost 0.05 AUC)."""
    from onnxcompress.numerics.quant import QuantizedRows
    from onnxcompress.passes.quantize import _integer_codes

    codes = np.arange(32, dtype=np.int8).reshape(4, 8) % 8
    plain = QuantizedRows(codes, np.ones(4, np.float16), None, 4)
    assert _integer_codes(plain, "channel", 4)
    leveled = QuantizedRows(codes.astype(np.uint8), np.ones(4, np.float16), None, 4, levels=np.linspace(-1, 1, 16))
    assert not _integer_codes(leveled, "channel", 4)


@pytest.mark.parametrize(("with_them_us", "kept"), [(131.0, False), (100.0, True)])
def test_smoothed_integer_layers_stay_only_if_the_model_timed_with_their_smoothing_is_faster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_them_us: float, kept: bool
) -> None:
    """The distilled DeepFM's first layer needs smoothing (its error 3% without, 0.4% with): Muls
    over its 137 inputs (the embeddings are shared with the FM part, so the factors cannot fold
    into the table) that the probe, timing the layer alone, never paid. On a VNNI host the probe
    chose it, and the written model was no faster at batch 512 while it lost 0.0004 AUC. So the
    model is timed with the smoothed layers integer, each input divided by its factors as written,
    against them in float; under 3% faster they go back to float. Timings are fixed here."""
    from onnxcompress.passes import quantize
    from onnxcompress.speed import LayerTiming, ModelTiming

    us = 1e-6
    monkeypatch.setattr(quantize, "probe_dynamic_matmul", lambda *args: LayerTiming(4 * us, 4 * us, 45 * us, 30 * us))
    confirmations: list[list[ir.Model]] = []

    def fake_timings(models: list[object], feeds: object) -> list[ModelTiming]:
        if all(isinstance(model, ir.Model) for model in models):  # without the smoothed layers, then with them
            confirmations.append(models)  # type: ignore[arg-type]
            return [ModelTiming(10 * us, 130 * us), ModelTiming(10 * us, with_them_us * us)]
        if isinstance(models[0], ir.Model):  # the float model and the original file
            return [ModelTiming(10 * us, 130 * us), ModelTiming(11 * us, 230 * us)]
        return [ModelTiming(11 * us, 230 * us)] + [ModelTiming(1000 * us, 1000 * us)] * (len(models) - 1)

    monkeypatch.setattr(quantize, "model_timings", fake_timings)
    report = compress_with_preset("deepfm_student", "int8", tmp_path / "int8.onnx")
    quant = next(record for record in report.passes if record.name == "quant")
    activations = quant.stats["activations"]
    smoothed = [name for name, tensor in quant.stats["tensors"].items() if "activation_error_unsmoothed" in tensor]
    assert "mlp.0.weight_folded" in smoothed
    (timed,) = confirmations
    without, with_them = ([node.op_type for node in copy.graph] for copy in timed)
    added = with_them.count("MatMulInteger") - without.count("MatMulInteger")
    # the smoothing as written: besides the two Muls of each integer layer's scales, a Mul at least
    # divides each smoothed layer's input (here on the parts its input is concatenated from)
    assert with_them.count("Mul") - without.count("Mul") >= 3 * added
    written = ir.load(tmp_path / "int8.onnx")
    integer = [node.op_type for node in written.graph].count("MatMulInteger")
    assert integer == activations["integer_layers"]
    if kept:
        assert "returned_to_float_by_model_timing" not in activations and added >= 1
    else:
        returned = activations["returned_to_float_by_model_timing"]
        assert "mlp.0.weight_folded" in returned and set(returned) <= set(smoothed) and len(returned) == added
        assert activations["model_timing_us"] == {"float_batch": 130.0, "integer_batch": 131.0}
        assert integer == without.count("MatMulInteger")
        (score,) = report.parity.outputs
        assert score.auc_delta is not None and abs(score.auc_delta) <= 0.0003
