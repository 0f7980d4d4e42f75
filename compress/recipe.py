"""Recipes: an ordered list of passes, from YAML or the CLI shorthand ``name:key=val,key=val``.

YAML form (safe-loaded; unknown keys are errors)::

    passes:
      - pass: svd-llm
        ratio: 0.2
    calibration:          # optional; CLI flags override
      source: c4
      samples: 32
      seqlen: 512
      seed: 0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import PassConfig
from .errors import ConfigError
from .registry import get_pass

_TOP_KEYS = {"passes", "calibration"}


@dataclass
class PassSpec:
    """One step of a recipe: a registered pass name and its validated config."""

    name: str
    config: PassConfig

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.name, **self.config.to_dict()}


@dataclass
class Recipe:
    passes: list[PassSpec]
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"passes": [p.to_dict() for p in self.passes]}
        if self.calibration:
            out["calibration"] = dict(self.calibration)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def requires_calibration(self) -> bool:
        return any(get_pass(p.name)(p.config).requires_calibration for p in self.passes)


def check_order(passes: list[PassSpec]) -> None:
    """A pass that works on an earlier pass's result (e.g. eora) may not come first."""
    if passes:
        first = get_pass(passes[0].name)
        if first.consumes_previous:
            raise ConfigError(
                f"pass '{passes[0].name}' compensates or refines an earlier pass's result; put a compressing pass "
                f"before it (example: --pass gptq:bits=3,group=64 --pass {passes[0].name})"
            )


def make_pass(name: str, options: dict[str, Any]) -> PassSpec:
    cls = get_pass(name)
    return PassSpec(name, cls.config_cls.from_dict(options))


def parse_shorthand(text: str) -> PassSpec:
    """``svd-llm:ratio=0.2,targets=mlp.*`` → PassSpec."""
    name, _, rest = text.strip().partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"pass option '{item}' in '{text}' is not key=value (example: svd-llm:ratio=0.2)")
        options[key.strip()] = value.strip()
    return make_pass(name.strip(), options)


def recipe_from_dict(data: Any, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'passes' list at the top level")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_TOP_KEYS))}")
    steps = data.get("passes")
    if not isinstance(steps, list) or not steps:
        raise ConfigError(f"{where}: 'passes' must be a non-empty list of {{pass: NAME, option: value}} entries")
    passes = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or "pass" not in step:
            raise ConfigError(f"{where}: passes[{i}] must be a mapping with a 'pass' key (e.g. {{pass: svd, ratio: 0.2}})")
        opts = {k: v for k, v in step.items() if k != "pass"}
        passes.append(make_pass(str(step["pass"]), opts))
    calib = data.get("calibration") or {}
    if not isinstance(calib, dict):
        raise ConfigError(f"{where}: 'calibration' must be a mapping")
    check_order(passes)
    return Recipe(passes, dict(calib))


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe file '{p}' does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"recipe file '{p}' is not valid YAML{at}; fix the syntax") from None
    return recipe_from_dict(data, where=f"recipe '{p}'")


def as_recipe(recipe: "Recipe | list[PassSpec] | list[str] | str | dict[str, Any]") -> Recipe:
    """Accept a Recipe, a list of PassSpecs or shorthand strings, a YAML path, or a dict."""
    if isinstance(recipe, Recipe):
        check_order(recipe.passes)
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    if isinstance(recipe, str):
        if recipe.endswith((".yaml", ".yml")) or Path(recipe).is_file():
            return load_recipe(recipe)
        rec = Recipe([parse_shorthand(recipe)])
        check_order(rec.passes)
        return rec
    rec = Recipe([p if isinstance(p, PassSpec) else parse_shorthand(p) for p in recipe])
    check_order(rec.passes)
    return rec
