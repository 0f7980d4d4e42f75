"""``plan()``: every decision and every check of a run, once, before any compute.

In order: the recipe (its pass objects built once, their order checked before anything is opened),
the output directory and the export formats, the evaluation options and their data, the calibration
settings and their corpus (read once), the streaming decision; then the model is opened (a skeleton on
the meta device when its checkpoint allows, so that a model too large for memory is planned without
loading it), the evaluation is checked against its config, every pass against every target's shape
(:mod:`compress.planning.targets`), and the calibration text is tokenized. No check has a side effect on
the passes; what they need to know at run time is in their :class:`~compress.passes.base.PassPlan`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..adapters import get_adapter
from ..adapters.base import ModelAdapter
from ..calib.data import CalibConfig, calibration_ids, load_documents
from ..errors import CannotStream, CompressError
from ..evalspec import EvalSpec
from ..exports import check_exports, check_opened
from ..models import load_model, open_streamed, resolve_device
from ..passes.base import ModelPass, Pass
from ..pipeline import distributed
from ..recipe import Recipe, as_recipe
from .checks import check_calib_length, check_eval, check_finite, check_offload_dir, check_output_dir
from .cost import announce as announce_cost
from .memory import check_fits, streamed_estimate
from .model import ModelHandle, RunPlan
from .order import check_order
from .targets import plan_targets

STREAM_CHOICES = ("auto", "on", "off")


def stream_blocker(passes: Sequence[Pass[Any]]) -> str | None:
    """Why this recipe needs the whole model in memory (the first pass that does), or None."""
    for p in passes:
        if isinstance(p, ModelPass):
            return f"{p.name} {p.whole_model_reason}"
        if p.caps.reads_all_weights:
            return f"{p.name} reads every layer's weights before its first layer"
        if p.caps.profile:
            return f"{p.name} with these options reads every layer's statistics before its first layer"
    return None


def plan(
    model: str | Path | nn.Module,
    recipe: Any,
    out: str | Path | None = None,
    *,
    calib: CalibConfig | Mapping[str, Any] | torch.Tensor | None = None,
    tokenizer: Any = None,
    adapter: ModelAdapter | None = None,
    eval_spec: EvalSpec | None = None,
    baseline: bool = False,
    export: Sequence[str] = (),
    device: str | torch.device | None = None,
    dtype: str | None = "auto",
    stream: str = "auto",
    restart: bool = False,
    offload_dir: str | Path | None = None,
    overwrite: bool = False,
    data_dir: str | Path | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    batch_size: int | None = None,
    precomputed_stats: bool = False,
    budget: Any = None,
    search: str | None = None,
) -> RunPlan:
    """Plan a run of ``recipe`` on ``model`` (a hub ID, a local directory, a GGUF directory, or a model
    in memory) and check everything that can fail, before any compute.

    ``recipe``: a :class:`~compress.recipe.Recipe`, a YAML path, a dict, pass configs or shorthand
    strings. ``calib``: a :class:`CalibConfig` (replaces the recipe's calibration block), a mapping of
    settings that override the recipe's block (the CLI's flags), or token ids (samples × seqlen).
    ``out``: the output directory of a run that writes a checkpoint (None: in memory). ``precomputed_stats``:
    the statistics come from a provider (a sweep): only passes reading the layer inputs need forwards.
    ``budget`` (``"bits=3.0"``, ``"size=0.5"``, ``"params=0.75"``; then ``recipe`` is None): the recipe is chosen per target by the search among the
    ``search`` candidates (:mod:`compress.planning.searched`)."""
    rec, found = _search(model, recipe, out, budget, search, calib, batch_size, overwrite, eval_spec, data_dir, tokenizer,
                         device, dtype, gguf_file, trust_remote_code)
    passes = [spec.build() for spec in rec.passes]  # the only place a run builds its passes
    check_order(passes)
    cfg = _calib_config(calib, rec, batch_size)
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        check_output_dir(out_path, overwrite, keep=(model,))
    check_exports(tuple(export), passes)
    if eval_spec:
        check_eval(eval_spec, data_dir)
    needs_ids = any(p.caps.requires_calibration and (not precomputed_stats or p.caps.uses_layer_inputs) for p in passes)
    docs = _read_corpora(passes, cfg, calib, data_dir, needs_ids)
    streamed_ok, note = _stream_decision(passes, stream, offload_dir, model)
    dist, dev = _process_group(model, device)
    handle = _open(model, tokenizer, streamed_ok, stream, dtype, trust_remote_code, gguf_file, note)
    note = note or handle.info.pop("stream_note", None)
    if handle.streamed is None and offload_dir is not None:
        raise CompressError(f"--offload-dir needs a streamed run, and {note}; drop --offload-dir")
    try:
        adapter = adapter or get_adapter(handle.model)
        _check_lengths(handle.model, eval_spec, data_dir, cfg, needs_ids and calib is not None and not isinstance(calib, torch.Tensor))
        check_opened(tuple(export), handle.model, handle.tokenizer or tokenizer, str(model) if isinstance(model, (str, Path)) else "")
        pass_plans, targets = plan_targets(handle.model, adapter, passes)
        announce_cost(passes, targets, cfg.samples * cfg.seqlen)
        if dist is not None:
            distributed.check_passes(passes, dist)
        ids, extra, info = _tokenize(passes, cfg, calib, docs, handle.tokenizer or tokenizer, data_dir, needs_ids, dist)
        memory = _memory(handle, adapter, cfg, passes, offload_dir)
        streaming = handle.streamed is not None and streamed_ok
        if handle.source is not None and not handle.loaded and not streaming:
            check_fits(handle.source, dtype, note or "--no-stream was given")
        if handle.source is not None and streaming and eval_spec and baseline:
            check_fits(handle.source, dtype, "--baseline evaluates the dense model")
    except BaseException:
        handle.close()
        raise
    main = dist is None or dist.is_main  # rank 0 reports, writes, exports and evaluates
    return RunPlan(
        recipe=rec, passes=tuple(passes), pass_plans=tuple(pass_plans), targets=tuple(targets), handle=handle, adapter=adapter,
        calib=cfg, calib_ids=ids, extra_ids=extra, calib_info=info, device=dev, eval_spec=eval_spec if main else None,
        baseline=baseline and main, out=out_path, overwrite=overwrite, exports=tuple(export) if main else (), data_dir=data_dir,
        stream=streaming, stream_note=note, restart=restart,
        offload_dir=Path(offload_dir) if offload_dir is not None else None, memory=memory, dist=dist, search=found,
    )


def _check_lengths(model: Any, eval_spec: EvalSpec | None, data_dir: Any, cfg: CalibConfig, from_text: bool) -> None:
    """The evaluation options and the calibration length against the opened model's config."""
    config = getattr(model, "config", None)
    if eval_spec:
        check_eval(eval_spec, data_dir, config)
    if from_text:
        check_calib_length(cfg.seqlen, config)


