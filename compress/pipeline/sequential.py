"""The layer loop: every pass, every mode.

Capture the inputs of decoder layer 0 (every positional and keyword argument); model-level passes
``begin``; then for each layer: move it to the compute device, run every pass on it in recipe order
(a model-level pass through ``compress_layer``; a per-linear pass per sequential sub-group of
linears: observe the group's inputs through hooks, then apply; with ``observe_once`` every
sub-group's inputs come from one forward of the layer as the pass finds it), re-run the compressed layer to
produce the next layer's inputs (errors propagate as in GPTQ), and move the layer back; model-level
passes ``finish``. One decoder layer and one batch of activations are on the device at a time;
activations live on the CPU between layers.

A pass with a global ``prepare`` (it reads every layer's weights, e.g. LoRD's rank allocation) that
follows other passes starts a new run of the same loop, so it sees their results everywhere.
Profiling for sweeps (:func:`profile_statistics`) is the same loop with an observer instead of passes.
"""

from __future__ import annotations

import functools
import gc
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..errors import ConfigError
from ..modules import CompressedLinear, storage_bits, weight_count
from ..modules.base import dense_weight_of
from ..passes.base import Pass, PassResult
from ..records import ModuleRecord
from .capture import Batch, capture_layer0_inputs, linear_shape, module_device, run_layer, set_submodule, with_hidden
from .context import calibration_forward_context, cleanup_memory
from .distributed import current, reduce_stats, solve_on_main
from .layer import LayerState, ModelState, observe
from .stats import LayerStats

if TYPE_CHECKING:
    from ..stream import LayerStream

logger = logging.getLogger(__name__)

#: body(index, layer) of one layer's work; returns the layer's outputs for the sources whose outputs
#: it already knows (the loop re-runs the layer for the others)
LayerBody = Callable[[int, nn.Module], "dict[str | None, list[torch.Tensor]] | None"]
StatsProvider = Callable[[int, list[str], frozenset[str]], LayerStats]


@dataclass
class PipelineResult:
    records: list[ModuleRecord]
    layer_seconds: list[float]
    calibration_tokens: int


def layer_loop(
    adapter: ModelAdapter, model: nn.Module, inputs_by: dict[str | None, list[Batch]], device: torch.device, body: LayerBody,
    on_layer: Callable[[int, int, float], None] | None = None, stream: "LayerStream | None" = None,
) -> list[float]:
    """For each decoder layer: onload, ``body``, propagate the calibration inputs, offload. With a
    ``stream``, layers before ``stream.start`` are done already (a resumed run), each layer is read
    from the checkpoint first and written and dropped afterwards (see :mod:`compress.stream`)."""
    layers = adapter.layers(model)
    seconds: list[float] = []
    # the objects alive now (the model, its modules) outlive the loop: keep the per-layer garbage
    # collection from walking them every layer (0.2 s a layer on a small model)
    gc.freeze()
    try:
        _layers(layers, inputs_by, device, body, seconds, on_layer, stream)
    finally:
        gc.unfreeze()
    return seconds


def _layers(
    layers: nn.ModuleList, inputs_by: dict[str | None, list[Batch]], device: torch.device, body: LayerBody, seconds: list[float],
    on_layer: Callable[[int, int, float], None] | None, stream: "LayerStream | None",
) -> None:
    for i, layer in enumerate(layers):
        if stream is not None and i < stream.start:
            continue
        t0 = time.perf_counter()
        if stream is not None:
            stream.load(i, layer)
        home = module_device(layer)
        layer.to(device)
        outs = body(i, layer)
        if i + 1 < len(layers):
            for src, inputs in inputs_by.items():
                known = outs.get(src) if outs is not None else None
                hs = known if known is not None else [run_layer(layer, b, device).detach().to("cpu") for b in inputs]
                inputs_by[src] = [with_hidden(b, h) for b, h in zip(inputs, hs)]
        layer.to(home)
        if stream is not None:
            inputs_by.update(stream.done(i, len(layers), layer, dict(inputs_by)))
        cleanup_memory()
        seconds.append(time.perf_counter() - t0)
        logger.debug("layer %d/%d done in %.1f s", i + 1, len(layers), seconds[-1])
        if on_layer is not None:
            on_layer(i, len(layers), seconds[-1])


