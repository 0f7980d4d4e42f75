"""The public verbs: :func:`compress` (in memory), :func:`run` (load → compress → save),
:func:`load` and :func:`evaluate`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .adapters import ModelAdapter, get_adapter
from .calib.data import CalibConfig, calibration_ids
from .errors import CompressError
from .models import count_parameters, load_model, resolve_device, storage_bytes, weights_fingerprint
from .pipeline.sequential import run_sequential
from .recipe import as_recipe
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
    stats_provider: Any = None,
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
    if any(p.requires_calibration and (stats_provider is None or p.uses_layer_inputs) for p in passes):
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
    params_before, bytes_before = count_parameters(model), storage_bytes(model)
    t0 = time.perf_counter()
    extra_ids: dict[str, torch.Tensor] = {}
    for src in {getattr(p, "calib_source", None) for p in passes} - {None}:
        if tokenizer is None:
            raise CompressError(f"a pass calibrates on '{src}': pass the tokenizer to compress() so its text can be tokenized")
        base = calib if isinstance(calib, CalibConfig) else CalibConfig.from_dict(rec.calibration)
        if isinstance(calib, torch.Tensor):
            base = CalibConfig(samples=int(calib.shape[0]), seqlen=int(calib.shape[1]))
        cfg_src = CalibConfig(source=src, samples=base.samples, seqlen=base.seqlen, seed=base.seed, batch_size=base.batch_size)
        extra_ids[src] = calibration_ids(tokenizer, cfg_src, data_dir)
        calib_info = {**(calib_info or {}), f"source:{src}": cfg_src.to_dict()}
    # consecutive per-linear passes run together layer by layer; a model-level pass runs on its own
    records = []
    segment: list[Any] = []
    for p in passes + [None]:
        if p is not None and p.granularity == "linear":
            segment.append(p)
            continue
        if segment:
            result = run_sequential(
                model, adapter, segment, ids, device=dev, batch_size=batch_size or 8, on_layer=on_layer,
                stats_provider=stats_provider, extra_ids=extra_ids,
            )
            records += result.records
            segment = []
        if p is not None:
            if ids is None:
                raise CompressError(f"pass '{p.name}' needs calibration data")
            records += p.run_model(model, adapter, ids, device=dev, batch_size=batch_size or 8, on_layer=on_layer)
    timings["compress"] = time.perf_counter() - t0
    return Report(
        model={
            "model_type": getattr(getattr(model, "config", None), "model_type", None),
            "adapter": adapter.name,
            "layers_path": adapter.layers_path,
        },
        recipe=rec.to_dict(),
        calibration=calib_info,
        records=records,
        params_before=params_before,
        params_after=count_parameters(model),
        bytes_before=bytes_before,
        bytes_after=storage_bytes(model),
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


@dataclass
class EvalSpec:
    """What to measure after compression: perplexity datasets and lm-eval tasks, with their settings."""

    ppl: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    ppl_seqlen: int = 2048
    max_windows: int | None = None
    limit: float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    tasks_dir: str | None = None

    def __bool__(self) -> bool:
        return bool(self.ppl or self.tasks)

    @classmethod
    def parse(cls, text: str) -> "EvalSpec":
        """``"tasks=arc_easy,piqa;ppl=wikitext2;limit=200"`` → EvalSpec."""
        fields: dict[str, Any] = {}
        try:
            return cls(**cls._fields_of(text, fields))
        except ValueError as e:
            raise CompressError(f"invalid --eval value: {e}") from None

    @staticmethod
    def _fields_of(text: str, fields: dict[str, Any]) -> dict[str, Any]:
        for part in filter(None, (p.strip() for p in text.split(";"))):
            key, eq, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if not eq:
                raise CompressError(f"--eval item '{part}' is not key=value (example: \"tasks=arc_easy,piqa;ppl=wikitext2\")")
            if key in ("ppl", "tasks"):
                fields[key] = tuple(v.strip() for v in value.split(",") if v.strip())
            elif key in ("ppl_seqlen", "max_windows", "num_fewshot", "batch_size"):
                fields[key] = int(value)
            elif key == "limit":
                fields[key] = float(value) if "." in value else int(value)
            elif key == "tasks_dir":
                fields[key] = value
            else:
                raise CompressError(
                    f"unknown --eval key '{key}'; use ppl, tasks, limit, num_fewshot, batch_size, ppl_seqlen, max_windows, tasks_dir"
                )
        return fields


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
    from .eval.perplexity import perplexity

    spec = spec or EvalSpec(**{k: tuple(v) if k in ("ppl", "tasks") else v for k, v in kwargs.items()})
    out: list[dict[str, Any]] = []
    for name in spec.ppl:
        r = perplexity(
            model, tokenizer, name, seqlen=spec.ppl_seqlen, max_windows=spec.max_windows, data_dir=data_dir, on_window=on_window
        )
        out.append({"name": f"ppl_{name}", **r})
    if spec.tasks:
        from .eval.harness import run_tasks

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


def _module_chains(report: Report) -> dict[str, dict[str, Any]]:
    """Per compressed module: the passes that changed it, in order, with each one's info."""
    out: dict[str, dict[str, Any]] = {}
    for r in report.records:
        if r.module_type in ("Linear",) and r.bits_after == r.bits_before:
            continue
        entry = out.setdefault(r.name, {"chain": [], "info": {}})
        entry["chain"].append(r.pass_name)
        entry["info"][r.pass_name] = r.info
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
    eval_spec: EvalSpec | None = None,
    baseline: bool = False,
    on_layer: Callable[[int, int, float], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> Report:
    """Load a model, compress it, write the checkpoint (atomically) and its report; optionally
    export other formats and evaluate (with ``baseline``, the dense model too, in the same run)."""
    from .checkpoint import atomic_directory, export_dense, save_checkpoint
    from .export_gptq import check_gptq_exportable, export_gptq

    stage = on_stage or (lambda s: logger.info(s))
    rec = as_recipe(recipe)
    out = Path(out)
    if out.exists() and not overwrite:
        raise CompressError(f"output directory '{out}' exists; choose another --out or pass --overwrite")
    unknown_exports = set(export) - {"dense", "gptq", "peft"}
    if unknown_exports:
        raise CompressError(f"unknown export format(s) {', '.join(sorted(unknown_exports))}; available: dense, gptq, peft")
    if "dense" in export:
        blocked = [p.name for p in rec.passes if not get_pass(p.name).dense_exportable]
        if blocked:
            raise CompressError(
                f"--export dense is not possible after {', '.join(blocked)}: the sliced model has residual shortcut matrices "
                "that plain transformers cannot express; load the output with compress.load(dir)"
            )
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
    if eval_spec and eval_spec.tasks:
        from .eval.harness import require_lm_eval

        require_lm_eval()  # fail before the long compression
    base_metrics: list[dict[str, Any]] = []
    t_base = 0.0
    if eval_spec and baseline:
        stage("evaluating the dense baseline")
        t0 = time.perf_counter()
        model.to(dev)
        base_metrics = evaluate(model, tokenizer, eval_spec, data_dir=data_dir)
        model.to("cpu")
        t_base = time.perf_counter() - t0
    stage("compressing")
    report = compress(model, rec, cfg, tokenizer=tokenizer, device=dev, data_dir=data_dir, on_layer=on_layer)
    report.model.update(info)
    report.timings = {"load": t_load, **report.timings}
    if base_metrics:
        report.timings["eval_baseline"] = t_base
    if eval_spec:
        model.to(dev)
        stage("evaluating")
        t0 = time.perf_counter()
        metrics = evaluate(model, tokenizer, eval_spec, data_dir=data_dir)
        report.metrics = with_baseline(metrics, base_metrics) if base_metrics else metrics
        report.timings["eval"] = time.perf_counter() - t0
        model.to("cpu")
    if "gptq" in export:
        check_gptq_exportable(model, report.model.get("layers_path", "model.layers"))  # refuse before writing
    stage(f"writing {out}")
    t0 = time.perf_counter()
    manifest = {
        "source": {k: info.get(k) for k in ("source", "gguf_file", "model_type", "fingerprint", "dtype")},
        "recipe": rec.to_dict(),
        "calibration": report.calibration,
        "modules": _module_chains(report),
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_checkpoint(model, tokenizer, tmp, manifest, recipe_yaml=rec.to_yaml())
        if "dense" in export:
            export_dense(model, tokenizer, tmp / "dense")
        if "gptq" in export:
            export_gptq(model, tokenizer, tmp / "gptq", report.model.get("layers_path", "model.layers"))
        if "peft" in export:
            from .export_peft import export_peft

            export_peft(model, tmp / "peft", str(model_source))
        report.timings["save"] = time.perf_counter() - t0
        report.timings["total"] = time.perf_counter() - t_start
        report.write(tmp)
    return report