def _search(model: Any, recipe: Any, out: Any, budget: Any, search: str | None, calib: Any, batch_size: int | None, overwrite: bool,
            eval_spec: EvalSpec | None, data_dir: Any, tokenizer: Any, device: Any, dtype: str | None, gguf_file: str | None,
            trust_remote_code: bool) -> tuple[Recipe, Any]:
    """The recipe (a budget's choice, with the search's account, or the one given); the checks that
    need no recipe run before the search's compute."""
    from .searched import searched_recipe

    if budget is None:
        if search is not None:
            raise CompressError("--search names the candidates of a --budget search; add --budget (e.g. --budget bits=3.0) or drop --search")
        return as_recipe(recipe), None
    if recipe:
        raise CompressError("--budget chooses the passes itself: drop --pass/--recipe, or drop --budget to run them as given")
    if distributed.current() is not None:
        raise CompressError("--budget runs its search in one process; run it without torchrun")
    rec = Recipe([], {})
    cfg = _calib_config(calib, rec, batch_size)
    if out is not None:
        check_output_dir(Path(out), overwrite, keep=(model,))
    if eval_spec:
        check_eval(eval_spec, data_dir)
    dev = resolve_device(device if device is not None else "cpu")
    return searched_recipe(model, budget, search, cfg, calib, tokenizer=tokenizer, data_dir=data_dir, device=dev, dtype=dtype,
                           gguf_file=gguf_file, trust_remote_code=trust_remote_code, calibration={})


def _calib_config(calib: Any, rec: Recipe, batch_size: int | None) -> CalibConfig:
    if isinstance(calib, CalibConfig):
        cfg = calib
    elif isinstance(calib, torch.Tensor):
        cfg = CalibConfig(samples=int(calib.shape[0]), seqlen=int(calib.shape[1]))
    else:
        given = dict(calib or {})
        merged = {**rec.calibration, **given}
        cfg = CalibConfig.from_dict(merged, where=lambda f: CalibConfig.where(f) if f in given else f"the recipe's 'calibration: {f}'",
                                    what="recipe calibration")
    return dataclasses.replace(cfg, batch_size=batch_size) if batch_size else cfg


def _read_corpora(passes: list[Pass[Any]], cfg: CalibConfig, calib: Any, data_dir: str | Path | None,
                  needs_ids: bool) -> dict[str | None, list[str]]:
    """The documents of every calibration source the passes read (None: the recipe's), each read once."""
    docs: dict[str | None, list[str]] = {}
    if needs_ids and not isinstance(calib, torch.Tensor):
        docs[None] = load_documents(cfg.source, cfg.split, data_dir)
    for src in sorted({p.caps.calib_source for p in passes if p.caps.calib_source}):
        docs[src] = load_documents(src, cfg.split, data_dir)
    return docs


