"""The public verbs: :func:`compress` (in memory), :func:`run` (load → compress → save),
:func:`load` and :func:`evaluate`."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .adapters import ModelAdapter, get_adapter
from .calib.data import CalibConfig, calibration_ids
from .checkpoint import STRUCTURE_ATTR, model_structure
from .errors import CompressError
from .models import count_parameters, load_model, open_streamed, resolve_device, storage_bytes, weights_fingerprint
from .pipeline import distributed
from .modules.base import dense_cache
from .pipeline.sequential import run_sequential
from .recipe import as_recipe
from .registry import get_pass
from .report import Report
from .exports import check_exports, get_export
from .errors import CannotStream
from .stream import stream_blocker
from .validate import check_calibration, check_eval, check_finite, check_offload_dir, check_output_dir, check_passes

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
    stream: Any = None,
) -> Report:
    """Compress ``model`` in place with ``recipe`` and return the :class:`Report`.

    ``recipe``: a :class:`Recipe`, a YAML path, a dict, pass configs such as ``[GPTQConfig(bits=3)]``
    or shorthand strings such as ``["svd-llm:ratio=0.2"]``. ``calib``: token ids (samples × seqlen),
    or a :class:`CalibConfig` (then ``tokenizer`` is needed), or None (the recipe's calibration
    block, else the defaults of :class:`CalibConfig`) — used only when a pass needs calibration.
    Every pass option is checked against every target's shape, and the weights for NaN/Inf, before
    the first layer is touched.
    """
    rec = as_recipe(recipe)
    adapter = adapter or get_adapter(model)
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    passes = [get_pass(p.name)(p.config) for p in rec.passes]
    check_passes(model, adapter, rec, passes)
    if stream is None:  # a streamed model's checkpoint was scanned tensor by tensor instead
        check_finite(model)
    base = calib if isinstance(calib, CalibConfig) else CalibConfig.from_dict(rec.calibration)
    if isinstance(calib, torch.Tensor):
        base = CalibConfig(samples=int(calib.shape[0]), seqlen=int(calib.shape[1]), batch_size=batch_size or base.batch_size)
    batch_size = batch_size or base.batch_size
    d = distributed.current()
    if d is not None:
        distributed.check_passes(passes, d)
    timings: dict[str, float] = {}
    calib_info: dict[str, Any] | None = None
    ids: torch.Tensor | None = None
    if any(p.caps.requires_calibration and (stats_provider is None or p.caps.uses_layer_inputs) for p in passes):
        t0 = time.perf_counter()
        if isinstance(calib, torch.Tensor):
            ids = calib
            calib_info = {"source": "tensor", "samples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "batch_size": batch_size}
        else:
            if tokenizer is None:
                raise CompressError("the recipe needs calibration data: pass token ids or a tokenizer")
            ids = calibration_ids(tokenizer, base, data_dir)
            calib_info = base.to_dict()
        timings["calibration_data"] = time.perf_counter() - t0
    extra_ids: dict[str, torch.Tensor] = {}
    for src in sorted({p.caps.calib_source for p in passes} - {None}):  # type: ignore[type-var]
        if tokenizer is None:
            raise CompressError(f"a pass calibrates on '{src}': pass the tokenizer to compress() so its text can be tokenized")
        cfg_src = dataclasses.replace(base, source=src)
        extra_ids[src] = calibration_ids(tokenizer, cfg_src, data_dir)
        calib_info = {**(calib_info or {}), f"source:{src}": cfg_src.to_dict()}
    if d is not None:  # each rank calibrates on its share of the batches
        ids = distributed.shard_batches(ids, batch_size, d) if ids is not None else None
        extra_ids = {k: distributed.shard_batches(v, batch_size, d) for k, v in extra_ids.items()}
        if calib_info is not None:
            calib_info = {**calib_info, "processes": d.world}
    params_before, bytes_before = count_parameters(model), storage_bytes(model)
    t0 = time.perf_counter()
    with dense_cache(model):  # propagation forwards re-run each compressed layer once per batch
        result = run_sequential(
            model, adapter, passes, ids, device=dev, batch_size=batch_size, on_layer=on_layer, stats_provider=stats_provider,
            extra_ids=extra_ids, stream=stream,
        )
    timings["compress"] = time.perf_counter() - t0
    structure = model_structure(model)
    for p in passes:
        s = p.structure(model)
        if s is not None:
            structure[p.name] = s
    if structure and getattr(model, "config", None) is not None:
        setattr(model.config, STRUCTURE_ATTR, structure)
    report = Report(
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
        bytes_before=bytes_before,
        bytes_after=storage_bytes(model),
        timings=timings,
        device=str(dev),
        structure=structure,
    )
    summary = report.summary()
    report.notes = [line for p in passes for line in p.notes(summary)]
    return report


def load(directory: str | Path, *, device: str | torch.device = "cpu", **kwargs: Any) -> tuple[nn.Module, Any]:
    """Load a compressed checkpoint (or any model :func:`load_model` reads) → (model, tokenizer)."""
    from .checkpoint import load_checkpoint
    from .hf_format import is_compress_checkpoint

    if is_compress_checkpoint(directory):
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

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise CompressError(f"--batch-size must be a positive integer, got {self.batch_size}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise CompressError(f"--num-fewshot must be 0 or more, got {self.num_fewshot}")
        if self.limit is not None and self.limit <= 0:
            raise CompressError(f"--limit must be positive (a count, or a fraction below 1), got {self.limit}")

    def __bool__(self) -> bool:
        return bool(self.ppl or self.tasks)

    def cli_args(self) -> str:
        """The ``compress eval`` options that measure the same thing."""
        parts = [f"--ppl {p}" for p in self.ppl]
        if self.ppl:
            parts.append(f"--ppl-seqlen {self.ppl_seqlen}")
            if self.max_windows is not None:
                parts.append(f"--max-windows {self.max_windows}")
        if self.tasks:
            parts.append(f"--tasks {','.join(self.tasks)}")
            for flag, v in (("--limit", self.limit), ("--num-fewshot", self.num_fewshot), ("--tasks-dir", self.tasks_dir)):
                if v is not None:
                    parts.append(f"{flag} {v}")
            parts.append(f"--batch-size {self.batch_size}")
        return " ".join(parts)

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
    spec = spec or EvalSpec(**{k: tuple(v) if k in ("ppl", "tasks") else v for k, v in kwargs.items()})
    with dense_cache(model):  # every window and task request re-runs each layer; dropped on return
        return _evaluate(model, tokenizer, spec, data_dir, lm_factory, on_window)


def _evaluate(model: nn.Module, tokenizer: Any, spec: EvalSpec, data_dir: str | Path | None, lm_factory: Any,
              on_window: Callable[[int, int], None] | None) -> list[dict[str, Any]]:
    from .eval.perplexity import perplexity

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
    stream: str = "auto",
    restart: bool = False,
    offload_dir: str | Path | None = None,
) -> Report:
    """Load a model, compress it, write the checkpoint (atomically), then export other formats and
    evaluate (with ``baseline``, the dense model too, before compressing).

    Every option that can fail is checked before the first layer is compressed: the recipe (before
    loading), the output directory, the export formats against the recipe's modules, the
    evaluation options and their data, the calibration source; then, once the model is loaded, the
    evaluation against the model and every pass against every target's shape. The checkpoint is
    written as soon as compression ends; a failing export or evaluation leaves it complete and says
    how to rerun only that step.

    ``stream``: ``auto`` reads the model one decoder layer at a time from its checkpoint, writes
    each finished layer to ``OUT.partial/`` and resumes from there when rerun (see
    :mod:`compress.stream`), unless a pass needs the whole model (then it is loaded whole); ``on``
    insists on streaming, ``off`` loads the whole model. ``restart`` discards ``OUT.partial/``.
    ``offload_dir`` keeps the calibration activations in memory-mapped files there.
    """
    from .checkpoint import atomic_directory, save_checkpoint

    stage = on_stage or (lambda s: logger.info(s))
    rec = as_recipe(recipe)
    out = Path(out)
    check_output_dir(out, overwrite)
    check_exports(export, rec.passes)
    cfg = calib or CalibConfig.from_dict(rec.calibration)
    if eval_spec:
        check_eval(eval_spec, data_dir)
    check_calibration(rec, cfg, data_dir)
    if stream not in ("auto", "on", "off"):
        raise CompressError(f"stream must be auto, on or off (the CLI's --stream/--no-stream), got '{stream}'")
    blocker = stream_blocker([get_pass(p.name)(p.config) for p in rec.passes])
    if stream == "on" and blocker:
        raise CompressError(f"--stream is not possible: {blocker}; run without --stream (the model is then loaded whole)")
    if offload_dir is not None:
        check_offload_dir(Path(offload_dir))
        if blocker or stream == "off":
            raise CompressError(f"--offload-dir needs a streamed run, and {blocker or 'this run loads the model whole (--no-stream)'}; drop --offload-dir")
    t_start = time.perf_counter()
    d, dev_rank = distributed.init(resolve_device(device))
    if d is not None:
        device = str(dev_rank)
        if not d.is_main:  # rank 0 reports, writes and evaluates
            stage, on_layer, export, eval_spec = (lambda s: None), None, (), None
    if stream != "off" and blocker is None:
        try:
            streamed = open_streamed(model_source, dtype=dtype, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
        except CompressError as e:
            if stream == "on" or not isinstance(e, CannotStream):
                raise
            blocker = f"the checkpoint cannot be streamed: {str(e).split(';')[0]}"
            stage(f"{blocker}; loading it whole")
        else:
            return _run_streamed(
                streamed, model_source, rec, out, cfg, device=device, data_dir=data_dir, overwrite=overwrite, export=export,
                eval_spec=eval_spec, baseline=baseline, on_layer=on_layer, stage=stage, restart=restart,
                offload_dir=Path(offload_dir) if offload_dir is not None else None, t_start=t_start,
                load_kwargs={"dtype": dtype, "trust_remote_code": trust_remote_code, "gguf_file": gguf_file},
            )
    _check_fits(model_source, dtype, blocker or "--no-stream was given")
    stage(f"loading {model_source}")
    t0 = time.perf_counter()
    model, tokenizer, info = load_model(
        model_source, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code, gguf_file=gguf_file
    )
    t_load = time.perf_counter() - t0
    if eval_spec:
        check_eval(eval_spec, data_dir, model.config)
    info["fingerprint"] = weights_fingerprint(model)
    dev = resolve_device(device)
    base_metrics: list[dict[str, Any]] = []
    t_base = 0.0
    if eval_spec and baseline:
        check_passes(model, get_adapter(model), rec, [get_pass(p.name)(p.config) for p in rec.passes])  # refuse before the baseline's time
        stage("evaluating the dense baseline")
        t0 = time.perf_counter()
        model.to(dev)
        base_metrics = evaluate(model, tokenizer, eval_spec, data_dir=data_dir)
        model.to("cpu")
        t_base = time.perf_counter() - t0
    stage("compressing")
    report = compress(model, rec, cfg, tokenizer=tokenizer, device=dev, data_dir=data_dir, on_layer=on_layer)
    if d is not None and not d.is_main:
        return report
    manifest = _manifest(report, info, rec, t_load, t_base if base_metrics else None)
    stage(f"writing {out}")
    t0 = time.perf_counter()
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_checkpoint(model, tokenizer, tmp, manifest, recipe_yaml=rec.to_yaml())
        report.timings["save"] = time.perf_counter() - t0
        report.write(tmp)
    return _after_checkpoint(report, model, tokenizer, out, model_source, export, eval_spec, base_metrics, data_dir, dev, stage, t_start)


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_fits(model_source: str | Path, dtype: str | None, why: str) -> None:
    """Refuse, before loading, a model loaded whole that cannot fit in the memory available now
    (estimated from its local weight files and the compute dtype)."""
    from .models import parse_dtype

    from .sources import weight_files

    path = Path(str(model_source)).expanduser()
    files = weight_files(path) if path.is_dir() else []
    avail = _available_memory()
    if not files or avail is None:
        return
    from .sources import SafetensorsSource

    dt = parse_dtype(dtype)
    need = sum(f.stat().st_size for f in files if f.suffix == ".bin")
    st = [f for f in files if f.suffix == ".safetensors"]
    if st:
        src = SafetensorsSource(st)
        for n in src.names():
            t = torch.empty(0, dtype=src.dtype(n))
            size = dt.itemsize if isinstance(dt, torch.dtype) and t.is_floating_point() else t.element_size()
            need += size * int(torch.Size(src.shape(n)).numel())
    if need > avail:
        if why.startswith("--baseline"):
            raise CompressError(
                f"--baseline evaluates the dense model loaded whole, which needs about {need / 1024**3:.1f} GiB of the "
                f"{avail / 1024**3:.1f} GiB available; drop --baseline and evaluate the source model on a larger machine"
            )
        fix = "drop --no-stream (every pass of this recipe works layer by layer)" if why.startswith("--no-stream") else (
            "use a machine with more memory" if why.startswith("the checkpoint") else
            "use a machine with more memory, or a recipe whose passes work layer by layer (then the model is streamed)")
        raise CompressError(
            f"the whole model must be loaded ({why}), but its weights need about {need / 1024**3:.1f} GiB and "
            f"{avail / 1024**3:.1f} GiB of memory are available; {fix}"
        )


def _run_streamed(
    streamed: Any, model_source: str | Path, rec: Any, out: Path, cfg: CalibConfig, *, device: str | None, data_dir: str | Path | None,
    overwrite: bool, export: tuple[str, ...], eval_spec: EvalSpec | None, baseline: bool, on_layer: Callable[[int, int, float], None] | None,
    stage: Callable[[str], None], restart: bool, offload_dir: Path | None, t_start: float, load_kwargs: dict[str, Any],
) -> Report:
    """:func:`run` on a model read layer by layer from its checkpoint, resumable (see :mod:`compress.stream`)."""
    from .sources import scan
    from .stream import Progress
    from .version import __version__

    sm, tokenizer, info = streamed
    model = sm.model
    if eval_spec:
        check_eval(eval_spec, data_dir, model.config)
    adapter = get_adapter(model)
    passes = [get_pass(p.name)(p.config) for p in rec.passes]
    check_passes(model, adapter, rec, passes)  # shapes only: refuse before reading the weights
    n_layers = len(adapter.layers(model))
    dtype = getattr(torch, info["dtype"])
    t0 = time.perf_counter()
    stage(f"reading {model_source} once (NaN/Inf check and fingerprint)")
    try:
        info["fingerprint"] = scan(sm.source)
    except BaseException:
        sm.source.close()
        raise
    import hashlib

    import transformers

    fingerprint = {
        "weights": info["fingerprint"], "recipe": rec.to_dict(), "calibration": cfg.to_dict(), "dtype": info["dtype"], "library": __version__,
        "config": hashlib.blake2b(model.config.to_json_string(use_diff=False).encode(), digest_size=8).hexdigest(),
        "transformers": transformers.__version__,
    }
    d = distributed.current()
    if d is not None:
        fingerprint["processes"] = d.world
    progress = Progress(out, fingerprint, restart=restart, dist=d)
    try:
        return _compress_streamed(
            sm, tokenizer, info, progress, model_source, rec, out, cfg, passes, adapter, n_layers, dtype, d, t0, device=device,
            data_dir=data_dir, overwrite=overwrite, export=export, eval_spec=eval_spec, baseline=baseline, on_layer=on_layer, stage=stage,
            offload_dir=offload_dir, t_start=t_start, load_kwargs=load_kwargs,
        )
    except BaseException:
        if progress.done == 0 and progress.is_main:
            progress.remove()  # nothing finished: nothing to resume, leave no directory behind
        raise
    finally:
        progress.release()


def _compress_streamed(
    sm: Any, tokenizer: Any, info: dict[str, Any], progress: Any, model_source: str | Path, rec: Any, out: Path, cfg: CalibConfig,
    passes: list[Any], adapter: ModelAdapter, n_layers: int, dtype: torch.dtype, d: Any, t0: float, *, device: str | None,
    data_dir: str | Path | None, overwrite: bool, export: tuple[str, ...], eval_spec: EvalSpec | None, baseline: bool,
    on_layer: Callable[[int, int, float], None] | None, stage: Callable[[str], None], offload_dir: Path | None, t_start: float,
    load_kwargs: dict[str, Any],
) -> Report:
    from .checkpoint import atomic_directory, load_checkpoint, write_config_and_tokenizer, write_manifest
    from .stream import LayerStream, write_streamed_weights

    model = sm.model
    sm.load_outside()
    t_load = time.perf_counter() - t0
    stage(_memory_plan(sm, adapter, model, cfg, passes, dtype, n_layers, offload_dir))
    if progress.done:
        stage(f"resuming at layer {progress.done + 1} of {n_layers} from {progress.dir}")
    dev = resolve_device(device)
    base_metrics: list[dict[str, Any]] = []
    t_base = 0.0
    if eval_spec and baseline:
        _check_fits(model_source, load_kwargs.get("dtype"), "--baseline evaluates the dense model")
        stage("evaluating the dense baseline (loaded whole)")
        t0 = time.perf_counter()
        dense, _, _ = load_model(model_source, device=dev, **load_kwargs)
        base_metrics = evaluate(dense, tokenizer, eval_spec, data_dir=data_dir)
        del dense
        t_base = time.perf_counter() - t0
    stage("compressing (streamed)")
    layer_stream = LayerStream(sm, progress, dtype, offload_dir)
    try:
        report = compress(model, rec, cfg, tokenizer=tokenizer, device=dev, data_dir=data_dir, on_layer=on_layer, stream=layer_stream)
    except KeyboardInterrupt:
        sm.source.close()
        if progress.done == 0:
            raise CompressError("interrupted before the first layer was finished: nothing was written; rerun the same command") from None
        raise CompressError(
            f"interrupted at layer {progress.done + 1} of {n_layers}; the {progress.done} finished layers are kept in '{progress.dir}': "
            "rerun the same command to resume"
        ) from None
    except BaseException:
        sm.source.close()
        raise
    if d is not None and not d.is_main:
        sm.source.close()
        return report
    report.model["streamed"] = True
    manifest = _manifest(report, info, rec, t_load, t_base if base_metrics else None)
    stage(f"writing {out}")
    t0 = time.perf_counter()
    try:
        sm.load_outside()  # dropped after the layer-0 inputs were captured
    finally:
        sm.source.close()
    try:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            write_config_and_tokenizer(model, tokenizer, tmp)
            files, aliases = write_streamed_weights(model, adapter.layers_path, progress, n_layers, tmp)
            write_manifest(model, tmp, manifest, files, aliases, rec.to_yaml())
            report.timings["save"] = time.perf_counter() - t0
            report.write(tmp)
    except OSError as e:
        raise CompressError(
            f"cannot write {out} ({e.strerror or e}); every layer is kept in '{progress.dir}': "
            "free space and rerun the same command to write the checkpoint"
        ) from None
    progress.remove()
    if export or eval_spec:
        stage(f"loading {out} for {'export' if export else 'evaluation'}")
        model, tokenizer = load_checkpoint(out)
    return _after_checkpoint(report, model, tokenizer, out, model_source, export, eval_spec, base_metrics, data_dir, dev, stage, t_start)


def _memory_plan(
    sm: Any, adapter: ModelAdapter, model: nn.Module, cfg: CalibConfig, passes: list[Any], dtype: torch.dtype, n_layers: int,
    offload_dir: Path | None,
) -> str:
    """One line: the calibration activations' size and the estimated peak memory of a streamed run."""
    esize = torch.empty((), dtype=dtype).element_size()
    hidden = int(getattr(model.config, "hidden_size", 0) or 0)
    needs = any(p.caps.requires_calibration for p in passes)
    acts = cfg.samples * cfg.seqlen * hidden * esize if needs else 0
    layer_bytes = max(sm.bytes_of(f"{adapter.layers_path}.{i}.") for i in range(n_layers))
    outside = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
    stats = 0
    if needs:  # the largest sub-group's float64 Gram matrices (one per linear)
        layer = adapter.layers(model)[0]
        from .pipeline.capture import linear_shape

        stats = max(sum(linear_shape(layer.get_submodule(n))[1] ** 2 * 8 for n in g) for g in adapter.groups(layer))
    peak = outside + 2 * layer_bytes + (0 if offload_dir else 2 * acts) + stats
    where = f"memory-mapped in {offload_dir}" if offload_dir else "in memory"
    return (f"streaming {n_layers} layers of {layer_bytes / 1024**3:.2f} GiB; calibration activations {acts / 1024**3:.2f} GiB {where}; "
            f"estimated peak memory {peak / 1024**3:.1f} GiB")


