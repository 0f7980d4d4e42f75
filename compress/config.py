"""Typed, validated pass configurations.

A pass configuration is a dataclass deriving from :class:`PassConfig`, one class per pass. Each
field carries its help text and its allowed range in ``metadata`` (``help``, ``min``, ``max``,
``min_open``, ``max_open``, ``choices``). A config validates itself when it is constructed
(``__post_init__``): ``GPTQConfig(bits=5)`` raises :class:`ConfigError` just as the shorthand
``gptq:bits=5`` does. :meth:`PassConfig.from_dict` rejects unknown keys and converts strings (from
the CLI shorthand or YAML) to the field's type first. The same metadata feeds ``compress ls passes``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar

from .errors import ConfigError


def option(default: Any, help: str, **checks: Any) -> Any:
    """A config field with its help text and checks (``min``, ``max``, ``min_open``, ``max_open``, ``choices``)."""
    return dataclasses.field(default=default, metadata={"help": help, **checks})


def _convert(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(value, args[0], where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if typ is str:
        return str(value)
    return value


class PassConfig:
    """Base of every pass configuration (subclasses are dataclasses)."""

    pass_name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        try:
            self.validate()
        except ConfigError as e:
            # every message names the pass it is about (a helper shared by several passes may not)
            if self.pass_name and f"pass '{self.pass_name}'" not in str(e) and not str(e).startswith(self.pass_name):
                raise ConfigError(f"pass '{self.pass_name}': {e}") from None
            raise

    @classmethod
    def fields(cls) -> list[dataclasses.Field[Any]]:
        return list(dataclasses.fields(cls))  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PassConfig":
        """Build and validate a config; unknown keys and out-of-range values raise :class:`ConfigError`."""
        known = {f.name: f for f in cls.fields()}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"pass '{cls.pass_name}': unknown option(s) {', '.join(unknown)}; "
                f"valid options: {', '.join(known) or '(none)'}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {k: _convert(v, hints[k], f"pass '{cls.pass_name}' option '{k}'") for k, v in values.items()}
        return cls(**kwargs)

    def validate(self) -> None:
        """Check every field's type and range against its metadata; subclasses add cross-field checks."""
        hints = typing.get_type_hints(type(self))
        for f in self.fields():
            where = f"pass '{self.pass_name}' option '{f.name}'"
            v = _check_type(getattr(self, f.name), hints[f.name], where)
            setattr(self, f.name, v)
            if v is None:
                continue
            md = f.metadata
            if "choices" in md and v not in md["choices"]:
                raise ConfigError(f"{where} must be one of {', '.join(map(str, md['choices']))}, got {v!r}")
            lo, hi = md.get("min"), md.get("max")
            if lo is not None and (v <= lo if md.get("min_open") else v < lo):
                rng = _range_text(md)
                raise ConfigError(f"{where} must be in {rng}, got {v}")
            if hi is not None and (v >= hi if md.get("max_open") else v > hi):
                rng = _range_text(md)
                raise ConfigError(f"{where} must be in {rng}, got {v}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.fields()}


def _check_type(value: Any, typ: Any, where: str) -> Any:
    """A value set from Python must already have the field's type (an int is taken for a float)."""
    origin = typing.get_origin(typ)
    if origin is typing.Union or origin is types.UnionType:
        if value is None:
            return None
        typ = [a for a in typing.get_args(typ) if a is not type(None)][0]
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in names and (not isinstance(value, typ) or (typ is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {names[typ]}, got {value!r}")
    return value


def _range_text(md: typing.Mapping[str, Any]) -> str:
    lo, hi = md.get("min"), md.get("max")
    left = ("(" if md.get("min_open") else "[") + ("-inf" if lo is None else str(lo))
    right = ("inf" if hi is None else str(hi)) + (")" if md.get("max_open") else "]")
    return f"{left}, {right}"


def describe_field(f: dataclasses.Field[Any]) -> str:
    """One-line description of a config field for listings: type, default, range, help."""
    md = f.metadata
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    parts = [f"{typ} = {f.default!r}"]
    if "choices" in md:
        parts.append("one of " + "|".join(map(str, md["choices"])))
    elif "min" in md or "max" in md:
        parts.append("in " + _range_text(md))
    return f"{'; '.join(parts)}. {md.get('help', '')}"
