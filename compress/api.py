"""The public verbs: :func:`plan` (decide and check a run), :func:`compress` (in memory),
:func:`run` (load → compress → save → export → evaluate), :func:`load` and :func:`evaluate`.

Each verb plans the run once (:func:`compress.planning.plan`: every option checked before any compute)
and hands the plan to a driver (:mod:`compress.drivers`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .adapters.base import ModelAdapter
from .calib.data import CalibConfig
from .drivers.engine import compress_model
from .drivers.finish import evaluate, with_baseline
from .drivers.streamed import run_streamed
from .drivers.whole import run_whole
from .evalspec import EvalSpec
from .models import load_model
from .pipeline.state import OnLayer, StatsProvider
from .planning import RunPlan, plan
from .report import Report

logger = logging.getLogger(__name__)

__all__ = ["CalibConfig", "EvalSpec", "RunPlan", "compress", "evaluate", "execute", "load", "plan", "run", "with_baseline"]


def compress(
    model: nn.Module,
    recipe: Any,
    calib: torch.Tensor | CalibConfig | Mapping[str, Any] | None = None,
    *,
    tokenizer: Any = None,
    adapter: ModelAdapter | None = None,
    device: str | torch.device | None = None,
    data_dir: str | Path | None = None,
    batch_size: int | None = None,
    on_layer: OnLayer | None = None,
    stats_provider: StatsProvider | None = None,
) -> Report:
    """Compress ``model`` in place with ``recipe`` and return the :class:`Report`.

    ``recipe``: a :class:`Recipe`, a YAML path, a dict, pass configs such as ``[GPTQConfig(bits=3)]``
    or shorthand strings such as ``["svd-llm:ratio=0.2"]``. ``calib``: token ids (samples × seqlen),
    or a :class:`CalibConfig` (then ``tokenizer`` is needed), or None (the recipe's calibration
    block, else the defaults of :class:`CalibConfig`) — used only when a pass needs calibration.
    Every pass option is checked against every target's shape, and the weights for NaN/Inf, before
    the first layer is touched.
    """
    p = plan(model, recipe, calib=calib, tokenizer=tokenizer, adapter=adapter, device=device, data_dir=data_dir,
             batch_size=batch_size, precomputed_stats=stats_provider is not None)
    return compress_model(p, on_layer=on_layer, stats_provider=stats_provider)


def load(directory: str | Path, *, device: str | torch.device = "cpu", **kwargs: Any) -> tuple[nn.Module, Any]:
    """Load a compressed checkpoint (or any model :func:`load_model` reads) → (model, tokenizer)."""
    from .checkpoint import load_checkpoint
    from .hf_format import is_compress_checkpoint

    if is_compress_checkpoint(directory):
        return load_checkpoint(directory, device=device, trust_remote_code=kwargs.get("trust_remote_code", False))
    model, tokenizer, _ = load_model(directory, device=device, **kwargs)
    return model, tokenizer


def run(
    model_source: str | Path,
    recipe: Any,
    out: str | Path,
    *,
    calib: CalibConfig | Mapping[str, Any] | torch.Tensor | None = None,
    dtype: str | None = "auto",
    device: str | None = "cpu",
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    export: Sequence[str] = (),
    eval_spec: EvalSpec | None = None,
    baseline: bool = False,
    on_layer: OnLayer | None = None,
    on_stage: Callable[[str], None] | None = None,
    stream: str = "auto",
    restart: bool = False,
    offload_dir: str | Path | None = None,
    budget: Any = None,
    search: str | None = None,
) -> Report:
    """Load a model, compress it, write the checkpoint (atomically), then export other formats and
    evaluate (with ``baseline``, the dense model too, before compressing).

    Every option that can fail is checked before the first layer is compressed (see
    :func:`compress.planning.plan`). The checkpoint is written as soon as compression ends; a failing
    export or evaluation leaves it complete and says how to rerun only that step.

    ``stream``: ``auto`` reads the model one decoder layer at a time from its checkpoint, writes
    each finished layer to ``OUT.partial/`` and resumes from there when rerun (see
    :mod:`compress.stream`), unless a pass needs the whole model (then it is loaded whole); ``on``
    insists on streaming, ``off`` loads the whole model. ``restart`` discards ``OUT.partial/``.
    ``offload_dir`` keeps the calibration activations in memory-mapped files there. ``budget``
    (``recipe`` None): the recipe is chosen per target among the ``search`` candidates
    (:mod:`compress.search`).
    """
    p = plan(model_source, recipe, out, calib=calib, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
             gguf_file=gguf_file, data_dir=data_dir, overwrite=overwrite, export=export, eval_spec=eval_spec, baseline=baseline,
             stream=stream, restart=restart, offload_dir=offload_dir, budget=budget, search=search)
    return execute(p, on_layer=on_layer, on_stage=on_stage)


def execute(p: RunPlan, *, on_layer: OnLayer | None = None, on_stage: Callable[[str], None] | None = None) -> Report:
    """Execute a plan made with an output directory: streamed or whole, then exports and evaluation."""
    if p.out is None:
        raise ValueError("execute() writes a checkpoint: plan the run with an output directory (or use compress())")
    stage = on_stage or (lambda s: logger.info(s))
    if not p.is_main:  # rank 0 reports and writes
        stage, on_layer = (lambda s: None), None
    t_start = time.perf_counter()
    if p.stream:
        return run_streamed(p, stage, on_layer, t_start)
    if p.stream_note and p.handle.source is not None:
        stage(f"{p.stream_note}; {'loaded it whole' if p.handle.loaded else 'loading it whole'}")
    return run_whole(p, stage, on_layer, t_start)
