"""``compress sweep``: a grid of pass configurations on one model, sharing calibration statistics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from ..calib.data import CalibConfig
from ..errors import CompressError
from .app import console, out_console, progress_bar, setup_logging
from .options import with_options


def _axes(passes: list[str], ratios: list[str], grid: list[str]) -> list[tuple[str, dict[str, Any], str, list[str]]]:
    """(pass, fixed options, varying key, values) per --pass."""
    from ..recipe import parse_shorthand

    if ratios and grid:
        raise CompressError("give --ratios or --grid, not both")
    value_lists: list[tuple[str, ...]] = [("ratio", r) for r in ratios] or [tuple(g.split("=", 1)) if "=" in g else ("", g) for g in grid]
    if not value_lists:
        raise CompressError("no values to sweep: give --ratios 0.1,0.2,... (or --grid KEY=V1,V2)")
    if len(value_lists) not in (1, len(passes)):
        raise CompressError(f"{len(passes)} --pass but {len(value_lists)} value lists: give one list, or one per --pass")
    axes = []
    for i, text in enumerate(passes):
        key, values = value_lists[0] if len(value_lists) == 1 else value_lists[i]
        if not key:
            raise CompressError(f"--grid '{values}' is not KEY=V1,V2")
        fixed_spec = parse_shorthand(text)  # validates the fixed options
        given = {item.split("=", 1)[0].strip() for item in filter(None, text.partition(":")[2].split(","))}
        fixed = {k: v for k, v in fixed_spec.config.to_dict().items() if k in given}
        vals = [v.strip() for v in str(values).split(",") if v.strip()]
        axes.append((fixed_spec.name, fixed, key, vals))
    return axes


@with_options("calib", CalibConfig, skip=("batch_size",))
def sweep(
    model: str = typer.Argument(..., help="hub ID, local HF directory, or directory holding a .gguf file"),
    out: Path = typer.Option(..., "--out", "-o", help="sweep directory (an existing one is resumed)"),
    passes: list[str] = typer.Option(..., "--pass", "-p", help="pass (shorthand NAME:key=val allowed for fixed options); repeat"),
    ratios: list[str] = typer.Option([], "--ratios", help="comma-separated ratios for the --pass before it (one list applies to all)"),
    grid: list[str] = typer.Option([], "--grid", help="KEY=V1,V2,... to vary another option instead of ratio (per --pass, or one for all)"),
    eval_text: str = typer.Option("ppl=wikitext2", "--eval", help='metrics per point, e.g. "ppl=wikitext2;max_windows=16" or "tasks=arc_easy;limit=100"'),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="local data folder (else $COMPRESS_DATA_DIR, else the hub)"),
    dtype: str = typer.Option("auto", "--dtype"),
    device: str = typer.Option("auto", "--device"),
    save_checkpoints: bool = typer.Option(False, "--save-checkpoints", help="write each point's compressed checkpoint under OUT/points/"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress display"),
    json_lines: bool = typer.Option(False, "--json", help="one JSON line per finished point on stdout"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    shard: Optional[str] = typer.Option(
        None, "--shard", help="I/N, 1-based: run only the grid points whose index modulo N is I-1; N jobs --shard 1/N ... N/N with the same --out fill one sweep",
    ),
    calib: Optional[dict[str, Any]] = None,
) -> None:
    """Run a grid of pass configurations on MODEL, sharing calibration statistics; write sweep.csv/md/png."""
    from ..evalspec import EvalSpec
    from ..sweeps import make_grid, parse_shard
    from ..sweeps import sweep as run_sweep

    shard_ij = parse_shard(shard) if shard is not None else None
    setup_logging(verbose, quiet or json_lines)
    points = make_grid(_axes(passes, ratios, grid))
    spec = EvalSpec.parse(eval_text)
    cfg = CalibConfig.from_dict(calib or {})
    progress, advance = progress_bar(quiet or json_lines)

    def on_point(row: dict[str, Any], k: int, total: int) -> None:
        advance("grid points", k, total)  # type: ignore[operator]
        if json_lines:
            keys = ("label", "status", "compression", "bits_per_weight", "metrics", "error", "seconds")
            print(json.dumps({k2: row.get(k2) for k2 in keys}, default=str), flush=True)

    def on_stage(msg: str) -> None:
        if not (quiet or json_lines):
            console.log(msg)

    with progress:  # type: ignore[attr-defined]
        result = run_sweep(model, points, out, eval_spec=spec, calib=cfg, data_dir=data_dir, device=device, dtype=dtype,
                           save_checkpoints=save_checkpoints, shard=shard_ij, on_point=on_point, on_stage=on_stage)
    failed = [r for r in result.rows if r["status"] != "ok"]
    if result.rows and len(failed) == len(result.rows):
        first = failed[0]
        raise CompressError(
            f"every grid point failed ({len(failed)} of {len(result.rows)}); the first, {first['label']}: {first.get('error') or 'no message'} "
            f"(all errors in {out}/sweep.md)"
        )
    if not (quiet or json_lines):
        console.print((Path(out) / "sweep.md").read_text(), markup=False, highlight=False)
        if failed:
            console.print(f"{len(failed)} point(s) failed; see the table", markup=False)
        out_console.print(f"wrote {out}/sweep.csv, sweep.md, sweep.png")
