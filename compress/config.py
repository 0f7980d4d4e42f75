"""Typed, validated option sets: pass configurations, the calibration settings and the evaluation spec.

An option set is a dataclass deriving from :class:`Options`. Each field carries its help text and
its allowed range in ``metadata`` (``help``, ``min``, ``max``, ``min_open``, ``max_open``,
``choices``; ``flag`` for the command-line flag that sets it). An option set validates itself when it
is constructed (``__post_init__``): ``GPTQConfig(bits=5)`` raises :class:`ConfigError` just as the
shorthand ``gptq:bits=5`` does. :meth:`Options.from_dict` rejects unknown keys and converts strings
(from the CLI or YAML) to the field's type first; an error names the option as the caller spells it
(``where``: a pass option, a CLI flag, a recipe key). The same metadata feeds ``compress ls passes``
and the flags of the CLI (:mod:`compress.cli.options`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Callable, ClassVar, TypeVar

from .errors import ConfigError

OptionsT = TypeVar("OptionsT", bound="Options")

#: how an error names an option: field name → text such as "--calib-samples" or "pass 'gptq' option 'bits'"
Where = Callable[[str], str]


def option(default: Any, help: str, **checks: Any) -> Any:
    """A field with its help text and checks (``min``, ``max``, ``min_open``, ``max_open``, ``choices``, ``flag``)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata={"help": help, **checks})


class OptionError(ConfigError):
    """An invalid value of one option; ``template`` holds ``{where}`` where the option's name goes."""

    def __init__(self, field: str, template: str, where: str) -> None:
        self.field = field
        self.template = template
        super().__init__(template.replace("{where}", where))

    def named(self, where: str) -> ConfigError:
        return ConfigError(self.template.replace("{where}", where))


def _union_args(typ: Any) -> list[Any] | None:
    origin = typing.get_origin(typ)
    if origin is typing.Union or origin is types.UnionType:
        return [a for a in typing.get_args(typ) if a is not type(None)]
    return None


def _convert(value: Any, typ: Any, field: str) -> Any:
    """``value`` (text from the CLI or YAML, or already typed) as a value of type ``typ``."""
    args = _union_args(typ)
    if args is not None:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(value, args[0], field)
    if typing.get_origin(typ) is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(str(v).strip() for v in items if str(v).strip())
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise OptionError(field, f"{{where}}: expected true/false, got {value!r}", field)
    if typ is int:
        if isinstance(value, bool):
            raise OptionError(field, f"{{where}}: expected an integer, got {value!r}", field)
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise OptionError(field, f"{{where}}: expected an integer, got {value!r}", field) from None
        if not math.isfinite(f) or f != int(f):
            raise OptionError(field, f"{{where}}: expected an integer, got {value!r}", field)
        return int(str(value).strip()) if isinstance(value, str) and str(value).strip().lstrip("+-").isdigit() else int(f)
    if typ is float:
        if isinstance(value, bool):
            raise OptionError(field, f"{{where}}: expected a number, got {value!r}", field)
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise OptionError(field, f"{{where}}: expected a number, got {value!r}", field) from None
        if not math.isfinite(f):
            raise OptionError(field, f"{{where}}: expected a finite number, got {value!r}", field)
        return f
    if typ is str:
        return str(value)
    return value


def _check_type(value: Any, typ: Any, field: str) -> Any:
    """A value set from Python must already have the field's type (an int is taken for a float)."""
    args = _union_args(typ)
    if args is not None:
        if value is None:
            return None
        typ = args[0]
    if typing.get_origin(typ) is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise OptionError(field, f"{{where}}: expected a list of names, got {value!r}", field)
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in names and (not isinstance(value, typ) or (typ is int and isinstance(value, bool))):
        raise OptionError(field, f"{{where}}: expected {names[typ]}, got {value!r}", field)
    if typ is float and not math.isfinite(value):
        raise OptionError(field, f"{{where}}: expected a finite number, got {value!r}", field)
    return value


def range_text(md: typing.Mapping[str, Any]) -> str:
    lo, hi = md.get("min"), md.get("max")
    left = ("(" if md.get("min_open") else "[") + ("-inf" if lo is None else str(lo))
    right = ("inf" if hi is None else str(hi)) + (")" if md.get("max_open") else "]")
    return f"{left}, {right}"


