"""Executing a plan on a model loaded whole: load (unless the plan already holds it), evaluate the
dense baseline when asked, compress, write the checkpoint atomically, then export and evaluate."""

from __future__ import annotations

import time
from typing import Callable

from ..checkpoint import save_checkpoint
from ..fsutil import atomic_directory, writing
from ..models import load_model, weights_fingerprint
from ..pipeline.state import OnLayer
from ..planning import RunPlan
from ..planning.checks import check_finite
from ..report import Report
from .engine import compress_model
from .finish import after_checkpoint, evaluate_baseline
from .manifest import manifest


def run_whole(plan: RunPlan, stage: Callable[[str], None], on_layer: OnLayer | None, t_start: float) -> Report:
    """Load, compress, write ``plan.out``; exports and evaluation after the checkpoint."""
    handle = plan.handle
    assert plan.out is not None and handle.source is not None
    t0 = time.perf_counter()
    if not handle.loaded:
        handle.close()  # the skeleton served the checks (and the plan checked that the model fits)
        stage(f"loading {handle.source}")
        handle.model, handle.tokenizer, handle.info = load_model(handle.source, device="cpu", **handle.load_kwargs)
        handle.loaded = True
        check_finite(handle.model)
    model, tokenizer = handle.model, handle.tokenizer
    t_load = time.perf_counter() - t0
    info = dict(handle.info)
    info["fingerprint"] = weights_fingerprint(model)
    base_metrics, t_base = [], None
    if plan.eval_spec and plan.baseline:
        stage("evaluating the dense baseline")
        t0 = time.perf_counter()
        base_metrics = evaluate_baseline(model, tokenizer, plan.eval_spec, plan.data_dir, plan.device)
        t_base = time.perf_counter() - t0
    stage("compressing")
    report = compress_model(plan, on_layer=on_layer)
    if not plan.is_main:
        return report
    man = manifest(report, info, plan.recipe, t_load, t_base)
    stage(f"writing {plan.out}")
    t0 = time.perf_counter()
    need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    then = "nothing was written (the compressed model is not kept): free space and rerun the same command, or stream it (--stream) to keep finished layers"
    with writing(plan.out, need, then), atomic_directory(plan.out, overwrite=plan.overwrite) as tmp:
        save_checkpoint(model, tokenizer, tmp, man, recipe_yaml=plan.recipe.to_yaml())
        report.timings["save"] = time.perf_counter() - t0
        report.write(tmp)
    return after_checkpoint(report, model, tokenizer, plan.out, handle.source, plan.exports, plan.eval_spec, base_metrics,
                            plan.data_dir, plan.device, stage, t_start)
