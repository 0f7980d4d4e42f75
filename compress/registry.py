"""The one registry of passes.

Passes register themselves with :func:`register_pass`; the modules holding them are listed in
``_PASS_MODULES`` and imported lazily, so ``import compress`` stays light.
"""

from __future__ import annotations

import difflib
import importlib
import re
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .passes.base import Pass

_PASSES: dict[str, type["Pass"]] = {}
_PASS_MODULES = ("compress.passes.lowrank", "compress.passes.quant", "compress.passes.sparse", "compress.passes.compensate", "compress.passes.slicegpt")
_NAME_RE = re.compile(r"^[a-z][a-z0-9-]*[a-z0-9]$")


def register_pass(cls: type["Pass"]) -> type["Pass"]:
    """Class decorator: register a pass under ``cls.name`` (lowercase, unique, no trailing '-')."""
    name = cls.name
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid pass name {name!r}: lowercase letters, digits and '-' only")
    if name in _PASSES and _PASSES[name] is not cls:
        raise KeyError(f"pass {name!r} is already registered")
    cls.config_cls.pass_name = name
    _PASSES[name] = cls
    return cls


def _load_all() -> None:
    for mod in _PASS_MODULES:
        importlib.import_module(mod)


def all_passes() -> dict[str, type["Pass"]]:
    """Every registered pass, by name."""
    _load_all()
    return dict(sorted(_PASSES.items()))


def get_pass(name: str) -> type["Pass"]:
    """The pass class registered under ``name``; an unknown name lists the close matches."""
    passes = all_passes()
    if name not in passes:
        close = difflib.get_close_matches(name, passes, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown pass '{name}'; {hint}available: {', '.join(passes)}")
    return passes[name]
