"""The public verbs: :func:`compress` (in memory), :func:`run` (load → compress → save),
:func:`load` and :func:`evaluate`."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .adapters import ModelAdapter, get_adapter
from .calib.data import CalibConfig, calibration_ids
from .errors import CompressError
from .models import count_parameters, load_model, resolve_device, weights_fingerprint
from .pipeline.sequential import run_sequential
from .recipe import Recipe, as_recipe
from .registry import get_pass
from .report import Report

logger = logging.getLogger(__name__)


def compress(
    model: nn.Module,
    recipe: Any,
    calib: torch.Tensor | CalibConfig | None = None,
    *,
    tokenizer: Any = None,
    adapter: ModelAdapter | None = None,
    device: str | torch.device | None = None,
    data_dir: str | Path | None = None,
    batch_size: int | None = None,
    on_layer: Callable[[int, int, float], None] | None = None,
) -> Report:
    """Compress ``model`` in place with ``recipe`` and return the :class:`Report`.

    ``recipe``: a :class:`Recipe`, a YAML path, a dict, or shorthand strings such as
    ``["svd-llm:ratio=0.2"]``. ``calib``: token ids (samples × seqlen), or a :class:`CalibConfig`
    (then ``tokenizer`` is needed), or None (the recipe's calibration block, else the defaults:
    C4, 32 × 512 tokens, seed 0) — used only when a pass needs calibration.
    """
    rec = as_recipe(recipe)
    adapter = adapter or get_adapter(model)
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    passes = [get_pass(p.name)(p.config) for p in rec.passes]
    timings: dict[str, float] = {}
    calib_info: dict[str, Any] | None = None
    ids: torch.Tensor | None = None
    if any(p.requires_calibration for p in passes):
        t0 = time.perf_counter()
        if isinstance(calib, torch.Tensor):
            ids = calib
            calib_info = {"source": "tensor", "samples": int(ids.shape[0]), "seqlen": int(ids.shape[1])}
        else:
            cfg = calib if isinstance(calib, CalibConfig) else CalibConfig.from_dict(rec.calibration)
            if tokenizer is None:
                raise CompressError("the recipe needs calibration data: pass token ids or a tokenizer")
            ids = calibration_ids(tokenizer, cfg, data_dir)
            calib_info = cfg.to_dict()
            batch_size = batch_size or cfg.batch_size
        timings["calibration_data"] = time.perf_counter() - t0
    params_before = count_parameters(model)
    t0 = time.perf_counter()
    result = run_sequential(model, adapter, passes, ids, device=dev, batch_size=batch_size or 8, on_layer=on_layer)
    timings["compress"] = time.perf_counter() - t0
    return Report(
        model={
            "model_type": getattr(getattr(model, "config", None), "model_type", None),
            "adapter": adapter.name,
            "layers_path": adapter.layers_path,
        },
        recipe=rec.to_dict(),
        calibration=calib_info,
        records=result.records,
        params_before=params_before,
        params_after=count_parameters(model),
        timings=timings,
        device=str(dev),
    )


def load(directory: str | Path, *, device: str | torch.device = "cpu", **kwargs: Any) -> tuple[nn.Module, Any]:
    """Load a compressed checkpoint (or any model :func:`load_model` reads) → (model, tokenizer)."""
    from .checkpoint import MANIFEST, load_checkpoint

    if (Path(directory) / MANIFEST).is_file():
        return load_checkpoint(directory, device=device, trust_remote_code=kwargs.get("trust_remote_code", False))
    model, tokenizer, _ = load_model(directory, device=device, **kwargs)
    return model, tokenizer


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    ppl: list[str] | tuple[str, ...] = ("wikitext2",),
    *,
    seqlen: int = 2048,
    max_windows: int | None = None,
    data_dir: str | Path | None = None,
    on_window: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Perplexity on each dataset in ``ppl``; each result carries its protocol."""
    from .eval.perplexity import perplexity

    out = []
    for name in ppl:
        r = perplexity(
            model, tokenizer, name, seqlen=seqlen, max_windows=max_windows, data_dir=data_dir, on_window=on_window
        )
        out.append({"name": f"ppl_{name}", **r})
    return out


def run(
    model_source: str | Path,
    recipe: Any,
    out: str | Path,
    *,
    calib: CalibConfig | None = None,
    dtype: str | None = "auto",
    device: str | None = "cpu",
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    export: tuple[str, ...] = (),
    ppl: tuple[str, ...] = (),
    ppl_seqlen: int = 2048,
    ppl_max_windows: int | None = None,
    on_layer: Callable[[int, int, float], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> Report:
    """Load a model, compress it, write the checkpoint (atomically) and its report; optionally
    export a dense copy and measure perplexity."""
    from .checkpoint import atomic_directory, export_dense, save_checkpoint
    from .export_gptq import check_gptq_exportable, export_gptq

    stage = on_stage or (lambda s: logger.info(s))
    rec = as_recipe(recipe)
    out = Path(out)
    if out.exists() and not overwrite:
        raise CompressError(f"output directory '{out}' exists; choose another --out or pass --overwrite")
    unknown_exports = set(export) - {"dense", "gptq"}
    if unknown_exports:
        raise CompressError(f"unknown export format(s) {', '.join(sorted(unknown_exports))}; available: dense, gptq")
    cfg = calib or CalibConfig.from_dict(rec.calibration)
    t_start = time.perf_counter()
    stage(f"loading {model_source}")
    t0 = time.perf_counter()
    model, tokenizer, info = load_model(
        model_source, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code, gguf_file=gguf_file
    )
    t_load = time.perf_counter() - t0
    info["fingerprint"] = weights_fingerprint(model)
    dev = resolve_device(device)
    stage("compressing")
    report = compress(model, rec, cfg, tokenizer=tokenizer, device=dev, data_dir=data_dir, on_layer=on_layer)
    report.model.update(info)
    report.timings = {"load": t_load, **report.timings}
    if ppl:
        model.to(dev)
        stage("evaluating perplexity")
        report.metrics = evaluate(
            model, tokenizer, ppl, seqlen=ppl_seqlen, max_windows=ppl_max_windows, data_dir=data_dir
        )
        report.timings["eval"] = sum(m["seconds"] for m in report.metrics)
        model.to("cpu")
    if "gptq" in export:
        check_gptq_exportable(model, report.model.get("layers_path", "model.layers"))  # refuse before writing
    stage(f"writing {out}")
    t0 = time.perf_counter()
    manifest = {
        "source": {k: info.get(k) for k in ("source", "gguf_file", "model_type", "fingerprint", "dtype")},
        "recipe": rec.to_dict(),
        "calibration": report.calibration,
        "modules": {r.name: {"pass": r.pass_name, "info": r.info} for r in report.records if r.params_after != r.params_before},
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_checkpoint(model, tokenizer, tmp, manifest, recipe_yaml=rec.to_yaml())
        if "dense" in export:
            export_dense(model, tokenizer, tmp / "dense")
        if "gptq" in export:
            export_gptq(model, tokenizer, tmp / "gptq", report.model.get("layers_path", "model.layers"))
        report.timings["save"] = time.perf_counter() - t0
        report.timings["total"] = time.perf_counter() - t_start
        report.write(tmp)
    return report
