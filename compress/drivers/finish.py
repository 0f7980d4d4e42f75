"""What follows a written checkpoint: the exports and the evaluation. Either can fail without costing
the compression: the error says that the checkpoint is complete and gives the command that reruns
only the failed step."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, cast

import torch
from torch import nn

from ..errors import CompressError
from ..evalspec import EvalSpec
from ..exports import get_export
from ..fsutil import atomic_directory
from ..modules.base import dense_cache
from ..report import Report, write_report


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    spec: EvalSpec | None = None,
    *,
    data_dir: str | Path | None = None,
    lm_factory: Any = None,
    on_window: Callable[[int, int], None] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Perplexity on each dataset in ``spec.ppl`` and lm-eval on ``spec.tasks``; each metric
    carries its protocol. Keyword arguments build the spec when none is given."""
    spec = spec or EvalSpec(**cast("dict[str, Any]", {k: tuple(v) if k in ("ppl", "tasks") else v for k, v in kwargs.items()}))
    from ..eval.perplexity import perplexity

    out: list[dict[str, Any]] = []
    with dense_cache(model):  # every window and task request re-runs each layer; dropped on return
        for name in spec.ppl:
            r = perplexity(model, tokenizer, name, seqlen=spec.ppl_seqlen, max_windows=spec.max_windows, data_dir=data_dir,
                           on_window=on_window)
            out.append({"name": f"ppl_{name}", **r})
        if spec.tasks:
            from ..eval.harness import run_tasks

            out += run_tasks(
                model, tokenizer, list(spec.tasks), tasks_dir=spec.tasks_dir, data_dir=data_dir, limit=spec.limit,
                num_fewshot=spec.num_fewshot, batch_size=spec.batch_size, lm_factory=lm_factory,
            )
    return out


def with_baseline(metrics: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Attach the dense model's value of each metric and the relative change."""
    base = {m["name"]: m["value"] for m in baseline}
    out = []
    for m in metrics:
        b = base.get(m["name"])
        change = (m["value"] - b) / abs(b) if b not in (None, 0) else None
        out.append({**m, "baseline": b, "change": change})
    return out


def evaluate_baseline(model: nn.Module, tokenizer: Any, spec: EvalSpec, data_dir: Any, device: torch.device) -> list[dict[str, Any]]:
    """The dense model's metrics (it is moved to ``device`` and back)."""
    home = next(model.parameters()).device
    model.to(device)
    try:
        return evaluate(model, tokenizer, spec, data_dir=data_dir)
    finally:
        model.to(home)


def after_checkpoint(
    report: Report, model: nn.Module, tokenizer: Any, out: Path, model_source: str, export: tuple[str, ...],
    eval_spec: EvalSpec | None, base_metrics: list[dict[str, Any]], data_dir: str | Path | None, dev: torch.device,
    stage: Callable[[str], None], t_start: float,
) -> Report:
    """Exports and evaluation, once the checkpoint in ``out`` is complete: what follows can fail
    without costing the compression."""
    layers_path = report.model.get("layers_path", "model.layers")
    step = ""
    try:
        for fmt in export:
            step = f"export {fmt}"
            stage(f"exporting {fmt} to {out / fmt}")
            t0 = time.perf_counter()
            ex = get_export(fmt)
            ex.check_model(model, layers_path)
            with atomic_directory(out / fmt, overwrite=True) as tmp:
                ex.write(model, tokenizer, tmp, layers_path, model_source)
            report.timings[f"export_{fmt}"] = time.perf_counter() - t0
        if eval_spec:
            step = "evaluation"
            stage("evaluating")
            t0 = time.perf_counter()
            metrics = evaluate_baseline(model, tokenizer, eval_spec, data_dir, dev)
            report.metrics = with_baseline(metrics, base_metrics) if base_metrics else metrics
            report.timings["eval"] = time.perf_counter() - t0
    except (Exception, KeyboardInterrupt) as e:
        raise CompressError(_rerun_message(step, e, out, eval_spec)) from None
    report.timings["total"] = time.perf_counter() - t_start
    write_report(report.to_dict(), out)
    return report


def _rerun_message(step: str, e: BaseException, out: Path, eval_spec: EvalSpec | None) -> str:
    what = "interrupted" if isinstance(e, KeyboardInterrupt) else (str(e) if isinstance(e, CompressError) else f"{type(e).__name__}: {e}")
    rerun = (f"compress export {out} --format {step.split()[1]} --out {out / step.split()[1]} --overwrite" if step.startswith("export")
             else f"compress eval {out} {eval_spec.cli_args() if eval_spec else ''}".rstrip())
    return (f"{step} failed ({what.splitlines()[0] if what else type(e).__name__}); the compressed checkpoint "
            f"in {out} is complete; rerun only this step with: {rerun}")
