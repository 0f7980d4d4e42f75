"""Compression passes, one per file. Importing this package imports every module in it, and each
registers its passes with :func:`compress.registry.register_pass` (no hand-kept list)."""

from __future__ import annotations

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")
