"""Whether the module types the passes produce can flow through the recipe: a pass meeting a module
type it does not accept is refused in one line naming the pair, before anything is loaded."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..passes.base import LINEAR, Pass, accepts_kind, matches


def _pattern(p: Pass[Any]) -> str:
    return str(p.config.targets).strip()


def _applies(p: Pass[Any], name: str, exact: bool) -> bool:
    """Whether the pass touches linear ``name``; without the model's names (``exact`` false) ``name``
    is a targets pattern standing for the linears it selects, touched by the passes with that
    pattern and by the untargeted ones."""
    if not exact:
        return _pattern(p) in ("*", name)
    return matches(name, _pattern(p))


def _order_error(passes: list[Pass[Any]], names: list[str] | None, explain: bool = True) -> str | None:
    """Why the module types the passes produce cannot flow through the recipe on some linear, or None."""
    exact = names is not None
    candidates = names if names is not None else ["*"] + sorted({_pattern(p) for p in passes} - {"*"})
    for name in candidates:
        kinds: frozenset[str] = frozenset({LINEAR})
        producer: dict[str, Pass[Any]] = {}
        for p in passes:
            if not _applies(p, name, exact):
                continue
            bad = sorted(k for k in kinds if not accepts_kind(p.accepts, k))
            if bad:
                if not explain:
                    return "refused"
                return _explain(p, producer[bad[0]], bad[0], name if exact else None, names)
            kinds = p.produces(kinds)
            for k in kinds:
                producer[k] = p
    return None


def _explain(p: Pass[Any], earlier: Pass[Any], kind: str, name: str | None, names: list[str] | None) -> str:
    where = f" on '{name}'" if name is not None else ""
    reversed_ok = _order_error([p, earlier], names and [name] if name is not None else None, explain=False) is None
    if reversed_ok and not earlier.consumes_previous:
        return f"{p.name} must come before {earlier.name}{where}: {p.accepts_reason}, and {earlier.name} makes them {kind}"
    return (f"{p.name} cannot follow {earlier.name}{where}: {earlier.name} makes the linears {kind} and {p.name} "
            f"cannot take them ({p.accepts_reason}); drop one, or narrow one with targets=...")


def check_order(passes: list[Pass[Any]], names: list[str] | None = None) -> None:
    """Refuse a recipe whose pass order cannot work, with one line naming the pair: a pass that works
    on an earlier pass's result (eora) first, or a pass meeting a module type it does not accept.
    ``names`` (layer-relative linear names, known once the model is opened) makes the check exact for
    passes narrowed with ``targets=``; without them only passes on every linear are compared."""
    if passes and passes[0].consumes_previous:
        raise ConfigError(
            f"pass '{passes[0].name}' compensates or refines an earlier pass's result; put a compressing pass "
            f"before it (example: --pass gptq:bits=3,group=64 --pass {passes[0].name})"
        )
    why = _order_error(passes, names)
    if why is not None:
        raise ConfigError(why)
