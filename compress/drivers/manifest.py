"""The manifest of a checkpoint: the source, the recipe, the calibration and, per compressed module,
the chain of passes that changed it with what each recorded."""

from __future__ import annotations

from typing import Any

from ..recipe import Recipe
from ..report import Report


def module_chains(report: Report) -> dict[str, dict[str, Any]]:
    """Per compressed module: the passes that changed it, in order, with each one's info."""
    out: dict[str, dict[str, Any]] = {}
    for r in report.records:
        if r.module_type in ("Linear",) and r.bits_after == r.bits_before:
            continue
        entry = out.setdefault(r.name, {"chain": [], "info": {}})
        entry["chain"].append(r.pass_name)
        entry["info"][r.pass_name] = r.info
    return out


def manifest(report: Report, info: dict[str, Any], rec: Recipe, t_load: float, t_base: float | None) -> dict[str, Any]:
    """Complete the report with the source and load timings; the manifest of the checkpoint."""
    report.model.update(info)
    report.timings = {"load": t_load, **report.timings}
    if t_base is not None:
        report.timings["eval_baseline"] = t_base
    return {
        "source": {k: info.get(k) for k in ("source", "gguf_file", "model_type", "fingerprint", "dtype", "source_as_given")
                   if k != "source_as_given" or k in info},
        "recipe": rec.to_dict(),
        "calibration": report.calibration,
        "modules": module_chains(report),
    }
