"""Pruning: magnitude, N:M and hidden-unit pruning, with least-squares reconstruction on calibration data."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxcompress.graph import (
    BATCHNORM_PARAMS,
    ELEMENTWISE_BINARY,
    OVERRIDABLE_WEIGHT,
    WEIGHT_SLOTS,
    ChainPair,
    HiddenLink,
    LinearLayer,
    ReluChain,
    WeightUse,
    constant_value,
    dot_product_pairs,
    linear_layers,
    mlp_links,
    relu_chains,
    set_constant,
    weights_by_value,
)
from onnxcompress.layers import NO_SCORE, Fitting, capture, fitting_rows, has_score, score_logits
from onnxcompress.numerics.conv import ConvGeometry, conv_patches, filters, from_filters
from onnxcompress.numerics.distill import logit_fidelity
from onnxcompress.numerics.lstsq import Gram, NormalEquations
from onnxcompress.numerics.prune import (
    EXACT_OBS_FLOPS,
    allocate_sparsities,
    global_sparsities,
    keep_count,
    magnitude_sample,
    nm_mask,
    obs_fit,
    obs_path,
    obs_rows,
    parse_nm,
    sparsegpt,
    topk_mask,
)
from onnxcompress.numerics.tune import CHECK_EVERY, MINIBATCH, ChainFit, chain_forward, tune_chain, tune_pair
from onnxcompress.parity import STRUCTURAL
from onnxcompress.passes import register
from onnxcompress.passes.base import CompressionPass, CompressionResult

if TYPE_CHECKING:
    from onnxcompress.calibration import Calibration

__all__ = ["Prune"]

logger = logging.getLogger(__name__)

#: Why structure=neurons left a model as it was when it found nothing to consider.
NO_HIDDEN_UNITS = (
    "no hidden layer: units are removed between two linear layers (MatMul, Gemm) joined by elementwise "
    "ops; recurrent cells, attention and a lone layer have none"
)
#: Rounds of OBS mask selection (each re-solves the kept weights); 8 beat 1 and 4 on every shipped
#: model at 80% sparsity, measured by the score correlation with the unpruned model.
OBS_ROUNDS = 8
#: Magnitude-only tensors larger than this are pruned after the refits, not before the layers that
#: read them: onnxruntime captures would otherwise evaluate every deferred table in memory each time.
CAPTURE_LAZY_MAX_BYTES = 64 * 1024 * 1024
#: Sparsities tried under prune.min_rank_corr: the configured one, then half, then a quarter.
BUDGET_ATTEMPTS = 3
#: Ridge of the refit (relative to the mean input energy) for weights and for hidden units. Removing
#: units refits the next layer on half its inputs from 512 calibration rows, which overfits them:
#: a stronger pull towards the trained weights and mixed-column rows (below) generalise better.
WEIGHT_DAMPING = 0.01
NEURON_DAMPING = 0.1
#: Refit rows added for hidden-unit pruning, each input column drawn from a random calibration row.
#: At 50% of units, test-row Spearman with the original: DeepFM 0.973 -> 0.989, DLRM 0.994 -> 0.996,
#: two-tower 0.894 -> 0.916, Wide&Deep and the others within 0.0007.
NEURON_AUGMENT_ROWS = 4096
#: Sparsities at which scope=measured prunes and refits each layer alone to price it.
MEASURED_LEVELS = (0.0, 0.3, 0.5, 0.65, 0.8, 0.9, 0.95)
#: OBS rounds from one priced level's mask to the next one's (the first level gets OBS_ROUNDS).
MEASURED_ROUNDS_PER_LEVEL = 2
#: Mixed-column refit rows scope=measured tries against none when prune.augment is auto.
WEIGHT_AUGMENT_CANDIDATE = 4096
#: tune_steps are cut to what this many multiply-adds (forward and backward, six per weight a row)
#: allow for a chain: about six seconds of single-precision numpy; the wide DLRM's top MLP gets about 50 steps.
TUNE_FLOPS = 2e11
#: tune_steps=auto with N:M and from UNSTRUCTURED_TUNE_MIN_SPARSITY: chain tuning raised the test-row
#: Spearman of every N:M-pruned model with MLP chains (2:4: DeepFM 0.983 -> 0.988, DLRM 0.992 -> 0.996,
#: two-tower 0.940 -> 0.952).
AUTO_TUNE_STEPS = 3000
#: Below it scope=measured already places the sparsity where it costs least: at 50% (--passes prune,
#: test rows) tuning gained a few 1e-4 of Spearman while the AUC moved either way (scikit-learn
#: +0.0000 -> -0.0008); at 80% two-tower 0.853 -> 0.872, Wide&Deep 0.9895 -> 0.9909; at 90% dlrm_bag
#: 0.989 -> 0.995 (dAUC +0.0039 -> +0.0009), two-tower 0.662 -> 0.694.
UNSTRUCTURED_TUNE_MIN_SPARSITY = 0.8
#: Rows mixing the calibration rows' columns that a pair of towers (and, with structure=neurons,
#: every chain) is tuned on besides them (every pair of rows is a target, so the towers see many
#: more inputs than the calibration rows): the shipped two-tower's test-row Spearman after the
#: tuning, 80%: 0.919 with 4,096 of them, 0.87 with none.
TUNE_MIXED_ROWS = 4096
#: Fewer calibration rows cannot be split into fitting and held-out rows worth measuring on.
MEASURED_MIN_ROWS = 32


def _check_structure(structure: str) -> None:
    if structure not in ("unstructured", "neurons") and parse_nm(structure) is None:
        raise ValueError(f"prune.structure must be unstructured, neurons or N:M such as 2:4; got {structure!r}")


@dataclass
class _Weight:
    """One initializer selected for pruning, with every node that reads it as a weight."""

    value: ir.Value
    uses: list[WeightUse]

    @property
    def name(self) -> str:
        return self.value.name or "?"

    @property
    def tensor(self) -> ir.TensorProtocol:
        assert self.value.const_value is not None
        return self.value.const_value


def _replace_constant(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Give ``node`` input ``index`` the constant ``array``: in place if only this node reads it, else a copy.

    Copy-on-write keeps ties intact: an exporter that deduplicated two equal biases (tf2onnx does)
    still computes the other node with the original values.
    """
    value = node.inputs[index]
    assert value is not None
    if len(value.uses()) == 1:
        set_constant(value, array)
        return
    base = f"{value.name}_pruned"
    name, suffix = base, 1
    while name in graph.initializers:
        name, suffix = f"{base}_{suffix}", suffix + 1
    copy = constant_value(name, array)
    graph.register_initializer(copy)
    node.replace_input_with(index, copy)


def _effective(layer: LinearLayer) -> np.ndarray:
    """The layer's weight as float64 ``[d_in, d_out]``."""
    weight = layer.weight.const_value.numpy().astype(np.float64)  # type: ignore[union-attr]
    return weight.T if layer.out_axis == 0 else weight


def _bias_vector(layer: LinearLayer) -> np.ndarray:
    if layer.bias is None:
        return np.zeros(layer.d_out)
    return np.broadcast_to(layer.bias.const_value.numpy().astype(np.float64).reshape(-1), (layer.d_out,)).copy()  # type: ignore[union-attr]


