"""Adapter selection by ``config.model_type``. Every module of this package that defines a tuple
``ADAPTERS`` is found on import and its adapters registered (no hand-kept list)."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from torch import nn

from ..errors import CompressError
from .base import ModelAdapter, find_layers_path


def _discover() -> tuple[ModelAdapter, ...]:
    found: list[ModelAdapter] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name != "base":
            found += getattr(importlib.import_module(f"{__name__}.{info.name}"), "ADAPTERS", ())
    names = [a.name for a in found]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise KeyError(f"adapter names registered twice: {dup}")
    return tuple(found)


#: adapters with a declared layout, by family
ADAPTERS: tuple[ModelAdapter, ...] = _discover()
GENERIC = ModelAdapter(name="generic")


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``: a declared one by ``config.model_type``, else the generic fallback
    (every ``nn.Linear`` inside the decoder layers). Raises when no decoder layers can be found."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    path = find_layers_path(model)
    if path is None:
        raise CompressError(
            f"unsupported architecture '{model_type}': no list of decoder layers with linear layers found; "
            f"supported model types: {', '.join(supported_model_types())} (plus any decoder whose layers "
            "are an nn.ModuleList of nn.Linear blocks)"
        )
    return dataclasses.replace(GENERIC, layers_path=path)


__all__ = ["ADAPTERS", "GENERIC", "ModelAdapter", "get_adapter", "supported_model_types"]
