from __future__ import annotations

import re
from pathlib import Path

import pytest

from onnxcompress.errors import UsageError
from onnxcompress.recipe import build_specs, parse_assignment, read_recipe


def test_set_values_are_coerced_to_the_config_types() -> None:
    (spec,) = build_specs(["cleanup"], assignments=["cleanup.strip_metadata=yes", "cleanup.remove_dropout=0"])
    assert spec.config.strip_metadata is True
    assert spec.config.remove_dropout is False
    assert spec.options() == {
        "remove_dropout": False,
        "merge_initializers": True,
        "strip_metadata": True,
        "fold_affine": True,
        "remove_dead_units": True,
        "unfuse_contrib": True,
        "initializer_inputs": True,
        "vectorize_bags": True,
        "simplify_labels": True,
        "complementary_sigmoids": True,
        "static_shapes": True,
        "concat_stacks": True,
        "select_columns": True,
        "dots_fields_major": False,
        "drop_expands": True,
        "select_early": True,
        "gemm_rows": False,
        "merge_transposes": True,
        "head_transposes": True,
        "fold_sums": False,
        "sums_as_matmul": True,
        "fuse_parallel": True,
        "common_subexpressions": True,
        "short_names": False,
        "drop_default_attributes": False,
        "lift_constants": False,
        "narrow_indices": False,
        "compact_masks": False,
        "pack_casts": False,
    }


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("cleanup.bogus=1", "unknown option cleanup.bogus; cleanup has: remove_dropout, merge_initializers"),
        ("cleanup.strip_metadata=maybe", "cleanup.strip_metadata: expected true or false, got 'maybe'"),
        ("nopass.x=1", "unknown pass 'nopass'; choose from: cleanup"),
        ("cleanup=1", "expected PASS.FIELD=VALUE"),
    ],
)
def test_bad_assignments_name_what_is_valid(assignment: str, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_specs(["cleanup"], assignments=[assignment])


def test_unknown_pass_lists_the_registry() -> None:
    with pytest.raises(UsageError, match="unknown pass 'quantise'; choose from: cleanup"):
        build_specs(["cleanup", "quantise"])


def test_options_for_a_pass_not_requested_are_refused(perturb_pass: type) -> None:
    with pytest.raises(UsageError, match="options were given for pass 'perturb', which is not in --passes cleanup"):
        build_specs(["cleanup"], assignments=["perturb.noise=1"])
    (spec,) = build_specs(["perturb"], assignments=["perturb.noise=0.5"])
    assert spec.config.noise == 0.5


def test_recipe_tables_and_set_override(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('passes = ["cleanup"]\n[cleanup]\nstrip_metadata = true\nremove_dropout = false\n')
    passes, options = read_recipe(recipe)
    assert passes == ["cleanup"]
    (spec,) = build_specs(passes, options, ["cleanup.remove_dropout=true"])
    assert spec.config.strip_metadata is True
    assert spec.config.remove_dropout is True


def test_recipe_type_errors_and_bad_toml(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("[cleanup]\nstrip_metadata = 3\n")
    _, options = read_recipe(recipe)
    with pytest.raises(UsageError, match="expected true or false, got 3"):
        build_specs(["cleanup"], options)
    recipe.write_text("[cleanup\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        read_recipe(recipe)


def test_parse_assignment_splits_on_first_equals() -> None:
    assert parse_assignment("prune.include=a=b") == ("prune", "include", "a=b")


def test_a_recipe_path_that_is_a_folder_is_a_usage_error(tmp_path: Path) -> None:
    """IsADirectoryError once escaped read_recipe and the CLI reported an internal error (exit 4)."""
    with pytest.raises(UsageError, match=re.escape(f"--config {tmp_path}: is a directory; give the path of a TOML")):
        read_recipe(tmp_path)