def _stream_decision(passes: list[Pass[Any]], stream: str, offload_dir: str | Path | None, model: Any) -> tuple[bool, str | None]:
    """(whether the model may be streamed, why not)."""
    if stream not in STREAM_CHOICES:
        raise CompressError(f"stream must be auto, on or off (the CLI's --stream/--no-stream), got '{stream}'")
    blocker = stream_blocker(passes)
    if stream == "on" and blocker:
        raise CompressError(f"--stream is not possible: {blocker}; run without --stream (the model is then loaded whole)")
    if offload_dir is not None:
        check_offload_dir(Path(offload_dir))
        if blocker or stream == "off":
            raise CompressError(f"--offload-dir needs a streamed run, and {blocker or 'this run loads the model whole (--no-stream)'}; drop --offload-dir")
    if isinstance(model, nn.Module):
        return False, "the model is given in memory"
    if blocker:
        return False, blocker
    return (False, "--no-stream was given") if stream == "off" else (True, None)


def _process_group(model: Any, device: Any) -> tuple[Any, torch.device]:
    """The data-parallel group (joined here for a run from a source; None in one process) and the device."""
    if isinstance(model, nn.Module):
        dev = resolve_device(device) if device is not None else next(model.parameters()).device
        return distributed.current(), dev
    d, dev = distributed.init(resolve_device(device if device is not None else "cpu"))
    return d, dev


def _open(model: Any, tokenizer: Any, streamed_ok: bool, stream: str, dtype: str | None, trust_remote_code: bool,
          gguf_file: str | None, note: str | None) -> ModelHandle:
    """The model to plan on: the given one, its checkpoint's skeleton (streamed, or for the checks of a
    model the driver loads whole), or, when the checkpoint cannot be read tensor by tensor, the model
    loaded whole now."""
    if isinstance(model, nn.Module):
        check_finite(model)
        return ModelHandle(model, tokenizer, {"model_type": getattr(getattr(model, "config", None), "model_type", None)})
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, "gguf_file": gguf_file}
    try:
        sm, tok, info = open_streamed(model, **kwargs)
    except CannotStream as e:
        if stream == "on":
            raise
        why = f"the checkpoint cannot be streamed: {str(e).split(';')[0]}"
    except CompressError:
        raise
    except Exception as e:  # a skeleton only serves the checks here: load the model whole instead
        if streamed_ok:
            raise
        why = f"its skeleton could not be built ({type(e).__name__})"
    else:
        return ModelHandle(sm.model, tok, info, sm, False, str(model), kwargs)
    check_fits(model, dtype, note or why)
    loaded, tok, info = load_model(model, device="cpu", **kwargs)
    check_finite(loaded)
    info["stream_note"] = note or why
    return ModelHandle(loaded, tok, info, None, True, str(model), kwargs)


def _tokenize(passes: list[Pass[Any]], cfg: CalibConfig, calib: Any, docs: dict[str | None, list[str]], tokenizer: Any,
              data_dir: str | Path | None, needs_ids: bool, dist: Any) -> tuple[torch.Tensor | None, dict[str, torch.Tensor], dict[str, Any] | None]:
    """The calibration token ids (this process's share in a data-parallel run) and their description."""
    ids: torch.Tensor | None = None
    info: dict[str, Any] | None = None
    if needs_ids and isinstance(calib, torch.Tensor):
        ids = calib
        info = {"source": "tensor", "samples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "batch_size": cfg.batch_size}
    elif needs_ids:
        if tokenizer is None:
            raise CompressError("the recipe needs calibration data: pass token ids or a tokenizer")
        ids = calibration_ids(tokenizer, cfg, data_dir, docs=docs[None])
        info = cfg.to_dict()
    extra: dict[str, torch.Tensor] = {}
    for src in sorted(k for k in docs if k is not None):
        if tokenizer is None:
            raise CompressError(f"a pass calibrates on '{src}': pass the tokenizer to compress() so its text can be tokenized")
        cfg_src = dataclasses.replace(cfg, source=src)
        extra[src] = calibration_ids(tokenizer, cfg_src, data_dir, docs=docs[src])
        info = {**(info or {}), f"source:{src}": cfg_src.to_dict()}
    if dist is not None:  # each rank calibrates on its share of the batches
        ids = distributed.shard_batches(ids, cfg.batch_size, dist) if ids is not None else None
        extra = {k: distributed.shard_batches(v, cfg.batch_size, dist) for k, v in extra.items()}
        if info is not None:
            info = {**info, "processes": dist.world}
    return ids, extra, info


def _memory(handle: ModelHandle, adapter: ModelAdapter, cfg: CalibConfig, passes: list[Pass[Any]], offload_dir: Any) -> str | None:
    if handle.streamed is None:
        return None
    dtype = getattr(torch, handle.info["dtype"])
    needs = any(p.caps.requires_calibration for p in passes)
    return streamed_estimate(handle.streamed, adapter, handle.model, cfg, needs, dtype, Path(offload_dir) if offload_dir else None)
