"""Small helpers shared by the composition roots."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["import_string"]


def import_string(spec: str) -> Any:
    """Import `module:attribute`, with an error that names what is missing."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ImportError(f"expected 'module:attribute', got {spec!r}")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attribute)
    except AttributeError as exc:
        raise ImportError(f"module {module_name!r} has no attribute {attribute!r}") from exc
