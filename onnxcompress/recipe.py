"""Which passes run, in which order, with which options: from ``--passes``, ``--set`` and TOML recipes.

Values are validated and coerced against each pass's ``Config`` dataclass, so a typo fails before
any model is loaded, with a message that lists what is valid.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from onnxcompress.errors import UsageError
from onnxcompress.passes import PASSES
from onnxcompress.passes.base import CompressionPass, config_fields

__all__ = ["PassSpec", "build_specs", "coerce", "describe_field", "parse_assignment", "read_recipe"]

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class PassSpec:
    """One pass to run, with its validated configuration.

    ``name`` may carry a label, ``cleanup@final``, so that one pass can run twice in a recipe with
    different options (``[cleanup]`` and ``[cleanup@final]`` tables).
    """

    name: str
    config: Any

    @property
    def pass_name(self) -> str:
        return self.name.partition("@")[0]

    @property
    def pass_class(self) -> type[CompressionPass]:
        return PASSES[self.pass_name]

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)


def _choices(field: dataclasses.Field[Any]) -> tuple[Any, ...] | None:
    if "choices" in field.metadata:
        return tuple(field.metadata["choices"])
    if typing.get_origin(field.type) is typing.Literal:
        return typing.get_args(field.type)
    return None


def describe_field(field: dataclasses.Field[Any]) -> str:
    """A short type description for help text: ``float``, ``{layer,global}``, ``list of str``."""
    choices = _choices(field)
    if choices is not None:
        return "{" + ",".join(str(choice) for choice in choices) + "}"
    return _type_name(field.type)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if annotation is type(None):
        return "none"
    return getattr(annotation, "__name__", str(annotation))


def _coerce_to(annotation: Any, value: Any, what: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        arguments = typing.get_args(annotation)
        is_none = value is None or (isinstance(value, str) and value.lower() in {"none", "null", ""})
        if is_none and type(None) in arguments:
            return None
        errors = []
        for argument in arguments:
            if argument is type(None):
                continue
            try:
                return _coerce_to(argument, value, what)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if errors else f"{what}: cannot be {value!r}")
    if origin is typing.Literal:
        return value
    if origin is tuple:
        (item_type, *_) = typing.get_args(annotation)
        items = [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ValueError(f"{what}: expected a comma-separated list, got {value!r}")
        return tuple(_coerce_to(item_type, item, what) for item in items)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"{what}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError(f"{what}: expected a whole number, got {value!r}")
        try:
            return int(value) if isinstance(value, int) else int(str(value), 0)
        except ValueError:
            raise ValueError(f"{what}: expected a whole number, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError(f"{what}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: expected a number, got {value!r}") from None
        if number != number:  # NaN compares false with every bound: it would pass any range check
            raise ValueError(f"{what}: expected a number, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{what}: expected text, got {value!r}")
        return value
    raise ValueError(f"{what}: unsupported option type {annotation!r}")


def coerce(field: dataclasses.Field[Any], value: Any, what: str) -> Any:
    """Convert a command-line string or TOML value to the field's type and check its constraints."""
    result = _coerce_to(field.type, value, what)
    choices = _choices(field)
    if choices is not None and result not in choices:
        raise ValueError(f"{what}: must be one of {', '.join(map(str, choices))}; got {value!r}")
    item_choices = field.metadata.get("item_choices")
    if item_choices is not None and (not result or any(item not in item_choices for item in result)):
        raise ValueError(f"{what}: each must be one of {', '.join(map(str, item_choices))}; got {value!r}")
    low, high = field.metadata.get("min"), field.metadata.get("max")
    if isinstance(result, int | float) and not isinstance(result, bool):
        if low is not None and result < low:
            raise ValueError(f"{what}: must be at least {low}; got {result}")
        if high is not None and result > high:
            raise ValueError(f"{what}: must be at most {high}; got {result}")
    return result


def _pass_class(name: str) -> type[CompressionPass]:
    base, _, label = name.partition("@")
    if base not in PASSES:
        raise UsageError(f"unknown pass {base!r}; choose from: {', '.join(sorted(PASSES))}")
    if "@" in name and not label:
        raise UsageError(f"pass {name!r}: give a label after @, e.g. {base}@final")
    return PASSES[base]


def parse_assignment(text: str) -> tuple[str, str, str]:
    """Split ``PASS.FIELD=VALUE`` (PASS may be labelled: ``cleanup@final.short_names=true``)."""
    key, sep, value = text.partition("=")
    name, dot, field = key.strip().rpartition(".")
    if not sep or not dot or not name or not field:
        raise UsageError(f"--set {text!r}: expected PASS.FIELD=VALUE, for example prune.sparsity=0.8")
    return name, field.strip(), value.strip()


def read_recipe(path: Path) -> tuple[list[str] | None, dict[str, dict[str, Any]]]:
    """Read a TOML recipe: an optional top-level ``passes = [...]`` and one table per pass."""
    if path.exists() and not path.is_file() and not path.is_dir():
        # A pipe would block the read until something writes it.
        raise UsageError(f"--config {path}: is not a regular file; give the path of a TOML recipe file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--config {path}: is a directory; give the path of a TOML recipe file") from None
    except OSError as error:
        raise UsageError(f"--config {path}: cannot be read ({error.strerror or error}); give a readable file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"--config {path}: not valid TOML ({error}); fix the file") from None
    passes = data.pop("passes", None)
    if passes is not None and not (isinstance(passes, list) and all(isinstance(p, str) for p in passes)):
        raise UsageError(f"--config {path}: 'passes' must be a list of pass names")
    tables: dict[str, dict[str, Any]] = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise UsageError(f"--config {path}: {name!r} must be a table ([{name}]) of options")
        tables[name] = table
    return passes, tables


def build_specs(
    pass_names: Sequence[str],
    options: Mapping[str, Mapping[str, Any]] | None = None,
    assignments: Iterable[str] = (),
) -> list[PassSpec]:
    """Validate pass names and options; ``assignments`` (``--set``) override ``options`` (recipes)."""
    if not pass_names:
        raise UsageError(f"no passes given; use --passes with some of: {', '.join(sorted(PASSES))}")
    merged: dict[str, dict[str, Any]] = {name: dict(values) for name, values in (options or {}).items()}
    for text in assignments:
        name, field, value = parse_assignment(text)
        merged.setdefault(name, {})[field] = value
    for name in merged:
        _pass_class(name)
        if name not in pass_names:
            raise UsageError(
                f"options were given for pass {name!r}, which is not in --passes {','.join(pass_names)}; "
                f"add it to --passes or drop the options"
            )
    specs = []
    for name in pass_names:
        cls = _pass_class(name)
        fields = {field.name: field for field in config_fields(cls.Config)}
        values: dict[str, Any] = {}
        for key, raw in merged.get(name, {}).items():
            if key not in fields:
                raise UsageError(f"unknown option {name}.{key}; {name} has: {', '.join(fields) or 'no options'}")
            try:
                values[key] = coerce(fields[key], raw, f"{name}.{key}")
            except ValueError as error:
                raise UsageError(str(error)) from None
        try:
            config = cls.Config(**values)
        except (TypeError, ValueError) as error:
            raise UsageError(f"{name}: {error}") from None
        specs.append(PassSpec(name, config))
    return specs
