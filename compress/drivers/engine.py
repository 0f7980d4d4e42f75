"""Executing a plan on the model in memory: the layer loop over the plan's passes, and the report."""

from __future__ import annotations

import time
from typing import Any

from ..checkpoint import STRUCTURE_ATTR, model_structure
from ..models import count_parameters, storage_bytes
from ..modules.base import dense_cache
from ..passes.base import ModelPass
from ..pipeline.sequential import run_sequential
from ..pipeline.state import Engine, OnLayer, StatsProvider
from ..planning import RunPlan
from ..report import Report


def compress_model(plan: RunPlan, *, on_layer: OnLayer | None = None, stats_provider: StatsProvider | None = None,
                   stream: Any = None) -> Report:
    """Compress ``plan.model`` in place with the plan's passes and return the report (nothing is
    written). ``stream``: the layer stream of a streamed model (:class:`~compress.stream.LayerStream`)."""
    model, adapter = plan.model, plan.adapter
    engine = Engine(plan.device, plan.calib.batch_size, plan.dist, stats_provider, stream, on_layer)
    timings: dict[str, float] = {}
    params_before, bytes_before = count_parameters(model), storage_bytes(model)
    t0 = time.perf_counter()
    with dense_cache(model):  # propagation forwards re-run each compressed layer once per batch
        result = run_sequential(model, adapter, plan.steps, plan.calib_ids, engine, dict(plan.extra_ids))
    timings["compress"] = time.perf_counter() - t0
    structure = model_structure(model)
    for p in plan.passes:
        s = p.structure(model) if isinstance(p, ModelPass) else None
        if s is not None:
            structure[p.name] = s
    if structure and getattr(model, "config", None) is not None:
        setattr(model.config, STRUCTURE_ATTR, structure)
    report = Report(
        model={"model_type": getattr(getattr(model, "config", None), "model_type", None), "adapter": adapter.name,
               "layers_path": adapter.layers_path},
        recipe=plan.recipe.to_dict(),
        calibration=plan.calib_info,
        records=result.records,
        params_before=params_before,
        params_after=count_parameters(model),
        bytes_before=bytes_before,
        bytes_after=storage_bytes(model),
        timings=timings,
        device=str(plan.device),
        structure=structure,
        search={**plan.search.to_dict(), "lines": plan.search.lines(adapter.layers_path)} if plan.search is not None else None,
    )
    if plan.search is not None:
        timings.update({f"search_{k}": v for k, v in plan.search.seconds.items()})
    summary = report.summary()
    report.notes = [line for p in plan.passes for line in p.notes(summary)]
    return report
