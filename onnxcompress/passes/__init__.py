"""The pass registry: one flat dict filled by an explicit decorator."""

from __future__ import annotations

from collections.abc import Callable

from onnxcompress.passes.base import CompressionPass, CompressionResult, PassContext

__all__ = ["PASSES", "CompressionPass", "CompressionResult", "PassContext", "register"]

PASSES: dict[str, type[CompressionPass]] = {}


def register(name: str) -> Callable[[type[CompressionPass]], type[CompressionPass]]:
    """Register a pass class under ``name``; a duplicate name is an error."""

    def decorate(cls: type[CompressionPass]) -> type[CompressionPass]:
        if name in PASSES:
            raise ValueError(f"pass {name!r} is already registered by {PASSES[name].__qualname__}")
        if not cls.__doc__:
            raise ValueError(f"pass {name!r} needs a docstring: it is the pass's help text")
        cls.name = name
        PASSES[name] = cls
        return cls

    return decorate


# Built-in passes register themselves on import.
from onnxcompress.passes import (  # noqa: E402
    cleanup,  # noqa: F401
    distill,  # noqa: F401
    prune,  # noqa: F401
    quantize,  # noqa: F401
    sparse,  # noqa: F401
)
