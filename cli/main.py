"""``compress`` command line. Each command parses its options into the library's config objects
and makes one library call; errors in the user's input print one line and exit with status 2."""

from __future__ import annotations

import dataclasses
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
    export: list[str] = typer.Option([], "--export", help="also write, after the checkpoint: dense (plain HF checkpoint), gptq (GPTQ format), peft (LoRA adapter of eora/lq-lora), in OUT/<format>"),
    ppl: list[str] = typer.Option([], "--ppl", help="measure perplexity after compression: wikitext2, c4, ptb"),
    ppl_seqlen: int = typer.Option(2048, "--ppl-seqlen", help="perplexity window length"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="evaluate only the first N windows"),
    eval_text: Optional[str] = typer.Option(None, "--eval", help='evaluation after compression, e.g. "tasks=arc_easy,piqa;ppl=wikitext2;limit=200"'),
    baseline: bool = typer.Option(False, "--baseline", help="also evaluate the dense model in the same run and report the change"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
    stream: Optional[bool] = typer.Option(
        None, "--stream/--no-stream",
        help="read the model one decoder layer at a time and keep progress in OUT.partial/ for a resume [default: when every pass works layer by layer]",
    ),
    restart: bool = typer.Option(False, "--restart", help="discard the progress in OUT.partial/ instead of resuming it"),
    offload_dir: Optional[Path] = typer.Option(None, "--offload-dir", help="keep the calibration activations in memory-mapped files in this folder (streamed runs)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress display"),
) -> None:
    """Compress MODEL with the given passes and write a compressed checkpoint to OUT.

    A run that stops (crash, Ctrl-C, full disk) resumes when the same command is run again. For
    data-parallel calibration: torchrun --nproc-per-node N -m compress run MODEL ..."""
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
    spec = api.EvalSpec.parse(eval_text) if eval_text else api.EvalSpec()
    spec = dataclasses.replace(
        spec, ppl=tuple(dict.fromkeys(spec.ppl + tuple(ppl))), ppl_seqlen=ppl_seqlen if ppl else spec.ppl_seqlen,
        max_windows=max_windows if max_windows is not None else spec.max_windows,
    )
    if baseline and not spec:
        raise CompressError("--baseline needs something to measure: add --ppl or --eval")
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
            gguf_file=gguf_file, data_dir=data_dir, overwrite=overwrite, export=tuple(export), eval_spec=spec,
            baseline=baseline, on_layer=on_layer, on_stage=on_stage,
            stream="auto" if stream is None else ("on" if stream else "off"), restart=restart, offload_dir=offload_dir,
        )
    from ..pipeline.distributed import current

    d = current()
    if d is not None and not d.is_main:  # rank 0 reports
        return
    if not quiet:
        _print_layers(report)
        _print_summary(report)
    out_console.print(f"wrote {out}")


def _print_layers(report: Any) -> None:
    """One row per decoder layer (the full per-module table is in report.md)."""
    t = Table(title="per-layer summary (per-module table in report.md)", show_lines=False)
    for col in ("layer", "modules", "passes", "params before", "params after", "bits/weight", "mean error", "s"):
        t.add_column(col, justify="left" if col in ("passes",) else "right")
    for row in report.layer_rows():
        err = row["mean_error"]
        t.add_row(
            str(row["layer"]), str(row["modules"]), ",".join(row["passes"]), f"{row['params_before']:,}", f"{row['params_after']:,}",
            f"{row['bits_per_weight']:.3f}", "" if err is None else f"{err:.4g}", f"{row['seconds']:.1f}",
        )
    console.print(t)


