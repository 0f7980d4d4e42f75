"""Compressed modules. Each one derives from :class:`~compress.modules.base.CompressedLinear`, which
registers it by class name: it can describe itself (``spec``), be rebuilt empty from that description
(``from_spec``) for checkpoint loading, and multiply itself out (``dense_weight``) for the dense
export. Importing this package imports every module in it (no hand-kept list), so the registry
``MODULE_TYPES`` is complete; ``compress.modules.QuantLinear`` and the like are looked up there."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from .base import MODULE_TYPES, CompressedLinear, is_compressed, storage_bits, weight_count

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def __getattr__(name: str) -> Any:
    if name in MODULE_TYPES:
        return MODULE_TYPES[name]
    raise AttributeError(f"module 'compress.modules' has no attribute {name!r}")


__all__ = ["MODULE_TYPES", "CompressedLinear", "is_compressed", "storage_bits", "weight_count", *sorted(MODULE_TYPES)]
