"""``compress eval``: perplexity, lm-eval tasks and inference speed of a (compressed) model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import CompressError
from ..evalspec import EvalSpec
from .app import out_console, setup_logging
from .options import with_options
from .show import metric_line


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


def _speed(m: Any, baseline: tuple[str, str | None] | None, dev: Any, prompt: int, new: int) -> list[dict[str, Any]]:
    from ..eval.speed import speed_metrics
    from ..models import load_model

    base = None
    if baseline is not None:
        base, _, _ = load_model(baseline[0], gguf_file=baseline[1], dtype=next(m.parameters()).dtype, device=dev)
    out = speed_metrics(m, base, prompt_len=prompt, new_tokens=new)
    for r in out:
        r["protocol"]["device"] = str(dev)
    return out


@with_options("evaluation", EvalSpec)
def eval_cmd(
    model: str = typer.Argument(..., help="compressed checkpoint directory, HF directory or hub ID"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="local data folder (else $COMPRESS_DATA_DIR, else the hub)"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, auto"),
    out: Optional[Path] = typer.Option(None, "--out", help="write report.json/report.md here (default: the checkpoint directory itself)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the metrics to this JSON file"),
    speed: bool = typer.Option(False, "--speed", help="also measure prefill and decode tokens/s, against the dense source model in the same run"),
    speed_baseline: Optional[str] = typer.Option(
        None, "--speed-baseline", help="dense model for --speed (default: the checkpoint's source model; 'none': no comparison)"),
    speed_prompt: int = typer.Option(256, "--speed-prompt", help="--speed: prompt length (tokens)"),
    speed_new: int = typer.Option(32, "--speed-new", help="--speed: decode steps"),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help="the same as --ppl-seqlen", hidden=True),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    evaluation: Optional[dict[str, Any]] = None,
) -> None:
    """Measure perplexity (papers' token-level protocol), lm-eval tasks and inference speed of a (compressed) model.
    Without --tasks, --ppl or --speed, perplexity on wikitext2 (--speed alone measures speed only)."""
    from .. import api
    from ..hf_format import is_compress_checkpoint
    from ..models import resolve_device
    from ..planning.checks import check_eval, check_output_dir, check_writable
    from ..report import merge_metrics, write_report

    setup_logging(verbose)
    given = dict(evaluation or {})
    if seqlen is not None:
        given.setdefault("ppl_seqlen", seqlen)
    if not given.get("ppl") and not given.get("tasks") and not speed:
        given["ppl"] = "wikitext2"
    spec = EvalSpec.from_dict(given, what="compress eval")
    check_eval(spec, data_dir)
    if out is not None:
        check_output_dir(out, overwrite=True)
    if json_out is not None:
        if json_out.is_dir():
            raise CompressError(f"--json '{json_out}' is a directory; give a file path such as {json_out / 'metrics.json'}")
        check_writable(json_out, "--json")
    baseline = _speed_baseline(model, speed_baseline, speed_prompt, speed_new) if speed else None
    dev = resolve_device(device)
    m, tok = api.load(model, device=dev)
    check_eval(spec, data_dir, getattr(m, "config", None))
    max_pos = getattr(getattr(m, "config", None), "max_position_embeddings", None)
    if speed and isinstance(max_pos, int) and speed_prompt + speed_new > max_pos:
        raise CompressError(f"--speed-prompt {speed_prompt} + --speed-new {speed_new} exceed the model's max_position_embeddings {max_pos}; "
                            f"pass a --speed-prompt of at most {max(1, max_pos - speed_new)}")
    if tok is None and spec:
        raise CompressError(f"'{model}' has no tokenizer files; cannot tokenize the evaluation text")
    results = api.evaluate(m, tok, spec, data_dir=data_dir) if spec else []
    if speed:
        results += _speed(m, baseline, dev, speed_prompt, speed_new)
    for r in results:
        out_console.print(metric_line(r), markup=False, highlight=False)
    target = out if out is not None else (Path(model) if is_compress_checkpoint(model) else None)
    if target is not None:
        target.mkdir(parents=True, exist_ok=True)
        existing = target / "report.json"
        data = json.loads(existing.read_text()) if existing.is_file() else {"model": {"source": model}}
        write_report(merge_metrics(data, results), target)
    if json_out is not None:
        json_out.write_text(json.dumps({"model": model, "metrics": results}, indent=2, default=str) + "\n")