def segments(passes: list[Pass]) -> list[list[Pass]]:
    """Consecutive passes that share one layer loop. A pass with a global prepare after others starts
    a new one (it reads every layer as they left it); so does a model-level pass after others (its
    ``begin`` changes the embeddings and the calibration stream, which the passes before it in the
    same loop would otherwise see for layers they have not compressed yet)."""
    out: list[list[Pass]] = []
    for p in passes:
        if not out or ((p.global_prepare or p.granularity == "model" or p.caps.profile) and out[-1]):
            out.append([])
        out[-1].append(p)
    return out


def check_segments(passes: list[Pass]) -> None:
    """Refuse (called by :func:`compress.validate.check_passes`, before any compute) a pass that needs the recipe's original weights in a layer loop
    after the first (the earlier loops have replaced them by then)."""
    segs = segments(passes)
    for k, seg in enumerate(segs[1:], 1):
        late = [p.name for p in seg if p.caps.needs_original]
        if late:
            starter = seg[0].name
            raise ConfigError(
                f"{late[0]} needs each layer's weights from before the recipe, but it runs after {starter}, which starts a second pass "
                f"over the model (it reads every layer first); put {late[0]} before {starter} or run {starter} in a recipe of its own"
            )


def run_sequential(
    model: nn.Module,
    adapter: ModelAdapter,
    passes: list[Pass],
    input_ids: torch.Tensor | None,
    *,
    device: torch.device,
    batch_size: int,
    on_layer: Callable[[int, int, float], None] | None = None,
    stats_provider: StatsProvider | None = None,
    extra_ids: dict[str, torch.Tensor] | None = None,
    stream: "LayerStream | None" = None,
) -> PipelineResult:
    """Apply ``passes`` to ``model`` in place, layer by layer.

    ``input_ids`` (n_samples, seqlen) is required when any pass requires calibration, unless
    ``stats_provider(layer_index, names, kinds)`` supplies precomputed statistics (sweeps reuse the
    dense model's statistics across grid points: no calibration forward at all, no propagation).
    Passes that read the layer's inputs themselves (``uses_layer_inputs``) still get them.
    A pass whose ``calib_source`` names another calibration set observes the inputs produced from
    ``extra_ids[calib_source]``, propagated through the compressed layers like the main set.
    """
    records: list[ModuleRecord] = []
    seconds: list[float] = []
    tokens = 0
    segs = segments(passes)
    if stream is not None and len(segs) > 1:
        raise ValueError("a streamed model runs one layer loop; this recipe needs several")
    if stream is not None:
        records += stream.resume(model)
    for seg in segs:
        r, s, t = _run_segment(model, adapter, seg, input_ids, device, batch_size, on_layer, stats_provider, extra_ids or {}, stream)
        records += r
        seconds += s
        tokens = max(tokens, t)
    return PipelineResult(records, seconds, tokens)