def _manifest(report: Report, info: dict[str, Any], rec: Any, t_load: float, t_base: float | None) -> dict[str, Any]:
    """Complete the report with the source and load timings; the manifest of the checkpoint."""
    report.model.update(info)
    report.timings = {"load": t_load, **report.timings}
    if t_base is not None:
        report.timings["eval_baseline"] = t_base
    return {
        "source": {k: info.get(k) for k in ("source", "gguf_file", "model_type", "fingerprint", "dtype")},
        "recipe": rec.to_dict(),
        "calibration": report.calibration,
        "modules": _module_chains(report),
    }


def _after_checkpoint(
    report: Report, model: nn.Module, tokenizer: Any, out: Path, model_source: str | Path, export: tuple[str, ...],
    eval_spec: EvalSpec | None, base_metrics: list[dict[str, Any]], data_dir: str | Path | None, dev: torch.device,
    stage: Callable[[str], None], t_start: float,
) -> Report:
    """Exports and evaluation, once the checkpoint in ``out`` is complete: what follows can fail
    without costing the compression."""
    from .checkpoint import atomic_directory
    from .report import write_report

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
                ex.write(model, tokenizer, tmp, layers_path, str(model_source))
            report.timings[f"export_{fmt}"] = time.perf_counter() - t0
        if eval_spec:
            step = "evaluation"
            model.to(dev)
            stage("evaluating")
            t0 = time.perf_counter()
            metrics = evaluate(model, tokenizer, eval_spec, data_dir=data_dir)
            report.metrics = with_baseline(metrics, base_metrics) if base_metrics else metrics
            report.timings["eval"] = time.perf_counter() - t0
            model.to("cpu")
    except (Exception, KeyboardInterrupt) as e:
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else (str(e) if isinstance(e, CompressError) else f"{type(e).__name__}: {e}")
        rerun = (f"compress export {out} --format {step.split()[1]} --out {out / step.split()[1]} --overwrite" if step.startswith("export")
                 else f"compress eval {out} {eval_spec.cli_args() if eval_spec else ''}".rstrip())
        raise CompressError(f"{step} failed ({what.splitlines()[0] if what else type(e).__name__}); the compressed checkpoint "
                            f"in {out} is complete; rerun only this step with: {rerun}") from None
    report.timings["total"] = time.perf_counter() - t_start
    write_report(report.to_dict(), out)
    return report
