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
from typing import TYPE_CHECKING, Any

import yaml

from .config import PassConfig
from .errors import ConfigError
from .readers import read_text
from .registry import get_pass, pass_for_config

if TYPE_CHECKING:
    from .passes.base import Pass

_TOP_KEYS = {"passes", "calibration"}


@dataclass
class PassSpec:
    """One step of a recipe: a registered pass name and its validated config."""

    name: str
    config: PassConfig

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.name, **self.config.to_dict()}

    def build(self) -> "Pass[Any]":
        """The pass object of this step (the planner builds each once per run)."""
        return get_pass(self.name)(self.config)


@dataclass
class Recipe:
    """The passes of a run, in order, and the calibration settings the recipe file gives. A recipe is
    plain data: the planner (:func:`compress.planning.plan`) builds its passes and checks it, once per run."""

    passes: list[PassSpec]
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"passes": [p.to_dict() for p in self.passes]}
        if self.calibration:
            out["calibration"] = dict(self.calibration)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


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
        if key.strip() in options:
            raise ConfigError(f"pass option '{key.strip()}' is given twice in '{text}'; keep one")
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
    return Recipe(passes, dict(calib))


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    if p.is_dir():
        found = sorted(x.name for x in p.glob("*.y*ml"))[:3]
        hint = f"give the file, e.g. --recipe {p / found[0]}" if found else "give the path of a recipe YAML file"
        raise ConfigError(f"recipe '{p}' is a directory, not a file; {hint}")
    if not p.is_file():
        raise ConfigError(f"recipe file '{p}' does not exist; check the path")
    try:
        data = yaml.safe_load(read_text(p, "recipe file"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"recipe file '{p}' is not valid YAML{at}; fix the syntax") from None
    return recipe_from_dict(data, where=f"recipe '{p}'")


def as_spec(item: "PassSpec | PassConfig | str") -> PassSpec:
    """A recipe step from a PassSpec, a config instance (``GPTQConfig(bits=3)``) or shorthand text."""
    if isinstance(item, PassSpec):
        return item
    if isinstance(item, PassConfig):
        return PassSpec(pass_for_config(item).name, item)
    if isinstance(item, str):
        return parse_shorthand(item)
    raise ConfigError(f"a recipe step must be a pass config, a PassSpec or 'name:key=val' text, got {type(item).__name__}")


def as_recipe(recipe: "Recipe | list[PassSpec | PassConfig | str] | PassConfig | str | dict[str, Any]") -> Recipe:
    """Accept a Recipe, a list of configs, PassSpecs or shorthand strings, one config, a YAML path, or a
    dict."""
    if isinstance(recipe, Recipe):
        rec = recipe
    elif isinstance(recipe, dict):
        rec = recipe_from_dict(recipe)
    elif isinstance(recipe, str) and (recipe.endswith((".yaml", ".yml")) or Path(recipe).is_file()):
        rec = load_recipe(recipe)
    elif isinstance(recipe, (str, PassConfig)):
        rec = Recipe([as_spec(recipe)])
    elif isinstance(recipe, (list, tuple)):
        if not recipe:
            raise ConfigError("empty recipe: give at least one pass (see 'compress ls passes')")
        rec = Recipe([as_spec(p) for p in recipe])
    else:
        raise ConfigError(f"a recipe is a list of passes, a YAML path or a dict, got {type(recipe).__name__}")
    return rec