def _run_segment(
    model: nn.Module, adapter: ModelAdapter, passes: list[Pass], input_ids: torch.Tensor | None, device: torch.device,
    batch_size: int, on_layer: Callable[[int, int, float], None] | None, stats_provider: StatsProvider | None,
    extra_ids: dict[str, torch.Tensor], stream: "LayerStream | None" = None,
) -> tuple[list[ModuleRecord], list[float], int]:
    def needs_inputs(p: Pass) -> bool:
        c = p.caps
        return c.requires_calibration and (stats_provider is None or c.uses_layer_inputs or c.calib_source is not None)

    sources = {p.caps.calib_source for p in passes if needs_inputs(p)}
    if any(p.caps.uses_layer_inputs for p in passes):
        sources.add(None)
    keep_originals = any(p.caps.needs_original for p in passes)
    d = current()
    records: list[ModuleRecord] = []
    prefix = adapter.layers_path
    with calibration_forward_context(model):
        for p in passes:
            p.prepare(model, adapter)
        _profile(model, adapter, [p for p in passes if p.caps.profile], input_ids, device, batch_size, stats_provider)
        inputs_by: dict[str | None, list[Batch]] = {}
        if stream is not None and stream.start >= len(adapter.layers(model)):
            inputs_by = {src: [] for src in sources}  # every layer is done: only the checkpoint is left to write
        elif stream is not None and stream.start > 0:
            inputs_by = stream.resume_inputs()
            if set(inputs_by) != sources:
                raise ValueError("the saved calibration inputs do not match the recipe's sources")
        for src in sorted(sources - set(inputs_by), key=lambda s: "" if s is None else s):
            ids = input_ids if src is None else extra_ids.get(src)
            if ids is None:
                raise ValueError(f"a pass requires calibration data{'' if src is None else f' from {src}'} but none was given")
            inputs_by[src] = capture_layer0_inputs(model, adapter, ids, batch_size, device)
        if stream is not None:
            stream.records = records
            inputs_by = stream.keep(inputs_by)  # memory-mapped from --offload-dir when given
            stream.captured()
        model_state = ModelState(model, adapter, device, inputs_by)
        for p in passes:
            if p.granularity == "model":
                p.begin(model_state)

        def body(i: int, layer: nn.Module) -> dict[str | None, list[torch.Tensor]] | None:
            groups = adapter.groups(layer)
            known: dict[str | None, list[torch.Tensor]] | None = None

            def snapshot() -> dict[str, torch.Tensor] | None:
                # each linear's weight before the per-linear passes (after a model-level pass rotated it)
                return {n: dense_weight_of(layer.get_submodule(n)).detach().clone() for g in groups for n in g} if keep_originals else None

            originals = snapshot()
            main = inputs_by.get(None, [])
            dense_out: list[torch.Tensor] | None = None  # the layer's outputs before the passes (propagate_dense)
            for p in passes:
                once: LayerStats | None = None  # every sub-group's statistics from one forward (observe_once)
                if p.granularity == "linear" and p.caps.observe_once and p.caps.requires_calibration and (
                        stats_provider is None or p.caps.calib_source is not None):
                    every = [n for g in groups for n in g if p.targets(n, layer.get_submodule(n))]
                    grab = p.caps.propagate_dense and p.caps.calib_source is None and dense_out is None and known is None
                    outs: list[torch.Tensor] | None = [] if grab else None
                    once = observe(layer, every, p.caps.statistics, inputs_by[p.caps.calib_source], device, outs) if every else None
                    dense_out = outs if grab and every else dense_out
                    if once is not None and d is not None:
                        once = reduce_stats(once, d)
                if p.granularity == "model":
                    state = LayerState(layer, i, main, device, adapter, originals)
                    records.extend(_model_layer(p, i, layer, state, prefix))
                    # outputs the pass derived from what it observed hold while no later pass changes the layer
                    known = {None: state.outputs} if state.outputs is not None and p is passes[-1] else None
                    originals = snapshot()
                    continue
                for group in groups:  # the layer's linears as they were before any pass replaced them
                    targets = [n for n in group if p.targets(n, layer.get_submodule(n))]
                    if not targets:
                        continue
                    c = p.caps
                    if not c.requires_calibration:
                        stats = None
                    elif stats_provider is not None and c.calib_source is None:
                        stats = stats_provider(i, targets, c.statistics)
                    elif once is not None:
                        stats = once
                    else:
                        stats = observe(layer, targets, c.statistics, inputs_by[c.calib_source], device)
                        if d is not None:
                            stats = reduce_stats(stats, d)
                    context = LayerState(layer, i, main, device, adapter, originals)
                    for n in targets:
                        module = layer.get_submodule(n)
                        t0 = time.perf_counter()
                        before, bits_before, shape = weight_count(module), storage_bits(module), linear_shape(module)
                        full = f"{prefix}.{i}.{n}"
                        st = stats.pop(n) if stats is not None else None
                        if d is None:
                            result = p.apply(full, module, st, context)
                        else:  # rank 0 solves, the others receive its result
                            result = solve_on_main(d, module, functools.partial(p.apply, full, module, st, context), PassResult)
                        new = result.module if result.module is not None else module
                        if result.module is not None:
                            set_submodule(layer, n, result.module)
                        records.append(ModuleRecord(
                            layer=i, name=full, pass_name=p.name, module_type=type(new).__name__, shape=shape,
                            params_before=before, params_after=weight_count(new), seconds=time.perf_counter() - t0,
                            info=result.info, bits_before=bits_before, bits_after=storage_bits(new),
                        ))
                    del stats, context
            del originals
            if known is None and dense_out is not None:
                known = {None: dense_out}
            return known

        seconds = layer_loop(adapter, model, inputs_by, device, body, on_layer, stream)
        for p in passes:
            if p.granularity == "model":
                p.finish(model_state)
    tokens = 0 if input_ids is None or None not in inputs_by else int(input_ids.numel())
    return records, seconds, tokens


