"""``compress validate``: check a recipe file without running it."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import out_console


def validate(recipe: Path = typer.Argument(..., help="recipe YAML")) -> None:
    """Check a recipe file without running it: its passes, their options and their order."""
    from ..calib.data import CalibConfig
    from ..planning.order import check_order
    from ..recipe import load_recipe

    rec = load_recipe(recipe)
    check_order([spec.build() for spec in rec.passes])
    CalibConfig.from_dict(rec.calibration, where=lambda f: f"the recipe's 'calibration: {f}'", what="recipe calibration")
    out_console.print(rec.to_yaml(), highlight=False)
    out_console.print("recipe is valid")
