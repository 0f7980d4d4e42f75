"""Executing a plan on a model read layer by layer from its checkpoint, resumable (see
:mod:`compress.stream`): read the checkpoint once (NaN/Inf check and fingerprint), open or resume the
progress directory, compress with every finished layer written to ``OUT.partial/``, assemble the
checkpoint from the finished layers, then export and evaluate."""

from __future__ import annotations

import hashlib
import time
from typing import Any, Callable

import torch

from ..checkpoint import load_checkpoint, write_config_and_tokenizer, write_manifest
from ..errors import CompressError
from ..fsutil import atomic_directory, writing
from ..models import load_model
from ..modules.base import hf_config
from ..pipeline.state import OnLayer
from ..planning import RunPlan
from ..report import Report
from .engine import compress_model
from .finish import after_checkpoint, evaluate
from .manifest import manifest


def _fingerprint(plan: RunPlan, weights: str) -> dict[str, Any]:
    """What must not change between a run and its resume."""
    import transformers

    from ..version import __version__

    info, model = plan.handle.info, plan.model
    fp: dict[str, Any] = {
        "weights": weights, "recipe": plan.recipe.to_dict(), "calibration": plan.calib.to_dict(), "dtype": info["dtype"],
        "library": __version__, "config": hashlib.blake2b(hf_config(model).to_json_string(use_diff=False).encode(), digest_size=8).hexdigest(),
        "transformers": transformers.__version__,
    }
    if plan.dist is not None:
        fp["processes"] = plan.dist.world
    return fp


def run_streamed(plan: RunPlan, stage: Callable[[str], None], on_layer: OnLayer | None, t_start: float) -> Report:
    """:func:`compress.api.run` on a model read layer by layer from its checkpoint, resumable."""
    from ..sources import scan
    from ..stream import Progress

    sm, info = plan.handle.streamed, plan.handle.info
    t0 = time.perf_counter()
    stage(f"reading {plan.handle.source} once (NaN/Inf check and fingerprint)")
    try:
        info["fingerprint"] = scan(sm.source)
    except BaseException:
        sm.source.close()
        raise
    assert plan.out is not None
    progress = Progress(plan.out, _fingerprint(plan, info["fingerprint"]), restart=plan.restart, dist=plan.dist)
    try:
        return _compress(plan, progress, t0, stage, on_layer, t_start)
    except BaseException:
        if progress.done == 0 and progress.is_main:
            progress.remove()  # nothing finished: nothing to resume, leave no directory behind
        raise
    finally:
        progress.release()


def _baseline(plan: RunPlan, stage: Callable[[str], None]) -> tuple[list[dict[str, Any]], float | None]:
    if not (plan.eval_spec and plan.baseline):
        return [], None
    assert plan.handle.source is not None  # the plan checked that the dense model fits
    stage("evaluating the dense baseline (loaded whole)")
    t0 = time.perf_counter()
    dense, _, _ = load_model(plan.handle.source, device=plan.device, **plan.handle.load_kwargs)
    metrics = evaluate(dense, plan.handle.tokenizer, plan.eval_spec, data_dir=plan.data_dir)
    del dense
    return metrics, time.perf_counter() - t0


def _compress(plan: RunPlan, progress: Any, t0: float, stage: Callable[[str], None], on_layer: OnLayer | None, t_start: float) -> Report:
    from ..stream import LayerStream

    sm, model, tokenizer = plan.handle.streamed, plan.model, plan.handle.tokenizer
    n_layers = len(plan.adapter.layers(model))
    sm.load_outside()
    t_load = time.perf_counter() - t0
    if plan.memory:
        stage(plan.memory)
    if progress.done:
        progress.check_layers(progress.done)
        stage(f"every layer is finished in {progress.dir}: writing the checkpoint" if progress.done >= n_layers
              else f"resuming at layer {progress.done + 1} of {n_layers} from {progress.dir}")
    base_metrics, t_base = _baseline(plan, stage)
    stage("compressing (streamed)")
    layer_stream = LayerStream(sm, progress, getattr(torch, plan.handle.info["dtype"]), plan.offload_dir)
    try:
        report = compress_model(plan, on_layer=on_layer, stream=layer_stream)
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
    if not plan.is_main:
        sm.source.close()
        return report
    report.model["streamed"] = True
    man = manifest(report, plan.handle.info, plan.recipe, t_load, t_base)
    _write(plan, progress, man, report, stage, n_layers)
    progress.remove()
    if plan.exports or plan.eval_spec:
        stage(f"loading {plan.out} for {'export' if plan.exports else 'evaluation'}")
        assert plan.out is not None
        model, tokenizer = load_checkpoint(plan.out)
    assert plan.out is not None and plan.handle.source is not None
    return after_checkpoint(report, model, tokenizer, plan.out, plan.handle.source, plan.exports, plan.eval_spec, base_metrics,
                            plan.data_dir, plan.device, stage, t_start)


def _write(plan: RunPlan, progress: Any, man: dict[str, Any], report: Report, stage: Callable[[str], None], n_layers: int) -> None:
    """The checkpoint, assembled from the in-memory parts and the finished layers' files."""
    from ..stream import write_streamed_weights

    sm, model, out = plan.handle.streamed, plan.model, plan.out
    assert out is not None
    stage(f"writing {out}")
    t0 = time.perf_counter()
    try:
        sm.load_outside()  # dropped after the layer-0 inputs were captured
    finally:
        sm.source.close()
    progress.check_layers(n_layers)
    need = sum(progress.layer_file(i).stat().st_size for i in range(n_layers))
    then = f"every layer is kept in '{progress.dir}': free space and rerun the same command to write the checkpoint"
    with writing(out, need, then), atomic_directory(out, overwrite=plan.overwrite) as tmp:
        write_config_and_tokenizer(model, plan.handle.tokenizer, tmp)
        files, aliases = write_streamed_weights(model, plan.adapter.layers_path, progress, n_layers, tmp)
        write_manifest(model, tmp, man, files, aliases, plan.recipe.to_yaml())
        report.timings["save"] = time.perf_counter() - t0
        report.write(tmp)
