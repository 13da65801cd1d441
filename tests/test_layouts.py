from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from conftest import compress_with_preset, save_model, text_model
from onnx.reference import ReferenceEvaluator

from onnxcompress.layouts import head_transposes_for_products, merge_transposes
from onnxcompress.numerics.layout import Movement, movement_of


def test_a_transpose_of_a_reshape_is_found_with_its_atoms() -> None:
    source = np.arange(24)
    moved = source.reshape(2, 3, 4).transpose(2, 0, 1)
    assert movement_of(moved, 24) == Movement((6, 4), (), (1, 0))  # the 2 and 3 stay together: one atom
    assert movement_of(source.reshape(4, 6), 24) == Movement((24,), (), (0,))  # a reshape alone is one atom


def test_a_selection_holds_an_atom_at_its_index() -> None:
    source = np.arange(24)
    picked = source.reshape(3, 2, 4)[1]
    assert movement_of(picked, 24) == Movement((3, 8), ((0, 1),), (0,))
    inner = source.reshape(6, 4)[:, 2]  # an inner atom held: every fourth element from the third
    assert movement_of(inner, 24) == Movement((6, 4), ((1, 2),), (0,))


def test_what_no_reshape_and_transpose_give_is_refused() -> None:
    assert movement_of(np.zeros(4, np.int64), 4) is None  # an element read four times
    assert movement_of(np.array([0, 2, 1, 3, 5, 4]), 6) is None  # not affine in the output's digits
    assert movement_of(np.array([0, 1, 9]), 6) is None  # outside the source


def test_random_chains_of_reshapes_transposes_and_selections_are_reproduced() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        dims = [int(size) for size in rng.integers(1, 5, size=int(rng.integers(2, 5)))]
        array = np.arange(int(np.prod(dims))).reshape(dims)
        for _ in range(3):
            array = array.transpose(rng.permutation(array.ndim))
            if array.ndim > 1 and rng.random() < 0.3:
                array = np.take(array, int(rng.integers(array.shape[0])), axis=0)
            if array.ndim > 1 and rng.random() < 0.5:
                merge = int(rng.integers(array.ndim - 1))
                array = array.reshape(*array.shape[:merge], -1, *array.shape[merge + 2 :])
        movement = movement_of(array, int(np.prod(dims)))
        assert movement is not None
        np.testing.assert_array_equal(movement.apply(np.arange(int(np.prod(dims)))), array.reshape(-1))


ATTENTION = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,5,8] x, float[8,24] w, float[24] b, float[8,8] wo, float[8] bo, int64[3] s1, int64[4] s2, int64[1] zero,
   int64[1] three, int64 i0, int64 i1, int64 i2, int64[3] s3, int64[4] s4, int64[4] s5, int64[2] s6, int64[3] s7)
  => (float[N,2,5,4] q, float[N,2,4,5] kt, float[N,5,8] y) {
  t = Transpose <perm = [1, 0, 2]> (x)
  f = Flatten <axis = 2> (t)
  p = Gemm(f, w, b)
  r = Reshape(p, s1)
  r2 = Reshape(r, s2)
  u = Unsqueeze(r2, zero)
  t1 = Transpose <perm = [3, 1, 2, 0, 4]> (u)
  sq = Squeeze(t1, three)
  g0 = Gather(sq, i0)
  g1 = Gather(sq, i1)
  g2 = Gather(sq, i2)
  h0 = Reshape(g0, s3)
  q0 = Transpose <perm = [1, 0, 2]> (h0)
  q = Reshape(q0, s4)
  h1 = Reshape(g1, s3)
  k0 = Transpose <perm = [1, 2, 0]> (h1)
  kt = Reshape(k0, s5)
  h2 = Reshape(g2, s3)
  v0 = Transpose <perm = [1, 0, 2]> (h2)
  v = Reshape(v0, s4)
  av = Relu(v)
  a = Transpose <perm = [2, 0, 1, 3]> (av)
  ar = Reshape(a, s6)
  o = Gemm(ar, wo, bo)
  ob = Reshape(o, s7)
  y = Transpose <perm = [1, 0, 2]> (ob)
}
"""


def _attention() -> ir.Model:
    rng = np.random.default_rng(5)
    shapes = {
        "s1": [5, -1, 24], "s2": [5, -1, 3, 8], "zero": [0], "three": [3], "s3": [5, -1, 4], "s4": [-1, 2, 5, 4],
        "s5": [-1, 2, 4, 5], "s6": [-1, 8], "s7": [5, -1, 8],
    }  # fmt: skip
    constants = {name: np.array(dims, np.int64) for name, dims in shapes.items()}
    constants |= {name: np.array(index, np.int64) for name, index in (("i0", 0), ("i1", 1), ("i2", 2))}
    for name, dims in (("w", (8, 24)), ("b", (24,)), ("wo", (8, 8)), ("bo", (8,))):
        constants[name] = rng.normal(size=dims).astype(np.float32)
    return text_model(ATTENTION, constants)


def test_multi_head_attention_layout_takes_one_transpose_a_value(tmp_path: Path) -> None:
    """nn.MultiheadAttention's [positions, batch, width] layout: the input's transpose moves after
    the projection, where query, key (already transposed for the scores) and value each become one
    transpose of the projection's output; the output's transpose back moves before the output
    projection, into the one that made its rows. Seven transposes become four; outputs equal."""
    feeds = {"x": np.random.default_rng(6).normal(size=(3, 5, 8)).astype(np.float32)}
    before = ReferenceEvaluator(str(save_model(_attention(), tmp_path / "before.onnx"))).run(None, feeds)
    model = _attention()
    assert merge_transposes(model) == 3
    perms = sorted(tuple(node.attributes.get_ints("perm", [])) for node in model.graph if node.op_type == "Transpose")
    assert perms == [(0, 2, 1), (0, 2, 1, 3), (0, 2, 1, 3), (0, 2, 1, 3)]
    assert [node.op_type for node in model.graph].count("Unsqueeze") == 0
    after = ReferenceEvaluator(str(save_model(model, tmp_path / "after.onnx"))).run(None, feeds)
    for one, two in zip(before, after, strict=True):
        assert one.shape == two.shape
        np.testing.assert_allclose(two, one, rtol=1e-6, atol=1e-6)


def test_a_lone_transpose_stays() -> None:
    model = text_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,5,8] x, int64[2] s) => (float[M,8] y) {
          t = Transpose <perm = [1, 0, 2]> (x)
          y = Reshape(t, s)
        }
        """,
        {"s": np.array([-1, 8], np.int64)},
    )
    assert merge_transposes(model) == 0
    assert [node.op_type for node in model.graph] == ["Transpose", "Reshape"]


