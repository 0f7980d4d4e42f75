"""``compress validate``: check a recipe file without running it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import out_console


def validate(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="local data folder for a named calibration source (else $COMPRESS_DATA_DIR, else the hub)"),
) -> None:
    """Check a recipe file without running it: its passes, their options and their order, and the
    calibration text its passes read (a file, or a named source where it can be read)."""
    from ..calib.data import CalibConfig, load_documents
    from ..planning.order import check_order
    from ..recipe import load_recipe

    rec = load_recipe(recipe)
    passes = [spec.build() for spec in rec.passes]
    check_order(passes)
    cfg = CalibConfig.from_dict(rec.calibration, where=lambda f: f"the recipe's 'calibration: {f}'", what="recipe calibration")
    if any(p.caps.requires_calibration for p in passes):
        load_documents(cfg.source, cfg.split, data_dir)  # what a run would read, with the same one-line refusals
    out_console.print(rec.to_yaml(), highlight=False)
    out_console.print("recipe is valid")