def _profile(
    model: nn.Module, adapter: ModelAdapter, passes: list[Pass], input_ids: torch.Tensor | None, device: torch.device, batch_size: int,
    stats_provider: StatsProvider | None,
) -> None:
    """Hand every layer's statistics to the passes that asked for a profile (one forward per layer,
    or the sweep's precomputed statistics)."""
    if not passes:
        return
    kinds = frozenset().union(*(p.caps.profile for p in passes))
    layers = adapter.layers(model)

    def on_layer(i: int, stats: LayerStats) -> None:
        for p in passes:
            p.profile_layer(i, layers[i], stats)

    if stats_provider is not None:
        for i, layer in enumerate(layers):
            on_layer(i, stats_provider(i, [n for g in adapter.groups(layer) for n in g], kinds))
    else:
        if input_ids is None:
            raise ValueError(f"{passes[0].name} profiles the model's statistics but no calibration data was given")
        profile_statistics(model, adapter, input_ids, kinds, device=device, batch_size=batch_size, on_layer=on_layer)
    for p in passes:
        p.profile_done()


def _model_layer(p: Pass, i: int, layer: nn.Module, ctx: LayerState, prefix: str) -> list[ModuleRecord]:
    """Run a model-level pass on one layer and record every linear it changed."""
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


def profile_statistics(
    model: nn.Module,
    adapter: ModelAdapter,
    input_ids: torch.Tensor,
    kinds: frozenset[str],
    *,
    device: torch.device,
    batch_size: int,
    on_layer: Callable[[int, LayerStats], None],
) -> None:
    """Statistics of every linear of the (unchanged) model in one forward per layer: the profile a
    sweep reuses across its grid. ``on_layer(index, stats)`` receives each layer's statistics."""
    with calibration_forward_context(model):
        inputs_by: dict[str | None, list[Batch]] = {None: capture_layer0_inputs(model, adapter, input_ids, batch_size, device)}

        def body(i: int, layer: nn.Module) -> dict[str | None, list[torch.Tensor]]:
            names = [n for g in adapter.groups(layer) for n in g]
            stats = LayerStats(kinds)
            handles = [
                layer.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: stats.observe(n, a[0].detach()))  # type: ignore[misc]
                for n in names
            ]
            outs = []
            try:
                for b in inputs_by[None]:
                    stats.reset_sharing()
                    outs.append(run_layer(layer, b, device).detach().to("cpu"))
            finally:
                for h in handles:
                    h.remove()
            stats.reset_sharing()
            d = current()
            on_layer(i, reduce_stats(stats, d) if d is not None else stats)
            return {None: outs}

        layer_loop(adapter, model, inputs_by, device, body)