@pytest.mark.parametrize("name", ["sasrec_encoder", "sasrec_encoder_dynamo"])
def test_nn_multihead_attention_exports_lose_their_layout_transposes(tmp_path: Path, name: str) -> None:
    """SASRec built from nn.TransformerEncoderLayer (TorchScript and dynamo): eight transposes in the
    first block and eight in the second (which scores one position) become four and two, the scores
    the same on the shipped rows; off by option, all sixteen stay."""
    report = compress_with_preset(name, "lossless", tmp_path / "out.onnx", "cleanup.head_transposes=false")
    assert report.passes[0].stats["transposes_merged"] == 10
    assert report.passes[0].stats["initializers_added"] > 0 <= report.passes[0].stats["initializers_removed"]
    assert report.verdict == "passed"
    assert all(output.max_abs < 1e-5 for output in report.parity.outputs)
    model = ir.load(tmp_path / "out.onnx")
    assert [node.op_type for node in model.graph].count("Transpose") == 6
    assert merge_transposes(model) == 0  # a later cleanup finds nothing more
    off = compress_with_preset(
        name, "lossless", tmp_path / "off.onnx", "cleanup.merge_transposes=false", "cleanup.head_transposes=false"
    )
    assert off.passes[0].stats["transposes_merged"] == 0
    assert [node.op_type for node in ir.load(tmp_path / "off.onnx").graph].count("Transpose") == 16


HEADS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,5,2,W] x, float[N,2,W,5] k) => (float[N,2,5,5] y) {
  q = Transpose <perm = [0, 2, 1, 3]> (x)
  y = MatMul(q, k)
}
"""


@pytest.mark.parametrize(
    ("text", "width", "rewritten"),
    [
        (HEADS, 4, True),
        (HEADS.replace("y = MatMul(q, k)", "s = Mul(q, half)\n  y = MatMul(s, k)"), 4, True),
        (HEADS, 32, False),  # wide heads move quickly as they are
        (HEADS.replace("y = MatMul(q, k)", "r = Relu(q)\n  y = MatMul(r, k)"), 4, False),  # not a product's
    ],
)
def test_a_head_transpose_read_by_products_becomes_one_the_product_absorbs(
    tmp_path: Path, text: str, width: int, rewritten: bool
) -> None:
    """[batch, positions, heads, width] -> [batch, heads, positions, width] before a MatMul (directly
    or through a scalar scale): a 3-d transpose and a last-two-axes transpose onnxruntime folds
    into the product; equal outputs."""
    text = text.replace("W", str(width))
    scaled = "half" in text
    if scaled:
        text = text.replace("(float[N,5,2,", "(float half, float[N,5,2,")
    constants = {"half": np.array(0.5, np.float32)} if scaled else {}
    rng = np.random.default_rng(9)
    feeds = {
        "x": rng.normal(size=(3, 5, 2, width)).astype(np.float32),
        "k": rng.normal(size=(3, 2, width, 5)).astype(np.float32),
    }
    before = ReferenceEvaluator(str(save_model(text_model(text, constants), tmp_path / "b.onnx"))).run(None, feeds)[0]
    model = text_model(text, constants)
    assert head_transposes_for_products(model) == int(rewritten)
    perms = [list(node.attributes.get_ints("perm", [])) for node in model.graph if node.op_type == "Transpose"]
    assert perms == ([[0, 2, 1], [0, 1, 3, 2]] if rewritten else [[0, 2, 1, 3]])
    after = ReferenceEvaluator(str(save_model(model, tmp_path / "after.onnx"))).run(None, feeds)[0]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["sasrec", "sasrec_encoder", "sasrec_encoder_dynamo"])
def test_sasrec_queries_and_values_take_the_transposes_products_absorb(tmp_path: Path, name: str) -> None:
    """The first block's query and value and the second block's value (its query is one position)."""
    report = compress_with_preset(name, "lossless", tmp_path / "out.onnx")
    assert report.passes[0].stats["head_transposes_for_products"] == 3
    assert report.verdict == "passed"
    assert all(output.max_abs < 1e-5 for output in report.parity.outputs)
    model = ir.load(tmp_path / "out.onnx")
    perms = [tuple(node.attributes.get_ints("perm", [])) for node in model.graph if node.op_type == "Transpose"]
    assert perms.count((0, 1, 3, 2)) == 3
