"""The one registry of passes: by name and by config type.

Passes register themselves with :func:`register_pass` in their own files; importing
:mod:`compress.passes` imports every one of them, and the registry does that lazily, so
``import compress`` stays light. Each pass has its own config class, so a config instance names its
pass: ``compress(model, [GPTQConfig(bits=3)])`` and ``compress(model, ["gptq:bits=3"])`` are the same
call.
"""

from __future__ import annotations

import difflib
import importlib
import re
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import PassConfig
    from .passes.base import Pass

P = TypeVar("P", bound=type["Pass[Any]"])

_PASSES: dict[str, type["Pass[Any]"]] = {}
_BY_CONFIG: dict[type["PassConfig"], type["Pass[Any]"]] = {}
_NAME_RE = re.compile(r"^[a-z][a-z0-9-]*[a-z0-9]$")


def register_pass(cls: P) -> P:
    """Class decorator: register a pass under ``cls.name`` (lowercase, unique, no trailing '-')
    and its config class (one config class per pass, the pass's generic parameter)."""
    name = cls.name
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid pass name {name!r}: lowercase letters, digits and '-' only")
    if name in _PASSES and _PASSES[name] is not cls:
        raise KeyError(f"pass {name!r} is already registered")
    config_cls = cls.__dict__.get("config_cls") or getattr(cls, "config_cls", None)
    if config_cls is None:
        raise TypeError(f"pass {name!r} names no config type: derive it from LinearPass[Config], LayerPass[Config] or ModelPass[Config]")
    owner = _BY_CONFIG.get(config_cls)
    if owner is not None and owner is not cls:
        raise KeyError(f"config class {config_cls.__name__} already belongs to pass {owner.name!r}; give {name!r} its own")
    config_cls.pass_name = name
    _PASSES[name] = cls
    _BY_CONFIG[config_cls] = cls
    return cls


def _load_all() -> None:
    importlib.import_module("compress.passes")


def all_passes() -> dict[str, type["Pass[Any]"]]:
    """Every registered pass, by name."""
    _load_all()
    return dict(sorted(_PASSES.items()))


def get_pass(name: str) -> type["Pass[Any]"]:
    """The pass class registered under ``name``; an unknown name lists the close matches."""
    passes = all_passes()
    if name not in passes:
        close = difflib.get_close_matches(name, passes, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown pass '{name}'; {hint}available: {', '.join(passes)}")
    return passes[name]


def pass_for_config(config: "PassConfig") -> type["Pass[Any]"]:
    """The pass whose config class is exactly ``type(config)``."""
    _load_all()
    cls = _BY_CONFIG.get(type(config))
    if cls is None:
        raise ConfigError(f"{type(config).__name__} is not the config of a registered pass; see 'compress ls passes'")
    return cls