def _metric_line(m: dict[str, Any]) -> str:
    """One metric with its protocol (and the baseline change when measured)."""
    p = m["protocol"]
    if m.get("unit") == "tokens/s":
        vs = f"  (dense {m['baseline']:.1f}, {m['ratio']:.3f}x)" if m.get("baseline") is not None else ""
        return (f"{m['name']}: {m['value']:.1f} tokens/s{vs}  [batch {p['batch']}, prompt {p['prompt_len']}, {p['new_tokens']} decode "
                f"steps ({p['decode']}), median of {p['repeats']}, {p['threads']} threads, {p.get('device', '')}]")
    if p.get("metric") == "perplexity":
        proto = (
            f"{p['level']}-level, {p['dataset']} {p['split']}, seqlen {p['seqlen']}, {p['windows']}/{p['windows_available']} "
            f"windows, {p['predicted_tokens']} tokens, {p['dtype']}, {p.get('device', '')}"
        )
    else:
        proto = (
            f"lm-eval {p.get('lm_eval_version')}, task {p.get('task')} v{p.get('task_version')}, {p.get('n_shot')}-shot, "
            f"limit {p.get('limit')}, {p.get('samples')} samples, batch {p.get('batch_size')}, {p.get('dtype')}"
        )
    base = ""
    if m.get("baseline") is not None:
        base = f"  (dense {m['baseline']:.4f}, change {m['change']:+.2%})" if m.get("change") is not None else ""
    err = f" ± {m['stderr']:.4f}" if m.get("stderr") else ""
    return f"{m['name']} = {m['value']:.4f}{err}{base}  [{proto}]"


def _print_summary(report: Any) -> None:
    from ..report import summary_lines

    for line in summary_lines(report.summary()):
        console.print(line, markup=False, highlight=False)
    for note in report.notes:
        console.print(note, markup=False, highlight=False)
    for m in report.metrics:
        console.print(_metric_line(m), markup=False, highlight=False)
    console.print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report.timings.items()))


