"""The layer-sequential engine: every pass, every lifecycle.

Capture the inputs of decoder layer 0 (every positional and keyword argument); model-level passes
``begin``; then for each layer: move it to the compute device, run every pass on it in recipe order
(a layer pass through ``compress_layer``; a per-linear pass per sequential sub-group of linears:
observe the group's inputs through hooks, then apply; with ``observe_once`` every sub-group's inputs
come from one forward of the layer as the pass finds it), re-run the compressed layer to produce the
next layer's inputs (errors propagate as in GPTQ), and move the layer back; model-level passes
``finish``. One decoder layer and one batch of activations are on the device at a time; activations
live on the CPU between layers.

A pass that reads every layer before its first (a global allocation) and follows other passes
starts a new run of the same loop (:func:`compress.pipeline.loop.segments`), so it sees their results
everywhere. Everything the loop needs beyond the model and the passes comes in one
:class:`~compress.pipeline.state.Engine`.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..modules.base import dense_weight_of, storage_bits, weight_count
from ..passes.base import LayerPass, LinearPass, ModelPass, Pass, PassPlan, PassResult
from ..records import ModuleRecord
from .capture import Batch, capture_layer0_inputs, linear_shape, set_submodule
from .context import calibration_forward_context
from .distributed import reduce_stats, solve_on_main
from .layer import LayerState, ModelState, observe
from .loop import layer_loop, segments
from .profile import run_profiles
from .state import Engine
from .stats import LayerStats


@dataclass
class PipelineResult:
    records: list[ModuleRecord]
    layer_seconds: list[float]
    calibration_tokens: int


#: a pass of the recipe with what planning decided for it
Step = tuple[Pass[Any], PassPlan]


def run_sequential(
    model: nn.Module, adapter: ModelAdapter, steps: list[Step], input_ids: torch.Tensor | None, engine: Engine,
    extra_ids: dict[str, torch.Tensor] | None = None,
) -> PipelineResult:
    """Apply the passes of ``steps`` to ``model`` in place, layer by layer.

    ``input_ids`` (n_samples, seqlen) is required when any pass requires calibration, unless the
    engine's ``stats_provider`` supplies precomputed statistics (sweeps reuse the dense model's
    statistics across grid points: no calibration forward at all, no propagation). Passes that read
    the layer's inputs themselves (``uses_layer_inputs``) still get them. A pass whose
    ``calib_source`` names another calibration set observes the inputs produced from
    ``extra_ids[calib_source]``, propagated through the compressed layers like the main set.
    """
    records: list[ModuleRecord] = []
    seconds: list[float] = []
    tokens = 0
    segs = segments(steps, lambda s: s[0])
    if engine.stream is not None and len(segs) > 1:
        raise ValueError("a streamed model runs one layer loop; this recipe needs several")
    if engine.stream is not None:
        records += engine.stream.resume(model)
    for seg in segs:
        run = _Segment(model, adapter, seg, input_ids, extra_ids or {}, engine)
        run.run()
        records += run.records
        seconds += run.seconds
        tokens = max(tokens, run.tokens)
    return PipelineResult(records, seconds, tokens)


class _Segment:
    """One layer loop over the model for consecutive passes of the recipe."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, steps: list[Step], input_ids: torch.Tensor | None,
                 extra_ids: dict[str, torch.Tensor], engine: Engine) -> None:
        self.model, self.adapter, self.steps, self.engine = model, adapter, steps, engine
        self.input_ids, self.extra_ids = input_ids, extra_ids
        self.records: list[ModuleRecord] = []
        self.seconds: list[float] = []
        self.tokens = 0
        passes = [p for p, _ in steps]
        self.sources = {p.caps.calib_source for p in passes if self._needs_inputs(p)}
        if any(p.caps.uses_layer_inputs for p in passes):
            self.sources.add(None)
        self.keep_originals = any(p.caps.needs_original for p in passes)
        self.inputs_by: dict[str | None, list[Batch]] = {}

    def _needs_inputs(self, p: Pass[Any]) -> bool:
        c = p.caps
        return c.requires_calibration and (self.engine.stats_provider is None or c.uses_layer_inputs or c.calib_source is not None)

    def run(self) -> None:
        model, adapter, engine = self.model, self.adapter, self.engine
        with calibration_forward_context(model):
            for p, plan in self.steps:
                p.prepare(model, adapter, plan)
            run_profiles(model, adapter, [p for p, _ in self.steps if p.caps.profile], self.input_ids, engine)
            self._capture()
            for p, plan in self.steps:
                if isinstance(p, ModelPass):
                    p.begin(ModelState(model, adapter, engine.device, self.inputs_by, plan))
            self.seconds = layer_loop(adapter, model, self.inputs_by, engine.device, self._body, engine.on_layer, engine.stream)
            for p, plan in self.steps:
                if isinstance(p, ModelPass):
                    p.finish(ModelState(model, adapter, engine.device, self.inputs_by, plan))
        ids = self.input_ids
        self.tokens = 0 if ids is None or None not in self.inputs_by else int(ids.numel())

    def _capture(self) -> None:
        """The layer-0 inputs of every calibration source (or the saved inputs of a resumed run)."""
        stream, engine = self.engine.stream, self.engine
        n_layers = len(self.adapter.layers(self.model))
        if stream is not None and stream.start >= n_layers:
            self.inputs_by = {src: [] for src in self.sources}  # every layer is done: only the checkpoint is left to write
        elif stream is not None and stream.start > 0:
            self.inputs_by = stream.resume_inputs()
            if set(self.inputs_by) != self.sources:
                raise ValueError("the saved calibration inputs do not match the recipe's sources")
        for src in sorted(self.sources - set(self.inputs_by), key=lambda s: "" if s is None else s):
            ids = self.input_ids if src is None else self.extra_ids.get(src)
            if ids is None:
                raise ValueError(f"a pass requires calibration data{'' if src is None else f' from {src}'} but none was given")
            self.inputs_by[src] = capture_layer0_inputs(self.model, self.adapter, ids, engine.batch_size, engine.device)
        if stream is not None:
            stream.records = self.records
            self.inputs_by = stream.keep(self.inputs_by)  # memory-mapped from --offload-dir when given
            stream.captured()

    def _snapshot(self, layer: nn.Module, groups: list[list[str]]) -> dict[str, torch.Tensor] | None:
        """Each linear's weight before the per-linear passes (after a model-level pass rotated it)."""
        if not self.keep_originals:
            return None
        return {n: dense_weight_of(layer.get_submodule(n)).detach().clone() for g in groups for n in g}

    def _body(self, i: int, layer: nn.Module) -> dict[str | None, list[torch.Tensor]] | None:
        """Every pass on decoder layer ``i``; returns the layer's outputs when a pass already knows them."""
        groups = self.adapter.groups(layer)
        known: dict[str | None, list[torch.Tensor]] | None = None
        originals = self._snapshot(layer, groups)
        dense_out: list[torch.Tensor] | None = None  # the layer's outputs before the passes (propagate_dense)
        for k, (p, plan) in enumerate(self.steps):
            if isinstance(p, LayerPass):
                ctx = self._context(i, layer, originals, plan)
                self.records.extend(_layer_pass(p, i, layer, ctx, self.adapter.layers_path))
                # outputs the pass derived from what it observed hold while no later pass changes the layer
                known = {None: ctx.outputs} if ctx.outputs is not None and k == len(self.steps) - 1 else None
                originals = self._snapshot(layer, groups)
                continue
            assert isinstance(p, LinearPass)
            grab = p.caps.propagate_dense and p.caps.calib_source is None and dense_out is None and known is None
            once, outs = self._observe_once(p, i, layer, groups, grab)
            dense_out = outs if outs is not None else dense_out
            self._linear_pass(p, i, layer, groups, once, originals, plan)
        if known is None and dense_out is not None:
            known = {None: dense_out}
        return known

    def _context(self, i: int, layer: nn.Module, originals: dict[str, torch.Tensor] | None, plan: PassPlan) -> LayerState:
        return LayerState(layer, i, self.inputs_by.get(None, []), self.engine.device, self.adapter, originals,
                          getattr(self.model, "config", None), plan)

    def _observe_once(self, p: LinearPass[Any], i: int, layer: nn.Module, groups: list[list[str]],
                      grab: bool) -> tuple[LayerStats | None, list[torch.Tensor] | None]:
        """With ``observe_once``: every target's statistics from one forward of the layer as the pass
        finds it (and, with ``grab``, the layer's outputs from that forward)."""
        c = p.caps
        if not (c.observe_once and c.requires_calibration and (self.engine.stats_provider is None or c.calib_source is not None)):
            return None, None
        every = [n for g in groups for n in g if p.targets(f"{i}.{n}", layer.get_submodule(n))]
        if not every:
            return None, None
        outs: list[torch.Tensor] | None = [] if grab else None
        once = observe(layer, every, c.statistics, self.inputs_by[c.calib_source], self.engine.device, outs)
        if self.engine.dist is not None:
            once = reduce_stats(once, self.engine.dist)
        return once, outs

    def _group_stats(self, p: LinearPass[Any], i: int, layer: nn.Module, targets: list[str], once: LayerStats | None) -> LayerStats | None:
        c, engine = p.caps, self.engine
        if not c.requires_calibration:
            return None
        if engine.stats_provider is not None and c.calib_source is None:
            return engine.stats_provider(i, targets, c.statistics)
        if once is not None:
            return once
        stats = observe(layer, targets, c.statistics, self.inputs_by[c.calib_source], engine.device)
        return reduce_stats(stats, engine.dist) if engine.dist is not None else stats

    def _linear_pass(self, p: LinearPass[Any], i: int, layer: nn.Module, groups: list[list[str]], once: LayerStats | None,
                     originals: dict[str, torch.Tensor] | None, plan: PassPlan) -> None:
        """Observe, then apply ``p`` to each of its targets, sub-group by sub-group (the layer's linears
        as they were before any pass replaced them)."""
        for group in groups:
            targets = [n for n in group if p.targets(f"{i}.{n}", layer.get_submodule(n))]
            if not targets:
                continue
            stats = self._group_stats(p, i, layer, targets, once)
            ctx = self._context(i, layer, originals, plan)
            for n in targets:
                self.records.append(self._apply(p, i, layer, n, stats.pop(n) if stats is not None else None, ctx))
            del stats, ctx

    def _apply(self, p: LinearPass[Any], i: int, layer: nn.Module, n: str, st: Any, ctx: LayerState) -> ModuleRecord:
        module = layer.get_submodule(n)
        t0 = time.perf_counter()
        before, bits_before, shape = weight_count(module), storage_bits(module), linear_shape(module)
        full = f"{self.adapter.layers_path}.{i}.{n}"
        d = self.engine.dist
        if d is None:
            result = p.apply(full, module, st, ctx)
        else:  # rank 0 solves, the others receive its result
            result = solve_on_main(d, module, functools.partial(p.apply, full, module, st, ctx), PassResult)
        new = result.module if result.module is not None else module
        if result.module is not None:
            set_submodule(layer, n, result.module)
        return ModuleRecord(
            layer=i, name=full, pass_name=p.name, module_type=type(new).__name__, shape=shape,
            params_before=before, params_after=weight_count(new), seconds=time.perf_counter() - t0,
            info=result.info, bits_before=bits_before, bits_after=storage_bits(new),
        )


def _layer_pass(p: LayerPass[Any], i: int, layer: nn.Module, ctx: LayerState, prefix: str) -> list[ModuleRecord]:
    """Run a layer pass on one layer and record every linear it changed."""
    from ..modules.base import CompressedLinear

    linears = [n for n, m in layer.named_modules() if isinstance(m, (nn.Linear, CompressedLinear))]
    before = {n: (linear_shape(layer.get_submodule(n)), weight_count(layer.get_submodule(n)), storage_bits(layer.get_submodule(n)))
              for n in linears}
    t0 = time.perf_counter()
    infos = p.compress_layer(i, layer, ctx)
    secs = (time.perf_counter() - t0) / max(len(infos), 1)
    out = []
    for n, info in infos.items():
        shape, params, bits = before[n]
        new = layer.get_submodule(n)
        out.append(ModuleRecord(
            layer=i, name=f"{prefix}.{i}.{n}", pass_name=p.name, module_type=type(new).__name__, shape=shape,
            params_before=params, params_after=weight_count(new), seconds=secs, info=info, bits_before=bits, bits_after=storage_bits(new),
        ))
    return out
