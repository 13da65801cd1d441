"""Distillation without a training loop: remove layers and refit in closed form, or adopt a student."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import IdentityEliminationPass, RemoveUnusedNodesPass

from onnxcompress import io
from onnxcompress.calibration import graph_inputs
from onnxcompress.errors import InputModelError, UnsupportedModelError, UsageError
from onnxcompress.graph import replace_contents
from onnxcompress.layers import (
    NO_SCORE,
    Activations,
    Fitting,
    Layer,
    LayerReport,
    capture,
    discover,
    fitting_rows,
    has_score,
    layer_params,
    linear_name,
    linear_weights,
    logit_heads,
    matmul_flops,
    measure,
    model_params,
    refit_gap,
    remove,
    score_logits,
    write_linear,
)
from onnxcompress.numerics.distill import logit_fidelity
from onnxcompress.numerics.lstsq import ridge
from onnxcompress.parity import STRUCTURAL
from onnxcompress.passes import register
from onnxcompress.passes.base import CompressionPass, CompressionResult
from onnxcompress.passes.cleanup import remove_inference_dropout

__all__ = ["Distill", "refit_heads"]

logger = logging.getLogger(__name__)


def refit_heads(model: ir.Model, teacher_logits: Sequence[np.ndarray], fitting: Fitting, damping: float) -> list[str]:
    """Logit matching: for each score logit of ``model`` (one per task of a multi-task model), jointly
    refit the linear layers adding into it so that it matches the teacher's (on the fitting rows)
    in the least-squares sense. Returns the refit heads."""
    refit: list[str] = []
    for logit, teacher_logit in zip(score_logits(model), teacher_logits, strict=True):
        refit += _refit_logit_heads(model, logit, teacher_logit, fitting, damping)
    return refit


def _refit_logit_heads(
    model: ir.Model, logit: ir.Value, teacher_logit: np.ndarray, fitting: Fitting, damping: float
) -> list[str]:
    """What else adds into the logit (DeepFM's FM term, say) stays fixed and is subtracted from the
    target. The intercept goes to one head; the others' biases become zero."""
    heads = logit_heads(model, logit)
    if not heads:
        return []
    head_inputs = [head.node.inputs[0] for head in heads]
    assert all(value is not None for value in head_inputs)
    arrays = capture(model, fitting.calibration, [logit, *(h.output for h in heads), *head_inputs])  # type: ignore[list-item]
    rows = arrays[0].shape[0]
    width = heads[0].d_out
    inputs = [np.asarray(array, np.float64).reshape(rows, -1) for array in arrays[1 + len(heads) :]]
    if any(array.shape[1] != head.d_in for array, head in zip(inputs, heads, strict=True)):
        return []
    rest = np.asarray(arrays[0], np.float64).reshape(rows, width) - sum(
        np.asarray(array, np.float64).reshape(rows, width) for array in arrays[1 : 1 + len(heads)]
    )
    target = np.asarray(teacher_logit, np.float64).reshape(rows, width) - rest
    prior = np.vstack([linear_weights(head)[0] for head in heads])
    weight, intercept = ridge(np.hstack(inputs), target, damping, fit_intercept=True, prior=prior)
    holder = next((index for index, head in enumerate(heads) if head.bias is not None), 0)
    start = 0
    for index, head in enumerate(heads):
        bias = intercept if index == holder else (np.zeros(width) if head.bias is not None else None)
        write_linear(model.graph, head, weight[start : start + head.d_in], bias)
        start += head.d_in
    return [linear_name(head) for head in heads]


def _flops(model: ir.Model, fitting: Fitting) -> int:
    return round(sum(matmul_flops(model, fitting.evaluation.feeds.head(4)).values()))


def _output_specs(model: ir.Model) -> dict[str, tuple[ir.DataType | None, int | None]]:
    return {
        value.name: (value.dtype, len(value.shape) if value.shape is not None else None)  # type: ignore[misc]
        for value in model.graph.outputs
    }


def _check_interface(teacher: ir.Model, student: ir.Model, path: Path) -> None:
    """The student must take the teacher's inputs and produce the teacher's outputs (names, dtypes, ranks).

    Raises:
        InputModelError: naming the first mismatch.
    """
    what = f"distill.student {path}"
    wanted = {spec.name: spec for spec in graph_inputs(teacher)}
    given = {spec.name: spec for spec in graph_inputs(student)}
    extra = sorted(set(given) - set(wanted))
    if extra:
        raise InputModelError(
            f"{what}: takes input {given[extra[0]].describe()} that the teacher does not have; the teacher takes "
            f"{', '.join(spec.describe() for spec in wanted.values())}; export the student with the teacher's inputs"
        )
    for name, spec in wanted.items():
        if name not in given:
            raise InputModelError(f"{what}: lacks the teacher's input {spec.describe()}; export the student with it")
        other = given[name]
        same_rank = spec.shape is None or other.shape is None or len(spec.shape) == len(other.shape)
        fixed_dims_agree = same_rank and all(
            not (isinstance(a, int) and isinstance(b, int)) or a == b
            for a, b in zip(spec.shape or (), other.shape or (), strict=False)
        )
        if other.dtype != spec.dtype or not fixed_dims_agree:
            raise InputModelError(
                f"{what}: input {other.describe()} does not match the teacher's {spec.describe()}; "
                f"export the student with the teacher's input types and shapes"
            )
    teacher_outputs, student_outputs = _output_specs(teacher), _output_specs(student)
    for name, (dtype, rank) in teacher_outputs.items():
        if name not in student_outputs:
            raise InputModelError(
                f"{what}: lacks the teacher's output {name!r} (it has {', '.join(sorted(student_outputs))}); "
                f"name the student's outputs like the teacher's"
            )
        student_dtype, student_rank = student_outputs[name]
        if student_dtype != dtype or (rank is not None and student_rank is not None and rank != student_rank):
            raise InputModelError(
                f"{what}: output {name!r} is {student_dtype} of rank {student_rank} but the teacher's is {dtype} "
                f"of rank {rank}"
            )


def _strip(student: ir.Model, outputs: Sequence[str]) -> dict[str, int]:
    """Keep only the teacher's outputs (in its order) and drop what they do not need: other outputs and
    the nodes only they use, inference Dropout, Identity chains."""
    graph = student.graph
    by_name = {value.name: value for value in graph.outputs}
    extra = [name for name in by_name if name not in outputs]
    graph.outputs.clear()
    graph.outputs.extend(by_name[name] for name in outputs)
    nodes_before = len(graph)
    dropout = remove_inference_dropout(student)
    identity_before = sum(node.op_type == "Identity" for node in graph)
    IdentityEliminationPass()(student)
    identity = identity_before - sum(node.op_type == "Identity" for node in graph)
    RemoveUnusedNodesPass()(student)
    return {
        "outputs_stripped": len(extra),
        "dropout_removed": dropout,
        "identity_removed": identity,
        "nodes_removed": nodes_before - len(graph),
    }


def _fidelity(teacher_logits: Sequence[np.ndarray], model: ir.Model, fitting: Fitting) -> dict[str, float]:
    """The student's worst score: the lowest Spearman and the largest logit error over its tasks."""
    students = capture(model, fitting.evaluation, score_logits(model))
    figures = [
        logit_fidelity(teacher[fitting.rows], student)
        for teacher, student in zip(teacher_logits, students, strict=True)
    ]
    return {
        "spearman": min(figure["spearman"] for figure in figures),
        "logit_mae": max(figure["logit_mae"] for figure in figures),
    }


@register("distill")
class Distill(CompressionPass):
    """Remove the least important (or named) MLP layers, residual or transformer blocks and refit the
    neighbouring linear layer and the logit layer in closed form on teacher activations; or replace
    the model by a smaller distilled student whose last linear layer is refit to the teacher's logits."""

    lossy = True
    budget = STRUCTURAL

    @dataclass(frozen=True)
    class Config:
        remove: int | str = field(
            default=0,
            metadata={
                "help": "how many layers to remove, least important first, or a comma-separated list of layer "
                "names (onnxcompress --list-layers MODEL shows them)",
                "min": 0,
            },
        )
        target_params: int = field(
            default=0,
            metadata={
                "help": "instead of remove: remove the least important layers until the model has at most this "
                "many parameters (0: off)",
                "min": 0,
            },
        )
        ridge: float = field(
            default=0.01,
            metadata={
                "help": "ridge regularisation of the closed-form refits, relative to the mean input energy",
                "min": 0.0,
            },
        )
        refit: bool = field(
            default=True,
            metadata={"help": "refit the linear layer next to each removed layer to the teacher's activations"},
        )
        refit_head: bool = field(
            default=True,
            metadata={"help": "refit the linear layer(s) adding into the score logit to the teacher's logits"},
        )
        augment: int = field(
            default=4096,
            metadata={
                "help": "extra fitting rows made by drawing every input column from a random calibration row "
                "(the teacher labels them)",
                "min": 0,
            },
        )
        min_rank_corr: float = field(
            default=0.0,
            metadata={
                "help": "fidelity budget: a layer is removed only if, after the refits, the score logit keeps at "
                "least this Spearman correlation with the teacher's on the fitting rows; remove or target_params "
                "then bounds how many (0: off)",
                "min": 0.0,
            },
        )
        student: str | None = field(
            default=None,
            metadata={
                "help": "a smaller student .onnx with the teacher's inputs and outputs: it replaces the model after "
                "its last linear layer is refit to the teacher's logits"
            },
        )

        def __post_init__(self) -> None:
            if isinstance(self.remove, int) and self.remove < 0:
                raise ValueError(f"distill.remove must be a count of at least 0 or layer names, got {self.remove}")
            if not 0.0 <= self.min_rank_corr <= 1.0:
                raise ValueError(f"distill.min_rank_corr must be between 0 and 1, got {self.min_rank_corr}")
            if self.target_params < 0 or self.augment < 0 or self.ridge < 0:
                raise ValueError("distill.target_params, distill.augment and distill.ridge must not be negative")
            if self.remove not in (0, "") and self.target_params:
                raise ValueError("give distill.remove or distill.target_params, not both")
            if self.student and (self.remove not in (0, "") or self.target_params):
                raise ValueError("distill.student replaces the model; drop distill.remove and distill.target_params")

    def call(self, model: ir.Model) -> CompressionResult:
        if self.config.student:
            return self._adopt_student(model, Path(self.config.student))
        if self.config.remove in (0, "") and not self.config.target_params:
            return CompressionResult(model, modified=False, stats={})
        if not discover(model):
            return CompressionResult(model, modified=False, stats={"skipped": "no removable layer found"})
        named = isinstance(self.config.remove, str) and bool(self.config.remove.strip())
        if not named and not has_score(model):
            # Layers are chosen by how little the score moves; with no score there is nothing to
            # choose by (a preset runs on: the other passes still apply).
            return CompressionResult(model, modified=False, stats={"skipped": NO_SCORE})
        fitting = fitting_rows(model, self.context.calibration, self.config.augment)
        teacher_model = model.clone()
        order, reports = self._order(teacher_model, fitting)
        return self._remove(model, teacher_model, fitting, order, reports)

    def _rank(self, report: LayerReport) -> float:
        refit = self.config.refit and report.importance_refit is not None
        return report.importance_refit if refit else report.importance  # type: ignore[return-value]

    def _order(self, teacher: ir.Model, fitting: Fitting) -> tuple[list[Layer], dict[str, LayerReport]]:
        """The named layers in graph order, or every layer that saves parameters, least important first."""
        layers = discover(teacher)
        by_name = {layer.name: layer for layer in layers}
        if isinstance(self.config.remove, str) and self.config.remove.strip():
            names = [name.strip() for name in self.config.remove.split(",") if name.strip()]
            unknown = [name for name in names if name not in by_name]
            if unknown:
                raise UsageError(
                    f"distill.remove names {', '.join(unknown)}, which the model does not have; removable layers: "
                    f"{', '.join(by_name)}"
                )
            chosen = [layer for layer in layers if layer.name in names]
            for index, layer in enumerate(chosen):
                for other in chosen[index + 1 :]:
                    if set(layer.nodes) & set(other.nodes):
                        raise UsageError(f"distill.remove: {layer.name} and {other.name} overlap; name only one")
            return chosen, {}
        reports = measure(teacher, layers, fitting, self.config.ridge, self.config.refit)
        ranked = sorted((report for report in reports if report.params > 0), key=self._rank)
        return [by_name[report.name] for report in ranked], {report.name: report for report in reports}

    # --- removing --------------------------------------------------------------------------------

    def _done(self, model: ir.Model, removed: int) -> bool:
        remove_, target = self.config.remove, self.config.target_params
        if target:
            return model_params(model) <= target
        return isinstance(remove_, int) and removed == remove_

    def _remove(
        self,
        model: ir.Model,
        teacher_model: ir.Model,
        fitting: Fitting,
        order: list[Layer],
        reports: dict[str, LayerReport],
    ) -> CompressionResult:
        """Remove layers in ``order`` (skipping any that overlap one already removed) until the count or
        the parameter target is reached, each followed by the refit of its neighbour; then the heads."""
        teacher = Activations(teacher_model, fitting.calibration)
        teacher_logits = teacher(*[value.name for value in score_logits(teacher_model)])  # type: ignore[arg-type]
        params_before, flops_before = model_params(model), _flops(model, fitting)
        plain = model.clone() if self.config.refit or self.config.refit_head else None
        removed: list[str] = []
        removed_nodes: set[ir.Node] = set()
        refit: list[str] = []
        over_budget: dict[str, float] = {}
        budget = self.config.min_rank_corr
        for wanted in order:
            if self._done(model, len(removed)):
                break
            found = None if removed_nodes & set(wanted.nodes) else self._find(model, wanted.name)
            if found is None:
                if not reports:
                    raise UnsupportedModelError(
                        f"distill: {wanted.name} is no longer removable once {', '.join(removed)} are removed"
                    )
                continue
            # With a budget the removal is tried on a copy (tensors are shared, not copied) and kept
            # only if the refit model still ranks like the teacher.
            trial = model.clone() if budget else model
            layer = self._find(trial, wanted.name) if budget else found
            assert layer is not None
            if self.config.target_params and layer_params(layer) <= 0:
                continue
            removal = remove(trial, layer)
            refit_now = refit_gap(trial, removal, teacher, self.config.ridge) if self.config.refit else []
            if budget:
                if self.config.refit_head:
                    refit_heads(trial, teacher_logits, fitting, self.config.ridge)
                spearman_now = _fidelity(teacher_logits, trial, fitting)["spearman"]
                if spearman_now < budget:
                    over_budget[wanted.name] = round(spearman_now, 5)
                    continue
                replace_contents(model, trial)
            if plain is not None:
                remove(plain, self._find(plain, wanted.name))  # type: ignore[arg-type]
            logger.info(
                "distill: removed %s (%s), refit %s", wanted.name, wanted.kind, ", ".join(refit_now) or "nothing"
            )
            refit += refit_now
            removed.append(wanted.name)
            removed_nodes |= set(wanted.nodes)
        if self.config.target_params and model_params(model) > self.config.target_params:
            raise UsageError(
                f"distill.target_params={self.config.target_params} cannot be reached: removing "
                f"{', '.join(removed) or 'the removable layers'} leaves {model_params(model)} parameters; raise it"
            )
        if not removed:
            reason = (
                f"every removal leaves a Spearman below distill.min_rank_corr={budget}"
                if over_budget
                else "no removable layer saves parameters"
            )
            stats_skipped: dict[str, Any] = {"skipped": reason}
            if over_budget:
                stats_skipped["over_budget"] = over_budget
            return CompressionResult(model, modified=False, stats=stats_skipped)
        spearman: dict[str, float] = {}
        mae: dict[str, float] = {}
        stages = [("removed", plain)] if plain is not None else []
        stages.append(("refit" if self.config.refit else "removed", model))
        for stage, candidate in stages:
            figures = _fidelity(teacher_logits, candidate, fitting)  # type: ignore[arg-type]
            spearman[stage], mae[stage] = figures["spearman"], figures["logit_mae"]
        heads = refit_heads(model, teacher_logits, fitting, self.config.ridge) if self.config.refit_head else []
        if heads:
            figures = _fidelity(teacher_logits, model, fitting)
            spearman["head_refit"], mae["head_refit"] = figures["spearman"], figures["logit_mae"]
        stats: dict[str, Any] = {
            "removed": removed,
            "params_before": params_before,
            "params_after": model_params(model),
            "flops_before": flops_before,
            "flops_after": _flops(model, fitting),
            "refit": refit,
            "head_refit": heads,
            "spearman": spearman,
            "logit_mae": mae,
            "calibration": fitting.source,
        }
        if reports:
            stats["importance"] = {name: round(self._rank(reports[name]), 5) for name in removed}
        if over_budget:
            stats["over_budget"] = over_budget
        return CompressionResult(model, modified=True, stats=stats)

    @staticmethod
    def _find(model: ir.Model, name: str) -> Layer | None:
        return next((layer for layer in discover(model) if layer.name == name), None)

    # --- student ---------------------------------------------------------------------------------

    def _adopt_student(self, model: ir.Model, path: Path) -> CompressionResult:
        student = io.load(path)
        _check_interface(model, student, path)
        stripped = _strip(student, [value.name for value in model.graph.outputs])  # type: ignore[misc]
        fitting = fitting_rows(model, self.context.calibration, self.config.augment)
        teacher = Activations(model, fitting.calibration)
        teacher_logits = teacher(*[value.name for value in score_logits(model)])  # type: ignore[arg-type]
        before = _fidelity(teacher_logits, student, fitting)
        spearman, mae = {"student": before["spearman"]}, {"student": before["logit_mae"]}
        heads = refit_heads(student, teacher_logits, fitting, self.config.ridge) if self.config.refit_head else []
        if heads:
            after = _fidelity(teacher_logits, student, fitting)
            spearman["head_refit"], mae["head_refit"] = after["spearman"], after["logit_mae"]
        stats: dict[str, Any] = {
            "student": str(path),
            **stripped,
            "params_before": model_params(model),
            "params_after": model_params(student),
            "flops_before": _flops(model, fitting),
            "flops_after": _flops(student, fitting),
            "head_refit": heads,
            "spearman": spearman,
            "logit_mae": mae,
            "calibration": fitting.source,
        }
        replace_contents(model, student)
        return CompressionResult(model, modified=True, stats=stats)