def _speed_baseline(model: str, given: Optional[str], prompt: int, new: int) -> tuple[str, str | None] | None:
    """(source, gguf file) of the dense model --speed compares against, checked before anything runs."""
    from ..checkpoint import MANIFEST, read_manifest

    if prompt < 1 or new < 1:
        raise CompressError(f"--speed-prompt and --speed-new must be positive, got {prompt} and {new}")
    if given is not None and given.lower() == "none":
        return None
    if given is not None:
        return given, None
    if not (Path(model) / MANIFEST).is_file():
        return None  # a plain model: nothing to compare with unless --speed-baseline names one
    src = read_manifest(model).get("source", {}) or {}
    source = src.get("source")
    if not source:
        raise CompressError(f"'{model}' does not record its source model; pass --speed-baseline DIR (or --speed-baseline none)")
    looks_local = source.startswith((".", "/", "~")) or Path(source).exists() or source.count("/") != 1
    if looks_local and not Path(source).expanduser().exists():
        raise CompressError(f"--speed compares with the source model '{source}', which is not on this machine; "
                            "pass --speed-baseline DIR (or --speed-baseline none)")
    return source, src.get("gguf_file")


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="compressed checkpoint directory, HF directory or hub ID"),
    ppl: list[str] = typer.Option([], "--ppl", help="perplexity dataset(s): wikitext2, c4, ptb [wikitext2 when no --tasks]"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-eval tasks, comma-separated (e.g. arc_easy,piqa)"),
    limit: Optional[float] = typer.Option(None, "--limit", help="lm-eval: at most N examples per task (or a fraction < 1)"),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="lm-eval: few-shot examples"),
    batch_size: int = typer.Option(8, "--batch-size", help="lm-eval batch size"),
    tasks_dir: Optional[str] = typer.Option(None, "--tasks-dir", help="local lm-eval task YAMLs (else $COMPRESS_TASKS_DIR, else <data dir>/lm_eval_tasks)"),
    seqlen: int = typer.Option(2048, "--ppl-seqlen", "--seqlen", help="perplexity window length"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="evaluate only the first N windows (CPU)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="local data folder (else $COMPRESS_DATA_DIR, else the hub)"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, auto"),
    out: Optional[Path] = typer.Option(None, "--out", help="write report.json/report.md here (default: the checkpoint directory itself)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the metrics to this JSON file"),
    speed: bool = typer.Option(False, "--speed", help="also measure prefill and decode tokens/s, against the dense source model in the same run"),
    speed_baseline: Optional[str] = typer.Option(
        None, "--speed-baseline", help="dense model for --speed (default: the checkpoint's source model; 'none': no comparison)"),
    speed_prompt: int = typer.Option(256, "--speed-prompt", help="--speed: prompt length (tokens)"),
    speed_new: int = typer.Option(32, "--speed-new", help="--speed: decode steps"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Measure perplexity (papers' token-level protocol), lm-eval tasks and inference speed of a (compressed) model."""
    from .. import api
    from ..hf_format import is_compress_checkpoint
    from ..models import resolve_device
    from ..report import merge_metrics, write_report

    _setup_logging(verbose)
    task_list = tuple(t.strip() for t in (tasks or "").split(",") if t.strip())
    spec = api.EvalSpec(
        ppl=tuple(ppl) or (() if task_list else ("wikitext2",)), tasks=task_list, ppl_seqlen=seqlen, max_windows=max_windows,
        limit=int(limit) if limit is not None and limit >= 1 else limit, num_fewshot=num_fewshot, batch_size=batch_size,
        tasks_dir=tasks_dir,
    )
    from ..validate import check_eval

    check_eval(spec, data_dir)
    baseline = _speed_baseline(model, speed_baseline, speed_prompt, speed_new) if speed else None
    dev = resolve_device(device)
    m, tok = api.load(model, device=dev)
    check_eval(spec, data_dir, getattr(m, "config", None))
    if tok is None:
        raise CompressError(f"'{model}' has no tokenizer files; cannot tokenize the evaluation text")
    results = api.evaluate(m, tok, spec, data_dir=data_dir) if spec else []
    if speed:
        from ..eval.speed import speed_metrics

        base = None
        if baseline is not None:
            from ..models import load_model

            base, _, _ = load_model(baseline[0], gguf_file=baseline[1], dtype=next(m.parameters()).dtype, device=dev)
        for r in speed_metrics(m, base, prompt_len=speed_prompt, new_tokens=speed_new):
            r["protocol"]["device"] = str(dev)
            results.append(r)
        del base
    for r in results:
        out_console.print(_metric_line(r), markup=False, highlight=False)
    target = out if out is not None else (Path(model) if is_compress_checkpoint(model) else None)
    if target is not None:
        target.mkdir(parents=True, exist_ok=True)
        existing = target / "report.json"
        data = json.loads(existing.read_text()) if existing.is_file() else {"model": {"source": model}}
        write_report(merge_metrics(data, results), target)
    if json_out is not None:
        json_out.write_text(json.dumps({"model": model, "metrics": results}, indent=2, default=str) + "\n")


@app.command("lm-eval", add_help_option=False, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def lm_eval_cmd(ctx: typer.Context) -> None:
    """lm-eval's own CLI, arguments passed through unchanged, with compress checkpoints readable by
    --model hf --model_args pretrained=OUT (the local task directory is added as --include_path)."""
    from ..eval.lm_eval_cli import main as lm_eval_main

    lm_eval_main(list(ctx.args))


@app.command()
def sweep(
    model: str = typer.Argument(..., help="hub ID, local HF directory, or directory holding a .gguf file"),
    out: Path = typer.Option(..., "--out", "-o", help="sweep directory (an existing one is resumed)"),
    passes: list[str] = typer.Option(..., "--pass", "-p", help="pass (shorthand NAME:key=val allowed for fixed options); repeat"),
    ratios: list[str] = typer.Option([], "--ratios", help="comma-separated ratios for the --pass before it (one list applies to all)"),
    grid: list[str] = typer.Option([], "--grid", help="KEY=V1,V2,... to vary another option instead of ratio (per --pass, or one for all)"),
    eval_text: str = typer.Option("ppl=wikitext2", "--eval", help='metrics per point, e.g. "ppl=wikitext2;max_windows=16" or "tasks=arc_easy;limit=100"'),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration source [c4]"),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="calibration sequences [32]"),
    calib_seqlen: Optional[int] = typer.Option(None, "--calib-seqlen", help="tokens per calibration sequence [512]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="calibration sampling seed [0]"),
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
) -> None:
    """Run a grid of pass configurations on MODEL, sharing calibration statistics; write sweep.csv/md/png."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .. import api
    from ..recipe import parse_shorthand
    from ..sweeps import make_grid, parse_shard
    from ..sweeps import sweep as run_sweep

    shard_ij = parse_shard(shard) if shard is not None else None
    _setup_logging(verbose, quiet or json_lines)
    if ratios and grid:
        raise CompressError("give --ratios or --grid, not both")
    value_lists = [("ratio", r) for r in ratios] or [tuple(g.split("=", 1)) if "=" in g else ("", g) for g in grid]
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
    points = make_grid(axes)
    spec = api.EvalSpec.parse(eval_text)
    cfg = _calib_config({}, calib, calib_samples, calib_seqlen, seed, None)
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=console, disable=quiet or json_lines,
    )
    task: dict[str, Any] = {}

    def on_point(row: dict[str, Any], k: int, total: int) -> None:
        if "id" not in task:
            task["id"] = progress.add_task("grid points", total=total)
        progress.update(task["id"], completed=k)
        if json_lines:
            print(json.dumps({k2: row.get(k2) for k2 in ("label", "status", "compression", "bits_per_weight", "metrics", "error", "seconds")}, default=str), flush=True)

    def on_stage(msg: str) -> None:
        if not (quiet or json_lines):
            console.log(msg)

    with progress:
        result = run_sweep(
            model, points, out, eval_spec=spec, calib=cfg, data_dir=data_dir, device=device, dtype=dtype,
            save_checkpoints=save_checkpoints, shard=shard_ij, on_point=on_point, on_stage=on_stage,
        )
    if not (quiet or json_lines):
        console.print((Path(out) / "sweep.md").read_text(), markup=False, highlight=False)
        failed = [r for r in result.rows if r["status"] != "ok"]
        if failed:
            console.print(f"{len(failed)} point(s) failed; see the table", markup=False)
        out_console.print(f"wrote {out}/sweep.csv, sweep.md, sweep.png")


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="compressed checkpoint directory"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory of the export"),
    format: str = typer.Option("dense", "--format", help="dense (multiplied out, loadable by from_pretrained), gptq, compressed-tensors, or peft"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Export a compressed checkpoint to another format."""
    from .. import api
    from ..adapters import get_adapter
    from ..checkpoint import MANIFEST, atomic_directory, read_manifest
    from ..exports import get_export
    from ..validate import check_output_dir

    _setup_logging(False)
    ex = get_export(format)
    check_output_dir(out, overwrite)
    manifest = read_manifest(checkpoint) if (Path(checkpoint) / MANIFEST).is_file() else {}  # save_pretrained writes none
    source = str(manifest.get("source", {}).get("source") or checkpoint)
    m, tok = api.load(checkpoint)
    layers_path = get_adapter(m).layers_path
    ex.check_model(m, layers_path)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        ex.write(m, tok, tmp, layers_path, source)
    out_console.print(f"wrote {out}")


@app.command("ls")
def ls(what: str = typer.Argument("passes", help="passes or adapters")) -> None:
    """List the registered passes (with every option) or the architecture adapters."""
    from ..config import describe_field

    if what == "passes":
        from ..registry import all_passes

        for name, cls in all_passes().items():
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            caps = cls.capabilities(cls.config_cls())
            flags = ["calibration" if caps.requires_calibration else "data-free with its defaults", f"{cls.granularity}-level"]
            if caps.statistics:
                flags.append("statistics " + "+".join(sorted(caps.statistics)))
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
def env(build: bool = typer.Option(False, "--build", help="compile the CUDA kernels now (needs CUDA and nvcc)")) -> None:
    """Report torch, CUDA and which compiled kernels are available (and why not)."""
    import platform

    import torch

    from ..kernels import build as kb
    from ..kernels.ops import get_preference

    rows = [
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device (CPU only)"),
        ("nvcc", kb.find_nvcc() or "not found"),
        ("kernel preference", f"{get_preference()} (COMPRESS_KERNELS=auto|torch|cuda)"),
        ("kernel sources", str(kb.csrc_dir())),
        ("kernel cache", str(kb.cache_dir())),
    ]
    if build:
        kb.load(verbose=True)
    st = kb.status()
    state = "available" if st.available else "unavailable"
    for op in ("bcq_linear (LUT-GEMM)", "sparse24_linear (2:4)"):
        rows.append((op, f"CUDA kernel {state}: {st.reason}; PyTorch implementation always available"))
    if st.log is not None:
        rows.append(("build log", str(st.log)))
    for k, v in rows:
        out_console.print(f"[bold]{k:>22}[/bold]  {v}", highlight=False, soft_wrap=True)


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
        console.print("interrupted before the output directory was complete: nothing was written; rerun the same command")
        sys.exit(130)


if __name__ == "__main__":
    main()