class Options:
    """Base of every option set (subclasses are dataclasses)."""

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def fields(cls) -> list[dataclasses.Field[Any]]:
        return list(dataclasses.fields(cls))  # type: ignore[arg-type]

    @classmethod
    def where(cls, field: str) -> str:
        """How an error names ``field`` by default (its flag when it has one)."""
        md: typing.Mapping[str, Any] = next((f.metadata for f in cls.fields() if f.name == field), {})
        return str(md.get("flag") or field)

    @classmethod
    def from_dict(cls: type[OptionsT], values: typing.Mapping[str, Any], where: Where | None = None, what: str = "") -> OptionsT:
        """Build and validate; unknown keys and out-of-range values raise :class:`ConfigError`, naming
        each option with ``where`` (default :meth:`where`). ``what`` prefixes the unknown-key error."""
        name = where or cls.where
        known = {f.name: f for f in cls.fields()}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(cls.unknown_message(unknown, what))
        hints = typing.get_type_hints(cls)
        try:
            kwargs = {k: _convert(v, hints[k], k) for k, v in values.items()}
            return cls(**kwargs)
        except OptionError as e:
            raise e.named(name(e.field)) from None

    @classmethod
    def unknown_message(cls, unknown: list[str], what: str) -> str:
        return f"{what or 'unknown option(s)'}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(f.name for f in cls.fields())}"

    def validate(self) -> None:
        """Check every field's type and range against its metadata; subclasses add cross-field checks."""
        hints = typing.get_type_hints(type(self))
        for f in self.fields():
            where = self.where(f.name)
            try:
                v = _check_type(getattr(self, f.name), hints[f.name], f.name)
            except OptionError as e:
                raise OptionError(f.name, e.template, where) from None
            setattr(self, f.name, v)
            if v is None:
                continue
            md = f.metadata
            if "choices" in md and v not in md["choices"]:
                raise OptionError(f.name, f"{{where}} must be one of {', '.join(map(str, md['choices']))}, got {v!r}", where)
            lo, hi = md.get("min"), md.get("max")
            low = lo is not None and (v <= lo if md.get("min_open") else v < lo)
            high = hi is not None and (v >= hi if md.get("max_open") else v > hi)
            if low or high:
                raise OptionError(f.name, f"{{where}} must be in {range_text(md)}, got {v}", where)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.fields()}


class PassConfig(Options):
    """Base of every pass configuration: one dataclass per pass, registered with its pass."""

    pass_name: ClassVar[str] = ""
    #: the linears of each decoder layer the pass selects: glob(s) on layer-relative names, '|'-separated;
    #: a pass that can narrow its targets declares it as a field (:func:`targets_option`)
    targets: str = "*"

    def __post_init__(self) -> None:
        try:
            self.validate()
        except OptionError:
            raise
        except ConfigError as e:
            # every message names the pass it is about (a helper shared by several passes may not)
            if self.pass_name and f"pass '{self.pass_name}'" not in str(e) and not str(e).startswith(self.pass_name):
                raise ConfigError(f"pass '{self.pass_name}': {e}") from None
            raise

    @classmethod
    def where(cls, field: str) -> str:
        return f"pass '{cls.pass_name}' option '{field}'"

    @classmethod
    def unknown_message(cls, unknown: list[str], what: str) -> str:
        return f"pass '{cls.pass_name}': unknown option(s) {', '.join(unknown)}; valid options: {', '.join(f.name for f in cls.fields()) or '(none)'}"


def targets_option(verb: str = "compress") -> Any:
    """The ``targets=`` field of a pass that can narrow the linears it works on."""
    return option("*", f"which linears of each decoder layer to {verb}: glob(s) on names like 'mlp.down_proj', '|'-separated")


def propagate_option(default: str = "compressed") -> Any:
    """The ``propagate=`` field of a per-linear pass with calibration statistics (see ``check_propagate``)."""
    return option(default, "the next layer's calibration inputs: this layer's outputs after the pass ('compressed': one more "
                  "forward per layer; later layers see earlier errors) or before it ('dense': from the statistics forward, "
                  "one forward per layer)", choices=("compressed", "dense"))


def check_propagate(cfg: Any) -> None:
    """propagate=dense takes the outputs of the one statistics forward, which sequential=true replaces."""
    if cfg.propagate == "dense" and getattr(cfg, "sequential", False):
        raise ConfigError(f"pass '{cfg.pass_name}': propagate=dense takes the layer's outputs from its one statistics forward; "
                          "it needs sequential=false")


def describe_field(f: dataclasses.Field[Any]) -> str:
    """One-line description of a field for listings: type, default, range, help."""
    md = f.metadata
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    parts = [f"{typ} = {f.default!r}"]
    if "choices" in md:
        parts.append("one of " + "|".join(map(str, md["choices"])))
    elif "min" in md or "max" in md:
        parts.append("in " + range_text(md))
    return f"{'; '.join(parts)}. {md.get('help', '')}"
