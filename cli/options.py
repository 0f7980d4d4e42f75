"""Command-line flags generated from the option sets' field metadata (:mod:`compress.config`), so a
flag, its help and the name an error uses for it come from one place.

``@with_options("calib", CalibConfig)`` adds one flag per field (``metadata["flag"]``, or the key the
command names, e.g. ``run_flag``) to a typer command, each defaulting to "not given"; the command
receives the given values as one mapping in its parameter ``calib``, to be validated by the library
with the same flag names in its errors."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from typing import Any, Callable, Optional, Sequence

import typer

from ..config import Options


def _cli_type(repeat: bool) -> Any:
    """Flags take text (the option set converts and checks it, so a bad value gets the library's one-line
    error naming the flag); a repeatable flag takes a list."""
    return Optional[list[str]] if repeat else Optional[str]


def _metavar(typ: Any) -> str:
    """How help shows a flag's value: the field's own type, though the flag takes text."""
    inner = typ
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        inner = next(a for a in typing.get_args(typ) if a is not type(None))
    if typing.get_origin(inner) is tuple:
        return "<names>"
    return f"<{getattr(inner, '__name__', 'str')}>"


def with_options(group: str, cls: type[Options], *, flag_key: str = "flag", only: Sequence[str] | None = None,
                 skip: Sequence[str] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add a flag per field of ``cls`` to a typer command; the command's parameter ``group`` receives
    ``{field: value}`` of the flags given."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in cls.fields() if (only is None or f.name in only) and f.name not in skip]

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)
        fn_hints = typing.get_type_hints(fn)
        params = [p for p in sig.parameters.values() if p.name != group]
        annotations = {k: v for k, v in fn_hints.items() if k != group}
        for f in fields:
            md = f.metadata
            flag = md.get(flag_key) or md["flag"]
            default = "none" if f.default is None else ",".join(f.default) if isinstance(f.default, tuple) else f.default
            name = f"{group}__{f.name}"
            typ = _cli_type(md.get("cli") == "repeat")
            help_text = f"{md.get('help', '')} [{default}]" if default not in ("", "none") else md.get("help", "")
            option = typer.Option(None, flag, help=help_text, metavar=_metavar(hints[f.name]))
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=typ))
            annotations[name] = typ

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            given = {}
            for f in fields:
                v = kwargs.pop(f"{group}__{f.name}", None)
                if v is not None and v != []:
                    given[f.name] = ",".join(v) if isinstance(v, list) else v
            kwargs[group] = given
            return fn(*args, **kwargs)

        ordered = [p for p in params if p.kind != inspect.Parameter.KEYWORD_ONLY] + [p for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY]
        wrapper.__signature__ = sig.replace(parameters=ordered)  # type: ignore[attr-defined]
        wrapper.__annotations__ = annotations
        return wrapper

    return deco