def _fold_norms(
    weights: list[np.ndarray], biases: list[np.ndarray], norms: list[tuple[np.ndarray, np.ndarray] | None]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each layer's ``[d_in, d_out]`` weight and bias with the per-unit affine that follows it applied."""
    folded_weights, folded_biases = [], []
    for weight, bias, norm in zip(weights, biases, norms, strict=True):
        if norm is not None:
            scale, shift = norm
            weight, bias = weight * scale, bias * scale + shift
        folded_weights.append(weight)
        folded_biases.append(bias)
    return folded_weights, folded_biases


@dataclass(frozen=True)
class _TuneStart:
    """What tuning chains after pruning needs from the model before it."""

    rows: Fitting
    #: The chains as they were, by their first layer's node (their norms at the old width).
    chains: dict[ir.Node, ReluChain]
    #: The chains' inputs on ``rows``, and every chain layer's weights and bias, by node.
    dense: dict[ir.Value, np.ndarray]
    originals: dict[ir.Node, tuple[np.ndarray, np.ndarray]]

    def target(self, chain: ReluChain) -> np.ndarray:
        """What ``chain`` gave on ``rows`` before pruning."""
        before = self.chains[chain.layers[0].node]
        return _original_output(before, self.dense[before.layers[0].data], self.originals)


def _chain_name(chain: ReluChain) -> str:
    return f"{chain.layers[0].weight.name} .. {chain.layers[-1].weight.name}"


def _current(chain: ReluChain) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The chain's weights and biases as they stand, BatchNormalizations folded in."""
    return _fold_norms(
        [_effective(layer) for layer in chain.layers],
        [_bias_vector(layer) for layer in chain.layers],
        [*chain.norms, None],
    )


def _biased(chain: ReluChain) -> list[bool]:
    """Which of the chain's layers store a bias (the others must stay without one)."""
    return [layer.bias is not None for layer in chain.layers]


def _original_output(
    chain: ReluChain, inputs: np.ndarray, originals: dict[ir.Node, tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """What the unpruned chain gave on ``inputs`` (``originals``: each layer's weights and bias
    before pruning, by node; hidden units since removed included)."""
    weights, biases = _fold_norms(
        [originals[layer.node][0] for layer in chain.layers],
        [originals[layer.node][1] for layer in chain.layers],
        [*chain.norms, None],
    )
    return chain_forward(weights, biases, inputs.reshape(-1, weights[0].shape[0]))[-1]


def _write_chain(model: ir.Model, chain: ReluChain, fit: ChainFit) -> None:
    """Write tuned weights back, each BatchNormalization folded in for the steps taken out again."""
    for layer, weight, bias, norm in zip(chain.layers, fit.weights, fit.biases, [*chain.norms, None], strict=True):
        if norm is not None:
            scale, shift = norm
            weight, bias = weight / scale, (bias - shift) / scale
        _write_layer(model.graph, layer, weight, bias)


def _write_layer(graph: ir.Graph, layer: LinearLayer, weight: np.ndarray, bias: np.ndarray | None) -> None:
    """Store float64 ``weight`` (``[d_in, d_out]``) and ``bias`` into the layer in its own layout and dtype."""
    dtype = layer.weight.const_value.dtype.numpy()  # type: ignore[union-attr]
    stored = weight.T if layer.out_axis == 0 else weight
    set_constant(layer.weight, np.ascontiguousarray(stored).astype(dtype))
    if bias is None or layer.bias is None:
        return
    shape = tuple(layer.bias.const_value.shape)  # type: ignore[union-attr]
    target = (layer.d_out,) if int(np.prod(shape)) == 1 else shape
    array = bias.reshape(target).astype(layer.bias.const_value.dtype.numpy())  # type: ignore[union-attr]
    holder = layer.bias_node if layer.bias_node is not None else layer.node
    _replace_constant(graph, holder, _bias_index(layer, holder), array)


def _bias_index(layer: LinearLayer, holder: ir.Node) -> int:
    """Where ``holder`` reads the layer's bias: a bias shared with another layer (nn.MultiheadAttention's
    out_proj) was copied on the first write, so later writes find the copy in its place."""
    inputs = list(holder.inputs)
    if layer.bias in inputs:
        return inputs.index(layer.bias)
    if holder is layer.node:  # Gemm's C
        return 2
    return next(index for index, value in enumerate(inputs) if value is not None and value.const_value is not None)


def _capture(
    calibration: Calibration | None, model: ir.Model, values: Sequence[ir.Value]
) -> dict[ir.Value, np.ndarray]:
    """Arrays of ``values`` on the calibration rows, as float64 matrices ``[rows, last axis]``."""
    return {
        value: array.reshape(-1, array.shape[-1]) for value, array in _capture_raw(calibration, model, values).items()
    }


def _capture_raw(
    calibration: Calibration | None, model: ir.Model, values: Sequence[ir.Value | None]
) -> dict[ir.Value, np.ndarray]:
    """Arrays of ``values`` on the calibration rows in their own shapes, as float64.

    Graph inputs are read from the feeds: onnxruntime need not expose them as outputs.
    """
    assert calibration is not None, "captures run only with calibration data"
    present = [value for value in dict.fromkeys(values) if value is not None]
    wanted = [value for value in present if not value.is_graph_input()]
    captured = calibration.capture(model, wanted) if wanted else {}
    feeds = calibration.feeds.arrays
    arrays = {}
    for value in present:
        assert value.name is not None
        arrays[value] = np.asarray(feeds[value.name] if value.is_graph_input() else captured[value.name], np.float64)
    return arrays


@register("prune")
class Prune(CompressionPass):
    """Prune weights of linear layers, convolutions and embedding tables: unstructured magnitude,
    N:M semi-structured, or whole hidden units; refit the remaining weights by least squares on
    calibration activations when calibration data is available."""

    lossy = True
    budget = STRUCTURAL

    @dataclass(frozen=True)
    class Config:
        sparsity: float = field(
            default=0.5,
            metadata={
                "help": "fraction of weights (or, with structure=neurons, of hidden units) removed",
                "min": 0.0,
                "max": 1.0,
            },
        )
        structure: str = field(
            default="unstructured",
            metadata={
                "help": "unstructured, N:M along the reduction axis (e.g. 2:4), or neurons (remove hidden "
                "units, shrinking the matrices)"
            },
        )
        scope: str = field(
            default="measured",
            metadata={
                "help": "layer: every tensor to the target; global: one magnitude threshold across tensors; "
                "measured: per-tensor sparsities where the score, on held-out calibration rows, moves least "
                "(layer without calibration data, with reconstruct=false or for N:M)",
                "choices": ("layer", "global", "measured"),
            },
        )
        max_layer_sparsity: float = field(
            default=0.95,
            metadata={
                "help": "with scope=global or measured, the most any one tensor is pruned",
                "min": 0.0,
                "max": 1.0,
            },
        )
        include: str | None = field(
            default=None, metadata={"help": "regular expression: prune only weights whose name or node name matches"}
        )
        exclude: str | None = field(
            default=None, metadata={"help": "regular expression: never prune weights whose name or node name matches"}
        )
        op_types: tuple[str, ...] = field(
            default=("MatMul", "Gemm", "Conv", "LSTM", "GRU", "RNN"),
            metadata={
                "help": "ops whose weights are pruned (add Gather to prune embedding tables row by row; "
                "LSTM/GRU/RNN input and recurrent weights by magnitude, without a refit)"
            },
        )
        min_elements: int = field(default=64, metadata={"help": "skip weights with fewer elements", "min": 0})
        reconstruct: bool = field(
            default=True,
            metadata={
                "help": "refit the remaining weights and bias of MatMul/Gemm layers by least squares on "
                "calibration activations, layer by layer"
            },
        )
        damping: float | str = field(
            default="auto",
            metadata={
                "help": "ridge term of the refit, relative to the mean input energy (auto: "
                f"{NEURON_DAMPING} with structure=neurons, else {WEIGHT_DAMPING})",
                "min": 0.0,
            },
        )
        augment: int | str = field(
            default="auto",
            metadata={
                "help": "extra refit rows made by drawing every input column from a random calibration row "
                "(as distill does): more rows than a layer has inputs keep the least squares from overfitting "
                f"(auto: {NEURON_AUGMENT_ROWS} with structure=neurons; with scope=measured or N:M, 0 or "
                f"{WEIGHT_AUGMENT_CANDIDATE}, whichever moves the score less on held-out calibration rows; else 0)",
                "min": 0,
            },
        )
        tune_steps: int | str = field(
            default="auto",
            metadata={
                "help": "after the refits, gradient steps that tune each chain of refit linear layers with ReLU "
                "(after a BatchNormalization or not) between (an MLP) jointly towards the original chain's output "
                "on the calibration rows, zeros kept (block reconstruction: later layers make up for earlier ones; "
                f"with structure=neurons after the units go, on the calibration rows and {TUNE_MIXED_ROWS} mixed "
                "rows; two such chains read only through their dot product, as a two-tower model's towers, are "
                f"tuned together on it, every row against every other, with {TUNE_MIXED_ROWS} mixed rows; "
                f"auto: {AUTO_TUNE_STEPS} with N:M, which takes the same share from every layer wherever it hurts, "
                f"with structure=neurons, and from sparsity {UNSTRUCTURED_TUNE_MIN_SPARSITY} unstructured, "
                "else 0; 0: off)",
                "min": 0,
            },
        )
        min_rank_corr: float = field(
            default=0.0,
            metadata={
                "help": "fidelity budget (needs calibration rows): when the pruned model's score falls below this "
                "Spearman correlation with the original's on the calibration rows, halve the sparsity and "
                "retry, up to three times (0: off)",
                "min": 0.0,
                "max": 1.0,
            },
        )

        def __post_init__(self) -> None:
            _check_structure(self.structure)
            for name in ("damping", "augment", "tune_steps"):
                if isinstance(getattr(self, name), str) and getattr(self, name) != "auto":
                    raise ValueError(f"{name} must be a number or auto, not {getattr(self, name)!r}")
            for pattern in (self.include, self.exclude):
                if pattern is not None:
                    try:
                        re.compile(pattern)
                    except re.error as error:
                        raise ValueError(f"{pattern!r} is not a valid regular expression: {error}") from None

        @property
        def refit_damping(self) -> float:
            if self.damping == "auto":
                return NEURON_DAMPING if self.structure == "neurons" else WEIGHT_DAMPING
            return float(self.damping)

        @property
        def chain_steps(self) -> int:
            if self.tune_steps != "auto":
                return int(self.tune_steps)
            high = self.structure == "unstructured" and self.sparsity >= UNSTRUCTURED_TUNE_MIN_SPARSITY
            tuned = high or self.structure == "neurons" or parse_nm(self.structure) is not None
            return AUTO_TUNE_STEPS if tuned else 0

        @property
        def refit_augment(self) -> int:
            if self.augment == "auto":
                return NEURON_AUGMENT_ROWS if self.structure == "neurons" else 0
            return int(self.augment)

    # --- selection ------------------------------------------------------------------------------

    def _matches(self, names: list[str]) -> str | None:
        """Why the include/exclude patterns rule these names out, or None."""
        config = self.config
        if config.include is not None and not any(re.search(config.include, name) for name in names):
            return f"not matched by include {config.include!r}"
        if config.exclude is not None and any(re.search(config.exclude, name) for name in names):
            return f"matched by exclude {config.exclude!r}"
        return None

    def _select(self, model: ir.Model) -> tuple[list[_Weight], dict[str, str]]:
        """Weights to prune, in graph order, and every weight-slot initializer left alone with the reason."""
        skipped: dict[str, str] = {}
        for node in model.graph:
            if (node.domain, node.op_type, node.overload) in model.functions:
                for argument in node.inputs:
                    if argument is not None and argument.is_initializer() and argument.name is not None:
                        skipped[argument.name] = (
                            f"passed to the model-local function {node.domain}.{node.op_type}: "
                            "function bodies are not pruned"
                        )
                continue
            slot = WEIGHT_SLOTS.get(node.op_type)
            value = node.inputs[slot[0]] if slot is not None and slot[0] < len(node.inputs) else None
            if value is None or not value.is_initializer() or value.name is None:
                continue
            if value.is_graph_input():
                skipped[value.name] = OVERRIDABLE_WEIGHT
            elif value.const_value is not None and not value.const_value.dtype.is_floating_point():
                skipped[value.name] = f"{value.const_value.dtype.name} weights are not pruned"
        selected = []
        for value, uses in weights_by_value(model).items():
            name = value.name or "?"
            tensor = value.const_value
            assert tensor is not None
            ops = sorted({use.node.op_type for use in uses})
            reason = None
            if not set(ops) <= set(self.config.op_types):
                reason = f"read by {', '.join(ops)}, not all in op_types"
            elif tensor.size < self.config.min_elements:
                reason = f"{tensor.size} elements, fewer than min_elements={self.config.min_elements}"
            else:
                reason = self._matches([name, *(use.node.name or "" for use in uses)])
            if reason is None:
                selected.append(_Weight(value, uses))
            else:
                skipped[name] = reason
        chosen = {weight.name for weight in selected}
        skipped.update(_other_reasons(model, chosen | set(skipped)))
        return selected, skipped

    # --- entry point ----------------------------------------------------------------------------

    def call(self, model: ir.Model) -> CompressionResult:
        calibration = self.context.calibration
        if self.config.min_rank_corr and calibration is not None:
            if not has_score(model):
                # The budget is a rank correlation of the score: with none to rank, it cannot be kept.
                return CompressionResult(model, modified=False, stats={"skipped": f"min_rank_corr: {NO_SCORE}"})
            return self._within_budget(model, calibration)
        if self.config.structure != "neurons":
            return self._prune_weights(model)
        return self._prune_units(model)

    def _within_budget(self, model: ir.Model, calibration: Calibration) -> CompressionResult:
        """Choose the sparsity on held-out rows: prune a copy at the configured sparsity, then at half
        of it and so on, refitting on three quarters of the calibration rows and keeping the first
        sparsity whose score still ranks the other quarter like the original's. The model is then
        pruned at that sparsity with every row (a refit judged on its own rows would look perfect)."""
        budget = self.config.min_rank_corr
        held_out = max(1, calibration.feeds.rows // 4)
        fitting = dataclasses.replace(calibration, feeds=calibration.feeds.head(calibration.feeds.rows - held_out))
        evaluation = dataclasses.replace(calibration, feeds=calibration.feeds.tail(calibration.feeds.rows - held_out))
        references = capture(model, evaluation, score_logits(model))
        sparsity = self.config.sparsity
        tried: dict[str, float] = {}
        for _ in range(BUDGET_ATTEMPTS):
            trial = model.clone()
            self._at(sparsity, fitting).call(trial)
            scores = capture(trial, evaluation, score_logits(trial))
            tried[f"{sparsity:g}"] = min(
                logit_fidelity(reference, score)["spearman"]
                for reference, score in zip(references, scores, strict=True)
            )
            if tried[f"{sparsity:g}"] >= budget:
                result = self._at(sparsity, calibration).call(model)
                stats = {**result.stats, "sparsity_chosen": sparsity, "held_out_spearman": tried}
                return CompressionResult(model, modified=result.modified, stats=stats)
            sparsity /= 2
        return CompressionResult(
            model,
            modified=False,
            stats={
                "skipped": f"every sparsity tried leaves a held-out Spearman below prune.min_rank_corr={budget}",
                "held_out_spearman": tried,
            },
        )

    def _at(self, sparsity: float, calibration: Calibration) -> Prune:
        """This pass without the budget, at ``sparsity``, refitting on ``calibration``."""
        config = dataclasses.replace(self.config, sparsity=sparsity, min_rank_corr=0.0)
        return type(self)(config, dataclasses.replace(self.context, calibration=calibration))

    # --- unstructured and N:M -------------------------------------------------------------------

    def _mask(self, weight: _Weight, scores: np.ndarray, sparsity: float) -> np.ndarray:
        """The keep mask of ``scores`` (laid out like the stored tensor) for this weight's structure."""
        use = next((u for u in weight.uses if u.reduce_axis is not None), weight.uses[0])
        nm = parse_nm(self.config.structure)
        if nm is not None:
            # Embedding tables have no reduction axis: N:M runs along each row's dimensions.
            axis = use.reduce_axis if use.reduce_axis is not None else 1
            return nm_mask(scores, nm[0], nm[1], axis)
        if use.kind == "embedding":
            return topk_mask(scores, sparsity, axis=1)  # each row keeps its own largest entries
        return topk_mask(scores, sparsity)

    def _masked_fraction(self, weight: _Weight, sparsity: float) -> float:
        """The fraction of entries :meth:`_mask` zeroes, from the tensor's shape alone."""
        shape = tuple(int(dim) for dim in weight.tensor.shape.numpy())
        use = next((u for u in weight.uses if u.reduce_axis is not None), weight.uses[0])
        nm = parse_nm(self.config.structure)
        if nm is not None:
            length = shape[use.reduce_axis if use.reduce_axis is not None else 1]
            n, m = nm
            return 1.0 - ((length // m) * n + min(n, length % m)) / max(length, 1)
        if use.kind == "embedding":
            return 1.0 - keep_count(shape[1], sparsity) / max(shape[1], 1)
        size = weight.tensor.size
        return 1.0 - keep_count(size, sparsity) / max(size, 1)

    def _sparsities(self, weights: list[_Weight]) -> list[float]:
        config = self.config
        if config.scope != "global" or parse_nm(config.structure) is not None:
            return [config.sparsity] * len(weights)
        samples = [magnitude_sample(weight.tensor.numpy()) for weight in weights]
        return global_sparsities(
            samples, [weight.tensor.size for weight in weights], config.sparsity, config.max_layer_sparsity
        )

    def _lazy_magnitude(self, weight: _Weight, sparsity: float) -> None:
        """Replace the tensor by a deferred pruned copy: the work runs when the model is saved or read."""
        source = weight.tensor

        def pruned() -> ir.TensorProtocol:
            array = source.numpy()
            mask = self._mask(weight, np.abs(array.astype(np.float32)), sparsity)
            return ir.tensor(np.where(mask, array, np.zeros((), array.dtype)), name=weight.name)

        shape = ir.Shape(source.shape.numpy())
        weight.value.const_value = ir.LazyTensor(pruned, source.dtype, shape, name=weight.name)

    def _reconstructable(self, weight: _Weight, layers: dict[ir.Value, LinearLayer]) -> str | None:
        """Why this weight is pruned by magnitude only instead of being refit, or None."""
        if not self.config.reconstruct:
            return "reconstruct=false"
        if self.context.calibration is None:
            return "no calibration data"
        layer = layers.get(weight.value)
        if len(weight.value.uses()) == 1 and weight.uses[0].node.op_type == "Conv":
            return _conv_refit_reason(weight.uses[0].node)
        if len(weight.value.uses()) != 1 or layer is None:
            return "refit needs a single MatMul, Gemm (x @ W + b) or Conv reading the weight"
        if layer.data is None or layer.data.name is None:
            return "the layer's input has no name to capture"
        return None

    def _prune_weights(self, model: ir.Model) -> CompressionResult:
        weights, skipped = self._select(model)
        sparsities = self._sparsities(weights)
        layers = {layer.weight: layer for layer in linear_layers(model)}
        why_not = {weight.value: self._reconstructable(weight, layers) for weight in weights}
        convs = {w.value: w.uses[0].node for w in weights if why_not[w.value] is None and w.value not in layers}
        refit = [layers[w.value] for w in weights if why_not[w.value] is None and w.value in layers]
        measured: dict[str, dict[str, float]] = {}
        calibration = self.context.calibration
        augment = self.config.refit_augment
        choice: dict[str, Any] = {}
        nm = parse_nm(self.config.structure)
        measure = self.config.scope == "measured" and nm is None
        choose_rows = self.config.augment == "auto" and (measure or nm is not None)
        priced = [w for w in weights if why_not[w.value] is None]
        if (measure or choose_rows) and priced and _priceable(model, calibration):
            assert calibration is not None
            prices = _HeldOutPrices(self, model, priced, calibration)
            if choose_rows:
                totals = {
                    rows: float(prices.costs(rows, [self.config.sparsity]).sum())
                    for rows in (0, WEIGHT_AUGMENT_CANDIDATE)
                }
                augment = min(totals, key=lambda rows: totals[rows])
                choice["held_out_score_error_by_mixed_rows"] = {str(k): round(v, 8) for k, v in totals.items()}
            if measure:
                sparsities, measured = prices.allocate(augment, weights)
        if augment and calibration is not None and priced:
            calibration = fitting_rows(model, calibration, augment).calibration
        dense = _capture(calibration, model, [layer.data for layer in refit]) if refit else {}
        chains = relu_chains(model, refit) if self.config.chain_steps and calibration is not None else []
        pairs = dot_product_pairs(chains)
        paired = {id(chain) for pair in pairs for chain in (pair.first, pair.second)}
        pair_start = self._tune_start(model, [tower for pair in pairs for tower in (pair.first, pair.second)])
        dense_conv = _capture_raw(calibration, model, [node.inputs[0] for node in convs.values()]) if convs else {}
        originals = {layer: (_effective(layer), _bias_vector(layer)) for layer in refit}
        per_tensor: dict[str, dict[str, Any]] = {}
        after_refits: list[tuple[_Weight, float]] = []
        entry: dict[str, Any]
        for weight, sparsity in zip(weights, sparsities, strict=True):
            layer = layers.get(weight.value)
            if weight.value in convs:
                node = convs[weight.value]
                data = node.inputs[0]
                assert data is not None  # _conv_refit_reason
                error = self._refit_conv(model, calibration, node, dense_conv[data], sparsity)
                entry = {"reconstructed": True, "relative_output_error": error}
            elif why_not[weight.value] is None:
                assert layer is not None
                dense_input = dense[layer.data]
                error = self._refit_masked(model, calibration, layer, dense_input, *originals[layer], sparsity)
                entry = {"reconstructed": True, "relative_output_error": error}
            else:
                entry = {"reconstructed": False, "why_not_reconstructed": why_not[weight.value]}
                if refit and weight.tensor.nbytes > CAPTURE_LAZY_MAX_BYTES:
                    # Every calibration capture would evaluate (and hold) the deferred copy of a big
                    # table; the refits see it unpruned instead, and memory stays at one table.
                    after_refits.append((weight, sparsity))
                    entry["pruned_after_refits"] = True
                else:
                    self._lazy_magnitude(weight, sparsity)
            per_tensor[weight.name] = entry
        for weight, sparsity in after_refits:
            self._lazy_magnitude(weight, sparsity)
        tuned = (
            self._tune_chains(
                model, calibration, [chain for chain in chains if id(chain) not in paired], dense, originals
            )
            if chains and calibration is not None
            else {}
        )
        if pair_start is not None:
            tuned.update(self._tune_after(model, pair_start, self.config.chain_steps))
        zeros = 0.0
        total = 0
        for weight, sparsity in zip(weights, sparsities, strict=True):
            size = weight.tensor.size
            if per_tensor[weight.name]["reconstructed"]:
                achieved = 1.0 - int(np.count_nonzero(weight.tensor.numpy())) / max(size, 1)
            else:  # deferred: the mask's count follows from the shape, without reading the data
                achieved = self._masked_fraction(weight, sparsity)
            per_tensor[weight.name] = {
                "elements": size,
                "sparsity": round(float(achieved), 6),
                **per_tensor[weight.name],
            }
            if weight.name in measured:
                per_tensor[weight.name]["held_out_score_error"] = measured[weight.name]
            zeros += achieved * size
            total += size
        scope = self.config.scope if self.config.scope != "measured" or measured else "layer"
        stats = {
            "structure": self.config.structure,
            "scope": scope,
            "tensors_pruned": len(weights),
            "elements": total,
            "elements_zeroed": round(zeros),
            "sparsity": round(float(zeros / total), 6) if total else 0.0,
            "tensors": per_tensor,
            "skipped": skipped,
            **choice,
            **({"tuned_chains": tuned} if tuned else {}),
        }
        if refit and augment and calibration is not None:
            stats["refit_rows"] = calibration.feeds.source
        return CompressionResult(model, modified=bool(weights), stats=stats)

    def _tune_chains(
        self,
        model: ir.Model,
        calibration: Calibration,
        chains: list[ReluChain],
        dense: dict[ir.Value, np.ndarray],
        originals: dict[LinearLayer, tuple[np.ndarray, np.ndarray]],
    ) -> dict[str, dict[str, Any]]:
        """Tune each chain of refit layers joined by a ReLU (:func:`relu_chains`) towards what the
        original chain gave on the original model's input; the pruned model's own input to the chain
        is what the tuned chain will see. A BatchNormalization before a ReLU is folded into the layer
        for the steps and taken out again when the weights are written, so the zeros stay where they
        are. Returns the held-out error before and after, by chain."""
        report: dict[str, dict[str, Any]] = {}
        for chain in chains:
            target = _original_output(
                chain, dense[chain.layers[0].data], {layer.node: originals[layer] for layer in chain.layers}
            )
            entry = self._tune_one(model, calibration, chain, target, self.config.chain_steps)
            if entry is not None:
                report[_chain_name(chain)] = entry
        return report

    def _tune_one(
        self, model: ir.Model, rows: Calibration, chain: ReluChain, target: np.ndarray, steps: int
    ) -> dict[str, Any] | None:
        """Tune ``chain`` towards ``target`` (what the original chain gave on ``rows``), its input as
        the model now computes it there, and write it back if the held-out error fell. Returns the
        stats entry, or None when the multiply-add cap leaves too few steps."""
        first = chain.layers[0]
        flops = 6 * MINIBATCH * sum(layer.d_in * layer.d_out for layer in chain.layers)
        allowed = min(steps, int(TUNE_FLOPS // flops))
        if allowed < CHECK_EVERY:
            return None
        (student_in,) = _capture(rows, model, [first.data]).values()
        fit = tune_chain(student_in.reshape(-1, first.d_in), target, *_current(chain), allowed, biased=_biased(chain))
        if fit.error_after < fit.error_before:
            _write_chain(model, chain, fit)
        return {
            "layers": len(chain.layers),
            **({"batch_norms_folded": sum(norm is not None for norm in chain.norms)} if any(chain.norms) else {}),
            "steps": fit.steps,
            "held_out_error": [round(fit.error_before, 8), round(fit.error_after, 8)],
        }

    def _tune_start(self, model: ir.Model, chains: list[ReluChain]) -> _TuneStart | None:
        """Take from the model before pruning what :meth:`_tune_after` needs for ``chains``: the
        calibration rows with ``TUNE_MIXED_ROWS`` rows mixing their columns, the chains' inputs
        there, their weights."""
        real = self.context.calibration
        if not chains or real is None:
            return None
        rows = fitting_rows(model, real, TUNE_MIXED_ROWS)
        dense = _capture(rows.calibration, model, [chain.layers[0].data for chain in chains])
        originals = {layer.node: (_effective(layer), _bias_vector(layer)) for chain in chains for layer in chain.layers}
        return _TuneStart(rows, {chain.layers[0].node: chain for chain in chains}, dense, originals)

    def _tune_after(self, model: ir.Model, start: _TuneStart, steps: int) -> dict[str, dict[str, Any]]:
        """Tune the chains ``start`` saw before pruning, as they are now (hidden units may have gone),
        towards what they gave then, on its rows: each pair of towers (:func:`dot_product_pairs`)
        together on their dot products, every row against every other, and each other chain on its
        output. Returns the held-out error before and after, by chain or pair."""
        layers = [layer for layer in linear_layers(model) if layer.node in start.originals]
        chains = [chain for chain in relu_chains(model, layers) if chain.layers[0].node in start.chains]
        pairs = dot_product_pairs(chains)
        paired = {id(tower) for pair in pairs for tower in (pair.first, pair.second)}
        report = self._tune_pairs(model, start, pairs, steps)
        for chain in chains:
            if id(chain) in paired:
                continue
            entry = self._tune_one(model, start.rows.calibration, chain, start.target(chain), steps)
            if entry is not None:
                report[_chain_name(chain)] = entry
        return report

    def _tune_pairs(
        self, model: ir.Model, start: _TuneStart, pairs: list[ChainPair], steps: int
    ) -> dict[str, dict[str, Any]]:
        """Tune each pair of towers together on their dot products towards what they gave before
        pruning (``start``); the held-out error is the calibration rows' products'."""
        rows = start.rows
        report: dict[str, dict[str, Any]] = {}
        for pair in pairs:
            towers = (pair.first, pair.second)
            student = _capture(rows.calibration, model, [tower.layers[0].data for tower in towers])
            inputs = tuple(student[tower.layers[0].data] for tower in towers)
            targets = tuple(start.target(tower) for tower in towers)
            flops = 6 * MINIBATCH * sum(layer.d_in * layer.d_out for tower in towers for layer in tower.layers)
            flops += 8 * MINIBATCH * MINIBATCH * pair.first.layers[-1].d_out
            allowed = min(steps, int(TUNE_FLOPS // flops))
            if allowed < CHECK_EVERY:
                continue
            # Held-out rows come from the calibration rows (mixed rows follow them), as many per
            # example as the towers read.
            judged = len(inputs[0]) * rows.evaluation.feeds.rows // rows.calibration.feeds.rows
            fit = tune_pair(
                (inputs[0], inputs[1]),
                (targets[0], targets[1]),
                (_current(pair.first), _current(pair.second)),
                allowed,
                pair.normalized,
                biased=(_biased(pair.first), _biased(pair.second)),
                judged_rows=judged,
            )
            if fit.first.error_after < fit.first.error_before:
                _write_chain(model, pair.first, fit.first)
                _write_chain(model, pair.second, fit.second)
            report[f"{_chain_name(pair.first)} x {_chain_name(pair.second)}"] = {
                "layers": len(pair.first.layers) + len(pair.second.layers),
                "dot_product": "cosine" if pair.normalized else "plain",
                "rows": len(inputs[0]),
                "steps": fit.first.steps,
                "held_out_error": [round(fit.first.error_before, 8), round(fit.first.error_after, 8)],
            }
        return report

    def _refit_masked(
        self,
        model: ir.Model,
        calibration: Calibration | None,
        layer: LinearLayer,
        dense_input: np.ndarray,
        weight0: np.ndarray,
        bias0: np.ndarray,
        sparsity: float,
    ) -> float:
        """Choose the layer's mask by OBS saliency on calibration activations and refit what survives.

        Small layers get exact per-output OBS rounds and an exact masked refit; layers too large for
        that (``EXACT_OBS_FLOPS``) get SparseGPT, which approximates both in one sweep.

        The input is captured from the model as pruned so far, the target is the unpruned layer on
        the unpruned model's input, so each layer also absorbs the error of the layers before it.
        Returns the relative output error on the calibration rows after the refit.
        """
        (current,) = _capture(calibration, model, [layer.data]).values()
        target = dense_input @ weight0 + bias0
        fit_bias = layer.bias is not None
        goal = target if fit_bias else target - bias0
        # The ridge pulls towards the trained weights: inputs the calibration rows rarely exercise
        # (one-hot columns of rare categories) keep their values instead of shrinking to zero.
        system = NormalEquations.of(Gram.of(current, goal), self.config.refit_damping, fit_bias, prior=weight0)
        new_weight = self._sparse_solution(system, sparsity)
        new_bias = system.intercept(new_weight)
        _write_layer(model.graph, layer, new_weight, new_bias)
        residual = current @ new_weight + (new_bias if new_bias is not None else 0) - goal
        return _relative_error(residual, target)

    def _refit_conv(
        self, model: ir.Model, calibration: Calibration | None, node: ir.Node, dense_input: np.ndarray, sparsity: float
    ) -> float:
        """:meth:`_refit_masked` for a convolution: its patches are the rows of the same ridge system
        (``numerics.conv``), N:M groups running along input channels at each kernel offset."""
        weight_value, bias_value = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
        assert weight_value is not None and weight_value.const_value is not None
        (current,) = _capture_raw(calibration, model, [node.inputs[0]]).values()
        system, rows, goal, target = _conv_refit_system(node, current, dense_input, self.config.refit_damping)
        new_weight = self._sparse_solution(system, sparsity)
        new_bias = system.intercept(new_weight)
        original = weight_value.const_value
        set_constant(weight_value, from_filters(new_weight, original.shape.numpy()).astype(original.dtype.numpy()))
        if new_bias is not None and bias_value is not None and bias_value.const_value is not None:
            _replace_constant(model.graph, node, 2, new_bias.astype(bias_value.const_value.dtype.numpy()))
        residual = rows @ new_weight + (new_bias if new_bias is not None else 0) - goal
        return _relative_error(residual, target)

    def _sparse_solution(self, system: NormalEquations, sparsity: float) -> np.ndarray:
        """The layer's weight at ``sparsity``: OBS mask and exact refit, or SparseGPT for large layers."""
        nm = parse_nm(self.config.structure)
        d_in, d_out = system.b.shape
        if d_out * d_in**3 > EXACT_OBS_FLOPS:
            return sparsegpt(system, sparsity, nm)
        return obs_fit(system, sparsity, OBS_ROUNDS, nm).weights

    # --- hidden units ---------------------------------------------------------------------------

    def _prune_units(self, model: ir.Model) -> CompressionResult:
        """Remove hidden units. Layers fused into one product read through a Split (parallel
        experts and gates) are split first, so that each piece's units go or stay on their own,
        and fused again after."""
        # cleanup imports this module (for remove_dead_units)
        from onnxcompress.passes.cleanup import fuse_parallel_linear, split_fused_linear

        sources = split_fused_linear(model)
        result = self._prune_split_units(model)
        if not sources:
            return result
        fuse_parallel_linear(model, sources)
        stats = {**result.stats, "fused_layers_split": len(sources)}
        # split and fused again, the layers compute what they did unless units went
        return CompressionResult(model, modified=result.modified, stats=stats)

    def _prune_split_units(self, model: ir.Model) -> CompressionResult:
        links, skipped = mlp_links(model)
        chosen: list[HiddenLink] = []
        for link in links:
            names = [link.producer.weight.name or "", link.producer.node.name or ""]
            reason = self._matches(names) or self._op_reason(link)
            if reason is None:
                chosen.append(link)
            else:
                skipped[link.producer.node.name or names[0]] = reason
        real = self.context.calibration
        refit = real is not None and self.config.reconstruct
        fractions = [self.config.sparsity] * len(chosen)
        prices: dict[str, dict[str, float]] = {}
        if refit and chosen and self.config.scope == "measured" and _priceable(model, real):
            assert real is not None
            fractions, prices = _HeldOutPrices(self, model, [], real).allocate_units(chosen)
        augment = self.config.refit_augment
        calibration = fitting_rows(model, real, augment).calibration if augment and real is not None else real
        consumers = [link.consumer for link in chosen]
        dense = _capture(calibration, model, [layer.data for layer in consumers]) if refit and chosen else {}
        originals = {layer: (_effective(layer), _bias_vector(layer)) for layer in consumers}
        # Only the layers whose units go or that read them: include/exclude hold for the tuning too.
        touched = {layer.node for link in chosen for layer in (link.producer, link.consumer)}
        tune_start = (
            self._tune_start(
                model, relu_chains(model, [layer for layer in linear_layers(model) if layer.node in touched])
            )
            if refit and chosen and self.config.chain_steps
            else None
        )
        per_layer: dict[str, dict[str, Any]] = {}
        removed_total = 0
        params_before = sum(layer.d_in * layer.d_out for layer in linear_layers(model))
        for link, fraction in zip(chosen, fractions, strict=True):
            width = link.width
            remove = round(fraction * width)
            remove = min(remove, width - 1)
            name = link.producer.node.name or link.producer.weight.name or "?"
            if remove <= 0:
                skipped[name] = (
                    f"scope=measured removes none of its {width} units (held-out score error by fraction "
                    f"removed: {prices[name]})"
                    if name in prices
                    else f"removing {fraction:.0%} of {width} units rounds to none"
                )
                continue
            consumer = link.consumer
            activations = (
                _capture(calibration, model, [consumer.data])[consumer.data] if calibration is not None else None
            )
            weight0, bias0 = originals[consumer]
            fit_bias = consumer.bias is not None
            system = None
            if refit and activations is not None:
                target = dense[consumer.data] @ weight0 + bias0
                goal = target if fit_bias else target - bias0
                system = NormalEquations.of(
                    Gram.of(activations, goal), self.config.refit_damping, fit_bias, prior=_effective(consumer)
                )
                keep = obs_rows(system, width - remove, OBS_ROUNDS)
            else:
                keep = self._units_to_keep(link, activations, width - remove)
            self._shrink(model.graph, link, keep)
            entry: dict[str, Any] = {
                "units_before": width,
                "units_after": int(keep.size),
                "next_layer": consumer.node.name or consumer.weight.name,
            }
            if name in prices:
                entry["held_out_score_error"] = prices[name]
            if system is not None and activations is not None:
                new_weight, new_bias = _kept_rows_solution(system, keep)
                _write_layer(model.graph, consumer, new_weight, new_bias)
                residual = activations[:, keep] @ new_weight + (new_bias if new_bias is not None else 0) - goal
                entry["next_layer_refit_error"] = _relative_error(residual, target)
            per_layer[name] = entry
            removed_total += remove
        params_after = sum(layer.d_in * layer.d_out for layer in linear_layers(model))
        stats: dict[str, Any] = {
            "structure": "neurons",
            "scope": "measured" if prices else "layer",
            "layers_pruned": len(per_layer),
            "units_removed": removed_total,
            "linear_parameters_before": params_before,
            "linear_parameters_after": params_after,
            "layers": per_layer,
            "skipped": skipped,
        }
        if tune_start is not None and per_layer:
            tuned = self._tune_after(model, tune_start, self.config.chain_steps)
            if tuned:
                stats["tuned_chains"] = tuned
        if not per_layer and not skipped:
            stats["nothing_pruned"] = NO_HIDDEN_UNITS
        if per_layer and augment and calibration is not None and calibration is not real:
            stats["refit_rows"] = calibration.feeds.source
        return CompressionResult(model, modified=bool(per_layer), stats=stats)

    def _op_reason(self, link: HiddenLink) -> str | None:
        ops = {link.producer.node.op_type, link.consumer.node.op_type}
        if not ops <= set(self.config.op_types):
            return f"{' and '.join(sorted(ops))} not all in op_types"
        return None

    @staticmethod
    def _units_to_keep(link: HiddenLink, activations: np.ndarray | None, count: int) -> np.ndarray:
        """Indices (ascending) of the ``count`` most important hidden units.

        A unit's importance is what it contributes to the next layer: the norm of the next layer's
        weights reading it times its activation size (RMS on calibration rows), or without data the
        norm of the producer's weights writing it.
        """
        outgoing = np.linalg.norm(_effective(link.consumer), axis=1)
        if activations is not None:
            size = np.sqrt(np.mean(activations**2, axis=0))
        else:
            size = np.linalg.norm(_effective(link.producer), axis=0)
        importance = outgoing * size
        return np.sort(np.argsort(-importance, kind="stable")[:count])

    @staticmethod
    def _shrink(graph: ir.Graph, link: HiddenLink, keep: np.ndarray) -> None:
        """Drop every unit not in ``keep`` from the producer, the per-unit constants between, and the consumer."""
        producer, consumer = link.producer, link.consumer
        width = link.width
        weight = producer.weight.const_value.numpy()  # type: ignore[union-attr]
        set_constant(producer.weight, np.take(weight, keep, axis=producer.out_axis))
        if producer.bias is not None:
            holder = producer.bias_node if producer.bias_node is not None else producer.node
            _slice_input(graph, holder, list(holder.inputs).index(producer.bias), keep, width)
        for node in link.between:
            if node.op_type == "BatchNormalization":
                for index in BATCHNORM_PARAMS:
                    _slice_input(graph, node, index, keep, width)
            elif node.op_type in ELEMENTWISE_BINARY or node.op_type in ("PRelu",):
                for index, value in enumerate(node.inputs):
                    if value is not None and value.const_value is not None:
                        _slice_input(graph, node, index, keep, width)
        weight = consumer.weight.const_value.numpy()  # type: ignore[union-attr]
        set_constant(consumer.weight, np.take(weight, keep, axis=1 - consumer.out_axis))
        for value in _hidden_values(link):
            if value.shape is not None and len(value.shape) and value.shape[-1] == width:
                value.shape = ir.Shape([*value.shape[:-1], int(keep.size)])


#: A hidden unit whose incoming or outgoing weights are all this small next to its layer's largest
#: is dead: what it adds is far below float32 rounding (scikit-learn's L2-regularised MLP trains 28
#: of its 192 hidden units to weights of 1e-36).
DEAD_UNIT_TOLERANCE = 1e-10

#: Ops between two layers that can be evaluated on a dead unit's constant output.
_CONSTANT_THROUGH: dict[str, Any] = {
    "Relu": lambda values, node: np.maximum(values, 0.0),
    "Identity": lambda values, node: values,
    "Dropout": lambda values, node: values,
    "LeakyRelu": lambda values, node: np.where(values >= 0, values, node.attributes.get_float("alpha", 0.01) * values),
}


#: A convolution's refit holds its calibration patches in float64: above this many bytes it is
#: pruned by magnitude instead (a 2-D map of 32x32 positions and 288 patch values on 512 rows is 1.2 GB).
CONV_REFIT_MAX_BYTES = 256 << 20


def _conv_geometry(node: ir.Node) -> ConvGeometry | None:
    """The geometry of a Conv the refit handles: one group, explicit padding, a constant weight."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is None or len(weight.const_value.shape) < 3:
        return None
    if node.attributes.get_int("group", 1) != 1 or node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        return None
    kernel = [int(k) for k in weight.const_value.shape.numpy()[2:]]
    return ConvGeometry.of(
        kernel,
        node.attributes.get_ints("strides", None),
        node.attributes.get_ints("pads", None),
        node.attributes.get_ints("dilations", None),
    )


def _conv_refit_reason(node: ir.Node) -> str | None:
    """Why a Conv is pruned by magnitude only, or None when its patches can be refit."""
    geometry = _conv_geometry(node)
    data = node.inputs[0]
    if geometry is None:
        return "refit handles Conv with one group and explicit pads"
    if data is None or data.name is None:
        return "the layer's input has no name to capture"
    dims = [dim for dim in data.shape.dims[1:] if isinstance(dim, int)] if data.shape is not None else []
    if data.shape is not None and len(dims) == len(data.shape) - 1:
        patch = int(np.prod(geometry.kernel)) * dims[0]
        positions = int(np.prod(geometry.output_sizes(dims[1:])))
        if CALIBRATION_ROWS_ESTIMATE * positions * patch * 8 > CONV_REFIT_MAX_BYTES:
            return f"its calibration patches would take over {CONV_REFIT_MAX_BYTES >> 20} MiB"
    return None


#: Calibration rows assumed when sizing a convolution's patches before any is captured.
CALIBRATION_ROWS_ESTIMATE = 512


def _priceable(model: ir.Model, calibration: Calibration | None) -> bool:
    """Whether held-out prices can be taken: enough calibration rows to hold a quarter out, and a
    float score to measure the change of."""
    return calibration is not None and calibration.feeds.rows >= MEASURED_MIN_ROWS and has_score(model)


class _HeldOutPrices:
    """What pruning each refit layer alone costs the model's score on held-out calibration rows.

    The layer is refit on the first three quarters of the calibration rows (plus mixed-column rows
    drawn from them, if asked) and priced by the mean squared change of the score on the last
    quarter, relative to the score's variance, with every other layer dense. The next layer of an
    MLP link is refit (dense, towards its unpruned output) before the score is measured, because
    the pruning that follows will let it absorb what it can: DLRM at 80% then goes from Spearman
    0.994 to 0.996 on the test rows, dlrm_wide 0.993 to 0.998, Wide&Deep 0.987 to 0.990. Writes go
    to a clone that shares the model's tensors and replaces only the ones it changes.
    """

    def __init__(self, prune: Prune, model: ir.Model, refit: list[_Weight], calibration: Calibration) -> None:
        self.prune = prune
        self.refit = refit
        held_out = max(1, calibration.feeds.rows // 4)
        self.fitting = dataclasses.replace(calibration, feeds=calibration.feeds.head(calibration.feeds.rows - held_out))
        self.evaluation = dataclasses.replace(
            calibration, feeds=calibration.feeds.tail(calibration.feeds.rows - held_out)
        )
        self.model = model
        self.trial = model.clone()
        self.layers = {layer.weight.name: layer for layer in linear_layers(self.trial)}
        self.convs = {
            weight.name: node
            for node in self.trial.graph
            if node.op_type == "Conv" and len(node.inputs) > 1 and (weight := node.inputs[1]) is not None
        }
        self.next_layers = {
            link.producer.weight.name: link.consumer
            for link in mlp_links(self.trial)[0]
            if len(link.consumer.weight.uses()) == 1
        }
        # Every task of a multi-task model: a layer its towers share is priced by all of them.
        self.logits = score_logits(self.trial)
        self.references = [
            np.asarray(reference, dtype=np.float64) for reference in capture(self.trial, self.evaluation, self.logits)
        ]
        self.variances = [float(reference.var()) or 1.0 for reference in self.references]

    def levels(self) -> list[float]:
        """``MEASURED_LEVELS`` up to max_layer_sparsity, which is the top level."""
        cap = self.prune.config.max_layer_sparsity
        levels = [level for level in MEASURED_LEVELS if level < cap]
        return [*levels, cap] if levels else [0.0]

    def costs(self, augment: int, sparsities: Sequence[float]) -> np.ndarray:
        """``[layer, sparsity]`` prices, refitting on the fitting rows plus ``augment`` mixed rows.

        Unstructured levels continue each from the last one's OBS mask; with N:M the sparsity is moot.
        """
        config = self.prune.config
        rows = fitting_rows(self.trial, self.fitting, augment).calibration if augment else self.fitting
        nm = parse_nm(config.structure)
        costs = np.zeros((len(self.refit), len(sparsities)))
        # Every layer's and every next layer's input on the dense trial, in one onnxruntime session.
        layers = [self.layers[weight.name] for weight in self.refit if weight.name in self.layers]
        dense = _capture(rows, self.trial, [layer.data for layer in [*layers, *self.next_layers.values()]])
        convs = [self.convs[weight.name] for weight in self.refit if weight.name not in self.layers]
        dense_conv = _capture_raw(rows, self.trial, [node.inputs[0] for node in convs]) if convs else {}
        for row, weight in enumerate(self.refit):
            if weight.name not in self.layers:
                node = self.convs[weight.name]
                data = node.inputs[0]
                assert data is not None  # _conv_refit_reason
                costs[row] = self._conv_costs(node, dense_conv[data], sparsities)
                continue
            layer = self.layers[weight.name]
            system, weight0, bias0 = _refit_system(layer, dense[layer.data], dense[layer.data], config.refit_damping)
            exact = nm is None and layer.d_out * layer.d_in**3 <= EXACT_OBS_FLOPS
            walked = [sparsity for sparsity in sparsities if sparsity > 0.0]
            path = iter(obs_path(system, walked, OBS_ROUNDS, MEASURED_ROUNDS_PER_LEVEL) if exact else ())
            for column, sparsity in enumerate(sparsities):
                if sparsity == 0.0 and nm is None:
                    continue
                new_weight = next(path).weights if exact else self.prune._sparse_solution(system, sparsity)
                _write_layer(self.trial.graph, layer, new_weight, system.intercept(new_weight))
                after = self.next_layers.get(weight.name)
                restore = self._absorb(after, rows, dense[after.data]) if after is not None else None
                costs[row, column] = self._price(self.trial, self.logits)
                if after is not None and restore is not None:
                    _write_layer(self.trial.graph, after, *restore)
            _write_layer(self.trial.graph, layer, weight0, bias0)
        return costs

    def _conv_costs(self, node: ir.Node, inputs: np.ndarray, sparsities: Sequence[float]) -> np.ndarray:
        """:meth:`costs` of one convolution: refit on its patches at each sparsity, the score priced."""
        config = self.prune.config
        weight_value, bias_value = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
        assert weight_value is not None and weight_value.const_value is not None
        original = weight_value.const_value
        bias_original = bias_value.const_value if bias_value is not None else None
        system, _, _, _ = _conv_refit_system(node, inputs, inputs, config.refit_damping)
        costs = np.zeros(len(sparsities))
        for column, sparsity in enumerate(sparsities):
            if sparsity == 0.0 and parse_nm(config.structure) is None:
                continue
            new_weight = self.prune._sparse_solution(system, sparsity)
            set_constant(weight_value, from_filters(new_weight, original.shape.numpy()).astype(original.dtype.numpy()))
            new_bias = system.intercept(new_weight)
            if new_bias is not None and bias_original is not None:
                _replace_constant(self.trial.graph, node, 2, new_bias.astype(bias_original.dtype.numpy()))
            costs[column] = self._price(self.trial, self.logits)
        weight_value.const_value = original
        if bias_value is not None:
            node.replace_input_with(2, bias_value)
            bias_value.const_value = bias_original
        return costs

    def _price(self, trial: ir.Model, logits: list[ir.Value]) -> float:
        """The mean squared change of ``trial``'s scores on the held-out rows, each relative to its
        variance, summed over the scores."""
        scores = capture(trial, self.evaluation, logits)
        return sum(
            float(np.mean((np.asarray(score, dtype=np.float64) - reference) ** 2)) / variance
            for score, reference, variance in zip(scores, self.references, self.variances, strict=True)
        )

    def _absorb(
        self, layer: LinearLayer, rows: Calibration, dense_inputs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Refit ``layer`` (dense) on its inputs in the trial towards its output on ``dense_inputs``,
        as its own refit will after the layer before it is pruned; return its weight and bias as they were."""
        (inputs,) = _capture(rows, self.trial, [layer.data]).values()
        system, weight0, bias0 = _refit_system(layer, inputs, dense_inputs, self.prune.config.refit_damping)
        weight = system.solve()
        _write_layer(self.trial.graph, layer, weight, system.intercept(weight))
        return weight0, bias0

    def allocate(self, augment: int, weights: list[_Weight]) -> tuple[list[float], dict[str, dict[str, float]]]:
        """scope=measured: per-tensor sparsities of ``weights`` meeting the target at the least summed
        price over ``MEASURED_LEVELS`` (up to max_layer_sparsity), and the price list.

        Layers differ widely: a first layer over embeddings or a narrow last layer moves the score far
        more per weight removed than a wide hidden layer does. Weights pruned by magnitude alone keep
        the configured sparsity.
        """
        config = self.prune.config
        levels = self.levels()
        costs = self.costs(augment, levels)
        allocated = allocate_sparsities(levels, costs, [weight.tensor.size for weight in self.refit], config.sparsity)
        by_name = dict(zip((weight.name for weight in self.refit), allocated, strict=True))
        prices = _price_lists([weight.name for weight in self.refit], levels, costs)
        return [by_name.get(weight.name, config.sparsity) for weight in weights], prices

    def allocate_units(self, links: list[HiddenLink]) -> tuple[list[float], dict[str, dict[str, float]]]:
        """structure=neurons with scope=measured: the fraction of each link's units to remove so that
        the target fraction of all their units goes at the least summed price, and the price list.

        Each link loses ``MEASURED_LEVELS`` of its units alone (the next layer refit on the fitting
        rows, plus prune.augment mixed rows drawn from them) in a fresh clone of the model.
        """
        config = self.prune.config
        levels = self.levels()
        augment = config.refit_augment
        rows = fitting_rows(self.trial, self.fitting, augment).calibration if augment else self.fitting
        costs = np.zeros((len(links), len(levels)))
        for row, link in enumerate(links):
            (inputs,) = _capture(rows, self.model, [link.consumer.data]).values()
            system, _, _ = _refit_system(link.consumer, inputs, inputs, config.refit_damping)
            for column, level in enumerate(levels[1:], start=1):
                remove = min(round(level * link.width), link.width - 1)
                keep = obs_rows(system, link.width - remove, OBS_ROUNDS)
                trial = self.model.clone()
                (copy,) = (
                    other for other in mlp_links(trial)[0] if other.producer.weight.name == link.producer.weight.name
                )
                Prune._shrink(trial.graph, copy, keep)
                _write_layer(trial.graph, copy.consumer, *_kept_rows_solution(system, keep))
                costs[row, column] = self._price(trial, score_logits(trial))
        allocated = allocate_sparsities(levels, costs, [link.width for link in links], config.sparsity)
        names = [link.producer.node.name or link.producer.weight.name or "?" for link in links]
        return allocated, _price_lists(names, levels, costs)


def _conv_refit_system(
    node: ir.Node, inputs: np.ndarray, dense_inputs: np.ndarray, damping: float
) -> tuple[NormalEquations, np.ndarray, np.ndarray, np.ndarray]:
    """The ridge system refitting Conv ``node`` on the patches of ``inputs`` towards its output on
    ``dense_inputs`` (the unpruned model's), pulled towards its trained filters: (system, patch rows,
    what the refit fits (the target less the bias when there is none to refit), target)."""
    geometry = _conv_geometry(node)
    weight_value, bias_value = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
    assert geometry is not None and weight_value is not None and weight_value.const_value is not None
    weight0 = filters(weight_value.const_value.numpy().astype(np.float64))
    bias0 = np.zeros(weight0.shape[1])
    if bias_value is not None and bias_value.const_value is not None:
        bias0 = bias_value.const_value.numpy().astype(np.float64).reshape(-1)
    rows = conv_patches(inputs, geometry)
    dense_rows = rows if dense_inputs is inputs else conv_patches(dense_inputs, geometry)
    target = dense_rows @ weight0 + bias0
    fit_bias = bias_value is not None
    goal = target if fit_bias else target - bias0
    return NormalEquations.of(Gram.of(rows, goal), damping, fit_bias, prior=weight0), rows, goal, target


def _refit_system(
    layer: LinearLayer, inputs: np.ndarray, dense_inputs: np.ndarray, damping: float
) -> tuple[NormalEquations, np.ndarray, np.ndarray | None]:
    """The ridge system refitting ``layer`` on ``inputs`` towards its own output on ``dense_inputs``
    (pulled towards its current weight), with that weight and bias (None without a bias input)."""
    weight0, bias0 = _effective(layer), _bias_vector(layer)
    fit_bias = layer.bias is not None
    goal = dense_inputs @ weight0 + (bias0 if fit_bias else 0)
    system = NormalEquations.of(Gram.of(inputs, goal), damping, fit_bias, prior=weight0)
    return system, weight0, bias0 if fit_bias else None


def _price_lists(names: list[str], levels: list[float], costs: np.ndarray) -> dict[str, dict[str, float]]:
    """``{name: {level: price}}`` for the stats, level 0 (free by definition) left out."""
    return {
        name: {f"{level:g}": round(float(cost), 8) for level, cost in zip(levels[1:], costs[row, 1:], strict=True)}
        for row, name in enumerate(names)
    }


def _kept_rows_solution(system: NormalEquations, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Weight (and bias) of the refit that reads only inputs ``keep`` of ``system``."""
    reduced = NormalEquations(
        system.a[np.ix_(keep, keep)],
        system.b[keep],
        system.x_mean[keep] if system.x_mean is not None else None,
        system.y_mean,
    )
    weight = reduced.solve()
    return weight, reduced.intercept(weight)


def _constant_outputs(link: HiddenLink, biases: np.ndarray) -> np.ndarray | None:
    """What units that read nothing (output = their bias) hand the next layer, or None if an op
    between cannot be evaluated here."""
    values = biases
    for node in link.between:
        evaluate = _CONSTANT_THROUGH.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if evaluate is None:
            return None
        values = evaluate(values, node)
    return values


def remove_dead_units(model: ir.Model) -> int:
    """Remove hidden units that compute nothing: those whose outgoing weights are all (nearly)
    zero, and those whose incoming weights are, whose constant output is added to the next layer's
    bias. Lossless up to float32 rounding; the matrices shrink like hidden-unit pruning's. Returns
    the number of units removed."""
    removed = 0
    links, _ = mlp_links(model)
    for link in links:
        producer, consumer = link.producer, link.consumer
        incoming, outgoing = _effective(producer), _effective(consumer)
        if not incoming.size or not outgoing.size:
            continue
        unused = np.abs(outgoing).max(axis=1) <= DEAD_UNIT_TOLERANCE * np.abs(outgoing).max()
        constant = np.abs(incoming).max(axis=0) <= DEAD_UNIT_TOLERANCE * np.abs(incoming).max()
        constant &= ~unused
        shift = np.zeros(consumer.d_out)
        if constant.any():
            outputs = _constant_outputs(link, _bias_vector(producer)[constant])
            if outputs is not None:
                shift = outputs @ outgoing[constant]
            if outputs is None or (consumer.bias is None and np.any(shift)):
                constant[:] = False
                shift = np.zeros(consumer.d_out)
        dead = unused | constant
        if dead.all():
            dead[int(np.argmax(np.abs(outgoing).max(axis=1)))] = False  # a layer keeps one unit
        if not dead.any():
            continue
        keep = np.flatnonzero(~dead)
        if np.any(shift):
            _write_layer(model.graph, consumer, outgoing, _bias_vector(consumer) + shift)
        Prune._shrink(model.graph, link, keep)
        removed += int(dead.sum())
    return removed


def _slice_input(graph: ir.Graph, node: ir.Node, index: int, keep: np.ndarray, width: int) -> None:
    """Keep entries ``keep`` of a per-unit constant input (scalars and broadcast constants stay as they are)."""
    value = node.inputs[index]
    assert value is not None and value.const_value is not None
    array = value.const_value.numpy()
    if array.size != width or array.shape[-1] != width:
        return
    _replace_constant(graph, node, index, np.take(array, keep, axis=-1))


def _hidden_values(link: HiddenLink) -> list[ir.Value]:
    values = [link.producer.node.outputs[0], link.producer.output]
    values += [node.outputs[0] for node in link.between]
    return list(dict.fromkeys(values))


def _relative_error(residual: np.ndarray, target: np.ndarray) -> float:
    """||residual|| / ||target||, rounded for the stats: a layer's output error after its refit."""
    return round(float(np.linalg.norm(residual)) / max(float(np.linalg.norm(target)), 1e-12), 6)


def _other_reasons(model: ir.Model, accounted: set[str]) -> dict[str, str]:
    """Why every other float initializer of rank 2 or more, in any graph, is left as it is.

    Decided from dtype, shape and readers only. Weights inside If/Loop/Scan bodies or passed to a
    model-local function are not pruned (their layers cannot be captured or refit), and rank-2
    constants read by other ops (a ``[1, C]`` bias) are not weights.
    """
    functions = set(model.functions)
    reasons: dict[str, str] = {}
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if value.name is None or value.name in accounted or tensor is None:
                continue
            if not tensor.dtype.is_floating_point() or len(tensor.shape) < 2:
                continue
            readers = [node for node, _ in value.uses()]
            if graph is not model.graph:
                reason = "inside a subgraph: If/Loop/Scan bodies are not pruned"
            elif value.is_graph_input():
                reason = OVERRIDABLE_WEIGHT
            elif any(node.graph is not model.graph for node in readers):
                reason = (
                    "read inside a subgraph: If/Loop/Scan bodies are not pruned "
                    "(an embedding bag's Loop: run cleanup first)"
                )
            elif any(node.op_identifier() in functions for node in readers):
                reason = "passed to a model-local function, whose body is not pruned"
            elif readers:
                reason = f"read by {', '.join(sorted({node.op_type for node in readers}))}: not a weight"
            else:
                reason = "unused"
            reasons[value.name] = reason
    return reasons
