"""``compress`` command line. Each command parses its options into the library's config objects
and makes one library call; errors in the user's input print one line and exit with status 2."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import CompressError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Post-training compression of Hugging Face causal LMs.")
console = Console(stderr=True)
out_console = Console()


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)], force=True)
    logging.getLogger("compress").setLevel(logging.INFO if not quiet and not verbose else level)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _calib_config(recipe_calib: dict[str, Any], source: str | None, samples: int | None, seqlen: int | None, seed: int | None, batch: int | None) -> Any:
    from ..calib.data import CalibConfig

    d = dict(recipe_calib)
    for k, v in (("source", source), ("samples", samples), ("seqlen", seqlen), ("seed", seed), ("batch_size", batch)):
        if v is not None:
            d[k] = v
    return CalibConfig.from_dict(d)


@app.command()
def run(
    model: str = typer.Argument(..., help="hub ID, local HF directory, or directory holding a .gguf file"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (refused if it exists, unless --overwrite)"),
    passes: list[str] = typer.Option([], "--pass", "-p", help="pass in shorthand NAME:key=val,key=val; repeat for several"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="recipe YAML (passes + optional calibration)"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration source: c4, wikitext2, ptb or a .txt/.jsonl/.parquet file [c4]"),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="calibration sequences [32]"),
    calib_seqlen: Optional[int] = typer.Option(None, "--calib-seqlen", help="tokens per calibration sequence [512]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="calibration sampling seed [0]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="calibration forward batch size [8]"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="local data folder (else $COMPRESS_DATA_DIR, else the hub)"),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16, float16"),
    device: str = typer.Option("auto", "--device", help="compute device: cpu, cuda, auto"),
    gguf_file: Optional[str] = typer.Option(None, "--gguf-file", help="which .gguf file when the directory has several"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow model code from the hub"),
    export: list[str] = typer.Option([], "--export", help="also write another format: dense (plain HF checkpoint in OUT/dense), gptq (GPTQ-format checkpoint in OUT/gptq)"),
    ppl: list[str] = typer.Option([], "--ppl", help="measure perplexity after compression: wikitext2, c4, ptb"),
    ppl_seqlen: int = typer.Option(2048, "--ppl-seqlen", help="perplexity window length"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="evaluate only the first N windows"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress display"),
) -> None:
    """Compress MODEL with the given passes and write a compressed checkpoint to OUT."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .. import api
    from ..recipe import Recipe, as_recipe, parse_shorthand

    _setup_logging(verbose, quiet)
    if recipe is not None and passes:
        raise CompressError("give either --recipe or --pass, not both")
    if recipe is None and not passes:
        raise CompressError("no passes: give --pass NAME:key=val (see 'compress ls passes') or --recipe FILE")
    rec = as_recipe(str(recipe)) if recipe is not None else Recipe([parse_shorthand(p) for p in passes])
    cfg = _calib_config(rec.calibration, calib, calib_samples, calib_seqlen, seed, batch_size)
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=console, disable=quiet, transient=False,
    )
    task: dict[str, Any] = {}

    def on_layer(i: int, total: int, seconds: float) -> None:
        if "id" not in task:
            task["id"] = progress.add_task("layers", total=total)
        progress.update(task["id"], completed=i + 1)

    def on_stage(msg: str) -> None:
        if not quiet:
            console.log(msg)

    with progress:
        report = api.run(
            model, rec, out, calib=cfg, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
            gguf_file=gguf_file, data_dir=data_dir, overwrite=overwrite, export=tuple(export), ppl=tuple(ppl),
            ppl_seqlen=ppl_seqlen, ppl_max_windows=max_windows, on_layer=on_layer, on_stage=on_stage,
        )
    if not quiet:
        _print_layers(report)
        _print_summary(report)
    out_console.print(f"wrote {out}")


def _print_layers(report: Any) -> None:
    t = Table(title="per-layer results", show_lines=False)
    for col in ("module", "pass", "type", "rank", "params before", "params after", "error", "s"):
        t.add_column(col, justify="right" if col not in ("module", "pass", "type") else "left")
    for r in report.records:
        err = r.info.get("error")
        t.add_row(
            r.name, r.pass_name, r.module_type, str(r.info.get("rank", "")), f"{r.params_before:,}", f"{r.params_after:,}",
            "" if err is None else f"{err:.4g}", f"{r.seconds:.2f}",
        )
    console.print(t)


