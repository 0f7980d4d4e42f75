"""``compress run``: plan, then compress MODEL into a checkpoint (or print the plan with --dry-run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..calib.data import CalibConfig
from ..errors import CompressError
from ..evalspec import EvalSpec
from ..exports import EXPORTS
from ..recipe import load_recipe
from .app import console, out_console, progress_bar, setup_logging
from .options import with_options
from .show import print_layers, print_summary


def eval_spec_of(text: Optional[str], flags: dict[str, Any]) -> EvalSpec:
    """The evaluation of ``compress run``: the ``--eval`` text's items, then the flags (which win)."""
    items = EvalSpec.parse_items(text) if text else {}
    from_text = set(items) - set(flags)

    def where(field: str) -> str:
        return f"--eval {field}=" if field in from_text else EvalSpec.run_where(field)

    merged = {**items, **flags}
    if "ppl" in items and "ppl" in flags:  # --ppl adds to the --eval list
        merged["ppl"] = ",".join(dict.fromkeys(f"{items['ppl']},{flags['ppl']}".split(",")))
    return EvalSpec.from_dict(merged, where=where, what="--eval")


EXPORTS_HELP = "also write, after the checkpoint, in OUT/<format>: " + "; ".join(f"{name} ({fmt.help})" for name, fmt in EXPORTS.items())

@with_options("evaluation", EvalSpec, flag_key="run_flag")
@with_options("calib", CalibConfig)
def run(
    model: str = typer.Argument(..., help="hub ID, local HF directory, or directory holding a .gguf file"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (refused if it exists, unless --overwrite)"),
    passes: list[str] = typer.Option([], "--pass", "-p", help="pass in shorthand NAME:key=val,key=val; repeat for several"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="recipe YAML (passes + optional calibration)"),
    budget: Optional[str] = typer.Option(None, "--budget", metavar="KIND=VALUE",
                                         help="choose the method per linear for a size instead of --pass: bits=3.0 (stored bits per weight of the "
                                              "decoder linears), size=0.5 (of their dense bytes), params=0.75 (of their parameters; structured methods)"),
    search: Optional[str] = typer.Option(None, "--search", metavar="LIST",
                                         help="candidates of --budget, comma-separated: gptq, rtn, svd-llm, sparsegpt, A+gptq [default: gptq,sparsegpt; "
                                              "svd-llm for params=]"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="local data folder (else $COMPRESS_DATA_DIR, else the hub)"),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16, float16"),
    device: str = typer.Option("auto", "--device", help="compute device: cpu, cuda, auto"),
    gguf_file: Optional[str] = typer.Option(None, "--gguf-file", help="which .gguf file when the directory has several"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow model code from the hub"),
    export: list[str] = typer.Option([], "--export", help=EXPORTS_HELP),
    eval_text: Optional[str] = typer.Option(None, "--eval", help='evaluation after compression, e.g. "tasks=arc_easy,piqa;ppl=wikitext2;limit=200"'),
    baseline: bool = typer.Option(False, "--baseline", help="also evaluate the dense model in the same run and report the change"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
    stream: Optional[bool] = typer.Option(
        None, "--stream/--no-stream",
        help="read the model one decoder layer at a time and keep progress in OUT.partial/ for a resume [default: when every pass works layer by layer]",
    ),
    restart: bool = typer.Option(False, "--restart", help="discard the progress in OUT.partial/ instead of resuming it"),
    offload_dir: Optional[Path] = typer.Option(None, "--offload-dir", help="keep the calibration activations in memory-mapped files in this folder (streamed runs)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check everything, print the plan (every target's passes and bits) and exit without compressing"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress display"),
    calib: Optional[dict[str, Any]] = None,
    evaluation: Optional[dict[str, Any]] = None,
) -> None:
    """Compress MODEL with the given passes and write a compressed checkpoint to OUT.

    A run that stops (crash, Ctrl-C, full disk) resumes when the same command is run again. For
    data-parallel calibration: torchrun --nproc-per-node N -m compress run MODEL ..."""
    from .. import api

    setup_logging(verbose, quiet)
    if recipe is not None and passes:
        raise CompressError("give either --recipe or --pass, not both")
    if budget is not None and (recipe is not None or passes):
        raise CompressError(f"--budget chooses the passes itself: drop {'--recipe' if recipe is not None else '--pass'}, or drop --budget to run them as given")
    if recipe is None and not passes and budget is None:
        raise CompressError("no passes: give --pass NAME:key=val (see 'compress ls passes'), --recipe FILE, or --budget bits=3.0")
    spec = eval_spec_of(eval_text, evaluation or {})
    if baseline and not spec:
        raise CompressError("--baseline needs something to measure: add --ppl or --eval")
    p = api.plan(model, load_recipe(recipe) if recipe is not None else (list(passes) or None), out, calib=calib or {}, eval_spec=spec if spec else None,
                 baseline=baseline, export=tuple(export), device=device, dtype=dtype, stream="auto" if stream is None else ("on" if stream else "off"),
                 restart=restart, offload_dir=offload_dir, overwrite=overwrite, data_dir=data_dir, gguf_file=gguf_file,
                 trust_remote_code=trust_remote_code, budget=budget, search=search)
    if p.search is not None and not quiet:
        for line in p.search.lines(p.adapter.layers_path):
            out_console.print(line, markup=False, highlight=False)
    if dry_run:
        p.handle.close()
        for line in p.describe():
            out_console.print(line, markup=False, highlight=False)
        out_console.print("dry run: nothing was compressed or written")
        return
    progress, advance = progress_bar(quiet)

    def on_stage(msg: str) -> None:
        if not quiet:
            console.log(msg)

    with progress:  # type: ignore[attr-defined]
        report = api.execute(p, on_layer=lambda i, total, s: advance("layers", i + 1, total), on_stage=on_stage)  # type: ignore[operator]
    if not p.is_main:  # rank 0 reports
        return
    if not quiet:
        print_layers(report)
        print_summary(report)
    out_console.print(f"wrote {out}")