def _print_summary(report: Any) -> None:
    s = report.summary()
    console.print(
        f"target linears: {s['target_params_before']:,} -> {s['target_params_after']:,} params "
        f"(removed {s['target_ratio']:.2%}); whole model {s['model_params_before']:,} -> {s['model_params_after']:,} "
        f"(removed {s['model_ratio']:.2%})"
    )
    for m in report.metrics:
        p = m["protocol"]
        console.print(
            f"{m['name']} = {m['value']:.4f}  [{p['level']}-level, {p['dataset']} {p['split']}, seqlen {p['seqlen']}, "
            f"{p['windows']}/{p['windows_available']} windows, {p['predicted_tokens']} tokens, {p['dtype']}]",
            markup=False,
        )
    console.print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report.timings.items()))


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="compressed checkpoint directory, HF directory or hub ID"),
    ppl: list[str] = typer.Option(["wikitext2"], "--ppl", help="perplexity dataset(s): wikitext2, c4, ptb"),
    seqlen: int = typer.Option(2048, "--seqlen", help="window length"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="evaluate only the first N windows (CPU)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="local data folder (else $COMPRESS_DATA_DIR, else the hub)"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, auto"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the results to this JSON file"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Measure token-level perplexity of a (compressed) model with the papers' protocol."""
    from .. import api
    from ..models import resolve_device

    _setup_logging(verbose)
    dev = resolve_device(device)
    m, tok = api.load(model, device=dev)
    if tok is None:
        raise CompressError(f"'{model}' has no tokenizer files; cannot tokenize the evaluation text")
    results = api.evaluate(m, tok, ppl, seqlen=seqlen, max_windows=max_windows, data_dir=data_dir)
    for r in results:
        p = r["protocol"]
        out_console.print(
            f"{r['name']} = {r['value']:.4f}  [{p['level']}-level, {p['dataset']} {p['split']}, seqlen {p['seqlen']}, "
            f"{p['windows']}/{p['windows_available']} windows, {p['predicted_tokens']} tokens, {p['dtype']}, {p['device']}]",
            markup=False,
        )
    if json_out is not None:
        json_out.write_text(json.dumps({"model": model, "metrics": results}, indent=2) + "\n")


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="compressed checkpoint directory"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory for the plain HF checkpoint"),
    format: str = typer.Option("dense", "--format", help="dense (multiplied out, loadable by from_pretrained) or gptq"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Export a compressed checkpoint to another format."""
    from .. import api
    from ..adapters import get_adapter
    from ..checkpoint import atomic_directory, export_dense
    from ..export_gptq import check_gptq_exportable, export_gptq

    _setup_logging(False)
    if format not in ("dense", "gptq"):
        raise CompressError(f"unknown export format '{format}'; available: dense, gptq")
    m, tok = api.load(checkpoint)
    layers_path = get_adapter(m).layers_path
    if format == "gptq":
        check_gptq_exportable(m, layers_path)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        if format == "dense":
            export_dense(m, tok, tmp)
        else:
            export_gptq(m, tok, tmp, layers_path)
    out_console.print(f"wrote {out}")


@app.command("ls")
def ls(what: str = typer.Argument("passes", help="passes or adapters")) -> None:
    """List the registered passes (with every option) or the architecture adapters."""
    from ..config import describe_field

    if what == "passes":
        from ..registry import all_passes

        for name, cls in all_passes().items():
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            flags = ["calibration" if cls.requires_calibration else "data-free"]
            out_console.print(f"[bold]{name}[/bold]  ({', '.join(flags)})  {doc}")
            for f in cls.config_cls.fields():
                out_console.print(f"    {f.name}: {describe_field(f)}", highlight=False)
    elif what == "adapters":
        from ..adapters import ADAPTERS

        for a in ADAPTERS:
            groups = " -> ".join("[" + ", ".join(g) + "]" for g in a.sequential_groups)
            out_console.print(f"[bold]{a.name}[/bold]: model types {', '.join(a.model_types)}; layers {a.layers_path}; groups {groups}")
        out_console.print("[bold]generic[/bold]: any other decoder; every nn.Linear in the decoder layers, one group")
    else:
        raise CompressError(f"unknown listing '{what}'; use 'compress ls passes' or 'compress ls adapters'")


@app.command()
def validate(recipe: Path = typer.Argument(..., help="recipe YAML")) -> None:
    """Check a recipe file without running it."""
    from ..recipe import load_recipe

    rec = load_recipe(recipe)
    out_console.print(rec.to_yaml(), highlight=False)
    out_console.print("recipe is valid")


def main() -> None:
    try:
        app()
    except CompressError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; no output directory was completed")
        sys.exit(130)


if __name__ == "__main__":
    main()
